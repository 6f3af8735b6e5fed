"""`rlipv2 predict IMAGE... --checkpoint MODEL [--objects "a,b" --relations "x,y"] --out DIR` (logic in
`rlipv2_scale.predict`): open-vocabulary relation detection on any images, drawn and as JSON."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

PREDICTIONS = "predictions.json"


def register(tree) -> None:
    p = tree.command("predict", "detect relations among any label texts on images and draw them", run)
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (JPEG, PNG)")
    p.add_argument("--checkpoint", required=True,
                   help="model directory (rlipv2 export / demo / import-checkpoint), Hub id, training run or checkpoint")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle checkpoint files holding objects other than weights (can run code: trusted files only)")
    p.add_argument("--objects", help='comma-separated object texts, e.g. "person,cup,table" (default: the '
                                     "model's own label lists, for fine-tuned models)")
    p.add_argument("--relations", help='comma-separated relation texts, e.g. "holding,on"')
    p.add_argument("--out", type=Path, required=True, help="folder for the drawn images and predictions.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a predictions.json and drawings of the same names already in --out")
    p.add_argument("--threshold", type=float, default=0.3, help="lowest triplet score drawn (default 0.3)")
    p.add_argument("--top", type=int, default=5, help="most triplets drawn per image (default 5)")
    p.add_argument("--size", type=int, help="shorter image side the model sees (default: the model's own, from "
                                            "its card: 800 for the released models, 128 for the demo's)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")


def check_out(out: Path, images: list[Path], drawings: list[str], overwrite: bool) -> None:
    """Refuse to replace a file already in `out` (a user's, or an earlier run's) unless --overwrite,
    and an input image always."""
    from rlipv2_scale.errors import UserError

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose a folder")
    targets = [out / name for name in [PREDICTIONS, *drawings]]
    inputs = {p.resolve() for p in images}
    for target in targets:
        if target.resolve() in inputs:
            raise UserError(f"the drawing {target} would replace the input image of that name; choose another --out")
    present = [t for t in targets if t.exists()]
    if present and not overwrite:
        more = f" (and {len(present) - 1} more)" if len(present) > 1 else ""
        raise UserError(f"{present[0]} already exists{more}; pass --overwrite to replace it, or choose another --out")


def run(args: argparse.Namespace) -> int:
    import torch

    from rlipv2_scale.errors import UserError
    from rlipv2_scale.models.artifacts import card_of
    from rlipv2_scale.predict import draw_predictions, drawing_names, parse_labels, predict_images
    from rlipv2_scale.train.export import open_model

    if not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.top <= 0 or (args.size is not None and args.size <= 0) or args.batch_size <= 0:
        raise UserError("--top, --size and --batch-size must be positive")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = open_model(args.checkpoint, device, trust_pickle=args.trust_pickle)
    card = card_of(model)
    if (args.objects is None) != (args.relations is None):
        raise UserError("give both --objects and --relations, or neither (then the model's own label lists)")
    if args.objects is None:
        if card.objects is None or card.relations is None:   # the card sets both or neither
            raise UserError(f"'{args.checkpoint}' is open-vocabulary (no label lists of its own): give --objects "
                            "and --relations")
        objects, relations = list(card.objects), list(card.relations)
    else:
        objects = parse_labels(args.objects, "objects")
        relations = parse_labels(args.relations, "relations")
    check_out(args.out, args.images, drawing_names(args.images), args.overwrite)   # before the model runs
    size = args.size or card.eval_size
    preds = predict_images(model, args.images, objects, relations, eval_size=size,
                           max_size=max(card.max_size, size), batch_size=args.batch_size, device=device)
    written = draw_predictions(preds, objects, relations, args.out, threshold=args.threshold, top=args.top)
    (args.out / PREDICTIONS).write_text(json.dumps(
        {"objects": objects, "relations": relations, "size": size,
         "images": [{"image": str(p.path), "drawing": drawn.name, **p.prediction}
                    for p, drawn in zip(preds, written)]}))
    for path in written:
        print(path)
    print(f"predictions of {len(preds)} image(s) in {args.out / PREDICTIONS}")
    return 0
