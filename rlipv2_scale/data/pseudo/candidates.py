"""Relation candidates: ordered pairs of an image's boxes whose classes match a parsed triplet.

Every ordered pair (i, j), i ≠ j, whose class names equal a triplet's subject and object classes
is a candidate for that triplet's phrase (a pair may carry several phrases). Candidates are grouped
into chunks of at most `chunk_size` pairs (one Tagger forward scores one chunk: P = Nq / 2 = 100
relation queries), each with the unique phrases of its pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlipv2_scale.data.pseudo.caption_parsing import Triplet


@dataclass
class CandidateChunk:
    pairs: list[tuple[int, int]]        # (subject object-index, object object-index)
    texts: list[str]                    # unique relation phrases of these pairs, first-seen order
    pair_texts: list[list[str]]         # the phrases that made each pair a candidate

    def as_original(self) -> list:
        """The original's JSON form: [[[s, o], ...], ["rel text", ...]]."""
        return [[list(p) for p in self.pairs], list(self.texts)]


def build_candidates(object_classes: list[str], triplets: list[Triplet], chunk_size: int = 100) -> list[CandidateChunk]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    by_classes: dict[tuple[str, str], list[str]] = {}
    for t in triplets:
        phrases = by_classes.setdefault((t.subject, t.object), [])
        if t.phrase not in phrases:
            phrases.append(t.phrase)
    pairs: list[tuple[tuple[int, int], list[str]]] = []
    for i, ci in enumerate(object_classes):
        for j, cj in enumerate(object_classes):
            if i != j and (ci, cj) in by_classes:
                pairs.append(((i, j), by_classes[(ci, cj)]))
    chunks = []
    for start in range(0, len(pairs), chunk_size):
        part = pairs[start:start + chunk_size]
        texts: list[str] = []
        for _, phrases in part:
            texts += [p for p in phrases if p not in texts]
        chunks.append(CandidateChunk([p for p, _ in part], texts, [list(ph) for _, ph in part]))
    return chunks
