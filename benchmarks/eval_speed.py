"""HICO-DET evaluation speed: the vectorised evaluator against the per-candidate loop implementation.

Generates a test set of the real HICO-DET size (9,658 images; per image 100 queries = 200 predicted
boxes and 100 scored triplets, the community JSON form), runs both implementations on the same
already-parsed Python objects (best of `--repeat` runs each, interleaved, wall and CPU time), asserts
that every number agrees to 1e-9, and writes `benchmarks/results/eval_speed.json`. A second
comparison feeds the same predictions in the per-query form (verb scores of 100 queries x 117 verbs
per image, what the trainer's evaluation hook passes) on a subset, because the loop baseline needs
seconds per hundred images there.

CPU time (`time.process_time`) is reported beside wall time because the machine may be shared: the
CPU ratio is the steadier one. Two reference points put the listed form's figure in context:
  * read floor (`read_<level>_cpu_s`): the CPU time to only read fields of the listed dicts into
    arrays (one C-speed pass per field, nothing else): "all" fields (what full validation reads),
    "no-coordinates", "relations" (the four fields of each triplet, which no evaluator can skip).
    Loop time / read floor bounds the speed-up of any evaluator whose input is these Python objects.
  * json.load of the ground truth, predictions and training files: in neither timing;
    `speedup_from_json_text_cpu` adds it to both sides, as a user evaluating files sees it.

By default (`--input json`) both implementations get the objects json.loads makes of the generated
data's JSON text, what `rlipv2 eval hico-det` passes; `--input generated` hands them the generator's
own objects, whose scattered memory layout makes every read slower.

    python benchmarks/eval_speed.py [--images 9658] [--per-query-images 500] [--repeat 3] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from itertools import chain
from operator import itemgetter
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from rlipv2_scale.eval.hico import evaluate_hico
from rlipv2_scale.eval.label_space import hico_label_space
from rlipv2_scale.eval.reference_loops import evaluate_hico_loops
from rlipv2_scale.eval.synthetic import random_relation_data, to_per_query

HICO_TEST_IMAGES = 9658
RELATION_FIELDS = ("subject_id", "object_id", "category_id", "score")
READ_LEVELS = ("all", "no-coordinates", "relations")


def _timed(fn) -> tuple[object, float, float]:
    """Result, wall seconds, CPU seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _best(fn, repeat: int) -> tuple[object, float, float]:
    runs = [_timed(fn) for _ in range(repeat)]
    return runs[-1][0], min(r[1] for r in runs), min(r[2] for r in runs)


def _assert_same(a: dict, b: dict) -> float:
    worst = 0.0
    for key in ("mAP", "mean_max_recall", "mAP_rare", "mAP_non_rare"):
        assert (a[key] is None) == (b[key] is None), key
        if a[key] is not None:
            worst = max(worst, abs(a[key] - b[key]))
    for t in a["per_triplet"]:
        worst = max(worst, abs(t["ap"] - b["ap"][tuple(t["index"])]))
    assert worst <= 1e-9, f"vectorised and loop results differ by {worst}"
    return worst


def _compare(name: str, gt: list, pred: list, train: list, space, repeat: int) -> dict:
    fast_runs, loop_runs = [], []
    for _ in range(repeat):  # interleaved, so that a busy moment of the machine hits both alike
        fast_runs.append(_timed(lambda: evaluate_hico(gt, pred, train=train, label_space=space)))
        loop_runs.append(_timed(lambda: evaluate_hico_loops(gt, pred, train=train, label_space=space)))
    worst = _assert_same(fast_runs[-1][0], loop_runs[-1][0])
    fast_s, fast_cpu = min(r[1] for r in fast_runs), min(r[2] for r in fast_runs)
    loop_s, loop_cpu = min(r[1] for r in loop_runs), min(r[2] for r in loop_runs)
    n_cand = sum(len(p["hoi_prediction"]) if "hoi_prediction" in p else np.size(p["verb_scores"]) for p in pred)
    return {"input": name, "images": len(gt), "candidates": int(n_cand), "vectorised_s": fast_s, "loop_s": loop_s,
            "speedup": loop_s / fast_s, "vectorised_cpu_s": fast_cpu, "loop_cpu_s": loop_cpu,
            "speedup_cpu": loop_cpu / fast_cpu, "max_abs_difference": worst, "mAP": fast_runs[-1][0]["mAP"],
            "mAP_rare": fast_runs[-1][0]["mAP_rare"]}


def read_fields(pred: list[dict], level: str = "all") -> int:
    """Read fields of the listed form once into arrays and do nothing else: the least an evaluator whose
    input is these Python objects can do. `level`: "all" (what full validation reads), "no-coordinates"
    (relation fields and box categories: what ranking the candidates needs), "relations" (the four
    fields of each listed triplet, which no evaluator can skip)."""
    rels = list(chain.from_iterable(p["hoi_prediction"] for p in pred))
    n = len(np.fromiter(chain.from_iterable(map(itemgetter(*RELATION_FIELDS), rels)), np.float64,
                        count=len(RELATION_FIELDS) * len(rels)))
    if level in ("all", "no-coordinates"):
        boxes = list(chain.from_iterable(p["predictions"] for p in pred))
        n += len(np.fromiter(map(itemgetter("category_id"), boxes), np.float64, count=len(boxes)))
        if level == "all":
            n += len(np.fromiter(chain.from_iterable(map(itemgetter("bbox"), boxes)), np.float64,
                                 count=4 * len(boxes)))
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=HICO_TEST_IMAGES)
    parser.add_argument("--candidates", type=int, default=100, help="scored triplets per image")
    parser.add_argument("--per-query-images", type=int, default=500,
                        help="images for the per-query comparison (100 queries x 117 verbs each; the loop "
                             "baseline needs about 0.05 s per image)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each implementation; the best counts")
    parser.add_argument("--input", choices=("json", "generated"), default="json",
                        help="json: both implementations get the objects json.loads makes of the generated data's "
                             "JSON text (what the CLI passes); generated: the generator's own objects (another "
                             "memory layout, slower to read)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_speed.json")
    args = parser.parse_args()

    space = hico_label_space()
    start = time.perf_counter()
    gt, pred = random_relation_data(space, args.images, args.candidates, seed=args.seed)
    gen_s = time.perf_counter() - start
    train, _ = random_relation_data(space, 2000, 0, n_queries=1, seed=args.seed + 1)
    texts = [json.dumps(x) for x in (gt, pred, train)]
    (gt_parsed, pred_parsed, train_parsed), parse_s, parse_cpu = _best(lambda: [json.loads(t) for t in texts],
                                                                      args.repeat)
    del texts
    if args.input == "json":  # the objects `rlipv2 eval hico-det` hands the evaluator (json.load's layout)
        gt, pred, train = gt_parsed, pred_parsed, train_parsed
    del gt_parsed, pred_parsed, train_parsed
    n = min(args.per_query_images, args.images)
    load_before = os.getloadavg()
    listed = _compare("listed: 100 scored triplets + 200 boxes per image (community JSON form)", gt, pred, train,
                      space, args.repeat)
    per_query = _compare("per-query: verb_scores 100 x 117 per image (the trainer's post-processor output)",
                         gt[:n], to_per_query(pred[:n], space, seed=args.seed), train, space, args.repeat)
    for level in READ_LEVELS:
        _, wall, cpu = _best(lambda: read_fields(pred, level), args.repeat)
        listed[f"read_{level}_s"], listed[f"read_{level}_cpu_s"] = wall, cpu
        listed[f"speedup_bound_read_{level}_cpu"] = listed["loop_cpu_s"] / cpu
    listed.update({"json_load_s": parse_s, "json_load_cpu_s": parse_cpu,
                   "speedup_from_json_text_cpu":
                       (listed["loop_cpu_s"] + parse_cpu) / (listed["vectorised_cpu_s"] + parse_cpu)})
    runs = [listed, per_query]
    result = {
        "benchmark": "HICO-DET evaluation: vectorised (eval.hico) vs per-candidate loop (eval.reference_loops)",
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "input": args.input, "repeat": args.repeat, "generate_s": gen_s, "runs": runs,
        "note": "both implementations take the same already-parsed Python objects (`input`: json = what "
                "json.loads makes of the data's JSON text, as the CLI passes). json.load of the ground truth, "
                "predictions and training files is in neither time: see json_load_cpu_s and "
                "speedup_from_json_text_cpu. Results must agree to 1e-9 (asserted). Times are the best of `repeat` "
                "interleaved runs, wall and CPU (process_time). The loop fills a per-image IoU table of every "
                "ground-truth box with every predicted box, like the community evaluator, and expands the "
                "per-query form to Q x V listed candidates. read_<level>_cpu_s is the CPU time to only read fields "
                "of the listed dicts into arrays; loop_cpu_s / read_<level>_cpu_s bounds the speed-up of any "
                "evaluator whose input is these Python objects.",
    }
    table = Table(title=f"HICO-DET evaluation speed (same parsed inputs ({args.input}), identical results; best "
                        f"of {args.repeat})")
    for col in ("input", "images", "loop s", "vectorised s", "speed-up", "speed-up (CPU)", "mAP"):
        table.add_column(col, justify="right")
    for r in runs:
        table.add_row(r["input"].split(":")[0], str(r["images"]), f"{r['loop_s']:.2f}", f"{r['vectorised_s']:.2f}",
                      f"{r['speedup']:.1f}x", f"{r['speedup_cpu']:.1f}x", f"{r['mAP']:.6f}")
    console = Console()
    console.print(table)
    bounds = ", ".join(f"{level}: {listed[f'read_{level}_cpu_s']:.2f} s (bound "
                       f"{listed[f'speedup_bound_read_{level}_cpu']:.1f}x)" for level in READ_LEVELS)
    console.print(f"listed form, CPU time to only read the fields of the {listed['candidates']:,} listed triplets "
                  f"and their boxes into arrays, the least an evaluator of these Python objects does: {bounds}")
    console.print(f"json.load of the three files (in neither time): {parse_cpu:.2f} s CPU; from the JSON text the "
                  f"listed form's speed-up (CPU) is {listed['speedup_from_json_text_cpu']:.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
