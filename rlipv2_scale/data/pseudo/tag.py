"""Tagging relation candidates and writing pseudo-labelled scene graphs.

A `PairScorer` (the Relation Tagger, or any model with the same contract) gives a confidence for
every (candidate pair, relation text) of a chunk. `run_tagging` walks images with their candidate
chunks, takes this rank's share, keeps every confidence ≥ `keep_threshold` (0.05: the training-time
threshold, 0.20 by default, is applied when the file is read) and appends one JSON line per image
to a per-rank file — resumable like captioning. `to_scene_graph`
builds the original's pseudo-label JSON entry (as the original's
`generate_relations_using_verb_tagger.py: verb_tagger_with_text` writes it) and `to_record` the project's
`RelationalRecord`, so the output goes straight into MDS shards.

Which scores of a forward become tags (`TagConfig`): the texts a pair may take (`texts`: its own
candidate texts, or every text of the chunk as the original does: every phrase of a chunk is scored
against every pair of it, so a pair also gets the phrases of other pairs, which on the synthetic
world halves precision), synonymous wordings of one predicate merged into one tag at their highest
confidence (`synonyms`), and then either the captions' evidence (`use_captions`, see
`CaptionEvidence`: one predicate per pair, as many pairs per class pair as a caption relates) or
every score ≥ `keep_threshold`, optionally the top-k per pair (benchmarks/results/pseudo_label_proof.md
compares them).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np

from rlipv2_scale.data.pseudo.candidates import CandidateChunk
from rlipv2_scale.data.pseudo.jsonl import done_ids, rank_file, read_rows
from rlipv2_scale.data.schema import ImageInfo, Object, Relation, RelationalRecord
from rlipv2_scale.errors import DataError, UserError

OBJECT_ID_BASE = 10_000_000      # the original numbers objects and relationships from here


class PairScorer(Protocol):
    def score(self, record: RelationalRecord, chunk: CandidateChunk) -> np.ndarray:
        """Confidences in [0, 1], shape [len(chunk.pairs), len(chunk.texts)]."""
        ...


@dataclass
class TaggedRelation:
    subject: int
    object: int
    predicate: str
    confidence: float


TEXT_MODES = ("candidates", "all")


@dataclass
class TagConfig:
    keep_threshold: float = 0.05
    top_k_per_pair: int | None = None        # without use_captions; the original's "Top2" files use 2
    texts: str = "candidates"                # "all": every text of the forward, as the original
    synonyms: dict[str, str] | None = None   # phrase → the wording its synonyms are merged into
    deduplicate: bool = True                 # keep the max confidence per (subject, object, predicate)
    use_captions: bool = True                # weigh the Tagger with the captions (`CaptionEvidence`)

    def __post_init__(self) -> None:
        if self.texts not in TEXT_MODES:
            raise ValueError(f"texts must be one of {TEXT_MODES}, got {self.texts!r}")


@dataclass
class CaptionEvidence:
    """What an image's captions say: each caption's (subject class, phrase, object class) triplets.

    A candidate pair is made by class names alone, so with two people and one cup both person → cup
    pairs are candidates for "holding" while a caption that names one holding means one. The Tagger
    sees the pixels, the captions know how many and what: `tag_image` takes from the captions the
    share of captions that state a (classes, predicate), the share that relate the two classes at
    all, and the most instances of a class pair any one caption relates; from the Tagger which pairs
    and how sure.
    """

    captions: list[list[tuple[str, str, str]]]

    def support(self, subject: str, obj: str, synonyms: dict[str, str] | None) -> dict[str, float]:
        """Predicate (merged wording) → the share of captions stating it for this class pair."""
        counts: dict[str, int] = {}
        for triplets in self.captions:
            for pred in {(synonyms or {}).get(p, p) for s, p, o in triplets if (s, o) == (subject, obj)}:
                counts[pred] = counts.get(pred, 0) + 1
        return {p: n / max(1, len(self.captions)) for p, n in counts.items()}

    def pair_share(self, subject: str, obj: str) -> float:
        """The share of captions relating this class pair, in any words."""
        return sum(any((s, o) == (subject, obj) for s, _, o in ts) for ts in self.captions) / max(1, len(self.captions))

    def instances(self, subject: str, obj: str) -> int:
        return max((sum((s, o) == (subject, obj) for s, _, o in ts) for ts in self.captions), default=0)


def _caption_weighted(record: RelationalRecord, chunks: list[CandidateChunk], scorer: PairScorer, cfg: TagConfig,
                      evidence: CaptionEvidence) -> list[TaggedRelation]:
    """One predicate per pair, the one of highest Tagger × caption share; per class pair, the pairs
    the Tagger is surest of, as many as one caption relates at most; confidence √(Tagger × the share
    of captions relating the class pair), a relation both agree on. The class pair's share, not the
    predicate's, because captions split one predicate over its wordings ("riding", "sitting on top
    of"): without a synonym table that would halve the confidence of a well-attested relation. On
    the synthetic world this lifts precision without losing recall
    (benchmarks/results/pseudo_label_proof.md)."""
    names = [o.name for o in record.objects]
    chosen: dict[tuple[int, int], tuple[float, str]] = {}     # pair → (Tagger confidence, predicate)
    supports: dict[tuple[str, str], dict[str, float]] = {}
    for chunk in chunks:
        scores = _scores(record, chunk, scorer)
        for p, (s, o) in enumerate(chunk.pairs):
            classes = (names[s], names[o])
            if classes not in supports:
                supports[classes] = evidence.support(*classes, cfg.synonyms)
            allowed = chunk.pair_texts[p] if cfg.texts == "candidates" else chunk.texts
            tagger: dict[str, float] = {}
            for t, text in enumerate(chunk.texts):
                if text in allowed:
                    pred = (cfg.synonyms or {}).get(text, text)
                    tagger[pred] = max(tagger.get(pred, 0.0), float(scores[p, t]))
            sup = supports[classes]
            best = max(tagger, key=lambda q: (tagger[q] * sup.get(q, 0.0), tagger[q]), default=None)
            if best is None:
                continue
            if (s, o) not in chosen or tagger[best] > chosen[(s, o)][0]:      # a pair in two chunks
                chosen[(s, o)] = (tagger[best], best)
    by_classes: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for pair in chosen:
        by_classes.setdefault((names[pair[0]], names[pair[1]]), []).append(pair)
    out = []
    for classes, pairs in by_classes.items():
        pairs.sort(key=lambda pair: -chosen[pair][0])
        share = evidence.pair_share(*classes)
        for s, o in pairs[:max(1, evidence.instances(*classes))]:
            tagger_conf, pred = chosen[(s, o)]
            conf = float(np.sqrt(tagger_conf * share))
            if conf >= cfg.keep_threshold:
                out.append(TaggedRelation(s, o, pred, conf))
    return out


def _scores(record: RelationalRecord, chunk: CandidateChunk, scorer: PairScorer) -> np.ndarray:
    scores = np.asarray(scorer.score(record, chunk), dtype=np.float64)
    if scores.shape != (len(chunk.pairs), len(chunk.texts)):
        raise ValueError(f"scorer returned shape {scores.shape} for {len(chunk.pairs)} pairs × "
                         f"{len(chunk.texts)} texts")
    return scores


def tag_image(record: RelationalRecord, chunks: list[CandidateChunk], scorer: PairScorer,
              cfg: TagConfig, evidence: CaptionEvidence | None = None) -> list[TaggedRelation]:
    """The tags of one image; with `cfg.use_captions` and the image's caption evidence, one per pair
    weighed with the captions (`_caption_weighted`), else every kept score (top-k per pair)."""
    if cfg.use_captions and evidence is not None:
        return _caption_weighted(record, chunks, scorer, cfg, evidence)
    found: dict[tuple[int, int, str], float] = {}      # insertion order = first time seen
    duplicates: list[TaggedRelation] = []
    for chunk in chunks:
        scores = _scores(record, chunk, scorer)
        for p, (s, o) in enumerate(chunk.pairs):
            allowed = set(chunk.pair_texts[p]) if cfg.texts == "candidates" else set(chunk.texts)
            ranked = [t for t in np.argsort(-scores[p], kind="stable")
                      if scores[p, t] >= cfg.keep_threshold and chunk.texts[t] in allowed]
            if cfg.synonyms:                 # ranked by confidence: the first wording of a group is its max
                merged: dict[str, int] = {}
                for t in ranked:
                    merged.setdefault(cfg.synonyms.get(chunk.texts[t], chunk.texts[t]), t)
                picked = list(merged.items())
            else:
                picked = [(chunk.texts[t], t) for t in ranked]
            for text, t in picked[:cfg.top_k_per_pair] if cfg.top_k_per_pair else picked:
                key, conf = (s, o, text), float(scores[p, t])
                if key in found and not cfg.deduplicate:
                    duplicates.append(TaggedRelation(*key, conf))
                else:
                    found[key] = max(conf, found.get(key, conf))
    return [TaggedRelation(*key, conf) for key, conf in found.items()] + duplicates


def output_path(out_dir: Path, rank: int) -> Path:
    return rank_file(out_dir, "tags", rank)


@dataclass
class TagRunSummary:
    tagged: int = 0
    already_done: int = 0
    without_candidates: int = 0
    relations: int = 0
    failed_to_decode: list = field(default_factory=list)    # (image id, reason): not written, retried on a rerun


OPTIONS_FILE = "tag_options.json"


def check_options(out_dir: Path, options: dict, rank: int) -> None:
    """A rerun resumes a folder (images already tagged are skipped) only with the options that wrote
    it: otherwise its rows would mix two runs' labels with nothing to tell them apart."""
    path = out_dir / OPTIONS_FILE
    options = json.loads(json.dumps(options))        # as it reads back (tuples → lists)
    if path.is_file():
        before = json.loads(path.read_text())
        if before != options and any(out_dir.glob("tags.rank*.jsonl")):
            changed = sorted(k for k in before.keys() | options.keys() if before.get(k) != options.get(k))
            raise UserError(f"{out_dir} holds tags written with other settings ({', '.join(changed)} differ; see "
                            f"{path}): rerun with the same settings to resume it, or tag into a new --out")
    if rank == 0:
        path.write_text(json.dumps(options, indent=1, sort_keys=True) + "\n")


def check_row(row: dict) -> str | None:
    """What is wrong with a tags row (its image id is checked by `jsonl`), or None."""
    record, rels = row.get("record"), row.get("relations")
    if not isinstance(record, dict) or not isinstance(record.get("image"), dict) \
            or not isinstance(record.get("objects"), list):
        return "has no record with an image and its objects"
    keys = {f.name for f in fields(TaggedRelation)}
    if not isinstance(rels, list) or not all(isinstance(r, dict) and r.keys() == keys for r in rels):
        return f"has relations {repr(rels)[:80]}: they must be a list of objects with keys {', '.join(sorted(keys))}"
    return None


def run_tagging(items: Iterable[tuple], scorer: PairScorer,
                out_dir: str | Path, cfg: TagConfig | None = None, rank: int = 0,
                world_size: int = 1) -> TagRunSummary:
    """Tag this rank's share (item k → rank k mod world_size); one JSON line per image. An item is
    (record, chunks) or (record, chunks, caption evidence or None). The options are recorded in
    the folder; a rerun into it must use the same."""
    cfg = cfg or TagConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_options(out_dir, asdict(cfg), rank)
    path = output_path(out_dir, rank)
    done = done_ids(path, check_row)
    summary = TagRunSummary()
    with path.open("a") as f:
        for k, (record, chunks, *evidence) in enumerate(items):
            if k % world_size != rank:
                continue
            if str(record.image.id) in done:
                summary.already_done += 1
                continue
            try:
                rels = tag_image(record, chunks, scorer, cfg, *evidence) if chunks else []
            except DataError as exc:          # a corrupt image: counted and reported, the run goes on
                summary.failed_to_decode.append((record.image.id, str(exc)))
                continue
            summary.without_candidates += not chunks
            row = {"image_id": record.image.id, "record": record.annotation(),
                   "relations": [r.__dict__ for r in rels]}
            f.write(json.dumps(row) + "\n")
            f.flush()
            summary.tagged += 1
            summary.relations += len(rels)
    return summary


def read_tags(out_dir: str | Path) -> Iterator[tuple[dict, list[TaggedRelation]]]:
    for row in read_rows(out_dir, "tags", check_row):
        yield row["record"], [TaggedRelation(**r) for r in row["relations"]]


def to_scene_graph(ann: dict, relations: list[TaggedRelation], dataset: str, next_id: list[int]) -> dict:
    """The original's pseudo-label entry; `next_id` is a one-element global counter."""
    img = ann["image"]
    object_ids = []
    objects = []
    for o in ann["objects"]:
        x1, y1, x2, y2 = o["box"]
        object_ids.append(next_id[0])
        objects.append({"object_id": next_id[0], "x": x1, "y": y1, "w": x2 - x1, "h": y2 - y1, "names": o["name"]})
        next_id[0] += 1
    rels = []
    for r in relations:
        rels.append({"relationship_id": next_id[0], "predicate": r.predicate, "subject_id": object_ids[r.subject],
                     "object_id": object_ids[r.object], "confidence": round(r.confidence, 6)})
        next_id[0] += 1
    return {"image_id": img["id"], "dataset": dataset, "data_split": img["split"], "objects": objects,
            "relationships": rels}


def to_record(ann: dict, relations: list[TaggedRelation], threshold: float, image_bytes: bytes | None = None,
              source: str | None = None) -> RelationalRecord | None:
    """A training record keeping relations ≥ threshold; None when none is left (as the original)."""
    kept = [r for r in relations if r.confidence >= threshold]
    if not kept:
        return None
    img = dict(ann["image"])
    if source:
        img["source"] = source
    return RelationalRecord(
        image=ImageInfo(**img),
        objects=[Object(tuple(o["box"]), o["name"], o.get("category_id")) for o in ann["objects"]],
        relations=[Relation(r.subject, r.object, r.predicate, r.confidence) for r in kept],
        provenance={**ann.get("provenance", {}), "pseudo_label_threshold": threshold},
        image_bytes=image_bytes,
    )


@dataclass
class PseudoLabelReport:
    images: int = 0
    relations_per_threshold: dict[float, int] = field(default_factory=dict)
    images_per_threshold: dict[float, int] = field(default_factory=dict)
    predicates: Counter = field(default_factory=Counter)

    def as_dict(self, top: int = 25) -> dict:
        return {"images": self.images,
                "relations_per_threshold": {str(k): v for k, v in sorted(self.relations_per_threshold.items())},
                "images_per_threshold": {str(k): v for k, v in sorted(self.images_per_threshold.items())},
                "predicate_kinds": len(self.predicates), "top_predicates": self.predicates.most_common(top)}


def report(tags: Iterable[tuple[dict, list[TaggedRelation]]],
           thresholds: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5), count_at: float = 0.2) -> PseudoLabelReport:
    rep = PseudoLabelReport()
    for _, rels in tags:
        rep.images += 1
        for t in thresholds:
            n = sum(r.confidence >= t for r in rels)
            rep.relations_per_threshold[t] = rep.relations_per_threshold.get(t, 0) + n
            rep.images_per_threshold[t] = rep.images_per_threshold.get(t, 0) + (n > 0)
        rep.predicates.update(r.predicate for r in rels if r.confidence >= count_at)
    return rep
