"""Paraphrase tables: which words in a caption name which detection class.

Shipped lists (`paraphrases/coco80.json`, `paraphrases/o365.json`) map each of the 80 COCO and the
365 Objects365 classes to the words a captioner uses for it (person ← man, woman, boy, ...), as the
original pseudo-labelling does. A mention names a class when it contains one of the class's
paraphrases as a whole word or words (singular or plural); the original tests raw substrings,
which lets "hand" match inside "handbag" — whole words avoid that.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from rlipv2_scale.errors import UserError

_IRREGULAR_PLURALS = {
    "man": "men", "woman": "women", "person": "people", "child": "children", "foot": "feet",
    "tooth": "teeth", "mouse": "mice", "goose": "geese", "knife": "knives", "leaf": "leaves",
    "shelf": "shelves", "wolf": "wolves", "scarf": "scarves", "sheep": "sheep", "fish": "fish",
    "deer": "deer", "policeman": "policemen", "fireman": "firemen", "fisherman": "fishermen",
}


def plural_forms(word: str) -> set[str]:
    """The singular and the usual plural spellings of a (possibly multi-word) noun phrase."""
    *head, last = word.split(" ")
    forms = {last}
    if last in _IRREGULAR_PLURALS:
        forms.add(_IRREGULAR_PLURALS[last])
    elif re.search(r"(s|x|z|ch|sh)$", last):
        forms.add(last + "es")
    elif re.search(r"[^aeiou]y$", last):
        forms.add(last[:-1] + "ies")
    else:
        forms.add(last + "s")
    return {" ".join(head + [f]) for f in forms}


@dataclass
class ParaphraseTable:
    """class name → paraphrases; `lookup` maps a word sequence to the classes it names."""

    classes: dict[str, list[str]]
    _index: dict[str, list[str]] = field(default_factory=dict, repr=False)
    max_words: int = 1

    def __post_init__(self) -> None:
        for name, words in self.classes.items():
            for word in [name, *words]:
                word = " ".join(word.lower().split())
                if not word:
                    continue
                for form in plural_forms(word):
                    owners = self._index.setdefault(form, [])
                    if name not in owners:
                        owners.append(name)
                    self.max_words = max(self.max_words, len(form.split(" ")))

    @classmethod
    def from_file(cls, path: str | Path) -> "ParaphraseTable":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise UserError(f"paraphrase file '{path}' does not exist") from exc
        except json.JSONDecodeError as exc:
            raise UserError(f"paraphrase file '{path}' is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise UserError(f"paraphrase file '{path}' must map class names to lists of words")
        return cls({k: [str(w) for w in v] for k, v in data.items()})

    def lookup(self, phrase: str) -> list[str]:
        return self._index.get(phrase, [])

    def missing(self, class_names: list[str]) -> list[str]:
        """Classes with no paraphrase at all (they can never be matched; reported, not fatal)."""
        return [c for c in class_names if c not in self.classes]


@lru_cache(maxsize=None)
def builtin_table(name: str) -> ParaphraseTable:
    """`coco80` or `o365`: the shipped tables."""
    files = {"coco80": "coco80.json", "o365": "o365.json"}
    if name not in files:
        raise UserError(f"unknown paraphrase table '{name}'; use one of {sorted(files)} or a JSON file path")
    text = resources.files(__package__).joinpath("paraphrases", files[name]).read_text()
    return ParaphraseTable(json.loads(text))


def load_table(name_or_path: str) -> ParaphraseTable:
    return builtin_table(name_or_path) if name_or_path in ("coco80", "o365") else ParaphraseTable.from_file(name_or_path)


def predicate_synonyms(name_or_path: str) -> dict[str, str] | None:
    """Wording → the predicate it is listed under (its synonyms merge into that), from `synthetic` (the
    synthetic world's predicate synonyms) or a JSON file mapping a predicate to its wordings; `none`:
    no merging."""
    if name_or_path == "none":
        return None
    if name_or_path == "synthetic":
        from rlipv2_scale.data.pseudo.synthetic_captions import PREDICATE_SYNONYMS

        groups = PREDICATE_SYNONYMS
    else:
        try:
            groups = json.loads(Path(name_or_path).read_text())
        except FileNotFoundError as exc:
            raise UserError(f"predicate synonym file '{name_or_path}' does not exist; use none, synthetic or "
                            "a JSON file mapping a predicate to its wordings") from exc
        except json.JSONDecodeError as exc:
            raise UserError(f"predicate synonym file '{name_or_path}' is not valid JSON: {exc}") from exc
        if not isinstance(groups, dict) or not all(isinstance(v, list) for v in groups.values()):
            raise UserError(f"predicate synonym file '{name_or_path}' must map each predicate to a list of wordings")
    merged: dict[str, str] = {}
    for pred, words in groups.items():
        for w in [pred, *words]:
            merged.setdefault(" ".join(str(w).lower().split()), pred)
    return merged
