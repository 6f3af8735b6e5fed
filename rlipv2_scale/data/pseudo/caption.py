"""Captioning images for relational pseudo-labelling, sharded over ranks and resumable.

Captioners are pluggable behind `Captioner.caption(images) -> list[list[str]]` (several captions
per image). `BlipCaptioner` runs BLIP through transformers with nucleus sampling (p = 0.9, 10
captions per image, length 5–20, as the original's released data); `run_captioning` walks a list
of images, takes this rank's share, and appends one JSON line per image to a per-rank file, so an
interrupted run continues where it stopped and no image is captioned twice.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import torch
from PIL import Image, UnidentifiedImageError

from rlipv2_scale.data.pseudo.jsonl import done_ids, rank_file, read_rows
from rlipv2_scale.errors import UserError


class Captioner(Protocol):
    def caption(self, images: list[Image.Image], image_ids: list) -> list[list[str]]:
        """Several captions per image; `image_ids` lets a stand-in captioner look up its source."""
        ...


@dataclass
class SamplingConfig:
    num_captions: int = 10
    top_p: float = 0.9
    min_length: int = 5
    max_length: int = 20
    prompt: str = "a picture of "      # BLIP's captioning prompt, stripped from the output
    seed: int = 0


class BlipCaptioner:
    """BLIP (`BlipForConditionalGeneration`) with nucleus sampling; bf16 on GPU."""

    def __init__(self, model, processor, sampling: SamplingConfig | None = None, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.processor = processor
        self.sampling = sampling or SamplingConfig()
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, model_id: str, sampling: SamplingConfig | None = None,
                        device: str | torch.device | None = None) -> "BlipCaptioner":
        """A hub id (e.g. Salesforce/blip-image-captioning-large) or a local directory."""
        from transformers import BlipForConditionalGeneration, BlipProcessor

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        try:
            processor = BlipProcessor.from_pretrained(model_id)
            model = BlipForConditionalGeneration.from_pretrained(model_id, torch_dtype=dtype)
        except OSError as exc:
            raise UserError(f"cannot load the BLIP captioner '{model_id}': {exc}. Download it once "
                            f"(huggingface-cli download {model_id}) or pass a local directory") from exc
        return cls(model, processor, sampling, device)

    @torch.no_grad()
    def caption(self, images: list[Image.Image], image_ids: list | None = None) -> list[list[str]]:
        s = self.sampling
        prompt = s.prompt or None
        inputs = self.processor(images=images, text=[prompt] * len(images) if prompt else None, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, dtype=next(self.model.parameters()).dtype)
        kwargs = {}
        if prompt:
            # BLIP appends [SEP] to the prompt; generation continues from before it.
            kwargs["input_ids"] = inputs["input_ids"][:, :-1].to(self.device)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(s.seed)
        try:
            out = self.model.generate(pixel_values=pixel_values, do_sample=True, top_p=s.top_p, top_k=0,
                                      min_length=s.min_length, max_length=s.max_length,
                                      num_return_sequences=s.num_captions, **kwargs)
        finally:
            torch.random.set_rng_state(generator_state)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        strip = (prompt or "").strip().lower()
        cleaned = [t.strip()[len(strip):].strip() if strip and t.strip().lower().startswith(strip) else t.strip()
                   for t in texts]
        n = s.num_captions
        return [cleaned[i * n:(i + 1) * n] for i in range(len(images))]


@dataclass
class ImageItem:
    image_id: int | str
    load: Callable[[], bytes]          # the encoded image bytes


@dataclass
class CaptionRunSummary:
    captioned: int = 0
    already_done: int = 0
    failed_to_decode: list = field(default_factory=list)


def output_path(out_dir: Path, rank: int) -> Path:
    return rank_file(out_dir, "captions", rank)


def check_row(row: dict) -> str | None:
    """What is wrong with a captions row (its image id is checked by `jsonl`), or None."""
    caps = row.get("captions")
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        return f"has captions {repr(caps)[:80]}: they must be a list of strings"
    return None


def run_captioning(items: Iterable[ImageItem], captioner: Captioner, out_dir: str | Path, rank: int = 0,
                   world_size: int = 1, batch_size: int = 32,
                   progress: Callable[[int], None] | None = None) -> CaptionRunSummary:
    """Caption this rank's share (item k goes to rank k mod world_size), appending JSON lines."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = output_path(out_dir, rank)
    done = done_ids(path, check_row)
    summary = CaptionRunSummary()

    def mine() -> Iterator[ImageItem]:
        for k, item in enumerate(items):
            if k % world_size != rank:
                continue
            if str(item.image_id) in done:
                summary.already_done += 1
                continue
            yield item

    batch: list[tuple[ImageItem, Image.Image]] = []
    with path.open("a") as f:
        def flush() -> None:
            if not batch:
                return
            captions = captioner.caption([im for _, im in batch], [item.image_id for item, _ in batch])
            for (item, _), caps in zip(batch, captions):
                f.write(json.dumps({"image_id": item.image_id, "captions": caps}) + "\n")
            f.flush()
            summary.captioned += len(batch)
            if progress:
                progress(len(batch))
            batch.clear()

        for item in mine():
            try:
                image = Image.open(io.BytesIO(item.load())).convert("RGB")
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                summary.failed_to_decode.append((item.image_id, str(exc)))
                continue
            batch.append((item, image))
            if len(batch) == batch_size:
                flush()
        flush()
    return summary


def read_captions(out_dir: str | Path) -> dict[str, list[str]]:
    """All ranks' caption files → {image_id (as str): captions}."""
    return {str(row["image_id"]): row["captions"] for row in read_rows(out_dir, "captions", check_row)}
