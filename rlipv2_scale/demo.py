"""`rlipv2 demo`: the first thing a new user runs, end to end on the synthetic world.

1. `synthesise`: train / val / test scenes (train and val without the held-out combinations),
2. `convert_shards`: each split to MDS shards with the same converter as real data (`--format synthetic`),
3. `write_tokenizer`: a byte-level BPE trained here on the label texts (nothing is downloaded),
4. `train`: the real trainer (`rlipv2 train recipes/demo/demo.yaml --nproc 2`: ZeRO-2 over two local
   ranks, ALIF, label sequences with negatives, progress bar, periodic validation),
5. `evaluate`: relation detection on the test scenes with the HICO-DET protocol on the synthetic
   label space (any class can be the subject): mAP over the test triplets seen in training and
   zero-shot mAP over the held-out ones, for the trained and for a randomly initialised model,
6. artefacts: `results.json`, `metrics.jsonl`, `loss_curve.png`, `predictions/*.png`, `model/`
   (a model directory for `rlipv2 predict` / `rlipv2 eval hico-det --checkpoint`).

`--compare` trains the ablation recipes (fusion off, ALIF on the last level, ALIF on all levels)
from the same data, keeping a checkpoint every `eval_every` steps, and plots each one's validation
mAP against steps in `compare.png`.

Layout of `--out`: `data/{split}/`, `shards/{split}/`, `tokenizer/`, `train/` (the run directory),
`model/`, `predictions/`, `results.json`, `metrics.jsonl`, `loss_curve.png`, `data_summary.json`,
and with `--compare` `compare/<recipe>/`, `compare.json`, `compare.png`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from rlipv2_scale.data.convert import ConvertSummary, convert
from rlipv2_scale.data.shards import iter_records
from rlipv2_scale.data.synthetic import (
    BASE_SIZE,
    CLASS_NAMES,
    HELD_OUT,
    HICO_FILE,
    PREDICATE_NAMES,
    SPLITS,
    SplitSummary,
    eval_label_space,
    write_split,
)
from rlipv2_scale.errors import UserError
from rlipv2_scale.labels.space import LabelSpace
from rlipv2_scale.models.build import load_pretrained
from rlipv2_scale.train.export import export_run, open_model

Log = Callable[[str], None]
# The trainer's periodic validation scores HICO-DET style (every predicted subject is the person
# class), so on this world it only credits person-subject triplets: a live progress signal, lower
# than the test mAP, which scores any subject class.
VALIDATION_PROTOCOL = "trainer hook, person-subject triplets only"
RECIPES = ("fusion_none", "alif_last_level", "alif_all_levels")   # the --compare ablation, in plot order


@dataclass(frozen=True)
class DemoPlan:
    train_images: int
    val_images: int
    test_images: int
    steps: int                 # optimizer steps
    eval_every: int            # periodic validation (and --compare checkpoints) every this many steps
    nproc: int = 2             # local ranks (ZeRO-2 over them); 8 images per step in all
    seed: int = 0              # synthetic world
    train_seed: int = 42       # weights, shuffling, negatives
    size: int = BASE_SIZE
    draw: int = 6              # test images drawn with their predictions

    def images(self, split: str) -> int:
        return {"train": self.train_images, "val": self.val_images, "test": self.test_images}[split]


FULL = DemoPlan(train_images=4000, val_images=200, test_images=500, steps=2000, eval_every=250)
QUICK = DemoPlan(train_images=256, val_images=32, test_images=64, steps=60, eval_every=30, draw=2)


def recipe_path(name: str = "demo") -> Path:
    """A recipe of `recipes/demo/` (installed with the package)."""
    path = Path(str(resources.files("rlipv2_scale.recipes").joinpath("demo", f"{name}.yaml")))
    if not path.is_file():
        raise UserError(f"demo recipe '{name}' not found at '{path}'")
    return path


# ---------------------------------------------------------------------------------------------- data
def synthesise(out: Path, plan: DemoPlan) -> dict[str, SplitSummary]:
    return {split: write_split(out / "data" / split, plan.images(split), seed=plan.seed, split=split, size=plan.size)
            for split in SPLITS}


def convert_shards(out: Path, workers: int = 1) -> dict[str, ConvertSummary]:
    summaries = {}
    for split in SPLITS:
        data = out / "data" / split
        summaries[split] = convert("synthetic", data / "scene_graphs.json", data, out / "shards" / split, split,
                                   workers=workers, strict=True, overwrite=True, progress=False)
    return summaries


def inspect_records(shards: Path, limit: int = 2) -> list[dict[str, Any]]:
    return [r.inspect_line() for r in iter_records(shards, limit=limit)]


def write_tokenizer(out: Path) -> Path:
    """A byte-level BPE trained on the world's label texts plus the packaged label corpus (so that
    new words at `rlipv2 predict` time split into familiar pieces)."""
    from rlipv2_scale.models.config import named_config
    from rlipv2_scale.models.text import build_local_tokenizer, default_label_corpus

    texts = list(CLASS_NAMES) + list(PREDICATE_NAMES) + ["no objects"] + default_label_corpus()
    build_local_tokenizer(texts, out, vocab_size=named_config("tiny").text.vocab_size)
    return out


# ---------------------------------------------------------------------------------------------- training
def train_overrides(out: Path, plan: DemoPlan, run_dir: Path, *, keep_checkpoints: bool = False) -> list[str]:
    """`key=value` overrides pointing a demo recipe at this run's data, tokenizer and plan."""
    over = [f"run.dir={run_dir}", f"model.text.tokenizer={out / 'tokenizer'}",
            f"data.sources=[{{name: synthetic, local: '{out / 'shards' / 'train'}'}}]",
            f"eval.data.sources=[{{name: val, local: '{out / 'shards' / 'val'}'}}]",
            f"data.batch_size={8 // plan.nproc}", f"train.max_steps={plan.steps}",
            f"train.seed={plan.train_seed}", f"data.seed={plan.train_seed}",
            f"optim.warmup_steps={max(1, min(50, plan.steps // 10))}"]
    if keep_checkpoints:
        # --compare scores every kept checkpoint afterwards with the test protocol (any subject
        # class) instead of the trainer's person-subject validation hook.
        over += [f"checkpoint.every_steps={plan.eval_every}", f"checkpoint.keep_last={plan.steps // plan.eval_every + 1}",
                 "eval.data=null"]
    else:
        over += [f"eval.every_steps={plan.eval_every}"]
    return over


def train(recipe: Path, overrides: list[str], run_dir: Path, nproc: int, log: Log) -> float:
    """`rlipv2 train RECIPE OVERRIDES --nproc N` (torchrun, local ranks); returns wall seconds."""
    from rlipv2_scale.train.launch import spawn_local

    argv = ["train", str(recipe), *overrides]
    log(f"  rlipv2 {' '.join(argv)} --nproc {nproc}")
    t0 = time.perf_counter()
    rc = spawn_local(nproc, argv, run_dir)
    if rc != 0 or not (run_dir / "COMPLETED").is_file():
        raise UserError(f"demo training failed (exit code {rc}); its output is above and its run directory is "
                        f"'{run_dir}'")
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- evaluation
def demo_label_space() -> LabelSpace:
    """The world's label space with any class as subject: "seen" = every test triplet that is not
    held out (the HICO-DET person-subject rule does not apply here)."""
    return dataclasses.replace(eval_label_space(), subject_index=None)


def predict_split(model: torch.nn.Module, split_dir: Path, split: str, size: int, progress: bool = True) -> list[dict]:
    """Predictions (community HICO-DET form) for every image of a synthesised split."""
    from rlipv2_scale.eval.files import read_json
    from rlipv2_scale.eval.triplet_nms import TripletNMS
    from rlipv2_scale.inference import RelationImages, predict
    from rlipv2_scale.models.postprocess import PostProcess

    space = demo_label_space()
    gt = read_json(split_dir / HICO_FILE[split], f"{split} annotations")
    dataset = RelationImages(gt, split_dir / "images", eval_size=size)
    # SGG scoring: the subject keeps its own class; triplet NMS as the original's evaluation.
    post = PostProcess(mode="sgg", valid=space.valid, top_k=100, nms=TripletNMS())
    preds = predict(model, dataset, space, post, batch_size=16, progress=progress)
    assert preds is not None
    return preds


def score(preds: list[dict], split_dir: Path, split: str) -> dict[str, Any]:
    """Relation mAP (percent) on seen and held-out triplets, HICO-DET protocol, plus per-triplet APs."""
    from rlipv2_scale.eval.files import read_json
    from rlipv2_scale.eval.hico import evaluate_hico

    gt = read_json(split_dir / HICO_FILE[split], f"{split} annotations")
    res = evaluate_hico(gt, preds, zero_shot="held-out", label_space=demo_label_space())

    def pct(v: float | None) -> float | None:
        return None if v is None else round(100.0 * v, 2)

    return {"relation_map": pct(res["mAP_seen"]), "zero_shot_relation_map": pct(res["mAP_unseen"]),
            "full_map": pct(res["mAP"]), "mean_max_recall": pct(res["mean_max_recall"]),
            "n_seen_triplets": res["n_seen"], "n_zero_shot_triplets": res["n_unseen"],
            "per_triplet": [{"triplet": " ".join((t["triplet"][0], t["triplet"][2], t["triplet"][1])),
                             "held_out": tuple(t["index"]) in set(demo_label_space().zero_shot_splits["held-out"]),
                             "n_gt": t["n_gt"], "ap": round(100.0 * t["ap"], 2)} for t in res["per_triplet"]]}


SPLIT_HINT = "give a split folder of the synthetic world (`rlipv2 demo`'s OUT/data/test, or `rlipv2 data synth " \
             "--split test --out DIR`)"


def split_of(split_dir: Path, split: str | None = None) -> str:
    """The split a synthesised folder holds (its `*_hico.json`), or `split` checked against it."""
    if not split_dir.is_dir():
        raise UserError(f"'{split_dir}' is not a folder; {SPLIT_HINT}")
    present = [s for s, name in HICO_FILE.items() if (split_dir / name).is_file()]
    if split is None and len(present) == 1:
        return present[0]
    if split is not None and split in present:
        return split
    if split is None and present:
        raise UserError(f"'{split_dir}' holds several splits ({', '.join(present)}): choose one with --split")
    wanted = HICO_FILE[split] if split else " or ".join(HICO_FILE.values())
    raise UserError(f"'{split_dir}' has no {wanted}: {SPLIT_HINT}")


def evaluate_split(source: str | os.PathLike, split_dir: Path, split: str | None = None,
                   eval_size: int | None = None, device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """`rlipv2 eval synthetic`: a model directory, run or checkpoint scored on a synthesised split
    exactly as `rlipv2 demo` scores its test scenes (the same two functions), loaded as every
    `rlipv2 eval` loads a model (device, Tagger refused, label space checked)."""
    from rlipv2_scale.inference import load_for_scoring
    from rlipv2_scale.models.artifacts import card_of
    from rlipv2_scale.train.export import as_model_dir

    split = split_of(split_dir, split)
    with as_model_dir(source) as model_dir:      # a run or checkpoint is exported for as long as it is used
        model, _ = load_for_scoring(model_dir, device, demo_label_space())
        size = eval_size or card_of(model).eval_size
        res = score(predict_split(model, split_dir, split, size, progress=progress), split_dir, split)
    return {"split": split, "eval_size": size, **res}


def random_init_model(run_dir: Path, seed: int) -> torch.nn.Module:
    """The demo's model with fresh random weights (the floor the trained model is compared with)."""
    from rlipv2_scale.models.build import build_model
    from rlipv2_scale.train.config import load_run_config

    cfg = load_run_config(run_dir / "config.yaml")
    torch.manual_seed(seed)
    return build_model(cfg.model, pretrained=False).eval()


def draw_examples(preds: list[dict], split_dir: Path, out: Path, n: int) -> list[Path]:
    """The first `n` test images that hold a held-out combination, then others, with predictions drawn."""
    from PIL import Image

    from rlipv2_scale.eval.files import read_json
    from rlipv2_scale.visualize import draw_relations, top_triplets

    space = demo_label_space()
    held = {(CLASS_NAMES.index(s) + 1, PREDICATE_NAMES.index(p) + 1, CLASS_NAMES.index(o) + 1) for s, p, o in HELD_OUT}
    gt = read_json(split_dir / HICO_FILE["test"], "test annotations")

    def holds_held_out(entry: dict) -> bool:
        cats = [a["category_id"] for a in entry["annotations"]]
        return any((cats[h["subject_id"]], h["category_id"], cats[h["object_id"]]) in held
                   for h in entry["hoi_annotation"])

    order = sorted(range(len(gt)), key=lambda i: not holds_held_out(gt[i]))[:n]
    by_name = {p["file_name"]: p for p in preds}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    written = []
    for i in order:
        name = gt[i]["file_name"]
        triplets = top_triplets(by_name[name], space.objects, space.verbs, object_ids=space.object_ids,
                                verb_ids=space.verb_ids, threshold=0.2, top=5)
        with Image.open(split_dir / "images" / name) as im:
            picture = draw_relations(im, triplets)
        path = out / f"{Path(name).stem}.png"
        picture.save(path)
        written.append(path)
    return written


def _machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (None, None, None)
    return {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "load_average_1min": load[0]}


MIN_LOSSES = 2     # `_loss_fell` compares the first logged losses with the last ones


def check_demo_steps(steps: int) -> None:
    """`--steps` gives `_loss_fell` its `MIN_LOSSES` losses: checked before the run, not after it.
    The trainer logs every `logging.every_steps` steps and at the last step."""
    from rlipv2_scale.train.config import load_run_config

    every = load_run_config(recipe_path("demo")).logging.every_steps
    least = (MIN_LOSSES - 1) * every + 1
    if steps < least:
        raise UserError(f"--steps must be at least {least} for the demo, got {steps}: it needs {MIN_LOSSES} logged "
                        f"losses to check that the loss fell, and its recipe logs the loss every {every} steps "
                        f"(logging.every_steps) and at the last step")


def _loss_fell(records: list[dict]) -> dict[str, float | bool]:
    losses = [r["loss"] for r in records if "loss" in r]
    if len(losses) < MIN_LOSSES:
        raise UserError("training logged fewer than two losses; raise the step count")
    k = max(1, len(losses) // 5)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    return {"loss_start": round(first, 4), "loss_end": round(last, 4), "loss_fell": last < first}


def results_table(res: dict[str, Any]) -> str:
    rows = [("", "trained", "random init"),
            ("relation mAP, seen combinations", res["relation_map"], res["random_init_relation_map"]),
            ("zero-shot mAP, held-out combinations", res["zero_shot_relation_map"],
             res["random_init_zero_shot_relation_map"])]

    def cell(v: Any) -> str:
        return v if isinstance(v, str) else ("-" if v is None else f"{v:.2f}")

    lines = [f"{a:<38}{cell(b):>10}{cell(c):>14}" for a, b, c in rows]
    lines.append(f"{res['steps']} steps, {res['images_seen']} training images seen, {res['train_seconds']:.0f} s of "
                 f"training, {res['seconds']:.0f} s in all on {res['machine']['cpus']} CPU core(s), "
                 f"{res['world_size']} rank(s)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the demo
DEMO_MARKER = ".rlipv2-demo"      # in every --out the demo writes: the folders it may replace are its own


def claim_out(out: Path) -> None:
    """The demo replaces its own sub-folders (data/, shards/, train/, ...) on a rerun: only in a new or
    empty folder, or one an earlier demo wrote (its marker, or an older demo's results.json)."""
    if out.is_dir() and any(out.iterdir()) and not (out / DEMO_MARKER).is_file():
        try:
            earlier = "plan" in json.loads((out / "results.json").read_text())
        except (OSError, ValueError, TypeError):
            earlier = False
        if not earlier:
            raise UserError(f"--out '{out}' is not empty and not a folder the demo wrote, whose sub-folders a run "
                            "replaces: give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).touch()


def prepare_data(out: Path, plan: DemoPlan, log: Log, workers: int | None = None) -> dict[str, Any]:
    for sub in ("data", "shards", "tokenizer"):          # only the folders this step writes
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"[1/5] synthesising the synthetic world (seed {plan.seed}, {plan.size} px) into {out / 'data'}")
    synth = synthesise(out, plan)
    for s in synth.values():
        log("  " + s.format().replace("\n", "\n  "))
    log("  held out of train/val (zero-shot): " + "; ".join(f"{s} {p} {o}" for s, p, o in HELD_OUT))

    log(f"[2/5] converting to MDS shards in {out / 'shards'} (rlipv2 data convert --format synthetic)")
    shards = convert_shards(out, workers=workers if workers is not None else min(2, os.cpu_count() or 1))
    for c in shards.values():
        log("  " + c.format().replace("\n", "\n  "))
    for line in inspect_records(out / "shards" / "train", limit=1):
        log("  first record: " + json.dumps(line))
    write_tokenizer(out / "tokenizer")
    summary = {"plan": asdict(plan), "seconds": round(time.perf_counter() - t0, 2),
               "synthesised": {k: asdict(v) for k, v in synth.items()},
               "shards": {k: v.to_dict() for k, v in shards.items()}}
    (out / "data_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _data_matches(out: Path, plan: DemoPlan) -> bool:
    """True when `out` holds the shards and tokenizer of this plan's world (same sizes and seed)."""
    summary = out / "data_summary.json"
    if not summary.is_file() or not (out / "tokenizer").is_dir():
        return False
    made = json.loads(summary.read_text())["plan"]
    return all(made.get(k) == getattr(plan, k) for k in ("train_images", "val_images", "test_images", "seed", "size"))


def run_demo(out: str | os.PathLike, quick: bool = False, plan: DemoPlan | None = None, log: Log = print,
             workers: int | None = None) -> dict[str, Any]:
    """The whole demo; returns (and writes) `results.json`'s content."""
    from rlipv2_scale.visualize import plot_training, read_metrics

    out = Path(out).resolve()
    claim_out(out)
    plan = plan or (QUICK if quick else FULL)
    t0 = time.perf_counter()
    for name in ("results.json", "metrics.jsonl", "loss_curve.png"):
        (out / name).unlink(missing_ok=True)
    prepare_data(out, plan, log, workers)

    run_dir = out / "train"
    shutil.rmtree(run_dir, ignore_errors=True)
    log(f"[3/5] pre-training RLIPv2 (tiny, ALIF on the last level) for {plan.steps} steps of 8 images on "
        f"{plan.nproc} rank(s), ZeRO-2; validation every {plan.eval_every} steps")
    train_seconds = train(recipe_path("demo"), train_overrides(out, plan, run_dir), run_dir, plan.nproc, log)
    shutil.copy(run_dir / "metrics.jsonl", out / "metrics.jsonl")
    records = read_metrics(out / "metrics.jsonl")

    log(f"[4/5] evaluating on {plan.test_images} test scenes (HICO-DET protocol, synthetic label space)")
    model_dir = export_run(run_dir, out / "model")
    model = load_pretrained(str(model_dir))
    test_dir = out / "data" / "test"
    preds = predict_split(model, test_dir, "test", plan.size)
    trained = score(preds, test_dir, "test")
    floor = score(predict_split(random_init_model(run_dir, plan.train_seed), test_dir, "test", plan.size),
                  test_dir, "test")

    log("[5/5] writing artefacts")
    plot_training(records, out / "loss_curve.png", title=f"rlipv2 demo: {plan.steps} steps",
                  val_label=f"validation mAP ({VALIDATION_PROTOCOL})")
    drawn = draw_examples(preds, test_dir, out / "predictions", plan.draw)
    (out / "test_predictions.json").write_text(json.dumps(preds))
    results: dict[str, Any] = {
        "relation_map": trained["relation_map"], "zero_shot_relation_map": trained["zero_shot_relation_map"],
        "random_init_relation_map": floor["relation_map"],
        "random_init_zero_shot_relation_map": floor["zero_shot_relation_map"],
        "full_map": trained["full_map"], "random_init_full_map": floor["full_map"],
        "steps": plan.steps, "images_seen": plan.steps * 8, "world_size": plan.nproc,
        "train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - t0, 1),
        **_loss_fell(records),
        "validation": [{k: v for k, v in r.items()} for r in records if "val/mAP" in r],
        "validation_protocol": VALIDATION_PROTOCOL,
        "per_triplet": trained["per_triplet"], "random_init_per_triplet": floor["per_triplet"],
        "held_out": [" ".join(t) for t in HELD_OUT], "plan": asdict(plan), "machine": _machine(),
        "artefacts": {"metrics": "metrics.jsonl", "loss_curve": "loss_curve.png", "model": "model",
                      "predictions": [str(p.relative_to(out)) for p in drawn],
                      "test_predictions": "test_predictions.json"},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    log(results_table(results))
    log(f"results in {out / 'results.json'}; pictures in {out / 'predictions'}; try the model on your own images: "
        f"rlipv2 predict IMAGE --checkpoint {out / 'model'} --objects \"{','.join(CLASS_NAMES[:4])}\" "
        f"--relations \"{','.join(PREDICATE_NAMES[:4])}\" --out {out / 'predict'}")
    return results


def run_compare(out: str | os.PathLike, quick: bool = False, plan: DemoPlan | None = None, log: Log = print,
                workers: int | None = None) -> dict[str, Any]:
    """Train each ablation recipe on the same data; validation mAP (seen triplets, val split) of
    every kept checkpoint against steps, in `compare.json` and `compare.png`."""
    from rlipv2_scale.train.checkpoint import read_trainer_state
    from rlipv2_scale.visualize import plot_curves

    out = Path(out).resolve()
    claim_out(out)
    plan = plan or (QUICK if quick else FULL)
    t0 = time.perf_counter()
    if _data_matches(out, plan):
        log(f"reusing the data in {out / 'data'} and {out / 'shards'}")
    else:
        prepare_data(out, plan, log, workers)
    val_dir = out / "data" / "val"
    curves: dict[str, list[tuple[int, float]]] = {}
    seconds: dict[str, float] = {}
    for name in RECIPES:
        run_dir = out / "compare" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        log(f"training {name} ({plan.steps} steps)")
        seconds[name] = round(train(recipe_path(name), train_overrides(out, plan, run_dir, keep_checkpoints=True),
                                    run_dir, plan.nproc, log), 1)
        points = []
        for ckpt in sorted((run_dir / "checkpoints").glob("step_*")):
            step = read_trainer_state(ckpt)["step"]
            res = score(predict_split(open_model(ckpt), val_dir, "val", plan.size, progress=False), val_dir, "val")
            points.append((step, res["relation_map"] or 0.0))
            log(f"  {name} step {step}: validation mAP {points[-1][1]:.2f}")
        curves[name] = points
    plot_curves(curves, out / "compare.png", title="validation relation mAP (seen triplets) vs steps")
    result = {"curves": {k: [{"step": s, "relation_map": m} for s, m in v] for k, v in curves.items()},
              "train_seconds": seconds, "seconds": round(time.perf_counter() - t0, 1), "plan": asdict(plan),
              "machine": _machine()}
    (out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    log(f"validation mAP against steps in {out / 'compare.png'} ({out / 'compare.json'})")
    return result

