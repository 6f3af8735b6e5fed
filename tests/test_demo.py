"""`rlipv2 demo`: recipes, overrides, the seen / zero-shot scoring on the synthetic label space,
artefact writing, and (slow) the whole quick demo end to end through the real trainer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlipv2_scale.data.synthetic import CLASS_NAMES, HELD_OUT, PREDICATE_NAMES, write_split
from rlipv2_scale.demo import (
    FULL,
    QUICK,
    RECIPES,
    DemoPlan,
    demo_label_space,
    draw_examples,
    recipe_path,
    results_table,
    score,
    train_overrides,
)
from rlipv2_scale.train.config import load_run_config


def test_demo_recipes_differ_only_in_fusion(tmp_path):
    base = load_run_config(recipe_path("demo"))
    assert base.model.alif.fusion == "last_level"
    assert base.data.transforms.flip_prob == 0.0            # flips would mirror "next to" / "left of"
    assert base.data.num_obj_labels == len(CLASS_NAMES) and base.data.num_rel_labels == len(PREDICATE_NAMES)
    assert base.eval.data.fixed_obj_labels == list(CLASS_NAMES)
    assert base.eval.data.fixed_rel_labels == list(PREDICATE_NAMES)
    assert base.train.zero_stage == 2 and base.optim.groups == []
    fusions = {}
    for name in RECIPES:
        cfg = load_run_config(recipe_path(name))
        fusions[name] = cfg.model.alif.fusion
        cfg.model.alif.fusion = base.model.alif.fusion
        cfg.run = base.run
        assert cfg == base, name
    assert fusions == {"fusion_none": "none", "alif_last_level": "last_level", "alif_all_levels": "all_levels"}


def test_train_overrides_point_the_recipe_at_the_run(tmp_path):
    plan = DemoPlan(train_images=8, val_images=4, test_images=4, steps=30, eval_every=10, nproc=2)
    cfg = load_run_config(recipe_path("demo"), train_overrides(tmp_path, plan, tmp_path / "train"))
    assert cfg.run.path == tmp_path / "train"
    assert cfg.data.sources[0].local == str(tmp_path / "shards" / "train")
    assert cfg.eval.data.sources[0].local == str(tmp_path / "shards" / "val")
    assert cfg.model.text.tokenizer == str(tmp_path / "tokenizer")
    assert cfg.data.batch_size == 4 and cfg.train.max_steps == 30 and cfg.eval.every_steps == 10
    kept = load_run_config(recipe_path("demo"), train_overrides(tmp_path, plan, tmp_path / "t", keep_checkpoints=True))
    assert kept.checkpoint.every_steps == 10 and kept.checkpoint.keep_last == 4 and kept.eval.data is None


def test_label_space_counts_any_subject_as_seen():
    space = demo_label_space()
    assert space.subject_index is None
    held = set(space.zero_shot_splits["held-out"])
    assert len(held) == len(HELD_OUT)
    s, p, o = HELD_OUT[0]
    assert (CLASS_NAMES.index(s), CLASS_NAMES.index(o), PREDICATE_NAMES.index(p)) in held


def _pred_from_gt(entry: dict, keep) -> dict:
    """A perfect prediction of the ground-truth triplets for which keep(subject, verb, object) holds."""
    boxes = [{"bbox": a["bbox"], "category_id": a["category_id"]} for a in entry["annotations"]]
    cats = [a["category_id"] for a in entry["annotations"]]
    hois = [{"subject_id": h["subject_id"], "object_id": h["object_id"], "category_id": h["category_id"],
             "score": 0.9} for h in entry["hoi_annotation"]
            if keep(cats[h["subject_id"]], h["category_id"], cats[h["object_id"]])]
    return {"file_name": entry["file_name"], "predictions": boxes, "hoi_prediction": hois}


@pytest.fixture(scope="module")
def test_split(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("synthetic") / "test"
    write_split(d, 24, seed=3, split="test")
    return d


def test_score_separates_seen_and_held_out(test_split):
    gt = json.loads((test_split / "test_hico.json").read_text())
    held = {(CLASS_NAMES.index(s) + 1, PREDICATE_NAMES.index(p) + 1, CLASS_NAMES.index(o) + 1) for s, p, o in HELD_OUT}
    everything = score([_pred_from_gt(e, lambda *t: True) for e in gt], test_split, "test")
    assert everything["relation_map"] == 100.0 and everything["zero_shot_relation_map"] == 100.0
    assert everything["n_zero_shot_triplets"] >= 1 and everything["n_seen_triplets"] >= 5
    seen_only = score([_pred_from_gt(e, lambda *t: t not in held) for e in gt], test_split, "test")
    assert seen_only["relation_map"] == 100.0 and seen_only["zero_shot_relation_map"] == 0.0
    held_only = score([_pred_from_gt(e, lambda *t: t in held) for e in gt], test_split, "test")
    assert held_only["relation_map"] == 0.0 and held_only["zero_shot_relation_map"] == 100.0
    # non-person subjects count as seen triplets (the HICO-DET person-subject rule is not applied)
    assert any(not t["held_out"] and not t["triplet"].startswith("person") and t["ap"] == 100.0
               for t in seen_only["per_triplet"])


def test_eval_synthetic_finds_the_split_and_names_a_wrong_folder(test_split, tmp_path, capsys):
    from rlipv2_scale.cli import main
    from rlipv2_scale.demo import split_of
    from rlipv2_scale.errors import UserError

    assert split_of(test_split) == "test" and split_of(test_split, "test") == "test"
    with pytest.raises(UserError, match="has no val_hico.json"):
        split_of(test_split, "val")
    with pytest.raises(UserError, match="has no trainval_hico.json or val_hico.json or test_hico.json"):
        split_of(tmp_path)
    both = tmp_path / "both"
    both.mkdir()
    for name in ("val_hico.json", "test_hico.json"):
        (both / name).write_text("[]")
    with pytest.raises(UserError, match=r"several splits \(val, test\): choose one with --split"):
        split_of(both)
    assert main(["eval", "synthetic", "--checkpoint", str(tmp_path / "model"), "--data",
                 str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "missing' is not a folder" in err and "rlipv2 data synth --split test" in err


def test_draw_examples_prefers_held_out_scenes(test_split, tmp_path):
    gt = json.loads((test_split / "test_hico.json").read_text())
    preds = [_pred_from_gt(e, lambda *t: True) for e in gt]
    written = draw_examples(preds, test_split, tmp_path / "pics", 2)
    assert len(written) == 2 and all(p.is_file() and p.suffix == ".png" for p in written)
    held = {(s, p, o) for s, p, o in HELD_OUT}
    first = next(e for e in gt if e["file_name"].startswith(written[0].stem))
    names = [CLASS_NAMES[a["category_id"] - 1] for a in first["annotations"]]
    assert any((names[h["subject_id"]], PREDICATE_NAMES[h["category_id"] - 1], names[h["object_id"]]) in held
               for h in first["hoi_annotation"])


def test_results_table():
    res = {"relation_map": 31.25, "zero_shot_relation_map": 7.5, "random_init_relation_map": 0.1,
           "random_init_zero_shot_relation_map": None, "steps": 10, "images_seen": 80, "train_seconds": 12.0,
           "seconds": 30.0, "machine": {"cpus": 2}, "world_size": 2}
    table = results_table(res)
    assert "31.25" in table and "7.50" in table and "0.10" in table and "10 steps" in table
    assert table.splitlines()[2].rstrip().endswith("-")


def test_loss_fell_compares_first_and_last_fifth():
    from rlipv2_scale.demo import _loss_fell
    from rlipv2_scale.errors import UserError

    records = [{"step": i, "loss": v} for i, v in enumerate([10, 8, 9, 7, 6, 5, 5, 4, 3, 2])] + [{"step": 9, "val/mAP": 1}]
    assert _loss_fell(records) == {"loss_start": 9.0, "loss_end": 2.5, "loss_fell": True}
    assert _loss_fell([{"loss": 1.0}, {"loss": 2.0}])["loss_fell"] is False
    with pytest.raises(UserError, match="fewer than two"):
        _loss_fell([{"loss": 1.0}])


def test_compare_reuses_only_data_of_the_same_plan(tmp_path):
    from dataclasses import asdict, replace

    from rlipv2_scale.demo import _data_matches

    assert not _data_matches(tmp_path, QUICK)
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "data_summary.json").write_text(json.dumps({"plan": asdict(QUICK)}))
    assert _data_matches(tmp_path, QUICK)
    assert _data_matches(tmp_path, replace(QUICK, steps=5, train_seed=1))        # training knobs do not matter
    assert not _data_matches(tmp_path, replace(QUICK, train_images=QUICK.train_images + 1))
    assert not _data_matches(tmp_path, replace(QUICK, seed=1))


def test_plots_are_written(tmp_path):
    from PIL import Image

    from rlipv2_scale.visualize import plot_curves, plot_training

    records = [{"step": s, "loss": 20.0 / s} for s in range(1, 30)] + [{"step": 10, "val/mAP": 1.5},
                                                                        {"step": 20, "val/mAP": 4.0}]
    for path in (plot_training(records, tmp_path / "loss.png"),
                 plot_curves({"a": [(1, 2.0), (2, 3.0)], "b": [(1, 1.0)]}, tmp_path / "cmp.png")):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 300


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    """The CI smoke test: the quick demo through the real trainer (2 ranks, ZeRO-2); the loss falls
    and every artefact is written (the mAP bars are the full demo's, not checked here)."""
    from rlipv2_scale.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == QUICK.steps and res["world_size"] == 2
    assert res["loss_fell"] and res["loss_end"] < res["loss_start"]
    for key in ("relation_map", "zero_shot_relation_map", "random_init_relation_map", "seconds"):
        assert res[key] is not None and res[key] >= 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == QUICK.steps
    assert any("val/mAP" in r for r in records)                      # periodic validation ran
    for name in ("loss_curve.png", "test_predictions.json", "model/model.yaml", "model/model.safetensors",
                 "data_summary.json", "train/COMPLETED"):
        assert (out / name).is_file(), name
    pics = sorted((out / "predictions").glob("*.png"))
    assert len(pics) == QUICK.draw
    assert sorted(res["artefacts"]["predictions"]) == [str(p.relative_to(out)) for p in pics]
    # `rlipv2 eval synthetic` gives the demo's test figures from its model directory (the same scoring)
    got = tmp_path / "eval.json"
    assert main(["eval", "synthetic", "--checkpoint", str(out / "model"), "--data", str(out / "data" / "test"),
                 "--device", "cpu", "--no-progress", "--json", str(got)]) == 0
    scored = json.loads(got.read_text())
    assert scored["split"] == "test"
    assert (scored["relation_map"], scored["zero_shot_relation_map"]) == (res["relation_map"],
                                                                         res["zero_shot_relation_map"])


def test_cli_options_set_the_plan_and_bad_values_are_named(tmp_path, monkeypatch, capsys):
    import rlipv2_scale.demo as demo
    from rlipv2_scale.cli import main

    got = {}
    monkeypatch.setattr(demo, "run_compare", lambda out, plan: got.update(compare=plan))
    assert main(["demo", "--compare", "--out", str(tmp_path), "--steps", "100", "--seed", "43",
                 "--eval-every", "25"]) == 0
    plan = got["compare"]
    assert (plan.steps, plan.train_seed, plan.eval_every, plan.train_images) == (100, 43, 25, FULL.train_images)
    assert main(["demo", "--compare", "--out", str(tmp_path), "--steps", "10"]) == 0
    assert got["compare"].eval_every == 10                          # never more than the steps
    assert main(["demo", "--out", str(tmp_path), "--eval-every", "0"]) == 2
    assert "--eval-every must be positive" in capsys.readouterr().err


def test_too_few_steps_for_two_logged_losses_are_refused_before_the_run(tmp_path, monkeypatch, capsys):
    import rlipv2_scale.demo as demo
    from rlipv2_scale.cli import main

    got = []
    monkeypatch.setattr(demo, "run_demo", lambda out, plan: got.append(plan.steps))
    every = load_run_config(demo.recipe_path("demo")).logging.every_steps

    def logged(steps):          # the trainer's LogHook: every `logging.every_steps` steps and at the last
        return sum(1 for s in range(1, steps + 1) if s % every == 0 or s == steps)

    least = every + 1
    assert logged(least - 1) == 1 and logged(least) == 2
    for steps in (5, least - 1):
        assert main(["demo", "--quick", "--nproc", "1", "--steps", str(steps), "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert f"--steps must be at least {least} for the demo, got {steps}" in err
        assert (f"needs 2 logged losses to check that the loss fell, and its recipe logs the loss every {every} "
                "steps") in err
    assert got == []                                                # refused before anything ran
    for steps in (least, 20):
        assert main(["demo", "--quick", "--nproc", "1", "--steps", str(steps), "--out", str(tmp_path)]) == 0
    assert got == [least, 20]


def test_convergence_benchmark_finds_the_images_each_setting_needs():
    """benchmarks/alif_convergence.py, whose figures the README quotes: mean ± std over seeds and the
    images needed to reach fusion-off's final mean mAP (linear between scored checkpoints)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "alif_convergence.py"
    spec = importlib.util.spec_from_file_location("alif_convergence", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    assert bench.images_to_reach([(100, 5.0), (200, 15.0)], 10.0) == 150.0
    assert bench.images_to_reach([(100, 12.0)], 6.0) == 50.0          # from (0 images, 0 mAP)
    assert bench.images_to_reach([(100, 5.0), (200, 9.0)], 10.0) is None

    def curve(*maps):
        return [{"step": 10 * (i + 1), "relation_map": m} for i, m in enumerate(maps)]

    per_seed = {"1": {"fusion_none": curve(2.0, 10.0), "alif_last_level": curve(10.0, 20.0),
                      "alif_all_levels": curve(0.0, 4.0)},
                "2": {"fusion_none": curve(4.0, 14.0), "alif_last_level": curve(14.0, 30.0),
                      "alif_all_levels": curve(0.0, 6.0)}}
    s = bench.summarise(per_seed)
    assert s["target"] == 12.0 and s["fusion_off_images"] == 160
    assert s["curves"]["alif_last_level"][1] == {"step": 20, "images": 160, "mean": 25.0, "std": 7.07, "seeds": 2}
    assert s["reach"]["alif_last_level"]["images"] == 80                # 12.0 at step 10 x 8 images
    assert s["reach"]["alif_last_level"]["share_of_fusion_off"] == 0.5
    assert s["reach"]["alif_last_level"]["per_seed_images"] == [80, 80]  # each seed's own fusion-off final
    assert s["reach"]["fusion_none"]["images"] == 160
    assert s["reach"]["alif_all_levels"]["images"] is None


def test_the_demo_replaces_its_folders_only_in_a_folder_it_wrote(tmp_path, capsys):
    """A rerun replaces data/, shards/, train/ ... of --out: a user's folder of other things is refused
    before anything in it is touched; a new folder, or one an earlier demo wrote, is the demo's."""
    from rlipv2_scale.cli import main
    from rlipv2_scale.demo import DEMO_MARKER, claim_out

    mine = tmp_path / "project"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "keep.txt").write_text("mine")
    assert main(["demo", "--quick", "--out", str(mine)]) == 2
    assert "is not empty and not a folder the demo wrote" in capsys.readouterr().err
    assert (mine / "data" / "keep.txt").read_text() == "mine" and not (mine / DEMO_MARKER).exists()
    claim_out(tmp_path / "new")
    assert (tmp_path / "new" / DEMO_MARKER).is_file()
    claim_out(tmp_path / "new")                                   # a rerun
    older = tmp_path / "older"                                    # a demo of before the marker
    (older / "train").mkdir(parents=True)
    (older / "results.json").write_text(json.dumps({"plan": {}}))
    claim_out(older)
    assert (older / DEMO_MARKER).is_file()
