"""Forward + backward of one training step of RLIPv2 on CPU: seconds and peak memory per image, and
the share of the step spent in multi-scale deformable attention, ALIF, the backbone and the
label-text encoder (torch.profiler, `record_function` ranges of the model; the backward of each
range is attributed through the autograd sequence numbers of its forward ops).

Each config runs in its own process so that the peak resident memory is its own.

    python benchmarks/model_step.py                  # tiny at 128 and 512 px, r50 at 512 px
    python benchmarks/model_step.py --runs tiny@128

Wall time on a shared machine varies with the other load; the process CPU time (summed over the
threads) is reported beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import torch

RANGES = ("ms_deform_attn", "alif", "backbone", "text_encoder")
RESULTS = Path(__file__).resolve().parent / "results" / "model_step.json"


def _labels(num_obj: int, num_rel: int) -> tuple[list[str], list[str]]:
    from rlipv2_scale.models.text import default_label_corpus

    words = default_label_corpus()
    objs = [f"{words[i % 80]} {i // 80}" if i >= 80 else words[i] for i in range(num_obj)] + ["no objects"]
    rels = [f"{words[80 + i % 117]} {i // 117}" if i >= 117 else words[80 + i] for i in range(num_rel)]
    return objs, rels


def _attributed_share(prof: torch.profiler.profile, step_us: float,
                      time_of=lambda e: e.cpu_time_total) -> dict[str, float]:
    """Forward time of each range plus the backward time of the autograd nodes its ops created.
    `time_of`: an event's time (`e.device_time_total` for GPU time, as benchmarks/gpu_step.py
    does); only host-side events count, a GPU profile's device copies of the ranges would not."""
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    fwd_ops = [e for e in events if e.sequence_nr >= 0 and not e.name.startswith("autograd::engine")]
    bwd = [e for e in events if e.name.startswith("autograd::engine::evaluate_function")]
    shares = {}
    for name in RANGES:
        ranges = [e for e in events if e.name == name]
        fwd_us = sum(time_of(e) for e in ranges)
        seqs = set()
        for r in ranges:
            seqs.update(op.sequence_nr for op in fwd_ops if op.thread == r.thread
                        and r.time_range.start <= op.time_range.start and op.time_range.end <= r.time_range.end)
        bwd_us = sum(time_of(e) for e in bwd if e.sequence_nr in seqs)
        shares[name] = round((fwd_us + bwd_us) / step_us, 4)
    return shares


def _run(name: str, size: int, batch: int, steps: int, num_obj: int, num_rel: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    from rlipv2_scale.models.build import build_model
    from rlipv2_scale.models.config import named_config
    from rlipv2_scale.models.outputs import OUTPUT_KEYS
    from rlipv2_scale.train.telemetry import peak_resident_bytes

    cfg = named_config(name)
    # random init, no download: a local tokenizer instead of roberta-base's
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, pretrained_weights=None),
                              text=dataclasses.replace(cfg.text, pretrained=None, tokenizer=None))
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).train()
    images = torch.randn(batch, 3, size, size)
    mask = torch.zeros(batch, size, size, dtype=torch.bool)
    objs, rels = _labels(num_obj, num_rel)
    model.text_encoder.tokenizer   # build the tokenizer outside the timed steps

    def step() -> None:
        out = model(images, mask, objs, rels)
        loss = sum(getattr(layer, k).float().mean() for layer in [out, *out.aux_outputs] for k in OUTPUT_KEYS)
        loss.backward()
        model.zero_grad(set_to_none=True)

    rss_before = peak_resident_bytes()
    step()   # warm-up
    times, cpu_times = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = peak_resident_bytes()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        prof_us = (time.perf_counter() - t0) * 1e6
    seconds = sorted(times)[len(times) // 2]
    cpu_seconds = sorted(cpu_times)[len(cpu_times) // 2]
    queue.put({
        "config": name, "image_size": size, "batch": batch, "steps": steps, "labels": [len(objs), len(rels)],
        "params": sum(p.numel() for p in model.parameters()),
        "step_s": round(seconds, 4), "step_s_per_image": round(seconds / batch, 4),
        "step_cpu_s": round(cpu_seconds, 4),
        "peak_rss_mb": round(peak / 2 ** 20, 1),
        "activation_peak_mb_per_image": round((peak - rss_before) / 2 ** 20 / batch, 1),
        "share": _attributed_share(prof, prof_us),
    })


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=["tiny@128", "tiny@512", "r50@512"],
                    help="CONFIG@SIZE entries (square images)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    # per config: (batch, timed steps, object texts, relation texts) — r50 uses the pre-training label count
    plans = {"tiny": (2, 5, 20, 10), "r50": (1, 1, 333, 167)}
    ctx = mp.get_context("spawn")
    rows = []
    for run in args.runs:
        name, _, size = run.partition("@")
        batch, steps, n_obj, n_rel = plans.get(name, (1, 1, 333, 167))
        queue = ctx.Queue()
        proc = ctx.Process(target=_run, args=(name, int(size or 512), batch, steps, n_obj, n_rel, args.threads,
                                              queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
    print(f"{'config':<8} {'size':>5} {'batch':>5} {'s/step':>8} {'s/img':>8} {'cpu s':>8} {'peak MB':>9} "
          f"{'act MB/img':>10}  " + "  ".join(f"{r:>14}" for r in RANGES))
    for r in rows:
        print(f"{r['config']:<8} {r['image_size']:>5} {r['batch']:>5} {r['step_s']:>8.3f} "
              f"{r['step_s_per_image']:>8.3f} {r['step_cpu_s']:>8.3f} "
              f"{r['peak_rss_mb']:>9.0f} {r['activation_peak_mb_per_image']:>10.0f}  "
              + "  ".join(f"{r['share'][k]:>14.1%}" for k in RANGES))
    result = {
        "benchmark": "model_step", "device": "cpu", "threads": args.threads, "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),   # other processes sharing the CPUs
        "python": sys.version.split()[0], "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
