"""`rlipv2 data convert`: a real annotation format -> MDS shards (logic in `rlipv2_scale.data.convert`)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rlipv2_scale.data.constants import DEFAULT_SIZE_LIMIT, FORMAT_NAMES
from rlipv2_scale.errors import UserError

# Reader options each format understands (CLI flag dest -> reader keyword).
FORMAT_OPTIONS = {
    "vg": ("threshold", "image_data", "keep_empty"),
    "synthetic": ("threshold", "image_data", "keep_empty"),
    "pseudo": ("threshold", "image_paths", "keep_empty"),
    "oi-sgg": ("categories", "object_categories"),
    "hico-det": ("label_dir",),
}


def register(tree) -> None:
    p = tree.group_command("data", "convert", "convert a dataset's annotations and images to MDS shards", run)
    p.add_argument("--format", required=True, choices=list(FORMAT_NAMES), help="annotation format")
    p.add_argument("--annotations", required=True, type=Path,
                   help="annotation file (VG: scene_graphs.json or its folder)")
    p.add_argument("--images", required=True, type=Path, help="folder the annotation's image paths are relative to")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder for the shards (new or empty, outside every input)")
    p.add_argument("--split", default="train", help="split name stored with each record (default: train)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes decoding and checking images (default: min(8, CPUs))")
    p.add_argument("--strict", action="store_true", help="stop at the first bad sample instead of skipping it")
    p.add_argument("--threshold", type=float, default=0.2,
                   help="drop pseudo-label relations with confidence below this (default: 0.2)")
    p.add_argument("--size-limit", default=str(DEFAULT_SIZE_LIMIT),
                   help="shard size limit in bytes or with a unit, e.g. 64mb (default: 64 MiB)")
    p.add_argument("--image-data", type=Path, help="VG image_data.json (default: the one beside the annotations)")
    p.add_argument("--image-paths", type=Path, help="Objects365 image id -> file path JSON (pseudo labels)")
    p.add_argument("--categories", type=Path,
                   help="Open Images OI_SGG_trainval_test_categories_dict.json (default: beside the annotations)")
    p.add_argument("--object-categories", type=Path,
                   help="Open Images categories_dict.json that object category ids index (default: beside the "
                        "annotations if present)")
    p.add_argument("--label-dir", type=Path,
                   help="HICO-DET layout with its own labels: folder with objects.json and verbs.json (default: "
                        "beside the annotations if present, else the HICO-DET lists)")
    p.add_argument("--keep-empty", action="store_true", default=None,
                   help="scene graphs (vg, synthetic, pseudo): keep images left with no relation (the original's "
                        "pre-training drops them)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the shards a previous run wrote to --out (the files its index.json lists); "
                        "other files there are kept")
    p.add_argument("--summary-json", type=Path, help="also write the summary as JSON here")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from streaming.base.util import bytes_to_int

    from rlipv2_scale.data.convert import convert

    options = {k: getattr(args, k) for k in FORMAT_OPTIONS.get(args.format, ()) if getattr(args, k) is not None}
    try:
        size_limit = bytes_to_int(args.size_limit)
    except ValueError:
        raise UserError(f"--size-limit {args.size_limit!r} is not a size; use bytes or a unit such as 64mb") from None
    summary = convert(args.format, args.annotations, args.images, args.out, args.split, workers=args.workers,
                      strict=args.strict, size_limit=size_limit, overwrite=args.overwrite,
                      progress=not args.no_progress, **options)
    print(summary.format())
    if args.summary_json:
        try:
            args.summary_json.write_text(json.dumps(summary.to_dict(), indent=1) + "\n")
        except OSError as exc:
            raise UserError(f"the shards are written, but --summary-json {args.summary_json} could not be: "
                            f"{exc.strerror or exc}; the summary above is the same") from None
    return 0
