"""Relational pseudo-labelling proved on the synthetic world, where the true relations are known.

1. The world: a VG-format split (scenes with their relations) and a *detection* split of other
   scenes, converted to shards that keep only the boxes and class names; the true relations of the
   detection split stay in this script, for the synthetic captioner and the scoring only.
2. The pipeline, exactly as on COCO / Objects365: synthetic captions (paraphrased names, predicate
   synonyms, dropped and wrong relations, extra clauses) → rule-based parsing with the world's
   paraphrase table → candidate chunks → the tiny Relation Tagger, trained on the VG-format split
   with `recipes/tagger/tiny.yaml` through the real trainer → tags (confidence ≥ 0.05) →
   pseudo-labelled shards (≥ 0.20).
3. Pseudo-label precision and recall against the hidden truth at 0.05 / 0.2 / 0.5 (free-form phrases
   mapped back with `canonical_predicate`; `rlipv2_scale.data.pseudo.quality`), next to: every candidate accepted (no Tagger), and an
   untrained Tagger (the same pipeline with random weights) — the Tagger's own contribution.
4. With `--pretrain-steps N`: the demo's pre-training on the VG-format split alone and on the
   VG-format split + the pseudo-labels (with `--box-control` also on the VG-format split + the
   detection split's boxes without relations: what the extra images alone bring), N steps each, the
   same batch and seeds (`--pretrain-seeds`), scored on the demo's test scenes.

    python benchmarks/pseudo_label_proof.py                        # pipeline + precision / recall
    # + the pre-training comparison: a small VG-format split and three times as many pseudo-labelled
    # scenes (as COCO + Objects365 outnumber VG), two seeds; about 1.5 h on 2 busy CPU cores
    python benchmarks/pseudo_label_proof.py --out runs/pseudo_proof --vg-images 400 --detection-images 1200 \
        --test-images 400 --tagger-steps 800 --pretrain-steps 1500 --nproc 2 --pretrain-seeds 0,1 \
        --box-control --skip-untrained
    # the comparison alone, reusing an earlier run's work folder and results
    python benchmarks/pseudo_label_proof.py --out runs/pseudo_proof --only-pretrain --pretrain-steps 1500 --nproc 2

Writes `benchmarks/results/pseudo_label_proof.{json,md}` and prints the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlipv2_scale.data.convert import convert
from rlipv2_scale.data.pseudo.paraphrases import ParaphraseTable
from rlipv2_scale.data.pseudo.parse import RuleBasedParser
from rlipv2_scale.data.pseudo.pipeline import (caption_shards, export_pseudo_labels, load_candidates, parse_shards,
                                               tag_shards)
from rlipv2_scale.data.pseudo.synthetic_captions import (NAME_PARAPHRASES, SyntheticCaptioner, TruthCaptioner,
                                                         canonical_predicate)
from rlipv2_scale.data.pseudo.quality import candidate_quality, tag_quality
from rlipv2_scale.data.pseudo.candidates import CandidateChunk
from rlipv2_scale.data.pseudo.tag import PairScorer, TagConfig, read_tags
from rlipv2_scale.data.pseudo.tagger_scorer import TaggerScorer, load_tagger
from rlipv2_scale.data.schema import RelationalRecord
from rlipv2_scale.data.shards import iter_records, write_shards
from rlipv2_scale.data.synthetic import CLASS_NAMES, write_split

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
THRESHOLDS = (0.05, 0.2, 0.5)
Truth = dict[str, tuple[list[str], list[tuple[int, int, str]]]]


def log(msg: str) -> None:
    print(msg, flush=True)


def cli(*args: str) -> None:
    """`rlipv2 ARGS` in a subprocess (the trainer sets up its own process group)."""
    proc = subprocess.run([sys.executable, "-m", "rlipv2_scale.cli", *args], cwd=ROOT, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if proc.returncode != 0:
        raise SystemExit(f"rlipv2 {' '.join(args)} failed with exit code {proc.returncode}")


# ------------------------------------------------------------------------------------------- world
def detection_split(out: Path, images: int, seed: int, size: int) -> Truth:
    """Scenes of a different seed → shards without relations; returns their hidden truth."""
    raw = out / "data" / "detection"
    write_split(raw, images, seed=seed, split="train", size=size)
    full = out / "shards" / "detection_full"
    convert("synthetic", raw / "scene_graphs.json", raw, full, "train", overwrite=True, progress=False)
    truth: Truth = {}
    records = []
    for rec in iter_records(full):
        truth[str(rec.image.id)] = ([o.name for o in rec.objects],
                                    [(r.subject, r.object, r.predicate) for r in rec.relations])
        records.append(dataclasses.replace(rec, relations=[], provenance={**rec.provenance, "detection_only": True}))
    write_shards(records, out / "shards" / "detection", overwrite=True)
    shutil.rmtree(full)
    return truth


# ------------------------------------------------------------------------------------------- scoring
def relations(truth: Truth) -> dict[str, list[tuple[int, int, str]]]:
    return {i: rels for i, (_, rels) in truth.items()}


def tagged(tags_dir: Path):
    return ((str(ann["image"]["id"]), rels) for ann, rels in read_tags(tags_dir))


# ------------------------------------------------------------------------------------------- tagger
def train_tagger(out: Path, steps: int, batch_size: int, seed: int) -> Path:
    run_dir = out / "tagger_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cli("data", "train-tagger", str(ROOT / "recipes" / "tagger" / "tiny.yaml"), f"run.dir={run_dir}",
        f"data.sources=[{{name: vg, local: '{out / 'shards' / 'train'}'}}]",
        f"model.text.tokenizer={out / 'tokenizer'}", f"train.max_steps={steps}", f"data.batch_size={batch_size}",
        f"train.seed={seed}", f"data.seed={seed}", f"checkpoint.every_steps={steps}", "logging.every_steps=25")
    cli("data", "export-tagger", str(run_dir), str(out / "tagger"))
    return out / "tagger"


class CachedScorer:
    """Remembers each chunk's scores, so that the two tagging modes (every text of the forward, each
    pair's own candidate texts), which differ only in which scores they keep, cost one forward."""

    def __init__(self, scorer: PairScorer):
        self.scorer = scorer
        self.cache: dict[tuple, np.ndarray] = {}

    def score(self, record: RelationalRecord, chunk: CandidateChunk) -> np.ndarray:
        key = (str(record.image.id), tuple(chunk.pairs), tuple(chunk.texts))
        if key not in self.cache:
            self.cache[key] = np.asarray(self.scorer.score(record, chunk))
        return self.cache[key]


def tagger_scorer(model: torch.nn.Module, size: int) -> CachedScorer:
    return CachedScorer(TaggerScorer(model, list(CLASS_NAMES), eval_size=size, max_size=size))


def tag(out: Path, scorer: PairScorer, name: str, only_candidate_texts: bool = False) -> Path:
    tags = out / name
    shutil.rmtree(tags, ignore_errors=True)
    tag_shards(out / "shards" / "detection", out / "parse", scorer, tags,
               TagConfig(keep_threshold=0.05, only_candidate_texts=only_candidate_texts))
    return tags


# ------------------------------------------------------------------------------------------- pre-training
def pretrain_and_score(out: Path, sources: list[tuple[str, Path]], steps: int, nproc: int, seed: int,
                       size: int, resume: bool = False) -> dict[str, Any]:
    """One pre-training run scored on the test scenes; with `resume`, a run that already completed
    (same folder, same steps) is only scored."""
    from rlipv2_scale.demo import recipe_path

    name = "+".join(n for n, _ in sources)
    run_dir = out / "pretrain" / f"{name}_seed{seed}"
    if resume and (run_dir / "COMPLETED").is_file() and f"max_steps: {steps}\n" in (run_dir / "config.yaml").read_text():
        log(f"scoring the completed run {run_dir}")
        return {"sources": name, "seed": seed, "steps": steps, "train_seconds": None,
                **test_scores(out, run_dir, f"{name}_seed{seed}", size)}
    shutil.rmtree(run_dir, ignore_errors=True)
    src = ", ".join(f"{{name: {n}, local: '{p}'}}" for n, p in sources)
    argv = ["train", str(recipe_path("demo")), f"run.dir={run_dir}", f"model.text.tokenizer={out / 'tokenizer'}",
            f"data.sources=[{src}]", f"eval.data.sources=[{{name: val, local: '{out / 'shards' / 'val'}'}}]",
            f"data.batch_size={8 // nproc}", f"train.max_steps={steps}", f"train.seed={seed}", f"data.seed={seed}",
            f"optim.warmup_steps={max(1, min(50, steps // 10))}", "eval.every_steps=0", "logging.progress=false"]
    t0 = time.perf_counter()
    cli(*argv, "--nproc", str(nproc))
    seconds = time.perf_counter() - t0
    return {"sources": name, "seed": seed, "steps": steps, "train_seconds": round(seconds, 1),
            **test_scores(out, run_dir, f"{name}_seed{seed}", size)}


def test_scores(out: Path, run_dir: Path, name: str, size: int) -> dict[str, float]:
    from rlipv2_scale.demo import predict_split, score, write_model_dir
    from rlipv2_scale.predict import load_model

    model = load_model(write_model_dir(run_dir, out / "pretrain" / f"{name}_model"))
    test_dir = out / "data" / "test"
    res = score(predict_split(model, test_dir, "test", size, progress=False), test_dir, "test")
    return {k: res[k] for k in ("relation_map", "zero_shot_relation_map", "full_map", "mean_max_recall")}


# ------------------------------------------------------------------------------------------- report
def markdown(res: dict[str, Any]) -> str:
    lines = ["# Pseudo-labelling on the synthetic world", "",
             f"VG-format split: {res['plan']['vg_images']} scenes; detection split (relations hidden): "
             f"{res['plan']['detection_images']} scenes, {res['truth_relations']} true relations; "
             f"{res['plan']['captions_per_image']} synthetic captions per image; tiny Tagger trained "
             f"{res['plan']['tagger_steps']} steps.", "",
             "| labels | threshold | predicted | correct | precision | recall |", "|---|---|---|---|---|---|"]
    c = res["candidates_all_accepted"]
    lines.append(f"| every candidate (no Tagger) | - | {c['predicted']} | {c['correct']} | {c['precision']} | "
                 f"{c['recall']} |")
    for label, key in (("trained Tagger, every text of the forward (original)", "trained_tagger"),
                       ("trained Tagger, each pair's own candidate texts", "trained_tagger_candidate_texts"),
                       ("untrained Tagger, every text", "untrained_tagger")):
        if res.get(key) is None:
            lines.append(f"| {label} | - | not run (--skip-untrained) | | | |")
            continue
        for t, v in res[key].items():
            lines.append(f"| {label} | {t} | {v['predicted']} | {v['correct']} | {v['precision']} | {v['recall']} |")
    exp = res["trained_tagger_candidate_texts" if res["exported"]["tags"] == "candidate_texts" else "trained_tagger"]
    exp = exp[str(res["exported"]["threshold"])]
    lines += ["", f"Pseudo-labelled shards: {res['exported']['tags']} tags at confidence ≥ "
              f"{res['exported']['threshold']}: {res['pseudo_label_report']['relations_per_threshold'].get('0.2')} "
              f"relations (phrases; synonyms of one pair count once above: {exp['predicted']} relations, "
              f"{exp['correct']} of them true).", "", f"Parsing: {json.dumps({k: v for k, v in res['parse'].items() if k != 'top_phrases'})}", ""]
    if res.get("pretraining"):
        lines += [f"Pre-training: the demo recipe, {res['plan']['pretrain_steps']} steps × 8 images, each mix with "
                  f"the same seeds, scored on the same {res['plan']['test_images']} test scenes. vg: the "
                  f"{res['plan']['vg_images']} VG-format scenes; vg+pseudo: plus the pseudo-labelled detection "
                  "scenes; vg+detection (control): plus the same detection scenes with their boxes and no "
                  "relations, every pair a negative (what the extra images bring without pseudo-labels).", "",
                  "| pre-training data | train seed | steps | relation mAP | zero-shot mAP | full mAP | mean max recall |",
                  "|---|---|---|---|---|---|---|"]
        for p in res["pretraining"]:
            lines.append(f"| {p['sources']} | {p.get('seed', '-')} | {p['steps']} | {p['relation_map']} | "
                         f"{p['zero_shot_relation_map']} | {p['full_map']} | {p['mean_max_recall']} |")
        by_mix: dict[str, list[dict[str, Any]]] = {}
        for p in res["pretraining"]:
            by_mix.setdefault(p["sources"], []).append(p)
        if any(len(v) > 1 for v in by_mix.values()):
            lines += ["", "| pre-training data | seeds | mean relation mAP | mean full mAP |", "|---|---|---|---|"]
            for n, v in by_mix.items():
                lines.append(f"| {n} | {len(v)} | {round(sum(p['relation_map'] for p in v) / len(v), 2)} | "
                             f"{round(sum(p['full_map'] for p in v) / len(v), 2)} |")
        if not any(p["full_map"] for p in res["pretraining"]):
            lines += ["", "Every run scores 0: too few steps for the model to detect anything, so this only checks the "
                      "path. Compare at the demo's step count (`--pretrain-steps 1500`)."]
    else:
        lines.append("Pre-training comparison: not run (`--pretrain-steps N`).")
    lines += ["", f"Machine: {res['machine']}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--vg-images", type=int, default=512)
    ap.add_argument("--detection-images", type=int, default=256)
    ap.add_argument("--test-images", type=int, default=128)
    ap.add_argument("--captions", type=int, default=10, help="synthetic captions per image")
    ap.add_argument("--tagger-steps", type=int, default=300)
    ap.add_argument("--tagger-batch", type=int, default=4)
    ap.add_argument("--pretrain-steps", type=int, default=0, help="0: skip the pre-training comparison")
    ap.add_argument("--nproc", type=int, default=1, help="ranks of each pre-training run")
    ap.add_argument("--seed", type=int, default=0, help="the synthetic world's seed")
    ap.add_argument("--pretrain-seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0],
                    help="comma-separated; pre-training runs use train/data seed 42 + each")
    ap.add_argument("--box-control", action="store_true",
                    help="also pre-train on VG-format data + the detection split's boxes without relations")
    ap.add_argument("--skip-untrained", action="store_true",
                    help="skip the untrained-Tagger baseline (a full extra tagging pass)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--export", choices=["candidate_texts", "all_texts"], default="candidate_texts",
                    help="which tags become the pseudo-labelled shards (at confidence 0.2)")
    ap.add_argument("--reuse-tagger", action="store_true", help="use --out's trained tagger if there is one")
    ap.add_argument("--resume", action="store_true",
                    help="with --only-pretrain: keep the results JSON's finished runs, score completed run folders")
    ap.add_argument("--only-pretrain", action="store_true",
                    help="reuse --out and the results JSON of an earlier run; run only the pre-training comparison")
    args = ap.parse_args()

    from rlipv2_scale.demo import DemoPlan, prepare_data

    out = (args.out or Path(tempfile.mkdtemp(prefix="pseudo_label_proof_"))).resolve()
    size = 128
    if args.only_pretrain:
        res = json.loads((args.results / "pseudo_label_proof.json").read_text())
        if args.out is None or not (out / "pseudo" / "shards").is_dir() or args.pretrain_steps <= 0:
            raise SystemExit("--only-pretrain needs --out of an earlier run (with its pseudo/shards) and --pretrain-steps")
        res["plan"]["pretrain_steps"] = args.pretrain_steps
        res["plan"]["pretrain_seeds"] = args.pretrain_seeds
        t = time.perf_counter()
        pretraining(out, args, size, res)
        res["seconds"]["pretraining"] = round(time.perf_counter() - t, 1)
        write(res, args.results, out)
        return
    timings: dict[str, float] = {}
    t = time.perf_counter()
    plan = DemoPlan(train_images=args.vg_images, val_images=32, test_images=args.test_images,
                    steps=max(args.pretrain_steps, 1), eval_every=max(args.pretrain_steps, 1), seed=args.seed)
    prepare_data(out, plan, lambda m: None, workers=1)        # train (VG-format) / val / test + tokenizer
    truth = detection_split(out, args.detection_images, seed=args.seed + 1000, size=size)
    timings["world"] = time.perf_counter() - t

    t = time.perf_counter()
    captioner = TruthCaptioner(truth, SyntheticCaptioner(num_captions=args.captions, seed=args.seed))
    shutil.rmtree(out / "captions", ignore_errors=True)
    cap = caption_shards(out / "shards" / "detection", out / "captions", captioner)
    parse_shards(out / "shards" / "detection", out / "captions", RuleBasedParser(ParaphraseTable(NAME_PARAPHRASES)),
                 out / "parse")
    parse = json.loads((out / "parse" / "parse_stats.json").read_text())
    timings["caption_parse"] = time.perf_counter() - t
    log(f"captioned {cap.captioned} images; parse: {json.dumps({k: v for k, v in parse.items() if k != 'top_phrases'})}")

    t = time.perf_counter()
    if args.reuse_tagger and (out / "tagger" / "model.safetensors").is_file():
        tagger_dir = out / "tagger"
        log(f"reusing the tagger in {tagger_dir}")
    else:
        tagger_dir = train_tagger(out, args.tagger_steps, args.tagger_batch, seed=42 + args.seed)
        timings["tagger_training"] = time.perf_counter() - t

    t = time.perf_counter()
    scorer = tagger_scorer(load_tagger(tagger_dir), size)
    trained_tags = tag(out, scorer, "tags")
    timings["tagging"] = time.perf_counter() - t
    own_tags = tag(out, scorer, "tags_candidate_texts", only_candidate_texts=True)
    del scorer
    untrained_quality = None
    if not args.skip_untrained:
        from rlipv2_scale.models.build import build_model

        torch.manual_seed(args.seed)
        untrained = build_model(load_tagger(tagger_dir).cfg, pretrained=False).eval()
        untrained_quality = tag_quality(tagged(tag(out, tagger_scorer(untrained, size), "tags_untrained")),
                                        relations(truth), canonical_predicate, THRESHOLDS)
    exported = own_tags if args.export == "candidate_texts" else trained_tags
    _, rep = export_pseudo_labels(out / "shards" / "detection", exported, out / "pseudo", "synthetic", 0.2)

    res: dict[str, Any] = {
        "plan": {"vg_images": args.vg_images, "detection_images": args.detection_images,
                 "test_images": args.test_images, "captions_per_image": args.captions,
                 "tagger_steps": args.tagger_steps, "tagger_batch": args.tagger_batch,
                 "pretrain_steps": args.pretrain_steps, "pretrain_seeds": args.pretrain_seeds, "seed": args.seed, "image_size": size,
                 "tagger_steps_note": "reused from an earlier run of this script" if args.reuse_tagger else None},
        "truth_relations": sum(len(r) for _, r in truth.values()),
        "parse": parse,
        "candidates_all_accepted": candidate_quality(load_candidates(out / "parse"), relations(truth),
                                                     canonical_predicate),
        "trained_tagger": tag_quality(tagged(trained_tags), relations(truth), canonical_predicate, THRESHOLDS),
        "trained_tagger_candidate_texts": tag_quality(tagged(own_tags), relations(truth), canonical_predicate,
                                                      THRESHOLDS),
        "exported": {"tags": args.export, "threshold": 0.2},
        "untrained_tagger": untrained_quality,
        "pseudo_label_report": rep,
        "pretraining": [],
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "platform": platform.platform()},
    }
    res["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    write(res, args.results, out)                  # the pipeline's figures, before the long part
    if args.pretrain_steps > 0:
        t = time.perf_counter()
        pretraining(out, args, size, res)
        res["seconds"]["pretraining"] = round(time.perf_counter() - t, 1)
        write(res, args.results, out)


def pretraining(out: Path, args: argparse.Namespace, size: int, res: dict[str, Any]) -> None:
    """The same recipe, steps, batch and seed on VG-format data alone and on VG-format data +
    pseudo-labels (and, with --box-control, on VG-format data + the detection split's boxes without
    relations: what the extra images alone bring), for each seed; results written after every run."""
    vg = ("vg", out / "shards" / "train")
    runs = [(seed, sources) for seed in args.pretrain_seeds
            for sources in ([vg], [vg, ("pseudo", out / "pseudo" / "shards")])]
    if args.box_control:                           # last: the comparison itself comes first
        runs += [(seed, [vg, ("detection", out / "shards" / "detection")]) for seed in args.pretrain_seeds]
    done = {(p["sources"], p["seed"], p["steps"]): p for p in res.get("pretraining", [])} if args.resume else {}
    res["pretraining"] = []
    for seed, sources in runs:
        key = ("+".join(n for n, _ in sources), 42 + seed, args.pretrain_steps)
        res["pretraining"].append(done.get(key) or pretrain_and_score(out, sources, args.pretrain_steps, args.nproc,
                                                                     42 + seed, size, resume=args.resume))
        write(res, args.results, out, quiet=True)


def write(res: dict[str, Any], results: Path, out: Path, quiet: bool = False) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "pseudo_label_proof.json").write_text(json.dumps(res, indent=1) + "\n")
    text = markdown(res)
    (results / "pseudo_label_proof.md").write_text(text)
    if quiet:
        log(f"pre-training so far: {json.dumps(res['pretraining'][-1])}")
        return
    log(text)
    log(f"work folder: {out}")


if __name__ == "__main__":
    main()
