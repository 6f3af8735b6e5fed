"""`rlipv2 data synth`: render scenes of the synthetic world (logic in `rlipv2_scale.data.synthetic`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from rlipv2_scale.data.constants import BASE_SIZE, OBJECTS_PER_IMAGE, SPLITS


def register(tree) -> None:
    p = tree.group_command("data", "synth", "render synthetic relational scenes (VG + HICO-DET layouts)", run)
    p.add_argument("--out", required=True, type=Path, help="output folder (images/, scene_graphs.json, ...)")
    p.add_argument("--images", required=True, type=int, help="number of scenes to render")
    p.add_argument("--seed", type=int, default=0, help="world seed; the same seed writes the same files (default: 0)")
    p.add_argument("--size", type=int, default=BASE_SIZE, help=f"image side in pixels (default: {BASE_SIZE})")
    p.add_argument("--split", default="train", choices=SPLITS,
                   help="train and val never contain the held-out combinations; test does (default: train)")
    p.add_argument("--objects", type=int, nargs=2, default=list(OBJECTS_PER_IMAGE), metavar=("MIN", "MAX"),
                   help=f"objects per image (default: {OBJECTS_PER_IMAGE[0]} {OBJECTS_PER_IMAGE[1]})")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from rlipv2_scale.data.synthetic import write_split

    summary = write_split(args.out, args.images, seed=args.seed, split=args.split, size=args.size,
                          objects_per_image=tuple(args.objects), progress=not args.no_progress)
    print(summary.format())
    return 0
