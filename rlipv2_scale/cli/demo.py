"""`rlipv2 demo [--quick] [--compare]`: the end-to-end demo on the synthetic world (logic in `rlipv2_scale.demo`)."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rlipv2_scale.errors import UserError


def register(tree) -> None:
    p = tree.command("demo", "pre-train and evaluate RLIPv2 end to end on the synthetic world (nothing is downloaded)",
                     run)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a ~2-minute smoke version (what CI runs)")
    p.add_argument("--compare", action="store_true",
                   help="train the ablation recipes (fusion off, ALIF last level, ALIF all levels) and plot "
                        "validation mAP against steps in OUT/compare.png")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the plan's)")
    p.add_argument("--nproc", type=int, help="local ranks to train on (default 2: ZeRO-2 over two processes)")
    p.add_argument("--seed", type=int, help="training seed (weights, shuffling, negatives; default 42)")
    p.add_argument("--eval-every", type=int,
                   help="validate (with --compare: keep and score a checkpoint) every N steps (default 250)")


def run(args: argparse.Namespace) -> int:
    from rlipv2_scale.demo import FULL, QUICK, check_demo_steps, run_compare, run_demo

    plan = QUICK if args.quick else FULL
    changes = {k: v for k, v in (("steps", args.steps), ("nproc", args.nproc), ("train_seed", args.seed),
                                 ("eval_every", args.eval_every)) if v is not None}
    if changes.get("steps", 1) <= 0:
        raise UserError(f"--steps must be positive, got {args.steps}")
    if changes.get("eval_every", 1) <= 0:
        raise UserError(f"--eval-every must be positive, got {args.eval_every}")
    if changes.get("nproc", 1) not in (1, 2, 4, 8):
        raise UserError(f"--nproc must divide the 8 images of a step (1, 2, 4 or 8), got {args.nproc}")
    plan = dataclasses.replace(plan, **changes)
    if not args.compare:        # --compare scores checkpoints and checks no losses
        check_demo_steps(plan.steps)
    if "steps" in changes or "eval_every" in changes:
        plan = dataclasses.replace(plan, eval_every=max(1, min(plan.eval_every, plan.steps)))
    (run_compare if args.compare else run_demo)(args.out, plan=plan)
    return 0
