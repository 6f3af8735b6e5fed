"""`rlipv2 eval hico-det | vcoco | oi-sgg`: score prediction files with the published protocols.

Each command prints a table and, with `--json OUT`, writes the numbers as fractions. The logic lives
in `rlipv2_scale.eval`; the parsers are built by `add_*_arguments` so later commands can extend them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlipv2_scale.errors import UserError

HICO_SPLITS = ("UC-RF", "UC-NF", "UO")


def add_hico_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gt", required=True, type=Path, help="ground truth in the QPIC form (test_hico.json)")
    p.add_argument("--pred", type=Path,  # required by run_hico, so other prediction sources can be added
                   help="predictions: JSON list of {file_name, predictions, hoi_prediction} (or per-query "
                        "verb_scores / sub_ids / obj_ids)")
    p.add_argument("--train", type=Path, help="training annotations (trainval_hico.json) for the rare / non-rare split")
    p.add_argument("--zero-shot", metavar="SPLIT",
                   help=f"report unseen / seen mAP for a split: {', '.join(HICO_SPLITS)}, or a JSON file of unseen "
                        "[subject, object, verb] index triplets (e.g. for NF)")
    p.add_argument("--strict", action="store_true",
                   help="the fixed protocol (matching falls back to the next-best unmatched pair, continuous IoU, "
                        "exact 11 points, ...); not comparable with published numbers")
    p.add_argument("--nms", action="store_true",
                   help="apply the original post-processing's triplet NMS (0.7 / alpha 1 / beta 0.5) to each top-100")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON (fractions)")


def add_vcoco_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vcoco", required=True, type=Path, help="V-COCO annotations (vcoco_test.json)")
    p.add_argument("--coco", required=True, type=Path, help="COCO instances (instances_vcoco_all_2014.json)")
    p.add_argument("--image-ids", required=True, type=Path, help="image ids of the split (vcoco_test.ids)")
    p.add_argument("--detections", required=True, type=Path,
                   help="detections in the official format (.pkl from the official export, or the same as JSON)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON (fractions)")


def add_oi_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gt", required=True, type=Path, help="ground truth (OI_SGG_test.json)")
    p.add_argument("--pred", required=True, type=Path,
                   help="predictions: JSON list of {file_name, predictions, rel_predictions} or the per-query form")
    p.add_argument("--no-nms", action="store_true", help="skip the pairwise and phrase NMS the original applies")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON (fractions)")


def register(tree) -> None:
    add_hico_arguments(tree.group_command("eval", "hico-det", "HICO-DET mAP (Default: full, rare, non-rare; "
                                          "zero-shot unseen / seen)", run_hico))
    add_vcoco_arguments(tree.group_command("eval", "vcoco", "V-COCO role AP, scenarios 1 and 2 (official toolkit)",
                                           run_vcoco))
    add_oi_arguments(tree.group_command("eval", "oi-sgg", "Open Images v6 SGG: R@50, wmAP_rel, wmAP_phr, score_wtd",
                                        run_oi))


def _report(title: str, rows: list[tuple[str, float | None]], results: dict, out: Path | None) -> int:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value (%)", justify="right")
    for name, value in rows:
        table.add_row(name, "-" if value is None else f"{100 * value:.2f}")
    Console().print(table)
    for w in results.get("warnings", []):
        Console(stderr=True).print(f"[yellow]warning:[/yellow] {w}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    return 0


def run_hico(args: argparse.Namespace) -> int:
    from rlipv2_scale.eval.files import read_json, read_unseen_triplets
    from rlipv2_scale.eval.hico import evaluate_hico
    from rlipv2_scale.eval.label_space import hico_label_space
    from rlipv2_scale.eval.triplet_nms import TripletNMS

    if args.pred is None:
        raise UserError("rlipv2 eval hico-det: give the predictions with --pred FILE")
    space = hico_label_space()
    zero_shot = args.zero_shot
    if zero_shot == "NF":
        raise UserError("--zero-shot NF has no built-in split: pass the file of unseen triplets, --zero-shot FILE")
    if zero_shot is not None and zero_shot not in HICO_SPLITS:
        zero_shot = read_unseen_triplets(zero_shot, space)
    train = read_json(args.train, "training annotations") if args.train else None
    res = evaluate_hico(read_json(args.gt, "ground truth"), read_json(args.pred, "predictions"), train=train,
                        zero_shot=zero_shot, label_space=space, strict=args.strict,
                        nms=TripletNMS() if args.nms else None)
    rows = [("mAP (full)", res["mAP"]), ("mAP rare", res["mAP_rare"]), ("mAP non-rare", res["mAP_non_rare"]),
            ("mean max recall", res["mean_max_recall"])]
    if zero_shot is not None:
        rows += [("mAP unseen", res["mAP_unseen"]), ("mAP seen", res["mAP_seen"])]
    return _report(f"HICO-DET ({res['protocol']} protocol, {res['n_triplets']} triplets)", rows, res, args.json)


def run_vcoco(args: argparse.Namespace) -> int:
    from rlipv2_scale.eval.vcoco import evaluate_vcoco_files

    res = evaluate_vcoco_files(args.vcoco, args.coco, args.image_ids, args.detections)
    rows = [("role AP scenario 1", res["AP_role_s1"]), ("role AP scenario 2", res["AP_role_s2"]),
            ("scenario 1 without point", res["AP_role_s1_no_point"]),
            ("scenario 2 without point", res["AP_role_s2_no_point"])]
    return _report("V-COCO role AP", rows, res, args.json)


def run_oi(args: argparse.Namespace) -> int:
    from rlipv2_scale.eval.files import read_json
    from rlipv2_scale.eval.oi_sgg import evaluate_oi_sgg

    res = evaluate_oi_sgg(read_json(args.gt, "ground truth"), read_json(args.pred, "predictions"), nms=not args.no_nms)
    rows = [("R@50", res["recall@50"]), ("wmAP_rel", res["wmAP_rel"]), ("wmAP_phr", res["wmAP_phr"]),
            ("score_wtd", res["score_wtd"])]
    return _report("Open Images v6 SGG", rows, res, args.json)
