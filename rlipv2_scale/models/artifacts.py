"""The model directory: the one artefact every writer produces and every reader takes.

A self-contained, relocatable folder in the Hugging Face style::

    model.yaml          the resolved `ModelConfig` (its tokenizer path relative to the folder)
    model.safetensors   the weights (our state-dict names)
    tokenizer/          the label-text tokenizer's files
    card.json           `ModelCard`: task, label lists, input size, where the weights came from, metrics
    README.md           the same card for people

Writers: `rlipv2 export` (any training run, RLIPv2 or Relation Tagger, any ZeRO stage), `rlipv2 demo`,
`rlipv2 import-checkpoint`, `save_pretrained`. Readers: `rlipv2 eval ... --checkpoint`, `rlipv2 predict`,
`rlipv2 data tag`, `train.init_from`, `from_pretrained`. `save_model_dir` / `read_model_dir` are the
only code that knows the layout; `load_state` is the one strict state-dict loader (with an explicit
allow-list of the keys a fine-tune re-initialises).
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, cast

import torch
from torch import nn

from rlipv2_scale.config import from_dict, load_config, save_config, to_dict
from rlipv2_scale.errors import UserError
from rlipv2_scale.models.config import ModelConfig
from rlipv2_scale.models.text import NotAvailableError, load_tokenizer, looks_like_path

CONFIG_FILE = "model.yaml"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
CARD_FILE = "card.json"
README_FILE = "README.md"
FORMAT = "rlipv2-scale"


@dataclass
class ModelCard:
    """What a user of the weights needs besides them (strict: unknown keys in card.json are errors)."""

    task: str = "rlipv2"                       # rlipv2 | tagger
    # The label lists the weights were fine-tuned / validated with; None = open vocabulary.
    objects: list[str] | None = None
    relations: list[str] | None = None
    eval_size: int = 800                       # shorter image side the model saw in evaluation
    max_size: int = 1333                       # cap on the longer side
    source: str = ""                           # where the weights came from (run, checkpoint, file)
    data: list[str] = field(default_factory=list)   # training data sources
    steps: int | None = None
    samples: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.objects is None) != (self.relations is None):
            raise ValueError("card: objects and relations go together")
        if not 0 < self.eval_size <= self.max_size:
            raise ValueError(f"card: need 0 < eval_size <= max_size, got {self.eval_size} / {self.max_size}")

    def markdown(self, cfg: ModelConfig) -> str:
        labels = ("open vocabulary (any label texts)" if self.objects is None else
                  f"{len(self.objects)} object and {len(self.relations or [])} relation texts (card.json)")
        lines = [f"# {cfg.name} ({'Relation Tagger' if self.task == 'tagger' else 'RLIPv2'})", "",
                 f"- weights from: {self.source or 'unknown'}",
                 f"- training data: {', '.join(self.data) or 'unknown'}",
                 f"- steps: {self.steps if self.steps is not None else 'unknown'}, images seen: "
                 f"{self.samples if self.samples is not None else 'unknown'}",
                 f"- labels: {labels}",
                 f"- input: shorter side {self.eval_size}, longer side at most {self.max_size}"]
        lines += [f"- {k}: {v:.2f}" for k, v in sorted(self.metrics.items())]
        lines += ["", "Load with `rlipv2_scale.models.load_pretrained(DIR)` or `RLIPv2.from_pretrained(DIR)`; "
                  "run with `rlipv2 predict` / `rlipv2 eval ... --checkpoint DIR`.", ""]
        return "\n".join(lines)


@dataclass
class ModelDir:
    """A model directory read back: config (tokenizer resolved to an absolute path), weights, card."""

    path: Path
    config: ModelConfig
    state: dict[str, torch.Tensor]
    card: ModelCard
    metadata: dict[str, str]


def is_model_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def save_model_dir(out: str | os.PathLike, cfg: ModelConfig, state: Mapping[str, torch.Tensor], card: ModelCard, *,
                   tokenizer: Any = None, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a model directory atomically (a temporary sibling renamed into place).

    `tokenizer`: a tokenizer object with `save_pretrained`, or a folder of tokenizer files; its files
    are copied in and the config points at them relatively. Without one the config keeps its own
    reference (a hub id such as `roberta-base`). An existing `out` is replaced only when it is a
    model directory (never another folder)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not is_model_dir(out):
        raise UserError(f"'{out}' exists and is not a model directory; choose another output folder")
    # The old directory goes as a whole: nothing in it may be anything but what this writes.
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR, CARD_FILE, README_FILE)) \
        if out.exists() else []
    if foreign:
        raise UserError(f"model directory '{out}' also holds {', '.join(foreign)}, which replacing it would delete: "
                        "move them out or choose another output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise UserError(f"cannot write the model directory '{out}': {exc.strerror}; choose a writable folder") \
            from None
    try:
        if tokenizer is not None:
            if isinstance(tokenizer, (str, os.PathLike)):
                if not Path(tokenizer).is_dir():
                    raise UserError(f"tokenizer folder '{tokenizer}' does not exist: export from the directory "
                                    "the run was started in, or fix model.text.tokenizer")
                shutil.copytree(tokenizer, tmp / TOKENIZER_DIR)
            else:
                tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            cfg = replace(cfg, text=replace(cfg.text, tokenizer=TOKENIZER_DIR))
        save_config(cfg, tmp / CONFIG_FILE)
        # Tied weights share storage, which safetensors refuses: every tensor gets its own copy.
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(tmp / WEIGHTS_FILE),
                  metadata={"format": FORMAT, **dict(metadata or {})})
        (tmp / CARD_FILE).write_text(json.dumps(to_dict(card), indent=1) + "\n")
        (tmp / README_FILE).write_text(card.markdown(cfg))
        # The old tokenizer/ goes too: any file in it the new one does not write is the user's.
        old_tok, new_tok = out / TOKENIZER_DIR, tmp / TOKENIZER_DIR
        stray = sorted(str(f.relative_to(out)) for f in old_tok.rglob("*") if f.is_file()
                       and not (new_tok / f.relative_to(old_tok)).is_file()) if old_tok.is_dir() else []
        if stray:
            raise UserError(f"model directory '{out}' also holds {', '.join(stray[:3])}, which replacing it would "
                            "delete: move them out or choose another output folder")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_tokenizer(cfg: ModelConfig, base: str | os.PathLike) -> ModelConfig:
    """`cfg` with a relative tokenizer folder that exists under `base` (the folder of the YAML file
    that names it) made absolute, so it does not depend on the current folder; anything else as is."""
    ref = cfg.text.tokenizer
    if ref and not Path(ref).is_absolute() and (Path(base) / ref).is_dir():
        return replace(cfg, text=replace(cfg.text, tokenizer=str((Path(base) / ref).resolve())))
    return cfg


def read_model_dir(path: str | os.PathLike) -> ModelDir:
    """Config, weights and card of a model directory; every missing or malformed part is named."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    d = Path(path)
    if d.is_file():
        raise UserError(f"'{d}' is a file, not a model directory; an original RLIPv2 checkpoint is converted first "
                        f"(`rlipv2 import-checkpoint {d} --config NAME --out DIR`), a training run exported "
                        f"(`rlipv2 export RUN --out DIR`)")
    if not d.is_dir():
        raise UserError(f"model directory '{d}' does not exist (create one with `rlipv2 export RUN --out DIR` or "
                        "`rlipv2 import-checkpoint`)")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (d / name).is_file():
            raise UserError(f"'{d}' is not a complete model directory: '{name}' is missing; write it again with "
                            "`rlipv2 export RUN --out DIR` (or `rlipv2 import-checkpoint`)")
    cfg = load_config(ModelConfig, d / CONFIG_FILE)
    if cfg.text.tokenizer == TOKENIZER_DIR and not (d / TOKENIZER_DIR).is_dir():
        raise UserError(f"'{d}': {CONFIG_FILE} names the tokenizer folder '{TOKENIZER_DIR}/', which is missing; "
                        "copy the whole model directory")
    cfg = resolve_tokenizer(cfg, d)
    card = ModelCard()
    if (d / CARD_FILE).is_file():
        try:
            card = from_dict(ModelCard, json.loads((d / CARD_FILE).read_text()), prefix="card")
        except json.JSONDecodeError as exc:
            raise UserError(f"'{d / CARD_FILE}' is not valid JSON ({exc}); write the model directory again") from None
    try:
        with safe_open(str(d / WEIGHTS_FILE), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        state = load_file(str(d / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"'{d / WEIGHTS_FILE}' cannot be read ({exc}); the file is damaged: write the model "
                        "directory again") from None
    return ModelDir(d, cfg, state, card, metadata)


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
               reinit: Sequence[str] = ()) -> list[str]:
    """Load `state` into `model`, strictly: any unexpected or mis-shaped key, and any missing key not
    matched by a `reinit` pattern (fnmatch; the layers a fine-tune re-initialises) is an error that
    names the keys and the fix. Returns the re-initialised (missing) keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    allowed = [k for k in missing if any(fnmatch.fnmatchcase(k, p) for p in reinit)]
    missing = [k for k in missing if k not in allowed]
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        detail = "; ".join(f"{what} {keys[:4]}{' ...' if len(keys) > 4 else ''} ({len(keys)} in all)"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("shape mismatch", [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                                                  for k in shapes])) if keys)
        raise UserError(f"'{source}' does not fit the model: {detail}; use weights of the same model config "
                        f"(the model.yaml they were trained with); a fine-tune lists the layers it re-initialises in "
                        "train.init_reinit")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    return allowed


def resolve_pretrained(name_or_path: str | os.PathLike) -> Path:
    """A local model directory, or a Hugging Face Hub id downloaded into the cache."""
    path = Path(name_or_path)
    if path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path)))
    except Exception as exc:   # offline, no such repo, no access: all mean "get it another way"
        raise UserError(f"'{name_or_path}' is not a local model directory and could not be fetched from the "
                        f"Hugging Face Hub ({type(exc).__name__}); download it where the Hub is reachable "
                        f"(`huggingface-cli download {name_or_path} --local-dir DIR`) and pass DIR") from None


class _SavableModel(Protocol):
    """What `PretrainedMixin.save_pretrained` needs of the model it is mixed into."""

    cfg: ModelConfig

    def state_dict(self) -> Mapping[str, Any]: ...


class PretrainedMixin:
    """`from_pretrained(dir or hub id)` / `save_pretrained(dir)` for the model classes (mixed into
    `nn.Module` subclasses whose constructor takes `(cfg, pretrained=..., **kwargs)`)."""

    cfg: ModelConfig

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device = "cpu", **kwargs):
        md = read_model_dir(resolve_pretrained(name_or_path))
        if bool(md.config.tagger) != bool(getattr(cls, "is_tagger", False)):
            kind = "a Relation Tagger" if md.config.tagger else "an RLIPv2 detector"
            raise UserError(f"'{name_or_path}' holds {kind}; load it with "
                            f"{'RelationTagger' if md.config.tagger else 'RLIPv2'}.from_pretrained or "
                            "rlipv2_scale.models.build.load_pretrained")
        model_class = cast("type[nn.Module]", cls)   # the mixin is only mixed into nn.Module subclasses
        return instantiate(model_class(md.config, pretrained=False, **kwargs), md, device)

    def save_pretrained(self: _SavableModel, out: str | os.PathLike, card: ModelCard | None = None) -> Path:
        card = card or getattr(self, "card", None) or ModelCard(task="tagger" if self.cfg.tagger else "rlipv2")
        return save_model_dir(out, self.cfg, self.state_dict(), card, tokenizer=tokenizer_of(self.cfg))


def instantiate(model: nn.Module, md: ModelDir, device: str | torch.device = "cpu") -> nn.Module:
    """`model` (built from `md.config`, random weights) with the directory's weights and card, in eval mode."""
    load_state(model, md.state, str(md.path))
    setattr(model, "card", md.card)   # read back with `card_of`
    return model.to(device).eval()


def card_of(model: nn.Module) -> ModelCard:
    """The card `instantiate` attached to a model read from a model directory."""
    card = getattr(model, "card")
    if not isinstance(card, ModelCard):
        raise TypeError(f"{type(model).__name__}.card is a {type(card).__name__}, not a ModelCard")
    return card


def config_of(model: nn.Module) -> ModelConfig:
    """The `ModelConfig` a model of this project (RLIPv2, Relation Tagger) was built from."""
    cfg = getattr(model, "cfg")
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"{type(model).__name__}.cfg is a {type(cfg).__name__}, not a ModelConfig")
    return cfg


def tokenizer_of(cfg: ModelConfig) -> Any:
    """What `save_model_dir` copies for `cfg`: its tokenizer folder, or the tokenizer object it loads
    (the packaged label-corpus BPE of tiny configs; `roberta-base` from the Hugging Face cache). None
    when it cannot be had here (offline, not cached): the config then keeps its hub reference."""
    if cfg.text.tokenizer and Path(cfg.text.tokenizer).is_dir():
        return cfg.text.tokenizer
    ref = cfg.text.tokenizer
    # A path, not a hub id; `tokenizer` is a model directory's own folder, kept as a reference it
    # would name a folder the written directory lacks.
    if ref and (looks_like_path(ref) or ref == TOKENIZER_DIR):
        raise UserError(f"tokenizer folder '{ref}' (model.text.tokenizer) does not exist: run from the directory "
                        "the run was started in, or point model.text.tokenizer at the folder")
    try:
        return load_tokenizer(cfg.text)
    except NotAvailableError:
        return None
