"""`DataConfig`: where the shards are, how they are mixed, augmented, labelled and batched.

Loaded strictly through `rlipv2_scale.config.from_dict` (unknown keys are errors). Defaults follow
the original pre-training (`datasets/mixed_dataset.py: MixedRelDetection`, `make_vg_transforms`,
`engine.py: merge_batch_data`); the demo recipe shrinks the image
sizes and the label-sequence lengths.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlipv2_scale.labels import metadata


@dataclass
class SourceConfig:
    """One shard directory (one dataset) of the mixture.

    `local` is the shard directory itself when there is no `remote`; with a `remote` (s3://, gs://,
    another path) it is the cache the shards are downloaded to (leave it empty for a per-job
    default under the system temp dir). At most one of `proportion` (fraction of each epoch),
    `repeat` (times each sample is seen per epoch) or `choose` (samples per epoch) is set; with
    none, the source contributes each of its samples once.
    """

    name: str
    local: str | None = None
    remote: str | None = None
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("source name must not be empty")
        if self.local is None and self.remote is None:
            raise ValueError(f"source '{self.name}': set 'local' (a shard directory) or 'remote'")
        given = [k for k in ("proportion", "repeat", "choose") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"source '{self.name}': set at most one of proportion / repeat / choose, got {given}")
        for key in given:
            if getattr(self, key) <= 0:
                raise ValueError(f"source '{self.name}': {key} must be positive, got {getattr(self, key)}")


def _default_scales() -> list[int]:
    return list(range(480, 801, 32))


@dataclass
class TransformConfig:
    """DETR-style augmentation sizes (pixels). The demo uses ~128 px versions of these."""

    train_scales: list[int] = field(default_factory=_default_scales)  # random shorter side
    max_size: int = 1333                                               # cap on the longer side
    crop_prob: float = 0.5                                             # branch (b): resize → crop → resize
    crop_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_min: int = 384
    crop_max: int = 600
    flip_prob: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    eval_size: int = 800

    def __post_init__(self) -> None:
        for key in ("train_scales", "crop_scales"):
            sizes = getattr(self, key)
            if not sizes or any(s <= 0 for s in sizes):
                raise ValueError(f"transforms.{key} must be a non-empty list of positive sizes, got {sizes}")
        if not 0 < self.crop_min <= self.crop_max:
            raise ValueError(f"transforms.crop_min/crop_max must satisfy 0 < min <= max, got "
                             f"{self.crop_min}/{self.crop_max}")
        if self.max_size < max(self.train_scales) or self.eval_size <= 0 or self.max_size < self.eval_size:
            raise ValueError(f"transforms.max_size ({self.max_size}) must be >= every train scale and the eval size")
        for key in ("crop_prob", "flip_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"transforms.{key} must be a probability in [0, 1]")
        for key in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"transforms.{key} must be in [0, 1), got {getattr(self, key)}")


@dataclass
class DataConfig:
    sources: list[SourceConfig]
    batch_size: int = 4                       # per rank
    num_workers: int = 2                      # per rank
    prefetch_factor: int = 2
    pin_memory: bool = False                  # page-locked float batches (CUDA only)
    shuffle: bool = True
    seed: int = 42                            # shuffle, augmentation and negative sampling
    shuffle_algo: str = "py1e"
    shuffle_block_size: int | None = None
    num_canonical_nodes: int | None = None    # keep fixed across resumes on a different node count
    epoch_size: int | None = None             # samples per epoch over all sources (default: derived)
    drop_last: bool = True
    cache_dir: str | None = None              # root of download caches for remote sources
    clean_shared_memory: bool = True          # unlink streaming shared memory left by a killed run
    transforms: TransformConfig = field(default_factory=TransformConfig)
    # Label sequence (the original's `engine.py: merge_batch_data`): positives of the batch, then frequency-sampled negatives up to these sizes.
    num_obj_labels: int = 333
    num_rel_labels: int = 167
    negative_sampling: bool = True
    vocabulary: str | None = None             # label-frequency JSON (`LabelVocabulary.save`); scanned if None
    # Fine-tuning: the benchmark's fixed label lists (no negatives; every batch uses them as given),
    # given by name (`labels: hico-det | vcoco`, from `rlipv2_scale.labels.metadata`) or as lists.
    labels: Literal["hico-det", "vcoco"] | None = None
    fixed_obj_labels: list[str] | None = None
    fixed_rel_labels: list[str] | None = None
    relation_threshold: float = 0.20          # pseudo-label relations below this confidence are ignored
    max_relations: int = 100                  # per image, the first ones (as the original)
    confidence_weighted: bool = False         # relation targets = confidence instead of 1

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("data.sources must list at least one shard source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources names must be unique, got {names}")
        with_prop = [s.proportion is not None for s in self.sources]
        if any(with_prop) and not all(with_prop):
            raise ValueError("data.sources: give a proportion to every source or to none")
        for key in ("batch_size", "num_obj_labels", "num_rel_labels", "max_relations", "prefetch_factor"):
            if getattr(self, key) <= 0:
                raise ValueError(f"data.{key} must be positive, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.relation_threshold <= 1.0:
            raise ValueError(f"data.relation_threshold must be in [0, 1], got {self.relation_threshold}")
        if self.labels is not None:
            named = benchmark_labels(self.labels)
            # (a resolved config, as saved with a run, holds both: the same lists)
            if (self.fixed_obj_labels, self.fixed_rel_labels) not in ((None, None), named):
                raise ValueError(f"data.labels={self.labels} names the label lists: remove fixed_obj_labels / "
                                 "fixed_rel_labels, or set labels: null to list them")
            self.fixed_obj_labels, self.fixed_rel_labels = named
        elif self.fixed_obj_labels is not None and self.fixed_rel_labels is not None:
            _refuse_drift(self.fixed_obj_labels, self.fixed_rel_labels)
        if (self.fixed_obj_labels is None) != (self.fixed_rel_labels is None):
            raise ValueError("data.fixed_obj_labels and data.fixed_rel_labels go together: set both or neither")
        if self.fixed_obj_labels is not None and (not self.fixed_obj_labels or not self.fixed_rel_labels):
            raise ValueError("data.fixed_obj_labels / fixed_rel_labels must not be empty lists")

    @property
    def fixed_labels(self) -> bool:
        return self.fixed_obj_labels is not None


def benchmark_labels(name: str) -> tuple[list[str], list[str]]:
    """(object texts, relation texts) a benchmark is fine-tuned and scored with."""
    objects = [o["name"] for o in metadata.hico_objects()]          # V-COCO uses the same 80 COCO objects
    if name == "hico-det":
        return objects, [v["text"] for v in metadata.hico_verbs()]
    return objects, [v["text"] for v in metadata.vcoco_verbs()]


def _refuse_drift(objects: list[str], relations: list[str]) -> None:
    """Lists that are a benchmark's but for a few entries (a typo, an old name) would silently be
    scored in a label space of their own instead of the benchmark's: name the differences."""
    for name in ("hico-det", "vcoco"):
        want_obj, want_rel = benchmark_labels(name)
        if (len(objects), len(relations)) != (len(want_obj), len(want_rel)):
            continue
        differ = [f"{a!r} (expected {b!r})" for a, b in zip(objects + relations, want_obj + want_rel) if a != b]
        if 0 < len(differ) <= 5:
            raise ValueError(f"the fixed label lists are {name}'s but for {', '.join(differ)}; write "
                             f"labels: {name} instead of the lists (or fix those entries)")
