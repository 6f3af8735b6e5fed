"""`rlipv2 scale plan`: what a recipe needs and costs on N GPUs, from a measured model."""
from __future__ import annotations

import argparse

from rlipv2_scale.errors import UserError


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError as exc:
        raise UserError(f"--gpus '{text}' must be a comma-separated list of integers, e.g. 8,64,512") from exc
    if not values or min(values) < 1:
        raise UserError(f"--gpus '{text}' must list positive GPU counts")
    return values


def _plan(args: argparse.Namespace) -> int:
    from rlipv2_scale.scale.cost import GPUS
    from rlipv2_scale.scale.plan import build_plan, format_table, write_outputs
    from rlipv2_scale.train.config import load_run_config

    if args.gpu not in GPUS:
        raise UserError(f"--gpu '{args.gpu}' is unknown; choose one of {', '.join(GPUS)}")
    cfg = load_run_config(args.recipe, args.overrides)
    h, w = (int(v) for v in args.resolution.split("x"))
    rep = build_plan(cfg, args.recipe, _ints(args.gpus), gpu=args.gpu, inter_node_gbps=args.interconnect,
                     mfu=args.mfu, resolution=(h, w), images_per_epoch=args.images_per_epoch,
                     measure_at=args.measure_at)
    print(format_table(rep))
    if len(rep.measurements) > 1:
        print("measured at " + ", ".join(f"{m.height}x{m.width}: {m.flops / 1e9:.1f} GFLOP" for m in rep.measurements)
              + f"; extrapolated linearly in pixels to {h}x{w}")
    paths = write_outputs(rep, args.out or cfg.run.path / "plan")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def register(tree) -> None:
    p = tree.group_command("scale", "plan", "project memory, step time, throughput and GPU-hours of a recipe", _plan)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--gpus", default="8,64,512", help="comma-separated GPU counts")
    p.add_argument("--gpu", default="h100", help="accelerator kind (h100, h200, a100, ...)")
    p.add_argument("--interconnect", type=float, default=50.0, help="per-GPU inter-node bandwidth, GB/s")
    p.add_argument("--mfu", type=float, default=0.35, help="assumed share of peak FLOP/s")
    p.add_argument("--resolution", default="800x1333", help="HxW of a training image")
    p.add_argument("--images-per-epoch", type=int, help="default: the recipe's data.epoch_size")
    p.add_argument("--measure-at", choices=["extrapolate", "full"], default="extrapolate")
    p.add_argument("--out", help="folder for plan.json and the PNGs (default: RUN_DIR/plan)")
