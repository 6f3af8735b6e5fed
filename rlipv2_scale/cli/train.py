"""`rlipv2 train RECIPE [key=value ...] [--nproc N] [--resume auto|PATH]` (RLIPv2 and Relation Tagger
runs alike: the recipe's `task`) and `rlipv2 export RUN --out MODEL_DIR`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

# --nproc / --resume may also come among the overrides after RECIPE: parsed twice from one list.
_OPTIONS = ((("--nproc",), {"type": int, "default": 1, "help": "start N local ranks through torchrun"}),
            (("--resume",), {"metavar": "auto|PATH", "help": "auto: the run directory's latest checkpoint (none: "
                                                             "start fresh); or a checkpoint path"}))


def _options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    for flags, kwargs in _OPTIONS:
        p.add_argument(*flags, **kwargs)
    return p


def run_train(args: argparse.Namespace) -> int:
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
    from rlipv2_scale.train.export import export_run, export_safetensors

    if args.out.suffix == ".safetensors":
        n = export_safetensors(args.source, args.out, trust_pickle=args.trust_pickle)
        print(f"exported {n} tensors of {args.source} to {args.out}")
    else:
        out = export_run(args.source, args.out, trust_pickle=args.trust_pickle)
        print(f"exported {args.source} to the model directory {out} (use it with rlipv2 predict / eval --checkpoint "
              f"/ data tag, train.init_from, or RLIPv2.from_pretrained)")
    return 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    for flags, kwargs in _OPTIONS:
        p.add_argument(*flags, **kwargs)
    p.add_argument("recipe", type=Path, help="recipe YAML, e.g. recipes/tiny/pretrain/r50_vg.yaml")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",
                   help="recipe overrides, e.g. train.max_steps=10 (--nproc / --resume may come among them)")


def register(tree) -> None:
    add_train_arguments(tree.command("train", "train RLIPv2 or the Relation Tagger from a YAML recipe (DeepSpeed "
                                     "ZeRO through Accelerate)", run_train))
    p = tree.command("export", "write a training run's weights as a model directory (or a plain .safetensors)",
                     _export)
    p.add_argument("source", type=Path, help="run directory (its latest checkpoint) or a checkpoints/step_* directory")
    p.add_argument("--out", type=Path, required=True,
                   help="model directory to write; a path ending in .safetensors writes only the weights")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle checkpoint files holding objects other than weights (can run code: trusted files only)")
