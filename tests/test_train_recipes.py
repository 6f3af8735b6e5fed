"""Tiny recipes with the real RLIPv2 model on synthetic shards: 2 ranks under ZeRO-2 train, stop,
resume exactly (real streaming loader), export into a fresh model; a fine-tuning twin runs its
validation hook."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlipv2_scale.train.checkpoint import gathered_state_dict

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes" / "tiny"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory holding data/synthetic/shards/{vg,coco,o365,hico,hico_val} (the tiny recipes' paths)."""
    from rlipv2_scale.data.convert import convert
    from rlipv2_scale.data.synthetic import write_split

    root = tmp_path_factory.mktemp("work")
    shards = root / "data" / "synthetic" / "shards"
    write_split(root / "raw" / "train", 12, seed=0, split="train", size=128)
    write_split(root / "raw" / "val", 4, seed=1, split="val", size=128)
    for name in ("vg", "coco", "o365"):
        convert("vg", root / "raw/train/scene_graphs.json", root / "raw/train", shards / name, progress=False)
    convert("hico-det", root / "raw/train/trainval_hico.json", root / "raw/train/images", shards / "hico",
            progress=False)
    convert("hico-det", root / "raw/val/val_hico.json", root / "raw/val/images", shards / "hico_val", split="val",
            progress=False)
    return root


def rlipv2(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "rlipv2_scale.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_tiny_pretraining_two_ranks_resumes_exactly_and_exports(workdir, tmp_path):
    recipe = str(RECIPES / "pretrain" / "r50_vg_coco_o365.yaml")
    common = ["--nproc", "2", "train.max_steps=2", "checkpoint.every_steps=1", "data.batch_size=1"]
    a, b = tmp_path / "a", tmp_path / "b"
    rlipv2(workdir, "train", recipe, f"run.dir={a}", *common)
    rlipv2(workdir, "train", recipe, f"run.dir={b}", *common, "--resume", str(a / "checkpoints" / "step_00000001"))
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in ma] == [1, 2] and [r["step"] for r in mb] == [2]
    terms = [k for k in ma[1] if k.startswith("loss")]
    assert len(terms) > 6 and {k: mb[0][k] for k in terms} == {k: ma[1][k] for k in terms}
    assert ma[0]["samples"] == 2                                   # 2 ranks x 1 image
    sa = gathered_state_dict(a / "checkpoints" / "step_00000002")
    sb = gathered_state_dict(b / "checkpoints" / "step_00000002")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    out = tmp_path / "model.safetensors"
    rlipv2(workdir, "export", str(b), "--out", str(out))
    from safetensors.torch import load_file

    from rlipv2_scale.models.build import build_model
    from rlipv2_scale.train.config import load_run_config

    model = build_model(load_run_config(b / "config.yaml").model, pretrained=False)
    model.load_state_dict(load_file(str(out)), strict=True)
    state = model.state_dict()
    assert all(torch.equal(state[k].float(), sa[k]) for k in sa)


def test_tiny_finetuning_runs_its_validation_hook(workdir, tmp_path):
    run_dir = tmp_path / "ft"
    proc = rlipv2(workdir, "train", str(RECIPES / "finetune" / "hico_full_r50.yaml"), f"run.dir={run_dir}",
                  "train.max_steps=2", "eval.every_steps=0", "logging.progress=false")
    records = metrics(run_dir)
    val = [r for r in records if "val/mAP" in r]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert len(val) == 1 and val[0]["step"] == 2 and 0.0 <= val[0]["val/mAP"] <= 100.0
    assert val[0]["val/images"] == 4.0                             # every validation image, once
    assert "rlipv2: validation" in proc.stdout
    assert (run_dir / "COMPLETED").is_file() and (run_dir / "checkpoints" / "latest").is_file()


def test_a_missing_shard_is_reported_by_name(workdir, tmp_path):
    import shutil

    shards = tmp_path / "data" / "synthetic" / "shards"
    shutil.copytree(workdir / "data" / "synthetic" / "shards" / "vg", shards / "vg")
    missing = next((shards / "vg").glob("shard.*.mds"))
    missing.unlink()
    proc = subprocess.run([sys.executable, "-m", "rlipv2_scale.cli", "train", str(RECIPES / "pretrain" / "r50_vg.yaml"),
                           f"run.dir={tmp_path / 'run'}"], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"'{missing.relative_to(tmp_path)}' is missing" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_from_the_last_step_of_an_epoch(workdir, tmp_path):
    """A checkpoint taken on an epoch's last step resumes into the next epoch (12 images, batch 4:
    3 steps per epoch on one rank)."""
    recipe = str(RECIPES / "pretrain" / "r50_vg.yaml")
    run = tmp_path / "run"
    common = [f"run.dir={run}", "data.batch_size=4", "checkpoint.every_steps=3"]
    rlipv2(workdir, "train", recipe, *common, "train.max_steps=3")
    rlipv2(workdir, "train", recipe, *common, "train.max_steps=5", "--resume", "auto")
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5]
    assert (run / "COMPLETED").exists()
