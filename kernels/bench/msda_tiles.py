"""Tile search and accuracy check for the multi-scale deformable attention kernels on a GPU.

`python -m rlipv2_scale.kernels.bench.msda_tiles --out DIR` (CUDA) times forward and
forward+backward at the encoder shape (800x1333, 4 levels, 22,223 queries, 8 heads x 32) for each
(rows per program, warps) of the atomic backward, then the dense_coarse backward for each
(largest dense level in pixels, dense tile), and measures how far the bf16 Triton kernels (both
backwards) and the bf16 PyTorch reference each land from an fp64 reference on the same bf16
inputs (their difference from each other says little: both round, differently). Writes
`msda_tiles_<card>.json`; the fastest dense setting is what `ms_deform_attn_triton.DENSE_MAX_PIXELS`
and `DENSE_TILE` should be set to.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from rlipv2_scale.kernels import ms_deform_attn, ms_deform_attn_triton
from rlipv2_scale.kernels.bench.microbench import level_shapes, rel_err

TILES = [(16, 4), (32, 4), (32, 8), (64, 8), (64, 4), (128, 8)]
# dense levels at 800x1333: 300 -> the 13x21 level; 2048 -> also 25x42; 5000 -> also 50x84.
# Tiles: (queries, pixels, warps), each compiled without spills for sm_90.
DENSE = [(dmax, tile) for dmax in (300, 2048, 5000) for tile in ((64, 64, 8), (64, 32, 4), (32, 64, 4))]


def _inputs(dtype, lq=None, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = torch.tensor(level_shapes(800, 1333), dtype=torch.long, device="cuda")
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    s = int(sizes.sum())
    lq = s if lq is None else lq
    value = torch.randn(1, s, 8, 32, generator=gen, device="cuda").to(dtype)
    loc = torch.rand(1, lq, 8, 4, 4, 2, generator=gen, device="cuda").to(dtype)
    attn = torch.rand(1, lq, 8, 4, 4, generator=gen, device="cuda").softmax(-1).to(dtype)
    return value, shapes, starts, loc, attn


def _grads(backend, value, shapes, starts, loc, attn, go, backward=None):
    leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend, backward=backward)
    out.backward(go)
    return [out] + [t.grad for t in leaves]



def accuracy() -> dict:
    value, shapes, starts, loc, attn = _inputs(torch.bfloat16, seed=1)
    go = torch.randn(1, loc.shape[1], 256, device="cuda").to(torch.bfloat16)
    want = _grads("torch", *(t.double() if t.is_floating_point() else t for t in (value, shapes, starts, loc, attn)),
                  go.double())
    report = {}
    for backend, backward in (("triton", "atomic"), ("triton_dense", "dense_coarse"), ("torch", None)):
        got = _grads(backend.split("_")[0], value, shapes, starts, loc, attn, go, backward)
        report[backend] = {name: rel_err(g, w) for name, g, w in zip(("output", "value", "locations", "weights"),
                                                                   got, want)}
    return report


def timings(dense_only: bool = False) -> list[dict]:
    import triton.testing

    rows = []
    saved = ms_deform_attn_triton._launch_config
    value, shapes, starts, loc, attn = _inputs(torch.bfloat16)
    go = torch.randn(1, loc.shape[1], 256, device="cuda").to(torch.bfloat16)
    leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]

    def fwd():
        with torch.no_grad():
            return ms_deform_attn(value, shapes, starts, loc, attn, backend="triton")

    def fwdbwd(backward="atomic"):
        for t in leaves:
            t.grad = None
        ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend="triton",
                       backward=backward).backward(go)
    try:
        for tile in [] if dense_only else TILES:
            ms_deform_attn_triton._launch_config = lambda rows_, images, backward, tile=tile: tile
            f = triton.testing.do_bench(fwd, warmup=50, rep=200, return_mode="median")
            fb = triton.testing.do_bench(fwdbwd, warmup=50, rep=200, return_mode="median")
            rows.append(dict(backward="atomic", rows_per_program=tile[0], warps=tile[1], fwd_ms=f, fwdbwd_ms=fb))
            print(f"msda tile {tile}: fwd {f:.3f} ms  fwd+bwd {fb:.3f} ms", flush=True)
    finally:
        ms_deform_attn_triton._launch_config = saved
    saved_dense = ms_deform_attn_triton.DENSE_MAX_PIXELS, ms_deform_attn_triton.DENSE_TILE
    try:
        for dmax, tile in DENSE:
            ms_deform_attn_triton.DENSE_MAX_PIXELS, ms_deform_attn_triton.DENSE_TILE = dmax, tile
            fb = triton.testing.do_bench(lambda: fwdbwd("dense_coarse"), warmup=50, rep=200, return_mode="median")
            rows.append(dict(backward="dense_coarse", dense_max_pixels=dmax, dense_tile=list(tile), fwdbwd_ms=fb))
            print(f"msda dense backward, levels <= {dmax} px, tile {tile}: fwd+bwd {fb:.3f} ms", flush=True)
    finally:
        ms_deform_attn_triton.DENSE_MAX_PIXELS, ms_deform_attn_triton.DENSE_TILE = saved_dense
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/gpu")
    parser.add_argument("--dense-only", action="store_true",
                        help="skip the atomic backward's tiles (searched before: msda_tiles_nvidia_h200.json)")
    args = parser.parse_args()
    out = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "accuracy_vs_fp64": accuracy()}
    print("bf16 accuracy vs fp64:", json.dumps(out["accuracy_vs_fp64"]), flush=True)
    out["tiles"] = timings(args.dense_only)
    name = re.sub(r"[^A-Za-z0-9]+", "_", out["card"]).strip("_").lower()
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"msda_tiles_{name}.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
