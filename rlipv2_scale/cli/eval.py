"""`rlipv2 eval hico-det | vcoco | oi-sgg`: score prediction files with the published protocols, or run
a model directory over a benchmark's test set and score it (`--checkpoint DIR --data ROOT`).
`rlipv2 eval synthetic` scores a model on a split of the synthetic world as `rlipv2 demo` does.

Each command prints a table and, with `--json OUT`, writes the numbers as fractions. The logic lives
in `rlipv2_scale.eval` and `rlipv2_scale.inference`; the parsers are built by `add_*_arguments` so
later commands can extend them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from rlipv2_scale.cli import DEVICE, check_visible_device
from rlipv2_scale.errors import UserError

HICO_SPLITS = ("UC-RF", "UC-NF", "UO")


def add_model_arguments(p: argparse.ArgumentParser, data_help: str) -> argparse._ArgumentGroup:
    """The options of running a model (`--checkpoint DIR --data ROOT`), shared by every benchmark."""
    model = p.add_argument_group("running a model (instead of a prediction file)")
    model.add_argument("--checkpoint", type=Path, metavar="MODEL",
                       help="model directory (`rlipv2 export`, `rlipv2 import-checkpoint`), or a training run / "
                            "checkpoint (exported on the fly)")
    model.add_argument("--data", type=Path, metavar="ROOT", help=data_help)
    model.add_argument("--images", type=Path, help="test image folder (default: found under --data)")
    model.add_argument("--batch-size", type=int, default=2, help="images per forward pass and GPU")
    model.add_argument("--num-workers", type=int, default=2, help="image-decoding worker processes")
    model.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    model.add_argument("--eval-size", type=int,
                       help="shorter image side (default: the model's, from its card; the original's: 800)")
    model.add_argument("--max-size", type=int, help="cap on the longer side (default: the model's; the original's: 1333)")
    model.add_argument("--save-predictions", type=Path, metavar="FILE", help="also write the predictions JSON")
    return model


def add_hico_arguments(p: argparse.ArgumentParser) -> None:
    files = p.add_argument_group("scoring a prediction file")
    files.add_argument("--gt", type=Path, help="ground truth in the QPIC form (test_hico.json)")
    files.add_argument("--pred", type=Path,
                       help="predictions: JSON list of {file_name, predictions, hoi_prediction} (or per-query "
                            "verb_scores / sub_ids / obj_ids)")
    add_model_arguments(p, "HICO-DET root (annotations/test_hico.json, images/test2015/)")
    p.add_argument("--train", type=Path, help="training annotations (trainval_hico.json) for the rare / non-rare "
                                              "split (with --data: found there by default)")
    p.add_argument("--zero-shot", metavar="SPLIT",
                   help=f"report unseen / seen mAP for a split: {', '.join(HICO_SPLITS)}, or a JSON file of unseen "
                        "[subject, object, verb] index triplets; with --checkpoint also NF (no fine-tuning: keep "
                        "pairs whose subject is a person)")
    p.add_argument("--strict", action="store_true",
                   help="the fixed protocol (matching falls back to the next-best unmatched pair, continuous IoU, "
                        "exact 11 points, ...); not comparable with published numbers")
    p.add_argument("--nms", action=argparse.BooleanOptionalAction, default=None,
                   help="the original post-processing's triplet NMS (0.7 / alpha 1 / beta 0.5) on each top-100; "
                        "default: off for --pred (files are scored as given), on for --checkpoint (as the "
                        "original's fine-tuning scripts, --use_nms_filter)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON (fractions)")


def add_vcoco_arguments(p: argparse.ArgumentParser) -> None:
    files = p.add_argument_group("scoring a detection file (with --checkpoint: override the files under --data)")
    files.add_argument("--vcoco", type=Path, help="V-COCO annotations (vcoco_test.json)")
    files.add_argument("--coco", type=Path, help="COCO instances (instances_vcoco_all_2014.json)")
    files.add_argument("--image-ids", type=Path, help="image ids of the split (vcoco_test.ids)")
    files.add_argument("--detections", type=Path,
                       help="detections in the official format (JSON, or the .pkl of the official export with "
                            "--trust-pickle)")
    files.add_argument("--trust-pickle", action="store_true",
                       help="read a .pkl --detections file (unpickling can run code: trusted files only)")
    model = add_model_arguments(p, "V-COCO root (annotations/test_vcoco.json, annotations/corre_vcoco.npy, "
                                   "images/val2014/, and the official toolkit's data/: vcoco/vcoco_test.json, "
                                   "instances_vcoco_all_2014.json, splits/vcoco_test.ids)")
    model.add_argument("--test", type=Path, help="the test images to run, QPIC form (test_vcoco.json)")
    model.add_argument("--correct-mat", type=Path, help="valid action-object matrix (corre_vcoco.npy)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON (fractions)")


def add_oi_arguments(p: argparse.ArgumentParser) -> None:
    files = p.add_argument_group("scoring a prediction file")
    files.add_argument("--gt", type=Path, help="ground truth (OI_SGG_test.json; with --checkpoint: found under --data)")
    files.add_argument("--pred", type=Path,
                       help="predictions: JSON list of {file_name, predictions, rel_predictions} or the per-query form")
    model = add_model_arguments(p, "Open Images v6 root (annotations/OI_SGG_test.json, "
                                   "annotations/OI_SGG_trainval_test_categories_dict.json, "
                                   "annotations/categories_dict.json, images/)")
    model.add_argument("--categories", type=Path,
                       help="object and predicate names (OI_SGG_trainval_test_categories_dict.json)")
    model.add_argument("--object-categories", type=Path,
                       help="all object names, which the annotations' category_id index (categories_dict.json)")
    p.add_argument("--no-nms", action="store_true", help="skip the pairwise and phrase NMS the original applies")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON (fractions)")


def add_synthetic_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, metavar="MODEL",
                   help="model directory, training run or checkpoint (exported on the fly)")
    p.add_argument("--data", type=Path, required=True, metavar="SPLIT",
                   help="a split folder of the synthetic world: `rlipv2 demo`'s OUT/data/test, or `rlipv2 data "
                        "synth --split test --out DIR`")
    p.add_argument("--split", choices=("train", "val", "test"), help="default: the one the folder holds")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--eval-size", type=int, help="shorter image side (default: the model's, from its card)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON (percent, as the demo)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def register(tree) -> None:
    add_hico_arguments(tree.group_command("eval", "hico-det", "HICO-DET mAP (Default: full, rare, non-rare; "
                                          "zero-shot unseen / seen)", run_hico))
    add_vcoco_arguments(tree.group_command("eval", "vcoco", "V-COCO role AP, scenarios 1 and 2 (official toolkit)",
                                           run_vcoco))
    add_oi_arguments(tree.group_command("eval", "oi-sgg", "Open Images v6 SGG: R@50, wmAP_rel, wmAP_phr, score_wtd",
                                        run_oi))
    add_synthetic_arguments(tree.group_command(
        "eval", "synthetic", "the synthetic world (the demo's scoring): relation mAP on seen and held-out triplets",
        run_synthetic))


def _report(title: str, rows: list[tuple[str, float | None]], results: dict, out: Path | None) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value (%)", justify="right")
    for name, value in rows:
        table.add_row(name, "-" if value is None else f"{100 * value:.2f}")
    Console().print(table)
    for w in results.get("warnings", []):      # one plain line each, as every other command warns
        print(f"rlipv2: warning: {w}", file=sys.stderr, flush=True)
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2))
        except OSError as exc:
            raise UserError(f"--json {out}: cannot write the results there ({exc.strerror or exc}); choose another "
                            f"path") from None
    return 0


def _check_json_out(out: Path | None) -> None:
    """Refuse a --json path that cannot be written before any scoring (or model run) is spent on it:
    a folder, a parent that is a file, or a place where no file can be created."""
    if out is None:
        return
    if out.is_dir():
        raise UserError(f"--json {out} is a folder; give a file path, e.g. {out / 'results.json'}")
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--json {out}: {existing} is a file, not a folder; choose another path")
    if out.exists():
        if not os.access(out, os.W_OK):
            raise UserError(f"--json {out}: the file is not writable; choose another path")
        return
    try:   # os.access answers yes for root in places such as /proc: create (and remove) a file to be sure
        with tempfile.TemporaryFile(dir=existing, prefix=".rlipv2-json-"):
            pass
    except OSError as exc:
        raise UserError(f"--json {out}: cannot create a file in {existing} ({exc.strerror or exc}); choose another "
                        f"path") from None


def _check_model_options(args: argparse.Namespace) -> None:
    """--device, sizes and counts of running a model, checked before the model is loaded."""
    device = args.device
    if device is not None:
        if not DEVICE.fullmatch(device):
            raise UserError(f"--device {device}: expected cpu, cuda or cuda:N (e.g. cuda:1)")
        check_visible_device(device)
    for name in ("eval_size", "max_size", "batch_size"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if getattr(args, "num_workers", None) is not None and args.num_workers < 0:
        raise UserError(f"--num-workers must be 0 or more, got {args.num_workers}")


def _preflight(args: argparse.Namespace) -> None:
    """What can be checked before any file is read or model run."""
    _check_json_out(args.json)
    if args.checkpoint is not None:
        _check_model_options(args)


def run_hico(args: argparse.Namespace) -> int:
    from rlipv2_scale.eval.files import read_unseen_triplets
    from rlipv2_scale.eval.hico import evaluate_hico_files
    from rlipv2_scale.eval.triplet_nms import TripletNMS
    from rlipv2_scale.labels.space import hico_label_space

    _preflight(args)

    if args.checkpoint is not None:
        return _run_hico_checkpoint(args)
    if args.pred is None or args.gt is None:
        raise UserError("rlipv2 eval hico-det: give --gt FILE and --pred FILE, or run a model with "
                        "--checkpoint DIR --data ROOT")
    from rlipv2_scale.inference import data_label_space

    # As `--checkpoint` scores it: the dataset's own objects.json / verbs.json beside --gt, else HICO-DET's.
    space = data_label_space(Path(args.gt).parent) or hico_label_space()
    zero_shot = args.zero_shot
    if zero_shot == "NF":
        raise UserError("--zero-shot NF has no built-in split: pass the file of unseen triplets, --zero-shot FILE")
    if zero_shot is not None and zero_shot not in HICO_SPLITS:
        zero_shot = read_unseen_triplets(zero_shot, space)
    res = evaluate_hico_files(args.gt, args.pred, train=args.train, zero_shot=zero_shot, label_space=space,
                              strict=args.strict, nms=TripletNMS() if args.nms else None)  # None (not given) = off for files
    rows = [("mAP (full)", res["mAP"]), ("mAP rare", res["mAP_rare"]), ("mAP non-rare", res["mAP_non_rare"]),
            ("mean max recall", res["mean_max_recall"])]
    if zero_shot is not None:
        rows += [("mAP unseen", res["mAP_unseen"]), ("mAP seen", res["mAP_seen"])]
    return _report(f"HICO-DET ({res['protocol']} protocol, {res['n_triplets']} triplets)", rows, res, args.json)


def _run_hico_checkpoint(args: argparse.Namespace) -> int:
    from rlipv2_scale.inference import evaluate_checkpoint

    if args.pred is not None:
        raise UserError("rlipv2 eval hico-det: --pred and --checkpoint exclude each other")
    if args.data is None and (args.gt is None or args.images is None):
        raise UserError("give the HICO-DET root with --data ROOT (or --gt FILE and --images DIR)")
    with _checkpoint(args) as model_dir:
        res = evaluate_checkpoint(model_dir, args.data, args.zero_shot, test=args.gt, images=args.images,
                                  train=args.train, nms=args.nms is not False, **_model_options(args))
    if res is None:          # not rank 0 of a distributed evaluation
        return 0
    res["checkpoint"] = str(args.checkpoint)
    rows = [("mAP (full)", res["mAP"]), ("mAP rare", res["mAP_rare"]), ("mAP non-rare", res["mAP_non_rare"])]
    if "mAP_unseen" in res:
        rows += [("mAP unseen", res["mAP_unseen"]), ("mAP seen", res["mAP_seen"])]
    return _report(f"HICO-DET, {args.checkpoint} ({res['setting']})", rows, res, args.json)


def _checkpoint(args: argparse.Namespace):
    """A model directory for `--checkpoint` (a run or checkpoint is exported on the fly)."""
    from rlipv2_scale.train.export import as_model_dir

    return as_model_dir(args.checkpoint)


def _model_options(args: argparse.Namespace) -> dict:
    return dict(batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
                eval_size=args.eval_size, max_size=args.max_size, predictions_out=args.save_predictions)


VCOCO_ROWS = (("role AP scenario 1", "AP_role_s1"), ("role AP scenario 2", "AP_role_s2"),
              ("scenario 1 without point", "AP_role_s1_no_point"), ("scenario 2 without point", "AP_role_s2_no_point"))


def run_vcoco(args: argparse.Namespace) -> int:
    from rlipv2_scale.eval.vcoco import evaluate_vcoco_files

    _preflight(args)

    if args.checkpoint is not None:
        return _run_vcoco_checkpoint(args)
    missing = [f"--{k.replace('_', '-')}" for k in ("vcoco", "coco", "image_ids", "detections")
               if getattr(args, k) is None]
    if missing:
        raise UserError(f"rlipv2 eval vcoco: give --vcoco, --coco, --image-ids and --detections (missing "
                        f"{', '.join(missing)}), or run a model with --checkpoint DIR --data ROOT")
    res = evaluate_vcoco_files(args.vcoco, args.coco, args.image_ids, args.detections, args.trust_pickle)
    return _report("V-COCO role AP", [(name, res[key]) for name, key in VCOCO_ROWS], res, args.json)


def _run_vcoco_checkpoint(args: argparse.Namespace) -> int:
    from rlipv2_scale.inference import evaluate_vcoco_checkpoint

    if args.detections is not None:
        raise UserError("rlipv2 eval vcoco: --detections and --checkpoint exclude each other")
    with _checkpoint(args) as model_dir:
        res = evaluate_vcoco_checkpoint(
            model_dir, args.data, test=args.test, images=args.images, correct_mat=args.correct_mat,
            vcoco=args.vcoco, coco=args.coco, image_ids=args.image_ids, **_model_options(args))
    if res is None:          # not rank 0 of a distributed evaluation
        return 0
    res["checkpoint"] = str(args.checkpoint)
    return _report(f"V-COCO role AP, {args.checkpoint}", [(name, res[key]) for name, key in VCOCO_ROWS], res,
                   args.json)


OI_ROWS = (("R@50", "recall@50"), ("wmAP_rel", "wmAP_rel"), ("wmAP_phr", "wmAP_phr"), ("score_wtd", "score_wtd"))


def run_oi(args: argparse.Namespace) -> int:
    from rlipv2_scale.eval.oi_sgg import evaluate_oi_sgg_files

    _preflight(args)

    if args.checkpoint is not None:
        return _run_oi_checkpoint(args)
    if args.gt is None or args.pred is None:
        raise UserError("rlipv2 eval oi-sgg: give --gt FILE and --pred FILE, or run a model with "
                        "--checkpoint DIR --data ROOT")
    res = evaluate_oi_sgg_files(args.gt, args.pred, nms=not args.no_nms)
    return _report("Open Images v6 SGG", [(name, res[key]) for name, key in OI_ROWS], res, args.json)


def _run_oi_checkpoint(args: argparse.Namespace) -> int:
    from rlipv2_scale.inference import evaluate_oi_checkpoint

    if args.pred is not None:
        raise UserError("rlipv2 eval oi-sgg: --pred and --checkpoint exclude each other")
    with _checkpoint(args) as model_dir:
        res = evaluate_oi_checkpoint(
            model_dir, args.data, test=args.gt, images=args.images, categories=args.categories,
            object_categories=args.object_categories, nms=not args.no_nms, **_model_options(args))
    if res is None:
        return 0
    res["checkpoint"] = str(args.checkpoint)
    return _report(f"Open Images v6 SGG, {args.checkpoint}", [(name, res[key]) for name, key in OI_ROWS], res,
                   args.json)


def run_synthetic(args: argparse.Namespace) -> int:
    from rlipv2_scale.demo import evaluate_split

    _preflight(args)

    res = evaluate_split(args.checkpoint, args.data, args.split, eval_size=args.eval_size, device=args.device,
                         progress=not args.no_progress)
    res["checkpoint"] = str(args.checkpoint)
    rows = [("relation mAP (seen triplets)", res["relation_map"]),
            ("zero-shot mAP (held-out triplets)", res["zero_shot_relation_map"]),
            ("mAP (all test triplets)", res["full_map"]), ("mean max recall", res["mean_max_recall"])]
    # The demo's figures are percentages already; _report prints fractions × 100.
    return _report(f"synthetic world, {res['split']} split, {args.checkpoint}",
                   [(n, None if v is None else v / 100) for n, v in rows], res, args.json)
