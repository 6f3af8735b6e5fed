"""A first scaling study on the synthetic world: data size, fusion type, and ranks.

Three sweeps of the demo recipe (`recipes/demo/demo.yaml`: the tiny model, ALIF on the last
level) through `rlipv2 scale sweep`, each reported by `rlipv2 scale report`:

1. data fraction 10 / 30 / 100 % of the training scenes (the first k scenes of the shuffled world,
   written as shard folders of their own), the same number of steps for each: validation mAP
   against images seen;
2. fusion off / ALIF on the last level / ALIF on all levels (`model.alif.fusion`; the same values as
   the ablation recipes `recipes/demo/*.yaml`): validation mAP against images seen;
3. 1 → 2 local ranks (ZeRO-2, the same micro-batch per rank): images/s against ranks.

Validation mAP is the demo's relation mAP (`rlipv2 demo --compare`'s protocol: seen triplets of the
validation split, any subject class, HICO-DET scoring) of the kept checkpoints (every `score_every`
steps), scored after the run; the trainer's periodic hook credits person-subject triplets only,
which on this world is a small fraction of the relations. The ALIF-last-level run of the fusion study is the 100 % run of the
data-fraction study (the same recipe, data and seed), trained once. Profiles: `smoke` (the pipeline
end to end in minutes: too few steps for a learning curve), `quick` (a few hundred images seen per
run), `demo` (the demo's world and batch, 1500 steps per run on 2 ranks: five runs of ~6 minutes
each on 2 idle cores, ~12 under other jobs' load, plus checkpoint scoring) and `full` (the demo's
schedule, 2000 steps).

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
    score_every: int = 0       # score the kept checkpoints at multiples of this (0: every kept one)


PROFILES = {
    # What a 2-core machine under another job's load finishes in ~20 minutes: the pipeline end to end,
    # not yet a learning curve.
    "smoke": Profile(train_images=48, val_images=8, steps=8, eval_every=4, batch_size=2, nproc=1,
                     throughput_steps=6),
    "quick": Profile(train_images=160, val_images=24, steps=40, eval_every=10, batch_size=4, nproc=1,
                     throughput_steps=12),
    # The demo's world and batch (8 images per step over 2 ranks) with a shorter schedule: the
    # relation mAP is well above zero by 1500 steps and the curves separate.
    "demo": Profile(train_images=4000, val_images=200, steps=1500, eval_every=250, batch_size=4, nproc=2,
                    throughput_steps=60, score_every=500),
    "full": Profile(train_images=4000, val_images=200, steps=2000, eval_every=250, batch_size=4, nproc=2,
                    throughput_steps=200),
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
            f"optim.warmup_steps={max(1, min(50, steps // 10))}", "logging.progress=false", "eval.data=null",
            f"logging.every_steps={max(1, min(10, steps // 10))}"]
    if evaluate:       # every eval_every steps a checkpoint, kept and scored after the run
        over += [f"checkpoint.every_steps={p.eval_every}", f"checkpoint.keep_last={steps // p.eval_every + 1}",
                 "checkpoint.at_end=true"]
    else:
        over += ["checkpoint.at_end=false"]
    return over


def checkpoint_map(run_dir: Path, val_dir: Path, every: int = 0, log=print) -> list[tuple[int, float]]:
    """(images seen, validation relation mAP %) of the kept checkpoints of a run (those at multiples
    of `every`; all with 0), cached in `<run>/val_map.json` so that a resumed study does not score a
    run twice."""
    from rlipv2_scale.data.synthetic import BASE_SIZE
    from rlipv2_scale.demo import predict_split, score
    from rlipv2_scale.train.checkpoint import read_trainer_state
    from rlipv2_scale.train.export import open_model

    cache = run_dir / "val_map.json"
    if cache.is_file():
        return [tuple(x) for x in json.loads(cache.read_text())]
    points = []
    kept = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda c: read_trainer_state(c)["step"])
    for ckpt in kept:
        state = read_trainer_state(ckpt)
        if every and state["step"] % every:
            continue
        res = score(predict_split(open_model(ckpt), val_dir, "val", BASE_SIZE, progress=False), val_dir, "val")
        points.append((int(state["samples"]), float(res["relation_map"] or 0.0)))
        log(f"  {run_dir.name} step {state['step']}: validation relation mAP {points[-1][1]:.2f}")
    cache.write_text(json.dumps(points) + "\n")
    return points


def source(path: Path) -> str:
    return f"[{{name: synthetic, local: '{path}'}}]"


def run_study(profile: str, work: Path, out: Path, only: list[str], log=print) -> dict:
    from rlipv2_scale.demo import DemoPlan, prepare_data
    from rlipv2_scale.scale.report import collect, scaling_table, summarise_run, write_report
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
    full_run = work / "data_fraction" / "02_sources-train"      # the 100 % run: ALIF on the last level
    studies = {
        "data_fraction": (["data.sources=" + ",".join(source(fraction_shards(data, f)) for f in FRACTIONS)],
                          base_overrides(data, p, p.steps, True), p.nproc,
                          "Validation mAP against images seen for 10 / 30 / 100 % of the training scenes "
                          f"({', '.join(str(max(1, round(f * p.train_images))) for f in FRACTIONS)} scenes), "
                          f"{p.steps} steps each", []),
        "fusion": ([f"model.alif.fusion={','.join(f for f in FUSIONS if f != 'last_level')}"],
                   base_overrides(data, p, p.steps, True) + [f"data.sources={source(data / 'shards' / 'train')}"],
                   p.nproc, f"Validation mAP against images seen for fusion off / ALIF on the last level / ALIF on all "
                            f"levels, {p.steps} steps each (last level: the 100 % run of the data-fraction study)",
                   [full_run]),
        "ranks": (["nproc=1,2"], base_overrides(data, p, p.throughput_steps, False)
                  + [f"data.sources={source(data / 'shards' / 'train')}"], 1,
                  f"Images/s on 1 and 2 local CPU ranks (ZeRO-2, {p.batch_size} images per rank per step, one thread "
                  f"per rank), {p.throughput_steps} steps each", []),
    }
    for name, (axes, base, nproc, intro, borrowed) in studies.items():
        if only and name not in only:
            continue
        log(f"== {name}: {intro}")
        sweep = plan_sweep(RECIPE, axes, work / name, base, nproc=nproc)
        run_local(sweep, env=env, log=log)
        study_seconds = sum(r.seconds or 0.0 for r in sweep.runs)
        runs, notes = collect([work / name], allow_missing=True)
        for b in borrowed:
            if (b / "metrics.jsonl").is_file():
                extra = summarise_run(b, "01_fusion-last_level", {"model.alif.fusion": "last_level"}, p.nproc)
                runs.insert(1, extra)
            else:
                notes.append(f"{b.name}: not trained (run the data_fraction study first)")
        for r in runs:
            if name != "ranks":
                r.map_curve = checkpoint_map(Path(r.run_dir), data / "data" / "val", p.score_every, log=log)
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
            "scaling": scaling_table(runs) if name == "ranks" else None, "notes": notes,
            "seconds": round(study_seconds, 1)}
    summary["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                          "platform": platform.platform(), "load_average_1min_end": os.getloadavg()[0]}
    out.mkdir(parents=True, exist_ok=True)
    earlier = out / "study.json"
    if only and earlier.is_file():       # a partial invocation keeps the other studies of the same profile
        before = json.loads(earlier.read_text())
        if before.get("profile") == profile:
            kept = {k: v for k, v in before["studies"].items() if k not in summary["studies"]}
            summary["studies"] = {k: (summary["studies"].get(k) or kept[k])
                                  for k in ("data_fraction", "fusion", "ranks") if k in summary["studies"] or k in kept}
    summary["seconds"] = round(sum(st.get("seconds", 0.0) for st in summary["studies"].values()), 1)
    (out / "study.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "README.md").write_text(summary_markdown(summary))
    return summary


def summary_markdown(s: dict) -> str:
    p = s["plan"]
    lines = ["# A first scaling study on the synthetic world", "",
             f"Profile `{s['profile']}`: {p['train_images']} training / {p['val_images']} validation scenes, "
             f"{p['steps']} steps of {p['batch_size']} images per rank on {p['nproc']} rank(s) (one thread each), "
             f"validation mAP of the checkpoints every {p.get('score_every') or p['eval_every']} steps; "
             f"{s['seconds']:.0f} s of training runs in all on {s['machine']['cpus']} CPU core(s) "
             f"(1-min load average {s['machine']['load_average_1min_end']:.1f} at the end, shared with other work). "
             "Validation mAP: relation mAP on the validation split's seen triplets (any subject class, HICO-DET "
             "scoring) of each scored checkpoint.", ""]
    for name, st in s["studies"].items():
        lines += [f"## {name.replace('_', ' ')}", "", st["intro"] + f" ([report]({st['report']})).", "",
                  "| run | ranks | images seen | final loss | final mAP | best mAP | images/s |", "|---|---|---|---|---|---|---|"]
        for r in st["runs"]:
            f = lambda v, spec: "–" if v is None else format(v, spec)   # noqa: E731
            lines.append(f"| {r['label']} | {r['ranks']} | {r['images_seen']} | {f(r['final_loss'], '.3f')} | "
                         f"{f(r['final_map'], '.2f')} | {f(r['best_map'], '.2f')} | {f(r['images_per_s'], '.2f')} |")
        curves = [r for r in st["runs"] if r["map_curve"]]
        if curves:
            lines += ["", "Validation mAP against images seen:", ""]
            for r in curves:
                lines.append(f"- {r['label']}: " + ", ".join(f"{m:.1f} at {n / 1000:g}k" for n, m in r["map_curve"]))
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
