"""Measurements on a real forward/backward: FLOPs (torch's flop counter), activation bytes, time.

Activation bytes are the tensors autograd saves for the backward, counted once each through
`saved_tensors_hooks` (parameters and the inputs themselves excluded): the memory a micro-batch
holds between its forward and backward, independent of the device.

`calibration_step` is the model's forward, the real set criterion (Hungarian matching and every
loss term) and the backward on a synthetic batch: what a training step computes before the
optimizer, with no data loader (it runs where the data pipeline is not installed).
"""
from __future__ import annotations

import random
import time
from typing import Callable

import torch

from rlipv2_scale.data.batch import Target
from rlipv2_scale.models.outputs import OUTPUT_KEYS


def count_flops(step: Callable[[], torch.Tensor]) -> int:
    """FLOPs of `step()` (forward returning a scalar loss) plus its backward, counted as the trainer
    counts them (`train.telemetry.count_flops`)."""
    from rlipv2_scale.train.telemetry import count_flops as count

    return count(lambda: step().backward())


def activation_bytes(step: Callable[[], torch.Tensor], exclude: list[torch.Tensor] | None = None) -> int:
    """Bytes of distinct tensors saved for backward during `step()` (a forward returning a loss)."""
    skip = {t.untyped_storage().data_ptr() for t in (exclude or []) if t.device.type != "meta"}
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta":
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key[0] not in skip and key not in seen:
                seen[key] = storage.nbytes()
        # Detached: a saved output packed as itself references its own grad_fn, a cycle through
        # the autograd graph that Python's collector cannot see, which kept the model alive.
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(seen.values())


def label_texts(n: int, prefix: str) -> list[str]:
    """`n` label texts of one to three words (the label-text encoder's sequence length matters)."""
    rng = random.Random(n)
    words = ["red", "small", "person", "holding", "next", "to", "on", "top", "of", "riding", "cup", "table"]
    return [f"{prefix} {i} " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 2))) for i in range(n)]


def synthetic_targets(batch: int, height: int, width: int, num_obj: int, num_rel: int, objects: int = 4,
                      pairs: int = 3, seed: int = 0) -> list[Target]:
    """Ground truth shaped like a scene of the synthetic world: `objects` boxes, `pairs` related
    subject-object pairs with one predicate each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(batch):
        centre = torch.rand(objects, 2, generator=g) * 0.6 + 0.2
        size = torch.rand(objects, 2, generator=g) * 0.2 + 0.1
        boxes = torch.cat([centre, size], dim=1)
        labels = torch.randint(0, num_obj, (objects,), generator=g)
        sub = torch.arange(pairs) % objects
        obj = (sub + 1) % objects
        rel = torch.zeros(pairs, num_rel)
        rel[torch.arange(pairs), torch.randint(0, num_rel, (pairs,), generator=g)] = 1.0
        out.append(Target(image_id=i, orig_size=(height, width), size=(height, width), boxes=boxes, labels=labels,
                          sub_index=sub, obj_index=obj, sub_boxes=boxes[sub], obj_boxes=boxes[obj],
                          sub_labels=labels[sub], obj_labels=labels[obj], rel_labels=rel))
    return out


def calibration_step(model: torch.nn.Module, criterion: torch.nn.Module | None, batch: int, height: int, width: int,
                     num_obj: int, num_rel: int, device: torch.device | str = "cpu",
                     texts: tuple[list[str], list[str]] | None = None) -> Callable[[], torch.Tensor]:
    """A closure: forward + loss on a fixed synthetic batch (call `.backward()` on its result).
    Without a criterion the loss is the sum of every output (the FLOPs of matching and loss terms
    are negligible; their time is not). `texts`: the (object, relation) label texts a batch of the
    run carries (the text encoder's cost follows their token length); default: generated ones."""
    from rlipv2_scale.data.batch import NO_OBJECTS

    torch.manual_seed(0)
    images = torch.randn(batch, 3, height, width, device=device)
    mask = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    if texts is None:
        texts = (label_texts(num_obj, "object"), label_texts(num_rel, "relation"))
    obj, rel = [t for t in texts[0] if t != NO_OBJECTS] + [NO_OBJECTS], list(texts[1])
    num_obj, num_rel = len(obj) - 1, len(rel)
    targets = [t.to(device) for t in synthetic_targets(batch, height, width, num_obj, num_rel)]

    # The Relation Tagger scores given pairs: the batch's targets.
    given = (targets,) if getattr(getattr(model, "cfg", None), "tagger", False) else ()

    def step() -> torch.Tensor:
        out = model(images, mask, obj, rel, *given)
        if criterion is not None:
            return criterion(out, targets, num_pairs=sum(len(t.sub_index) for t in targets))["loss"]
        return sum(out[k].float().sum() for k in OUTPUT_KEYS)

    return step


def device_sync(device: torch.device) -> Callable[[], None]:
    """What makes a host clock read after `device`'s queued work: a CUDA synchronize, or nothing."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_forward_backward(step: Callable[[], torch.Tensor], model: torch.nn.Module, repeat: int = 3,
                          warmup: int = 1, min_seconds: float = 2.0) -> float:
    """Fastest of at least `repeat` forward + loss + backward passes, and of as many as fit in
    `min_seconds` (a small model's pass takes milliseconds: the fastest of many is what survives a
    shared machine's load)."""
    sync = device_sync(next(model.parameters()).device)
    best = float("inf")
    i = 0
    start = time.perf_counter()
    while i < warmup + repeat or time.perf_counter() - start < min_seconds:
        model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        step().backward()
        sync()
        if i >= warmup:
            best = min(best, time.perf_counter() - t0)
        i += 1
    model.zero_grad(set_to_none=True)
    return best
