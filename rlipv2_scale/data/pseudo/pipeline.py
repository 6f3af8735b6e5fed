"""The pseudo-labelling pipeline over detection shards: caption → parse → tag → pseudo-labels.

Input: MDS shards of a detection dataset (`rlipv2 data convert --format coco|o365`: images with
boxes and class names, no relations). Each stage reads the previous stage's output folder and is
resumable and sharded over ranks where it runs a model (captioning, tagging).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

from rlipv2_scale.data.mds_index import check_shards
from rlipv2_scale.data.output import check_apart
from rlipv2_scale.data.pseudo.candidates import CandidateChunk, build_candidates
from rlipv2_scale.data.pseudo.caption import Captioner, CaptionRunSummary, ImageItem, read_captions, run_captioning
from rlipv2_scale.data.pseudo.caption_parsing import CaptionParser, ParseStats, Triplet, image_triplets
from rlipv2_scale.data.pseudo.tag import (
    CaptionEvidence,
    PairScorer,
    TagConfig,
    TagRunSummary,
    read_tags,
    report,
    run_tagging,
    to_record,
    to_scene_graph,
)
from rlipv2_scale.data.schema import RelationalRecord
from rlipv2_scale.data.shards import ConvertSummary, iter_records, write_shards
from rlipv2_scale.errors import UserError

CANDIDATES_FILE = "candidates.json"
CAPTION_TRIPLETS_FILE = "caption_triplets.json"     # image id → each caption's triplets (`data tag`'s evidence)
PARSE_STATS_FILE = "parse_stats.json"


def _returning(value: bytes | None) -> Callable[[], bytes]:
    return lambda: value or b""          # no bytes: an undecodable image, counted by the captioner


def require_images(shards: str | Path) -> None:
    """A shard folder with no sample is an error: captioning it would 'succeed' with nothing to show."""
    if sum(info["samples"] for info in check_shards(shards)["shards"]) == 0:
        raise UserError(f"{shards} holds no images (its index.json lists no sample): nothing to caption; pass "
                        f"a shard folder with images (`rlipv2 data convert --out DIR`)")


def caption_shards(shards: str | Path, out_dir: str | Path, captioner: Captioner, rank: int = 0,
                   world_size: int = 1, batch_size: int = 32,
                   progress: Callable[[int], None] | None = None) -> CaptionRunSummary:
    require_images(shards)

    def items() -> Iterator[ImageItem]:
        for rec in iter_records(shards):
            yield ImageItem(rec.image.id, _returning(rec.image_bytes))

    return run_captioning(items(), captioner, out_dir, rank=rank, world_size=world_size, batch_size=batch_size,
                          progress=progress)


def parse_shards(shards: str | Path, captions_dir: str | Path, parser: CaptionParser, out_dir: str | Path,
                 chunk_size: int = 100) -> ParseStats:
    """Captions → unique triplets per image → candidate chunks, written in the original's JSON form."""
    captions = read_captions(captions_dir)
    if not captions:
        raise UserError(f"no captions found in {captions_dir}; run `rlipv2 data caption` first")
    stats = ParseStats()
    candidates: dict[str, list] = {}
    caption_triplets: dict[str, list] = {}
    no_candidates = no_captions = 0
    unmatched: Counter = Counter()      # object instances whose class has no paraphrase list
    unknown = set(captions)             # captioned ids that no image of the shards has
    for rec in iter_records(shards):
        unknown.discard(str(rec.image.id))
        caps = captions.get(str(rec.image.id))
        if caps is None:                # not captioned (failed to decode, or captioning unfinished)
            no_captions += 1
            continue
        names = [o.name for o in rec.objects]
        unmatched.update(parser.table.missing(names))
        per_caption: list[list[Triplet]] = []
        triplets = image_triplets(caps, set(names), parser, stats, per_caption=per_caption)
        chunks = build_candidates(names, triplets, chunk_size)
        if chunks:
            candidates[str(rec.image.id)] = [c.as_original() + [c.pair_texts] for c in chunks]
            caption_triplets[str(rec.image.id)] = [[[t.subject, t.phrase, t.object] for t in ts] for ts in per_caption]
        else:
            no_candidates += 1
    if unknown:                         # their captions would be dropped: other shards were captioned
        raise UserError(f"{captions_dir} holds captions of {len(unknown)} image id(s) that {shards} does not have "
                        f"(e.g. {', '.join(repr(i) for i in sorted(unknown)[:3])}): pass the shards that were "
                        f"captioned, or caption these shards into a new folder (`rlipv2 data caption --out`)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CANDIDATES_FILE).write_text(json.dumps(candidates))
    (out_dir / CAPTION_TRIPLETS_FILE).write_text(json.dumps(caption_triplets))
    summary = stats.as_dict()
    summary.update(images_with_candidates=len(candidates), images_without_candidates=no_candidates,
                   images_without_captions=no_captions,
                   classes_without_paraphrases=dict(unmatched.most_common()),
                   pairs=sum(len(c[0]) for chunks in candidates.values() for c in chunks))
    (out_dir / PARSE_STATS_FILE).write_text(json.dumps(summary, indent=1))
    return stats


def load_candidates(parse_dir: str | Path) -> dict[str, list[CandidateChunk]]:
    path = Path(parse_dir) / CANDIDATES_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist; run `rlipv2 data parse` first")
    raw = json.loads(path.read_text())
    return {k: [CandidateChunk([tuple(p) for p in pairs], texts, pair_texts) for pairs, texts, pair_texts in chunks]
            for k, chunks in raw.items()}


def load_caption_evidence(parse_dir: str | Path) -> dict[str, CaptionEvidence]:
    path = Path(parse_dir) / CAPTION_TRIPLETS_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist (written by `rlipv2 data parse` since captions guide tagging); "
                        "rerun `rlipv2 data parse`, or tag with --no-use-captions")
    raw = json.loads(path.read_text())
    return {k: CaptionEvidence([[tuple(t) for t in ts] for ts in caps]) for k, caps in raw.items()}


def tag_shards(shards: str | Path, parse_dir: str | Path, scorer: PairScorer, out_dir: str | Path,
               cfg: TagConfig | None = None, rank: int = 0, world_size: int = 1) -> TagRunSummary:
    cfg = cfg or TagConfig()
    candidates = load_candidates(parse_dir)
    evidence = load_caption_evidence(parse_dir) if cfg.use_captions else {}

    def items() -> Iterator[tuple[RelationalRecord, list[CandidateChunk], CaptionEvidence | None]]:
        for rec in iter_records(shards):
            yield rec, candidates.get(str(rec.image.id), []), evidence.get(str(rec.image.id))

    return run_tagging(items(), scorer, out_dir, cfg, rank=rank, world_size=world_size)


def export_pseudo_labels(shards: str | Path, tags_dir: str | Path, out_dir: str | Path, dataset: str,
                         threshold: float = 0.2) -> tuple[ConvertSummary, dict]:
    """Tags → the original's scene-graph JSON (every kept confidence), MDS shards (≥ threshold) and a
    report of relation counts per threshold and the most frequent predicates."""
    out_dir = Path(out_dir)
    check_apart(out_dir / "shards", [shards, tags_dir])   # before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    tags = {str(ann["image"]["id"]): (ann, rels) for ann, rels in read_tags(tags_dir)}
    if not tags:
        raise UserError(f"no tagging output found in {tags_dir}; run `rlipv2 data tag` first")
    counter = [10_000_000]
    entries = [to_scene_graph(ann, rels, dataset, counter) for ann, rels in tags.values()]
    (out_dir / "scene_graphs.json").write_text(json.dumps(entries))

    def records() -> Iterator[RelationalRecord]:
        for rec in iter_records(shards):
            if str(rec.image.id) in tags:
                ann, rels = tags[str(rec.image.id)]
                kept = to_record(ann, rels, threshold, image_bytes=rec.image_bytes)
                if kept is not None:
                    kept.provenance["pseudo_label_dataset"] = dataset
                    yield kept

    # A rerun replaces the shards of the last one (and only those: see `data/output.py`).
    summary = write_shards(records(), out_dir / "shards", overwrite=True, inputs=[shards, tags_dir])
    rep = report(tags.values()).as_dict()
    rep["threshold"] = threshold
    (out_dir / "report.json").write_text(json.dumps(rep, indent=1))
    return summary, rep
