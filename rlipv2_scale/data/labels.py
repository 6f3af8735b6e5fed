"""The per-batch label sequence (the original's `engine.py: merge_batch_data`, "label sequence extension").

Object texts: the ordered union of every annotated object name of the batch's images, then
negatives drawn from the dataset-wide vocabulary with probability proportional to instance
frequency (no duplicates) until `num_obj` entries, then "no objects". Relation texts: the ordered
union of the batch's predicates, then frequency-drawn negatives (triplet counts) until `num_rel`.
Lists already longer than their size are kept whole. Fine-tuning uses the benchmark's fixed lists
instead (no negatives).

Drawing a negative "proportionally to frequency, rejecting duplicates" is weighted sampling
without replacement, which `torch.multinomial(..., replacement=False)` does in one call. When the
vocabulary has fewer unused names than needed, all of them are used and the list stays shorter.
"""
from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rlipv2_scale.data.batch import NO_OBJECTS
from rlipv2_scale.data.schema import RelationalRecord
from rlipv2_scale.data.shards import iter_records
from rlipv2_scale.errors import DataError


@dataclass
class LabelSequence:
    obj_texts: list[str]          # ends with NO_OBJECTS
    rel_texts: list[str]
    num_obj_pos: int              # leading entries that are the batch's own (or the fixed list's) names
    num_rel_pos: int

    def __post_init__(self) -> None:
        self.obj_index = {name: i for i, name in enumerate(self.obj_texts)}
        self.rel_index = {name: i for i, name in enumerate(self.rel_texts)}

    def obj_id(self, name: str) -> int:
        try:
            return self.obj_index[name]
        except KeyError:
            raise DataError(f"object name {name!r} is not in the label list; add it to data.fixed_obj_labels "
                            f"or fix the annotation", reason="unknown_object_name") from None

    def rel_id(self, name: str) -> int:
        try:
            return self.rel_index[name]
        except KeyError:
            raise DataError(f"predicate {name!r} is not in the label list; add it to data.fixed_rel_labels "
                            f"or fix the annotation", reason="unknown_predicate") from None


def fixed_label_sequence(obj_labels: Sequence[str], rel_labels: Sequence[str]) -> LabelSequence:
    """Fine-tuning / evaluation: the benchmark's full label lists, as given, + "no objects"."""
    for kind, labels in (("object", obj_labels), ("relation", rel_labels)):
        dup = [n for n, c in Counter(labels).items() if c > 1]
        if dup:
            raise DataError(f"the fixed {kind} label list repeats {dup[:5]}", reason="duplicate_label")
    objs = [n for n in obj_labels if n != NO_OBJECTS]
    return LabelSequence(objs + [NO_OBJECTS], list(rel_labels), len(objs), len(rel_labels))


class LabelVocabulary:
    """Dataset-wide label frequencies: objects per instance, predicates per relation (triplet)."""

    def __init__(self, obj_counts: dict[str, int], rel_counts: dict[str, int]):
        self.obj_counts = dict(obj_counts)
        self.rel_counts = dict(rel_counts)
        self._objs = _Table(self.obj_counts)
        self._rels = _Table(self.rel_counts)

    # -- building ---------------------------------------------------------------------------------
    @classmethod
    def from_records(cls, records: Iterable[RelationalRecord], relation_threshold: float = 0.0) -> "LabelVocabulary":
        objs: Counter[str] = Counter()
        rels: Counter[str] = Counter()
        for record in records:
            objs.update(o.name for o in record.objects)
            rels.update(r.predicate for r in record.relations
                        if r.confidence is None or r.confidence >= relation_threshold)
        return cls(dict(objs.most_common()), dict(rels.most_common()))

    @classmethod
    def from_shards(cls, dirs: Iterable[str | Path], relation_threshold: float = 0.0) -> "LabelVocabulary":
        """Count names over local MDS shard directories (a scan of their annotations)."""
        records = itertools.chain.from_iterable(iter_records(d) for d in dirs)
        return cls.from_records(records, relation_threshold)

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"objects": self.obj_counts, "relations": self.rel_counts}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "LabelVocabulary":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"label vocabulary '{path}' does not exist; write one with LabelVocabulary.save "
                            f"or leave data.vocabulary unset to scan the shards", reason="missing_file")
        try:
            data = json.loads(path.read_text())
            return cls({str(k): int(v) for k, v in data["objects"].items()},
                       {str(k): int(v) for k, v in data["relations"].items()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"label vocabulary '{path}' is malformed ({exc!r}); expected "
                            f'{{"objects": {{name: count}}, "relations": {{name: count}}}}',
                            reason="malformed_json") from exc

    # -- sampling ---------------------------------------------------------------------------------
    def sample_objects(self, exclude: set[str], k: int, g: torch.Generator | None) -> list[str]:
        return self._objs.sample(exclude, k, g)

    def sample_relations(self, exclude: set[str], k: int, g: torch.Generator | None) -> list[str]:
        return self._rels.sample(exclude, k, g)


class _Table:
    """Names with their counts as sampling weights."""

    def __init__(self, counts: dict[str, int]):
        self.names = list(counts)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.weights = torch.tensor([float(c) for c in counts.values()], dtype=torch.float64)

    def sample(self, exclude: set[str], k: int, g: torch.Generator | None) -> list[str]:
        if k <= 0 or not self.names:
            return []
        w = self.weights.clone()
        w[[self.index[n] for n in exclude if n in self.index]] = 0.0
        k = min(k, int((w > 0).sum()))
        if k == 0:
            return []
        return [self.names[i] for i in torch.multinomial(w, k, replacement=False, generator=g).tolist()]


def build_label_sequence(obj_names: Iterable[Iterable[str]], predicates: Iterable[Iterable[str]],
                         vocab: LabelVocabulary | None, num_obj: int, num_rel: int,
                         g: torch.Generator | None) -> LabelSequence:
    """Positives (first-appearance order over the batch's images) + negatives, + "no objects"."""
    objs = list(dict.fromkeys(n for names in obj_names for n in names if n != NO_OBJECTS))
    rels = list(dict.fromkeys(p for preds in predicates for p in preds))
    n_obj_pos, n_rel_pos = len(objs), len(rels)
    if vocab is not None:
        objs += vocab.sample_objects(set(objs) | {NO_OBJECTS}, num_obj - len(objs), g)
        rels += vocab.sample_relations(set(rels), num_rel - len(rels), g)
    return LabelSequence(objs + [NO_OBJECTS], rels, n_obj_pos, n_rel_pos)
