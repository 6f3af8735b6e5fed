"""Microbenchmarks of `ms_deform_attn` and `alif_bi_attention` against their baselines.

Every case is timed for forward (no autograd) and forward+backward, as the median of repeated
runs, next to the baselines measured in the same process. Rows per op: `ms_deform_attn`: "torch"
(the `grid_sample` reference), "triton" (the atomic backward), "triton_dense" (the dense_coarse
backward); `alif_bi_attention`: "eager" (the reference core), "sdpa" (`backend="torch"`: the
`scaled_dot_product_attention` core), "triton" (the fused block) and "xformers" (the block on
`memory_efficient_attention`, when installed; else a skipped row says so). Each row reports the
compulsory bytes (every input read once, every output written once), the achieved GB/s, and on
CUDA the floor time max(bytes / bandwidth, FLOPs / peak) and the share of it reached.
`dispatch_entries` turns a CUDA report into the dispatch table's entries (`write_table`).

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
    tokens: int = 0                    # what the dispatch table is keyed by (queries / image tokens)


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
    runners = {"triton": lambda **kw: ms_deform_attn(**kw, backend="triton", backward="atomic"),
               "triton_dense": lambda **kw: ms_deform_attn(**kw, backend="triton", backward="dense_coarse"),
               "torch": lambda **kw: ms_deform_attn(**kw, backend="torch")}
    return Case("ms_deform_attn", name, f"N={batch} Lq={lq} S={tokens} M={heads} D={dim} L={levels} P={points}",
                make, runners,
                bytes_fwd=value_b + loc_b + attn_b + out_b,
                # backward reads value, locations, weights, grad_out; writes their three gradients
                bytes_bwd=2 * value_b + 2 * loc_b + 2 * attn_b + out_b,
                flops_fwd=samples * dim * 2 * 5, flops_bwd=samples * dim * 2 * 16, tokens=lq)


def padded_key_bias(key_pad_mask: torch.Tensor, heads: int, queries: int, dtype) -> torch.Tensor:
    """An additive bias [B, heads, queries, Nk] (-inf on padded keys) whose rows start on multiples
    of 8 elements, as xformers' memory_efficient_attention requires of a dense bias: allocated with
    Nk rounded up to 8 and sliced (273 and 22,223 keys, ALIF's counts, are not multiples of 8; a
    row of all padded keys is left unmasked, its output is zeroed by the caller)."""
    b, nk = key_pad_mask.shape
    empty = key_pad_mask.all(dim=-1, keepdim=True)
    store = torch.zeros(b, heads, queries, -(-nk // 8) * 8, device=key_pad_mask.device, dtype=dtype)
    bias = store[..., :nk]
    bias.masked_fill_((key_pad_mask & ~empty)[:, None, None, :], float("-inf"))
    return bias


def _xformers_core():
    try:
        import xformers.ops as xops
    except ImportError:
        return None

    def core(q, k, v, key_pad_mask, scale, dropout_p, training):
        bias = None
        if key_pad_mask is not None:
            bias = padded_key_bias(key_pad_mask, q.shape[1], q.shape[2], q.dtype)
        # [B, N, H, D] views of the projections' layout (no copy)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_bias=bias, scale=scale).transpose(1, 2)
        if key_pad_mask is not None:
            out = out.masked_fill(key_pad_mask.all(dim=-1)[:, None, None, None], 0.0)
        return out
    return core


def _with_core(core) -> Callable:
    """alif_bi_attention on the PyTorch path with its SDPA core swapped for a baseline's."""
    def run(**kw):
        saved = alif.attention_core_sdpa
        alif.attention_core_sdpa = core
        try:
            return alif_bi_attention(**kw, backend="torch")
        finally:
            alif.attention_core_sdpa = saved
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
               "eager": lambda **kw: alif_bi_attention(**kw, backend="eager"),
               "sdpa": lambda **kw: alif_bi_attention(**kw, backend="torch")}
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
                flops_fwd=proj_flops + core_flops, flops_bwd=2 * proj_flops + 2.5 * core_flops, tokens=image_tokens)


# The row each op's speed-up is measured against, and which rows are dispatch choices (row -> the
# name `dispatch.table_choice` returns). xformers is timed beside SDPA but is not a dependency.
REFERENCE_ROW = {"ms_deform_attn": "torch", "alif_bi_attention": "eager"}
DISPATCH_ROWS = {"ms_deform_attn": {"triton": "atomic", "triton_dense": "dense_coarse"},
                 "alif_bi_attention": {"triton": "triton", "sdpa": "torch", "eager": "eager"}}
TRITON_ROWS = ("triton", "triton_dense")


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
    row = dict(op=case.op, case=case.name, shape=case.shape, tokens=case.tokens, backend=backend, fwd_ms=fwd_ms,
               fwdbwd_ms=fwdbwd_ms,
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


def _forward_backward(fn: Callable, inputs: dict, seed: int = 1) -> list[torch.Tensor]:
    """Outputs, then the gradient of every floating input, for fixed random output gradients."""
    kw, leaves = _leaves(inputs)
    outs = _outputs(fn(**kw))
    gen = torch.Generator(device=outs[0].device).manual_seed(seed)
    grads = [torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float64).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs] + [leaf.grad for leaf in leaves]


def check_case(case: Case, backend: str, baseline: str | None = None) -> dict:
    """Relative max errors of `backend`'s forward and gradients, and of the baseline's (the op's
    reference row by default), each against the baseline run in fp64 on the same inputs (run
    before timing). In 16-bit both paths round, differently, so only their distances from fp64
    say which is accurate."""
    baseline = baseline or REFERENCE_ROW[case.op]
    inputs = case.make()
    wide = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    want = _forward_backward(case.runners[baseline], wide)
    outputs = len(want) - sum(1 for v in inputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point())

    def worst(got) -> tuple[float, float]:
        errs = [rel_err(g, w) if g is not None else 0.0 for g, w in zip(got, want)]
        return max(errs[:outputs]), max(errs[outputs:], default=0.0)
    fwd, grad = worst(_forward_backward(case.runners[backend], inputs))
    base_fwd, base_grad = worst(_forward_backward(case.runners[baseline], inputs))
    return dict(rel_err_vs_fp64=fwd, grad_rel_err_vs_fp64=grad, baseline_rel_err_vs_fp64=base_fwd,
                baseline_grad_rel_err_vs_fp64=base_grad)


def accurate(check: dict, dtype_name: str) -> bool:
    """Whether a checked path may be dispatched to: within 4x the reference's own distance from
    fp64 in the same dtype, or within the dtype's rounding (bf16 / fp16 3e-2, fp32 1e-4)."""
    floor = 1e-4 if dtype_name == "fp32" else 3e-2
    return (check["rel_err_vs_fp64"] <= max(4 * check["baseline_rel_err_vs_fp64"], floor)
            and check["grad_rel_err_vs_fp64"] <= max(4 * check["baseline_grad_rel_err_vs_fp64"], floor))


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _driver() -> str | None:
    """The NVIDIA driver version, from nvidia-smi (None without it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
    return lines[0].strip() if lines else None


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
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        info["capability"] = f"sm_{major}{minor}"
        info["cuda"] = torch.version.cuda
        info["driver"] = _driver()
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
        backends = [b for b in case.runners if device == "cuda" or b not in TRITON_ROWS]
        if case.op == "alif_bi_attention" and "xformers" not in case.runners:
            skipped.append(dict(op=case.op, case=case.name, backend="xformers", error="xformers is not installed"))
        if device == "cuda":
            for backend in backends:
                if backend != REFERENCE_ROW[case.op]:
                    errors.append(dict(op=case.op, case=case.name, backend=backend, **check_case(case, backend)))
                    torch.cuda.empty_cache()
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
             f"{'f+b GB/s':>9} {'floor %':>8} {'vs ref':>9}"]
    by_key = {(r["op"], r["case"], r["backend"]): r for r in report["results"]}
    for r in report["results"]:
        ref = by_key.get((r["op"], r["case"], REFERENCE_ROW.get(r["op"], "torch")))
        speedup = ref["fwdbwd_ms"] / r["fwdbwd_ms"] if ref else float("nan")
        share = f"{100 * r['floor_share_fwdbwd']:.1f}" if r["floor_share_fwdbwd"] is not None else "-"
        lines.append(f"{r['op']:<18} {r['case']:<26} {r['backend']:<9} {r['fwd_ms']:>9.3f} {r['fwdbwd_ms']:>9.3f} "
                     f"{r['fwd_gbps']:>9.3g} {r['fwdbwd_gbps']:>9.3g} {share:>8} {speedup:>8.2f}x")
    for e in report["skipped"]:
        lines.append(f"skipped {e['backend']} on {e['op']} {e['case']}: {e['error']}")
    for e in report["correctness"]:
        lines.append(f"check {e['op']} {e['case']} {e['backend']}: rel. error vs fp64 fwd {e['rel_err_vs_fp64']:.2e} "
                     f"grads {e['grad_rel_err_vs_fp64']:.2e}; reference in the same dtype "
                     f"{e['baseline_rel_err_vs_fp64']:.2e} / {e['baseline_grad_rel_err_vs_fp64']:.2e}")
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


def dispatch_entries(report: dict) -> dict:
    """{op: {dtype: {tokens: choice}}}: per case, the fastest forward+backward among the rows that
    are dispatch choices and passed the accuracy check (`accurate`)."""
    if report["machine"]["device"] != "cuda" or report["reduced"]:
        raise UserError("bench kernels --write-table needs a CUDA run at the full size (800x1333)")
    failed = {(e["op"], e["case"], e["backend"]) for e in report["correctness"] if not accurate(e, report["dtype"])}
    best: dict = {}
    for r in report["results"]:
        choice = DISPATCH_ROWS.get(r["op"], {}).get(r["backend"])
        if choice is None or (r["op"], r["case"], r["backend"]) in failed:
            continue
        key = (r["op"], str(r["tokens"]))
        if key not in best or r["fwdbwd_ms"] < best[key][0]:
            best[key] = (r["fwdbwd_ms"], choice)
    entries: dict = {}
    for (op, tokens), (_, choice) in sorted(best.items()):
        entries.setdefault(op, {}).setdefault(report["dtype"], {})[tokens] = choice
    return entries


def write_table(report: dict, path: str | Path) -> Path:
    """Merge the report's dispatch entries into the table at `path` (created if absent) under the
    card's name and its capability class, replacing those keys' entries for this dtype."""
    import json

    path = Path(path)
    table = json.loads(path.read_text()) if path.is_file() else {"devices": {}}
    entries = dispatch_entries(report)
    m = report["machine"]
    for key in (m["card"], m["capability"]):
        device = table["devices"].setdefault(key, {})
        for op, by_dtype in entries.items():
            device.setdefault(op, {}).update(by_dtype)
    table.setdefault("sources", {})[f"{m['card']} {report['dtype']}"] = (
        f"rlipv2 bench kernels {time.strftime('%Y-%m-%d', time.gmtime())}, commit {m['commit'][:12]}, "
        f"torch {m['torch']}, triton {m['triton']}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2) + "\n")
    return path


def write_report(device: str, dtype_name: str, out_dir: str | Path, reduced: bool | None = None,
                 reps: int = 5, table_path: str | Path | None = None) -> Path:
    """Run, print the table, write `kernels_<device>_<dtype>.json` (and `.png`) under `out_dir`;
    with `table_path`, merge the measured dispatch choices into that dispatch table."""
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
    if table_path is not None:
        print(f"dispatch choices {json.dumps(dispatch_entries(report))} -> {write_table(report, table_path)}")
    return path
