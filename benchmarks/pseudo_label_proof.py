"""Relational pseudo-labelling on the synthetic world, through the commands the README prints.

1. The world: the demo's VG-format split (scenes with their relations; the Tagger trains on it) and
   tokenizer, and a *detection* split of other scenes: `rlipv2 data synth`, then `rlipv2 data
   convert --format synthetic` twice, once as rendered (the hidden truth, which only the synthetic
   captioner and the scorer read) and once from a copy of its scene graphs with every relation
   removed (`--keep-empty`: the boxes and class names a detection dataset gives).
2. The pipeline, each stage a `rlipv2` subprocess with its own output folder: `data caption
   --captioner synthetic` → `data parse --paraphrases synthetic` → `data train-tagger
   recipes/tagger/tiny.yaml` → `data export-tagger` → `data tag` → `data pseudo-label`. `data tag`
   runs once per lever (which texts a pair may take, merging synonymous wordings, top-k per pair),
   and `data pseudo-label` twice per lever: at the default threshold (the shards a user trains on)
   and at 0.05 (the curve: its shards filtered at each threshold equal the shards written there).
3. The scorer reads only the pseudo-labelled shards (`streaming.StreamingDataset`) and the hidden
   truth: a predicted relation is correct when its phrase is one of the world's wordings of the
   pair's true predicate; the wordings of one predicate on one pair count once, in precision and
   recall alike; a phrase of no predicate is wrong.
4. `--pretrain-steps N`: `rlipv2 train` with the demo recipe on the VG-format split alone, + the
   default lever's pseudo-labels, + the detection split with its hidden true relations (the
   ceiling), + the detection split's boxes alone (the box-only control), for each seed of
   `--pretrain-seeds`, then each run scored by `rlipv2 eval synthetic` on the demo's test scenes,
   the demo's own scoring (relation mAP on seen and held-out combinations; mean ± std over seeds;
   the share of the ceiling's gain the pseudo-labels reach, with a bootstrap interval over seeds).
   `--mixes` adds or picks mixes: also `vg+pseudo-weighted` (the pseudo-labels' confidence as the
   relation target, `data.confidence_weighted=true`), not run by default.
5. `--tagger-lengths 800,1600,2400`: the Tagger's training length as a lever: one longer Tagger run
   keeping a checkpoint every `--tagger-steps`, each length exported and run through `data tag` /
   `data pseudo-label` with the default options, scored as above (also by predicate); the mix
   `vg+pseudo-taggerN` pre-trains on its labels; with `--pseudo-thresholds`, `--mixes` may also name
   `vg+pseudoNN-taggerN`, its tags pseudo-labelled at threshold 0.NN (not run by default).
6. `--second-test` (with `--large-test N`): every run also scored on a second split of N other
   scenes; the two splits' difference, seed by seed, tells how much of the margin's spread over
   seeds is the test scenes drawn and how much is training (`spread_sources`).

    # precision / recall of every lever (about 40 min on 2 busy CPU cores, half of it the Tagger's
    # training; --reuse-tagger skips that on a second run in the same folder)
    nice -n 19 python benchmarks/pseudo_label_proof.py --out runs/pseudo_proof
    # + the pre-training comparison, reusing that work folder (26 runs of 4-6 min here), as the README
    nice -n 19 python benchmarks/pseudo_label_proof.py --out runs/pseudo_proof --only-pretrain --resume \\
        --pretrain-steps 1000 --pretrain-seeds 0,1,2 --nproc 2 --pseudo-thresholds 0.05 --large-test 512
    nice -n 19 python benchmarks/pseudo_label_proof.py --out runs/pseudo_proof --only-pretrain --resume \\
        --pretrain-steps 1000 --pretrain-seeds 0,1,2,3,4 --nproc 2 --pseudo-thresholds 0.05 --large-test 512 \\
        --mixes vg,vg+pseudo,vg+truth,vg+pseudo-weighted
    # the Tagger's training length: labels alone (--pretrain-steps 0), then pre-training on one
    nice -n 19 python benchmarks/pseudo_label_proof.py --out runs/pseudo_proof --only-pretrain --resume \\
        --pretrain-steps 0 --tagger-lengths 800,1600,2400
    nice -n 19 python benchmarks/pseudo_label_proof.py --out runs/pseudo_proof --only-pretrain --resume \\
        --pretrain-steps 2000 --pretrain-seeds 0,1,2,3,4 --nproc 2 --large-test 512 --pseudo-thresholds 0.05 \\
        --tagger-lengths 800,1600,2400 --mixes vg+pseudo-tagger1600
    # the best labels measured (the 1600-step Tagger's tags at 0.05), scored on both 512-scene splits
    nice -n 19 python benchmarks/pseudo_label_proof.py --out runs/pseudo_proof --only-pretrain --resume \\
        --pretrain-steps 2000 --pretrain-seeds 0,1,2,3,4 --nproc 2 --large-test 512 --second-test \\
        --pseudo-thresholds 0.05 --tagger-lengths 800,1600,2400 --mixes vg+pseudo05-tagger1600
    # the finished 2000-step runs scored on a second split of 512 scenes (no training: ~15 s a run)
    nice -n 19 python benchmarks/pseudo_label_proof.py --out runs/pseudo_proof --only-pretrain --resume \\
        --pretrain-steps 2000 --pretrain-seeds 0,1,2,3,4 --nproc 2 --large-test 512 --second-test \\
        --pseudo-thresholds 0.05 --tagger-lengths 800,1600,2400 \\
        --mixes vg,vg+pseudo,vg+truth,vg+pseudo05,vg+pseudo-tagger1600
    # ... and the 1000-step runs (in two calls, so that no run is trained for the seeds a mix lacks)
    nice -n 19 python benchmarks/pseudo_label_proof.py --out runs/pseudo_proof --only-pretrain --resume \\
        --pretrain-steps 1000 --pretrain-seeds 0,1,2 --nproc 2 --large-test 512 --second-test --pseudo-thresholds 0.05 \\
        --mixes vg,vg+pseudo,vg+truth,vg+detection,vg+pseudo05,vg+pseudo-weighted
    nice -n 19 python benchmarks/pseudo_label_proof.py --out runs/pseudo_proof --only-pretrain --resume \\
        --pretrain-steps 1000 --pretrain-seeds 0,1,2,3,4 --nproc 2 --large-test 512 --second-test \\
        --pseudo-thresholds 0.05 --mixes vg,vg+pseudo,vg+truth,vg+pseudo-weighted

Writes `benchmarks/results/pseudo_label_proof.{json,md}` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
DEFAULT_THRESHOLD = 0.2             # `rlipv2 data pseudo-label`'s default
SHARE_TARGET = 0.7                  # the share of the ceiling's gain the pseudo-labels should reach
LARGE_TEST_SEED = 2000              # the larger test split's scenes (the detection split's are 1000)
SECOND_TEST_SEED = 3000             # a second split of as many other scenes (`--second-test`)
METRICS = ("relation_map", "zero_shot_relation_map", "large_relation_map", "large_zero_shot_relation_map",
           "second_relation_map", "second_zero_shot_relation_map")
IMAGE_SIZE = 128

# Levers: the `rlipv2 data tag` options each one adds to the shared ones. "default" is the CLI's
# default (no option) and must stay the best of these on the synthetic world.
LEVERS: dict[str, list[str]] = {
    "all texts (original)": ["--texts", "all", "--no-use-captions", "--synonyms", "none", "--top-k", "0"],
    "candidate texts": ["--texts", "candidates", "--no-use-captions", "--top-k", "0"],
    "candidate texts, synonyms merged": ["--no-use-captions", "--synonyms", "synthetic", "--top-k", "0"],
    "candidate texts, top-1": ["--no-use-captions", "--top-k", "1"],
    "candidate texts, synonyms merged, top-2": ["--no-use-captions", "--synonyms", "synthetic", "--top-k", "2"],
    "captions weigh the Tagger, synonyms merged": ["--use-captions", "--synonyms", "synthetic"],
    "default (captions weigh the Tagger)": [],
}

COMMANDS: list[str] = []            # every rlipv2 command run, in order, for the results


def log(msg: str) -> None:
    print(msg, flush=True)


def record(*args: str | Path) -> None:
    """Lists `rlipv2 ARGS` with the commands run, for an output reused from an earlier call."""
    COMMANDS.append("rlipv2 " + shlex.join(str(a) for a in args))


def cli(*args: str | Path) -> str:
    """`rlipv2 ARGS` in a subprocess; returns its stdout."""
    argv = [str(a) for a in args]
    COMMANDS.append("rlipv2 " + shlex.join(argv))
    log("$ " + COMMANDS[-1])
    proc = subprocess.run([sys.executable, "-m", "rlipv2_scale.cli", *argv], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    sys.stdout.write(proc.stdout[-2000:])
    if proc.returncode != 0:
        raise SystemExit(f"rlipv2 {shlex.join(argv)} failed with exit code {proc.returncode}")
    return proc.stdout


# ------------------------------------------------------------------------------------------- world
def detection_world(out: Path, images: int, seed: int) -> tuple[Path, Path]:
    """(detection shards without relations, truth shards of the same scenes)."""
    raw = out / "data" / "detection"
    shutil.rmtree(raw, ignore_errors=True)
    cli("data", "synth", "--out", raw, "--images", images, "--seed", seed, "--size", IMAGE_SIZE, "--no-progress")
    truth = out / "shards" / "detection_truth"
    cli("data", "convert", "--format", "synthetic", "--annotations", raw / "scene_graphs.json", "--images", raw,
        "--out", truth, "--overwrite", "--no-progress")
    hidden = out / "data" / "detection_hidden"
    shutil.rmtree(hidden, ignore_errors=True)
    hidden.mkdir(parents=True)
    graphs = json.loads((raw / "scene_graphs.json").read_text())
    for g in graphs:
        g["relationships"] = []
    (hidden / "scene_graphs.json").write_text(json.dumps(graphs))
    shutil.copy(raw / "image_data.json", hidden / "image_data.json")
    detection = out / "shards" / "detection"
    cli("data", "convert", "--format", "synthetic", "--annotations", hidden / "scene_graphs.json", "--images", raw,
        "--out", detection, "--keep-empty", "--overwrite", "--no-progress")
    return detection, truth


# ------------------------------------------------------------------------------------------- scorer
def read_shards(path: Path) -> dict[str, dict]:
    """image id → annotation, read with plain mosaicml-streaming (nothing of the pipeline)."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(path), shuffle=False, batch_size=1)
    anns = {}
    for i in range(ds.num_samples):
        ann = ds.get_item(i)["annotation"]
        ann = json.loads(ann) if isinstance(ann, (str, bytes)) else ann
        anns[str(ann["image"]["id"])] = ann
    return anns


def world_wordings() -> dict[str, str]:
    """Each wording the synthetic captioner may write → the world's predicate (its definition)."""
    from rlipv2_scale.data.pseudo.synthetic_captions import PREDICATE_SYNONYMS

    return {w: pred for pred, words in PREDICATE_SYNONYMS.items() for w in words}


def true_relations(truth: dict[str, dict]) -> set[tuple]:
    """(image, subject, object, predicate) of every hidden true relation."""
    return {(i, r["subject"], r["object"], r["predicate"]) for i, ann in truth.items() for r in ann["relations"]}


def world_key(image: str, subject: int, obj: int, phrase: str, wording: dict[str, str]) -> tuple:
    """A predicted relation as `true_relations` names it: its phrase read as the world's predicate
    (a phrase of no predicate can match nothing)."""
    return image, subject, obj, wording.get(phrase, "?" + phrase)


def score_shards(pseudo: dict[str, dict], truth: dict[str, dict], thresholds=THRESHOLDS) -> dict[str, dict]:
    wording = world_wordings()
    true = true_relations(truth)
    best: dict[tuple, float] = {}
    for i, ann in pseudo.items():
        names = [o["name"] for o in truth[i]["objects"]]
        if [o["name"] for o in ann["objects"]] != names:
            raise SystemExit(f"image {i}: the pseudo-labelled objects differ from the truth's")
        for r in ann["relations"]:
            key = world_key(i, r["subject"], r["object"], r["predicate"], wording)
            best[key] = max(best.get(key, 0.0), r["confidence"] if r["confidence"] is not None else 1.0)
    out = {}
    for t in thresholds:
        pred = {k for k, c in best.items() if c >= t - 1e-9}
        hit = len(pred & true)
        pairs = {k[:3] for k in pred}
        out[str(t)] = {"predicted": len(pred), "correct": hit, "true": len(true), "pairs": len(pairs),
                       "relations_per_pair": round(len(pred) / len(pairs), 2) if pairs else None,
                       "precision": round(hit / len(pred), 4) if pred else None,
                       "recall": round(hit / len(true), 4) if true else None}
    return out


def label_errors(pseudo: dict[str, dict], truth: dict[str, dict]) -> dict[str, Any]:
    """What the pseudo-labels get wrong, by the world's predicate: true relations found and missed
    (a missed one trains as a negative), wrong labels on a pair that holds another predicate and
    on a pair that holds none (a wrong box of the right classes)."""
    wording, true = world_wordings(), true_relations(truth)
    holds = {key[:3] for key in true}
    predicted = {world_key(i, r["subject"], r["object"], r["predicate"], wording)
                 for i, ann in pseudo.items() for r in ann["relations"]}
    rows: dict[str, dict[str, int]] = {}
    for key in true | predicted:
        row = rows.setdefault(key[3], {"true": 0, "found": 0, "wrong_predicate": 0, "no_relation": 0})
        if key in true:
            row["true"] += 1
            row["found"] += key in predicted
        else:
            row["wrong_predicate" if key[:3] in holds else "no_relation"] += 1
    total = {k: sum(r[k] for r in rows.values()) for k in ("true", "found", "wrong_predicate", "no_relation")}
    return {"by_predicate": dict(sorted(rows.items())), "total": total}


def composing_labels(pseudo: dict[str, dict], truth: dict[str, dict]) -> dict[str, dict]:
    """Recall and precision, for each held-out combination, of the labels it can be composed from:
    relations of its predicate with its subject class or its object class (the detection scenes hold
    no held-out combination, `rlipv2_scale/data/synthetic.py`, so these are what zero-shot mAP
    learns from); "all": their union. Whether label quality explains a mix's zero-shot share."""
    from rlipv2_scale.data.synthetic import HELD_OUT

    wording, true = world_wordings(), true_relations(truth)
    names = {i: [o["name"] for o in ann["objects"]] for i, ann in truth.items()}
    predicted = {world_key(i, r["subject"], r["object"], r["predicate"], wording)
                 for i, ann in pseudo.items() for r in ann["relations"]}

    def parts(keys: set[tuple], combos) -> set[tuple]:
        return {k for k in keys for s, p, o in combos
                if k[3] == p and (names[k[0]][k[1]] == s or names[k[0]][k[2]] == o)}

    out = {}
    for label, combos in [*((" ".join(c), [c]) for c in sorted(HELD_OUT)), ("all", HELD_OUT)]:
        t, p = parts(true, combos), parts(predicted, combos)
        out[label] = {"true": len(t), "recall": round(len(t & p) / len(t), 2) if t else None,
                      "precision": round(len(t & p) / len(p), 2) if p else None}
    return out


def confidence_by_correctness(pseudo: dict[str, dict], truth: dict[str, dict]) -> dict[str, dict]:
    """Mean and quartiles of the written confidences of correct and of wrong pseudo-labels: whether
    the confidence could weigh the labels in training (`data.confidence_weighted`)."""
    wording, true = world_wordings(), true_relations(truth)
    groups: dict[str, list[float]] = {"correct": [], "wrong": []}
    for i, ann in pseudo.items():
        for r in ann["relations"]:
            key = world_key(i, r["subject"], r["object"], r["predicate"], wording)
            groups["correct" if key in true else "wrong"].append(r["confidence"])
    return {k: {"n": len(v), "mean": round(statistics.mean(v), 3),
                "quartiles": [round(q, 3) for q in statistics.quantiles(v, n=4)]}
            for k, v in groups.items() if len(v) > 1}


def candidate_ceiling(parse_dir: Path, truth: dict[str, dict]) -> dict:
    """Every (pair, own candidate text) accepted: the recall no tagging can exceed."""
    wording = world_wordings()
    cands = json.loads((parse_dir / "candidates.json").read_text())
    true = true_relations(truth)
    pred = {world_key(i, s, o, t, wording) for i, chunks in cands.items() for pairs, _, pair_texts in chunks
            for (s, o), texts in zip(pairs, pair_texts) for t in texts}
    hit = len(pred & true)
    return {"predicted": len(pred), "correct": hit, "true": len(true), "precision": round(hit / len(pred), 4),
            "recall": round(hit / len(true), 4)}


# ------------------------------------------------------------------------------------------- pipeline
def pipeline(out: Path, args: argparse.Namespace, detection: Path, truth_shards: Path) -> dict[str, Any]:
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    for sub in ("captions", "parse"):
        shutil.rmtree(out / sub, ignore_errors=True)
    cli("data", "caption", "--shards", detection, "--out", out / "captions", "--captioner", "synthetic",
        "--truth", truth_shards, "--num-captions", args.captions, "--seed", args.seed)
    cli("data", "parse", "--shards", detection, "--captions", out / "captions", "--paraphrases", "synthetic",
        "--out", out / "parse")
    seconds["caption_parse"] = time.perf_counter() - t

    t = time.perf_counter()
    tagger, run_dir, steps = out / "tagger", out / "tagger_run", args.tagger_steps
    train = tagger_training(out, args, run_dir, steps)
    if args.reuse_tagger and (tagger / "model.safetensors").is_file():
        if f"max_steps: {steps}\n" not in (run_dir / "config.yaml").read_text():
            raise SystemExit(f"--reuse-tagger: {run_dir} was not trained for {steps} steps")
        COMMANDS.append("# reused OUT/tagger, exported from an earlier run in this work folder of:")
        COMMANDS.append("# rlipv2 " + shlex.join(str(a) for a in train))
        COMMANDS.append("# rlipv2 " + shlex.join(["data", "export-tagger", str(run_dir), str(tagger)]))
        log(f"reusing the tagger in {tagger}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        cli(*train)
        shutil.rmtree(tagger, ignore_errors=True)
        cli("data", "export-tagger", run_dir, tagger)
        seconds["tagger_training"] = time.perf_counter() - t

    levers: dict[str, Any] = {}
    truth = read_shards(truth_shards)
    for name, options in LEVERS.items():
        if args.levers and name not in args.levers:
            continue
        slug = "default" if name.startswith("default") else name.split(" (")[0].replace(", ", "_").replace(" ", "-")
        levers[name] = label_lever(out, detection, truth, tagger, slug, options)
        s = levers[name]["shards_at_default"]
        log(f"{name}: precision {s['precision']} recall {s['recall']} at {DEFAULT_THRESHOLD}")
    return {"levers": levers, "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "truth_relations": sum(len(a["relations"]) for a in truth.values()),
            "parse": json.loads((out / "parse" / "parse_stats.json").read_text()),
            "candidates_all_accepted": candidate_ceiling(out / "parse", truth)}


def tagger_training(out: Path, args: argparse.Namespace, run_dir: Path, steps: int,
                    every: int | None = None) -> tuple[str | Path, ...]:
    """`rlipv2 data train-tagger` with the tiny recipe on the VG-format split, as the README runs it;
    `every`: also keep a checkpoint every that many steps (else only the last)."""
    keep = (f"checkpoint.keep_last={steps // every}",) if every else ()
    return ("data", "train-tagger", ROOT / "recipes" / "tagger" / "tiny.yaml", f"run.dir={run_dir}",
            f"data.sources=[{{name: vg, local: '{out / 'shards' / 'train'}'}}]",
            f"model.text.tokenizer={out / 'tokenizer'}", f"train.max_steps={steps}",
            f"data.batch_size={args.tagger_batch}", f"train.seed={42 + args.seed}", f"data.seed={42 + args.seed}",
            f"checkpoint.every_steps={every or steps}", *keep, "logging.every_steps=50")


def label_lever(out: Path, detection: Path, truth: dict[str, dict], tagger: Path, slug: str, options: list[str],
                reuse: bool = False) -> dict[str, Any]:
    """`rlipv2 data tag` with `options`, then `rlipv2 data pseudo-label` at the default threshold
    (the shards a user trains on) and at the curve's lowest, both scored against the hidden truth
    (`read_shards` of the truth shards). `reuse`: shards already written by these commands in this
    work folder are scored, not rewritten, and the result has no tagging time."""
    tags, pseudo, curve = out / "tags" / slug, out / "pseudo" / slug, out / "pseudo_curve" / slug
    tag = ("data", "tag", "--shards", detection, "--candidates", out / "parse", "--checkpoint", tagger,
           "--classes", "synthetic", "--eval-size", IMAGE_SIZE, "--max-size", IMAGE_SIZE, "--out", tags, *options)
    label = ("data", "pseudo-label", "--shards", detection, "--tags", tags, "--dataset", "synthetic")
    commands = [tag, (*label, "--out", pseudo), (*label, "--out", curve, "--threshold", min(THRESHOLDS))]
    timed: dict[str, float] = {}
    if reuse and all((d / "shards" / "index.json").is_file() for d in (pseudo, curve)):
        for argv in commands:
            record(*argv)
    else:
        for d in (tags, pseudo, curve):
            shutil.rmtree(d, ignore_errors=True)
        t = time.perf_counter()
        cli(*tag)
        timed["tag_seconds"] = round(time.perf_counter() - t, 1)
        cli(*commands[1])
        cli(*commands[2])
    at_default = score_shards(read_shards(pseudo / "shards"), truth, (DEFAULT_THRESHOLD,))
    return {"tag_options": options, **timed, "shards_at_default": at_default[str(DEFAULT_THRESHOLD)],
            "curve": score_shards(read_shards(curve / "shards"), truth)}


def tagger_length_lever(n: int) -> str:
    return f"default, Tagger trained {n} steps"


def longer_taggers(out: Path, args: argparse.Namespace, res: dict[str, Any]) -> None:
    """The Tagger's training length as a lever (`--tagger-lengths`): one Tagger run as long as the
    longest, with a checkpoint every `--tagger-steps`; each length's checkpoint exported (`rlipv2 data
    export-tagger RUN/checkpoints/step_N`), tagged with the default options and pseudo-labelled like a
    lever (slug `default_taggerN`); the mix `vg+pseudo-taggerN` pre-trains on its labels."""
    if not args.tagger_lengths:
        return
    if any(n <= 0 or n % args.tagger_steps for n in args.tagger_lengths):
        raise SystemExit(f"--tagger-lengths: each must be a multiple of --tagger-steps ({args.tagger_steps}), "
                         f"the interval the run keeps checkpoints at; got {args.tagger_lengths}")
    longest, first = max(args.tagger_lengths), len(COMMANDS)
    run_dir = out / f"tagger_run_{longest}steps"
    train = tagger_training(out, args, run_dir, longest, every=args.tagger_steps)
    if args.resume and (run_dir / "COMPLETED").is_file():
        record(*train)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        cli(*train)
    detection, truth = out / "shards" / "detection", read_shards(out / "shards" / "detection_truth")
    # The relation loss the run logged at each length (its training batches): how far it had come.
    logged = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "loss_rel" in r}
    res.setdefault("tagger_length_label_errors", {})
    for n in sorted(args.tagger_lengths):
        tagger = out / f"tagger_{n}steps"
        export = ("data", "export-tagger", run_dir / "checkpoints" / f"step_{n:08d}", tagger)
        done = args.resume and (tagger / "model.safetensors").is_file()
        if done:
            record(*export)
        else:
            shutil.rmtree(tagger, ignore_errors=True)
            cli(*export)
        lever = label_lever(out, detection, truth, tagger, f"default_tagger{n}", [], reuse=done)
        # Over the earlier record: a reused lever keeps the tagging time measured when it ran.
        res["levers"][tagger_length_lever(n)] = {**res["levers"].get(tagger_length_lever(n), {}), **lever,
                                                 "tagger_steps": n,
                                                 "tagger_relation_loss": round(logged[n]["loss_rel"], 3)
                                                 if n in logged else None}
        res["tagger_length_label_errors"][str(n)] = label_errors(
            read_shards(out / "pseudo" / f"default_tagger{n}" / "shards"), truth)
        s = lever["shards_at_default"]
        log(f"{tagger_length_lever(n)}: precision {s['precision']} recall {s['recall']} at {DEFAULT_THRESHOLD}")
    res["commands"] = list(dict.fromkeys(res.get("commands", []) + portable(COMMANDS[first:], out)))
    del COMMANDS[first:]


# ------------------------------------------------------------------------------------------- pre-training
def pretraining(out: Path, args: argparse.Namespace, res: dict[str, Any]) -> None:
    """The demo recipe, the same steps, batch and seeds, on VG-format data alone, + the default
    lever's pseudo-labels, + the detection scenes with their true relations (the ceiling), + the
    detection scenes' boxes alone (the control); each run scored on the demo's test scenes. Results are written after every run."""
    from rlipv2_scale.demo import recipe_path

    vg = ("vg", out / "shards" / "train")
    pseudo = ("pseudo", out / "pseudo" / "default" / "shards")
    # (name, sources, extra overrides). Last of the four, the box-only control: the same detection
    # scenes with their boxes and no relations (every pair a negative), i.e. what the extra images
    # bring without any relation label.
    mixes: list[tuple[str, list[tuple[str, Path]], list[str]]] = [
        ("vg", [vg], []), ("vg+pseudo", [vg, pseudo], []),
        ("vg+truth", [vg, ("truth", out / "shards" / "detection_truth")], []),
        ("vg+detection", [vg, ("detection", out / "shards" / "detection")], [])]
    # The same tags at other thresholds (`--pseudo-thresholds`): recall against precision in pre-training.
    for t in args.pseudo_thresholds:
        name = f"pseudo{round(100 * t):02d}"
        mixes.append((f"vg+{name}", [vg, (name, labels_at(out, "default", t, args.resume))], []))
    # The default options' pseudo-labels from a Tagger trained longer (`--tagger-lengths`, `longer_taggers`).
    for n in args.tagger_lengths:
        mixes.append((f"vg+pseudo-tagger{n}", [vg, (f"tagger{n}", out / "pseudo" / f"default_tagger{n}" / "shards")], []))
    # Both: a longer Tagger's tags at another threshold (`vg+pseudoNN-taggerN`), only when --mixes names it.
    combined = []
    for n in args.tagger_lengths:
        for t in args.pseudo_thresholds:
            name = f"pseudo{round(100 * t):02d}-tagger{n}"
            combined.append(f"vg+{name}")
            wanted = f"vg+{name}" in (args.mixes or [])
            mixes.append((f"vg+{name}", [vg, (name, labels_at(out, f"default_tagger{n}", t, args.resume, wanted))], []))
    # The default pseudo-labels with their confidence as the relation target instead of 1
    # (`data.confidence_weighted`; the VG-format relations, without a confidence, stay 1).
    mixes.append(("vg+pseudo-weighted", [vg, pseudo], ["data.confidence_weighted=true"]))
    labels, truth = read_shards(pseudo[1]), read_shards(out / "shards" / "detection_truth")
    res["default_label_confidence"] = confidence_by_correctness(labels, truth)
    res["default_label_errors"] = label_errors(labels, truth)
    # The labels of every pseudo-labelled mix (weighted: the default's), where its shards exist.
    res["composing_labels"] = {name: composing_labels(read_shards(src[1][1]), truth) for name, src, extra in mixes
                               if name.startswith("vg+pseudo") and not extra
                               and (src[1][1] / "index.json").is_file()}
    order = [name for name, _, _ in mixes]
    if args.mixes:
        unknown = set(args.mixes) - set(order)
        if unknown:
            raise SystemExit(f"--mixes: no mix named {sorted(unknown)}; the mixes are {', '.join(order)}")
    by_default = [n for n in order if n != "vg+pseudo-weighted" and n not in combined]
    chosen = [m for m in mixes if m[0] in (args.mixes or by_default)]
    # With --resume, finished runs stay in the results, also those outside this call's seeds or mixes.
    runs = res.get("pretraining", []) if args.resume else []
    done = {(p["sources"], p["seed"], p["steps"]) for p in runs}
    res["pretraining"] = runs
    large = test_split(out, "test", args.large_test, LARGE_TEST_SEED) if args.large_test else None
    second = test_split(out, "second_test", args.large_test, SECOND_TEST_SEED) if args.second_test else None
    if args.rescore:
        for r in runs:
            r.update(test_scores(out, run_dir_of(out, r["sources"], r["seed"], r["steps"]), large, second))
        write(res, args.results, out, quiet=True)
    for seed in args.pretrain_seeds:
        for name, sources, overrides in chosen:
            run_dir = run_dir_of(out, name, 42 + seed, args.pretrain_steps)
            src = ", ".join(f"{{name: {n}, local: '{p}'}}" for n, p in sources)
            argv = ["train", recipe_path("demo"), f"run.dir={run_dir}", f"model.text.tokenizer={out / 'tokenizer'}",
                    f"data.sources=[{src}]", f"eval.data.sources=[{{name: val, local: '{out / 'shards' / 'val'}'}}]",
                    f"data.batch_size={8 // args.nproc}", f"train.max_steps={args.pretrain_steps}",
                    f"train.seed={42 + seed}", f"data.seed={42 + seed}",
                    f"optim.warmup_steps={max(1, min(50, args.pretrain_steps // 10))}", "eval.every_steps=0",
                    "logging.progress=false", *overrides, "--nproc", args.nproc]
            if (name, 42 + seed, args.pretrain_steps) in done:   # the record lists every run
                record(*argv)
                if not args.rescore:
                    kept = next(r for r in runs if (r["sources"], r["seed"], r["steps"]) ==
                                (name, 42 + seed, args.pretrain_steps))
                    for prefix, eval_argv, scores in eval_commands(out, run_dir, large, second):
                        # A finished run's scores on a split added later (`--second-test`) are made now.
                        (record if scores.is_file() else cli)(*eval_argv)
                        if prefix + "held_out_ap" not in kept:     # a record older than the key or the split
                            kept.update({k: v for k, v in read_scores(prefix, scores).items() if k not in kept})
                continue
            shutil.rmtree(run_dir, ignore_errors=True)
            t = time.perf_counter()
            cli(*argv)
            train_s = time.perf_counter() - t
            runs.append({"sources": name, "seed": 42 + seed, "steps": args.pretrain_steps,
                         "train_seconds": round(train_s, 1), **test_scores(out, run_dir, large, second)})
            runs.sort(key=lambda r: (r["seed"], order.index(r["sources"]) if r["sources"] in order else len(order)))
            write(res, args.results, out, quiet=True)
    earlier = res.get("pretraining_commands", []) if args.resume else []
    res["pretraining_commands"] = list(dict.fromkeys(portable(earlier + COMMANDS, out)))


def labels_at(out: Path, slug: str, threshold: float, resume: bool, write: bool = True) -> Path:
    """The shards of `rlipv2 data pseudo-label` on the tags OUT/tags/SLUG at `threshold`
    (OUT/pseudo/SLUG_pseudoNN/shards): written when `write`, kept as they are with `resume`."""
    shards = out / "pseudo" / f"{slug}_pseudo{round(100 * threshold):02d}"
    argv = ["data", "pseudo-label", "--shards", out / "shards" / "detection", "--tags", out / "tags" / slug,
            "--out", shards, "--dataset", "synthetic", "--threshold", threshold]
    if write:
        (record if resume and (shards / "shards" / "index.json").is_file() else cli)(*argv)
    return shards / "shards"


def run_dir_of(out: Path, mix: str, seed: int, steps: int) -> Path:
    return out / "pretrain" / f"{mix}_seed{seed}_{steps}steps"


def eval_commands(out: Path, run_dir: Path, large: Path | None = None,
                  second: Path | None = None) -> list[tuple[str, list, Path]]:
    """(key prefix, `rlipv2 eval synthetic` arguments, JSON written) on the demo's test scenes and,
    when given, on the larger test split `large` and its replicate `second`."""
    splits = [("", out / "data" / "test", "test_scores.json")] + (
        [("large_", large, "test_scores_large.json")] if large else []) + (
        [("second_", second, "test_scores_second.json")] if second else [])
    return [(prefix, ["eval", "synthetic", "--checkpoint", run_dir, "--data", split, "--eval-size", IMAGE_SIZE,
                      "--device", "cpu", "--no-progress", "--json", run_dir / name], run_dir / name)
            for prefix, split, name in splits]


def test_scores(out: Path, run_dir: Path, large: Path | None = None, second: Path | None = None) -> dict[str, float]:
    """`rlipv2 eval synthetic` of a run (the demo's own scoring: HICO-DET protocol, any subject
    class, held-out combinations as zero-shot); keys of the larger split prefixed `large_`, of its
    replicate `second_`."""
    got = {}
    for prefix, argv, scores in eval_commands(out, run_dir, large, second):
        cli(*argv)
        got.update(read_scores(prefix, scores))
    return got


def read_scores(prefix: str, scores: Path) -> dict[str, Any]:
    """The record's figures from an `rlipv2 eval synthetic --json` file: the mAPs, and the AP of each
    held-out combination (zero-shot mAP is their mean, over a handful of combinations)."""
    res = json.loads(scores.read_text())
    got: dict[str, Any] = {prefix + k: res[k] for k in ("relation_map", "zero_shot_relation_map", "full_map",
                                                        "mean_max_recall")}
    got[prefix + "held_out_ap"] = {t["triplet"]: t["ap"] for t in res["per_triplet"] if t["held_out"]}
    return got


def test_split(out: Path, name: str, images: int, seed: int) -> Path:
    """A test split of `images` other scenes (`rlipv2 data synth --split test`): the demo's 128 test
    scenes score one model 14.0 and another test split of the world 8.0, so the comparison is also
    scored on more scenes (`name` "test", seed LARGE_TEST_SEED) and, to tell test-scene sampling from
    training seeds, on a second split of as many (`name` "second_test", seed SECOND_TEST_SEED)."""
    split = out / "data" / f"{name}{images}"
    argv = ["data", "synth", "--out", split, "--images", images, "--seed", seed, "--split", "test",
            "--size", IMAGE_SIZE, "--no-progress"]
    if (split / "test_hico.json").is_file():
        record(*argv)
    else:
        shutil.rmtree(split, ignore_errors=True)   # an interrupted earlier call's partial folder: synth refuses it
        cli(*argv)
    return split


def bootstrap_share(got: list[float], ceil: list[float], draws: int = 10000) -> list[float] | None:
    """5th and 95th percentiles of mean(got) / mean(ceil) over seeds drawn with replacement (pairs
    kept together): how far the share could move with other seeds of the same design."""
    import random

    if len(got) < 3:
        return None
    rng = random.Random(0)
    idx = range(len(got))
    shares = []
    for _ in range(draws):
        pick = [rng.choice(idx) for _ in idx]
        c = sum(ceil[i] for i in pick)
        if c > 0:
            shares.append(sum(got[i] for i in pick) / c)
    if not shares:                      # no draw with a positive ceiling gain: no share to bound
        return None
    shares.sort()
    return [round(shares[int(0.05 * len(shares))], 3), round(shares[int(0.95 * len(shares)) - 1], 3)]


def pretraining_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by_mix: dict[str, list[dict[str, Any]]] = {}
    for p in runs:
        by_mix.setdefault(p["sources"], []).append(p)
    summary: dict[str, Any] = {}
    keys = [k for k in METRICS if all(k in p for p in runs)]
    for name, ps in by_mix.items():
        summary[name] = {"seeds": len(ps)}
        for k in keys:
            v = [p[k] for p in ps]
            summary[name][k] = {"mean": round(statistics.mean(v), 2),
                                "std": round(statistics.stdev(v), 2) if len(v) > 1 else None}
    for name, ps in by_mix.items():
        for prefix in ("", "large_", "second_"):
            k = prefix + "held_out_ap"
            if all(k in p for p in ps):
                summary[name][k] = {t: round(statistics.mean(p[k][t] for p in ps), 2) for t in ps[0][k]}
    if {"vg", "vg+pseudo", "vg+truth"} <= summary.keys():
        for k in keys:
            base, got, ceil = (summary[n][k]["mean"] for n in ("vg", "vg+pseudo", "vg+truth"))
            summary.setdefault("share_of_ceiling_gain", {})[k] = (round((got - base) / (ceil - base), 3)
                                                                  if ceil != base else None)
    # The mixes of one seed share weights at initialisation and the VG-format batches' order, so
    # the gain over `vg` is also given seed by seed (paired), whose spread is the comparison's own.
    # Other labellings are also paired with the default pseudo-labels: what the variant changes.
    base_of = {p["seed"]: p for p in by_mix.get("vg", [])}
    pseudo_of = {p["seed"]: p for p in by_mix.get("vg+pseudo", [])}
    for name, ps in by_mix.items():
        bases = [("gain_over_vg", base_of)] if name != "vg" else []
        if name.startswith("vg+pseudo") and name != "vg+pseudo":
            bases.append(("gain_over_vg+pseudo", pseudo_of))
        for key, of in bases:
            for k in keys:
                gains = [p[k] - of[p["seed"]][k] for p in ps if p["seed"] in of]
                if gains:
                    summary[name].setdefault(key, {})[k] = {
                        "per_seed": [round(g, 2) for g in gains], "mean": round(statistics.mean(gains), 2),
                        "std": round(statistics.stdev(gains), 2) if len(gains) > 1 else None}
    truth_of = {p["seed"]: p for p in by_mix.get("vg+truth", [])}

    def paired(name: str, k: str) -> tuple[list[float], list[float]]:
        """The gains over vg of `name` and of the ceiling, seed by seed, over the seeds all three have
        finished (also while a study is under way)."""
        ps = sorted((p for p in by_mix[name] if p["seed"] in truth_of and p["seed"] in base_of),
                    key=lambda p: p["seed"])
        return ([p[k] - base_of[p["seed"]][k] for p in ps],
                [truth_of[p["seed"]][k] - base_of[p["seed"]][k] for p in ps])

    if "share_of_ceiling_gain" in summary:
        for k in keys:
            got, ceil = paired("vg+pseudo", k)
            summary["share_of_ceiling_gain"][k + "_per_seed"] = [round(g / c, 3) if c else None
                                                                 for g, c in zip(got, ceil)]
            summary["share_of_ceiling_gain"][k + "_interval_90"] = bootstrap_share(got, ceil)
            summary["share_of_ceiling_gain"][k + "_margin"] = paired_margin(got, ceil)
        ceiling = summary["vg+truth"]["gain_over_vg"]
        for name in sorted(n for n in summary if n.startswith("vg+pseudo") and n != "vg+pseudo"):
            gain = summary[name]["gain_over_vg"]
            summary[name]["share_of_ceiling_gain"] = {
                k: round(gain[k]["mean"] / ceiling[k]["mean"], 3) if ceiling[k]["mean"] else None
                for k in keys}
            for k in keys:
                summary[name]["share_of_ceiling_gain"][k + "_margin"] = paired_margin(*paired(name, k))
        # Scored on two test splits of as many scenes: how much of the margin's spread is which scenes
        # were drawn, and how much is training (what only more seeds average out).
        for name in [n for n in summary if n.startswith("vg+pseudo")]:
            for k in ("relation_map", "zero_shot_relation_map"):
                if "large_" + k in keys and "second_" + k in keys:
                    summary.setdefault("spread_sources", {}).setdefault(name, {})[k] = spread_sources(
                        paired(name, "large_" + k), paired(name, "second_" + k))
    return summary


def paired_margin(got: list[float], ceil: list[float]) -> dict[str, Any]:
    """The target as a paired difference, which stays finite when a seed's ceiling gain is ~0:
    pseudo gain − SHARE_TARGET × ceiling gain, seed by seed; ≥ 0 on average meets the target."""
    margin = [g - SHARE_TARGET * c for g, c in zip(got, ceil)]
    out: dict[str, Any] = {"per_seed": [round(m, 2) for m in margin],
                           "mean": round(statistics.mean(margin), 2) if margin else None, "sem": None}
    if len(margin) > 1:
        sd, mean = statistics.stdev(margin), statistics.mean(margin)
        out["sem"] = round(sd / len(margin) ** 0.5, 2)
        # How many seeds would put this mean two standard errors from zero at this spread: whether
        # more seeds could settle the target at all (a mean near zero needs hundreds).
        out["seeds_for_two_se"] = max(2, math.ceil((2 * sd / abs(mean)) ** 2)) if mean else None
    return out


def spread_sources(a: tuple[list[float], list[float]], b: tuple[list[float], list[float]]) -> dict[str, Any]:
    """The paired margin (pseudo gain − SHARE_TARGET × ceiling gain) of the same runs scored on two
    test splits of as many scenes, (gains, ceiling gains) seed by seed on each. A run's margin on one
    split is its training's margin plus that split's sampling error, independent between splits; so
    half the variance of the two splits' difference is the test scenes' share, the rest of one
    split's variance the training seeds'. With no test noise at all, seeds_for_two_se would be
    `seeds_for_two_se_training_only`: the most a larger test split could buy."""
    ma, mb = ([g - SHARE_TARGET * c for g, c in zip(*x)] for x in (a, b))
    # The two splits' mean scores each run on twice the scenes: its gains, their share and margin.
    gains = [(x + y) / 2 for x, y in zip(a[0], b[0])]
    ceil = [(x + y) / 2 for x, y in zip(a[1], b[1])]
    out: dict[str, Any] = {"both_splits": paired_margin(gains, ceil),
                           "share_both_splits": round(statistics.mean(gains) / statistics.mean(ceil), 3)
                           if gains and statistics.mean(ceil) else None}
    if len(gains) > 1:
        test_var = statistics.variance([x - y for x, y in zip(ma, mb)]) / 2
        seed_var = max(0.0, (statistics.variance(ma) + statistics.variance(mb)) / 2 - test_var)
        mean = statistics.mean(x - SHARE_TARGET * y for x, y in zip(gains, ceil))
        out.update(test_sd=round(test_var ** 0.5, 2), seed_sd=round(seed_var ** 0.5, 2),
                   seeds_for_two_se_training_only=max(2, math.ceil(4 * seed_var / mean ** 2)) if mean else None)
    return out


def margin_text(margin: dict[str, Any]) -> str:
    n = margin.get("seeds_for_two_se")
    return f"{margin['mean']:+.2f} ± {margin['sem']}" + (f" (2 s.e. from 0 at ~{n} seeds)" if n else "")


def summaries_by_steps(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One comparison per training length ("1000": summary, ...): runs pair by seed only within one."""
    return {str(n): pretraining_summary([r for r in runs if r["steps"] == n])
            for n in sorted({r["steps"] for r in runs})}


# ------------------------------------------------------------------------------------------- report
def markdown(res: dict[str, Any]) -> str:
    p = res["plan"]
    lines = ["# Pseudo-labelling on the synthetic world, through the CLI", "",
             f"VG-format split (the Tagger's training data): {p['vg_images']} scenes; detection split (relations "
             f"hidden): {p['detection_images']} scenes, {res['truth_relations']} true relations; "
             f"{p['captions_per_image']} synthetic captions per image; tiny Tagger trained {p['tagger_steps']} "
             f"steps × {p['tagger_batch']} images" + longer_tagger_text(res) + ". Scored from the pseudo-labelled shards against the hidden truth; "
             "the wordings of one predicate on one pair count once.", "",
             f"At the default threshold ({DEFAULT_THRESHOLD}), from the shards `rlipv2 data pseudo-label` writes:", "",
             "| lever (`rlipv2 data tag` options) | predicted | pairs | per pair | correct | precision | recall |",
             "|---|---|---|---|---|---|---|"]
    c = res["candidates_all_accepted"]
    lines.append(f"| every candidate (no Tagger) | {c['predicted']} | | | {c['correct']} | {c['precision']} | "
                 f"{c['recall']} |")
    for name, v in res["levers"].items():
        s = v["shards_at_default"]
        opts = " ".join(v["tag_options"]) or "no option"
        lines.append(f"| {name} (`{opts}`) | {s['predicted']} | {s['pairs']} | {s['relations_per_pair']} | "
                     f"{s['correct']} | {s['precision']} | {s['recall']} |")
    lines += ["", "Precision / recall over thresholds (shards at 0.05 filtered at each threshold):", "",
              "| lever | " + " | ".join(str(t) for t in THRESHOLDS) + " |", "|---|" + "---|" * len(THRESHOLDS)]
    for name, v in res["levers"].items():
        cells = [f"{v['curve'][str(t)]['precision']} / {v['curve'][str(t)]['recall']}" for t in THRESHOLDS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Parsing: " + json.dumps({k: v for k, v in res["parse"].items() if k != "top_phrases"}), "",
              "Commands run (in order):", "", "```"] + res["commands"] + ["```", ""]
    if res.get("default_label_confidence"):
        c = res["default_label_confidence"]
        lines += ["Confidence written with the default pseudo-labels, mean (quartiles): " + "; ".join(
            f"{k} {v['mean']} ({', '.join(map(str, v['quartiles']))}; {v['n']} labels)" for k, v in c.items()), ""]
    if res.get("default_label_errors"):
        e = res["default_label_errors"]
        lines += ["The default pseudo-labels by the world's predicate (found: true relations labelled; missed ones "
                  "train as negatives; wrong: a label on a pair that holds another predicate, or none):", "",
                  "| predicate | true | found | recall | wrong, other predicate | wrong, pair holds none |",
                  "|---|---|---|---|---|---|"]
        for name, r in [*e["by_predicate"].items(), ("all", e["total"])]:
            recall = round(r["found"] / r["true"], 2) if r["true"] else "–"
            lines.append(f"| {name} | {r['true']} | {r['found']} | {recall} | {r['wrong_predicate']} | "
                         f"{r['no_relation']} |")
        lines.append("")
    if res.get("tagger_length_label_errors"):
        by_n = {str(p["tagger_steps"]): res["default_label_errors"], **res["tagger_length_label_errors"]} \
            if res.get("default_label_errors") else res["tagger_length_label_errors"]
        lines += ["Recall of the default pseudo-labels by the world's predicate, against the Tagger's training "
                  "length (wrong labels in brackets):", "",
                  "| predicate | true | " + " | ".join(f"{n} steps" for n in by_n) + " |",
                  "|---|---|" + "---|" * len(by_n)]
        first = next(iter(by_n.values()))
        for name in [*first["by_predicate"], "all"]:
            cells = []
            for e in by_n.values():
                r = e["total"] if name == "all" else e["by_predicate"].get(name)
                cells.append(f"{r['found'] / r['true']:.2f} ({r['wrong_predicate'] + r['no_relation']})"
                             if r and r["true"] else "–")
            true = (first["total"] if name == "all" else first["by_predicate"][name])["true"]
            lines.append(f"| {name} | {true} | " + " | ".join(cells) + " |")
        losses = [res["levers"].get(tagger_length_lever(int(n)), {}).get("tagger_relation_loss") for n in by_n]
        lines += ["| the Tagger's logged relation loss at that step | | " +
                  " | ".join(str(v) if v is not None else "–" for v in losses) + " |", ""]
    if res.get("pretraining"):
        lines += ["Pre-training: the demo recipe, each mix with the same steps, batch and seeds, scored on the "
                  "demo's test scenes. vg: the VG-format split alone; vg+pseudo: plus the detection scenes "
                  "with the default lever's pseudo-labels; vg+truth: plus the same scenes with their hidden true "
                  "relations (the ceiling); vg+detection: plus the same scenes' boxes and no relation (the "
                  "box-only control: what the extra images bring without relation labels); vg+pseudoNN: the "
                  "default tags pseudo-labelled at threshold 0.NN; vg+pseudo-taggerN: the default options' pseudo-labels "
                  "from a Tagger trained N steps; vg+pseudoNN-taggerN: that Tagger's tags pseudo-labelled at "
                  "threshold 0.NN; vg+pseudo-weighted: the default pseudo-labels "
                  "with their confidence as the relation target (`data.confidence_weighted=true`).", ""]
        large, second = p.get("large_test_images"), p.get("second_test_images")
        splits = [("large_", f"{large} test scenes")] * bool(large) + [("second_", f"{second} more")] * bool(second)
        lines += ["| pre-training data | seed | steps | relation mAP | zero-shot mAP | full mAP |" + "".join(
                      f" relation mAP, {what} | zero-shot mAP, {what} |" for _, what in splits),
                  "|---|---|---|---|---|---|" + "---|---|" * len(splits)]
        for r in res["pretraining"]:
            lines.append(f"| {r['sources']} | {r['seed']} | {r['steps']} | {r['relation_map']} | "
                         f"{r['zero_shot_relation_map']} | {r['full_map']} |" + "".join(
                             f" {r.get(pre + 'relation_map', '–')} | {r.get(pre + 'zero_shot_relation_map', '–')} |"
                             for pre, _ in splits))
        for n, summ in res.get("pretraining_summary", {}).items():
            lines += ["", f"### {n} steps × 8 images"]
            for prefix, scenes in [("", f"the demo's {p['test_images']} test scenes")] + (
                    [("large_", f"{large} other test scenes (`rlipv2 data synth --split test --seed {LARGE_TEST_SEED}`)")]
                    if large else []) + (
                    [("second_", f"{second} further test scenes (`--seed {SECOND_TEST_SEED}`)")] if second else []):
                keys = (prefix + "relation_map", prefix + "zero_shot_relation_map")
                if not all(k in v for v in summ.values() if isinstance(v, dict) and "seeds" in v for k in keys):
                    continue
                lines += ["", f"Scored on {scenes}:", "",
                          "| pre-training data | seeds | relation mAP, mean ± std | zero-shot mAP, mean ± std | "
                          "gain over vg, same seed (relation / zero-shot), mean ± std | share of the ceiling's gain |",
                          "|---|---|---|---|---|---|"]
                for name, v in summ.items():
                    if "seeds" not in v:        # the summary's study-wide entries
                        continue
                    gain = " / ".join(f"{v['gain_over_vg'][k]['mean']:+.2f} ± {v['gain_over_vg'][k]['std']}"
                                      for k in keys) if "gain_over_vg" in v else "–"
                    share = " / ".join(str(v["share_of_ceiling_gain"][k]) for k in keys) \
                        if "share_of_ceiling_gain" in v else ""
                    lines.append(f"| {name} | {v['seeds']} | " + " | ".join(
                        f"{v[k]['mean']} ± {v[k]['std']}" for k in keys) + f" | {gain} | {share} |")
                g = summ.get("share_of_ceiling_gain", {})
                if keys[0] in g:
                    lines += ["", f"Share of the ceiling's gain (vg+pseudo − vg) / (vg+truth − vg), means over seeds: "
                              f"relation mAP {g[keys[0]]}, zero-shot mAP {g[keys[1]]}; seed by seed: relation mAP "
                              f"{g[keys[0] + '_per_seed']}, zero-shot mAP {g[keys[1] + '_per_seed']}; 90 % bootstrap "
                              f"interval over seeds: relation mAP {g[keys[0] + '_interval_90']}, zero-shot mAP "
                              f"{g[keys[1] + '_interval_90']}. Against the target ({SHARE_TARGET}): pseudo gain − "
                              f"{SHARE_TARGET} × ceiling gain, mean ± standard error over seeds: relation mAP "
                              f"{margin_text(g[keys[0] + '_margin'])}, zero-shot mAP "
                              f"{margin_text(g[keys[1] + '_margin'])} (≥ 0 meets it)."]
                for name in (n for n in summ if n.startswith("vg+pseudo") and n != "vg+pseudo"):
                    m = summ[name].get("share_of_ceiling_gain", {})
                    if keys[0] + "_margin" in m and m[keys[0] + "_margin"]["sem"] is not None:
                        lines += ["", f"{name} against the target, the same margin over "
                                  f"{len(m[keys[0] + '_margin']['per_seed'])} seeds: relation mAP "
                                  f"{margin_text(m[keys[0] + '_margin'])}, zero-shot mAP "
                                  f"{margin_text(m[keys[1] + '_margin'])}."]
                        d = summ[name].get("gain_over_vg+pseudo", {})
                        if all(k in d for k in keys):
                            lines[-1] += (" Against vg+pseudo, same seed (mean, lowest to highest): " + ", ".join(
                                f"{what} {d[k]['mean']:+.2f} ({min(d[k]['per_seed']):+.2f} to "
                                f"{max(d[k]['per_seed']):+.2f})" for what, k in zip(("relation mAP", "zero-shot mAP"),
                                                                                   keys)) + ".")
                lines += held_out_table(summ, prefix, res.get("default_label_errors"))
            lines += spread_table(summ, large) + composing_table(res.get("composing_labels", {}), summ)
        if res.get("pretraining_commands"):
            lines += ["", "Pre-training commands:", "", "```"] + res["pretraining_commands"] + ["```"]
    else:
        lines.append("Pre-training comparison with these labels: pending (`--pretrain-steps N`).")
    lines += ["", f"Machine: {res['machine']}", ""]
    return "\n".join(lines)


def spread_table(summ: dict[str, Any], images: int | None) -> list[str]:
    """`spread_sources` of each labelling: the margin on both splits, and its spread split into the
    test scenes' part and the training seeds' part."""
    rows = summ.get("spread_sources", {})
    if not rows:
        return []
    lines = ["", f"Where the seed-to-seed spread comes from: the same runs scored on two splits of {images} "
             f"test scenes (seeds {LARGE_TEST_SEED} and {SECOND_TEST_SEED}). Margin against the target on both "
             "splits' mean, mean ± standard error over seeds; the standard deviation of one split's margin that "
             "its scenes bring (half the variance of the two splits' difference) and that training brings (the "
             "rest); the seeds that would put the mean two standard errors from zero on both splits, and with "
             "no test noise at all (the most a larger test split could buy):", "",
             "| labels | metric | share, both splits | margin, both splits | s.d. from test scenes | "
             "s.d. from training | seeds for 2 s.e., both splits | with no test noise |",
             "|---|---|---|---|---|---|---|---|"]
    for name, by_metric in rows.items():
        for k, r in by_metric.items():
            m = r["both_splits"]
            lines.append(f"| {name} | {'zero-shot mAP' if k.startswith('zero') else 'relation mAP'} | "
                         f"{r['share_both_splits']} | {m['mean']:+.2f} ± {m['sem']} | {r.get('test_sd')} | "
                         f"{r.get('seed_sd')} | {m.get('seeds_for_two_se')} | "
                         f"{r.get('seeds_for_two_se_training_only')} |")
    return lines


def composing_table(quality: dict[str, dict], summ: dict[str, Any]) -> list[str]:
    """`composing_labels` of each mix scored on both splits, beside its zero-shot share there."""
    rows = [(name, quality[name]) for name in summ.get("spread_sources", {}) if name in quality]
    if not rows:
        return []
    combos = list(rows[0][1])
    lines = ["", "The labels each held-out combination can be composed from (relations of its predicate with its "
             "subject or its object class; the detection scenes hold no held-out combination): recall / "
             "precision of each mix's pseudo-labels, beside its share of the ceiling's zero-shot gain on both "
             "splits:", "",
             "| labels | " + " | ".join(f"{c} ({rows[0][1][c]['true']} true)" for c in combos)
             + " | zero-shot share, both splits |", "|---|" + "---|" * (len(combos) + 1)]
    for name, q in rows:
        share = summ["spread_sources"][name].get("zero_shot_relation_map", {}).get("share_both_splits", "–")
        lines.append(f"| {name} | " + " | ".join(" / ".join("–" if q[c][k] is None else str(q[c][k])
                                                         for k in ("recall", "precision")) for c in combos)
                     + f" | {share} |")
    return lines


def longer_tagger_text(res: dict[str, Any]) -> str:
    """The plan's words for `--tagger-lengths`; the checkpoint as long as the default Tagger's
    training must reproduce its labels (same seed, constant learning rate), which is checked here."""
    p = res["plan"]
    if not p.get("tagger_lengths"):
        return ""
    text = f" (and, as levers of their own, {', '.join(map(str, p['tagger_lengths']))} steps: checkpoints of one longer run"
    same = res["levers"].get(tagger_length_lever(p["tagger_steps"]))
    default = next((v for k, v in res["levers"].items() if k.startswith("default (")), None)
    if same and default:
        agree = same["shards_at_default"] == default["shards_at_default"] and same["curve"] == default["curve"]
        text += (f"; its {p['tagger_steps']}-step checkpoint gives " +
                 ("the same labels as the default's Tagger" if agree else "OTHER labels than the default's Tagger"))
    return text + ")"


def held_out_table(summ: dict[str, Any], prefix: str, errors: dict[str, Any] | None) -> list[str]:
    """Zero-shot mAP combination by combination (mean AP over seeds per mix), beside the default
    pseudo-labels' recall of the combination's predicate: where the pseudo-labels fall short."""
    mixes = [n for n, v in summ.items() if isinstance(v, dict) and prefix + "held_out_ap" in v]
    if not mixes:
        return []
    recall = {name: r["found"] / r["true"] for name, r in (errors or {}).get("by_predicate", {}).items() if r["true"]}
    lines = ["", "Zero-shot mAP is the mean AP of these held-out combinations (mean over each mix's seeds):", "",
             "| combination | " + " | ".join(f"{m} ({summ[m]['seeds']} seeds)" for m in mixes)
             + " | default pseudo-labels' recall of the predicate |",
             "|---|" + "---|" * (len(mixes) + 1)]
    for triplet in sorted(summ[mixes[0]][prefix + "held_out_ap"]):
        # The predicate is the world's predicate name inside "subject predicate object" (longest first).
        predicate = max((n for n in recall if f" {n} " in f" {triplet} "), key=len, default=None)
        lines.append(f"| {triplet} | " + " | ".join(str(summ[m][prefix + "held_out_ap"].get(triplet, "–"))
                                                   for m in mixes)
                     + f" | {round(recall[predicate], 2) if predicate else '–'} |")
    return lines


def portable(commands: list[str], out: Path) -> list[str]:
    """The commands with the work folder as OUT and paths relative to the repository (also the
    recipes', which resolve through the installed package)."""
    from rlipv2_scale.demo import recipe_path

    roots = {str(ROOT) + "/", str(recipe_path("demo").parents[2]) + "/"}
    for root in roots:
        commands = [c.replace(root, "") for c in commands]
    return [c.replace(str(out), "OUT") for c in commands]


def write(res: dict[str, Any], results: Path, out: Path, quiet: bool = False) -> None:
    if res.get("pretraining"):
        res["pretraining_summary"] = summaries_by_steps(res["pretraining"])
    results.mkdir(parents=True, exist_ok=True)
    (results / "pseudo_label_proof.json").write_text(json.dumps(res, indent=1) + "\n")
    text = markdown(res)
    (results / "pseudo_label_proof.md").write_text(text)
    if not quiet:
        log(text)
        log(f"work folder: {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--vg-images", type=int, default=512)
    ap.add_argument("--detection-images", type=int, default=300)
    ap.add_argument("--test-images", type=int, default=128)
    ap.add_argument("--captions", type=int, default=10, help="synthetic captions per image")
    ap.add_argument("--tagger-steps", type=int, default=800)
    ap.add_argument("--tagger-batch", type=int, default=4)
    ap.add_argument("--tagger-lengths", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                    help="comma-separated multiples of --tagger-steps: also label with a Tagger trained this "
                         "long (one run, a checkpoint every --tagger-steps), lever and mix of its own")
    ap.add_argument("--seed", type=int, default=0, help="the synthetic world's seed")
    ap.add_argument("--levers", nargs="*", default=None, help="names of LEVERS to run (default: all)")
    ap.add_argument("--reuse-tagger", action="store_true", help="use --out's trained tagger if there is one")
    ap.add_argument("--pretrain-steps", type=int, default=0, help="0: skip the pre-training comparison")
    ap.add_argument("--pretrain-seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1, 2],
                    help="comma-separated; runs use train/data seed 42 + each")
    ap.add_argument("--nproc", type=int, default=1, help="ranks of each pre-training run")
    ap.add_argument("--pseudo-thresholds", type=lambda v: [float(x) for x in v.split(",") if x], default=[],
                    help="comma-separated: also pre-train on the default lever's tags pseudo-labelled at these "
                         f"thresholds (besides {DEFAULT_THRESHOLD})")
    ap.add_argument("--mixes", type=lambda v: [x for x in v.split(",") if x], default=None,
                    help="comma-separated mix names to pre-train, e.g. vg,vg+pseudo,vg+truth,vg+pseudo-weighted "
                         "(default: the four of point 4 and those of --pseudo-thresholds and --tagger-lengths)")
    ap.add_argument("--only-pretrain", action="store_true",
                    help="reuse --out and the results JSON of an earlier run; run only the pre-training comparison "
                         "(and --tagger-lengths; --pretrain-steps 0 with them: the labels alone)")
    ap.add_argument("--resume", action="store_true", help="with --only-pretrain: keep the results JSON's finished runs")
    ap.add_argument("--large-test", type=int, default=0, metavar="N",
                    help="also score every pre-training run on a test split of N other scenes")
    ap.add_argument("--second-test", action="store_true",
                    help="with --large-test N: also score every run on a second split of N other scenes, which "
                         "tells the test scenes' part of the seed-to-seed spread from the training's")
    ap.add_argument("--rescore", action="store_true",
                    help="with --resume: score the finished runs again (`rlipv2 eval synthetic`) before training more")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()

    if args.second_test and not args.large_test:
        raise SystemExit("--second-test replicates the --large-test split: give --large-test N as well")
    out = (args.out or Path(tempfile.mkdtemp(prefix="pseudo_label_proof_"))).resolve()
    if args.only_pretrain:
        if args.out is None or not (out / "pseudo" / "default" / "shards").is_dir() or (
                args.pretrain_steps <= 0 and not args.tagger_lengths):
            raise SystemExit("--only-pretrain needs --out of an earlier run (with pseudo/default/shards) and "
                             "--pretrain-steps or --tagger-lengths")
        res = json.loads((args.results / "pseudo_label_proof.json").read_text())
        before = res["plan"] if args.resume else {}
        res["plan"]["tagger_lengths"] = sorted(set(before.get("tagger_lengths", [])) | set(args.tagger_lengths))
        if args.pretrain_steps > 0:     # a call for the labels alone leaves the pre-training plan as it was
            res["plan"].update(
                pretrain_steps=sorted(set(before.get("pretrain_steps", [])) | {args.pretrain_steps}), nproc=args.nproc,
                large_test_images=args.large_test or None,
                second_test_images=args.large_test if args.second_test else before.get("second_test_images"),
                pretrain_seeds=sorted(set(before.get("pretrain_seeds", [])) | set(args.pretrain_seeds)),
                pseudo_thresholds=sorted(set(before.get("pseudo_thresholds", [])) | set(args.pseudo_thresholds)))
        longer_taggers(out, args, res)
        if args.pretrain_steps > 0:
            pretraining(out, args, res)
        write(res, args.results, out)
        return

    from rlipv2_scale.demo import DemoPlan, prepare_data

    t = time.perf_counter()
    plan = DemoPlan(train_images=args.vg_images, val_images=32, test_images=args.test_images, steps=1,
                    eval_every=1, seed=args.seed)
    prepare_data(out, plan, lambda m: None, workers=1)        # train (VG-format) / val / test + tokenizer
    detection, truth = detection_world(out, args.detection_images, args.seed + 1000)
    world_s = time.perf_counter() - t
    import torch

    res: dict[str, Any] = {
        "plan": {"vg_images": args.vg_images, "detection_images": args.detection_images,
                 "test_images": args.test_images, "captions_per_image": args.captions,
                 "tagger_steps": args.tagger_steps, "tagger_batch": args.tagger_batch, "seed": args.seed,
                 "image_size": IMAGE_SIZE, "default_threshold": DEFAULT_THRESHOLD,
                 "pretrain_steps": [args.pretrain_steps] if args.pretrain_steps else [], "pretrain_seeds": args.pretrain_seeds, "nproc": args.nproc,
                 "large_test_images": args.large_test or None,
                 "second_test_images": args.large_test if args.second_test else None,
                 "pseudo_thresholds": args.pseudo_thresholds, "tagger_lengths": args.tagger_lengths},
        **pipeline(out, args, detection, truth),
        "pretraining": [],
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "platform": platform.platform()},
    }
    res["seconds"]["world"] = round(world_s, 1)
    res["commands"] = portable(COMMANDS, out)
    COMMANDS.clear()
    longer_taggers(out, args, res)
    write(res, args.results, out)
    if args.pretrain_steps > 0:
        pretraining(out, args, res)
        write(res, args.results, out)


if __name__ == "__main__":
    main()
