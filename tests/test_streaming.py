"""Streaming loader: mixing, decoding errors, config strictness, and exact mid-epoch resume under
torchrun (2 ranks x 2 workers, gloo). Run as a script, this file is the per-rank program."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from streaming import MDSWriter
from torchvision.io import encode_jpeg

from rlipv2_scale.config import from_dict
from rlipv2_scale.data.config import DataConfig
from rlipv2_scale.data.schema import ImageInfo, Object, Relation, RelationalRecord
from rlipv2_scale.data.shards import COLUMNS
from rlipv2_scale.errors import ConfigError, DataError

SMALL_TRANSFORMS = {"train_scales": [32, 40, 48], "max_size": 80, "crop_scales": [40, 48], "crop_min": 24,
                    "crop_max": 40, "eval_size": 48}


def make_record(source: str, i: int, image_bytes: bytes) -> RelationalRecord:
    return RelationalRecord(
        ImageInfo(i, source, "train", 64, 48),
        [Object((1, 2, 30, 40), "person"), Object((10, 10, 60, 45), f"{source}-thing{i % 3}")],
        [Relation(0, 1, "holds"), Relation(1, 0, f"near{i % 2}", 0.5), Relation(0, 1, "faint", 0.1)],
        image_bytes=image_bytes)


def write_source(root: Path, source: str, n: int, corrupt: set[int] = frozenset()) -> str:
    out = root / source
    g = torch.Generator().manual_seed(len(source))
    with MDSWriter(out=str(out), columns=COLUMNS) as writer:
        for i in range(n):
            data = encode_jpeg(torch.randint(0, 255, (3, 48, 64), dtype=torch.uint8, generator=g)).numpy().tobytes()
            if i in corrupt:
                data = data[:40]
            rec = make_record(source, i, data)
            writer.write({"key": rec.key, "image": rec.image_bytes, "annotation": rec.annotation()})
    return str(out)


def data_config(sources: list[dict], **extra) -> DataConfig:
    base = {"sources": sources, "batch_size": 2, "num_workers": 0, "num_obj_labels": 6, "num_rel_labels": 3,
            "transforms": SMALL_TRANSFORMS}
    base.update(extra)
    return from_dict(DataConfig, base)


def test_one_epoch_mixes_sources_by_proportion_and_builds_batches(tmp_path):
    from rlipv2_scale.data.streaming import build_train_loader

    a, b = write_source(tmp_path, "vg", 20), write_source(tmp_path, "coco", 10)
    cfg = data_config([{"name": "vg", "local": a, "proportion": 0.75}, {"name": "coco", "local": b,
                                                                         "proportion": 0.25}], epoch_size=24)
    loader = build_train_loader(cfg)
    keys, batches = [], 0
    for batch in loader:
        batches += 1
        keys += batch.meta["keys"]
        assert batch.images.shape[0] == 2 and batch.pixel_mask.shape == (2, *batch.images.shape[2:])
        # 6 names (positives first, then negatives from the 7-name vocabulary) + "no objects".
        assert batch.obj_texts[-1] == "no objects" and len(batch.obj_texts) == 7
        assert set(batch.obj_texts[:batch.num_obj_pos]) == {n for t in batch.targets for n in
                                                           (batch.obj_texts[i] for i in t.labels)}
        # "faint" (confidence 0.1) is below the 0.20 threshold: neither positive nor in the vocabulary.
        assert sorted(batch.rel_texts) == ["holds", "near0", "near1"]
        for t in batch.targets:
            assert t.rel_labels.shape[1] == len(batch.rel_texts)
    assert batches == 12
    sources = Counter(k.split("/")[0] for k in keys)
    assert sources == {"vg": 18, "coco": 6}
    assert loader.state_dict()["sample_in_epoch"] == 24


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_raises_data_error_naming_the_key(tmp_path, workers):
    from rlipv2_scale.data.streaming import build_train_loader

    a = write_source(tmp_path, "vg", 4, corrupt={0, 1, 2, 3})
    loader = build_train_loader(data_config([{"name": "vg", "local": a}], num_workers=workers))
    with pytest.raises(DataError, match=r"vg/train/\d.*corrupt or truncated"):
        next(iter(loader))


def test_missing_shard_dir_and_unknown_keys_are_config_errors(tmp_path):
    from rlipv2_scale.data.streaming import build_train_loader

    with pytest.raises(ConfigError, match="not an MDS shard directory"):
        build_train_loader(data_config([{"name": "vg", "local": str(tmp_path / "nowhere")}]))
    with pytest.raises(ConfigError, match="launcher environment says 0 / 1"):
        build_train_loader(data_config([{"name": "vg", "local": "x"}]), rank=1, world_size=2)
    with pytest.raises(ConfigError, match="unknown config key 'sources\\[0\\].proportoin'"):
        data_config([{"name": "vg", "local": "x", "proportoin": 0.5}])
    with pytest.raises(ConfigError, match="at most one of proportion / repeat / choose"):
        data_config([{"name": "vg", "local": "x", "proportion": 0.5, "repeat": 2.0}])
    with pytest.raises(ConfigError, match="every source or to none"):
        data_config([{"name": "vg", "local": "x", "proportion": 0.5}, {"name": "coco", "local": "y"}])


def test_a_source_with_no_samples_is_a_data_error_naming_it(tmp_path):
    from rlipv2_scale.data.streaming import build_train_loader

    # What `rlipv2 data pseudo-label` writes when its threshold keeps no image: an index of no shard.
    empty = write_source(tmp_path, "pseudo", 0)
    assert json.loads((Path(empty) / "index.json").read_text())["shards"] == []
    good = write_source(tmp_path, "vg", 4)
    for train in (True, False):
        cfg = data_config([{"name": "vg", "local": good}, {"name": "pseudo", "local": empty}])
        with pytest.raises(DataError, match=rf"data source 'pseudo': '{empty}' holds no samples.*threshold.*"
                                            r"drop the source from data.sources or rewrite it") as info:
            build_train_loader(cfg, train=train)
        assert info.value.reason == "empty_source"


def test_each_epoch_sees_every_sample_with_fresh_augmentation(tmp_path):
    from rlipv2_scale.data.streaming import build_train_loader

    a = write_source(tmp_path, "vg", 8)
    loader = build_train_loader(data_config([{"name": "vg", "local": a}]))
    epochs = [{k: (b.meta["epoch"], b.targets[i].size) for b in loader for i, k in enumerate(b.meta["keys"])}
              for _ in range(2)]
    assert set(epochs[0]) == set(epochs[1]) == {f"vg/train/{i}" for i in range(8)}
    assert {e for e, _ in epochs[0].values()} == {0} and {e for e, _ in epochs[1].values()} == {1}
    assert [s for _, s in epochs[0].values()] != [epochs[1][k][1] for k in epochs[0]]


def test_fixed_labels_give_the_same_lists_every_batch(tmp_path):
    from rlipv2_scale.data.streaming import build_train_loader

    a = write_source(tmp_path, "vg", 6)
    objs = ["person", "vg-thing0", "vg-thing1", "vg-thing2", "dog"]
    rels = ["holds", "near0", "near1", "faint", "rides"]
    loader = build_train_loader(data_config([{"name": "vg", "local": a}], fixed_obj_labels=objs,
                                            fixed_rel_labels=rels))
    for batch in loader:
        assert batch.obj_texts == objs + ["no objects"] and batch.rel_texts == rels
        assert batch.targets[0].labels[0] == 0


# -- exact resume under torchrun ----------------------------------------------------------------------
RESUME_AFTER = 3


def _digest(batch) -> str:
    h = hashlib.sha1(batch.images.numpy().tobytes())
    for t in batch.targets:
        h.update(t.boxes.numpy().tobytes())
        h.update(t.rel_labels.numpy().tobytes())
    h.update(json.dumps([batch.obj_texts, batch.rel_texts]).encode())
    return h.hexdigest()


def _rank_main(mode: str, root: str) -> None:
    import torch.distributed as dist

    from rlipv2_scale.data.streaming import build_train_loader

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = data_config([{"name": "vg", "local": f"{root}/vg", "proportion": 0.6},
                       {"name": "coco", "local": f"{root}/coco", "proportion": 0.4}],
                      num_workers=2, epoch_size=48)
    loader = build_train_loader(cfg, rank=rank, world_size=world)
    if mode == "resume":
        loader.load_state_dict(json.loads(Path(root, "state.json").read_text()))
    seen = []
    for step, batch in enumerate(loader):
        seen.append({"keys": batch.meta["keys"], "digest": _digest(batch)})
        if mode == "full" and step + 1 == RESUME_AFTER and rank == 0:
            Path(root, "state.json").write_text(json.dumps(loader.state_dict()))
    Path(root, f"{mode}-rank{rank}.json").write_text(json.dumps({"rank": rank, "world": world, "seen": seen}))
    dist.barrier()
    dist.destroy_process_group()


def _torchrun(mode: str, root: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, mode, str(root)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.distributed
@pytest.mark.slow
def test_mid_epoch_resume_is_exact_with_two_ranks_and_two_workers(tmp_path):
    write_source(tmp_path, "vg", 30)
    write_source(tmp_path, "coco", 20)
    _torchrun("full", tmp_path)
    _torchrun("resume", tmp_path)
    full = [json.loads((tmp_path / f"full-rank{r}.json").read_text()) for r in range(2)]
    resumed = [json.loads((tmp_path / f"resume-rank{r}.json").read_text()) for r in range(2)]
    assert [f["rank"] for f in full] == [0, 1] and all(f["world"] == 2 for f in full + resumed)
    for f, r in zip(full, resumed):
        assert len(f["seen"]) == 12                  # 48 samples / 2 ranks / batch 2
        assert r["seen"] == f["seen"][RESUME_AFTER:]  # same keys, pixels, targets and label lists
    keys = [k for f in full for b in f["seen"] for k in b["keys"]]
    # The ranks split the epoch without overlap; 0.6 / 0.4 of 48 samples, rounded by streaming.
    assert len(set(keys)) == 48 and Counter(k.split("/")[0] for k in keys) == {"vg": 29, "coco": 19}


if __name__ == "__main__":
    _rank_main(sys.argv[1], sys.argv[2])
