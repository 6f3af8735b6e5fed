"""`rlipv2 train RECIPE [key=value ...] [--nproc N] [--resume auto|PATH]` and `rlipv2 export CKPT OUT`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def _options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--nproc", type=int, default=1, help="start N local ranks through torchrun")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="auto: the run directory's latest checkpoint (none: start fresh); or a checkpoint path")
    return p


def _train(args: argparse.Namespace) -> int:
    from rlipv2_scale.errors import UserError
    from rlipv2_scale.train.config import load_run_config

    # Options may come before or after the overrides: the overrides are everything after RECIPE.
    later, overrides = _options().parse_known_args(args.overrides)
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        raise UserError(f"rlipv2 train: unknown option(s) {unknown}; options are --nproc N and --resume auto|PATH")
    args.nproc = later.nproc if later.nproc != 1 else args.nproc
    args.resume = later.resume or args.resume
    args.overrides = overrides
    cfg = load_run_config(args.recipe, args.overrides)   # bad recipes fail here, before any launch
    if args.nproc > 1 and "RANK" not in os.environ:
        from rlipv2_scale.train.launch import spawn_local

        argv = ["train", str(args.recipe), *args.overrides]
        if args.resume:
            argv += ["--resume", args.resume]
        return spawn_local(args.nproc, argv, cfg.run.path)
    from rlipv2_scale.train.engine import run

    return run(cfg, resume=args.resume)


def _export(args: argparse.Namespace) -> int:
    from rlipv2_scale.models.rlipv2 import build_model
    from rlipv2_scale.train.checkpoint import export_checkpoint, resolve_resume
    from rlipv2_scale.train.config import load_run_config

    ckpt = resolve_resume(str(args.checkpoint), args.checkpoint)
    cfg = load_run_config(ckpt / "config.yaml")
    state = export_checkpoint(ckpt, args.out, build_model(cfg.model, pretrained=False), args.trust_pickle)
    print(f"exported {len(state)} tensors from {ckpt} to {args.out}")
    return 0


def register(tree) -> None:
    p = tree.command("train", "train RLIPv2 from a YAML recipe (DeepSpeed ZeRO through Accelerate)", _train)
    for action in _options()._actions:
        p._add_action(action)
    p.add_argument("recipe", type=Path, help="recipe YAML, e.g. recipes/tiny/pretrain/r50_vg.yaml")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",
                   help="recipe overrides, e.g. train.max_steps=10 (--nproc / --resume may come among them)")
    p = tree.command("export", "write a checkpoint's weights as one plain safetensors state dict", _export)
    p.add_argument("checkpoint", type=Path, help="checkpoints/step_XXXXXXXX directory, or a run directory (latest)")
    p.add_argument("out", type=Path, help="output .safetensors file")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle files holding objects other than weights (can run code: trusted files only)")
