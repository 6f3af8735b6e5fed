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
   VG-format split + the pseudo-labels, N steps each, scored on the demo's test scenes.

    python benchmarks/pseudo_label_proof.py                        # pipeline + precision / recall
    # + the pre-training comparison at the demo's scale (pseudo-labels outnumber the VG-format data,
    # as COCO + Objects365 outnumber VG); about 2 h on 2 CPU cores
    python benchmarks/pseudo_label_proof.py --out runs/pseudo_proof --vg-images 1000 --detection-images 3000 \
        --test-images 500 --tagger-steps 1500 --pretrain-steps 1500 --nproc 2
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

import torch

from rlipv2_scale.data.convert import convert
from rlipv2_scale.data.pseudo.paraphrases import ParaphraseTable
from rlipv2_scale.data.pseudo.parse import RuleBasedParser
from rlipv2_scale.data.pseudo.pipeline import (caption_shards, export_pseudo_labels, load_candidates, parse_shards,
                                               tag_shards)
from rlipv2_scale.data.pseudo.synthetic_captions import (NAME_PARAPHRASES, SyntheticCaptioner, TruthCaptioner,
                                                         canonical_predicate)
from rlipv2_scale.data.pseudo.quality import candidate_quality, tag_quality
from rlipv2_scale.data.pseudo.tag import TagConfig, read_tags
from rlipv2_scale.data.pseudo.tagger_scorer import TaggerScorer, load_tagger
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


def tag(out: Path, model: torch.nn.Module, name: str, size: int, only_candidate_texts: bool = False) -> Path:
    tags = out / name
    shutil.rmtree(tags, ignore_errors=True)
    scorer = TaggerScorer(model, list(CLASS_NAMES), eval_size=size, max_size=size)
    tag_shards(out / "shards" / "detection", out / "parse", scorer, tags,
               TagConfig(keep_threshold=0.05, only_candidate_texts=only_candidate_texts))
    return tags


# ------------------------------------------------------------------------------------------- pre-training
def pretrain_and_score(out: Path, sources: list[tuple[str, Path]], steps: int, nproc: int, seed: int,
                       size: int) -> dict[str, Any]:
    from rlipv2_scale.demo import predict_split, recipe_path, score, write_model_dir
    from rlipv2_scale.predict import load_model

    name = "+".join(n for n, _ in sources)
    run_dir = out / "pretrain" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    src = ", ".join(f"{{name: {n}, local: '{p}'}}" for n, p in sources)
    argv = ["train", str(recipe_path("demo")), f"run.dir={run_dir}", f"model.text.tokenizer={out / 'tokenizer'}",
            f"data.sources=[{src}]", f"eval.data.sources=[{{name: val, local: '{out / 'shards' / 'val'}'}}]",
            f"data.batch_size={8 // nproc}", f"train.max_steps={steps}", f"train.seed={seed}", f"data.seed={seed}",
            f"optim.warmup_steps={max(1, min(50, steps // 10))}", "eval.every_steps=0", "logging.progress=false"]
    t0 = time.perf_counter()
    cli(*argv, "--nproc", str(nproc))
    seconds = time.perf_counter() - t0
    model = load_model(write_model_dir(run_dir, out / "pretrain" / f"{name}_model"))
    test_dir = out / "data" / "test"
    res = score(predict_split(model, test_dir, "test", size, progress=False), test_dir, "test")
    return {"sources": name, "steps": steps, "train_seconds": round(seconds, 1),
            **{k: res[k] for k in ("relation_map", "zero_shot_relation_map", "full_map", "mean_max_recall")}}


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
        for t, v in res[key].items():
            lines.append(f"| {label} | {t} | {v['predicted']} | {v['correct']} | {v['precision']} | {v['recall']} |")
    lines += ["", f"Pseudo-labelled shards: {res['exported']['tags']} tags at confidence ≥ "
              f"{res['exported']['threshold']}: {res['pseudo_label_report']['relations_per_threshold'].get('0.2')} "
              f"relations.", "", f"Parsing: {json.dumps({k: v for k, v in res['parse'].items() if k != 'top_phrases'})}", ""]
    if res.get("pretraining"):
        lines += ["| pre-training data | steps | relation mAP | zero-shot mAP | full mAP |", "|---|---|---|---|---|"]
        for p in res["pretraining"]:
            lines.append(f"| {p['sources']} | {p['steps']} | {p['relation_map']} | {p['zero_shot_relation_map']} | "
                         f"{p['full_map']} |")
        if not any(p["full_map"] for p in res["pretraining"]):
            lines += ["", "Both runs score 0: too few steps for the model to detect anything, so this only checks the "
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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--export", choices=["candidate_texts", "all_texts"], default="candidate_texts",
                    help="which tags become the pseudo-labelled shards (at confidence 0.2)")
    ap.add_argument("--reuse-tagger", action="store_true", help="use --out's trained tagger if there is one")
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
        t = time.perf_counter()
        res["pretraining"] = pretraining(out, args, size)
        res["seconds"]["pretraining"] = round(time.perf_counter() - t, 1)
        res["plan"]["pretrain_steps"] = args.pretrain_steps
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
    trained_tags = tag(out, load_tagger(tagger_dir), "tags", size)
    timings["tagging"] = time.perf_counter() - t
    own_tags = tag(out, load_tagger(tagger_dir), "tags_candidate_texts", size, only_candidate_texts=True)
    untrained = load_tagger(tagger_dir)
    torch.manual_seed(args.seed)
    from rlipv2_scale.models.rlipv2 import build_model

    untrained = build_model(untrained.cfg, pretrained=False).eval()
    untrained_tags = tag(out, untrained, "tags_untrained", size)
    exported = own_tags if args.export == "candidate_texts" else trained_tags
    _, rep = export_pseudo_labels(out / "shards" / "detection", exported, out / "pseudo", "synthetic", 0.2)

    res: dict[str, Any] = {
        "plan": {"vg_images": args.vg_images, "detection_images": args.detection_images,
                 "test_images": args.test_images, "captions_per_image": args.captions,
                 "tagger_steps": args.tagger_steps, "tagger_batch": args.tagger_batch,
                 "pretrain_steps": args.pretrain_steps, "seed": args.seed, "image_size": size,
                 "tagger_steps_note": "reused from an earlier run of this script" if args.reuse_tagger else None},
        "truth_relations": sum(len(r) for _, r in truth.values()),
        "parse": parse,
        "candidates_all_accepted": candidate_quality(load_candidates(out / "parse"), relations(truth),
                                                     canonical_predicate),
        "trained_tagger": tag_quality(tagged(trained_tags), relations(truth), canonical_predicate, THRESHOLDS),
        "trained_tagger_candidate_texts": tag_quality(tagged(own_tags), relations(truth), canonical_predicate,
                                                      THRESHOLDS),
        "exported": {"tags": args.export, "threshold": 0.2},
        "untrained_tagger": tag_quality(tagged(untrained_tags), relations(truth), canonical_predicate, THRESHOLDS),
        "pseudo_label_report": rep,
        "pretraining": [],
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "platform": platform.platform()},
    }
    if args.pretrain_steps > 0:
        t = time.perf_counter()
        res["pretraining"] = pretraining(out, args, size)
        timings["pretraining"] = time.perf_counter() - t
    res["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    write(res, args.results, out)


def pretraining(out: Path, args: argparse.Namespace, size: int) -> list[dict[str, Any]]:
    """The same recipe, steps and seed on VG-format data alone and on VG-format data + pseudo-labels."""
    vg = ("vg", out / "shards" / "train")
    return [pretrain_and_score(out, [vg], args.pretrain_steps, args.nproc, 42 + args.seed, size),
            pretrain_and_score(out, [vg, ("pseudo", out / "pseudo" / "shards")], args.pretrain_steps, args.nproc,
                               42 + args.seed, size)]


def write(res: dict[str, Any], results: Path, out: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "pseudo_label_proof.json").write_text(json.dumps(res, indent=1) + "\n")
    text = markdown(res)
    (results / "pseudo_label_proof.md").write_text(text)
    log(text)
    log(f"work folder: {out}")


if __name__ == "__main__":
    main()
