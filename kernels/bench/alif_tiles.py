"""Tile search for the fused ALIF attention kernels at head dim 256.

`python -m rlipv2_scale.kernels.bench.alif_tiles --out DIR` (CUDA) times every candidate tile of
each kernel (one that cannot launch is skipped) at ALIF's two shapes (original: the coarsest
level, 273 image tokens; all levels: 22,223) in both directions, checks each against the fp64
reference, and writes `alif_tiles_<card>.json` with the fastest tile per kernel and width.
`--device cpu` with `TRITON_INTERPRET=1` and small `--tokens` dry-runs the path without a GPU.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import time
from pathlib import Path

import torch

from rlipv2_scale.kernels.bench.microbench import rel_err

CANDIDATES = [(bm, bn, w, 2) for bm, bn in itertools.product((16, 32, 64, 128), (16, 32, 64)) for w in (4, 8)]


def _timer(device: str):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def once(fn) -> float:  # a dry run of the script's path (TRITON_INTERPRET=1), not a timing
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return once


def _time_candidates(kernel_name: str, bits: int, tiles: list, out: dict, device: str = "cuda",
                     tokens: tuple[int, ...] = (273, 22223), labels: int = 200) -> None:
    from rlipv2_scale.kernels import alif_triton
    from rlipv2_scale.kernels.heads import split_heads

    timer = _timer(device)
    dtype = torch.bfloat16 if bits == 16 else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    results = []
    for tile in tiles:
        alif_triton.WIDE_TILES[(kernel_name, bits)] = tuple(tile)
        total, errs = 0.0, []
        for nv in tokens:
            q = torch.randn(1, nv, 2048, device=device, generator=gen).to(dtype)
            k = torch.randn(1, labels, 2048, device=device, generator=gen).to(dtype)
            vv = torch.randn(1, nv, 2048, device=device, generator=gen).to(dtype)
            vl = torch.randn(1, labels, 2048, device=device, generator=gen).to(dtype)
            lmask = torch.zeros(1, labels, dtype=torch.bool, device=device)
            lmask[:, labels - labels // 8:] = True
            for qq, kk, vvv, mask in ((q, k, vl, lmask), (k, q, vv, None)):
                qh, kh, vh = (split_heads(t, 8) for t in (qq, kk, vvv))
                leaves = [t.detach().requires_grad_() for t in (qh, kh, vh)]
                go = torch.randn_like(qh)

                def run():
                    for t in leaves:
                        t.grad = None
                    o = alif_triton.fused_attention(*leaves, mask, 256 ** -0.5)
                    if kernel_name != "fwd":
                        o.backward(go)
                    return o
                try:
                    o = run()
                except Exception as exc:  # out of resources at launch: not a candidate
                    total = float("inf")
                    errs.append(f"{type(exc).__name__}: {str(exc)[:80]}")
                    break
                ref_leaves = [t.detach().double().requires_grad_() for t in (qh, kh, vh)]
                ref = alif_triton_reference(ref_leaves, mask)
                if kernel_name == "fwd":
                    errs.append(rel_err(o, ref))
                else:
                    ref.backward(go.double())
                    idx = 0 if kernel_name == "dq" else 1
                    errs.append(rel_err(leaves[idx].grad, ref_leaves[idx].grad))
                total += timer(run)
        results.append(dict(tile=list(tile), ms=total, rel_err=errs))
        print(f"{kernel_name:5s} {bits} {tuple(tile)}: {total:8.3f} ms  err {errs}", flush=True)
    valid = [r for r in results if r["ms"] != float("inf")]
    out[f"{kernel_name}/{bits}"] = dict(results=results, best=min(valid, key=lambda r: r["ms"]) if valid else None)


def alif_triton_tiles() -> dict:
    from rlipv2_scale.kernels import alif_triton

    return alif_triton.WIDE_TILES


def alif_triton_reference(leaves, mask):
    from rlipv2_scale.kernels.alif import attention_core_reference

    return attention_core_reference(*leaves, mask, 256 ** -0.5, 0.0, False)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/gpu")
    parser.add_argument("--bits", default="16,32")
    parser.add_argument("--kernels", default="fwd,dq,dkdv", help="of fwd, dq, dkdv")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", default="273,22223", help="image tokens of the timed shapes")
    parser.add_argument("--labels", type=int, default=200)
    parser.add_argument("--limit", type=int, default=None, help="time only the first N candidates")
    args = parser.parse_args()
    bits_list = [int(b) for b in args.bits.split(",")]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter dry run)"
    out = {"card": card, "torch": torch.__version__}
    tokens = tuple(int(t) for t in args.tokens.split(","))
    # dq/dkdv rows are timed as forward + backward with the forward's tile at its default
    for kernel_name in args.kernels.split(","):
        for bits in bits_list:
            default = alif_triton_tiles()[(kernel_name, bits)]
            _time_candidates(kernel_name, bits, CANDIDATES[:args.limit], out, args.device, tokens, args.labels)
            alif_triton_tiles()[(kernel_name, bits)] = default
    name = re.sub(r"[^A-Za-z0-9]+", "_", out["card"]).strip("_").lower()
    (out_dir / f"alif_tiles_{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    for key, val in out.items():
        if isinstance(val, dict) and val.get("best"):
            print(f"best {key}: {val['best']['tile']} {val['best']['ms']:.3f} ms err {val['best']['rel_err']}")


if __name__ == "__main__":
    main()
