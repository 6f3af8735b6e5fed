"""SLURM jobs: rendering and submit-time validation here; a live one-node cluster in test_cluster_live."""
import stat

import pytest

from rlipv2_scale.cli import main
from rlipv2_scale.cluster.slurm import SlurmOptions, expand_sweep, render_job
from rlipv2_scale.errors import ConfigError, UserError


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""
run: {{name: t, dir: {tmp_path / 'run'}}}
model: {{name: tiny}}
data:
  sources: [{{name: synthetic, local: {tmp_path / 'shards'}}}]
train: {{max_steps: 4, zero_stage: 2}}
""")
    return path


def test_render_multi_node_gpu_job(recipe, tmp_path):
    opts = SlurmOptions(nodes=4, gpus_per_node=8, partition="gpu", account="proj", time="2-00:00:00",
                        setup=["module load cuda/12.4"])
    script, path = render_job(recipe, opts, overrides=["train.max_steps=10"])
    assert path.read_text() == script and path.parent == (tmp_path / "run" / "slurm").resolve()
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=2-00:00:00",
                 "#SBATCH --signal=USR1@120", "#SBATCH --requeue", "module load cuda/12.4",
                 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1', "scontrol requeue"]:
        assert line in script, line
    node = (path.parent / "node.sh").read_text()
    assert "--nproc_per_node=8" in node and "--rdzv_backend=c10d" in node and 'trap "" USR1' in node
    assert "clean_stale_shared_memory" in node and "--resume auto" in node
    # the resolved recipe (with the override) is what the job runs
    resolved = (path.parent / "recipe.yaml").read_text()
    assert "max_steps: 10" in resolved and "name: tiny" in resolved


def test_cpu_nodes_use_gloo_and_procs_per_node(recipe):
    script, path = render_job(recipe, SlurmOptions(nodes=1, gpus_per_node=0, procs_per_node=2))
    assert "--gpus-per-node" not in script and "export DS_ACCELERATOR=cpu" in script
    assert "--nproc_per_node=2" in (path.parent / "node.sh").read_text()


def test_sweep_becomes_a_job_array(recipe):
    assert expand_sweep(["train.max_steps=2,4", "model.alif.fusion=none,last_level"]) == [
        ["train.max_steps=2", "model.alif.fusion=none"], ["train.max_steps=2", "model.alif.fusion=last_level"],
        ["train.max_steps=4", "model.alif.fusion=none"], ["train.max_steps=4", "model.alif.fusion=last_level"]]
    script, path = render_job(recipe, SlurmOptions(gpus_per_node=0), sweep=["train.max_steps=2,4"])
    assert "#SBATCH --array=0-1" in script
    assert (path.parent / "sweep.txt").read_text() == "train.max_steps=2\ntrain.max_steps=4\n"


def test_bad_recipe_fails_at_submit_time_with_its_key(recipe, capsys):
    with pytest.raises(ConfigError, match="train.max_stepz"):
        render_job(recipe, SlurmOptions(), overrides=["train.max_stepz=3"])
    # a bad value inside a sweep is caught before anything is queued
    with pytest.raises(ConfigError, match="zero_stage"):
        render_job(recipe, SlurmOptions(), sweep=["train.zero_stage=2,5"])
    assert main(["cluster", "submit", str(recipe), "--dry-run", "--gpus-per-node", "0", "bogus.key=1"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_dry_run_prints_and_options_are_checked(recipe, capsys):
    assert main(["cluster", "submit", str(recipe), "--dry-run", "--nodes", "2", "--gpus-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in out and "not submitted: --dry-run" in out
    with pytest.raises(ValueError, match="--signal"):
        SlurmOptions(signal="USR1 at 120")
    assert main(["cluster", "submit", str(recipe), "--dry-run", "--nodes", "0"]) == 2
