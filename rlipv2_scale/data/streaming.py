"""Streaming training data: MDS shard sources mixed by proportion, shuffled, exactly resumable.

`RelationalStream` is a mosaicml-streaming `StreamingDataset` over one `Stream` per source
(VG 0.4 / COCO 0.3 / O365 0.3, ...). Each sample (`key`, `image` bytes, `annotation` JSON) is
decoded into a `RelationalRecord`, then augmented into an `Example` (`transforms.py`); the loader's
`Collator` builds the batch's label sequence and packs the batch in the worker (uint8 images);
`RelationalLoader` finishes each `Batch` (float, normalised) in the training process.

Exact resume: streaming's sample order is a function of (seed, epoch, `num_canonical_nodes`), and
every random draw of ours is seeded from (seed, epoch, sample id) (augmentation) or from the batch's
sample ids (negative labels). So `RelationalLoader.state_dict()` (the number of samples consumed
over all ranks, with the canonical node count) is all a checkpoint needs: a resumed run yields the
same remaining batches, bit for bit; on another number of ranks, the same global batches (the
trainer loads rank 0's state on every rank).

Rank and world size come from the torchrun environment (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE),
which streaming reads itself. The loader does its own per-rank partitioning, so the trainer must
not wrap it with `accelerator.prepare`.

A sample whose image does not decode raises `DataError` naming its shard key (skipping it would
change the number of samples per batch and break exact resume); `rlipv2 data convert` already
drops undecodable images, so this means shards were damaged after conversion.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from streaming import Stream, StreamingDataLoader, StreamingDataset

from rlipv2_scale.data.batch import Batch
from rlipv2_scale.data.collate import Collator, PackedBatch
from rlipv2_scale.data.config import DataConfig, SourceConfig
from rlipv2_scale.data.labels import LabelVocabulary
from rlipv2_scale.data.mds_index import check_shards
from rlipv2_scale.data.schema import RelationalRecord
from rlipv2_scale.data.shards import record_from_sample
from rlipv2_scale.data.shared_memory import clean_stale
from rlipv2_scale.data.transforms import EvalTransform, Example, TrainTransform, prepare_example, sample_generator
from rlipv2_scale.errors import ConfigError, DataError

_CLEANED = False


def _cache_dir(cfg: DataConfig, source: SourceConfig) -> str:
    """Download cache of a remote source: the same on every rank of a node (streaming shares one
    cache per node between its ranks), distinct per remote so that two jobs or two sources never
    collide."""
    if source.local:
        return source.local
    assert source.remote is not None     # SourceConfig: local or remote
    root = cfg.cache_dir or os.path.join(tempfile.gettempdir(), "rlipv2-streaming")
    digest = hashlib.sha1(source.remote.encode()).hexdigest()[:12]
    return os.path.join(root, f"{source.name}-{digest}")


def make_streams(cfg: DataConfig) -> list[Stream]:
    streams = []
    for source in cfg.sources:
        if source.remote is None:
            check_local_source(source)
        streams.append(Stream(remote=source.remote, local=_cache_dir(cfg, source), proportion=source.proportion,
                              repeat=source.repeat, choose=source.choose))
    return streams


def check_local_source(source: SourceConfig) -> None:
    """A local source's index is there, lists at least one sample, and every shard file it lists is
    whole (a truncated file would otherwise fail as an IndexError on some sample mid-epoch)."""
    if source.local is None:
        raise ConfigError(f"data source '{source.name}' has neither local nor remote set")
    if not (Path(source.local) / "index.json").is_file():
        raise ConfigError(f"data source '{source.name}': '{source.local}' is not an MDS shard directory "
                          f"(no index.json); write shards with `rlipv2 data convert --out {source.local}`")
    try:
        index = check_shards(source.local)
    except DataError as exc:
        raise DataError(f"data source '{source.name}': {exc}", exc.sample_id, exc.reason) from None
    # Streaming would only fail later, in every rank, with a bare "Stream contains no samples".
    if sum(info["samples"] for info in index["shards"]) == 0:
        raise DataError(f"data source '{source.name}': '{source.local}' holds no samples (its index.json lists "
                        f"none): the tool that wrote it kept no image (e.g. a `rlipv2 data pseudo-label "
                        f"--threshold` too high); drop the source from data.sources or rewrite it",
                        str(source.local), "empty_source")


def _record(sample: dict[str, Any]) -> RelationalRecord:
    try:
        return record_from_sample(sample)
    except (KeyError, TypeError, ValueError) as exc:
        key = sample.get("key", "?")
        raise DataError(f"sample {key!r}: the annotation column does not match the record schema ({exc!r}); "
                        f"re-convert this source", sample_id=str(key), reason="malformed_annotation") from exc


class RelationalStream(StreamingDataset):
    """Mixed, shuffled shard sources → augmented `Example`s (one per image)."""

    def __init__(self, cfg: DataConfig, train: bool = True):
        self.cfg = cfg
        self.transform = TrainTransform(cfg.transforms) if train else EvalTransform(cfg.transforms)
        self._epoch = 0
        super().__init__(
            streams=make_streams(cfg), batch_size=cfg.batch_size, shuffle=cfg.shuffle and train,
            shuffle_seed=cfg.seed, shuffle_algo=cfg.shuffle_algo, shuffle_block_size=cfg.shuffle_block_size,
            num_canonical_nodes=cfg.num_canonical_nodes, epoch_size=cfg.epoch_size,
        )

    def _resume_incr_epoch(self) -> tuple[int, int]:
        # Streaming decides the epoch (and the resume offset) in each worker at the start of
        # iteration; remember it to seed the per-sample augmentation.
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._epoch = epoch
        return epoch, sample_in_epoch

    def get_item(self, sample_id: int, retry: int = 7) -> Example:
        sample = super().get_item(sample_id, retry)
        record = _record(sample)
        return prepare_example(record, self.transform, sample_generator(self.cfg.seed, self._epoch, sample_id),
                               relation_threshold=self.cfg.relation_threshold,
                               max_relations=self.cfg.max_relations, sample_id=int(sample_id), epoch=self._epoch)


class RelationalLoader(StreamingDataLoader):
    """`StreamingDataLoader` that counts `Batch`es; `state_dict()` / `load_state_dict()` resume exactly.
    Workers send `PackedBatch`es; the float batch is finished here, in the training process."""

    pin_float = False

    def _get_batch_size(self, batch: Batch | PackedBatch) -> int:
        return batch.batch_size

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]  # batches, not DataLoader's iterator
        pin = self.pin_float and torch.cuda.is_available()
        for batch in super().__iter__():
            yield batch.unpack(pin) if isinstance(batch, PackedBatch) else batch


def load_vocabulary(cfg: DataConfig) -> LabelVocabulary | None:
    """The label frequencies negatives are drawn from: a saved file, or a scan of the local shards."""
    if cfg.fixed_labels or not cfg.negative_sampling:
        return None
    if cfg.vocabulary is not None:
        return LabelVocabulary.load(cfg.vocabulary)
    remote = [s.name for s in cfg.sources if s.remote is not None]
    if remote:
        raise ConfigError(f"data sources {remote} are remote: set data.vocabulary to a saved label vocabulary "
                          f"(LabelVocabulary.from_shards(...).save(path) on a local copy)")
    return LabelVocabulary.from_shards([s.local for s in cfg.sources if s.local is not None], cfg.relation_threshold)


def build_train_loader(cfg: DataConfig, rank: int | None = None, world_size: int | None = None,
                       vocab: LabelVocabulary | None = None, train: bool = True) -> RelationalLoader:
    """The per-rank training loader. Call it in every rank after `torch.distributed` is set up."""
    env_rank, env_world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if (rank is not None and rank != env_rank) or (world_size is not None and world_size != env_world):
        raise ConfigError(f"build_train_loader got rank {rank} / world size {world_size}, but the launcher "
                          f"environment says {env_rank} / {env_world}; streaming partitions by the environment")
    global _CLEANED
    if cfg.clean_shared_memory and not _CLEANED:
        # Dead processes' segments only: the library's cleaner would also unlink a neighbouring job's
        # live ones. Once per process is enough, and the check reads every process's memory map.
        clean_stale()
        _CLEANED = True
    dataset = RelationalStream(cfg, train=train)
    if vocab is None:
        vocab = load_vocabulary(cfg)
    workers = cfg.num_workers
    # Workers persist across epochs (streaming supports it): no re-fork and copy-on-write each epoch.
    loader = RelationalLoader(dataset, batch_size=cfg.batch_size, collate_fn=Collator(cfg, vocab),
                              num_workers=workers, drop_last=cfg.drop_last,
                              prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
                              persistent_workers=workers > 0)
    loader.pin_float = cfg.pin_memory   # pinned where the float batch is made (unpack), not in workers
    return loader
