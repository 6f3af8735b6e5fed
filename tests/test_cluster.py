"""SLURM jobs: rendering and submit-time validation here; a live one-node cluster in test_cluster_live."""
import os
import subprocess

import pytest

from rlipv2_scale.cli import main
from rlipv2_scale.cluster.slurm import SlurmOptions, expand_sweep, render_job
from rlipv2_scale.errors import ConfigError


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
    assert "rlipv2_scale.data.shared_memory" in node and "--resume auto" in node
    # the resolved recipe (with the override) is what the job runs
    resolved = (path.parent / "recipe.yaml").read_text()
    assert "max_steps: 10" in resolved and "name: tiny" in resolved


def test_cpu_nodes_use_gloo_and_procs_per_node(recipe):
    script, path = render_job(recipe, SlurmOptions(nodes=1, gpus_per_node=0, procs_per_node=2))
    assert "--gpus-per-node" not in script and 'export DS_ACCELERATOR="cpu"' in script
    assert "--nproc_per_node=2" in (path.parent / "node.sh").read_text()


def test_sweep_becomes_a_job_array(recipe):
    assert expand_sweep(["train.max_steps=2,4", "model.alif.fusion=none,last_level"]) == [
        ["train.max_steps=2", "model.alif.fusion=none"], ["train.max_steps=2", "model.alif.fusion=last_level"],
        ["train.max_steps=4", "model.alif.fusion=none"], ["train.max_steps=4", "model.alif.fusion=last_level"]]
    assert expand_sweep(["optim.betas=[0.9, 0.99],[0.9, 0.999]"]) == [["optim.betas=[0.9, 0.99]"],
                                                                     ["optim.betas=[0.9, 0.999]"]]
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


def test_site_env_and_scratch_from_the_command_line(recipe, capsys):
    assert main(["cluster", "submit", str(recipe), "--dry-run", "--env", "NCCL_SOCKET_IFNAME=ib0",
                 "--env", "HF_HOME=$SCRATCH/hf", "--scratch", "/local/nvme"]) == 0
    out = capsys.readouterr().out
    assert 'export NCCL_SOCKET_IFNAME="ib0"' in out and 'export HF_HOME="$SCRATCH/hf"' in out
    node = (recipe.parent / "run" / "slurm" / "node.sh").read_text()
    assert 'export TMPDIR="/local/nvme/rlipv2-$SLURM_JOB_ID-$SLURM_NODEID"' in node
    assert main(["cluster", "submit", str(recipe), "--dry-run", "--env", "NOEQUALS"]) == 2
    assert main(["cluster", "submit", str(recipe), "--dry-run", "--env", 'A=say "hi"']) == 2
    assert "--env" in capsys.readouterr().err


def test_container_prefix_wraps_each_node_launcher(recipe):
    script, _ = render_job(recipe, SlurmOptions(gpus_per_node=8, container="apptainer exec --nv img.sif"))
    assert "srun --kill-on-bad-exit=1 apptainer exec --nv img.sif bash " in script
    script, _ = render_job(recipe, SlurmOptions(gpus_per_node=8))
    assert "srun --kill-on-bad-exit=1 bash " in script
    # 8 GPUs x 8 cores by default, shared by the node's 8 ranks: 8 OpenMP threads each
    assert "#SBATCH --cpus-per-task=64" in script and 'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"' in script


def test_stale_shared_memory_is_only_what_no_live_process_uses(tmp_path):
    from rlipv2_scale.data.shared_memory import clean_stale

    shm, proc = tmp_path / "shm", tmp_path / "proc"
    for name in ["000000_locals", "000000_barrier", "000001_locals", "000001_shard_states", "other_file"]:
        (shm / name).parent.mkdir(exist_ok=True)
        (shm / name).write_bytes(b"x")
    live = proc / "4242"
    (live / "fd").mkdir(parents=True)
    # a live job maps one of its segments and holds the other open
    (live / "maps").write_text("7f00-7f01 rw-s 00000000 00:1a 12 /dev/shm/000001_locals\n")
    (live / "fd" / "3").symlink_to("/dev/shm/000001_shard_states")
    (proc / "self").mkdir()                        # not a pid: skipped
    assert clean_stale(shm, proc) == ["000000_barrier", "000000_locals"]
    assert sorted(p.name for p in shm.iterdir()) == ["000001_locals", "000001_shard_states", "other_file"]


HOSTILE = "$(touch {m})"


@pytest.mark.parametrize("args, flag", [
    (["--partition", "gpu\ntouch {m}"], "--partition"), (["--account", "a;touch {m}"], "--account"),
    (["--env", "X=$(touch {m})"], "--env"), (["--env", "X=${{Y:-$(touch {m})}}"], "--env"),
    (["--env", "X=`touch {m}`"], "--env"), (["--scratch", '/l/"; touch {m}; "'], "--scratch"),
    (["--procs-per-node", "0"], "--procs-per-node"), (["--procs-per-node", "-1"], "--procs-per-node"),
    (["--cpus-per-task", "0"], "--cpus-per-task"), (["--time", "banana"], "--time"), (["--mem", "lots"], "--mem"),
    (["--job-name", "a b"], "--job-name"), (["--sbatch", "--qos=x\ntouch {m}"], "--sbatch"),
    (["--container", "img\ntouch {m}"], "--container"), (["--sweep", "train.seed=1,2\ntouch {m}"], "sweep"),
])
def test_hostile_values_are_refused_before_anything_is_written(recipe, tmp_path, capsys, args, flag):
    marker = tmp_path / "MARKER"
    args = [a.format(m=marker) for a in args]
    assert main(["cluster", "submit", str(recipe), "--dry-run", "--gpus-per-node", "0", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rlipv2: error:") and flag in err, err
    assert not (tmp_path / "run" / "slurm").exists() and not marker.exists()


def test_hostile_values_that_are_accepted_stay_literal_when_the_job_runs(recipe, tmp_path):
    """The rendered batch script and node launcher run in a sandbox (srun, scontrol and the python
    interpreter stubbed): nothing a user typed runs, every value arrives as typed."""
    marker = tmp_path / "MARKER"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node1\n")
    (bin_dir / "srun").write_text('#!/bin/sh\nshift\nexec "$@"\n')             # drop --kill-on-bad-exit
    record = tmp_path / "argv"
    (bin_dir / "python").write_text(f'#!/bin/sh\n[ "$2" = torch.distributed.run ] || exit 0\n'
                                    f'printf "%s\\0" "$@" "TMPDIR=$TMPDIR" "Y=$Y" "HF=$HF" > {record}\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    run = tmp_path / f"run;$(touch${{IFS}}{marker})`touch${{IFS}}{marker}`"   # no spaces: see the test below
    scratch = tmp_path / "scr a;b'c"
    hostile_value = f"x`touch {marker}`;{HOSTILE.format(m=marker)}"
    literal = f"a b;c|d'e (touch {marker})"
    opts = SlurmOptions(gpus_per_node=0, env={"Y": literal, "HF": "$HOME/hf"}, scratch=str(scratch),
                        python=str(bin_dir / "python"))
    _, path = render_job(recipe, opts, sweep=[f"run.name=plain,{hostile_value}"], run_dir=run)
    job = path.parent
    for f in ("job.sbatch", "node.sh"):
        assert subprocess.run(["bash", "-n", str(job / f)]).returncode == 0, f
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path / "home"), "SLURM_JOB_ID": "7",
           "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NAME": "rlipv2",
           "SLURMD_NODENAME": "node1", "SLURM_NNODES": "1", "SLURM_NODEID": "0"}
    proc = subprocess.run(["bash", str(job / "job.sbatch")], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    argv = record.read_text().split("\0")[:-1]
    assert f"run.name={hostile_value}" in argv and f"run.dir={run}/1" in argv
    assert f"TMPDIR={scratch}/rlipv2-7-0" in argv and f"HF={tmp_path}/home/hf" in argv
    assert f"Y={literal}" in argv


@pytest.mark.parametrize("run_dir, what", [("my run", "a space"), ("it's", "\"'\""),
                                           ('say"hi"', "'\"'"), ("100%", "'%'"), ("a\\b", "'\\\\'")])
def test_a_run_directory_an_sbatch_line_cannot_carry_is_refused(recipe, tmp_path, capsys, run_dir, what):
    # `#SBATCH --output=<run dir>/logs/...` is unquoted: sbatch would split it at the space, strip
    # quotes, or read '%' and '\\' as its file-name pattern, and the logs would go elsewhere
    run = tmp_path / "x" / run_dir
    argv = ["cluster", "submit", str(recipe), "--nodes", "1", "--gpus-per-node", "0", "--dry-run",
            "--job-name", "okjob", "--run-dir", str(run)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"rlipv2: error: run directory {str(run)!r} holds {what}"), err
    assert "choose a path without spaces" in err and not (tmp_path / "x").exists()
    assert main(argv[:-1] + [str(tmp_path / "x" / "my_run")]) == 0
    assert f"#SBATCH --output={tmp_path}/x/my_run/logs/%x-%A.out" in capsys.readouterr().out


def test_an_sbatch_option_with_a_space_is_refused(recipe, capsys):
    argv = ["cluster", "submit", str(recipe), "--gpus-per-node", "0", "--dry-run"]
    assert main(argv + ["--sbatch=--comment=a b"]) == 2
    assert "--sbatch '--comment=a b' holds a space" in capsys.readouterr().err
    assert main(argv + ["--sbatch=--qos=high"]) == 0 and "#SBATCH --qos=high\n" in capsys.readouterr().out


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """`squeue` and `scancel` that only record their arguments (one line per call)."""
    bin_dir, log = tmp_path / "fake_bin", tmp_path / "slurm_calls.log"
    bin_dir.mkdir()
    for name in ("squeue", "scancel"):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n')
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


@pytest.mark.parametrize("value", ["--user=root", "-u", "--all", "/some/run/dir", "abc", "12 34", "12345,67",
                                   "", "1_", "_1", "12345_[1-3]", "-1"])
@pytest.mark.parametrize("command", ["cancel", "status"])
def test_cancel_and_status_take_only_job_ids(fake_slurm, capsys, command, value):
    assert main(["cluster", command, "--", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rlipv2: error: job id") and repr(value) in err, err
    assert "not a SLURM job id" in err
    assert not fake_slurm.exists()      # neither squeue nor scancel ran


def test_cancel_and_status_pass_job_ids_through(fake_slurm, capsys):
    assert main(["cluster", "cancel", "12345"]) == 0
    assert "cancelled 12345" in capsys.readouterr().out
    assert main(["cluster", "cancel", "12345_3"]) == 0
    assert main(["cluster", "status", "678"]) == 0
    calls = fake_slurm.read_text().splitlines()
    assert calls[0] == "scancel 12345" and calls[1] == "scancel 12345_3"
    assert calls[2].startswith("squeue ") and calls[2].endswith(" -j 678")
