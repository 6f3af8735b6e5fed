import json
from pathlib import Path

import pytest

from rlipv2_scale.config import save_config
from rlipv2_scale.errors import UserError
from rlipv2_scale.scale.report import collect, planned_rate, scaling_table, summarise_run
from rlipv2_scale.scale.sweep import Sweep, SweepRun
from rlipv2_scale.train.config import run_config_from_dict


def write_run(run_dir: Path, *, world: int, batch: int = 2, rates=(1.0, 4.0, 5.0, 6.0), maps=((2, 1.5), (4, 3.0)),
              stage: int = 2, memory: int = 2 ** 30) -> Path:
    """A run directory as the trainer leaves it: metrics.jsonl (one record per step) and config.yaml."""
    run_dir.mkdir(parents=True)
    per_step = batch * world
    lines = []
    for i, rate in enumerate(rates, 1):
        lines.append({"step": i, "epoch": 0, "samples": i * per_step, "loss": 10.0 / i, "images_per_s": rate,
                      "peak_memory_bytes": memory + i})
        for step, m in maps:
            if step == i:
                lines.append({"step": i, "val/mAP": m, "val/images": 4.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    save_config(run_config_from_dict({"model": {"name": "tiny"}, "train": {"zero_stage": stage},
                                      "data": {"sources": [{"name": "x", "local": "x"}], "batch_size": batch}}),
                run_dir / "config.yaml")
    return run_dir


def test_summary_of_a_run(tmp_path):
    r = summarise_run(write_run(tmp_path / "a", world=2))
    assert r.world_size == 2                              # 4 images per step / batch 2
    assert r.steps == 4 and r.images_seen == 16 and r.final_loss == pytest.approx(2.5)
    assert r.images_per_s == 5.0                          # median of the windows after the first
    assert r.peak_memory_bytes == 2 ** 30 + 4
    assert r.map_curve == [(8, 1.5), (16, 3.0)]           # step × images per step
    assert r.best_map == 3.0 and r.final_map == 3.0 and r.zero_stage == 2
    assert r.loss_curve[0] == (4, 10.0)


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(UserError, match="no metrics.jsonl"):
        summarise_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "samples": 2, "loss": 1.0}\n{"step": 2, "sa')
    with pytest.raises(UserError, match="line 2"):
        summarise_run(tmp_path)
    with pytest.raises(UserError, match="neither"):
        collect([tmp_path / "missing"])


def test_scaling_table_speedup_efficiency_and_plan(tmp_path):
    one = summarise_run(write_run(tmp_path / "r1", world=1, rates=(1.0, 4.0, 4.0)), values={"nproc": "1"})
    two = summarise_run(write_run(tmp_path / "r2", world=2, rates=(1.0, 6.0, 6.0)), values={"nproc": "2"})
    plan = {"rows": [{"gpus": 1, "zero_stage": 2, "images_per_s": 8.0}, {"gpus": 2, "zero_stage": 2, "images_per_s": 16.0},
                     {"gpus": 2, "zero_stage": 3, "images_per_s": 99.0}]}
    assert planned_rate(plan, 2, 3) == 99.0 and planned_rate(plan, 4, 2) is None and planned_rate(None, 1, 2) is None
    rows = scaling_table([two, one], plan)
    assert [r["ranks"] for r in rows] == [1, 2]           # one group (they differ only in ranks), sorted
    assert rows[1]["speedup"] == pytest.approx(1.5) and rows[1]["efficiency"] == pytest.approx(0.75)
    assert rows[0]["measured_over_planned"] == pytest.approx(0.5)
    assert rows[1]["planned_images_per_s"] == 16.0


def test_report_from_a_sweep_with_a_missing_run(tmp_path):
    runs = []
    for i, (fusion, nproc) in enumerate([("none", 1), ("none", 2), ("all_levels", 1)]):
        d = write_run(tmp_path / "sw" / f"{i:02d}", world=nproc, maps=((2, 1.0 + i), (4, 2.0 + i)))
        runs.append(SweepRun(name=f"{i:02d}", run_dir=str(d), overrides=[f"model.alif.fusion={fusion}"],
                             values={"model.alif.fusion": fusion, "nproc": str(nproc)}, nproc=nproc, status="completed"))
    runs.append(SweepRun(name="03", run_dir=str(tmp_path / "sw" / "03"), overrides=[], values={"nproc": "1"},
                         status="failed"))
    Sweep(recipe="r.yaml", out=str(tmp_path / "sw"), mode="local", axes=[], base_overrides=[], runs=runs).save()
    (tmp_path / "sw" / "plan.json").write_text(json.dumps({"model": "tiny", "rows": [
        {"gpus": 1, "zero_stage": 2, "images_per_s": 10.0}, {"gpus": 2, "zero_stage": 2, "images_per_s": 20.0}]}))
    with pytest.raises(UserError, match="allow-missing"):
        collect([tmp_path / "sw"])
    got, notes = collect([tmp_path / "sw"], allow_missing=True)
    assert [r.name for r in got] == ["00", "01", "02"] and notes == ["03: no metrics.jsonl (status failed)"]
    from rlipv2_scale.cli import main

    assert main(["scale", "report", str(tmp_path / "sw"), "--out", str(tmp_path / "rep"), "--allow-missing"]) == 0
    for name in ("loss_vs_images.png", "map_vs_images.png", "throughput_vs_ranks.png", "report.md", "report.json"):
        assert (tmp_path / "rep" / name).stat().st_size > 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| fusion=none | 2 | 2 | 5.00 | 1.00 | 0.50 | 20.0 | 0.250 |" in md     # same rate on 2 ranks: 50 %
    assert "| 02 | `model.alif.fusion=all_levels`, `nproc=1` | 1 | 2 | 4 | 8 | 2.5000 | 4.00 | 4.00 |" in md
    assert "03: no metrics.jsonl" in md
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["runs"][2]["map_curve"] == [[4, 3.0], [8, 4.0]]
    assert main(["scale", "report", str(tmp_path / "sw"), "--out", str(tmp_path / "rep2")]) == 2


@pytest.mark.parametrize("line, words", [
    ('{"step": 2, "samples": 4, "loss": "abc"}', "'loss' is \"abc\", not a number"),
    ('{"samples": 4, "loss": 1.0}', "without 'step'"),
    ('"just a string"', "must be a JSON object"),
    ('[1, 2]', "must be a JSON object"),
    ('{"step": "2", "samples": 4, "loss": 1.0}', "'step' is \"2\", not a count"),
    ('{"step": 2, "val/mAP": "high"}', "'val/mAP' is \"high\", not a number"),
])
def test_a_malformed_metrics_record_names_its_file_and_line(tmp_path, line, words):
    run = write_run(tmp_path / "r", world=1)
    path = run / "metrics.jsonl"
    path.write_text('{"step": 1, "samples": 2, "loss": 1.0}\n' + line + "\n")
    with pytest.raises(UserError) as err:
        summarise_run(run)
    assert f"{path}, line 2" in str(err.value) and words in str(err.value), str(err.value)
