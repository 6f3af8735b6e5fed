"""The short table that ends `benchmarks/gpu/run_all.sh`: every figure issue #18 asks for, read
back from the run's JSON files in one folder, next to its target.

`python -m rlipv2_scale.kernels.bench.gpu_summary DIR` reads `kernels_cuda_bf16.json`,
`kernels_cuda_fp32.json`, `msda_tiles_*.json`, `dispatch_table.json` and `gpu_step.json` (each
optional: a part that did not run is named as missing), prints the table and writes
`summary.md` and `summary.json` in DIR. It only reads what was measured: nothing is estimated.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ms(report: dict | None, op: str, case: str, backend: str) -> float | None:
    for r in (report or {}).get("results", []):
        if r["op"] == op and r["case"].startswith(case) and r["backend"] == backend:
            return r["fwdbwd_ms"]
    return None


def _floor(report: dict | None, op: str, case: str, backend: str) -> float | None:
    for r in (report or {}).get("results", []):
        if r["op"] == op and r["case"].startswith(case) and r["backend"] == backend:
            return r.get("floor_share_fwdbwd")
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or a == 0 else b / a


def _fmt(x: float | None, spec: str = ".3f", unit: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{unit}"


def summarize(out_dir: str | Path) -> dict:
    out = Path(out_dir)
    bench = {dt: _load(out / f"kernels_cuda_{dt}.json") for dt in ("bf16", "fp32")}
    tiles = next((_load(p) for p in sorted(out.glob("msda_tiles_*.json"))), None)
    step = _load(out / "gpu_step.json")
    table = _load(out / "dispatch_table.json")
    machine = next((r["machine"] for r in (*bench.values(), step) if r), {})
    checks = []   # (what, measured, target, met)

    def check(what: str, value: float | None, target: str, met: bool | None) -> None:
        checks.append(dict(what=what, value=value, target=target, met=met))

    bf = bench["bf16"]
    for dt, rep in bench.items():
        if rep is None:
            check(f"kernel benchmark {dt}", None, "ran", False)
    # ALIF, bf16: the fused block against SDPA at the original shape, against eager over all levels
    tri_o, sdpa_o = _ms(bf, "alif_bi_attention", "original", "triton"), _ms(bf, "alif_bi_attention", "original", "sdpa")
    r = _ratio(tri_o, sdpa_o)
    check("ALIF bf16 original: SDPA ms / Triton ms", r, ">= 1.3", None if r is None else r >= 1.3)
    tri_a, eager_a = _ms(bf, "alif_bi_attention", "all", "triton"), _ms(bf, "alif_bi_attention", "all", "eager")
    r = _ratio(tri_a, eager_a)
    check("ALIF bf16 all levels: eager ms / Triton ms", r, ">= 3", None if r is None else r >= 3)
    fp = bench["fp32"]
    eager32 = _ms(fp, "alif_bi_attention", "all", "eager")
    chosen = ((table or {}).get("devices", {}).get(machine.get("card", ""), {})
              .get("alif_bi_attention", {}).get("fp32", {}))
    pick = chosen.get(str(max((int(k) for k in chosen), default=0))) if chosen else None
    auto32 = _ms(fp, "alif_bi_attention", "all", {"torch": "sdpa"}.get(pick, pick)) if pick else None
    r = _ratio(auto32, eager32)
    check(f"ALIF fp32 all levels: eager ms / auto's choice ({pick}) ms", r, ">= 1 (never slower)",
          None if r is None else r >= 0.999)
    xf = _ms(bf, "alif_bi_attention", "original", "xformers")
    skipped = [s for s in (bf or {}).get("skipped", []) if s["backend"] == "xformers"]
    check("ALIF bf16 original: xformers ms" + (f" ({skipped[0]['error']})" if skipped else ""), xf, "runs",
          None if bf is None else xf is not None)
    # deformable attention: the better backward's share of the floor, the forward against the reference
    shares = {b: _floor(bf, "ms_deform_attn", "encoder", b) for b in ("triton", "triton_dense")}
    best = max((v for v in shares.values() if v is not None), default=None)
    check("MSDA bf16 encoder f+b: share of the compulsory-bytes floor (best backward)",
          None if best is None else 100 * best, ">= 15 %", None if best is None else best >= 0.15)
    fwd = {r["backend"]: r["fwd_ms"] for r in (bf or {}).get("results", [])
           if r["op"] == "ms_deform_attn" and r["case"] == "encoder"}
    r = _ratio(fwd.get("triton"), fwd.get("torch"))
    check("MSDA bf16 encoder forward: reference ms / Triton ms", r, ">= 15", None if r is None else r >= 15)
    # the training step
    for c in (step or {}).get("results", []):
        sp = c.get("speedup_vs_reference")
        check(f"step {c['config']}: images/s kernels (bf16) / reference (fp32)", sp, ">= 2",
              None if sp is None else sp >= 2)
    if step is None:
        check("training step (gpu_step.py)", None, "ran", False)
    summary = dict(machine=machine, checks=checks,
                   dispatch=(table or {}).get("devices", {}).get(machine.get("card", "")),
                   msda_dense_tiles=[t for t in (tiles or {}).get("tiles", []) if t.get("backward") == "dense_coarse"],
                   step=[dict(config=c["config"], **{k: r.get(k) for k in ("setup", "dtype", "batch", "images_per_s",
                                                                          "peak_gib", "error")})
                         for c in (step or {}).get("results", []) for r in c.get("setups", [])])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    return summary


def markdown(summary: dict) -> str:
    m = summary["machine"]
    lines = [f"card {m.get('card')}, driver {m.get('driver')}, torch {m.get('torch')}, Triton {m.get('triton')}, "
             f"CUDA {m.get('cuda')}, commit {str(m.get('commit'))[:12]}", "",
             "| measure | value | target | met |", "|---|---|---|---|"]
    for c in summary["checks"]:
        met = "–" if c["met"] is None else ("yes" if c["met"] else "NO")
        lines.append(f"| {c['what']} | {_fmt(c['value'], '.3g')} | {c['target']} | {met} |")
    if summary["step"]:
        lines += ["", "| config | setup | dtype | micro-batch | images/s | peak GiB |", "|---|---|---|---|---|---|"]
        for s in summary["step"]:
            lines.append(f"| {s['config']} | {s['setup']} | {s.get('dtype') or '–'} | {s.get('batch') or '–'} | "
                         f"{_fmt(s.get('images_per_s'), '.2f')} | {_fmt(s.get('peak_gib'), '.1f')} |"
                         + (f" {s['error']}" if s.get("error") else ""))
    if summary["msda_dense_tiles"]:
        best = min(summary["msda_dense_tiles"], key=lambda t: t["fwdbwd_ms"])
        lines += ["", f"dense MSDA backward, fastest setting: levels <= {best['dense_max_pixels']} px, tile "
                      f"{best['dense_tile']}: {best['fwdbwd_ms']:.3f} ms f+b"]
    if summary["dispatch"]:
        lines += ["", "dispatch table for this card: " + json.dumps(summary["dispatch"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else ".")
    print(markdown(summarize(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
