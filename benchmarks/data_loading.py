"""Data-loading throughput: the streaming pipeline against an original-style loader, side by side.

Both loaders read the same generated images (~640x480 JPEGs with boxes and relations), apply the
same augmentation (flip, colour jitter, random resize / resize-crop-resize, ImageNet
normalisation), build the same per-batch label sequence and pad the batch, with the same batch
size and number of worker processes.

- streaming: MDS shards → `RelationalStream` (uint8 decode, uint8 resize, colour jitter and
  normalisation fused into the padded batch) → `Collator`.
- original: one JSON annotation file + JPEG files, `PIL.Image.open` per image, DETR-style
  transforms on PIL images then `ToTensor` + `Normalize` (as the original code), float padding.
- original-float: the same, but converted to a float tensor right after decoding and augmented
  with torchvision on float tensors.

Each loader runs `--rounds` epochs, interleaved; the best epoch counts. Throughput is reported per
wall-clock second and per CPU-second of the whole loader (workers + main process, start-up
included): the per-core figure, which the load of a shared machine does not distort.
Prints a table and writes `benchmarks/results/data_loading.json`.

    python benchmarks/data_loading.py [--images 240] [--workers 2] [--batch-size 4]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import encode_jpeg

from rlipv2_scale.config import from_dict
from rlipv2_scale.data.config import DataConfig, TransformConfig
from rlipv2_scale.data.labels import LabelVocabulary, build_label_sequence
from rlipv2_scale.data.schema import ImageInfo, Object, Relation, RelationalRecord
from rlipv2_scale.data.shards import write_shards
from rlipv2_scale.data.streaming import build_train_loader

OBJECTS = [f"object{i}" for i in range(60)]
PREDICATES = [f"predicate{i}" for i in range(25)]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# -- generated data -------------------------------------------------------------------------------
def make_records(n: int, seed: int) -> list[RelationalRecord]:
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        # Smooth colour field + texture: JPEG sizes close to photographs (~100-200 kB at q90).
        base = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 16, generator=g) * 255, size=(480, 640),
                                               mode="bicubic", align_corners=False)[0]
        pixels = (base + torch.randn(3, 480, 640, generator=g) * 18).clamp(0, 255).to(torch.uint8)
        objects = []
        for _ in range(rng.randint(3, 8)):
            x1, y1 = rng.uniform(0, 560), rng.uniform(0, 400)
            objects.append(Object((x1, y1, rng.uniform(x1 + 8, 640), rng.uniform(y1 + 8, 480)), rng.choice(OBJECTS)))
        relations = [Relation(rng.randrange(len(objects)), rng.randrange(len(objects)), rng.choice(PREDICATES))
                     for _ in range(rng.randint(2, 6))]
        records.append(RelationalRecord(ImageInfo(i, "bench", "train", 640, 480, f"{i:06d}.jpg"), objects, relations,
                                        image_bytes=encode_jpeg(pixels, quality=90).numpy().tobytes()))
    return records


def write_original_layout(records: list[RelationalRecord], root: Path) -> Path:
    """JPEG files + one JSON annotation list, the way the original datasets are stored."""
    (root / "images").mkdir(parents=True)
    entries = []
    for r in records:
        (root / "images" / r.image.file_name).write_bytes(r.image_bytes)
        entries.append({"file_name": r.image.file_name, "image_id": r.image.id,
                        "objects": [{"bbox": list(o.box), "name": o.name} for o in r.objects],
                        "relationships": [{"subject_id": x.subject, "object_id": x.object, "predicate": x.predicate}
                                          for x in r.relations]})
    path = root / "annotations.json"
    path.write_text(json.dumps(entries))
    return path


# -- the original-style loader ----------------------------------------------------------------------
class OriginalStyleDataset(Dataset):
    """Per item: PIL open, DETR transforms (on PIL, or on float tensors), ToTensor, Normalize."""

    def __init__(self, ann_path: Path, cfg: TransformConfig, float_ops: bool):
        self.entries = json.loads(ann_path.read_text())
        self.root = ann_path.parent / "images"
        self.cfg = cfg
        self.float_ops = float_ops
        self.jitter = T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation)

    def __len__(self) -> int:
        return len(self.entries)

    def _resize(self, img, boxes: torch.Tensor, size: int, max_size: int | None):
        w, h = (img.size if isinstance(img, Image.Image) else (img.shape[-1], img.shape[-2]))
        short, long = min(w, h), max(w, h)
        if max_size is not None and long / short * size > max_size:
            size = int(round(max_size * short / long))
        oh, ow = (int(size * h / w), size) if w < h else (size, int(size * w / h))
        img = TF.resize(img, [oh, ow], antialias=True)
        return img, boxes * torch.tensor([ow / w, oh / h, ow / w, oh / h])

    def __getitem__(self, idx: int):
        e = self.entries[idx]
        img = Image.open(self.root / e["file_name"]).convert("RGB")
        if self.float_ops:
            img = TF.to_tensor(img)
        boxes = torch.tensor([o["bbox"] for o in e["objects"]], dtype=torch.float32)
        cfg = self.cfg
        w = img.size[0] if isinstance(img, Image.Image) else img.shape[-1]
        if random.random() < cfg.flip_prob:
            img = TF.hflip(img)
            boxes = boxes[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([w, 0, w, 0])
        img = self.jitter(img)
        if random.random() < cfg.crop_prob:
            img, boxes = self._resize(img, boxes, random.choice(cfg.crop_scales), None)
            w, h = (img.size if isinstance(img, Image.Image) else (img.shape[-1], img.shape[-2]))
            cw = random.randint(min(cfg.crop_min, w), min(w, cfg.crop_max))
            ch = random.randint(min(cfg.crop_min, h), min(h, cfg.crop_max))
            top, left = random.randint(0, h - ch), random.randint(0, w - cw)
            img = TF.crop(img, top, left, ch, cw)
            boxes = torch.minimum((boxes - torch.tensor([left, top, left, top])).reshape(-1, 2, 2),
                                  torch.tensor([cw, ch])).clamp(min=0).reshape(-1, 4)
        img, boxes = self._resize(img, boxes, random.choice(cfg.train_scales), cfg.max_size)
        if not self.float_ops:
            img = TF.to_tensor(img)
        img = TF.normalize(img, MEAN, STD)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        names = [o["name"] for o, k in zip(e["objects"], keep.tolist()) if k]
        preds = [r["predicate"] for r in e["relationships"]
                 if keep[r["subject_id"]] and keep[r["object_id"]]]
        return img, {"boxes": boxes[keep], "obj_classes": names, "verb_classes": preds}


class OriginalStyleCollate:
    def __init__(self, vocab: LabelVocabulary, cfg: DataConfig):
        self.vocab, self.cfg = vocab, cfg

    def __call__(self, items):
        imgs = [i for i, _ in items]
        h = max(i.shape[1] for i in imgs)
        w = max(i.shape[2] for i in imgs)
        batch = torch.zeros(len(imgs), 3, h, w)
        mask = torch.ones(len(imgs), h, w, dtype=torch.bool)
        for k, img in enumerate(imgs):
            batch[k, :, :img.shape[1], :img.shape[2]].copy_(img)
            mask[k, :img.shape[1], :img.shape[2]] = False
        labels = build_label_sequence((t["obj_classes"] for _, t in items), (t["verb_classes"] for _, t in items),
                                      self.vocab, self.cfg.num_obj_labels, self.cfg.num_rel_labels,
                                      torch.Generator().manual_seed(random.randrange(1 << 31)))
        return batch, mask, [t for _, t in items], labels


# -- measuring ----------------------------------------------------------------------------------------
def _children_cpu_seconds() -> float:
    """CPU time (user + system) of this process's live children: the loader workers."""
    me, total = os.getpid(), 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path("/proc", entry, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:            # field 4 of stat: the parent pid
            total += int(fields[11]) + int(fields[12])   # fields 14, 15: utime, stime (ticks)
    return total / os.sysconf("SC_CLK_TCK")


def run_epoch(loader, count) -> dict:
    """One epoch: wall-clock images/s, and images per CPU-second spent by the loader (workers +
    main process, start-up included), which a shared machine's load does not distort."""
    n = len(loader)
    cpu0, wall0, children0 = time.process_time(), time.perf_counter(), _children_cpu_seconds()
    it = iter(loader)
    images = 0
    for _ in range(n):
        images += count(next(it))
    # Before the workers exit; the difference also covers workers that persist across epochs.
    cpu = time.process_time() - cpu0 + _children_cpu_seconds() - children0
    wall = time.perf_counter() - wall0
    for _ in it:
        pass
    return {"images": images, "seconds": wall, "cpu_seconds": cpu, "images_per_s": images / wall,
            "images_per_cpu_s": images / cpu}


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_count": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "platform": platform.platform()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_loading.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="rlipv2-bench-") as tmp:
        root = Path(tmp)
        records = make_records(args.images, seed=0)
        ann_path = write_original_layout(records, root / "original")
        write_shards(records, root / "shards")
        cfg = from_dict(DataConfig, {"sources": [{"name": "bench", "local": str(root / "shards")}],
                                     "batch_size": args.batch_size, "num_workers": args.workers})
        vocab = LabelVocabulary.from_records(records)
        del records   # forked workers should not inherit (and copy-on-write) the generated bytes
        loaders = {
            "streaming": (build_train_loader(cfg, vocab=vocab), lambda b: b.batch_size),
        }
        for name, float_ops in (("original", False), ("original-float", True)):
            ds = OriginalStyleDataset(ann_path, cfg.transforms, float_ops)
            loaders[name] = (DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                        num_workers=args.workers, collate_fn=OriginalStyleCollate(vocab, cfg),
                                        prefetch_factor=cfg.prefetch_factor if args.workers else None),
                             lambda b: b[0].shape[0])
        rounds: dict[str, list[dict]] = {name: [] for name in loaders}
        for r in range(args.rounds):
            for name, (loader, count) in loaders.items():
                rounds[name].append(run_epoch(loader, count))
                x = rounds[name][-1]
                print(f"round {r} {name:15s} {x['images_per_s']:8.1f} images/s {x['images_per_cpu_s']:8.1f} "
                      f"images/cpu-s", file=sys.stderr)

    best = {name: max(x["images_per_s"] for x in rs) for name, rs in rounds.items()}
    per_cpu = {name: max(x["images_per_cpu_s"] for x in rs) for name, rs in rounds.items()}
    baseline = max(per_cpu["original"], per_cpu["original-float"])
    result = {
        "benchmark": "data_loading",
        "machine": machine(),
        "config": {"images": args.images, "image_size": [480, 640], "workers": args.workers,
                   "batch_size": args.batch_size, "rounds": args.rounds,
                   "transforms": "flip 0.5, colour jitter 0.4/0.4/0.4, resize 480-800/1333 or "
                                 "resize 400-600 -> crop 384-600 -> resize (p 0.5), ImageNet normalisation",
                   "label_sequence": [cfg.num_obj_labels, cfg.num_rel_labels]},
        "images_per_s": best,
        "images_per_cpu_s": per_cpu,
        "rounds": rounds,
        # Per core: images per CPU-second of the whole loader (workers + main process).
        "ratio_per_core_vs_original": per_cpu["streaming"] / per_cpu["original"],
        "ratio_per_core_vs_original_float": per_cpu["streaming"] / per_cpu["original-float"],
        "ratio_per_core_vs_best_baseline": per_cpu["streaming"] / baseline,
        "ratio_wall_clock_vs_original": best["streaming"] / best["original"],
    }
    print(f"{'loader':16s} {'images/s':>10s} {'images/cpu-s':>13s}")
    for name in best:
        print(f"{name:16s} {best[name]:10.1f} {per_cpu[name]:13.1f}")
    print(f"per core: streaming / original       = {result['ratio_per_core_vs_original']:.2f}x")
    print(f"per core: streaming / original-float = {result['ratio_per_core_vs_original_float']:.2f}x")
    print(f"wall clock: streaming / original     = {result['ratio_wall_clock_vs_original']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
