"""Pseudo-label precision and recall against known relations (the synthetic world's hidden truth,
or any labelled subset of a detection dataset).

Pseudo-labels carry free-form phrases ("carrying", "sitting on top of"); `canonical` maps a phrase
to the truth's predicate vocabulary (None: no predicate of the truth — a wrong pseudo-label). One
prediction per (image, subject, object, canonical predicate), at its highest confidence.
"""
from __future__ import annotations

from typing import Callable, Iterable

from rlipv2_scale.data.pseudo.candidates import CandidateChunk
from rlipv2_scale.data.pseudo.tag import TaggedRelation

Truth = dict[str, list[tuple[int, int, str]]]          # image id → (subject, object, predicate)
Canonical = Callable[[str], "str | None"]


def _key(image: str, s: int, o: int, phrase: str, canonical: Canonical) -> tuple:
    return image, s, o, canonical(phrase) or f"?{phrase}"


def _scores(pred: set, true: set) -> dict[str, float | int | None]:
    hit = len(pred & true)
    return {"predicted": len(pred), "correct": hit, "true": len(true),
            "precision": round(hit / len(pred), 4) if pred else None,
            "recall": round(hit / len(true), 4) if true else None}


def tag_quality(tags: Iterable[tuple[str, list[TaggedRelation]]], truth: Truth, canonical: Canonical,
                thresholds: Iterable[float] = (0.05, 0.2, 0.5)) -> dict[str, dict]:
    """Precision / recall of the tagged relations kept at each confidence threshold."""
    true = {(i, s, o, p) for i, rels in truth.items() for s, o, p in rels}
    best: dict[tuple, float] = {}
    for image, rels in tags:
        for r in rels:
            key = _key(str(image), r.subject, r.object, r.predicate, canonical)
            best[key] = max(best.get(key, 0.0), r.confidence)
    return {str(t): _scores({k for k, c in best.items() if c >= t}, true) for t in thresholds}


def candidate_quality(candidates: dict[str, list[CandidateChunk]], truth: Truth, canonical: Canonical) -> dict:
    """Every candidate (pair, text of its own triplets) accepted: the precision without a Tagger and
    the recall no Tagger can exceed (a relation absent from the captions cannot be recovered)."""
    true = {(i, s, o, p) for i, rels in truth.items() for s, o, p in rels}
    pred = {_key(str(i), s, o, t, canonical)
            for i, chunks in candidates.items() for c in chunks
            for (s, o), texts in zip(c.pairs, c.pair_texts) for t in texts}
    return _scores(pred, true)
