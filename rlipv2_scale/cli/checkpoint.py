"""`rlipv2 import-checkpoint` / `rlipv2 export-checkpoint`: the released RLIPv2 `.pth` files <-> model directories."""
from __future__ import annotations

import argparse
from pathlib import Path

from rlipv2_scale.cli import CommandTree
from rlipv2_scale.models.config import RELEASED


def _import(args: argparse.Namespace) -> int:
    from rlipv2_scale.models.original import import_checkpoint

    s = import_checkpoint(args.checkpoint, args.config, args.out, overrides=args.set, trust_pickle=args.trust_pickle)
    print(f"imported {s.num_tensors} tensors ({s.num_parameters:,} values) of '{s.config}' into {s.out_dir}")
    for reason, n in s.dropped.items():
        print(f"  dropped {n} original entries: {reason}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from rlipv2_scale.models.original import export_checkpoint

    out = export_checkpoint(args.model_dir, args.to_original, position_ids=args.position_ids)
    print(f"wrote {out}")
    return 0


def register(tree: CommandTree) -> None:
    p = tree.command("import-checkpoint", "convert an original RLIPv2 checkpoint (.pth) into a model directory "
                     "(model.safetensors + model.yaml, compat_original on)", _import)
    p.add_argument("checkpoint", type=Path, help="the original torch.save file (weights under 'model')")
    p.add_argument("--config", required=True,
                   help=f"the released model it holds: {', '.join(RELEASED)} (or a ModelConfig YAML file)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="model directory to write")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. num_queries=128 (repeatable)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle files holding objects other than weights (can run code: trusted files only)")

    p = tree.command("export-checkpoint", "convert a model directory back into an original RLIPv2 checkpoint", _export)
    p.add_argument("model_dir", type=Path, metavar="DIR", help="model directory (model.safetensors + model.yaml)")
    p.add_argument("--to-original", required=True, type=Path, metavar="OUT.pth", help="file to write")
    p.add_argument("--position-ids", choices=("auto", "yes", "no"), default="auto",
                   help="write RoBERTa's position_ids buffer (auto: as imported; yes for models trained here)")
