"""Recipes and the run config: every recipe loads strictly, tiny twins exist, bad keys are named."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from rlipv2_scale.errors import ConfigError
from rlipv2_scale.train.config import load_run_config

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# Every `rlipv2 train` recipe, Relation Tagger ones included (task: tagger).
ALL = sorted(p for p in RECIPES.rglob("*.yaml") if not p.name.startswith("_")
             and p.relative_to(RECIPES).parts[0] in ("pretrain", "finetune", "tiny", "demo", "tagger"))
FULL = [p for p in ALL if p.relative_to(RECIPES).parts[0] in ("pretrain", "finetune")]


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_recipe_loads_strictly(path):
    cfg = load_run_config(path)
    assert cfg.run.name and cfg.data.sources
    if not {"pretrain", "finetune"} & set(path.relative_to(RECIPES).parts):
        return
    assert cfg.optim.weight_decay == pytest.approx(1e-4) and cfg.train.grad_clip == pytest.approx(0.1)
    # backbone and label-text encoder at a tenth of the base lr (the original's `main.py: main`)
    assert {g.name: g.lr for g in cfg.optim.groups} == {"backbone": pytest.approx(cfg.optim.lr / 10),
                                                        "text_encoder": pytest.approx(cfg.optim.lr / 10)}


def test_every_full_recipe_has_a_tiny_twin():
    assert len(FULL) >= 9 + 10
    for path in FULL:
        twin = RECIPES / "tiny" / path.relative_to(RECIPES)
        assert twin.is_file(), f"{path} has no tiny twin {twin}"
        full, tiny = load_run_config(path), load_run_config(twin)
        assert tiny.model.name == "tiny" and tiny.train.max_steps is not None and tiny.train.max_steps <= 10
        # same mixture: source names and proportions
        assert [(s.name, s.proportion) for s in tiny.data.sources] == [(s.name, s.proportion) for s in full.data.sources]
        assert tiny.loss == full.loss and tiny.data.fixed_labels == full.data.fixed_labels


def test_pretraining_mixtures_are_explicit():
    cfg = load_run_config(RECIPES / "pretrain" / "r50_vg_coco_o365.yaml")
    assert [s.name for s in cfg.data.sources] == ["vg", "coco", "o365"]
    assert sum(s.proportion for s in cfg.data.sources) == pytest.approx(1.0)
    assert cfg.model.backbone.name == "resnet50" and cfg.model.text.pretrained == "roberta-base"
    assert cfg.optim.lr_drop_epochs == [15] and cfg.train.epochs == 20


def test_model_name_selects_a_named_config_that_other_keys_override():
    cfg = load_run_config(RECIPES / "finetune" / "hico_full_swin_l.yaml")
    assert cfg.model.name == "swin_l_hico" and cfg.model.backbone.name == "swin_large"
    # activation checkpointing switches land in the model config
    assert cfg.model.backbone.checkpointing and cfg.model.checkpoint_encoder and cfg.model.alif.checkpointing
    assert len(cfg.data.fixed_obj_labels) == 80 and len(cfg.data.fixed_rel_labels) == 117
    cfg = load_run_config(RECIPES / "finetune" / "hico_1pct_r50.yaml", ["model.num_queries=64", "train.zero_stage=3"])
    assert cfg.model.num_queries == 64 and cfg.train.zero_stage == 3 and not cfg.loss.subject_class


@pytest.mark.parametrize("override, name", [
    (["train.max_stepz=3"], "train.max_stepz"),
    (["optim.groups=[{name: backbone, patterns: ['backbone.*'], lr: 1.0e-5, wd: 0.1}]"], "optim.groups[0].wd"),
    (["model.backbone.nme=x"], "model.backbone.nme"),
    (["checkpoint.every=5"], "checkpoint.every"),
])
def test_unknown_key_fails_with_its_name(override, name):
    with pytest.raises(ConfigError, match=re.escape(f"unknown config key '{name}'")):
        load_run_config(RECIPES / "tiny" / "pretrain" / "r50_vg.yaml", override)


def test_bad_values_fail_with_their_names(tmp_path):
    with pytest.raises(ConfigError, match="train.zero_stage"):
        load_run_config(RECIPES / "tiny" / "pretrain" / "r50_vg.yaml", ["train.zero_stage=4"])
    with pytest.raises(ConfigError, match="model.name"):
        load_run_config(RECIPES / "tiny" / "pretrain" / "r50_vg.yaml", ["model.name=r51"])
    with pytest.raises(ConfigError, match="train.reduce_bucket_size"):
        load_run_config(RECIPES / "tiny" / "pretrain" / "r50_vg.yaml", ["train.reduce_bucket_size=0"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: " + str(RECIPES / "tiny" / "pretrain" / "r50_vg.yaml") + "\ntrainer: {}\n")
    with pytest.raises(ConfigError, match="unknown config key 'trainer'"):
        load_run_config(bad)


def test_cli_reports_a_bad_key_in_one_line(capsys):
    from rlipv2_scale.cli import main

    code = main(["train", str(RECIPES / "tiny" / "pretrain" / "r50_vg.yaml"), "train.lr=1"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown config key 'train.lr'" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["tiny/finetune/hico_uc_rf_r50.yaml", "pretrain/swin_l_vg_coco_o365.yaml"])
def test_resolved_config_round_trips(tmp_path, name):
    """The run directory's config.yaml (what SLURM requeues and `export` read) loads back identical."""
    from rlipv2_scale.config import save_config

    cfg = load_run_config(RECIPES / name)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_run_config(tmp_path / "config.yaml") == cfg


def test_benchmark_label_lists_by_name_round_trip_and_drift_is_refused(tmp_path):
    from rlipv2_scale.config import save_config
    from rlipv2_scale.errors import ConfigError
    from rlipv2_scale.labels.space import hico_label_space
    from rlipv2_scale.train.config import load_run_config, run_config_from_dict

    cfg = load_run_config(RECIPES / "finetune" / "hico_full_r50.yaml")
    hico = hico_label_space()
    assert cfg.data.fixed_obj_labels == list(hico.objects) and cfg.data.fixed_rel_labels == list(hico.verbs)
    assert cfg.eval.data is not None and cfg.eval.data.fixed_rel_labels == list(hico.verbs)
    save_config(cfg, tmp_path / "config.yaml")                    # a run's resolved config loads again
    assert load_run_config(tmp_path / "config.yaml").data.fixed_rel_labels == list(hico.verbs)
    base = {"model": {"name": "tiny"}}
    drifted = list(hico.verbs)
    drifted[3] = "blows"
    with pytest.raises(ConfigError, match=r"hico-det's but for 'blows' \(expected 'blow'\); write labels: hico-det"):
        run_config_from_dict({**base, "data": {"sources": [{"name": "x", "local": "y"}],
                                               "fixed_obj_labels": list(hico.objects), "fixed_rel_labels": drifted}})
    with pytest.raises(ConfigError, match="names the label lists"):
        run_config_from_dict({**base, "data": {"sources": [{"name": "x", "local": "y"}], "labels": "vcoco",
                                               "fixed_obj_labels": ["a"], "fixed_rel_labels": ["b"]}})
