"""`rlipv2 scale calibrate | plan | sweep | report`: measure the machine, plan a run from a measured model,
sweep recipe keys, report the curves."""
from __future__ import annotations

import argparse

from rlipv2_scale.cli import DEVICE, check_visible_device
from rlipv2_scale.errors import UserError


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError as exc:
        raise UserError(f"--gpus '{text}' must be a comma-separated list of integers, e.g. 8,64,512") from exc
    if not values or min(values) < 1:
        raise UserError(f"--gpus '{text}' must list positive GPU counts")
    return values


def _at_least(args: argparse.Namespace, minimum: int, *names: str) -> None:
    """Counts (ranks, nodes, images, ...) below `minimum` are refused instead of planning nonsense."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise UserError(f"--{name.replace('_', '-')} {value} must be an integer ≥ {minimum}")


def _resolution(text: str) -> tuple[int, int]:
    h, x, w = text.partition("x")
    if not (x and h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
        raise UserError(f"--resolution '{text}' must be HEIGHTxWIDTH in pixels, e.g. 800x1333")
    return int(h), int(w)


def _plan(args: argparse.Namespace) -> int:
    from rlipv2_scale.scale.cost import GPUS
    from rlipv2_scale.scale.plan import build_plan, check_out, format_table, write_outputs
    from rlipv2_scale.train.config import load_run_config

    if args.gpu not in GPUS:
        raise UserError(f"--gpu '{args.gpu}' is unknown; choose one of {', '.join(GPUS)}")
    gpus, (h, w) = _ints(args.gpus), _resolution(args.resolution)
    if not 0 < args.mfu <= 1:   # a share of peak; the step time divides by it
        raise UserError(f"--mfu {args.mfu} must be a share of peak FLOP/s in (0, 1], e.g. 0.35")
    if not 0 < args.interconnect < float("inf"):
        raise UserError(f"--interconnect {args.interconnect} must be a bandwidth in GB/s above 0, e.g. 50")
    _at_least(args, 1, "images_per_epoch")
    cfg = load_run_config(args.recipe, args.overrides)
    out = check_out(args.out or cfg.run.path / "plan")          # before the model is measured
    machine = None
    if args.machine:
        from rlipv2_scale.scale.calibrate import load_constants

        machine = load_constants(args.machine)
    rep = build_plan(cfg, args.recipe, gpus, gpu=args.gpu, inter_node_gbps=args.interconnect,
                     mfu=args.mfu, resolution=(h, w), images_per_epoch=args.images_per_epoch,
                     measure_at=args.measure_at, machine=machine)
    print(format_table(rep))
    if len(rep.measurements) > 1:
        print("measured at " + ", ".join(f"{m.height}x{m.width}: {m.flops / 1e9:.1f} GFLOP" for m in rep.measurements)
              + f"; extrapolated linearly in pixels to {h}x{w}")
    paths = write_outputs(rep, out)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from rlipv2_scale.scale.calibrate import calibrate, check_out

    _at_least(args, 1, "threads", "repeat", "probe_params")
    if not DEVICE.fullmatch(args.device):
        raise UserError(f"--device '{args.device}' is not one calibrate measures: choose cpu, cuda or cuda:N")
    out = check_out(args.out)                                    # before minutes of measuring
    check_visible_device(args.device)
    deepspeed = not args.no_deepspeed
    if deepspeed:
        try:
            import deepspeed as _  # noqa: F401
        except ImportError:
            raise UserError("DeepSpeed is not installed: pass --no-deepspeed to measure plain PyTorch only") from None
    c = calibrate(args.device, threads=args.threads, deepspeed=deepspeed, collectives=not args.no_collectives,
                  repeat=args.repeat, log=print, large_params=args.probe_params)
    print(f"wrote {c.save(out)}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from rlipv2_scale.scale.sweep import plan_sweep, render_slurm, run_local

    _at_least(args, 1, "nproc", "nodes")
    _at_least(args, 0, "gpus_per_node")
    axes = list(args.overrides)
    base = list(args.set or [])
    if args.slurm:
        from rlipv2_scale.cluster.slurm import SlurmOptions

        try:
            opts = SlurmOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition,
                                account=args.account, time=args.time, job_name=args.job_name)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        sweep = plan_sweep(args.recipe, axes, args.out, base, nodes=args.nodes, mode="slurm")
        sweep = render_slurm(sweep, opts, submit=args.submit)
        for job in sweep.jobs:
            print(f"{job['nodes']} node(s): {job['script']}" + (f" submitted as job {job['job_id']}" if job["job_id"] else ""))
        print(f"{len(sweep.runs)} run(s) indexed in {args.out}/sweep.json")
        return 0
    sweep = plan_sweep(args.recipe, axes, args.out, base, nproc=args.nproc, mode="local")
    if args.dry_run:
        for run in sweep.runs:
            print(f"{run.name}: {' '.join(run.overrides)} --nproc {run.nproc}")
        return 0
    sweep = run_local(sweep, skip_completed=not args.rerun, stop_on_failure=args.stop_on_failure)
    failed = [r.name for r in sweep.runs if r.status != "completed"]
    print(f"{len(sweep.runs) - len(failed)}/{len(sweep.runs)} run(s) completed; index: {args.out}/sweep.json"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _report(args: argparse.Namespace) -> int:
    from rlipv2_scale.scale.report import collect, find_plan, load_plan, write_report

    runs, notes = collect(args.runs, allow_missing=args.allow_missing)
    plan = load_plan(args.plan) if args.plan else find_plan(args.runs)
    paths = write_report(runs, args.out, plan=plan, title=args.title, notes=notes)
    print(f"{len(runs)} run(s) reported: " + ", ".join(str(p) for p in paths.values()))
    return 0


def register(tree) -> None:
    p = tree.group_command("scale", "calibrate", "measure this machine's constants for the cost model: collective "
                                                 "latency and bandwidth, the optimiser's and DeepSpeed's costs", _calibrate)
    p.add_argument("--out", default="machine.json", help="JSON file for the constants (plan --machine reads it)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions per probe (the fastest counts)")
    p.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed probe (plain PyTorch)")
    p.add_argument("--no-collectives", action="store_true", help="skip the 2-process collective ping")
    p.add_argument("--probe-params", type=int, default=100_000_000,
                   help="parameters of the large probe model (near the models planned for: per-parameter costs "
                        "grow with buffer size)")

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
    p.add_argument("--machine", help="constants of `rlipv2 scale calibrate` measured on the GPU kind planned for")
    p.add_argument("--out", help="folder for plan.json and the PNGs (default: RUN_DIR/plan)")

    p = tree.group_command("scale", "sweep", "one training run per combination of recipe values, locally or as a "
                                             "SLURM job array; indexed in OUT/sweep.json", _sweep)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=v1,v2",
                   help="axes to sweep (values split at top-level commas); pseudo-keys nproc (local ranks), "
                        "nodes (SLURM)")
    p.add_argument("--out", required=True, help="sweep directory: one run directory per combination + sweep.json")
    p.add_argument("--set", action="append", metavar="key=value", help="override applied to every run (repeatable)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="run the combinations here, one after another (default)")
    mode.add_argument("--slurm", action="store_true", help="render one SLURM job array per node count")
    p.add_argument("--nproc", type=int, default=1, help="local ranks per run (unless nproc is swept)")
    p.add_argument("--rerun", action="store_true", help="also rerun combinations that already completed")
    p.add_argument("--stop-on-failure", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="validate and list the combinations, run nothing")
    p.add_argument("--nodes", type=int, default=1, help="SLURM nodes per run (unless nodes is swept)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", help="SLURM time limit per run, e.g. 2-00:00:00")
    p.add_argument("--job-name", default="rlipv2-sweep")
    p.add_argument("--submit", action="store_true", help="sbatch the rendered arrays (default: render only)")

    p = tree.group_command("scale", "report", "loss and validation mAP against images seen, images/s against ranks, "
                                              "measured against planned: PNGs + report.md", _report)
    p.add_argument("runs", nargs="+", help="sweep directories (sweep.json) and/or run directories (metrics.jsonl)")
    p.add_argument("--out", required=True)
    p.add_argument("--plan", help="plan.json of `rlipv2 scale plan` (default: one found next to the runs)")
    p.add_argument("--title", default="Scaling report")
    p.add_argument("--allow-missing", action="store_true", help="report a sweep whose runs did not all write metrics")
