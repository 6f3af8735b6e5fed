"""Cost of relational pseudo-labelling: measured CPU throughput of the tiny configs, measured FLOPs
per image of the real ones, and projected GPU-hours for COCO (117,266 images) and Objects365 (1.7 M).

Measured here:
- images/s of captioning with a tiny random BLIP (the real `BlipForConditionalGeneration.generate`
  path: nucleus sampling p = 0.9, 10 captions of length 5-20 per image) and of tagging with the
  tiny Relation Tagger (`TaggerScorer` on 128 px synthetic scenes, every ordered pair of objects a
  candidate, the world's 8 predicates as texts), on this CPU;
- FLOPs per image (`torch.utils.flop_counter`) of the real configs: BLIP-large captioning (ViT-L/16
  at 384 px once per image, then the BERT-base decoder for 10 captions of 20 tokens, counted as one
  full-length forward — the KV-cached steps cost the same linear layers) on the meta device, and
  the R50 Relation Tagger (`tagger_r50`, random init) on CPU at two reduced sizes, extrapolated
  linearly in pixels to the evaluation size (shorter side 800: 800×1066 for COCO's 4:3 images),
  with one candidate group of 100 pairs and 81 object + 50 relation texts. The deformable-attention
  sampling (grid_sample) has no FLOP formula and is not counted.

Projected (not measured): GPU-hours = images × FLOPs per image / (peak bf16 FLOP/s × utilisation).
The utilisations are assumptions, stated in the output: 0.30 for the Tagger (batched forwards) and
0.10 for captioning (autoregressive decoding is memory-bound). This is a compute-bound *lower
bound*: it holds only when decoding, resizing and batching keep the GPU fed. Next to it, the
original's logged tagging times on COCO (Swin-L 0.174 s/img, Swin-T 0.115 s/img, one image per
forward, the original's `scripts/verb_tagger/test_Tagger_swin*.sh`) scaled to both datasets: an un-batched pipeline is 1-2 orders of magnitude slower
than the FLOP bound.

    python benchmarks/pseudo_label.py            # writes benchmarks/results/pseudo_label.json
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

RESULTS = Path(__file__).resolve().parent / "results" / "pseudo_label.json"
DATASETS = {"coco": 117_266, "o365": 1_700_000}
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.4}
UTILISATION = {"tagger": 0.30, "caption": 0.10}                           # assumptions, see the docstring
ORIGINAL_S_PER_IMAGE = {"tagger_swin_l": 0.174, "tagger_swin_t": 0.115}   # the original's `scripts/verb_tagger/test_Tagger_swin*.sh`, logged on COCO


def flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# ------------------------------------------------------------------------------------------- captioning
def tiny_blip(workdir: Path):
    """A random BLIP with a locally trained WordPiece tokenizer (nothing downloaded)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    from rlipv2_scale.data.pseudo.synthetic_captions import NAME_PARAPHRASES, PREDICATE_SYNONYMS

    words = ["a", "picture", "of"] + [w for v in NAME_PARAPHRASES.values() for w in v] + \
        [w for v in PREDICATE_SYNONYMS.values() for p in v for w in p.split()]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([" ".join(words)] * 20, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]))
    tok.save(str(workdir / "tokenizer.json"))
    tokenizer = BertTokenizerFast(tokenizer_file=str(workdir / "tokenizer.json"), bos_token="[DEC]")
    vocab = tokenizer.get_vocab()
    cfg = BlipConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
        text_config=dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, encoder_hidden_size=64,
                         bos_token_id=vocab["[DEC]"], pad_token_id=vocab["[PAD]"], sep_token_id=vocab["[SEP]"],
                         eos_token_id=vocab["[SEP]"]))
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(cfg)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 64, "width": 64}),
                              tokenizer=tokenizer)
    return model, processor


def measure_captioning(images: list[Image.Image], batch: int, repeats: int, workdir: Path) -> dict[str, Any]:
    from rlipv2_scale.data.pseudo.caption import BlipCaptioner, SamplingConfig

    model, processor = tiny_blip(workdir)
    captioner = BlipCaptioner(model, processor, SamplingConfig())
    captioner.caption(images[:batch])                    # warm-up
    t0 = time.perf_counter()
    done = 0
    for _ in range(repeats):
        for k in range(0, len(images), batch):
            out = captioner.caption(images[k:k + batch])
            assert all(len(c) == 10 for c in out)
            done += len(out)
    seconds = time.perf_counter() - t0
    return {"config": "tiny random BLIP (ViT 64-d x2 @ 64 px, decoder 64-d x2)", "images": done,
            "batch": batch, "seconds": round(seconds, 3), "images_per_s": round(done / seconds, 2),
            "captions_per_image": 10}


def blip_large_flops() -> dict[str, float]:
    """BLIP-large (ViT-L/16 @ 384, BERT-base decoder) captioning FLOPs per image, on the meta device."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    cfg = BlipConfig(
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=384, patch_size=16),
        text_config=dict(vocab_size=30524, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, encoder_hidden_size=1024))
    with torch.device("meta"):
        model = BlipForConditionalGeneration(cfg).eval()
        pixels = torch.empty(1, 3, 384, 384)
        ids = torch.zeros(10, 20, dtype=torch.long)
        mask = torch.ones(10, 20, dtype=torch.long)
    holder: dict[str, torch.Tensor] = {}

    def vision() -> None:
        holder["v"] = model.vision_model(pixel_values=pixels)[0]

    vision_flops = flops(vision)
    states = holder["v"].expand(10, -1, -1)
    decoder_flops = flops(lambda: model.text_decoder(input_ids=ids, attention_mask=mask,
                                                     encoder_hidden_states=states))
    return {"vision": vision_flops, "decoder_10x20_tokens": decoder_flops, "per_image": vision_flops + decoder_flops}


# ------------------------------------------------------------------------------------------- tagging
def synthetic_records(n: int, workdir: Path):
    from rlipv2_scale.data.convert import convert
    from rlipv2_scale.data.shards import iter_records
    from rlipv2_scale.data.synthetic import write_split

    write_split(workdir / "raw", n, seed=5, split="test", size=128)
    convert("synthetic", workdir / "raw" / "scene_graphs.json", workdir / "raw", workdir / "shards", "test",
            progress=False)
    return list(iter_records(workdir / "shards"))


def measure_tagging(records, repeats: int) -> dict[str, Any]:
    from rlipv2_scale.data.pseudo.candidates import CandidateChunk
    from rlipv2_scale.data.pseudo.tagger_scorer import TaggerScorer
    from rlipv2_scale.data.synthetic import CLASS_NAMES, PREDICATE_NAMES
    from rlipv2_scale.models.build import build_model
    from rlipv2_scale.models.config import named_config

    torch.manual_seed(0)
    cfg = named_config("tiny_tagger")
    scorer = TaggerScorer(build_model(cfg, pretrained=False), list(CLASS_NAMES), eval_size=128, max_size=128)
    texts = list(PREDICATE_NAMES)
    chunks = []
    for rec in records:
        pairs = list(itertools.permutations(range(len(rec.objects)), 2))
        chunks.append([CandidateChunk(pairs[k:k + cfg.num_pairs], texts, [texts] * len(pairs[k:k + cfg.num_pairs]))
                       for k in range(0, len(pairs), cfg.num_pairs)])
    scorer.score(records[0], chunks[0][0])               # warm-up
    t0 = time.perf_counter()
    pairs_scored = 0
    for _ in range(repeats):
        for rec, cs in zip(records, chunks):
            for c in cs:
                pairs_scored += scorer.score(rec, c).shape[0]
    seconds = time.perf_counter() - t0
    n = len(records) * repeats
    return {"config": "tiny_tagger @ 128 px", "images": n, "seconds": round(seconds, 3),
            "images_per_s": round(n / seconds, 2), "pairs_per_image": round(pairs_scored / n, 2),
            "relation_texts": len(texts)}


def tagger_r50_flops(sizes: list[tuple[int, int]], target: tuple[int, int], num_rel: int = 50) -> dict[str, Any]:
    """Forward FLOPs of `tagger_r50` (random init, local tokenizer) for one 100-pair group at
    reduced sizes, extrapolated linearly in pixels to `target`."""
    from rlipv2_scale.models.build import build_model
    from rlipv2_scale.models.config import named_config
    from rlipv2_scale.models.text import default_label_corpus

    cfg = named_config("tagger_r50")
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, pretrained_weights=None),
                              text=dataclasses.replace(cfg.text, pretrained=None, tokenizer=None))
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).eval()
    words = default_label_corpus()
    objs, rels = words[:80] + ["no objects"], words[80:80 + num_rel]
    n_boxes = 15
    boxes = torch.rand(n_boxes, 4) * 0.4 + 0.3
    labels = torch.arange(n_boxes) % 80
    pairs = torch.tensor(list(itertools.permutations(range(n_boxes), 2))[:cfg.num_pairs])
    points = []
    for h, w in sizes:
        images, mask = torch.randn(1, 3, h, w), torch.zeros(1, h, w, dtype=torch.bool)
        with torch.no_grad():
            f = flops(lambda: model.score_candidates(images, mask, objs, rels, [pairs], [boxes], [labels]))
        points.append((h * w, f))
    (p0, f0), (p1, f1) = points
    slope = (f1 - f0) / (p1 - p0)
    per_image = f0 + slope * (target[0] * target[1] - p0)
    return {"measured": [{"size": list(s), "flops": f} for s, (_, f) in zip(sizes, points)],
            "target_size": list(target), "per_image": per_image, "pixel_independent": f0 - slope * p0,
            "pairs": int(pairs.shape[0]), "texts": [len(objs), len(rels)]}


# ------------------------------------------------------------------------------------------- projection
def gpu_hours(flops_per_image: float, utilisation: float) -> dict[str, dict[str, float]]:
    return {ds: {gpu: round(n * flops_per_image / (peak * 1e12 * utilisation) / 3600, 2)
                 for gpu, peak in PEAK_BF16_TFLOPS.items()} for ds, n in DATASETS.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="pseudo_label_bench_") as tmp:
        workdir = Path(tmp)
        records = synthetic_records(args.images, workdir)
        images = [Image.open(io.BytesIO(r.image_bytes)).convert("RGB") for r in records]
        caption = measure_captioning(images, batch=8, repeats=args.repeats, workdir=workdir)
        tagging = measure_tagging(records, repeats=args.repeats)
    blip = blip_large_flops()
    tagger = tagger_r50_flops([(256, 352), (384, 512)], target=(800, 1066))

    res: dict[str, Any] = {
        "measured_cpu": {"captioning": caption, "tagging": tagging},
        "measured_flops_per_image": {"blip_large_caption": blip, "tagger_r50": tagger},
        "projected_gpu_hours": {
            "kind": "compute-bound lower bound from measured FLOPs; utilisation assumed",
            "assumptions": {"peak_bf16_tflops": PEAK_BF16_TFLOPS, "utilisation": UTILISATION,
                            "tagger_groups_per_image": 1, "datasets": DATASETS},
            "captioning_blip_large": gpu_hours(blip["per_image"], UTILISATION["caption"]),
            "tagging_tagger_r50": gpu_hours(tagger["per_image"], UTILISATION["tagger"]),
            "tagging_original_logged": {
                name: {ds: round(n * s / 3600, 1) for ds, n in DATASETS.items()}
                for name, s in ORIGINAL_S_PER_IMAGE.items()},
        },
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                    "python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                    "load_average": [round(x, 2) for x in os.getloadavg()]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")

    proj = res["projected_gpu_hours"]
    print(f"{'stage':<34}{'measured CPU img/s':>20}{'GFLOPs/img (real cfg)':>24}"
          f"{'COCO GPU-h (H100)':>20}{'O365 GPU-h (H100)':>20}")
    rows = [("captioning (tiny BLIP / BLIP-L)", caption["images_per_s"], blip["per_image"],
             proj["captioning_blip_large"]),
            ("tagging (tiny / tagger_r50)", tagging["images_per_s"], tagger["per_image"], proj["tagging_tagger_r50"])]
    for name, ips, f, hours in rows:
        print(f"{name:<34}{ips:>20.2f}{f / 1e9:>24.1f}{hours['coco']['H100']:>20.2f}{hours['o365']['H100']:>20.2f}")
    for name, hours in proj["tagging_original_logged"].items():
        print(f"{name + ' (original logged s/img)':<34}{'':>20}{'':>24}{hours['coco']:>20.1f}{hours['o365']:>20.1f}")
    print(f"FLOP-bound projections (lower bounds) assume {UTILISATION} of bf16 peak; the original's logged rates "
          f"are un-batched end-to-end times; results in {args.out}")
    return res


if __name__ == "__main__":
    main()
