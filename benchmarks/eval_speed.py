"""HICO-DET evaluation speed: the vectorised evaluator against the per-candidate loop implementation,
in process and end to end from files.

End to end (`files` in the JSON): the generated ground truth, predictions and training annotations are
written as JSON files (the stdlib's `json.dump`), and `rlipv2 eval hico-det --gt --pred --train --json`
runs as a subprocess beside the in-repo loop baseline run the same way (this script with `--run-loop`:
stdlib json.load, then `tests/hico_loops.py`) and, with `--original SCRIPT`, a reconstruction of the
original evaluator kept outside the repository, run as `python SCRIPT GT PRED TRAIN VALID.npy OUT.json`
(VALID.npy: the [verb, object] valid matrix, the original's corre_hico.npy; OUT.json: mAP, mAP_rare,
mAP_non_rare, mean_max_recall). Interleaved, best of `--repeat`; wall time, CPU time (user + system) and
peak RSS of each child from `os.wait4`. The files are generated in a child process so that this
process stays small: a child's peak RSS counts its parent's at spawn time (reported as
`parent_rss_mib`). Every run's four numbers must agree to 1e-9 (asserted).

`--coco` measures instead what V-COCO's file scoring reads that is large: a COCO instances file of
V-COCO's size (10,346 images, 8 annotations each with a polygon), json.load against
`eval.files.read_coco_instances`, as subprocesses (`results/eval_speed_vcoco_coco.json`). Open Images
SGG files go through the same columnar reader as HICO-DET's.

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

    python benchmarks/eval_speed.py [--images 9658] [--per-query-images 500] [--repeat 3] [--original SCRIPT]
                                    [--work DIR] [--files-only] [--out PATH]
    python benchmarks/eval_speed.py --coco [--repeat 3] [--work DIR]     V-COCO's COCO instances file, read
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from itertools import chain
from operator import itemgetter
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from rlipv2_scale.eval.hico import evaluate_hico
from rlipv2_scale.labels.space import hico_label_space

# The per-candidate loop (the in-repo baseline) and the data generator are test modules.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hico_loops import evaluate_hico_loops  # noqa: E402
from relation_data import random_relation_data, to_per_query  # noqa: E402

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


FILE_KEYS = ("mAP", "mAP_rare", "mAP_non_rare", "mean_max_recall")


def write_files(work: Path, images: int, candidates: int, seed: int) -> None:
    """The benchmark's inputs as the files a user has: gt.json, pred.json, train.json (stdlib json.dump,
    default separators) and valid.npy (the [verb, object] valid matrix, for the original)."""
    space = hico_label_space()
    gt, pred = random_relation_data(space, images, candidates, seed=seed)
    train, _ = random_relation_data(space, 2000, 0, n_queries=1, seed=seed + 1)
    work.mkdir(parents=True, exist_ok=True)
    for name, data in (("gt", gt), ("pred", pred), ("train", train)):
        with (work / f"{name}.json").open("w") as f:
            json.dump(data, f)
    np.save(work / "valid.npy", space.valid)
    (work / "stamp.json").write_text(json.dumps({"images": images, "candidates": candidates, "seed": seed}))


def run_loop(gt: Path, pred: Path, train: Path, out: Path) -> None:
    """The in-repo baseline from files: stdlib json.load, then the per-candidate loop."""
    loaded = []
    for path in (gt, pred, train):
        with path.open() as f:
            loaded.append(json.load(f))
    res = evaluate_hico_loops(loaded[0], loaded[1], train=loaded[2])
    out.write_text(json.dumps({k: res[k] for k in FILE_KEYS}))


def _child(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def end_to_end(work: Path, repeat: int, original: Path | None) -> dict:
    """`rlipv2 eval hico-det` from the files against the loop baseline and the original, as subprocesses."""
    files = [str(work / f"{n}.json") for n in ("gt", "pred", "train")]
    cli = Path(sys.executable).with_name("rlipv2")
    cli_cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "rlipv2_scale.cli"]
    commands = {
        "rlipv2": cli_cmd + ["eval", "hico-det", "--gt", files[0], "--pred", files[1], "--train", files[2],
                             "--json", str(work / "out_rlipv2.json")],
        "loop": [sys.executable, __file__, "--run-loop", *files, str(work / "out_loop.json")]}
    if original is not None:
        commands["original"] = [sys.executable, str(original), *files, str(work / "valid.npy"),
                                str(work / "out_original.json")]
    runs: dict[str, list] = {k: [] for k in commands}
    for _ in range(repeat):  # interleaved, so that a busy moment of the machine hits all alike
        for name, cmd in commands.items():
            runs[name].append(_child(cmd))
    numbers = {k: json.loads((work / f"out_{k}.json").read_text()) for k in commands}
    worst = max(abs(numbers[k][m] - numbers["rlipv2"][m]) for k in commands for m in FILE_KEYS)
    assert worst <= 1e-9, f"end-to-end results differ by {worst}: {numbers}"
    out: dict = {"sizes_mib": {n: round(os.path.getsize(f) / 2**20, 1) for n, f in zip(("gt", "pred", "train"), files)},
                 "parent_rss_mib": round(_rss_mib(), 1), "max_abs_difference": worst,
                 **{m: numbers["rlipv2"][m] for m in FILE_KEYS}}
    for name, r in runs.items():
        out[name] = {"wall_s": min(x[0] for x in r), "cpu_s": min(x[1] for x in r),
                     "peak_rss_mib": round(min(x[2] for x in r), 1), "runs": [list(map(float, x)) for x in r]}
    for base in [k for k in ("original", "loop") if k in runs]:
        out[f"speedup_vs_{base}"] = out[base]["wall_s"] / out["rlipv2"]["wall_s"]
        out[f"speedup_vs_{base}_cpu"] = out[base]["cpu_s"] / out["rlipv2"]["cpu_s"]
        out[f"peak_rss_ratio_vs_{base}"] = out["rlipv2"]["peak_rss_mib"] / out[base]["peak_rss_mib"]
    return out


COCO_IMAGES, COCO_PER_IMAGE = 10346, 8  # about V-COCO's instances_vcoco_all_2014.json


def write_coco(path: Path, seed: int) -> None:
    """A COCO instances file of V-COCO's size, each annotation with a 48-coordinate polygon."""
    rng = np.random.default_rng(seed)
    anns = [{"segmentation": [np.round(rng.uniform(0, 480, 48), 2).tolist()],
             "area": round(float(rng.uniform(10, 5e4)), 2), "iscrowd": 0, "image_id": i,
             "bbox": np.round(rng.uniform(0, 300, 4), 2).tolist(), "category_id": int(rng.integers(1, 91)),
             "id": i * COCO_PER_IMAGE + k + 1} for i in range(COCO_IMAGES) for k in range(COCO_PER_IMAGE)]
    images = [{"id": i, "width": 640, "height": 480, "file_name": f"COCO_val2014_{i:012d}.jpg"}
              for i in range(COCO_IMAGES)]
    with path.open("w") as f:
        json.dump({"info": {}, "images": images, "licenses": [], "annotations": anns,
                   "categories": [{"id": c, "name": str(c), "supercategory": "x"} for c in range(1, 91)]}, f)


def read_coco(how: str, path: Path) -> None:
    from rlipv2_scale.eval.files import read_coco_instances, read_json

    data = read_json(path, "COCO instances") if how == "json" else read_coco_instances(path)
    assert len(data["annotations"]) == COCO_IMAGES * COCO_PER_IMAGE


def coco_comparison(work: Path, repeat: int, seed: int) -> dict:
    """Reading V-COCO's COCO instances file: json.load (before) against `read_coco_instances`, each a
    subprocess (wall, CPU, peak RSS; best of `repeat`, interleaved)."""
    path = work / "coco_instances.json"
    if not path.is_file():
        subprocess.run([sys.executable, __file__, "--write-coco", str(path), "--seed", str(seed)], check=True)
    runs: dict[str, list] = {"json": [], "read_coco_instances": []}
    for _ in range(repeat):
        for how in runs:
            runs[how].append(_child([sys.executable, __file__, "--read-coco", how, str(path)]))
    out: dict = {"images": COCO_IMAGES, "annotations": COCO_IMAGES * COCO_PER_IMAGE,
                 "size_mib": round(path.stat().st_size / 2**20, 1), "parent_rss_mib": round(_rss_mib(), 1)}
    for how, r in runs.items():
        out[how] = {"wall_s": min(x[0] for x in r), "cpu_s": min(x[1] for x in r),
                    "peak_rss_mib": round(min(x[2] for x in r), 1), "runs": [list(map(float, x)) for x in r]}
    out["speedup_cpu"] = out["json"]["cpu_s"] / out["read_coco_instances"]["cpu_s"]
    out["speedup_wall"] = out["json"]["wall_s"] / out["read_coco_instances"]["wall_s"]
    return out


def _load(work: Path) -> list:
    out = []
    for name in ("gt", "pred", "train"):
        with (work / f"{name}.json").open() as f:
            out.append(json.load(f))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=HICO_TEST_IMAGES)
    parser.add_argument("--candidates", type=int, default=100, help="scored triplets per image")
    parser.add_argument("--per-query-images", type=int, default=500,
                        help="images for the per-query comparison (100 queries x 117 verbs each; the loop "
                             "baseline needs about 0.05 s per image)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each implementation; the best counts")
    parser.add_argument("--input", choices=("json", "generated"), default="json",
                        help="in process: json: both implementations get the objects json.load makes of the files "
                             "(what the list-of-dicts API gets); generated: the generator's own objects (another "
                             "memory layout, slower to read)")
    parser.add_argument("--original", type=Path, metavar="SCRIPT",
                        help="the original evaluator, reconstructed outside the repository (interface above)")
    parser.add_argument("--work", type=Path, metavar="DIR",
                        help="folder for the generated files (reused when generated with the same settings; "
                             "default: a temporary folder)")
    parser.add_argument("--files-only", action="store_true", help="only the end-to-end comparison from files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--coco", action="store_true",
                        help="instead: reading a COCO instances file of V-COCO's size, json.load against "
                             "read_coco_instances (default --out: results/eval_speed_vcoco_coco.json)")
    parser.add_argument("--write-files", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--write-coco", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--read-coco", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--run-loop", type=Path, nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_loop:
        return run_loop(*args.run_loop)
    if args.write_files:
        return write_files(args.write_files, args.images, args.candidates, args.seed)
    if args.write_coco:
        return write_coco(args.write_coco, args.seed)
    if args.read_coco:
        return read_coco(args.read_coco[0], Path(args.read_coco[1]))
    results = Path(__file__).parent / "results"
    machine = {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
               "python": platform.python_version(), "numpy": np.__version__,
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
               "load_average_before": [round(x, 2) for x in os.getloadavg()]}

    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="eval_speed_")
    work = args.work or Path(tmp.name)
    if args.coco:
        coco = coco_comparison(work, args.repeat, args.seed)
        machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        out = args.out or results / "eval_speed_vcoco_coco.json"
        out.write_text(json.dumps({"benchmark": "V-COCO: reading the COCO instances file, json.load vs "
                                                "read_coco_instances (only the fields the toolkit reads)",
                                   "machine": machine, "repeat": args.repeat, "seed": args.seed, **coco}, indent=2))
        Console().print(f"COCO instances ({coco['size_mib']} MiB): json.load {coco['json']['cpu_s']:.2f} s CPU, "
                        f"{coco['json']['peak_rss_mib']:.0f} MiB; read_coco_instances "
                        f"{coco['read_coco_instances']['cpu_s']:.2f} s CPU, "
                        f"{coco['read_coco_instances']['peak_rss_mib']:.0f} MiB ({coco['speedup_cpu']:.1f}x CPU)")
        if tmp is not None:
            tmp.cleanup()
        return None
    stamp = {"images": args.images, "candidates": args.candidates, "seed": args.seed}
    start = time.perf_counter()
    if not (work / "stamp.json").is_file() or json.loads((work / "stamp.json").read_text()) != stamp:
        subprocess.run([sys.executable, __file__, "--write-files", str(work), "--images", str(args.images),
                        "--candidates", str(args.candidates), "--seed", str(args.seed)], check=True)
    gen_s = time.perf_counter() - start
    files = end_to_end(work, args.repeat, args.original)
    runs = []
    if not args.files_only:
        space = hico_label_space()
        (gt, pred, train), parse_s, parse_cpu = _best(lambda: _load(work), args.repeat)
        if args.input == "generated":
            gt, pred = random_relation_data(space, args.images, args.candidates, seed=args.seed)
            train, _ = random_relation_data(space, 2000, 0, n_queries=1, seed=args.seed + 1)
        n = min(args.per_query_images, args.images)
        listed = _compare("listed: 100 scored triplets + 200 boxes per image (community JSON form)", gt, pred,
                          train, space, args.repeat)
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
        "benchmark": "HICO-DET evaluation: `rlipv2 eval hico-det` from files vs the original's evaluator and the "
                     "per-candidate loop (tests/hico_loops.py), end to end; vectorised (eval.hico) vs the loop in "
                     "process",
        "machine": dict(machine, load_average_after=[round(x, 2) for x in os.getloadavg()]),
        "images": args.images, "candidates_per_image": args.candidates, "seed": args.seed, "repeat": args.repeat,
        "input": args.input, "generate_s": gen_s, "files": files, "runs": runs,
        "note": "files: each command is a subprocess on the same generated JSON files (wall time, CPU time = user + "
                "system, peak RSS from os.wait4; best of `repeat` interleaved runs); all print the same four numbers "
                "(asserted to 1e-9). original: the QPIC / RLIPv2 HICOEvaluator (datasets/hico_eval.py) with the rare "
                "split of datasets/hico.py, reconstructed outside the repository, reading with the stdlib json. "
                "runs: both implementations take the same already-parsed Python objects (json.load of the files); "
                "json.load is in neither time: see json_load_cpu_s and speedup_from_json_text_cpu. "
                "read_<level>_cpu_s is the CPU time to only read fields of the listed dicts into arrays; "
                "loop_cpu_s / read_<level>_cpu_s bounds the speed-up of any evaluator whose input is these Python "
                "objects.",
    }
    console = Console()
    table = Table(title=f"HICO-DET end to end from files ({args.images:,} images x {args.candidates} triplets; "
                        f"identical results; best of {args.repeat})")
    for col in ("command", "wall s", "CPU s", "peak RSS MiB", "speed-up (wall)", "memory ratio"):
        table.add_column(col, justify="right")
    for name in ("original", "loop", "rlipv2"):
        if name in files:
            r = files[name]
            base = "original" if "original" in files else "loop"
            table.add_row(name, f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}", f"{r['peak_rss_mib']:.0f}",
                          f"{files[base]['wall_s'] / r['wall_s']:.1f}x",
                          f"{r['peak_rss_mib'] / files[base]['peak_rss_mib']:.2f}")
    console.print(table)
    if runs:
        table = Table(title=f"HICO-DET evaluation in process (same parsed inputs ({args.input}), identical results; "
                            f"best of {args.repeat})")
        for col in ("input", "images", "loop s", "vectorised s", "speed-up", "speed-up (CPU)", "mAP"):
            table.add_column(col, justify="right")
        for r in runs:
            table.add_row(r["input"].split(":")[0], str(r["images"]), f"{r['loop_s']:.2f}", f"{r['vectorised_s']:.2f}",
                          f"{r['speedup']:.1f}x", f"{r['speedup_cpu']:.1f}x", f"{r['mAP']:.6f}")
        console.print(table)
    out = args.out or results / "eval_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
