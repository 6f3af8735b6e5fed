"""The label space a relation-detection evaluator scores against.

HICO-DET is the default (80 objects with COCO ids, 117 verbs with ids 1..117, the 600-HOI valid
verb-object matrix, the UC-RF / UC-NF / UO zero-shot splits), but nothing in the evaluators is
hard-wired to it: a synthetic benchmark passes its own objects, verbs, valid matrix and held-out
("unseen") triplets.

Numbering: annotation files carry *ids* (`category_id`); evaluators work on *indices* (position in
`objects` / `verbs`). A triplet is `(subject index, object index, verb index)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from rlipv2_scale.errors import UserError

Triplet = tuple[int, int, int]


@dataclass(frozen=True, eq=False)
class LabelSpace:
    objects: tuple[str, ...]
    verbs: tuple[str, ...]
    valid: np.ndarray  # float [n_verbs, n_objects]; candidate scores are multiplied by it
    object_ids: tuple[int, ...] = ()  # `category_id` of each object in files; default: its index
    verb_ids: tuple[int, ...] = ()
    # subject of every triplet ("person" for HICO-DET): zero-shot "seen" = the valid (subject, object,
    # verb) combinations that are not unseen; None = any subject, "seen" = every other test triplet
    subject_index: int | None = 0
    zero_shot_splits: dict[str, tuple[Triplet, ...]] = field(default_factory=dict)
    name: str = "custom"

    def __post_init__(self) -> None:
        valid = np.asarray(self.valid, dtype=np.float64)
        if valid.shape != (len(self.verbs), len(self.objects)):
            raise UserError(f"label space {self.name!r}: valid matrix has shape {valid.shape}, expected "
                            f"(n_verbs, n_objects) = ({len(self.verbs)}, {len(self.objects)})")
        object.__setattr__(self, "valid", valid)
        object.__setattr__(self, "objects", tuple(self.objects))
        object.__setattr__(self, "verbs", tuple(self.verbs))
        object.__setattr__(self, "object_ids", tuple(int(i) for i in self.object_ids) or tuple(range(len(self.objects))))
        object.__setattr__(self, "verb_ids", tuple(int(i) for i in self.verb_ids) or tuple(range(len(self.verbs))))
        for what, ids, names in (("object", self.object_ids, self.objects), ("verb", self.verb_ids, self.verbs)):
            if len(ids) != len(names) or len(set(ids)) != len(ids):
                raise UserError(f"label space {self.name!r}: {what} ids must be unique, one per {what}")

    @property
    def n_objects(self) -> int:
        return len(self.objects)

    @property
    def n_verbs(self) -> int:
        return len(self.verbs)

    def id_lookup(self, kind: str) -> np.ndarray:
        """Dense id -> index table (-1 for ids outside the space), for vectorised conversion."""
        ids = self.object_ids if kind == "object" else self.verb_ids
        table = np.full(max(ids) + 1, -1, dtype=np.int64)
        table[list(ids)] = np.arange(len(ids))
        return table

    def triplet_code(self, sub: np.ndarray, obj: np.ndarray, verb: np.ndarray) -> np.ndarray:
        """One integer per (subject, object, verb) index triplet."""
        return (np.asarray(sub, np.int64) * self.n_objects + obj) * self.n_verbs + verb

    def decode(self, code: int) -> Triplet:
        rest, verb = divmod(int(code), self.n_verbs)
        sub, obj = divmod(rest, self.n_objects)
        return sub, obj, verb

    def unseen_triplets(self, zero_shot: str | Iterable[Sequence[int]]) -> tuple[Triplet, ...]:
        """A split name of this space, or explicit (subject, object, verb) index triplets."""
        if isinstance(zero_shot, str):
            if zero_shot not in self.zero_shot_splits:
                raise UserError(f"unknown zero-shot split {zero_shot!r} for label space {self.name!r}; "
                                f"known: {sorted(self.zero_shot_splits)} (or pass a file of unseen triplets)")
            return self.zero_shot_splits[zero_shot]
        out = []
        for t in zero_shot:
            t = tuple(int(x) for x in t)
            if len(t) != 3 or not (0 <= t[0] < self.n_objects and 0 <= t[1] < self.n_objects
                                   and 0 <= t[2] < self.n_verbs):
                raise UserError(f"unseen triplet {t} is not (subject index, object index, verb index) "
                                f"within {self.n_objects} objects and {self.n_verbs} verbs")
            out.append(t)
        return tuple(out)


def hico_label_space() -> LabelSpace:
    """HICO-DET: COCO-id objects, verbs 1..117, the 600-HOI valid matrix and zero-shot splits."""
    from rlipv2_scale.labels import metadata as md

    objects, verbs = md.hico_objects(), md.hico_verbs()
    splits: dict[str, tuple[Triplet, ...]] = {
        name: tuple((int(s), int(o), int(v)) for s, o, v in split["unseen_triplets"])
        for name, split in md.hico_zero_shot_splits()["splits"].items()}
    return LabelSpace(
        objects=tuple(o["name"] for o in objects), verbs=tuple(v["text"] for v in verbs),
        valid=md.hico_valid_verb_object(), object_ids=tuple(o["coco_id"] for o in objects),
        verb_ids=tuple(v["id"] for v in verbs), subject_index=0, zero_shot_splits=splits, name="hico-det")
