"""ALIF's convergence on the synthetic world, over seeds, through `rlipv2 demo --compare`.

The paper's claim: with ALIF, pre-training reaches comparable or better performance in a fraction
of the time. For each seed of `--seeds`, `rlipv2 demo --compare --out OUT --seed S --steps N
--eval-every E` trains the three ablation recipes of `recipes/demo/` (fusion off, ALIF on the
last level, ALIF on all levels; same data, same steps, same seed) and scores every kept checkpoint
on the validation scenes (relation mAP on seen triplets, any subject class). This script then:

- averages the curves over seeds (mean ± std at each number of images seen);
- finds the images each setting needs to reach fusion-off's final mAP (mean curves, linear between
  scored checkpoints; per seed too), and their ratio to fusion-off's (the claim: at most 1/3);
- measures, on every kept checkpoint, what fusion does to the image tokens and where the gradient
  goes, to explain the all-levels result with numbers: the ALIF gates (g_v, g_l) of each round; per
  feature level, how much a round rewrites the tokens it fuses (‖LN(v) − v‖ / ‖v‖: the block's
  LayerNorm replaces the residual stream of every fused token, and ‖g_v·ΔV‖ / ‖LN(v)‖: the text
  update); and the gradient norm of each part of the model on the same training batches.

    nice -n 19 python benchmarks/alif_convergence.py --out runs/alif_convergence \\
        --seeds 42,43,44 --steps 1500 --eval-every 150      # about an hour on 2 CPU cores

Writes `benchmarks/results/alif_convergence.{json,md}` and `alif_convergence.png` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RECIPES = ("fusion_none", "alif_last_level", "alif_all_levels")   # rlipv2_scale.demo.RECIPES
IMAGES_PER_STEP = 8                                                 # the demo's global batch
# Parameter groups for the gradient norms: first matching prefix wins (names of models/rlipv2.py).
GROUPS = (("alif", "encoder.fusion_layers."), ("alif_roberta", "encoder.roberta_layers."),
          ("encoder", "encoder."), ("backbone", "backbone."), ("backbone", "input_proj."),
          ("backbone", "level_embed"), ("text_encoder", "text_encoder."),
          ("decoders", ""))
COMMANDS: list[str] = []


def log(msg: str) -> None:
    print(msg, flush=True)


def cli(*args: str | Path) -> None:
    argv = [str(a) for a in args]
    COMMANDS.append("rlipv2 " + shlex.join(argv))
    log("$ " + COMMANDS[-1])
    proc = subprocess.run([sys.executable, "-m", "rlipv2_scale.cli", *argv], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if proc.returncode != 0:
        raise SystemExit(f"rlipv2 {shlex.join(argv)} failed with exit code {proc.returncode}")


# ------------------------------------------------------------------------------------------- diagnostics
def _group(name: str) -> str:
    return next(g for g, prefix in GROUPS if name.startswith(prefix))


def diagnose(checkpoint: Path, batches: list) -> dict[str, Any]:
    """Gates, per-level token rewrite and text update of each ALIF round, and per-group gradient
    norms, on the given training batches (mean over them), for one kept checkpoint."""
    from rlipv2_scale.models.alif import AlifEncoder
    from rlipv2_scale.models.losses import SetCriterion
    from rlipv2_scale.train.config import load_run_config
    from rlipv2_scale.train.export import open_model

    model = open_model(checkpoint)
    cfg = load_run_config(checkpoint.parent.parent / "config.yaml")
    criterion = SetCriterion(cfg.loss)
    encoder = next(m for m in model.modules() if isinstance(m, AlifEncoder))
    levels: dict[str, Any] = {}
    records: list[dict[str, list[float]]] = []

    def on_encoder(module, args, kwargs):
        levels["tokens"] = args[0].shape[1]                     # src [B, S, d]
        levels["start"] = args[4].tolist()                      # level_start_index

    def on_round(k):
        def hook(block, args, output):
            v, v_out = args[0].detach(), output[0].detach()
            with torch.no_grad():
                ln = block.layer_norm_v(v)
            gate_v, gate_l = (float(g.detach().abs().mean()) for g in block.gates())
            # A round fuses the last v.shape[1] tokens (AlifEncoder._fuse): the coarsest level or all.
            starts = [s - (levels["tokens"] - v.shape[1]) for s in levels["start"]] + [None]
            row = {"gate_v": gate_v, "gate_l": gate_l, "rewrite": [], "update": []}
            for lo, hi in zip(starts[:-1], starts[1:]):
                if hi is not None and hi <= 0:
                    row["rewrite"].append(None)                     # a level this round does not fuse
                    row["update"].append(None)
                    continue
                lo = max(lo, 0)
                sl = slice(lo, hi)
                row["rewrite"].append(float((ln[:, sl] - v[:, sl]).norm() / v[:, sl].norm()))
                row["update"].append(float((v_out[:, sl] - ln[:, sl]).norm() / ln[:, sl].norm()))
            records.append({"round": k, **row})
        return hook

    handles = [encoder.register_forward_pre_hook(on_encoder, with_kwargs=True)]
    handles += [b.register_forward_hook(on_round(k)) for k, b in enumerate(encoder.fusion_layers)]
    model.train()
    norms: dict[str, list[float]] = {}
    losses = []
    try:
        for i, batch in enumerate(batches):
            torch.manual_seed(i)                                    # the same dropout draws everywhere
            model.zero_grad(set_to_none=True)
            out = model(batch.images, batch.pixel_mask, batch.obj_texts, batch.rel_texts)
            loss = criterion(out, batch.targets)["loss"]
            loss.backward()
            losses.append(float(loss))
            sq: dict[str, float] = {}
            for name, p in model.named_parameters():
                if p.grad is not None:
                    sq[_group(name)] = sq.get(_group(name), 0.0) + float(p.grad.pow(2).sum())
            for g, v in sq.items():
                norms.setdefault(g, []).append(v ** 0.5)
    finally:
        for h in handles:
            h.remove()
    rounds = []
    for k in range(len(encoder.fusion_layers)):
        rs = [r for r in records if r["round"] == k]
        if not rs:
            continue
        n_levels = len(rs[0]["rewrite"])

        def mean(key: str, j: int) -> float | None:
            return None if rs[0][key][j] is None else round(statistics.mean(r[key][j] for r in rs), 4)

        rounds.append({"round": k, "gate_v": round(rs[0]["gate_v"], 4), "gate_l": round(rs[0]["gate_l"], 4),
                       "rewrite_per_level": [mean("rewrite", j) for j in range(n_levels)],
                       "update_per_level": [mean("update", j) for j in range(n_levels)]})
    return {"loss": round(statistics.mean(losses), 4), "rounds": rounds,
            "grad_norm": {g: round(statistics.mean(v), 5) for g, v in norms.items()}}


def diagnostic_batches(out: Path, count: int) -> list:
    """The first `count` training batches of 8 images of the demo's training split (fixed seed)."""
    from rlipv2_scale.data.streaming import build_train_loader
    from rlipv2_scale.demo import FULL, recipe_path, train_overrides
    from rlipv2_scale.train.config import load_run_config

    cfg = load_run_config(recipe_path("alif_all_levels"), train_overrides(out, FULL, out / "unused"))
    cfg.data.batch_size = IMAGES_PER_STEP
    batches = []
    for batch in build_train_loader(cfg.data):
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


# ------------------------------------------------------------------------------------------- summary
def mean_curve(curves: list[list[dict]]) -> list[dict]:
    steps = sorted({p["step"] for c in curves for p in c})
    rows = []
    for s in steps:
        v = [p["relation_map"] for c in curves for p in c if p["step"] == s]
        rows.append({"step": s, "images": s * IMAGES_PER_STEP, "mean": round(statistics.mean(v), 2),
                     "std": round(statistics.stdev(v), 2) if len(v) > 1 else None, "seeds": len(v)})
    return rows


def images_to_reach(points: list[tuple[int, float]], target: float) -> float | None:
    """Images seen when the curve first reaches `target` (linear between scored points; None if never)."""
    prev = (0, 0.0)
    for images, value in points:
        if value >= target:
            x0, y0 = prev
            return float(images) if value == y0 else x0 + (images - x0) * (target - y0) / (value - y0)
        prev = (images, value)
    return None


def summarise(per_seed: dict[str, dict[str, list[dict]]]) -> dict[str, Any]:
    curves = {r: mean_curve([per_seed[s][r] for s in per_seed]) for r in RECIPES}
    target = curves["fusion_none"][-1]["mean"]
    final_images = curves["fusion_none"][-1]["images"]
    reach: dict[str, Any] = {}
    for r in RECIPES:
        need = images_to_reach([(p["images"], p["mean"]) for p in curves[r]], target)
        per = []
        for s in per_seed:
            own = per_seed[s]["fusion_none"][-1]["relation_map"]
            per.append(images_to_reach([(p["step"] * IMAGES_PER_STEP, p["relation_map"]) for p in per_seed[s][r]], own))
        reach[r] = {"images": None if need is None else round(need),
                    "share_of_fusion_off": None if need is None else round(need / final_images, 3),
                    "per_seed_images": [None if x is None else round(x) for x in per],
                    "final_mean": curves[r][-1]["mean"], "final_std": curves[r][-1]["std"]}
    return {"target": target, "fusion_off_images": final_images, "curves": curves, "reach": reach}


def markdown(res: dict[str, Any]) -> str:
    s, p = res["summary"], res["plan"]
    lines = ["# ALIF's convergence on the synthetic world (`rlipv2 demo --compare`, 3 recipes × seeds)", "",
             f"Seeds {p['seeds']}, {p['steps']} steps × {IMAGES_PER_STEP} images, a checkpoint scored every "
             f"{p['eval_every']} steps on the {p['val_images']} validation scenes (relation mAP, seen triplets, any "
             "subject class). Mean ± std over seeds.", "",
             "| images seen | " + " | ".join(RECIPES) + " |", "|---|" + "---|" * len(RECIPES)]
    for i, row in enumerate(s["curves"]["fusion_none"]):
        cells = [f"{s['curves'][r][i]['mean']} ± {s['curves'][r][i]['std']}" for r in RECIPES]
        lines.append(f"| {row['images']} | " + " | ".join(cells) + " |")
    lines += ["", f"Images needed to reach fusion-off's final mean mAP ({s['target']} at {s['fusion_off_images']} "
              "images; linear between scored checkpoints):", "",
              "| recipe | final mAP | images to reach it | share of fusion-off's | per seed (own fusion-off final) |",
              "|---|---|---|---|---|"]
    for r in RECIPES:
        x = s["reach"][r]
        lines.append(f"| {r} | {x['final_mean']} ± {x['final_std']} | {x['images'] if x['images'] is not None else 'never'}"
                     f" | {x['share_of_fusion_off'] if x['share_of_fusion_off'] is not None else '–'} | "
                     f"{', '.join('never' if v is None else str(v) for v in x['per_seed_images'])} |")
    lines += ["", "What fusion does, at the last checkpoint (mean over seeds; per feature level, finest first):", "",
              "| recipe | round | gate g_v | gate g_l | ‖LN(v) − v‖ / ‖v‖ per level | ‖g_v·ΔV‖ / ‖LN(v)‖ per level |",
              "|---|---|---|---|---|---|"]
    for r in RECIPES[1:]:
        for rd in res["diagnostics_final"][r]["rounds"]:
            lines.append(f"| {r} | {rd['round']} | {rd['gate_v']} | {rd['gate_l']} | {_levels(rd['rewrite_per_level'])}"
                         f" | {_levels(rd['update_per_level'])} |")
    groups = sorted({g for r in RECIPES for g in res["diagnostics_final"][r]["grad_norm"]})
    lines += ["", "Gradient norm per part on the same training batches, at the first and last scored checkpoints "
              "(mean over seeds and batches):", "",
              "| recipe | checkpoint | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
    for r in RECIPES:
        for when in ("first", "final"):
            g = res[f"diagnostics_{when}"][r]["grad_norm"]
            lines.append(f"| {r} | {when} | " + " | ".join(str(g.get(k, "–")) for k in groups) + " |")
    lines += ["", "Commands run:", "", "```"] + res["commands"] + ["```", "", f"Machine: {res['machine']}", ""]
    return "\n".join(lines)


def _levels(values: list[float | None]) -> str:
    return " / ".join("–" if v is None else f"{v:.3f}" for v in values)


def mean_diagnostics(diags: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of `diagnose` results of the same recipe and checkpoint position."""
    def avg(values):
        values = [v for v in values if v is not None]
        return round(statistics.mean(values), 4) if values else None

    first = diags[0]
    rounds = []
    for k, rd in enumerate(first["rounds"]):
        rs = [d["rounds"][k] for d in diags]
        rounds.append({"round": rd["round"], "gate_v": avg(r["gate_v"] for r in rs),
                       "gate_l": avg(r["gate_l"] for r in rs),
                       "rewrite_per_level": [avg(r["rewrite_per_level"][j] for r in rs)
                                             for j in range(len(rd["rewrite_per_level"]))],
                       "update_per_level": [avg(r["update_per_level"][j] for r in rs)
                                            for j in range(len(rd["update_per_level"]))]})
    return {"rounds": rounds, "grad_norm": {g: avg(d["grad_norm"].get(g) for d in diags) for g in first["grad_norm"]},
            "loss": avg(d["loss"] for d in diags)}


def write(res: dict[str, Any], results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "alif_convergence.json").write_text(json.dumps(res, indent=1) + "\n")
    if "summary" in res:
        (results / "alif_convergence.md").write_text(markdown(res))


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in RECIPES:
        c = res["summary"]["curves"][r]
        x = [p["images"] for p in c]
        m = [p["mean"] for p in c]
        sd = [p["std"] or 0.0 for p in c]
        ax.plot(x, m, marker="o", label=r)
        ax.fill_between(x, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], alpha=0.2)
    ax.axhline(res["summary"]["target"], color="grey", lw=0.8, ls="--", label="fusion off, final")
    ax.set_xlabel("images seen")
    ax.set_ylabel("validation relation mAP (seen)")
    ax.set_title(f"mean ± std over seeds {res['plan']['seeds']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="work folder (the demo's data is made once, reused)")
    ap.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[42, 43, 44])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--diagnostic-batches", type=int, default=4)
    ap.add_argument("--resume", action="store_true", help="keep the seeds already in the results JSON")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    out = args.out.resolve()
    from rlipv2_scale.demo import FULL

    res: dict[str, Any] = {"plan": {"seeds": args.seeds, "steps": args.steps, "eval_every": args.eval_every,
                                    "train_images": FULL.train_images, "val_images": FULL.val_images,
                                    "diagnostic_batches": args.diagnostic_batches},
                           "per_seed": {}, "diagnostics": {}, "train_seconds": {},
                           "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                       "python": platform.python_version(), "platform": platform.platform()}}
    old = args.results / "alif_convergence.json"
    if args.resume and old.is_file():
        prev = json.loads(old.read_text())
        if {k: prev["plan"][k] for k in ("steps", "eval_every")} == {"steps": args.steps, "eval_every": args.eval_every}:
            for key in ("per_seed", "diagnostics", "train_seconds"):
                res[key] = {s: v for s, v in prev[key].items() if int(s) in args.seeds}
    for seed in args.seeds:
        if str(seed) in res["per_seed"]:
            log(f"seed {seed}: kept from {old}")
            continue
        t0 = time.perf_counter()
        cli("demo", "--compare", "--out", out, "--seed", seed, "--steps", args.steps, "--eval-every", args.eval_every)
        compare = json.loads((out / "compare.json").read_text())
        res["per_seed"][str(seed)] = compare["curves"]
        res["train_seconds"][str(seed)] = compare["train_seconds"]
        shutil.copy(out / "compare.json", out / f"compare_seed{seed}.json")
        batches = diagnostic_batches(out, args.diagnostic_batches)
        diag = {}
        for r in RECIPES:
            ckpts = sorted((out / "compare" / r / "checkpoints").glob("step_*"))
            diag[r] = {"first": diagnose(ckpts[0], batches), "final": diagnose(ckpts[-1], batches)}
            log(f"  {r}: {json.dumps(diag[r]['final'])}")
        res["diagnostics"][str(seed)] = diag
        log(f"seed {seed}: {time.perf_counter() - t0:.0f} s")
        write(res, args.results)
    res["plan"]["seeds"] = [int(s) for s in res["per_seed"]]
    res["summary"] = summarise(res["per_seed"])
    for when in ("first", "final"):
        res[f"diagnostics_{when}"] = {r: mean_diagnostics([d[r][when] for d in res["diagnostics"].values()])
                                     for r in RECIPES}
    res["commands"] = [c.replace(str(out), "OUT").replace(str(ROOT) + "/", "") for c in COMMANDS]
    write(res, args.results)
    plot(res, args.results / "alif_convergence.png")
    log(markdown(res))


if __name__ == "__main__":
    main()
