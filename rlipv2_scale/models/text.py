"""RoBERTa label encoder: one pooled 768-d vector per label string (the original's
`models/dab_deformable/deformable_transformer.py: RLIP_ParSeDABDeformableTransformer_v2`).

Every label ("person", "ride", "no objects", ...) is its own sentence; the label embedding is
RoBERTa's `pooler_output`. Real configs load `roberta-base` (weights and tokenizer); tiny configs
build a small random `RobertaConfig` and a byte-level BPE tokenizer trained locally on a label
corpus, so nothing is downloaded. In evaluation (eval mode, no autograd) the embeddings of a label
list are cached: the list is fixed there and RoBERTa over hundreds of strings is not free.
"""
from __future__ import annotations

import functools
import tempfile
from importlib import resources
from pathlib import Path
from typing import Callable, TypeVar

import torch
from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

from rlipv2_scale.errors import ConfigError, UserError
from rlipv2_scale.models.config import TextConfig

_T = TypeVar("_T")

_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]   # RoBERTa's ids 0..4


def build_local_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 1024) -> RobertaTokenizerFast:
    """Train a byte-level BPE on `texts`, save it to `out_dir` and return it as a RoBERTa tokenizer.

    Byte-level, so any string is encodable; the special tokens take RoBERTa's ids (pad = 1).
    `out_dir` can later be passed as `TextConfig.tokenizer`.
    """
    from tokenizers import ByteLevelBPETokenizer

    if vocab_size < 256 + len(_SPECIAL_TOKENS):
        raise ConfigError(f"tokenizer vocab_size={vocab_size} is smaller than the 261 byte + special tokens")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=_SPECIAL_TOKENS,
                            show_progress=False)
    vocab, merges = bpe.save_model(str(out_dir))
    tokenizer = RobertaTokenizerFast(vocab_file=vocab, merges_file=merges)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def default_label_corpus() -> list[str]:
    """The packaged label corpus (HICO-DET object and verb names) used for tiny tokenizers."""
    text = resources.files("rlipv2_scale.models").joinpath("label_corpus.txt").read_text()
    return [line for line in text.splitlines() if line]


@functools.lru_cache(maxsize=4)
def default_tokenizer(vocab_size: int) -> RobertaTokenizerFast:
    """Byte-level BPE trained on the packaged label corpus (deterministic; for configs without weights)."""
    with tempfile.TemporaryDirectory(prefix="rlipv2-tokenizer-") as out:
        return build_local_tokenizer(default_label_corpus(), out, vocab_size)


def roberta_config(cfg: TextConfig) -> RobertaConfig:
    """The RoBERTa architecture of `cfg` (roberta-base values unless overridden)."""
    return RobertaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                         max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=1,
                         layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)


def looks_like_path(ref: str) -> bool:
    """True for a reference that can only be a local folder, never a Hub id (`org/name` or `name`)."""
    return Path(ref).is_absolute() or ref.startswith((".", "~")) or ref.count("/") > 1 or "\\" in ref


# What transformers raises for a source it cannot load: OSError (hub and cache errors, missing files),
# ValueError (invalid repo ids), TypeError (a tokenizer whose vocabulary files were not found).
_LOAD_ERRORS = (OSError, ValueError, TypeError)


class NotAvailableError(UserError):
    """A tokenizer / text encoder that is neither a local folder nor cached, and cannot be downloaded now."""


def from_pretrained(load: Callable[..., _T], source: str, what: str, setting: str) -> _T:
    """`load(source)` (a transformers `from_pretrained`) of a local folder or a Hub id; a UserError
    naming `source`, `setting` and the fix when it cannot be loaded.

    A Hub id is read from the cache first, and the Hub is asked once (no retries) before
    downloading: unreachable, transformers retries every file for minutes and then fails with an
    unrelated error."""
    fix = (f"download it where the Hub is reachable (`huggingface-cli download {source} --local-dir DIR`) "
           f"and point {setting} at DIR")
    path = Path(source).expanduser()
    if path.is_dir():
        try:
            return load(str(path))
        except _LOAD_ERRORS as exc:
            raise UserError(f"{what} folder '{source}' ({setting}) cannot be loaded ({type(exc).__name__}: {exc}); "
                            f"point {setting} at a complete folder, or {fix}") from None
    if looks_like_path(source):
        raise NotAvailableError(f"{what} folder '{source}' ({setting}) does not exist; point {setting} at the "
                                f"folder, or {fix}")
    try:
        return load(source, local_files_only=True)
    except _LOAD_ERRORS:
        pass
    import huggingface_hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        reason = "the Hub is switched off (HF_HUB_OFFLINE)"
    else:
        try:
            huggingface_hub.model_info(source, timeout=10)
            return load(source)
        except _LOAD_ERRORS as exc:
            reason = f"it could not be fetched from the Hugging Face Hub ({type(exc).__name__})"
    raise NotAvailableError(f"{what} '{source}' ({setting}) is neither a local folder nor in the Hugging Face "
                            f"cache, and {reason}: {fix}")


def _load(source: str | None, vocab_size: int) -> RobertaTokenizerFast:
    if source is None:
        return default_tokenizer(vocab_size)
    return from_pretrained(RobertaTokenizerFast.from_pretrained, source, "tokenizer", "model.text.tokenizer")


def load_tokenizer(cfg: TextConfig) -> RobertaTokenizerFast:
    """The tokenizer a label encoder of `cfg` uses (`cfg.tokenizer`, else `cfg.pretrained`'s, else the
    packaged label-corpus BPE)."""
    return _load(cfg.tokenizer or cfg.pretrained, cfg.vocab_size)


class LabelEncoder(RobertaModel):
    """`RobertaModel` (keys as in HF) + its tokenizer + an evaluation cache of label embeddings."""

    def __init__(self, config: RobertaConfig):
        super().__init__(config, add_pooling_layer=True)
        self._tokenizer: RobertaTokenizerFast | None = None
        self._tokenizer_source: str | None = None
        self.cache_eval_embeddings = True
        self._cache: dict[tuple, torch.Tensor] = {}
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_cache())

    @classmethod
    def build(cls, cfg: TextConfig, pretrained: bool = True) -> "LabelEncoder":
        if pretrained and cfg.pretrained:
            model = from_pretrained(cls.from_pretrained, cfg.pretrained, "text encoder", "model.text.pretrained")
            for key in ("hidden_size", "num_layers", "vocab_size"):
                want = getattr(cfg, key)
                got = getattr(model.config, {"num_layers": "num_hidden_layers"}.get(key, key))
                if want != got:
                    raise ConfigError(f"text.{key}={want} does not match the checkpoint '{cfg.pretrained}' ({got})")
        else:
            model = cls(roberta_config(cfg))
        model._tokenizer_source = cfg.tokenizer or cfg.pretrained
        model.cache_eval_embeddings = cfg.cache_eval_embeddings
        return model

    @property
    def tokenizer(self) -> RobertaTokenizerFast:
        """Loaded lazily: building a model (e.g. to count parameters) never touches the hub."""
        if self._tokenizer is None:
            self._tokenizer = _load(self._tokenizer_source, self.config.vocab_size)
            if len(self._tokenizer) > self.config.vocab_size:
                raise ConfigError(f"tokenizer '{self._tokenizer_source}' has {len(self._tokenizer)} tokens but the "
                                  f"text encoder only {self.config.vocab_size}; set text.vocab_size accordingly")
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: RobertaTokenizerFast) -> None:
        self._tokenizer = tokenizer
        self.clear_cache()

    def clear_cache(self) -> None:
        self._cache.clear()

    def train(self, mode: bool = True) -> "LabelEncoder":
        self.clear_cache()   # weights are about to change
        return super().train(mode)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Pooled embedding of each label string: [len(texts), hidden]."""
        if not texts:
            raise ValueError("embed() needs at least one label string")
        use_cache = self.cache_eval_embeddings and not self.training and not torch.is_grad_enabled()
        device = self.embeddings.word_embeddings.weight.device
        key = (tuple(texts), device)
        if use_cache and key in self._cache:
            return self._cache[key]
        tok = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=self.config.max_position_embeddings - 2, return_tensors="pt")
        out = self(input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device))
        pooled = out.pooler_output
        if use_cache:
            self._cache[key] = pooled
        return pooled
