"""A captioner for the synthetic world, standing in for BLIP where no weights exist.

It writes captions from a scene's true graph with the noise a real captioner has: objects named by
paraphrases (person → man, woman, kid, ...), predicates by synonyms (holding → carrying, ...),
relations left out, relations replaced by a wrong one, and clauses that relate nothing. The
pipeline never sees the true graph; pseudo-label precision and recall are measured against it.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

# Paraphrases per synthetic class (also the paraphrase table the parser uses for this world).
NAME_PARAPHRASES: dict[str, list[str]] = {
    "person": ["person", "man", "woman", "kid", "boy", "girl"],
    "ball": ["ball", "sphere"],
    "box": ["box", "crate"],
    "cup": ["cup", "mug"],
    "table": ["table", "desk"],
    "bottle": ["bottle", "flask"],
    "book": ["book", "notebook"],
    "basket": ["basket", "bin"],
    "lamp": ["lamp", "light"],
    "car": ["car", "vehicle"],
}

# Synonyms per predicate; the first is the canonical text the world uses.
PREDICATE_SYNONYMS: dict[str, list[str]] = {
    "holding": ["holding", "carrying", "gripping"],
    "riding": ["riding", "sitting on top of"],
    "inside": ["inside", "in", "within"],
    "under": ["under", "beneath", "below"],
    "on": ["on", "resting on", "on top of"],
    "above": ["above", "over", "hovering over"],
    "next to": ["next to", "beside", "by"],
    "left of": ["left of", "to the left of"],
}

_EXTRA = ["in a room", "on a sunny day", "near a wall", "in the picture", "with a plain background"]


def canonical_predicate(phrase: str) -> str | None:
    """Map a (synonym) phrase back to the world's predicate, for scoring against the truth."""
    for pred, synonyms in PREDICATE_SYNONYMS.items():
        if phrase in synonyms:
            return pred
    return None


@dataclass
class SyntheticCaptioner:
    """Captions from (objects, relations) with controlled noise; deterministic per (seed, image id)."""

    num_captions: int = 10
    p_drop: float = 0.25          # a true relation left out of a caption
    p_wrong: float = 0.1          # a true relation stated with a wrong predicate
    p_extra: float = 0.3          # a clause that relates nothing
    seed: int = 0

    def captions_for(self, image_id: int | str, names: list[str], relations: list[tuple[int, int, str]]) -> list[str]:
        rng = np.random.default_rng([self.seed, zlib.crc32(str(image_id).encode())])
        out = []
        for _ in range(self.num_captions):
            clauses = []
            for s, o, pred in relations:
                if rng.random() < self.p_drop:
                    continue
                if rng.random() < self.p_wrong:
                    pred = str(rng.choice([p for p in PREDICATE_SYNONYMS if p != pred]))
                phrase = str(rng.choice(PREDICATE_SYNONYMS[pred]))
                subj = str(rng.choice(NAME_PARAPHRASES.get(names[s], [names[s]])))
                obj = str(rng.choice(NAME_PARAPHRASES.get(names[o], [names[o]])))
                clauses.append(f"a {subj} {phrase} a {obj}")
            if not clauses:
                i = int(rng.integers(len(names)))
                clauses.append(f"a {rng.choice(NAME_PARAPHRASES.get(names[i], [names[i]]))}")
            if rng.random() < self.p_extra:
                clauses[-1] += f" {rng.choice(_EXTRA)}"
            out.append(" and ".join(clauses))
        return out


class TruthCaptioner:
    """The `Captioner` contract over hidden truth: image id → (object names, relations)."""

    def __init__(self, truth: dict[str, tuple[list[str], list[tuple[int, int, str]]]], captioner: SyntheticCaptioner):
        self.truth = truth
        self.captioner = captioner

    def caption(self, images, image_ids) -> list[list[str]]:
        return [self.captioner.captions_for(i, *self.truth[str(i)]) for i in image_ids]
