"""What the trainer trains: a model, its criterion, a resumable loader, an optional validation hook
and the forward that feeds the model a batch. One builder per task (`engine.run` picks it)."""
from __future__ import annotations

from typing import Callable, NamedTuple, Protocol

import torch
from torch import nn

from rlipv2_scale.data.batch import Batch


class ResumableLoader(Protocol):
    def __iter__(self): ...
    def state_dict(self) -> dict | None: ...     # StreamingDataLoader's signature
    def load_state_dict(self, state: dict) -> None: ...


Evaluator = Callable[[nn.Module, int], dict[str, float]]


def rlipv2_forward(engine: nn.Module, images: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
    """The RLIPv2 call contract; a model that needs more of the batch (the Relation Tagger: the
    given pairs) brings its own `Parts.forward`."""
    return engine(images, batch.pixel_mask, batch.obj_texts, batch.rel_texts)


class Parts(NamedTuple):
    model: nn.Module
    criterion: nn.Module
    loader: ResumableLoader
    evaluator: Evaluator | None = None
    forward: Callable[[nn.Module, torch.Tensor, Batch], dict] = rlipv2_forward


Builder = Callable[..., Parts]
