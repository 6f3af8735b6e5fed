"""The released RLIPv2 checkpoints: their state dict <-> this project's model, strictly, both ways.

Names: every parameter / buffer of ours maps to one original key (`original_keys.original_key`).
The original state dict also holds entries that are no tensor of ours (`DROPPED_KEYS`): they are
checked on import (same values as what they duplicate or what is recomputed) and written back on
export, so import -> export gives the identical state dict. Everything else is strict: an original
key that maps to nothing of ours, a tensor of ours without an original key, or a shape / dtype
mismatch is an error naming the first such key and the released config the checkpoint would fit
(`fitting_config`, from the packaged layouts in `original_layouts/`).

Files: `load_original(path)` reads a `torch.save` file (weights under "model"; training
checkpoints also hold optimizer, args, ...); `import_checkpoint` / `export_checkpoint` convert between
it and a model directory (`models/artifacts.py`, the one owner of that layout).
"""
from __future__ import annotations

import argparse
import functools
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from rlipv2_scale.config import deep_merge, from_dict, load_config, parse_overrides, to_dict
from rlipv2_scale.errors import UserError
from rlipv2_scale.models.artifacts import ModelCard, read_model_dir, resolve_tokenizer, save_model_dir, tokenizer_of
from rlipv2_scale.models.config import NAMED_CONFIGS, RELEASED, ModelConfig, named_config
from rlipv2_scale.models.original_keys import original_key

POSITION_IDS = "transformer.text_encoder.embeddings.position_ids"

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class DroppedKey:
    """Original entries with no tensor of their own here, why, and how export restores them."""

    name: str
    pattern: re.Pattern
    reason: str
    optional: bool = False   # absent from some released files


DROPPED_KEYS = (
    DroppedKey("box-MLP aliases", re.compile(r"^transformer\.(ho|verb)_decoder\.(sub|obj)_bbox_embed\.\d+\."),
               "alias: with box refinement the original registers the box MLPs twice, at the top level and "
               "inside each decoder (entity decoder: top-level 0..L-1, relation decoder: L..2L-1); the entries "
               "are the same tensors. Checked equal on import, re-created from the top-level ones on export."),
    DroppedKey("RoBERTa position_ids", re.compile(r"^transformer\.text_encoder\.embeddings\.position_ids$"),
               "constant arange(max_position_embeddings) buffer persisted by transformers 4.5.1 (the authors' "
               "version) and no longer by newer ones. Checked on import; written on export when the imported "
               "file had it, or for models trained here (the authors' code loads strictly on resume).",
               optional=True),
    DroppedKey("Swin relative_position_index",
               re.compile(r"^backbone\.0\.body\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index$"),
               "constant index table of Swin's relative position bias; timm recomputes it (non-persistent "
               "buffer). Checked equal to timm's on import, recomputed on export."),
)

# The original's top-level registration order (state-dict order), for files exported from configs
# that are not a released layout; released layouts use their own recorded order.
_ORDER = ("bias_obj_a", "bias_pred_a", "transformer.level_embed", "transformer.ho_decoder.",
          "transformer.verb_decoder.", "transformer.verb_tgt_generator.", "transformer.encoder.",
          "transformer.ho_encoder.", "transformer.reference_points_sub.", "transformer.reference_points_obj.",
          "transformer.text_encoder.", "transformer.resizer.", "transformer.coord_proj.", "transformer.verb_tgt.",
          "sub_bbox_embed.", "obj_bbox_embed.", "projection_text.", "tgt_embed.", "verb_tgt_embed.",
          "refpoint_embed.", "query_embed.", "verb_query_embed.", "input_proj.", "backbone.")
# Query parameters whose first dimension is the number of queries (for the fitting-config hint).
_QUERY_KEYS = ("tgt_embed.weight", "verb_tgt_embed.weight", "refpoint_embed.weight", "query_embed.weight",
               "transformer.verb_tgt.weight")


class CheckpointMismatch(UserError):
    """A state dict that does not fit the model config (names the first bad key and the fitting config)."""


# ------------------------------------------------------------------------------------------ layouts
def _cfg_key(cfg: ModelConfig) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)


@functools.lru_cache(maxsize=8)
def _our_layout(cfg_json: str) -> tuple[Layout, dict[str, tuple[int, int]]]:
    from rlipv2_scale.models.build import build_model

    cfg = from_dict(ModelConfig, json.loads(cfg_json))
    with torch.device("meta"):   # shapes only: no memory, no init cost, no download
        model = build_model(cfg, pretrained=False)
    layout: Layout = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    windows: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if hasattr(module, "relative_position_bias_table") and hasattr(module, "window_size"):
            wh, ww = module.window_size   # timm's window attention: (height, width)
            windows[name] = (wh, ww)
    return layout, windows


def our_layout(cfg: ModelConfig) -> Layout:
    """{key: (shape, dtype)} of this project's state dict for `cfg`."""
    return dict(_our_layout(_cfg_key(cfg))[0])


def _swin_windows(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    return _our_layout(_cfg_key(cfg))[1]


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    from timm.models.swin_transformer import get_relative_position_index

    return get_relative_position_index(*window)


@dataclass(frozen=True)
class KeyMap:
    """The original state dict of one config: names, shapes and where each entry comes from."""

    to_ours: dict[str, str]                      # original key -> our key (mapped tensors)
    aliases: dict[str, str]                      # original alias key -> original key it duplicates
    constants: dict[str, Callable[[], torch.Tensor]]   # original key -> recomputed constant buffer
    layout: Layout                               # original key -> (shape, dtype), in the original's order


@functools.lru_cache(maxsize=8)
def _key_map(cfg_json: str) -> KeyMap:
    cfg = from_dict(ModelConfig, json.loads(cfg_json))
    ours = our_layout(cfg)
    to_ours = {original_key(k, cfg.variant): k for k in ours}
    if len(to_ours) != len(ours):   # pragma: no cover - guarded by the original_keys tests
        raise RuntimeError("two tensors of ours map to the same original key")
    layout: Layout = {o: ours[k] for o, k in to_ours.items()}
    aliases: dict[str, str] = {}
    n_dec = cfg.dec_layers
    for o in list(to_ours):
        m = re.match(r"^(sub|obj)_bbox_embed\.(\d+)\.(.*)$", o)
        if m:
            i = int(m.group(2))
            decoder = "ho_decoder" if i < n_dec else "verb_decoder"
            alias = f"transformer.{decoder}.{m.group(1)}_bbox_embed.{i % n_dec}.{m.group(3)}"
            aliases[alias] = o
            layout[alias] = layout[o]
    constants: dict[str, Callable[[], torch.Tensor]] = {}
    for module, window in _swin_windows(cfg).items():
        key = original_key(f"{module}.relative_position_bias_table", cfg.variant)
        key = key.replace("relative_position_bias_table", "relative_position_index")
        constants[key] = functools.partial(relative_position_index, window)
        n = window[0] * window[1]
        layout[key] = ((n, n), torch.int64)
    positions = cfg.text.max_position_embeddings
    constants[POSITION_IDS] = lambda: torch.arange(positions)[None]
    layout[POSITION_IDS] = ((1, positions), torch.int64)
    return KeyMap(to_ours, aliases, constants, _ordered(layout))


def key_map(cfg: ModelConfig) -> KeyMap:
    """The original state dict of `cfg` (cached per config)."""
    return _key_map(_cfg_key(cfg))


def _ordered(layout: Layout) -> Layout:
    """The original's state-dict order: a released layout's own, else by top-level module."""
    for name in RELEASED:
        recorded = released_layout(name)
        if set(recorded) == set(layout) - {POSITION_IDS}:
            order = list(recorded)
            break
    else:
        def rank(k: str) -> int:
            return next((i for i, p in enumerate(_ORDER) if k == p or k.startswith(p)), len(_ORDER))
        order = sorted((k for k in layout if k != POSITION_IDS), key=rank)
    # transformers registers position_ids on the embeddings module itself: its own buffers are
    # saved before its children's (word_embeddings, ...).
    at = next(i for i, k in enumerate(order) if k.startswith("transformer.text_encoder.embeddings."))
    order.insert(at, POSITION_IDS)
    return {k: layout[k] for k in order}


@functools.lru_cache(maxsize=None)
def _released_layout_file(name: str) -> dict:
    if name not in RELEASED:
        raise UserError(f"'{name}' is not a released RLIPv2 model; choose one of {', '.join(RELEASED)}")
    text = resources.files("rlipv2_scale.models").joinpath("original_layouts").joinpath(f"{name}.json").read_text()
    return json.loads(text)


def released_layout(name: str) -> Layout:
    """{original key: (shape, dtype)} of a released checkpoint, in its order (from the packaged layouts)."""
    return {e["key"]: (tuple(e["shape"]), getattr(torch, e["dtype"]))
            for e in _released_layout_file(name)["keys"]}


def released_layout_entries(name: str) -> list[dict]:
    """The packaged layout's raw entries (key, shape, dtype, kind, requires_grad, alias_of)."""
    return list(_released_layout_file(name)["keys"])


# ------------------------------------------------------------------------------------------ fitting config
def fitting_config(state: Mapping[str, Any]) -> str:
    """Which released config a state dict (original key names) fits, as advice for an error message."""
    shapes = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape") and k != POSITION_IDS}
    best: tuple[int, str] | None = None
    query_variant = None
    for name in RELEASED:
        layout = released_layout(name)
        differ = set(layout) ^ set(shapes)
        wrong = [k for k in set(layout) & set(shapes) if layout[k][0] != shapes[k]]
        if not differ and not wrong:
            return f"it is a released '{name}' checkpoint: use --config {name}"
        queries = {shapes[k][0] for k in wrong if k in _QUERY_KEYS}
        if not differ and wrong and all(k in _QUERY_KEYS for k in wrong) and len(queries) == 1:
            n = queries.pop()
            query_variant = query_variant or (f"it is a '{name}' checkpoint with {n} queries: use --config {name} "
                                              f"--set num_queries={n}")
        score = len(differ) + len(wrong)
        if best is None or score < best[0]:
            best = (score, name)
    if query_variant:
        return query_variant
    assert best is not None
    return (f"it matches none of the released layouts ({', '.join(RELEASED)}); the closest is '{best[1]}' "
            f"({best[0]} keys missing, extra or of another shape)")


# ------------------------------------------------------------------------------------------ conversion
def _describe(key: str, value: Any) -> str:
    return f"{key} {tuple(value.shape)} {str(value.dtype).replace('torch.', '')}" if hasattr(value, "shape") else key


def import_state_dict(state: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str = "the checkpoint",
                      ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Original state dict -> (our state dict, optional original keys it held, e.g. position_ids).

    Strict: raises `CheckpointMismatch` naming the first unexpected, missing, or misshapen key and
    the config that would fit. Tensors are passed through, not copied.
    """
    km = key_map(cfg)
    optional = {k for k in km.layout if any(d.optional and d.pattern.match(k) for d in DROPPED_KEYS)}

    def fail(problem: str) -> CheckpointMismatch:
        return CheckpointMismatch(f"{source} does not fit model config '{cfg.name}': {problem}; "
                                  f"{fitting_config(state)}")

    for key, value in state.items():
        if key not in km.layout:
            raise fail(f"unexpected key '{_describe(key, value)}'")
        if not isinstance(value, torch.Tensor):
            raise fail(f"entry '{key}' is a {type(value).__name__}, not a tensor")
    for key in km.layout:
        if key not in state and key not in optional:
            raise fail(f"missing key '{key}'")
    for key, value in state.items():
        shape, dtype = km.layout[key]
        if tuple(value.shape) != shape or value.dtype != dtype:
            want = f"{shape} {str(dtype).replace('torch.', '')}"
            raise fail(f"key '{_describe(key, value)}' should be {want}")
    for alias, target in km.aliases.items():
        if not _same_values(state[alias], state[target]):
            raise CheckpointMismatch(f"{source} is inconsistent: '{alias}' should be the same tensor as "
                                     f"'{target}' (the original registers it twice) but the values differ")
    for key, make in km.constants.items():
        if key in state and not _same_values(state[key], make()):
            raise CheckpointMismatch(f"{source}: the constant buffer '{key}' does not hold the expected values "
                                     f"(it is recomputed from the architecture); the file is corrupt or of "
                                     f"another architecture")
    ours = {our: state[orig] for orig, our in km.to_ours.items()}
    return ours, sorted(k for k in optional if k in state)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_meta or b.is_meta:
        return True   # layout-only checks (tests on meta tensors)
    return a is b or torch.equal(a, b)


def export_state_dict(ours: Mapping[str, torch.Tensor], cfg: ModelConfig, position_ids: bool = True,
                      ) -> dict[str, torch.Tensor]:
    """Our state dict -> the original's (its key order; aliases are the same tensor objects, as there)."""
    layout = our_layout(cfg)
    for key, value in ours.items():
        if key not in layout:
            raise CheckpointMismatch(f"the weights do not fit model config '{cfg.name}': unexpected key "
                                     f"'{_describe(key, value)}'")
    for key, (shape, dtype) in layout.items():
        if key not in ours:
            raise CheckpointMismatch(f"the weights do not fit model config '{cfg.name}': missing key '{key}'")
        if tuple(ours[key].shape) != shape or ours[key].dtype != dtype:
            raise CheckpointMismatch(f"the weights do not fit model config '{cfg.name}': key "
                                     f"'{_describe(key, ours[key])}' should be {shape} {dtype}")
    km = key_map(cfg)
    out: dict[str, torch.Tensor] = {}
    for key in km.layout:
        if key in km.to_ours:
            out[key] = ours[km.to_ours[key]]
        elif key in km.aliases:
            out[key] = ours[km.to_ours[km.aliases[key]]]
        elif key != POSITION_IDS or position_ids:
            out[key] = km.constants[key]()
    return out


# ------------------------------------------------------------------------------------------ files
def load_original(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The weights of an original `torch.save` file (under "model"; a bare state dict is accepted).

    Read with `weights_only=True`, allowing the `argparse.Namespace` of training checkpoints. Files
    that need other pickled objects are refused unless `trust_pickle` (full unpickling can run code).
    """
    from rlipv2_scale.safe_load import torch_load

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    data = torch_load(path, allow=[argparse.Namespace], trust_pickle=trust_pickle)
    if isinstance(data, Mapping) and "model" in data:
        data = data["model"]
    if not isinstance(data, Mapping) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        keys = list(data)[:8] if isinstance(data, Mapping) else type(data).__name__
        raise UserError(f"checkpoint '{path}' has no state dict under 'model' (found {keys}); expected an "
                        "original RLIPv2 checkpoint")
    return dict(data)


def resolve_import_config(config: str, overrides: list[str] | None = None) -> ModelConfig:
    """A named config (or a ModelConfig YAML file) with `key=value` overrides and `compat_original` on."""
    if config in NAMED_CONFIGS:
        data = to_dict(named_config(config))
    elif Path(config).is_file():
        # A model directory's model.yaml names its tokenizer relative to its own folder.
        data = to_dict(resolve_tokenizer(load_config(ModelConfig, config), Path(config).parent))
    else:
        raise UserError(f"'{config}' is neither a model config ({', '.join(RELEASED)}) nor a YAML file")
    data = deep_merge(data, parse_overrides(overrides or []))
    data["compat_original"] = True
    return from_dict(ModelConfig, data)


@dataclass
class ImportSummary:
    out_dir: Path
    config: str
    num_tensors: int
    num_parameters: int
    dropped: dict[str, int]   # dropped original entries per DroppedKey.name


def import_checkpoint(path: str | Path, config: str, out_dir: str | Path, overrides: list[str] | None = None,
                      trust_pickle: bool = False) -> ImportSummary:
    """`rlipv2 import-checkpoint`: original `.pth` -> a model directory (`models/artifacts.py`)."""
    cfg = resolve_import_config(config, overrides)
    state = load_original(path, trust_pickle=trust_pickle)
    ours, optional_present = import_state_dict(state, cfg, source=f"checkpoint '{path}'")
    metadata = {"imported_from": Path(path).name, "original_optional_keys": json.dumps(optional_present)}
    card = ModelCard(source=f"original RLIPv2 checkpoint {Path(path).name} ({cfg.name})")
    out = save_model_dir(out_dir, cfg, ours, card, tokenizer=tokenizer_of(cfg), metadata=metadata)
    dropped: dict[str, int] = {}
    for key in state:
        if key not in key_map(cfg).to_ours:
            reason = next(d.name for d in DROPPED_KEYS if d.pattern.match(key))
            dropped[reason] = dropped.get(reason, 0) + 1
    return ImportSummary(out, cfg.name, len(ours), sum(v.numel() for v in ours.values()), dropped)


def export_checkpoint(model_dir: str | Path, out_path: str | Path, position_ids: str = "auto") -> Path:
    """`rlipv2 export-checkpoint`: model directory -> original `.pth` ({"model": state dict}).

    `position_ids`: "auto" writes the RoBERTa position_ids buffer when the imported file had it or
    the model was not imported (the authors' transformers 4.5.1 expects it), "yes" / "no" force it.
    """
    if position_ids not in ("auto", "yes", "no"):
        raise UserError(f"position_ids must be auto, yes or no, got '{position_ids}'")
    md = read_model_dir(model_dir)
    cfg, ours = md.config, md.state
    if position_ids == "auto":
        imported = md.metadata.get("original_optional_keys")
        keep = POSITION_IDS in json.loads(imported) if imported is not None else True
    else:
        keep = position_ids == "yes"
    state = export_state_dict(ours, cfg, position_ids=keep)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, out)
    return out
