"""Captions → (subject class, relation phrase, object class) triplets.

Entity mentions are matched to the image's detection classes through a paraphrase table; relation
phrases are taken between two matched mentions. Two parsers share this contract: a spaCy
dependency parser (used when an English spaCy model is installed) and a built-in rule-based one
that needs no model. Both only keep relations whose subject and object name a class present in
the image, and the triplets of an image are unique.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from rlipv2_scale.data.pseudo.paraphrases import ParaphraseTable

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?|,|\.|;")

# Words that are never part of a relation phrase at its edges: determiners, numbers, auxiliaries,
# and the common visual adjectives captioners put before a noun.
_EDGE_STOP = {
    "a", "an", "the", "this", "that", "these", "those", "some", "several", "many", "few", "two", "three",
    "four", "five", "six", "one", "his", "her", "their", "its", "our", "my", "your", "is", "are", "was",
    "were", "be", "being", "been", "who", "which", "while", "there", "other", "another", "each",
    "white", "black", "red", "blue", "green", "yellow", "brown", "orange", "pink", "purple", "gray",
    "grey", "small", "large", "big", "little", "young", "old", "tall", "long", "short", "wooden",
    "metal", "dark", "bright", "colorful", "pair", "group", "couple", "bunch", "lot", "lots",
}
# A mention pair separated by one of these is not related by the words between them.
_BREAK = {"and", "or", "but", ",", ".", ";"}


@dataclass(frozen=True)
class Triplet:
    subject: str      # class name
    phrase: str       # free-form relation phrase ("riding", "sitting on")
    object: str       # class name


@dataclass
class Mention:
    start: int
    end: int          # exclusive token index
    cls: str


class CaptionParser(Protocol):
    table: ParaphraseTable

    def parse(self, caption: str, classes: set[str]) -> list[Triplet]: ...


def _tokens(caption: str) -> list[str]:
    return _WORD.findall(caption.lower())


def find_mentions(tokens: list[str], table: ParaphraseTable, classes: set[str]) -> list[Mention]:
    """Longest-match scan for paraphrases of the present classes, left to right."""
    mentions: list[Mention] = []
    i = 0
    while i < len(tokens):
        hit = None
        for n in range(min(table.max_words, len(tokens) - i), 0, -1):
            owners = [c for c in table.lookup(" ".join(tokens[i:i + n])) if c in classes]
            if owners:
                hit = Mention(i, i + n, owners[0])
                break
        if hit:
            # A noun followed by another noun of the same phrase ("tennis racket") is one mention:
            # the scan is longest-first, so the multi-word paraphrase already won.
            mentions.append(hit)
            i = hit.end
        else:
            i += 1
    return mentions


def clean_phrase(words: list[str]) -> str:
    while words and words[0] in _EDGE_STOP:
        words = words[1:]
    while words and words[-1] in _EDGE_STOP:
        words = words[:-1]
    return " ".join(words)


class RuleBasedParser:
    """Relation = the words between two consecutive mentions, trimmed of determiners and the like."""

    def __init__(self, table: ParaphraseTable, max_phrase_words: int = 4):
        self.table = table
        self.max_phrase_words = max_phrase_words

    def parse(self, caption: str, classes: set[str]) -> list[Triplet]:
        tokens = _tokens(caption)
        mentions = find_mentions(tokens, self.table, classes)
        out: list[Triplet] = []
        for a, b in zip(mentions, mentions[1:]):
            between = tokens[a.end:b.start]
            if any(w in _BREAK for w in between):
                continue
            phrase = clean_phrase(between)
            if phrase and len(phrase.split()) <= self.max_phrase_words:
                out.append(Triplet(a.cls, phrase, b.cls))
        return out


class SpacyParser:
    """Dependency-based: verb/preposition paths between noun chunks that name present classes."""

    def __init__(self, table: ParaphraseTable, nlp):
        self.table = table
        self.nlp = nlp

    def _cls(self, token, classes: set[str]) -> str | None:
        words = [t.lower_ for t in token.subtree if t.i <= token.i][-self.table.max_words:]
        for n in range(len(words), 0, -1):
            owners = [c for c in self.table.lookup(" ".join(words[-n:])) if c in classes]
            if owners:
                return owners[0]
        return None

    def parse(self, caption: str, classes: set[str]) -> list[Triplet]:
        return self.parse_doc(self.nlp(caption.lower()), classes)

    def parse_doc(self, doc, classes: set[str]) -> list[Triplet]:
        out: list[Triplet] = []
        for tok in doc:
            if tok.pos_ == "VERB":
                if tok.dep_ in ("acl", "relcl"):
                    subjects = [tok.head]
                else:
                    subjects = [c for c in tok.children if c.dep_ in ("nsubj", "nsubjpass")]
                objects = [(c, tok.text) for c in tok.children if c.dep_ in ("dobj", "obj")]
                for prep in (c for c in tok.children if c.dep_ == "prep"):
                    objects += [(p, f"{tok.text} {prep.text}") for p in prep.children if p.dep_ == "pobj"]
                for s in subjects:
                    for o, phrase in objects:
                        self._add(out, s, phrase, o, classes)
            elif tok.dep_ == "prep" and tok.head.pos_ in ("NOUN", "PROPN"):
                head_words = [tok.text] + [c.text for c in tok.children if c.dep_ == "pcomp"]
                for p in (c for c in tok.children if c.dep_ == "pobj"):
                    self._add(out, tok.head, " ".join(head_words), p, classes)
        return out

    def _add(self, out: list[Triplet], s, phrase: str, o, classes: set[str]) -> None:
        sc, oc = self._cls(s, classes), self._cls(o, classes)
        if sc and oc:
            out.append(Triplet(sc, phrase, oc))


def make_parser(table: ParaphraseTable, prefer: str = "auto") -> CaptionParser:
    """`auto`: spaCy when an English model loads, else the rule-based parser; `rules` / `spacy` force."""
    if prefer in ("auto", "spacy"):
        try:
            import spacy

            return SpacyParser(table, spacy.load("en_core_web_sm"))
        except (ImportError, OSError) as exc:
            if prefer == "spacy":
                from rlipv2_scale.errors import UserError

                raise UserError("the spaCy parser needs spaCy and its English model: "
                                "pip install spacy && python -m spacy download en_core_web_sm") from exc
    return RuleBasedParser(table)


@dataclass
class ParseStats:
    captions: int = 0
    captions_without_triplet: int = 0
    triplets: int = 0
    phrases: Counter = field(default_factory=Counter)

    def as_dict(self, top: int = 20) -> dict:
        return {"captions": self.captions, "captions_without_triplet": self.captions_without_triplet,
                "triplets": self.triplets, "phrase_kinds": len(self.phrases),
                "top_phrases": self.phrases.most_common(top)}


def image_triplets(captions: Iterable[str], classes: set[str], parser: CaptionParser,
                   stats: ParseStats | None = None, per_caption: list | None = None) -> list[Triplet]:
    """Unique triplets of one image over all its captions, in first-seen order; `per_caption`, when
    given, receives each caption's triplets (how many captions say what, and how many times)."""
    seen: dict[Triplet, None] = {}
    for caption in captions:
        found = parser.parse(caption, classes)
        if per_caption is not None:
            per_caption.append(found)
        if stats is not None:
            stats.captions += 1
            stats.captions_without_triplet += not found
        for t in found:
            if t not in seen:
                seen[t] = None
                if stats is not None:
                    stats.triplets += 1
                    stats.phrases[t.phrase] += 1
    return list(seen)
