"""A first scaling study on the synthetic world: data size, fusion type, and ranks.

Three sweeps of the demo recipe (`recipes/demo/demo.yaml`: the tiny model, ALIF on the last
level) through `rlipv2 scale sweep`, each reported by `rlipv2 scale report`:

1. data fraction 10 / 30 / 100 % of the training scenes (the first k scenes of the shuffled world,
   written as shard folders of their own), the same number of steps for each: validation mAP
   against images seen;
2. fusion off / ALIF on the last level / ALIF on all levels (`model.alif.fusion`; the same values as
   the ablation recipes `recipes/demo/*.yaml`): validation mAP against images seen;
3. 1 → 2 local ranks (ZeRO-2, the same micro-batch per rank): images/s against ranks.

Validation mAP is the trainer's periodic hook (HICO-DET protocol on the validation split, which
credits person-subject triplets only on this world: a progress signal, lower than the demo's test
mAP). Profiles: `smoke` (the pipeline end to end in minutes: too few steps for a learning curve),
`quick` (a few hundred images seen per run: tens of minutes on 2 idle cores) and `full` (the demo's
data and schedule: hours on 2 cores).

    python benchmarks/scaling_study.py [--profile smoke|quick|full] [--work DIR] [--out benchmarks/results/scaling]

Writes `<out>/{data_fraction,fusion,ranks}/` (report.md, report.json, PNGs), `<out>/README.md`
(the summary) and `<out>/study.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "demo" / "demo.yaml"
FRACTIONS = (0.1, 0.3, 1.0)
FUSIONS = ("none", "last_level", "all_levels")


@dataclass(frozen=True)
class Profile:
    train_images: int
    val_images: int
    steps: int                 # optimizer steps of the data-fraction and fusion runs
    eval_every: int
    batch_size: int            # per rank
    nproc: int                 # ranks of the data-fraction and fusion runs
    throughput_steps: int      # steps of the 1 → 2 rank runs


PROFILES = {
    # What a 2-core machine under another job's load finishes in ~20 minutes: the pipeline end to end,
    # not yet a learning curve.
    "smoke": Profile(train_images=48, val_images=8, steps=8, eval_every=4, batch_size=2, nproc=1,
                     throughput_steps=6),
    "quick": Profile(train_images=160, val_images=24, steps=40, eval_every=10, batch_size=4, nproc=1,
                     throughput_steps=12),
    "full": Profile(train_images=4000, val_images=200, steps=1500, eval_every=250, batch_size=4, nproc=2,
                    throughput_steps=100),
}


def fraction_shards(data: Path, fraction: float) -> Path:
    """The first `fraction` of the training scenes as a shard folder of its own."""
    from rlipv2_scale.data.shards import iter_records, write_shards

    full = data / "shards" / "train"
    if fraction >= 1.0:
        return full
    out = data / "shards" / f"train_{round(100 * fraction)}pct"
    if not (out / "index.json").is_file():
        n = sum(1 for _ in iter_records(full))
        write_shards(iter_records(full, limit=max(1, round(fraction * n))), out, overwrite=True)
    return out


def base_overrides(data: Path, p: Profile, steps: int, evaluate: bool) -> list[str]:
    over = [f"model.text.tokenizer={data / 'tokenizer'}", f"data.batch_size={p.batch_size}", f"train.max_steps={steps}",
            f"optim.warmup_steps={max(1, min(50, steps // 10))}", "logging.progress=false", "checkpoint.at_end=false",
            f"logging.every_steps={max(1, min(10, steps // 10))}"]
    if evaluate:
        over += [f"eval.data.sources=[{{name: val, local: '{data / 'shards' / 'val'}'}}]",
                 f"eval.every_steps={p.eval_every}"]
    else:
        over += ["eval.data=null"]
    return over


def source(path: Path) -> str:
    return f"[{{name: synthetic, local: '{path}'}}]"


def run_study(profile: str, work: Path, out: Path, only: list[str], log=print) -> dict:
    from rlipv2_scale.demo import DemoPlan, prepare_data
    from rlipv2_scale.scale.report import collect, scaling_table, write_report
    from rlipv2_scale.scale.sweep import plan_sweep, run_local

    p = PROFILES[profile]
    data = work / "data"
    if not (data / "shards" / "train" / "index.json").is_file():
        log(f"synthesising {p.train_images} training and {p.val_images} validation scenes into {data}")
        prepare_data(data, DemoPlan(train_images=p.train_images, val_images=p.val_images, test_images=1,
                                    steps=p.steps, eval_every=p.eval_every), lambda s: None, workers=1)
    # One thread per rank: on a CPU that other work shares, OpenMP's spinning threads slow a run
    # by up to two orders of magnitude when the cores are oversubscribed.
    env = {"OMP_NUM_THREADS": "1"}
    summary: dict = {"profile": profile, "plan": p.__dict__, "studies": {}}
    train_seconds = 0.0        # of every run, also of runs an earlier invocation completed
    studies = {
        "data_fraction": (["data.sources=" + ",".join(source(fraction_shards(data, f)) for f in FRACTIONS)],
                          base_overrides(data, p, p.steps, True), p.nproc,
                          "Validation mAP against images seen for 10 / 30 / 100 % of the training scenes "
                          f"({', '.join(str(max(1, round(f * p.train_images))) for f in FRACTIONS)} scenes), "
                          f"{p.steps} steps each"),
        "fusion": ([f"model.alif.fusion={','.join(FUSIONS)}"],
                   base_overrides(data, p, p.steps, True) + [f"data.sources={source(data / 'shards' / 'train')}"],
                   p.nproc, f"Validation mAP against images seen for fusion off / ALIF on the last level / ALIF on all "
                            f"levels, {p.steps} steps each"),
        "ranks": (["nproc=1,2"], base_overrides(data, p, p.throughput_steps, False)
                  + [f"data.sources={source(data / 'shards' / 'train')}"], 1,
                  f"Images/s on 1 and 2 local CPU ranks (ZeRO-2, {p.batch_size} images per rank per step, one thread "
                  f"per rank), {p.throughput_steps} steps each"),
    }
    for name, (axes, base, nproc, intro) in studies.items():
        if only and name not in only:
            continue
        log(f"== {name}: {intro}")
        sweep = plan_sweep(RECIPE, axes, work / name, base, nproc=nproc)
        run_local(sweep, env=env, log=log)
        train_seconds += sum(r.seconds or 0.0 for r in sweep.runs)
        runs, notes = collect([work / name], allow_missing=True)
        for r in runs:
            # Readable labels, and no host paths in the committed report.
            if "data.sources" in r.values:
                pct = r.values["data.sources"].rsplit("train", 1)[-1].strip("_'}] ") or "100pct"
                r.values = {"data fraction": pct.replace("pct", " %")}
            r.run_dir = r.name
        machine = (f"Measured on {os.cpu_count()} CPU core(s) shared with other work (1-min load average "
                   f"{os.getloadavg()[0]:.1f} at the end), torch {torch.__version__}; profile `{profile}`.")
        paths = write_report(runs, out / name, title=f"Scaling study: {name.replace('_', ' ')}", notes=notes,
                             intro=f"{intro}. {machine}")
        summary["studies"][name] = {
            "intro": intro, "report": str(paths["report"].relative_to(out)),
            "runs": [{"name": r.name, "label": r.label, "ranks": r.world_size, "images_seen": r.images_seen,
                      "final_loss": r.final_loss, "final_map": r.final_map, "best_map": r.best_map,
                      "map_curve": r.map_curve, "images_per_s": r.images_per_s} for r in runs],
            "scaling": scaling_table(runs) if name == "ranks" else None, "notes": notes}
    summary["seconds"] = round(train_seconds, 1)
    summary["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                          "platform": platform.platform(), "load_average_1min_end": os.getloadavg()[0]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "README.md").write_text(summary_markdown(summary))
    return summary


def summary_markdown(s: dict) -> str:
    p = s["plan"]
    lines = ["# A first scaling study on the synthetic world", "",
             f"Profile `{s['profile']}`: {p['train_images']} training / {p['val_images']} validation scenes, "
             f"{p['steps']} steps of {p['batch_size']} images per rank on {p['nproc']} rank(s) (one thread each), "
             f"validation every "
             f"{p['eval_every']} steps; {s['seconds']:.0f} s of training runs in all on {s['machine']['cpus']} CPU core(s) "
             f"(1-min load average {s['machine']['load_average_1min_end']:.1f} at the end, shared with other work). "
             "Validation mAP: the trainer's hook (HICO-DET protocol; person-subject triplets only on this world). "
             "Re-run with `python benchmarks/scaling_study.py --profile full` for the demo's scale.", ""]
    for name, st in s["studies"].items():
        lines += [f"## {name.replace('_', ' ')}", "", st["intro"] + f" ([report]({st['report']})).", "",
                  "| run | ranks | images seen | final loss | final mAP | best mAP | images/s |", "|---|---|---|---|---|---|---|"]
        for r in st["runs"]:
            f = lambda v, spec: "–" if v is None else format(v, spec)   # noqa: E731
            lines.append(f"| {r['label']} | {r['ranks']} | {r['images_seen']} | {f(r['final_loss'], '.3f')} | "
                         f"{f(r['final_map'], '.2f')} | {f(r['best_map'], '.2f')} | {f(r['images_per_s'], '.2f')} |")
        if st["scaling"]:
            for t in st["scaling"]:
                if t["ranks"] > 1 and t["speedup"]:
                    lines += ["", f"1 → {t['ranks']} ranks: speed-up {t['speedup']:.2f}, efficiency "
                                  f"{t['efficiency']:.2f}."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    ap.add_argument("--work", help="data and run directories (default: a temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling"))
    ap.add_argument("--only", nargs="*", default=[], choices=["data_fraction", "fusion", "ranks"])
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="scaling_study_"))
    s = run_study(args.profile, work, Path(args.out), args.only, log=lambda m: print(m, flush=True))
    print(summary_markdown(s))


if __name__ == "__main__":
    main()
