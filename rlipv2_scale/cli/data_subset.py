"""`rlipv2 data subset`: seeded few-shot subsets of a HICO-DET annotation file (logic in `data/subset.py`)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(tree) -> None:
    p = tree.group_command("data", "subset", "write few-shot training subsets (fractions such as 0.01, 0.1) "
                                             "of trainval_hico.json, covering every verb and object", run)
    p.add_argument("--annotations", required=True, type=Path, help="trainval_hico.json (QPIC HICO-DET layout)")
    p.add_argument("--fraction", required=True, type=float, nargs="+",
                   help="fraction(s) of the images to keep, e.g. 0.01 0.1")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes the same subset (default: 0)")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder; writes <annotations stem>_<percent>percent.json there")


def run(args: argparse.Namespace) -> int:
    from rlipv2_scale.data.subset import write_subsets

    for path, subset in write_subsets(args.annotations, args.fraction, args.seed, args.out):
        print(f"{path}: {len(subset.indices)} images (int(N*{subset.fraction:g}) = {subset.target}), every verb "
              f"and object covered after {subset.draws} draw(s)")
    return 0
