"""One training step of the RLIPv2 pre-training models on one GPU: the project's kernels against
the same model on the PyTorch references.

Per model config (default `r50` and `swin_l`, random weights, nothing downloaded, a locally
trained tokenizer) at the original's input size (800x1333: shorter side 800, longer side at its
cap of 1333) and label counts (333 object + 167 relation texts, recipes/pretrain/_base.yaml), a
step is: forward, the set criterion (Hungarian matching included), backward, gradient clipping
(0.1) and AdamW, on a fixed synthetic batch (`rlipv2_scale.scale.measure.calibration_step`).
Setups, each at the largest micro-batch that fits (doubling, then one bisection step):

- `kernels`: bf16 autocast, `backend="auto"` (the Triton kernels and the dispatch table);
- `reference`: fp32, no autocast, the PyTorch references (`grid_sample` deformable attention,
  the eager ALIF core) forced through `kernels.dispatch.override`: the original's setup;
- `kernels_all_levels`: as `kernels` with ALIF fused over every level (22,223 image tokens)
  instead of the coarsest (273).

Each reports images/s (median of `--steps` timed steps after a warm-up), peak memory
(`torch.cuda.max_memory_allocated`) and the share of one profiled step spent in the model's
`record_function` ranges (ms_deform_attn, alif, backbone, text_encoder; GPU time of their
forward kernels and of the backward nodes their ops created, `model_step._attributed_share`).

    python benchmarks/gpu_step.py --out DIR [--configs r50,swin_l] [--budget-s 200]
    python benchmarks/gpu_step.py --device cpu --tiny --out DIR      # the smoke test's path

`--budget-s` bounds the whole run: each setup gets an equal share of what is left, and a setup
that would start without time left is reported as not run. On CPU the `kernels` setup runs in
fp32 (what differs from `reference` is then only the dispatch: SDPA for ALIF).
Writes `gpu_step.json` and `gpu_step.md` under `--out`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))   # model_step, a sibling script
sys.path.insert(0, str(ROOT))
import rlipv2_scale  # noqa: E402

if importlib.util.find_spec("rlipv2_scale.kernels") is None:
    # not pip-installed (a bare GPU image): kernels/ installs as rlipv2_scale.kernels (setup.py)
    rlipv2_scale.__path__.append(str(ROOT))

from model_step import RANGES, _attributed_share  # noqa: E402

ORIGINAL_SIZE = (800, 1333)
ORIGINAL_LABELS = (333, 167)
SETUPS = ("kernels", "reference", "kernels_all_levels")
REFERENCE = dict(alif_bi_attention="eager", ms_deform_attn="torch")


def _model(name: str, device: torch.device):
    from rlipv2_scale.models.build import build_model
    from rlipv2_scale.models.config import named_config

    cfg = named_config(name)
    # random init, no download: a local tokenizer instead of roberta-base's
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, pretrained_weights=None),
                              text=dataclasses.replace(cfg.text, pretrained=None, tokenizer=None))
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).to(device).train()
    model.text_encoder.tokenizer   # build the tokenizer outside the timed steps
    return model


def _set_fusion(model, fusion: str) -> None:
    from rlipv2_scale.models.alif import AlifEncoder

    for mod in model.modules():
        if isinstance(mod, AlifEncoder) and mod.fusion != "none":
            mod.fusion = fusion


class _Setup:
    """A training step of `model` at micro-batch `batch` under one setup's dtype and dispatch."""

    def __init__(self, model, criterion, setup: str, device: torch.device, size, labels):
        self.model, self.criterion, self.setup, self.device = model, criterion, setup, device
        self.size, self.labels = size, labels
        self.bf16 = setup != "reference" and device.type == "cuda"
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, fused=device.type == "cuda")
        self.params = params

    def step_fn(self, batch: int):
        from rlipv2_scale.kernels import dispatch
        from rlipv2_scale.scale.measure import calibration_step

        closure = calibration_step(self.model, self.criterion, batch, *self.size, *self.labels, self.device)

        def step() -> None:
            self.opt.zero_grad(set_to_none=True)
            forced = dispatch.override(**REFERENCE) if self.setup == "reference" else contextlib.nullcontext()
            with forced, torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
                loss = closure()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 0.1)
            self.opt.step()
        return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fits(setup: _Setup, batch: int) -> bool:
    """One step at `batch`; False when it runs out of device memory."""
    try:
        setup.step_fn(batch)()
        _sync(setup.device)
        return True
    except torch.cuda.OutOfMemoryError:
        pass
    # outside the handler: its traceback no longer holds the failed step's tensors
    setup.opt.zero_grad(set_to_none=True)
    _free(setup.device)
    return False


def largest_batch(fits, cap: int, deadline: float, start: int = 1) -> tuple[int, list[int]]:
    """Largest micro-batch b <= cap with fits(b): doubling from `start`, then one bisection step
    between the last fit and the first failure (what the time budget allows). (0, tried) when
    not even `start` fits."""
    tried, best, b = [], 0, start
    while b <= cap:
        tried.append(b)
        if not fits(b):
            break
        best = b
        if time.perf_counter() > deadline:
            return best, tried
        b *= 2
    upper = min(b, cap + 1)
    mid = (best + upper) // 2
    if best and mid > best and time.perf_counter() < deadline:
        tried.append(mid)
        if fits(mid):
            best = mid
    return best, tried


def _profile_shares(step, device: torch.device) -> dict[str, float]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    _sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        _sync(device)
        step_us = (time.perf_counter() - t0) * 1e6
    shares = _attributed_share(prof, step_us, (lambda e: e.device_time_total) if device.type == "cuda"
                               else (lambda e: e.cpu_time_total))
    shares["other"] = round(max(0.0, 1.0 - sum(shares.values())), 4)
    return shares


def run_setup(setup: _Setup, cap: int, steps: int, deadline: float, start: int = 1) -> dict:
    device = setup.device
    batch, tried = largest_batch(lambda b: _fits(setup, b), cap, deadline, start)
    row = dict(setup=setup.setup, dtype="bf16 autocast" if setup.bf16 else "fp32", batch=batch, tried=tried)
    if not batch:
        return {**row, "error": f"micro-batch {start} does not fit"}
    step = setup.step_fn(batch)
    step()                                   # warm-up at the chosen size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    row.update(step_s=round(step_s, 4), images_per_s=round(batch / step_s, 3),
               step_s_all=[round(t, 4) for t in times],
               peak_gib=round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if device.type == "cuda" else None,
               share=_profile_shares(step, device))
    return row


def run_config(name: str, device: torch.device, setups: list[str], size, labels, cap: int, steps: int,
               budget_end: float, log) -> dict:
    from rlipv2_scale.models.losses import SetCriterion

    out = dict(config=name, image=list(size), labels=list(labels), setups=[])
    try:
        model = _model(name, device)
    except Exception as exc:   # a missing optional dependency on a bare image: report, go on
        out["error"] = f"{type(exc).__name__}: {exc}"
        log(f"{name}: cannot build ({out['error']})")
        return out
    out["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    criterion = SetCriterion().to(device)
    prev_batch = None
    for i, name_setup in enumerate(setups):
        left = budget_end - time.perf_counter()
        if left <= 0:
            out["setups"].append(dict(setup=name_setup, error="not run: time budget spent"))
            continue
        deadline = time.perf_counter() + left / (len(setups) - i)
        _set_fusion(model, "all_levels" if name_setup == "kernels_all_levels" else "last_level")
        setup = _Setup(model, criterion, "reference" if name_setup == "reference" else "kernels", device, size,
                       labels)
        setup.setup = name_setup
        # the other setups (fp32, or ALIF over 22k tokens) need more memory per image than the bf16
        # step: the search stops at the micro-batch that one fitted, which saves the failing tries
        try:
            row = run_setup(setup, cap if prev_batch is None else min(cap, max(prev_batch, 1)), steps, deadline)
        except Exception as exc:
            row = dict(setup=name_setup, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        if name_setup == "kernels":
            prev_batch = row.get("batch")
        out["setups"].append(row)
        log(f"{name} {name_setup}: " + (row.get("error") or f"batch {row['batch']}, {row['step_s']:.3f} s/step, "
                                        f"{row['images_per_s']:.2f} img/s, peak {row['peak_gib']} GiB"))
        del setup
        model.zero_grad(set_to_none=True)
        _free(device)
    by = {r["setup"]: r for r in out["setups"] if "images_per_s" in r}
    if "kernels" in by and "reference" in by:
        out["speedup_vs_reference"] = round(by["kernels"]["images_per_s"] / by["reference"]["images_per_s"], 3)
    if "kernels" in by and "kernels_all_levels" in by:
        out["all_levels_step_vs_last_level"] = round(by["kernels_all_levels"]["step_s"] / by["kernels"]["step_s"], 3)
    return out


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Training step, {m['card']}", "",
             f"torch {m['torch']}, Triton {m['triton']}, CUDA {m.get('cuda')}, driver {m.get('driver')}, "
             f"commit {m['commit'][:12]}; image {report['image'][0]}x{report['image'][1]}, labels "
             f"{report['labels'][0]}+{report['labels'][1]}", "",
             "| config | setup | dtype | micro-batch | s/step | images/s | peak GiB | "
             + " | ".join(RANGES) + " | other |",
             "|---|---|---|---|---|---|---|" + "---|" * (len(RANGES) + 1)]
    for c in report["results"]:
        if "error" in c:
            lines.append(f"| {c['config']} | – | – | – | – | – | – | {c['error']} |")
            continue
        for r in c["setups"]:
            if "error" in r:
                lines.append(f"| {c['config']} | {r['setup']} | {r.get('dtype', '–')} | – | – | – | – | "
                             f"{r['error']} |")
                continue
            shares = " | ".join(f"{100 * r['share'][k]:.1f} %" for k in (*RANGES, "other"))
            peak = r["peak_gib"] if r["peak_gib"] is not None else "–"
            lines.append(f"| {c['config']} | {r['setup']} | {r['dtype']} | {r['batch']} | {r['step_s']:.3f} | "
                         f"{r['images_per_s']:.2f} | {peak} | {shares} |")
    lines.append("")
    for c in report["results"]:
        if "speedup_vs_reference" in c:
            dtype = next(r["dtype"] for r in c["setups"] if r["setup"] == "kernels")
            lines.append(f"- {c['config']}: kernels ({dtype}) {c['speedup_vs_reference']:.2f}x the images/s of the "
                         f"reference setup (fp32, PyTorch references)")
        if "all_levels_step_vs_last_level" in c:
            lines.append(f"- {c['config']}: ALIF over all levels takes {c['all_levels_step_vs_last_level']:.2f}x the "
                         f"step time of the coarsest level only")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny config at 96x128, 1 step (smoke test)")
    ap.add_argument("--configs", default=None, help="comma-separated (default: r50,swin_l; tiny with --tiny)")
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--steps", type=int, default=None, help="timed steps per setup (default 3; 1 with --tiny)")
    ap.add_argument("--max-batch", type=int, default=None, help="micro-batch cap of the search (default 32; 2 tiny)")
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    args = ap.parse_args(argv)
    from rlipv2_scale.errors import UserError
    from rlipv2_scale.kernels.bench.microbench import machine

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("gpu_step: no CUDA device is visible; use --device cpu --tiny")
    device = torch.device(args.device)
    configs = (args.configs or ("tiny" if args.tiny else "r50,swin_l")).split(",")
    size = (96, 128) if args.tiny else ORIGINAL_SIZE
    labels = (20, 10) if args.tiny else ORIGINAL_LABELS
    steps = args.steps or (1 if args.tiny else 3)
    cap = args.max_batch or (2 if args.tiny else 32)
    setups = [s for s in args.setups.split(",") if s]
    unknown = set(setups) - set(SETUPS)
    if unknown:
        raise UserError(f"gpu_step: unknown setups {sorted(unknown)}; use some of {', '.join(SETUPS)}")
    end = time.perf_counter() + args.budget_s
    info = machine(args.device)

    def log(msg: str) -> None:
        print(msg, flush=True)
    report = dict(benchmark="gpu_step", machine=info, image=list(size), labels=list(labels), steps=steps,
                  budget_s=args.budget_s, results=[])
    args.out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(configs):
        share_end = time.perf_counter() + (end - time.perf_counter()) / (len(configs) - i)
        report["results"].append(run_config(name, device, setups, size, labels, cap, steps, share_end, log))
        # after every config: a run killed by an outer timeout keeps what it measured
        (args.out / "gpu_step.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (args.out / "gpu_step.md").write_text(md)
    print(md)
    return report


if __name__ == "__main__":
    main()
