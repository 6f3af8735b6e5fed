"""The cost model of `rlipv2 scale plan` checked against the real trainer: step time and memory.

For each model config (tiny, r50) the real trainer (`rlipv2 train` through `rlipv2 scale sweep`)
runs a few steps on synthetic shards with 1 and 2 CPU ranks under ZeRO 0/1/2/3; the cost model
(`rlipv2_scale.scale.cost`) predicts each run's step time and peak memory per rank.

A CPU is not a GPU of the model's table, so its rates are calibrated, not assumed, and the check is
of what the model *derives* from them:

- compute rate (FLOP/s of one rank, one thread): from the one measured step time of the 1-rank,
  ZeRO-0 run and the measured FLOPs per image (torch's flop counter on the same model and
  resolution);
- loopback bandwidth: from a gloo all-reduce probe between two processes;
- memory baseline (interpreter, libraries, allocator, data pipeline): the 1-rank ZeRO-0 run's peak
  resident memory minus the model's prediction for it.

Every other run is then predicted: compute = FLOPs × micro-batch / rate, communication = the
stage's bytes per rank / bandwidth (not overlapped: DeepSpeed on CPU does not overlap), memory =
baseline + weights, gradients and optimiser state held by the rank at that stage (fp32 on CPU:
4 + 4 + 8 bytes per parameter, partitioned by the stage) + saved activations × micro-batch.
Errors are (predicted − measured) / measured. All ranks run one thread each. A run's step time is
its fastest logged step after the first (`--statistic min`, timeit's convention: on a shared
machine the least disturbed step estimates the undisturbed cost) or the median; both, the spread
of the steps and the load average are recorded.

    python benchmarks/scale_validation.py [--configs tiny,r50] [--steps 16] [--resolution 128] [--append]

Prints a table and writes benchmarks/results/scale_validation.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "demo" / "demo.yaml"
STAGES = (0, 1, 2, 3)
TOLERANCE = 0.20


def _probe_worker(rank: int, init: str, nbytes: int, iters: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    t = torch.ones(nbytes // 4)
    dist.all_reduce(t)                                   # warm-up: connection set-up
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(t)
    seconds = (time.perf_counter() - t0) / iters
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": seconds}))
    dist.destroy_process_group()


def loopback_bandwidth(nbytes: int = 64 * 2 ** 20, iters: int = 5) -> float:
    """Bytes/s one rank sends in a 2-rank gloo all-reduce (a ring all-reduce sends 2(N−1)/N of the buffer)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "probe.json")
        mp.spawn(_probe_worker, args=(f"file://{tmp}/rdzv", nbytes, iters, out), nprocs=2, join=True)
        seconds = json.loads(Path(out).read_text())["seconds"]
    return nbytes * 2 * (2 - 1) / 2 / seconds


def overrides_for(config: str, data: Path, steps: int, resolution: int, batch: int) -> list[str]:
    """The demo recipe on the synthetic shards, with `config`'s model (random init, nothing downloaded)."""
    over = [f"model.name={config}", f"model.text.tokenizer={data / 'tokenizer'}", "model.num_queries=40",
            f"data.sources=[{{name: synthetic, local: '{data / 'shards' / 'train'}'}}]", "eval.data=null",
            f"data.batch_size={batch}", f"train.max_steps={steps}", "train.zero3_persistence_threshold=0",
            "optim.warmup_steps=1", f"data.transforms.train_scales=[{resolution}]",
            f"data.transforms.max_size={resolution}", f"data.transforms.eval_size={resolution}",
            "logging.every_steps=1", "logging.progress=false", "checkpoint.at_end=false"]
    if config != "tiny":
        over += ["model.text.pretrained=null", "model.backbone.pretrained_weights=null"]
    return over


def measure_cost(config: str, over: list[str], resolution: int):
    from rlipv2_scale.scale.cost import ModelCost
    from rlipv2_scale.scale.plan import measure_once
    from rlipv2_scale.models.rlipv2 import build_model
    from rlipv2_scale.train.config import load_run_config

    cfg = load_run_config(RECIPE, over)
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False)
    m = measure_once(model, resolution, resolution, cfg.data.num_obj_labels, cfg.data.num_rel_labels)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelCost(params, trainable, m.flops, m.activation_bytes, precision="fp32")


def predicted_bytes(cost, stage: int, world: int, batch: int) -> float:
    from rlipv2_scale.scale.cost import state_bytes

    return state_bytes(cost, stage, world)["total"] + cost.activation_bytes_per_image * batch


def run_config(config: str, data: Path, work: Path, args: argparse.Namespace, bandwidth: float, log) -> dict:
    import psutil

    from rlipv2_scale.scale.cost import comm_bytes
    from rlipv2_scale.scale.report import summarise_run
    from rlipv2_scale.scale.sweep import plan_sweep, run_local

    over = overrides_for(config, data, args.steps, args.resolution, args.batch)
    cost = measure_cost(config, over, args.resolution)
    log(f"{config}: {cost.params / 1e6:.1f} M params, {cost.flops_per_image / 1e9:.2f} GFLOP and "
        f"{cost.activation_bytes_per_image / 2 ** 20:.1f} MiB of activations per {args.resolution} px image")
    sweep = plan_sweep(RECIPE, [f"nproc={','.join(map(str, args.ranks))}",
                                f"train.zero_stage={','.join(map(str, STAGES))}"],
                       work / config, over)
    # The host's memory bounds what can run here: the cost model itself says which runs would not fit.
    available = psutil.virtual_memory().available
    skipped = []
    for run in list(sweep.runs):
        need = run.world_size * (predicted_bytes(cost, int(run.values["train.zero_stage"]), run.world_size, args.batch)
                                 + args.baseline_guess_gib * 2 ** 30)
        if need > args.memory_fraction * available:
            skipped.append({"ranks": run.world_size, "zero_stage": int(run.values["train.zero_stage"]),
                            "predicted_host_gib": need / 2 ** 30, "available_gib": available / 2 ** 30})
            sweep.runs.remove(run)
    run_local(sweep, env={"OMP_NUM_THREADS": "1"}, log=log)
    measured = {}
    for run in sweep.runs:
        if run.status != "completed":
            continue
        s = summarise_run(run.run_dir, run.name, run.values, run.world_size)
        records = [json.loads(line) for line in (Path(run.run_dir) / "metrics.jsonl").read_text().splitlines()]
        # One window per step; the first holds start-up work. Under a shared machine's load the
        # fastest window (timeit's convention) estimates the undisturbed step; the median is kept too.
        steps = sorted(args.batch * run.world_size / r["images_per_s"] for r in records[1:] if r.get("images_per_s"))
        measured[(run.world_size, int(run.values["train.zero_stage"]))] = {
            "step_s": steps[0] if args.statistic == "min" else statistics.median(steps),
            "step_s_min": steps[0], "step_s_median": statistics.median(steps),
            "step_s_spread": (steps[-1] - steps[0]) / statistics.median(steps),
            "peak_memory_bytes": s.peak_memory_bytes, "windows": len(steps), "wall_s": run.seconds}
    if (1, 0) not in measured:
        raise SystemExit(f"{config}: the 1-rank ZeRO-0 calibration run failed; see {work / config}")
    base = measured[(1, 0)]
    rate = cost.flops_per_image * args.batch / base["step_s"]
    baseline = base["peak_memory_bytes"] - predicted_bytes(cost, 0, 1, args.batch)
    rows = []
    for (world, stage), m in sorted(measured.items()):
        compute = cost.flops_per_image * args.batch / rate
        comm = comm_bytes(cost, stage, world) / bandwidth
        step = compute + comm
        mem = baseline + predicted_bytes(cost, stage, world, args.batch)
        rows.append({"ranks": world, "zero_stage": stage, "calibration": (world, stage) == (1, 0),
                     "measured_step_s": m["step_s"], "predicted_step_s": step, "predicted_compute_s": compute,
                     "predicted_comm_s": comm, "step_error": (step - m["step_s"]) / m["step_s"],
                     "measured_step_s_min": m["step_s_min"], "measured_step_s_median": m["step_s_median"],
                     "measured_step_spread": m["step_s_spread"],
                     "measured_peak_gib": m["peak_memory_bytes"] / 2 ** 30, "predicted_peak_gib": mem / 2 ** 30,
                     "predicted_state_gib": predicted_bytes(cost, stage, world, 0) / 2 ** 30,
                     "memory_error": (mem - m["peak_memory_bytes"]) / m["peak_memory_bytes"],
                     "wall_s": m["wall_s"]})
    checked = [r for r in rows if not r["calibration"]]
    return {"config": config, "cost": asdict(cost), "resolution": args.resolution, "micro_batch": args.batch,
            "steps": args.steps, "calibrated_gflops_per_s": rate / 1e9, "memory_baseline_gib": baseline / 2 ** 30,
            "rows": rows, "skipped_for_host_memory": skipped,
            "failed": [r.name for r in sweep.runs if r.status != "completed"],
            "max_abs_step_error": max((abs(r["step_error"]) for r in checked), default=None),
            "max_abs_memory_error": max((abs(r["memory_error"]) for r in checked), default=None),
            "within_tolerance": all(abs(r["step_error"]) <= TOLERANCE and abs(r["memory_error"]) <= TOLERANCE
                                    for r in checked)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="tiny,r50")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per run (the first window is dropped)")
    p.add_argument("--statistic", choices=["min", "median"], default="min",
                   help="step time of a run from its per-step windows: the fastest (robust to a shared "
                        "machine's load) or the median")
    p.add_argument("--resolution", type=int, default=128, help="square training images, px")
    p.add_argument("--batch", type=int, default=2, help="micro-batch per rank")
    p.add_argument("--work", help="folder for the data and run directories (default: a temporary one)")
    p.add_argument("--memory-fraction", type=float, default=0.6,
                   help="skip runs whose predicted host memory exceeds this share of the available memory")
    p.add_argument("--baseline-guess-gib", type=float, default=1.0, help="per-process memory besides the model, "
                   "for the host-memory guard only")
    p.add_argument("--append", action="store_true", help="keep the other configs already in --out")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_validation.json"))
    args = p.parse_args()
    args.ranks = [int(r) for r in args.ranks.split(",")]
    torch.set_num_threads(1)
    from rlipv2_scale.demo import DemoPlan, prepare_data

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="scale_validation_"))
    log = lambda s: print(s, flush=True)   # noqa: E731
    data = work / "data"
    if not (data / "shards" / "train" / "index.json").is_file():
        prepare_data(data, DemoPlan(train_images=64, val_images=4, test_images=1, steps=1, eval_every=1),
                     lambda s: None, workers=1)
    bandwidth = loopback_bandwidth()
    log(f"loopback gloo all-reduce: {bandwidth / 1e9:.2f} GB/s per rank")
    load0 = os.getloadavg()[0]
    results = [run_config(c, data, work, args, bandwidth, log) for c in args.configs.split(",")]
    out = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                       "platform": platform.platform(), "load_average_1min_start": load0,
                       "load_average_1min_end": os.getloadavg()[0]},
           "method": "rates calibrated on this CPU from the 1-rank ZeRO-0 run (FLOP/s, memory baseline) and a "
                     "gloo all-reduce probe (bandwidth); the other runs predicted by the cost model",
           "threads_per_rank": 1, "step_statistic": args.statistic, "loopback_gbps": bandwidth / 1e9, "tolerance": TOLERANCE, "configs": results}
    if args.append and Path(args.out).is_file():
        # Configs measured in an earlier invocation (another time, another load) are kept, each with its machine.
        earlier = json.loads(Path(args.out).read_text())
        for res in earlier["configs"]:
            res.setdefault("machine", earlier["machine"])
        names = {r["config"] for r in results}
        out["configs"] = [r for r in earlier["configs"] if r["config"] not in names] + results
    for res in results:
        res["machine"] = out["machine"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\n{'config':<6} {'ranks':>5} {'ZeRO':>4} {'step s meas':>11} {'pred':>8} {'err':>7} "
          f"{'peak GiB meas':>13} {'pred':>7} {'err':>7}")
    for res in results:
        for r in res["rows"]:
            tag = " (calibration)" if r["calibration"] else ""
            print(f"{res['config']:<6} {r['ranks']:>5} {r['zero_stage']:>4} {r['measured_step_s']:>11.3f} "
                  f"{r['predicted_step_s']:>8.3f} {100 * r['step_error']:>6.1f}% {r['measured_peak_gib']:>13.2f} "
                  f"{r['predicted_peak_gib']:>7.2f} {100 * r['memory_error']:>6.1f}%{tag}")
        for s in res["skipped_for_host_memory"]:
            print(f"{res['config']:<6} {s['ranks']:>5} {s['zero_stage']:>4} skipped: needs ~{s['predicted_host_gib']:.1f} "
                  f"GiB of host memory, {s['available_gib']:.1f} GiB available")
        print(f"{res['config']}: max |error| step {_pct(res['max_abs_step_error'])}, memory "
              f"{_pct(res['max_abs_memory_error'])}; within {TOLERANCE:.0%}: {res['within_tolerance']}")
    print(f"wrote {args.out}")


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


if __name__ == "__main__":
    sys.exit(main())
