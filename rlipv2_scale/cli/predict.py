"""`rlipv2 predict IMAGE... --checkpoint CKPT --objects "a,b" --relations "x,y" --out DIR` (logic in
`rlipv2_scale.predict`): open-vocabulary relation detection drawn on any images."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(tree) -> None:
    p = tree.command("predict", "detect relations among any label texts on images and draw them", run)
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (JPEG, PNG)")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="model directory (e.g. runs/demo/model), training run directory or checkpoint")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle checkpoint files holding objects other than weights (can run code: trusted files only)")
    p.add_argument("--objects", required=True, help='comma-separated object texts, e.g. "person,cup,table"')
    p.add_argument("--relations", required=True, help='comma-separated relation texts, e.g. "holding,on"')
    p.add_argument("--out", type=Path, required=True, help="folder for the drawn images and predictions.json")
    p.add_argument("--threshold", type=float, default=0.3, help="lowest triplet score drawn (default 0.3)")
    p.add_argument("--top", type=int, default=5, help="most triplets drawn per image (default 5)")
    p.add_argument("--size", type=int, default=128,
                   help="shorter image side the model sees (default 128, the demo's training size)")


def run(args: argparse.Namespace) -> int:
    from rlipv2_scale.errors import UserError
    from rlipv2_scale.predict import draw_predictions, load_model, parse_labels, predict_images

    if not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.top <= 0 or args.size <= 0:
        raise UserError("--top and --size must be positive")
    objects = parse_labels(args.objects, "objects")
    relations = parse_labels(args.relations, "relations")
    model = load_model(args.checkpoint, args.trust_pickle)
    preds = predict_images(model, args.images, objects, relations, eval_size=args.size)
    written = draw_predictions(preds, objects, relations, args.out, threshold=args.threshold, top=args.top)
    (args.out / "predictions.json").write_text(json.dumps(
        {"objects": objects, "relations": relations,
         "images": [{"image": str(p.path), **p.prediction} for p in preds]}))
    for path in written:
        print(path)
    return 0
