"""Training runs -> model directories (`rlipv2 export`), and the weights any reader may be given.

`export_run` turns the latest (or a given) checkpoint of any run, RLIPv2 or Relation Tagger, at any
ZeRO stage, into the model directory of `models/artifacts.py`: the run's model config, the gathered
fp32 weights (checked strictly against a freshly built model), the tokenizer files, and a card with
the label lists, input size, data, steps and the last validation metrics. `open_model` and
`init_weights` accept a model directory, a run directory or a checkpoint (exported on the fly),
so `eval --checkpoint`, `predict`, `data tag` and `train.init_from` take all of them.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from rlipv2_scale.errors import UserError
from rlipv2_scale.models.artifacts import (
    ModelCard,
    is_model_dir,
    load_state,
    read_model_dir,
    save_model_dir,
    tokenizer_of,
)
from rlipv2_scale.models.build import build_model, load_pretrained
from rlipv2_scale.train import checkpoint as ckpt_io
from rlipv2_scale.train.config import RunConfig, load_run_config


def find_checkpoint(source: str | os.PathLike) -> Path:
    """The checkpoint of `source`: a checkpoints/step_* directory, or a run directory's latest."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"'{path}' does not exist; pass a run directory (run.dir of the recipe) or one of its "
                        "checkpoints/step_* directories")
    try:
        found = ckpt_io.resolve_resume(str(path), path)
    except UserError:
        found = None
    if found is None:
        raise UserError(f"'{path}' holds no complete checkpoint (no checkpoints/step_*/trainer.json): the run saved "
                        "none yet; let it reach checkpoint.every_steps or its end, then export")
    return found


def run_card(cfg: RunConfig, ckpt: Path) -> ModelCard:
    """What the run was: task, label lists, evaluation input size, data, counters, last validation metrics."""
    state = ckpt_io.read_trainer_state(ckpt)
    # Fixed label lists (fine-tuning) are part of the model; pre-training is open-vocabulary.
    objects, relations = cfg.data.fixed_obj_labels, cfg.data.fixed_rel_labels
    metrics: dict[str, float] = {}
    log = ckpt.parent.parent / "metrics.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue   # a line cut by a kill: the earlier ones still count
            if record.get("step", 0) <= state["step"] and any(k.startswith("val/") for k in record):
                metrics = {k: float(v) for k, v in record.items() if k.startswith("val/") and v is not None}
    t = cfg.data.transforms
    return ModelCard(task=cfg.task, objects=None if objects is None else list(objects),
                     relations=None if relations is None else list(relations), eval_size=t.eval_size,
                     max_size=t.max_size, source=f"run '{cfg.run.name}', checkpoint {ckpt.name}",
                     data=[s.name for s in cfg.data.sources], steps=state["step"], samples=state.get("samples"),
                     metrics=metrics)


def checkpoint_weights(ckpt: Path, trust_pickle: bool = False, hint: str | None = None,
                       ) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """(run config, gathered fp32 weights) of a checkpoint, the weights checked against its model.
    Pickled objects other than weights are refused unless `trust_pickle` (`hint`: how to allow them)."""
    cfg = load_run_config(ckpt / "config.yaml")
    state = ckpt_io.gathered_state_dict(ckpt, trust_pickle, **({"hint": hint} if hint else {}))
    load_state(build_model(cfg.model, pretrained=False), state, str(ckpt))
    return cfg, state


def export_run(source: str | os.PathLike, out: str | os.PathLike, trust_pickle: bool = False) -> Path:
    """`rlipv2 export RUN --out DIR`: the checkpoint of `source` as a model directory."""
    ckpt = find_checkpoint(source)
    cfg, state = checkpoint_weights(ckpt, trust_pickle)
    return save_model_dir(out, cfg.model, state, run_card(cfg, ckpt), tokenizer=tokenizer_of(cfg.model))


def export_safetensors(source: str | os.PathLike, out: str | os.PathLike, trust_pickle: bool = False) -> int:
    """`rlipv2 export RUN --out FILE.safetensors`: only the weights, one plain state dict."""
    from safetensors.torch import save_file

    _, state = checkpoint_weights(find_checkpoint(source), trust_pickle)
    out = Path(out)
    if out.exists() and not _is_safetensors(out):
        raise UserError(f"'{out}' exists and is not a .safetensors weights file; choose another path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    except OSError as exc:
        raise UserError(f"cannot write '{out}': {exc.strerror}; choose a writable path") from None
    os.replace(tmp, out)
    return len(state)


def _is_safetensors(path: Path) -> bool:
    """An existing file this export may replace: a readable safetensors file (an earlier export)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return True
    except Exception:        # whatever the bytes are, they are not ours to overwrite
        return False


@contextlib.contextmanager
def as_model_dir(source: str | os.PathLike, trust_pickle: bool = False) -> Iterator[str]:
    """A model directory for `source`: itself (or a Hub id) as given, or a run / checkpoint exported on
    the fly into a temporary directory, through the same code as `rlipv2 export`."""
    path = Path(source)
    if is_model_dir(path) or not path.exists() or path.is_file():
        yield str(source)
        return
    with tempfile.TemporaryDirectory(prefix="rlipv2-export-") as tmp:
        yield str(export_run(path, Path(tmp) / "model", trust_pickle))


def open_model(source: str | os.PathLike, device: str | torch.device = "cpu",
               trust_pickle: bool = False) -> torch.nn.Module:
    """A model in eval mode from a model directory, a Hub id, a run directory or a checkpoint."""
    from rlipv2_scale.models.text import LabelEncoder

    with as_model_dir(source, trust_pickle) as model_dir:
        model = load_pretrained(model_dir, device)
        # A run or checkpoint is exported to a temporary directory that is gone on return: load the
        # (otherwise lazy) tokenizer from it now.
        for module in model.modules():
            if isinstance(module, LabelEncoder):
                module.tokenizer
        return model


def init_weights(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """`train.init_from`: the weights of a model directory, a plain `.safetensors` file, a run or a checkpoint."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"train.init_from: '{path}' does not exist; give a model directory (`rlipv2 export`), "
                        "a .safetensors file or a run directory")
    if is_model_dir(path):
        return read_model_dir(path).state
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    ckpt = find_checkpoint(path)
    hint = (f"train.init_from reads weights only: if you trust it, convert it with `rlipv2 export {ckpt} --out "
            f"OUT.safetensors --trust-pickle` and initialise from OUT.safetensors")
    return checkpoint_weights(ckpt, hint=hint)[1]
