"""The Relation Tagger as a task of the one trainer: recipe section, pair slots, pair feed, init
from a detector, and (slow) the tiny recipe trained, resumed exactly and exported for `rlipv2 data tag`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlipv2_scale.data.batch import Batch, Target
from rlipv2_scale.errors import ConfigError, UserError
from rlipv2_scale.models.artifacts import load_state
from rlipv2_scale.models.config import named_config
from rlipv2_scale.train.config import load_run_config, run_config_from_dict
from rlipv2_scale.train.tagger import TAGGER_ONLY, TaggerLoader, tagger_forward

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tagger" / "tiny.yaml"


def test_tagger_recipes_load_with_their_noise_and_loss():
    big = load_run_config(ROOT / "recipes" / "tagger" / "vg_r50.yaml")
    assert big.model.name == "tagger_r50" and big.model.num_pairs == 100
    assert (big.tagger.box_noise, big.tagger.label_noise) == (0.4, 0.2)
    assert big.loss.matching == "identity" and big.loss.rel_loss == "focal" and big.data.num_rel_labels == 500
    tiny = load_run_config(TINY, ["tagger.box_noise=0.6", "tagger.label_noise=0.3"])
    assert tiny.model.name == "tiny_tagger" and (tiny.tagger.box_noise, tiny.tagger.label_noise) == (0.6, 0.3)
    with pytest.raises(ConfigError, match="tagger.box_nois"):
        load_run_config(TINY, ["tagger.box_nois=0.6"])
    with pytest.raises(ConfigError, match="tagger.box_noise"):
        load_run_config(TINY, ["tagger.box_noise=1.5"])


def test_non_tagger_model_or_matched_loss_is_a_config_error():
    base = {"task": "tagger", "model": {"name": "tiny_tagger"}, "data": {"sources": [{"name": "vg", "local": "x"}]},
            "loss": {"matching": "identity", "rel_loss": "focal", "pseudo_targets": False}}
    assert run_config_from_dict(base).task == "tagger"
    with pytest.raises(ConfigError, match="needs a Relation Tagger model"):
        run_config_from_dict({**base, "model": {"name": "tiny"}})
    with pytest.raises(ConfigError, match="loss.matching=identity"):
        run_config_from_dict({**base, "loss": {"rel_loss": "focal", "pseudo_targets": False}})
    with pytest.raises(ConfigError, match="set task: tagger"):
        run_config_from_dict({**base, "task": "rlipv2"})
    with pytest.raises(ConfigError, match="does not apply to the Relation Tagger"):
        run_config_from_dict({**base, "eval": {"data": {"sources": [{"name": "v", "local": "y"}],
                                                        "fixed_obj_labels": ["a"], "fixed_rel_labels": ["b"]}}})


def _target(num_boxes: int, pairs: list[tuple[int, int]], num_rel: int = 3) -> Target:
    boxes = torch.rand(num_boxes, 4) * 0.5 + 0.25
    labels = torch.arange(num_boxes) % 4
    s = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    o = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    rel = torch.zeros(len(pairs), num_rel)
    rel[:, 0] = 1
    return Target(0, (64, 64), (64, 64), boxes, labels, s, o, boxes[s], boxes[o], labels[s], labels[o], rel)


class _Inner:
    def __init__(self, batches):
        self.batches, self.state = batches, {"consumed": 0}

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            self.state["consumed"] += 1
            yield b

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)


def _batch(targets):
    return Batch(torch.zeros(len(targets), 3, 8, 8), torch.zeros(len(targets), 8, 8, dtype=torch.bool), targets,
                 ["a", "b", "c", "d", "no objects"], ["r0", "r1", "r2"])


def test_loader_fills_slots_with_negatives_and_resumes_its_rng():
    batches = [_batch([_target(4, [(0, 1), (2, 3)]), _target(2, [(0, 1)])]) for _ in range(3)]
    loader = TaggerLoader(_Inner(batches), num_slots=5, seed=3)
    it = iter(loader)
    first = next(it)
    t0, t1 = first.targets
    # 4 boxes: 12 ordered pairs, 2 annotated first, then 3 negatives with all-zero relation targets
    assert t0.sub_index.tolist()[:2] == [0, 2] and len(t0.sub_index) == 5
    assert t0.rel_labels[:2, 0].tolist() == [1, 1] and t0.rel_labels[2:].abs().sum() == 0
    pairs = list(zip(t0.sub_index.tolist(), t0.obj_index.tolist()))
    assert len(set(pairs)) == 5 and all(s != o for s, o in pairs)
    assert torch.equal(t0.sub_boxes, t0.boxes[t0.sub_index]) and torch.equal(t0.obj_labels, t0.labels[t0.obj_index])
    # 2 boxes: only (1, 0) is left as a negative
    assert list(zip(t1.sub_index.tolist(), t1.obj_index.tolist())) == [(0, 1), (1, 0)]

    state = loader.state_dict()
    second = next(it)
    again = TaggerLoader(_Inner(batches[1:]), num_slots=5, seed=99)
    again.load_state_dict(state)
    replay = next(iter(again))
    assert torch.equal(replay.targets[0].sub_index, second.targets[0].sub_index)
    assert torch.equal(replay.targets[0].obj_index, second.targets[0].obj_index)


def test_the_trainer_forward_passes_the_batch_targets_as_pairs():
    from rlipv2_scale.models.build import build_model

    torch.manual_seed(0)
    model = build_model(named_config("tiny_tagger"), pretrained=False).eval()
    targets = [_target(3, [(0, 1), (1, 2)]), _target(2, [(1, 0)])]
    batch = Batch(torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool), targets,
                  ["a", "b", "c", "d", "no objects"], ["r0", "r1", "r2"])
    direct = model(batch.images, batch.pixel_mask, batch.obj_texts, batch.rel_texts, targets)
    via_trainer = tagger_forward(model, batch.images, batch)
    assert torch.equal(direct.pred_rel_logits, via_trainer.pred_rel_logits)
    other = [_target(3, [(2, 0), (0, 1)]), _target(2, [(0, 1)])]
    moved = tagger_forward(model, batch.images, Batch(batch.images, batch.pixel_mask, other, batch.obj_texts,
                                                      batch.rel_texts))
    assert not torch.equal(direct.pred_rel_logits, moved.pred_rel_logits)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from rlipv2_scale.data.convert import convert
    from rlipv2_scale.data.synthetic import write_split

    root = tmp_path_factory.mktemp("tagger")
    write_split(root / "raw", 8, seed=0, split="train", size=128)
    convert("vg", root / "raw/scene_graphs.json", root / "raw", root / "data/synthetic/shards/vg", progress=False)
    return root


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "rlipv2_scale.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_tiny_tagger_trains_resumes_exactly_and_exports(workdir, tmp_path):
    from rlipv2_scale.models.tagger import RelationTagger

    a, b = tmp_path / "a", tmp_path / "b"
    common = ["train.max_steps=3", "checkpoint.every_steps=2", "checkpoint.keep_last=3"]
    _cli(workdir, "train", str(TINY), f"run.dir={a}", *common)
    # `data train-tagger` is the same command
    _cli(workdir, "data", "train-tagger", str(TINY), f"run.dir={b}", *common,
         "--resume", str(a / "checkpoints" / "step_00000002"))
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ma] == [1, 2, 3] and [r["step"] for r in mb] == [3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in ma)
    terms = [k for k in ma[2] if k.startswith("loss")]
    assert {k: mb[0][k] for k in terms} == {k: ma[2][k] for k in terms}     # negatives' RNG resumed too
    saved = load_run_config(a / "config.yaml")
    assert saved.task == "tagger" and saved.tagger.box_noise == 0.4 and saved.model.tagger

    _cli(workdir, "export", str(b), "--out", str(tmp_path / "tagger"))
    model = RelationTagger.from_pretrained(tmp_path / "tagger")
    assert model.cfg.name == "tiny_tagger" and not model.training and model.card.task == "tagger"
    assert model.card.steps == 3


def test_init_from_a_detector_may_lack_only_the_tagger_layers():
    from rlipv2_scale.models.build import build_model

    torch.manual_seed(0)
    model = build_model(named_config("tiny_tagger"), pretrained=False)
    donor = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    detector = {k: v for k, v in donor.items() if not k.startswith(("coord_proj.", "verb_tgt."))}
    assert load_state(model, detector, "det.safetensors", reinit=TAGGER_ONLY) == [
        "coord_proj.bias", "coord_proj.weight", "verb_tgt.weight"]
    state = model.state_dict()
    assert all(torch.equal(state[k], detector[k]) for k in detector)
    with pytest.raises(UserError, match="missing .*'backbone"):
        load_state(model, {k: v for k, v in donor.items() if not k.startswith("backbone.")}, "x", reinit=TAGGER_ONLY)
    with pytest.raises(UserError, match="unexpected \\['extra'\\]"):
        load_state(model, {**donor, "extra": torch.zeros(1)}, "x", reinit=TAGGER_ONLY)


def test_tagger_recipes_go_through_cluster_submit_and_scale_plan(tmp_path, capsys):
    from rlipv2_scale.cli import main
    from rlipv2_scale.cluster.slurm import SlurmOptions, render_job
    from rlipv2_scale.models.build import build_model
    from rlipv2_scale.scale.plan import measure_total

    script, _ = render_job(TINY, SlurmOptions(gpus_per_node=0), overrides=[f"run.dir={tmp_path / 'run'}"],
                           sweep=["tagger.box_noise=0.4,0.6"])
    assert "--array=0-1" in script
    assert main(["cluster", "submit", str(TINY), "--dry-run", "--gpus-per-node", "0", f"run.dir={tmp_path / 'r'}",
                 "tagger.box_nois=1"]) == 2
    assert "tagger.box_nois" in capsys.readouterr().err
    # the cost model's forward feeds the Tagger its given pairs
    cfg = load_run_config(TINY)
    flops, act = measure_total(build_model(cfg.model, pretrained=False), 64, 64, 4, 3, batch=1)
    assert flops > 0 and act > 0
