import json
from pathlib import Path

import pytest

from rlipv2_scale.errors import UserError
from rlipv2_scale.scale.sweep import (
    Axis,
    combinations,
    load_sweep,
    parse_axes,
    plan_sweep,
    render_slurm,
    run_local,
    run_name,
    split_values,
)

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "recipes" / "demo" / "demo.yaml"


def test_split_values_keeps_commas_inside_brackets_and_quotes():
    assert split_values("none,last_level, all_levels") == ["none", "last_level", "all_levels"]
    assert split_values("[{name: a, local: x}],[{name: b, local: y}]") == ["[{name: a, local: x}]",
                                                                          "[{name: b, local: y}]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert split_values("[1, [2, 3]],4") == ["[1, [2, 3]]", "4"]
    for bad in ("[1,2", "1]", "'a,b"):
        with pytest.raises(UserError):
            split_values(bad)


def test_axes_and_their_cross_product():
    axes = parse_axes(["model.alif.fusion=none,last_level", "nproc=1,2,4"])
    assert axes == [Axis("model.alif.fusion", ["none", "last_level"]), Axis("nproc", ["1", "2", "4"])]
    combos = combinations(axes)
    assert len(combos) == 6
    assert combos[0] == {"model.alif.fusion": "none", "nproc": "1"}
    assert combos[-1] == {"model.alif.fusion": "last_level", "nproc": "4"}      # first axis varies slowest
    assert run_name(3, combos[3]) == "03_fusion-last_level_nproc-1"
    assert run_name(0, {"data.sources": "[{name: a, local: '/x/shards/train_10pct'}]"}) == "00_sources-train_10pct"
    for bad in (["fusion"], ["nproc=0"], ["nproc=a"], ["x=1", "x=2"], []):
        with pytest.raises(UserError):
            parse_axes(bad)


def _base(tmp_path: Path) -> list[str]:
    return [f"model.text.tokenizer={tmp_path / 'tok'}",
            f"data.sources=[{{name: s, local: '{tmp_path / 'shards'}'}}]", "eval.data=null"]


def test_plan_sweep_validates_every_combination_and_names_run_dirs(tmp_path):
    sweep = plan_sweep(DEMO, ["model.alif.fusion=none,all_levels", "nproc=1,2"], tmp_path / "sw", _base(tmp_path))
    assert [r.world_size for r in sweep.runs] == [1, 2, 1, 2]
    assert sweep.runs[1].overrides == ["model.alif.fusion=none"]               # nproc is not a recipe key
    assert len({r.run_dir for r in sweep.runs}) == 4
    assert all(Path(r.run_dir).parent == (tmp_path / "sw").resolve() for r in sweep.runs)
    with pytest.raises(UserError, match="model.alif.fusion"):
        plan_sweep(DEMO, ["model.alif.fusion=none,sideways"], tmp_path / "sw", _base(tmp_path))
    with pytest.raises(UserError, match="no_such_key"):
        plan_sweep(DEMO, ["train.no_such_key=1,2"], tmp_path / "sw", _base(tmp_path))
    with pytest.raises(UserError, match="run.dir"):
        plan_sweep(DEMO, ["train.seed=1,2"], tmp_path / "sw", _base(tmp_path) + ["run.dir=x"])
    with pytest.raises(UserError, match="--slurm"):
        plan_sweep(DEMO, ["nodes=1,2"], tmp_path / "sw", _base(tmp_path))


def test_slurm_sweep_renders_one_array_per_node_count(tmp_path):
    from rlipv2_scale.cluster.slurm import SlurmOptions

    sweep = plan_sweep(DEMO, ["train.seed=1,2,3", "nodes=1,2"], tmp_path / "sw", _base(tmp_path), mode="slurm")
    sweep = render_slurm(sweep, SlurmOptions(gpus_per_node=4))
    assert [j["nodes"] for j in sweep.jobs] == [1, 2]
    for job in sweep.jobs:
        script = Path(job["script"]).read_text()
        assert "#SBATCH --array=0-2" in script and f"#SBATCH --nodes={job['nodes']}" in script
        lines = (Path(job["script"]).parent / "sweep.txt").read_text().splitlines()
        assert lines == ["train.seed=1", "train.seed=2", "train.seed=3"]
    # run i of a node count lives in the array member's directory <nodes-n>/<i>
    two = [r for r in sweep.runs if r.nodes == 2]
    assert [Path(r.run_dir).name for r in two] == ["0", "1", "2"] and all(r.world_size == 8 for r in two)
    assert load_sweep(tmp_path / "sw").runs[5].run_dir == two[2].run_dir
    # values holding commas (YAML lists) travel through the array's line-per-index file, tab-separated
    betas = plan_sweep(DEMO, ["optim.betas=[0.9, 0.99],[0.9, 0.999]"], tmp_path / "sw2", _base(tmp_path),
                       mode="slurm")
    betas = render_slurm(betas, SlurmOptions(gpus_per_node=4))
    lines = (Path(betas.jobs[0]["script"]).parent / "sweep.txt").read_text().splitlines()
    assert lines == ["optim.betas=[0.9, 0.99]", "optim.betas=[0.9, 0.999]"]
    assert [r.overrides for r in betas.runs] == [["optim.betas=[0.9, 0.99]"], ["optim.betas=[0.9, 0.999]"]]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from rlipv2_scale.demo import DemoPlan, prepare_data

    out = tmp_path_factory.mktemp("scale_data")
    prepare_data(out, DemoPlan(train_images=16, val_images=4, test_images=1, steps=2, eval_every=2), lambda s: None,
                 workers=1)
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_sweep_trains_each_combination_and_indexes_it(demo_data, tmp_path):
    from rlipv2_scale.scale.report import collect

    d = demo_data
    base = [f"model.text.tokenizer={d / 'tokenizer'}", f"data.sources=[{{name: s, local: '{d / 'shards' / 'train'}'}}]",
            f"eval.data.sources=[{{name: v, local: '{d / 'shards' / 'val'}'}}]", "eval.every_steps=2",
            "train.max_steps=2", "data.batch_size=2", "logging.every_steps=1", "logging.progress=false",
            "checkpoint.at_end=false"]
    sweep = plan_sweep(DEMO, ["model.alif.fusion=none,last_level"], tmp_path / "sw", base)
    run_local(sweep, env={"OMP_NUM_THREADS": "1"}, log=lambda s: None)
    index = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [r["status"] for r in index["runs"]] == ["completed", "completed"]
    assert all(0 < r["cpu_seconds"] and r["seconds"] > 0 for r in index["runs"])
    for r, fusion in zip(index["runs"], ("none", "last_level")):
        cfg = (Path(r["run_dir"]) / "config.yaml").read_text()
        assert f"fusion: {fusion}" in cfg
    runs, notes = collect([tmp_path / "sw"])
    assert not notes and [r.steps for r in runs] == [2, 2] and [r.images_seen for r in runs] == [4, 4]
    assert all(r.map_curve and r.map_curve[-1][0] == 4 for r in runs)          # validated at step 2
    # a second call skips what completed
    again = run_local(plan_sweep(DEMO, ["model.alif.fusion=none,last_level"], tmp_path / "sw", base), log=lambda s: None)
    assert [r.seconds for r in again.runs] == [r["seconds"] for r in index["runs"]]
    assert [r.status for r in load_sweep(tmp_path / "sw").runs] == ["completed", "completed"]


def test_cli_dry_run_lists_combinations_and_rejects_bad_axes(tmp_path, capsys):
    from rlipv2_scale.cli import main

    base = [a for o in _base(tmp_path) for a in ("--set", o)]
    assert main(["scale", "sweep", str(DEMO), "train.seed=1,2", "nproc=1,2", "--out", str(tmp_path / "sw"),
                 "--dry-run", *base]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["00_seed-1_nproc-1: train.seed=1 --nproc 1", "01_seed-1_nproc-2: train.seed=1 --nproc 2",
                   "02_seed-2_nproc-1: train.seed=2 --nproc 1", "03_seed-2_nproc-2: train.seed=2 --nproc 2"]
    assert not (tmp_path / "sw").exists()                                       # nothing ran
    assert main(["scale", "sweep", str(DEMO), "train.seed", "--out", str(tmp_path / "sw"), *base]) == 2
    assert "key=v1,v2" in capsys.readouterr().err


# -- what a sweep may write over --------------------------------------------------------------------

def _completed(sweep, run, overrides: list[str]) -> None:
    """A run folder as a finished `rlipv2 train` leaves it: its resolved config.yaml and COMPLETED."""
    from rlipv2_scale.config import save_config
    from rlipv2_scale.train.config import load_run_config

    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True)
    save_config(load_run_config(Path(sweep.recipe), [*overrides, f"run.dir={run_dir}"]), run_dir / "config.yaml")
    (run_dir / "COMPLETED").write_text('{"step": 2}')


def test_local_sweep_reuses_a_completed_run_only_if_it_trained_the_same_config(tmp_path, monkeypatch):
    import subprocess

    def no_training(*a, **k):
        raise AssertionError("a run was launched")

    monkeypatch.setattr(subprocess, "run", no_training)
    base = _base(tmp_path)
    sweep = plan_sweep(DEMO, ["train.seed=0,1"], tmp_path / "sw", base)
    for run in sweep.runs:
        _completed(sweep, run, [*base, *run.overrides])
    done = run_local(sweep, log=lambda s: None)                       # the same sweep again: nothing runs
    assert [r.status for r in done.runs] == ["completed", "completed"]
    # another --set value (or recipe) into the same --out: the old results are not reported as new
    other = plan_sweep(DEMO, ["train.seed=0,1"], tmp_path / "sw", [*base, "optim.lr=0.5"])
    before = (tmp_path / "sw" / "sweep.json").read_text()
    with pytest.raises(UserError) as err:
        run_local(other, log=lambda s: None)
    msg = str(err.value)
    assert f"'{other.runs[0].run_dir}'" in msg and "optim.lr" in msg and "new --out" in msg
    assert (tmp_path / "sw" / "sweep.json").read_text() == before     # the index is left as it was
    # a different axis value that lands in the same run folder name is caught the same way
    sw2 = plan_sweep(DEMO, ["train.seed=0,1"], tmp_path / "sw2", base)
    _completed(sw2, sw2.runs[0], [*base, "train.seed=7"])
    with pytest.raises(UserError, match="train.seed"):
        run_local(sw2, log=lambda s: None)


def test_slurm_sweep_never_overwrites_a_sweep_json_it_did_not_write(tmp_path, capsys):
    from rlipv2_scale.cli import main

    out = tmp_path / "sw"
    out.mkdir()
    (out / "sweep.json").write_text('{"my": "notes"}')
    base = [a for o in _base(tmp_path) for a in ("--set", o)]
    argv = ["scale", "sweep", str(DEMO), "train.seed=0,1", "--slurm", "--gpus-per-node", "0", "--out", str(out), *base]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sweep.json" in err and "another --out" in err, err
    assert (out / "sweep.json").read_text() == '{"my": "notes"}' and sorted(p.name for p in out.iterdir()) == ["sweep.json"]
    (out / "sweep.json").unlink()
    assert main(argv) == 0 and main(argv) == 0                         # its own index of the same sweep: re-rendered
    capsys.readouterr()
    assert main(argv[:3] + ["train.seed=0,1,2"] + argv[4:]) == 2        # another sweep's index
    assert "indexes another sweep" in capsys.readouterr().err
    assert len(load_sweep(out).runs) == 2
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for mode in (["--slurm", "--gpus-per-node", "0"], []):
        assert main(["scale", "sweep", str(DEMO), "train.seed=0,1", *mode, "--out", str(a_file), *base]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a file, not a folder" in err, err
    assert a_file.read_text() == "mine"


@pytest.mark.parametrize("text, words", [("[1, 2]", "list without a 'runs' list"), ('"x"', "str"),
                                         ('{"runs": ["x"]}', "runs[0] is str"), ('{"runs": 3}', "'runs' list")])
def test_a_sweep_json_of_another_shape_is_named(tmp_path, text, words):
    (tmp_path / "sweep.json").write_text(text)
    with pytest.raises(UserError, match="is not a sweep index") as err:
        load_sweep(tmp_path)
    assert words in str(err.value)
