"""`rlipv2 data synth`: render scenes of the synthetic world (logic in `rlipv2_scale.data.synthetic`)."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from rlipv2_scale.data.constants import BASE_SIZE, OBJECTS_PER_IMAGE, SPLITS
from rlipv2_scale.errors import UserError

WORLD_FILE = "synthetic_world.json"   # what `write_split` writes last: its presence marks a finished synth output


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
    p.add_argument("--overwrite", action="store_true",
                   help=f"write over an earlier `data synth` output in --out (one holding {WORLD_FILE}); other "
                        "folders must be new or empty")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def check_out(out: Path, overwrite: bool) -> dict | None:
    """A new or empty --out, or with --overwrite an earlier synth output (its world description is
    returned): the files written there (scene_graphs.json, images/N.jpg, ...) have names common
    enough to be a user's."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if not (out / WORLD_FILE).is_file():
        raise UserError(f"--out {out} is not empty and holds no {WORLD_FILE}, so it is not an earlier "
                        f"`rlipv2 data synth` output; choose a new or empty folder (--overwrite replaces only "
                        f"an earlier synth output)")
    if not overwrite:
        raise UserError(f"--out {out} holds an earlier `rlipv2 data synth` output; pass --overwrite to write over "
                        f"it, or choose a new or empty folder")
    try:
        earlier = json.loads((out / WORLD_FILE).read_bytes())
        if earlier["split"] not in SPLITS or not isinstance(earlier["images"], int) or earlier["images"] < 0:
            raise ValueError("unknown split or image count")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{out / WORLD_FILE} cannot be read as a `data synth` world description ({exc}), so "
                        f"--overwrite cannot tell which files there are its own; remove them yourself or choose "
                        f"another --out") from None
    return earlier


def run(args: argparse.Namespace) -> int:
    from rlipv2_scale.data.synthetic import HICO_FILE, SPLIT_ID_OFFSET, write_split

    earlier = check_out(args.out, args.overwrite)
    summary = write_split(args.out, args.images, seed=args.seed, split=args.split, size=args.size,
                          objects_per_image=tuple(args.objects), progress=not args.no_progress)
    if earlier is not None:
        # What the earlier run wrote and this one did not rewrite (more scenes, another split) would
        # otherwise sit beside the new output as if part of it.
        def wrote(image_id: int, split: str, n: int) -> bool:
            return SPLIT_ID_OFFSET[split] < image_id <= SPLIT_ID_OFFSET[split] + n
        for path in sorted((args.out / "images").iterdir()):
            if (path.is_file() and re.fullmatch(r"\d+\.jpg", path.name)
                    and wrote(int(path.stem), earlier["split"], earlier["images"])
                    and not wrote(int(path.stem), args.split, args.images)):
                path.unlink()
        if earlier["split"] != args.split:
            (args.out / HICO_FILE[earlier["split"]]).unlink(missing_ok=True)
    print(summary.format())
    return 0
