"""The cost model of `rlipv2 scale plan` checked against measurement: step time and memory.

For each model config (tiny, r50) the cost model (`rlipv2_scale.scale.cost.step_time` and
`rank_memory`) predicts a training step's time and a rank's peak memory from

- the model, measured: FLOPs and activation bytes per image and per step (micro-batches of 1 and
  2: the label-text encoder runs once per batch), parameter / tensor / module counts, and the
  time of its forward + set criterion + backward on a synthetic batch, outside the trainer, on one
  rank alone and on 2 ranks at once (`calibrate.forward_backward_seconds`), and of AdamW with
  clipping over its own tensors (`calibrate.model_optimizer_seconds`: plain and ZeRO-0 steps run it
  tensor by tensor; ZeRO ≥ 1 runs it over one flat partition, as the machine's probes do);
- the machine, measured once by `rlipv2_scale.scale.calibrate` on workloads of its own: collective
  latency and bandwidth (2-process gloo ping), AdamW's cost per parameter and per tensor,
  DeepSpeed's own per-stage cost per parameter and per tensor / module (synthetic models on one
  rank) and per byte it communicates (the large synthetic model on 2 ranks), the memory of a
  trainer process without a model.

What it predicts is then measured in the real trainer (`rlipv2 train` through `rlipv2 scale
sweep`): the demo recipe with `config`'s model on synthetic shards, 1 and 2 CPU ranks (one thread
each) under ZeRO 0/1/2/3. Nothing of those runs feeds the prediction. A run's step time is its
fastest logged step after the first (`--statistic min`, timeit's convention: on a shared machine
the least disturbed step estimates the undisturbed cost) or the median; both are recorded, with
the spread of the steps and the load average. Errors are (predicted − measured) / measured.

    python benchmarks/scale_validation.py [--configs tiny,r50] [--steps 8] [--resolution 128]

`--device cuda --no-deepspeed` checks a single GPU with plain PyTorch instead (no DeepSpeed, no
data pipeline: a synthetic batch through the model, the set criterion, clipping and AdamW for a
few steps; memory is `torch.cuda.max_memory_allocated`): the forward/backward is timed at two
`--calibration-batches` and fitted as a fixed time plus FLOPs at a rate; step time and memory are
predicted for `--batches` and measured.

    python benchmarks/scale_validation.py --device cuda --no-deepspeed --out OUT_DIR

Prints a table and writes `--out` (default benchmarks/results/scale_validation.json) with a
Markdown table next to it. `--recalibrate` measures the machine constants (and, with `--work`, the
forward/backward of `--configs`) again and recomputes the predictions of an existing `--out`;
`--repredict` only recomputes them (after a change to the cost model).
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


def model_overrides(config: str) -> list[str]:
    """The demo recipe with `config`'s model, random init, nothing downloaded."""
    over = [f"model.name={config}", "model.num_queries=40"]
    if config != "tiny":
        over += ["model.text.pretrained=null", "model.backbone.pretrained_weights=null"]
    return over


def overrides_for(config: str, data: Path, steps: int, resolution: int, batch: int) -> list[str]:
    return model_overrides(config) + [
        f"model.text.tokenizer={data / 'tokenizer'}",
        f"data.sources=[{{name: synthetic, local: '{data / 'shards' / 'train'}'}}]", "eval.data=null",
        f"data.batch_size={batch}", f"train.max_steps={steps}", "train.zero3_persistence_threshold=0",
        "optim.warmup_steps=1", f"data.transforms.train_scales=[{resolution}]",
        f"data.transforms.max_size={resolution}", f"data.transforms.eval_size={resolution}",
        "logging.every_steps=1", "logging.progress=false", "checkpoint.at_end=false"]


def world_texts() -> tuple[list[str], list[str]]:
    """The label texts of a batch of the synthetic world (every class and predicate, as the demo
    recipe's label sequences hold them)."""
    from rlipv2_scale.data.synthetic import CLASS_NAMES, PREDICATE_NAMES

    return list(CLASS_NAMES), list(PREDICATE_NAMES)


def measure_cost(config: str, over: list[str], resolution: int, device: str = "cpu"):
    """The model's ModelCost (FLOPs and activations per image and per step, counts)."""
    from rlipv2_scale.models.build import build_model
    from rlipv2_scale.scale.plan import measure_once, model_cost
    from rlipv2_scale.train.config import load_run_config

    cfg = load_run_config(RECIPE, over)
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False).to(device)
    m = measure_once(model, resolution, resolution, cfg.data.num_obj_labels, cfg.data.num_rel_labels, device,
                     world_texts())
    return model_cost(model, m, precision="fp32"), cfg


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:+.1f}%"


def _abs_pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _errors(rows: list[dict]) -> dict:
    def bad(r: dict) -> bool:
        return any(r[k] is not None and abs(r[k]) > TOLERANCE for k in ("step_error", "memory_error"))

    return {"max_abs_step_error": max((abs(r["step_error"]) for r in rows), default=None),
            "max_abs_memory_error": max((abs(r["memory_error"]) for r in rows if r["memory_error"] is not None),
                                        default=None),
            "within_tolerance": not any(bad(r) for r in rows),
            "outside_tolerance": [f"{r['ranks']} rank(s), {r['stage_name']}: step {_pct(r['step_error'])}, "
                                  f"memory {_pct(r['memory_error'])}" for r in rows if bad(r)]}


# ------------------------------------------------------------------------------------------ CPU, trainer
def predict_row(row: dict, cost, machine, batch: int, fb: dict[str, float], data_s: float,
                optimizer_s: float | None = None) -> dict:
    """The cost model's step time and memory for a measured trainer run (`row`: ranks, stage and
    what was measured), and the errors."""
    from rlipv2_scale.scale.cost import machine_rank_memory, step_time

    world, stage = row["ranks"], row["zero_stage"]
    t = step_time(cost, machine, stage, world, batch, fb["1"], contention=fb[str(world)] / fb["1"], data_s=data_s,
                  optimizer_s=optimizer_s)
    mem = machine_rank_memory(cost, machine, stage, world, batch)
    predicted_mem = mem["peak"]
    measured_mem = row["measured_peak_gib"] * 2 ** 30
    return {**row, "predicted_step_s": t["total"], "predicted_parts_s": t,
            "step_error": (t["total"] - row["measured_step_s"]) / row["measured_step_s"],
            "predicted_peak_gib": predicted_mem / 2 ** 30,
            "predicted_memory_parts_gib": {k: v / 2 ** 30 for k, v in mem.items()},
            "memory_error": (predicted_mem - measured_mem) / measured_mem}


def repredict(out: dict) -> dict:
    """The predictions of a results file recomputed from its recorded constants and measurements
    with the cost model as it is now (nothing is measured again)."""
    from rlipv2_scale.scale.calibrate import MachineConstants
    from rlipv2_scale.scale.cost import ModelCost

    machine = MachineConstants.from_dict(out["constants"])
    # files of an earlier version: no per-step terms (0)
    machine.deepspeed_s = {k: (list(v) + [0.0])[:3] for k, v in machine.deepspeed_s.items()}
    out["constants"] = machine.to_dict()
    for res in out["configs"]:
        cost = ModelCost(**res["cost"])
        res["rows"] = [predict_row({k: v for k, v in r.items() if not k.startswith("predicted") and "error" not in k},
                                   cost, machine, res["micro_batch"], res["forward_backward_s"], res["data_s"],
                                   res.get("optimizer_s"))
                       for r in res["rows"]]
        res.update(_errors(res["rows"]))
    return out


def run_config(config: str, data: Path, work: Path, args: argparse.Namespace, machine, log) -> dict:
    import psutil

    from rlipv2_scale.scale.calibrate import forward_backward_seconds
    from rlipv2_scale.scale.cost import ModelCost, machine_rank_memory
    from rlipv2_scale.scale.report import summarise_run
    from rlipv2_scale.scale.sweep import plan_sweep, run_local

    over = overrides_for(config, data, args.steps, args.resolution, args.batch)
    # FLOPs and activation bytes are deterministic: measured once per work folder.
    cached = work / f"cost_{config}_{args.resolution}.json"
    if cached.is_file():
        cost = ModelCost(**json.loads(cached.read_text()))
    else:
        cost, _ = measure_cost(config, over, args.resolution)
        cached.write_text(json.dumps(asdict(cost)))
    log(f"{config}: {cost.params / 1e6:.1f} M params in {cost.tensors} trainable tensors and {cost.modules} modules; "
        f"{cost.flops_per_image / 1e9:.2f} GFLOP and {cost.activation_bytes_per_image / 2 ** 20:.1f} MiB per image + "
        f"{cost.flops_per_step / 1e9:.2f} GFLOP and {cost.activation_bytes_per_step / 2 ** 20:.1f} MiB per step")
    fb, data_s, opt_s = {}, 0.0, None
    for n in args.ranks:
        fb[n], d, o = forward_backward_seconds(RECIPE, over, args.batch, args.resolution, args.resolution, ranks=n,
                                               repeat=args.repeat, texts=world_texts(), data=n == 1, optimizer=n == 1)
        data_s = d if d is not None else data_s
        opt_s = o if o is not None else opt_s
    log(f"{config}: forward + loss + backward of {args.batch} images: "
        + ", ".join(f"{fb[n]:.3f} s with {n} rank(s) at once" for n in args.ranks)
        + f" ({cost.flops(args.batch) / fb[1] / 1e9:.1f} GFLOP/s alone); a batch from the loader {data_s:.3f} s; "
        f"AdamW + clipping over the model {opt_s:.3f} s")
    sweep = plan_sweep(RECIPE, [f"nproc={','.join(map(str, args.ranks))}",
                                f"train.zero_stage={','.join(map(str, args.stages))}"], work / config, over)
    # The host's memory bounds what can run here: the cost model itself says which runs would not fit.
    available = psutil.virtual_memory().available
    skipped = []
    for run in list(sweep.runs):
        stage = int(run.values["train.zero_stage"])
        need = run.world_size * machine_rank_memory(cost, machine, stage, run.world_size, args.batch)["peak"]
        if need > args.memory_fraction * available:
            skipped.append({"ranks": run.world_size, "zero_stage": stage, "predicted_host_gib": need / 2 ** 30,
                            "available_gib": available / 2 ** 30})
            sweep.runs.remove(run)
    run_local(sweep, env={"OMP_NUM_THREADS": "1"}, log=log)
    rows = []
    for run in sweep.runs:
        if run.status != "completed":
            continue
        world, stage = run.world_size, int(run.values["train.zero_stage"])
        s = summarise_run(run.run_dir, run.name, run.values, world)
        records = [json.loads(line) for line in (Path(run.run_dir) / "metrics.jsonl").read_text().splitlines()]
        # One window per step; the first holds start-up work.
        steps = sorted(args.batch * world / r["images_per_s"] for r in records[1:] if r.get("images_per_s"))
        measured = steps[0] if args.statistic == "min" else statistics.median(steps)
        row = {"ranks": world, "zero_stage": stage, "stage_name": f"ZeRO-{stage}",
               "measured_step_s": measured, "measured_step_s_min": steps[0],
               "measured_step_s_median": statistics.median(steps),
               "measured_step_spread": (steps[-1] - steps[0]) / statistics.median(steps), "windows": len(steps),
               "measured_peak_gib": s.peak_memory_bytes / 2 ** 30, "wall_s": run.seconds}
        rows.append(predict_row(row, cost, machine, args.batch, {str(k): v for k, v in fb.items()}, data_s, opt_s))
    return {"config": config, "cost": asdict(cost), "resolution": args.resolution, "micro_batch": args.batch,
            "steps": args.steps, "forward_backward_s": {str(k): v for k, v in fb.items()}, "data_s": data_s, "optimizer_s": opt_s,
            "gflops_per_s": cost.flops(args.batch) / fb[1] / 1e9, "rows": rows, "skipped_for_host_memory": skipped,
            "failed": [r.name for r in sweep.runs if r.status != "completed"], **_errors(rows)}


# ------------------------------------------------------------------------------------------ GPU, plain PyTorch
def run_config_gpu(config: str, args: argparse.Namespace, machine, log) -> dict:
    """Single GPU, plain PyTorch: forward, set criterion, backward, clipping, AdamW."""
    from rlipv2_scale.models.build import build_model
    from rlipv2_scale.models.losses import SetCriterion
    from rlipv2_scale.scale.calibrate import model_optimizer_seconds
    from rlipv2_scale.scale.cost import machine_rank_memory, step_time
    from rlipv2_scale.scale.measure import calibration_step, device_sync, time_forward_backward

    device = torch.device(args.device)
    over = model_overrides(config) + ["model.text.tokenizer=null"]
    cost, cfg = measure_cost(config, over, args.resolution, args.device)
    n_obj, n_rel, res = cfg.data.num_obj_labels, cfg.data.num_rel_labels, args.resolution
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False).to(device).train()
    criterion = SetCriterion(cfg.loss).to(device)
    # A GPU runs a small micro-batch below its FLOP rate (kernel launches, Python): the forward/
    # backward is fitted as a fixed time plus FLOPs at a rate, from two calibration micro-batches.
    b1, b2 = args.calibration_batches
    t1, t2 = (time_forward_backward(calibration_step(model, criterion, b, res, res, n_obj, n_rel, device,
                                                     world_texts()), model, repeat=args.repeat) for b in (b1, b2))
    f1, f2 = cost.flops(b1), cost.flops(b2)
    if t2 > t1 and f2 > f1:
        rate = (f2 - f1) / (t2 - t1)
        fixed = max(t1 - f1 / rate, 0.0)
    else:             # no growth with the batch: bound by launches and Python, not by FLOPs
        rate, fixed = float("inf"), (t1 + t2) / 2
        log(f"{config}: the pass took no longer at {b2} images than at {b1}: taken as a fixed time; "
            f"calibration micro-batches further apart fit better")
    log(f"{config}: {cost.params / 1e6:.1f} M params; {cost.flops_per_image / 1e9:.2f} GFLOP per image + "
        f"{cost.flops_per_step / 1e9:.2f} per step; forward + loss + backward {t1 * 1e3:.1f} ms at {b1} images, "
        f"{t2 * 1e3:.1f} ms at {b2}: {fixed * 1e3:.1f} ms + FLOPs at {rate / 1e12:.2f} TFLOP/s")
    opt_s = model_optimizer_seconds(model, calibration_step(model, criterion, b1, res, res, n_obj, n_rel, device,
                                                            world_texts()), args.repeat)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    cuda = device.type == "cuda"
    sync = device_sync(device)
    rows = []
    for batch in args.batches:
        step = calibration_step(model, criterion, batch, res, res, n_obj, n_rel, device, world_texts())
        times = []
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - t0)
        steps = sorted(times[1:])
        measured = steps[0] if args.statistic == "min" else statistics.median(steps)
        # A CPU process's resident memory cannot be reset between batches: memory is checked on GPUs.
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        t = step_time(cost, machine, None, 1, batch, fixed + cost.flops(batch) / rate, optimizer_s=opt_s)
        mem = machine_rank_memory(cost, machine, None, 1, batch)
        rows.append({"ranks": 1, "zero_stage": None, "stage_name": f"plain, batch {batch}", "micro_batch": batch,
                     "measured_step_s": measured, "measured_step_s_min": steps[0],
                     "measured_step_s_median": statistics.median(steps),
                     "measured_step_spread": (steps[-1] - steps[0]) / statistics.median(steps), "windows": len(steps),
                     "predicted_step_s": t["total"], "predicted_parts_s": t, "step_error": (t["total"] - measured) / measured,
                     "measured_peak_gib": None if peak is None else peak / 2 ** 30,
                     "predicted_peak_gib": mem["peak"] / 2 ** 30,
                     "predicted_memory_parts_gib": {k: v / 2 ** 30 for k, v in mem.items()},
                     "memory_error": None if peak is None else (mem["peak"] - peak) / peak})
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return {"config": config, "cost": asdict(cost), "resolution": args.resolution,
            "calibration_batches": [b1, b2], "steps": args.steps,
            "forward_backward_s": {f"batch {b1}": t1, f"batch {b2}": t2}, "fixed_s": fixed,
            "gflops_per_s": rate / 1e9 if rate != float("inf") else None, "optimizer_s": opt_s, "rows": rows,
            **_errors(rows)}


def print_table(results: list[dict]) -> None:
    print(f"\n{'config':<6} {'ranks':>5} {'stage':<16} {'step s meas':>11} {'pred':>8} {'err':>7} "
          f"{'peak GiB meas':>13} {'pred':>7} {'err':>7}")
    for res in results:
        for r in res["rows"]:
            meas = "–" if r["measured_peak_gib"] is None else f"{r['measured_peak_gib']:.2f}"
            print(f"{res['config']:<6} {r['ranks']:>5} {r['stage_name']:<16} {r['measured_step_s']:>11.3f} "
                  f"{r['predicted_step_s']:>8.3f} {_pct(r['step_error']):>7} {meas:>13} "
                  f"{r['predicted_peak_gib']:>7.2f} {_pct(r['memory_error']):>7}")
        for s in res.get("skipped_for_host_memory", []):
            print(f"{res['config']:<6} {s['ranks']:>5} ZeRO-{s['zero_stage']:<11} skipped: needs "
                  f"~{s['predicted_host_gib']:.1f} GiB of host memory, {s['available_gib']:.1f} GiB available")
        print(f"{res['config']}: max |error| step {_abs_pct(res['max_abs_step_error'])}, memory "
              f"{_abs_pct(res['max_abs_memory_error'])}; within {TOLERANCE:.0%}: {res['within_tolerance']}")


def markdown(out: dict) -> str:
    """The per-case table of predicted against measured, with what each prediction is made of."""
    c = out["constants"]
    m = out["machine"]
    lines = ["# Cost model against measurement", "",
             f"{m['device']}, {m['cpus']} CPU core(s), torch {m['torch']}" + (f", DeepSpeed {m['deepspeed']}" if m.get("deepspeed") else "")
             + f"; 1-min load average {m['load_average_1min_start']:.1f} at the start, {m['load_average_1min_end']:.1f} "
             f"at the end (the machine is shared). Step time: the {out['step_statistic']} over a run's steps after the "
             f"first; spread = (slowest − fastest) / median of a run's steps. Tolerance ±{out['tolerance']:.0%}.", "",
             f"Method: {out['method']}.", "",
             "Machine constants: " + ", ".join([
                 f"collective latency {1e6 * c['collective_latency_s']:.0f} µs",
                 f"bandwidth {c['collective_bytes_per_s'] / 1e9:.2f} GB/s per rank (0: not measured)",
                 f"AdamW + clipping {1e9 * c['adam_s_per_param']:.2f} ns/param + {1e6 * c['adam_s_per_tensor']:.0f} "
                 f"µs/tensor + {1e3 * c['adam_s_per_step']:.1f} ms/step",
                 *[f"DeepSpeed ZeRO-{k} {1e9 * v[0]:.2f} ns/param + {1e6 * v[1]:.0f} µs/{'module' if k == '3' else 'tensor'}"
                   f" + {1e3 * v[2]:.1f} ms/step" for k, v in c["deepspeed_s"].items()],
                 *[f"DeepSpeed ZeRO-{k} on 2 ranks {1e-9 / v:.2f} GB/s effective" if v > 0 else
                   f"DeepSpeed ZeRO-{k} on 2 ranks: no cost beyond the local work"
                   for k, v in c.get("deepspeed_comm_s_per_byte", {}).items()],
                 f"process baseline {c['baseline_bytes'] / 2 ** 30:.2f} GiB",
                 f"library workspaces on the device {c.get('device_workspace_bytes', 0.0) / 2 ** 20:.0f} MiB",
                 f"optimizer temporaries {c.get('optimizer_temp_bytes_per_param', 0.0):.1f} bytes/param"]) + ".", ""]
    if out.get("predictions_recomputed"):
        lines += ["The predictions were recomputed (`--repredict`) from the recorded constants and measurements "
                  "with the cost model as committed.", ""]
    if out.get("recalibrated"):
        again = out["recalibrated"]["forward_backward_of"]
        lines += ["The machine constants" + (f" and the forward/backward of {', '.join(again)}" if again else "")
                  + " were measured again after the trainer runs (`--recalibrate`); the predictions use them.", ""]
    for res in out["configs"]:
        cost = res["cost"]
        lines += [f"## {res['config']}", "",
                  f"{cost['params'] / 1e6:.1f} M parameters ({cost['tensors']} trainable tensors, {cost['modules']} "
                  f"modules); {cost['flops_per_image'] / 1e9:.2f} GFLOP per image + {cost['flops_per_step'] / 1e9:.2f} "
                  f"GFLOP per step (label-text encoder); forward + loss + backward "
                  + ", ".join(f"{v:.3f} s ({k if k.startswith('batch') else k + ' rank(s) at once'})"
                              for k, v in res["forward_backward_s"].items())
                  + (f"; {res['gflops_per_s']:.1f} GFLOP/s" if res.get("gflops_per_s") else "")
                  + (f"; AdamW + clipping over the model {res['optimizer_s']:.3f} s" if res.get("optimizer_s") else "")
                  + ".", "",
                  "| ranks | stage | step s measured (min) | median | spread | predicted | error | compute | data | "
                  "optimizer | DeepSpeed | comm | peak GiB measured | predicted | error |", "|" + "---|" * 15]
        for r in res["rows"]:
            parts = r["predicted_parts_s"]
            meas = "–" if r["measured_peak_gib"] is None else f"{r['measured_peak_gib']:.2f}"
            lines.append(f"| {r['ranks']} | {r['stage_name']} | {r['measured_step_s']:.3f} | "
                         f"{r['measured_step_s_median']:.3f} | {100 * r['measured_step_spread']:.0f}% | {r['predicted_step_s']:.3f} | "
                         f"{_pct(r['step_error'])} | {parts['compute']:.3f} | {parts['data']:.3f} | {parts['optimizer']:.3f} | "
                         f"{parts['deepspeed']:.3f} | {parts['communication']:.3f} | {meas} | "
                         f"{r['predicted_peak_gib']:.2f} | {_pct(r['memory_error'])} |")
        lines += ["", f"Max |error|: step {_abs_pct(res['max_abs_step_error'])}, memory {_abs_pct(res['max_abs_memory_error'])}; "
                      f"within ±{out['tolerance']:.0%}: {'yes' if res['within_tolerance'] else 'no'}."]
        if res.get("outside_tolerance"):
            lines += ["", "Outside the tolerance: " + "; ".join(res["outside_tolerance"]) + "."]
        for sk in res.get("skipped_for_host_memory", []):
            lines += ["", f"Not run: {sk['ranks']} rank(s), ZeRO-{sk['zero_stage']} (the model predicts "
                          f"{sk['predicted_host_gib']:.1f} GiB of host memory; {sk['available_gib']:.1f} GiB were free)."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="tiny,r50")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is dropped)")
    p.add_argument("--repeat", type=int, default=3, help="timed forward/backward passes of the calibration")
    p.add_argument("--statistic", choices=["min", "median"], default="min",
                   help="step time of a run from its steps: the fastest (robust to a shared machine's load) or "
                        "the median")
    p.add_argument("--resolution", type=int, default=128, help="square training images, px")
    p.add_argument("--batch", type=int, default=2, help="CPU: micro-batch per rank")
    p.add_argument("--calibration-batches", default="2,8",
                   help="plain PyTorch: the two micro-batches whose forward/backward times fit the model's rate")
    p.add_argument("--batches", default="4,16", help="plain PyTorch: micro-batches whose step and memory are predicted")
    p.add_argument("--device", default="cpu", help="cpu (the trainer, DeepSpeed, 1 and 2 ranks) or cuda")
    p.add_argument("--no-deepspeed", action="store_true", help="plain PyTorch on one device (required on cuda)")
    p.add_argument("--work", help="folder for the data, the measured model costs and the run directories "
                                  "(default: a temporary one)")
    p.add_argument("--measure-only", action="store_true", help="CPU: measure and cache the model costs in --work, "
                                                               "run nothing else")
    p.add_argument("--memory-fraction", type=float, default=0.6,
                   help="skip runs whose predicted host memory exceeds this share of the available memory")
    p.add_argument("--append", action="store_true", help="keep the other configs already in --out")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_validation.json"),
                   help="JSON file, or a folder (then scale_validation_<device>.json in it)")
    p.add_argument("--repredict", action="store_true", help="CPU: recompute the predictions of --out from its "
                                                            "recorded constants and measurements, measuring nothing")
    p.add_argument("--recalibrate", action="store_true", help="CPU: measure the machine constants again and "
                                                              "recompute the predictions of --out (the model and "
                                                              "trainer measurements it records are kept)")
    args = p.parse_args()
    if args.repredict or args.recalibrate:
        from rlipv2_scale.scale.calibrate import calibrate

        path = Path(args.out)
        out = json.loads(path.read_text())
        if args.recalibrate:
            from rlipv2_scale.scale.calibrate import forward_backward_seconds

            torch.set_num_threads(1)
            out["constants"] = calibrate("cpu", threads=1, repeat=5, log=lambda m: print(m, flush=True)).to_dict()
            out["recalibrated"] = {"constants": True, "forward_backward_of": []}
            if args.work:      # the model's forward/backward too, for --configs
                data = Path(args.work) / "data"
                for res in out["configs"]:
                    if res["config"] not in args.configs.split(","):
                        continue
                    over = overrides_for(res["config"], data, res["steps"], res["resolution"], res["micro_batch"])
                    for n in list(res["forward_backward_s"]):
                        res["forward_backward_s"][n], _, opt_s = forward_backward_seconds(
                            RECIPE, over, res["micro_batch"], res["resolution"], res["resolution"], ranks=int(n),
                            repeat=args.repeat, texts=world_texts(), optimizer=n == "1")
                        res["optimizer_s"] = opt_s if n == "1" else res.get("optimizer_s")
                    out["recalibrated"]["forward_backward_of"].append(res["config"])
                    print(f"{res['config']}: forward + loss + backward {res['forward_backward_s']}", flush=True)
        out = repredict(out)
        out["predictions_recomputed"] = True
        path.write_text(json.dumps(out, indent=1) + "\n")
        path.with_suffix(".md").write_text(markdown(out))
        print_table(out["configs"])
        return
    args.ranks = [int(r) for r in args.ranks.split(",")]
    args.stages = [int(s) for s in args.stages.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.calibration_batches = [int(b) for b in args.calibration_batches.split(",")]
    if len(args.calibration_batches) != 2 or len(set(args.calibration_batches)) != 2:
        raise SystemExit("--calibration-batches takes two different micro-batches, e.g. 2,8")
    gpu = args.device.startswith("cuda")
    plain = args.no_deepspeed
    if gpu and not plain:
        raise SystemExit("--device cuda checks a single GPU with plain PyTorch: add --no-deepspeed")
    out_path = Path(args.out)
    if out_path.is_dir() or not out_path.suffix:
        out_path = out_path / f"scale_validation_{'cuda' if gpu else 'cpu'}{'_plain' if plain else ''}.json"
    torch.set_num_threads(1 if not gpu else torch.get_num_threads())
    from rlipv2_scale.scale.calibrate import calibrate

    log = lambda s: print(s, flush=True)   # noqa: E731
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    machine = None if args.measure_only else calibrate(args.device, threads=torch.get_num_threads(),
                                                       deepspeed=not plain, collectives=not plain, repeat=5, log=log)
    if plain:
        results = [run_config_gpu(c, args, machine, log) for c in args.configs.split(",")]
        method = (f"single {machine.device}, plain PyTorch: the model's forward + loss + backward timed at micro-batches "
                  f"{args.calibration_batches} and fitted as a fixed time + FLOPs at a rate, AdamW + clipping timed "
                  f"on the model; library workspaces and the optimizer's temporaries measured on synthetic tensors; "
                  f"step time and peak allocated memory predicted for micro-batches "
                  f"{args.batches} and measured on a plain training loop (model, set criterion, clipping, AdamW)")
    else:
        from rlipv2_scale.demo import DemoPlan, prepare_data

        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="scale_validation_"))
        data = work / "data"
        if not (data / "shards" / "train" / "index.json").is_file():
            prepare_data(data, DemoPlan(train_images=64, val_images=4, test_images=1, steps=1, eval_every=1),
                         lambda s: None, workers=1)
        if args.measure_only:
            for c in args.configs.split(","):
                cost, _ = measure_cost(c, overrides_for(c, data, args.steps, args.resolution, args.batch), args.resolution)
                (work / f"cost_{c}_{args.resolution}.json").write_text(json.dumps(asdict(cost)))
                log(f"{c}: {json.dumps(asdict(cost))}")
            return
        results = [run_config(c, data, work, args, machine, log) for c in args.configs.split(",")]
        method = ("machine constants measured once on workloads of their own (gloo ping, AdamW and DeepSpeed "
                  "probes on synthetic models, DeepSpeed's large probe again on 2 ranks, a model-less trainer "
                  "process), the model's FLOPs, activations, forward/backward time and AdamW step measured "
                  "outside the trainer; every trainer run predicted")
    machine_info = {"cpus": os.cpu_count(), "torch": torch.__version__,
                    "deepspeed": None if plain else __import__("deepspeed").__version__, "python": platform.python_version(),
                    "platform": platform.platform(), "device": machine.device,
                    "load_average_1min_start": load0, "load_average_1min_end": os.getloadavg()[0]}
    out = {"machine": machine_info, "constants": machine.to_dict(), "method": method, "threads_per_rank": machine.threads,
           "step_statistic": args.statistic, "tolerance": TOLERANCE, "seconds": round(time.perf_counter() - t0, 1),
           "configs": results}
    for res in results:
        res["machine"] = machine_info
    if args.append and out_path.is_file():
        # Configs measured in an earlier invocation (another time, another load) are kept, each with its machine.
        earlier = json.loads(out_path.read_text())
        names = {r["config"] for r in results}
        out["configs"] = [r for r in earlier["configs"] if r["config"] not in names] + results
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1) + "\n")
    out_path.with_suffix(".md").write_text(markdown(out))
    print_table(results)
    print(f"wrote {out_path} and {out_path.with_suffix('.md')} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
