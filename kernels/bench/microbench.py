"""Microbenchmarks of `ms_deform_attn` and `alif_bi_attention` against their baselines.

Every case is timed for forward (no autograd) and forward+backward, as the median of repeated
runs, next to the baselines measured in the same process: the PyTorch reference, and for the ALIF
attention core `scaled_dot_product_attention` and xformers when installed. Each row reports the
compulsory bytes (every input read once, every output written once), the achieved GB/s, and on
CUDA the floor time max(bytes / bandwidth, FLOPs / peak) and the share of it reached.

On CPU only the torch paths are timed (the Triton interpreter is not a speed measure), at half
the image side by default (`reduced`), which the table and the JSON say.
"""
from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from rlipv2_scale.errors import UserError
from rlipv2_scale.kernels import alif
from rlipv2_scale.kernels.alif import alif_bi_attention
from rlipv2_scale.kernels.ms_deform_attn import ms_deform_attn

# Floors use H100 SXM figures: measured device-to-device bandwidth and large bf16 matmul rate;
# fp32 products at full ("ieee") precision run on the CUDA cores (datasheet: 67 TFLOP/s).
GPU_BANDWIDTH = 3.0e12
GPU_PEAK_FLOPS = {torch.bfloat16: 800e12, torch.float16: 800e12, torch.float32: 67e12}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STRIDES = (8, 16, 32, 64)


def level_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """Feature-map sizes of the 4 levels (strides 8..64, rounded up) of a padded image."""
    return [(math.ceil(height / s), math.ceil(width / s)) for s in STRIDES]


@dataclasses.dataclass
class Case:
    op: str
    name: str
    shape: str
    make: Callable[[], dict]           # builds the inputs on the device
    runners: dict[str, Callable]       # backend -> fn(**inputs) -> output tensor or tuple
    bytes_fwd: float
    bytes_bwd: float
    flops_fwd: float
    flops_bwd: float


def _msda_case(name: str, image: tuple[int, int], queries: int | None, batch: int, dtype, device) -> Case:
    shapes = level_shapes(*image)
    tokens = sum(h * w for h, w in shapes)
    lq = tokens if queries is None else queries
    heads, dim, levels, points = 8, 32, 4, 4
    elt = torch.finfo(dtype).bits // 8

    def make() -> dict:
        gen = torch.Generator(device=device).manual_seed(0)
        spatial = torch.tensor(shapes, dtype=torch.long, device=device)
        starts = torch.cat([spatial.new_zeros(1), (spatial[:, 0] * spatial[:, 1]).cumsum(0)[:-1]])
        weights = torch.rand(batch, lq, heads, levels * points, generator=gen, device=device).softmax(-1)
        return dict(value=torch.randn(batch, tokens, heads, dim, generator=gen, device=device, dtype=dtype),
                    value_spatial_shapes=spatial, value_level_start_index=starts,
                    sampling_locations=torch.rand(batch, lq, heads, levels, points, 2, generator=gen,
                                                  device=device, dtype=dtype),
                    attention_weights=weights.view(batch, lq, heads, levels, points).to(dtype))

    value_b = batch * tokens * heads * dim * elt
    loc_b = batch * lq * heads * levels * points * 2 * elt
    attn_b = batch * lq * heads * levels * points * elt
    out_b = batch * lq * heads * dim * elt
    samples = batch * lq * heads * levels * points
    runners = {b: (lambda b=b: lambda **kw: ms_deform_attn(**kw, backend=b))() for b in ("triton", "torch")}
    return Case("ms_deform_attn", name, f"N={batch} Lq={lq} S={tokens} M={heads} D={dim} L={levels} P={points}",
                make, runners,
                bytes_fwd=value_b + loc_b + attn_b + out_b,
                # backward reads value, locations, weights, grad_out; writes their three gradients
                bytes_bwd=2 * value_b + 2 * loc_b + 2 * attn_b + out_b,
                flops_fwd=samples * dim * 2 * 5, flops_bwd=samples * dim * 2 * 16)


def _sdpa_core(q, k, v, key_pad_mask, scale, dropout_p, training):
    mask = None if key_pad_mask is None else ~key_pad_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _xformers_core():
    try:
        import xformers.ops as xops
    except ImportError:
        return None

    def core(q, k, v, key_pad_mask, scale, dropout_p, training):
        bias = None
        if key_pad_mask is not None:
            bias = torch.zeros(q.shape[0], 1, q.shape[2], k.shape[2], device=q.device, dtype=q.dtype)
            bias = bias.masked_fill(key_pad_mask[:, None, None, :], float("-inf")).expand(-1, q.shape[1], -1, -1)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_bias=bias, scale=scale)
        return out.transpose(1, 2)
    return core


def _with_core(core) -> Callable:
    """alif_bi_attention on the torch path with its attention core swapped for a baseline's."""
    def run(**kw):
        saved = alif.attention_core_reference
        alif.attention_core_reference = core
        try:
            return alif_bi_attention(**kw, backend="torch")
        finally:
            alif.attention_core_reference = saved
    return run


def _alif_case(name: str, image_tokens: int, labels: int, batch: int, dtype, device) -> Case:
    dv, dl, inner, heads = 256, 768, 2048, 8
    elt = torch.finfo(dtype).bits // 8

    def make() -> dict:
        gen = torch.Generator(device=device).manual_seed(0)

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)
        kw = dict(v=rand(batch, image_tokens, dv), l=rand(batch, labels, dl), v_pos=rand(batch, image_tokens, dv))
        for w, (o, i) in dict(q=(inner, dv), k=(inner, dl), vv=(inner, dv), vl=(inner, dl), ov=(dv, inner),
                              ol=(dl, inner)).items():
            kw[f"w_{w}"] = rand(o, i, scale=i ** -0.5)
            kw[f"b_{w}"] = rand(o, scale=0.0)
        kw["gate_v"] = torch.tensor(0.25, device=device, dtype=dtype)
        kw["gate_l"] = torch.tensor(0.25, device=device, dtype=dtype)
        kw["v_pad_mask"] = torch.zeros(batch, image_tokens, dtype=torch.bool, device=device)
        kw["l_pad_mask"] = torch.zeros(batch, labels, dtype=torch.bool, device=device)
        kw["l_pad_mask"][:, labels - labels // 8:] = True  # a padded tail of the label list
        kw["num_heads"] = heads
        return kw

    runners = {"triton": lambda **kw: alif_bi_attention(**kw, backend="triton"),
               "torch": lambda **kw: alif_bi_attention(**kw, backend="torch"),
               "sdpa": _with_core(_sdpa_core)}
    xf = _xformers_core()
    if xf is not None:
        runners["xformers"] = _with_core(xf)
    act = batch * (image_tokens * dv * 2 + labels * dl) * elt          # v, v_pos, l
    weights = (3 * inner * dv + 3 * inner * dl) * elt
    out = batch * (image_tokens * dv + labels * dl) * elt
    proj_flops = 2 * batch * 3 * inner * (image_tokens * dv + labels * dl)
    core_flops = 2 * 4 * batch * image_tokens * labels * inner       # two directions x (QK^T, PV)
    return Case("alif_bi_attention", name, f"B={batch} Nv={image_tokens} Lt={labels} dv={dv} dl={dl} "
                f"inner={inner} H={heads}", make, runners,
                bytes_fwd=act + weights + out,
                # backward reads inputs, weights and the output gradients; writes their gradients
                bytes_bwd=2 * act + 2 * weights + out,
                flops_fwd=proj_flops + core_flops, flops_bwd=2 * proj_flops + 2.5 * core_flops)


def build_cases(device: str, dtype, reduced: bool) -> list[Case]:
    image = (400, 667) if reduced else (800, 1333)
    tokens = sum(h * w for h, w in level_shapes(*image))
    coarsest = math.prod(level_shapes(*image)[-1])
    return [
        _msda_case("encoder", image, None, 1, dtype, device),
        _msda_case("decoder", image, 200, 1, dtype, device),
        _alif_case("original (coarsest level)", coarsest, 200, 1, dtype, device),
        _alif_case("all levels", tokens, 200, 1, dtype, device),
    ]


def _outputs(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


def _timer(device: str, reps: int) -> Callable[[Callable], float]:
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=100, rep=max(reps * 10, 200), return_mode="median")

    def cpu_time(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    return cpu_time


def _leaves(inputs: dict) -> tuple[dict, list[torch.Tensor]]:
    kw, leaves = {}, []
    for key, val in inputs.items():
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            val = val.detach().requires_grad_()
            leaves.append(val)
        kw[key] = val
    return kw, leaves


def run_case(case: Case, backend: str, device: str, reps: int) -> dict:
    timer = _timer(device, reps)
    inputs = case.make()
    fn = case.runners[backend]
    with torch.no_grad():
        fwd_ms = timer(lambda: fn(**inputs))
    kw, leaves = _leaves(inputs)
    grads = [torch.randn_like(o) for o in _outputs(fn(**kw))]

    def step():
        for leaf in leaves:
            leaf.grad = None
        torch.autograd.backward(_outputs(fn(**kw)), grads)
    fwdbwd_ms = timer(step)
    row = dict(op=case.op, case=case.name, shape=case.shape, backend=backend, fwd_ms=fwd_ms, fwdbwd_ms=fwdbwd_ms,
               fwd_gbps=case.bytes_fwd / fwd_ms / 1e6,
               fwdbwd_gbps=(case.bytes_fwd + case.bytes_bwd) / fwdbwd_ms / 1e6,
               floor_fwd_ms=None, floor_fwdbwd_ms=None, floor_share_fwd=None, floor_share_fwdbwd=None)
    if device == "cuda":
        peak = GPU_PEAK_FLOPS[inputs["value"].dtype if "value" in inputs else inputs["v"].dtype]
        floor_fwd = max(case.bytes_fwd / GPU_BANDWIDTH, case.flops_fwd / peak) * 1e3
        floor_all = max((case.bytes_fwd + case.bytes_bwd) / GPU_BANDWIDTH,
                        (case.flops_fwd + case.flops_bwd) / peak) * 1e3
        row.update(floor_fwd_ms=floor_fwd, floor_fwdbwd_ms=floor_all, floor_share_fwd=floor_fwd / fwd_ms,
                   floor_share_fwdbwd=floor_all / fwdbwd_ms)
    return row


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in fp64."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def check_case(case: Case, backend: str, baseline: str = "torch") -> dict:
    """Relative max errors of `backend`'s forward and of the baseline's, each against the baseline
    run in fp64 on the same inputs (run before timing). In 16-bit both paths round, differently,
    so only their distances from fp64 say which is accurate."""
    inputs = case.make()
    wide = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}

    def worst(got, want) -> float:
        return max(rel_err(g, w) for g, w in zip(got, want))
    with torch.no_grad():
        want = _outputs(case.runners[baseline](**wide))
        return dict(rel_err_vs_fp64=worst(_outputs(case.runners[backend](**inputs)), want),
                    baseline_rel_err_vs_fp64=worst(_outputs(case.runners[baseline](**inputs)), want))


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine(device: str) -> dict:
    info = dict(device=device, cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), python=platform.python_version(), torch=torch.__version__,
                commit=_commit())
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["card"] = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({info['cpu']})"
    return info


def run(device: str, dtype_name: str, reduced: bool | None = None, reps: int = 5) -> dict:
    """Run every case on every available backend; returns the JSON-ready report."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("bench kernels --device cuda: no CUDA device is visible; use --device cpu")
    if dtype_name not in DTYPES:
        raise UserError(f"bench kernels: dtype {dtype_name!r} is unknown; use one of {', '.join(DTYPES)}")
    if reduced is None:
        reduced = device == "cpu"
    dtype = DTYPES[dtype_name]
    rows, errors, skipped = [], [], []
    for case in build_cases(device, dtype, reduced):
        backends = [b for b in case.runners if device == "cuda" or b != "triton"]
        if device == "cuda":
            errors.append(dict(op=case.op, case=case.name, **check_case(case, "triton")))
        for backend in backends:
            try:
                rows.append(run_case(case, backend, device, reps))
            except (RuntimeError, NotImplementedError, ValueError) as exc:  # a baseline that cannot run this shape
                if backend == "triton":
                    raise
                skipped.append(dict(op=case.op, case=case.name, backend=backend, error=str(exc).splitlines()[0]))
            if device == "cuda":
                torch.cuda.empty_cache()
    return dict(machine=machine(device), dtype=dtype_name, reduced=reduced,
                image="400x667" if reduced else "800x1333", correctness=errors, results=rows, skipped=skipped,
                notes=("CPU: torch paths only, the Triton interpreter is not a speed measure" if device == "cpu"
                       else f"floors: {GPU_BANDWIDTH / 1e12:.1f} TB/s, peak {GPU_PEAK_FLOPS[dtype] / 1e12:.0f} "
                            "TFLOP/s"))


def table(report: dict) -> str:
    lines = [f"{report['machine']['card']}  dtype={report['dtype']}  image={report['image']}"
             + ("  (reduced shapes)" if report["reduced"] else ""),
             f"{'op':<18} {'case':<26} {'backend':<9} {'fwd ms':>9} {'f+b ms':>9} {'fwd GB/s':>9} "
             f"{'f+b GB/s':>9} {'floor %':>8} {'vs torch':>9}"]
    by_key = {(r["op"], r["case"], r["backend"]): r for r in report["results"]}
    for r in report["results"]:
        ref = by_key.get((r["op"], r["case"], "torch"))
        speedup = ref["fwdbwd_ms"] / r["fwdbwd_ms"] if ref else float("nan")
        share = f"{100 * r['floor_share_fwdbwd']:.1f}" if r["floor_share_fwdbwd"] is not None else "-"
        lines.append(f"{r['op']:<18} {r['case']:<26} {r['backend']:<9} {r['fwd_ms']:>9.3f} {r['fwdbwd_ms']:>9.3f} "
                     f"{r['fwd_gbps']:>9.3g} {r['fwdbwd_gbps']:>9.3g} {share:>8} {speedup:>8.2f}x")
    for e in report["skipped"]:
        lines.append(f"skipped {e['backend']} on {e['op']} {e['case']}: {e['error']}")
    for e in report["correctness"]:
        lines.append(f"check {e['op']} {e['case']}: rel. error vs fp64: triton {e['rel_err_vs_fp64']:.2e}, "
                     f"torch in the same dtype {e['baseline_rel_err_vs_fp64']:.2e}")
    lines.append(report["notes"])
    return "\n".join(lines)


def chart(report: dict, path: Path) -> bool:
    """Bar chart of forward+backward times (log scale) per case and backend; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = list(dict.fromkeys((r["op"], r["case"]) for r in report["results"]))
    backends = list(dict.fromkeys(r["backend"] for r in report["results"]))
    by_key = {(r["op"], r["case"], r["backend"]): r["fwdbwd_ms"] for r in report["results"]}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        xs = [j + i * width for j, c in enumerate(cases) if (*c, backend) in by_key]
        ys = [by_key[(*c, backend)] for c in cases if (*c, backend) in by_key]
        ax.bar(xs, ys, width, label=backend)
    ax.set_xticks([j + width * (len(backends) - 1) / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"{op}\n{case}" for op, case in cases], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("forward+backward, ms (median)")
    ax.set_title(f"{report['machine']['card']}, {report['dtype']}, image {report['image']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(device: str, dtype_name: str, out_dir: str | Path, reduced: bool | None = None,
                 reps: int = 5) -> Path:
    """Run, print the table, write `kernels_<device>_<dtype>.json` (and `.png`) under `out_dir`."""
    import json

    report = run(device, dtype_name, reduced=reduced, reps=reps)
    print(table(report))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels_{device}_{dtype_name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    if chart(report, path.with_suffix(".png")):
        print(f"wrote {path.with_suffix('.png')}")
    return path
