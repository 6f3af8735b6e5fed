"""Pictures of a run: detected relations drawn on images, loss and validation curves.

Drawing works on the community HICO-DET prediction form (`models.postprocess.to_hico_json`):
boxes with a category id, triplets pointing at them with a score. Plots use matplotlib's
non-interactive backend, so they work on machines without a display.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

SUBJECT_COLOUR = (230, 40, 40)
OBJECT_COLOUR = (30, 110, 240)
LINK_COLOUR = (250, 200, 0)


@dataclass(frozen=True)
class DrawnTriplet:
    subject: str
    predicate: str
    object: str
    score: float
    sub_box: tuple[float, float, float, float]     # xyxy in original-image pixels
    obj_box: tuple[float, float, float, float]

    @property
    def text(self) -> str:
        return f"{self.subject} {self.predicate} {self.object} {self.score:.2f}"


def top_triplets(prediction: dict, objects: Sequence[str], predicates: Sequence[str], *, object_ids: Sequence[int],
                 verb_ids: Sequence[int], threshold: float = 0.3, top: int = 5) -> list[DrawnTriplet]:
    """The `top` highest-scored triplets of one image's prediction at or above `threshold`,
    one per (subject box, predicate, object box) text (duplicates of a pair are dropped)."""
    obj_name = dict(zip(object_ids, objects))
    verb_name = dict(zip(verb_ids, predicates))
    boxes = prediction["predictions"]
    out: list[DrawnTriplet] = []
    seen: set[tuple] = set()
    for h in sorted(prediction["hoi_prediction"], key=lambda h: -h["score"]):
        if h["score"] < threshold or len(out) >= top:
            break
        s, o = boxes[h["subject_id"]], boxes[h["object_id"]]
        key = (obj_name[s["category_id"]], verb_name[h["category_id"]], obj_name[o["category_id"]],
               tuple(round(v) for v in s["bbox"]), tuple(round(v) for v in o["bbox"]))
        if key in seen:
            continue
        seen.add(key)
        out.append(DrawnTriplet(key[0], key[1], key[2], float(h["score"]), tuple(s["bbox"]), tuple(o["bbox"])))
    return out


def draw_relations(image: Image.Image, triplets: Iterable[DrawnTriplet], scale: int = 4) -> Image.Image:
    """`image` enlarged `scale` times with each triplet's subject (red) and object (blue) boxes, a
    line between their centres and a numbered caption listed under the picture."""
    triplets = list(triplets)
    image = image.convert("RGB")
    w, h = image.size
    big = image.resize((w * scale, h * scale), Image.Resampling.NEAREST)
    font = ImageFont.load_default()
    line_h = 14
    canvas = Image.new("RGB", (big.width, big.height + line_h * max(1, len(triplets)) + 6), (255, 255, 255))
    canvas.paste(big, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, t in enumerate(triplets, 1):
        sb = [v * scale for v in t.sub_box]
        ob = [v * scale for v in t.obj_box]
        draw.rectangle(sb, outline=SUBJECT_COLOUR, width=2)
        draw.rectangle(ob, outline=OBJECT_COLOUR, width=2)
        sc = ((sb[0] + sb[2]) / 2, (sb[1] + sb[3]) / 2)
        oc = ((ob[0] + ob[2]) / 2, (ob[1] + ob[3]) / 2)
        draw.line([sc, oc], fill=LINK_COLOUR, width=2)
        draw.text((sc[0] + 2, sc[1] + 2), str(k), fill=LINK_COLOUR, font=font)
        draw.text((4, big.height + 3 + (k - 1) * line_h), f"{k}. {t.text}", fill=(0, 0, 0), font=font)
    if not triplets:
        draw.text((4, big.height + 3), "no relation above the threshold", fill=(0, 0, 0), font=font)
    return canvas


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(records: Sequence[dict], out: str | Path, title: str = "training",
                  val_label: str = "validation mAP") -> Path:
    """Training loss against steps (left axis) and the trainer's validation mAP (`val/mAP`, right
    axis) in one PNG."""
    plt = _pyplot()
    train = [r for r in records if "loss" in r]
    val = [r for r in records if r.get("val/mAP") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (weighted total)")
    ax.set_yscale("log")
    lines, labels = ax.get_legend_handles_labels()
    if val:
        ax2 = ax.twinx()
        pts = [(r["step"], r["val/mAP"]) for r in val if r.get("val/mAP") is not None]
        ax2.plot(*zip(*pts), marker="o", color="tab:green", label=val_label)
        ax2.set_ylabel("mAP (%)")
        l2, n2 = ax2.get_legend_handles_labels()
        lines, labels = lines + l2, labels + n2
    ax.legend(lines, labels, loc="upper center")
    ax.set_title(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_curves(curves: Mapping[str, Sequence[tuple[int, float]]], out: str | Path, *, ylabel: str = "validation mAP (%)",
                title: str = "") -> Path:
    """One line per named (step, value) curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
