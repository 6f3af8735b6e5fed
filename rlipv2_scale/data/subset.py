"""Few-shot training subsets of a HICO-DET-style annotation file (`trainval_hico.json`), seeded.

The original's procedure (`convert_annotations/convert_hico_annotations.py: select_percentage`): take one random image for every verb, then
random further images until the subset holds int(N * fraction) images; redraw the whole subset
until every verb and every object category of the full file occurs in it. The original is
unseeded (its released 1 % / 10 % files are one draw); here the draw is a function of the seed.
When there are more verbs than int(N * fraction), the subset is the one-image-per-verb set.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlipv2_scale.data.sources.base import expect_list, load_json
from rlipv2_scale.errors import DataError, UserError

MAX_DRAWS = 1000


def _categories(entry: Any, i: int) -> tuple[set[int], set[int]]:
    """(verb ids, object category ids) of one entry; a malformed entry names its index and field."""
    name = entry.get("file_name", f"#{i}") if isinstance(entry, dict) else f"#{i}"
    if not isinstance(entry, dict):
        raise DataError(f"entry {i} is a {type(entry).__name__}, not an image object", name, "malformed_entry")
    try:
        verbs = {int(h["category_id"]) for h in entry["hoi_annotation"]}
        objects = {int(a["category_id"]) for a in entry["annotations"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"image {name!r} (entry {i}): needs `annotations` [{{category_id}}] and "
                        f"`hoi_annotation` [{{category_id}}] ({type(exc).__name__}: {exc})", name,
                        "malformed_entry") from None
    return verbs, objects


@dataclass
class Subset:
    indices: list[int]          # positions in the annotation list, ascending
    fraction: float
    target: int                 # int(N * fraction)
    draws: int                  # how many draws the coverage condition needed


def select_subset(entries: list[dict], fraction: float, seed: int) -> Subset:
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"--fraction must be in (0, 1], got {fraction}")
    cats = [_categories(e, i) for i, e in enumerate(entries)]
    all_verbs = sorted(set().union(*(v for v, _ in cats))) if cats else []
    all_objects = set().union(*(o for _, o in cats)) if cats else set()
    if not all_verbs:
        raise DataError("the annotation file holds no HOI annotation; nothing to sample a few-shot subset from",
                        None, "no_relations")
    with_verb = {v: [i for i, (vs, _) in enumerate(cats) if v in vs] for v in all_verbs}
    target = int(len(entries) * fraction)
    rng = np.random.default_rng(seed)
    for draw in range(1, MAX_DRAWS + 1):
        chosen = {int(rng.choice(with_verb[v])) for v in all_verbs}
        free = np.ones(len(entries), dtype=bool)
        free[list(chosen)] = False
        rest = np.flatnonzero(free)
        extra = max(0, min(target - len(chosen), len(rest)))
        if extra:
            chosen.update(int(i) for i in rng.choice(rest, size=extra, replace=False))
        covered = set().union(*(cats[i][1] for i in chosen))
        if covered == all_objects:
            return Subset(indices=sorted(chosen), fraction=fraction, target=target, draws=draw)
    missing = sorted(all_objects - covered)
    raise DataError(f"no {fraction:g} subset covering every object category in {MAX_DRAWS} draws (last draw "
                    f"missed object ids {missing[:10]}); use a larger --fraction", None, "coverage")


def subset_file_name(annotations: str | os.PathLike, fraction: float) -> str:
    """`trainval_hico.json`, 0.01 -> `trainval_hico_1percent.json` (the original's file names)."""
    return f"{Path(annotations).stem}_{fraction * 100:g}percent.json"


def write_subsets(annotations: str | os.PathLike, fractions: list[float], seed: int,
                  out: str | os.PathLike) -> list[tuple[Path, Subset]]:
    """Draw every subset first, then write them. A file already there is replaced only by identical
    bytes (a rerun with the same seed): anything else in `out` may be the user's (the original's
    released `*_1percent.json` has the same name), so it is refused before anything is written.
    Each file is written to a temporary name and renamed, so a failed run leaves no half file."""
    path = Path(annotations)
    # Checked before the annotation file is read: every value, and one file name per fraction.
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"--seed {seed} must be an integer ≥ 0 (the same seed writes the same subset)")
    for fraction in fractions:
        if not 0.0 < fraction <= 1.0:
            raise UserError(f"--fraction must be in (0, 1], got {fraction}")
    by_name: dict[str, float] = {}
    for fraction in fractions:
        name = subset_file_name(path, fraction)
        if name in by_name:
            raise UserError(f"--fraction {by_name[name]!r} and {fraction!r} would both be written to {name}: "
                            f"give fractions that differ in their percent (e.g. 0.01 0.1), each once")
        by_name[name] = fraction
    entries = expect_list(load_json(path, "HICO-DET annotation"), path, "image entries")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose a folder")
    drawn = [(out / subset_file_name(path, f), select_subset(entries, f, seed)) for f in fractions]
    texts = [json.dumps([entries[i] for i in subset.indices], separators=(",", ":")).encode() for _, subset in drawn]
    for (target, _), text in zip(drawn, texts):
        if target.exists() and (not target.is_file() or target.read_bytes() != text):
            raise UserError(f"{target} already exists and differs from this subset (seed {seed}); move it away or "
                            f"choose another --out")
    for (target, _), text in zip(drawn, texts):
        partial = target.with_name(f".{target.name}.partial")
        try:
            out.mkdir(parents=True, exist_ok=True)
            partial.write_bytes(text)
            os.replace(partial, target)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise UserError(f"cannot write {target}: {exc.strerror or exc}; choose a writable --out") from None
    return drawn
