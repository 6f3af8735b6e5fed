"""SLURM jobs on a live local cluster (cluster/local/up.sh: node1 and node2 on this host, as root):
a tiny recipe on 2 ranks runs to the end; a job requeued mid-run (`scontrol requeue`) and a job
sent the preemption signal both resume from their checkpoint with every step logged once; a bad
recipe is refused at submit time; a 2-node job and a 2-member sweep array run end to end.

The preemption signal is sent with `scancel --signal=USR1`, which signals the job steps and not the
batch shell, exactly what `#SBATCH --signal=USR1@120` does at the time limit (SLURM checks time
limits only every ~30 s, too coarse for a test of a few steps); the time-limit wiring itself is
checked in the rendered job (`test_time_limit_signal_is_wired_to_the_trainer`).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from rlipv2_scale.cli import main

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "cluster" / "local"
RECIPE = ROOT / "recipes" / "tiny" / "pretrain" / "r50_vg.yaml"
# Two SLURM nodes on one host share /dev/shm, where the streaming loader keeps per-node state;
# a private /dev/shm per launcher gives each the separate node a real cluster has.
PRIVATE_SHM = "unshare --mount --propagation private sh -c 'mount -t tmpfs shm /dev/shm && exec \"$@\"' sh"
def private_shm() -> str:
    probe = subprocess.run(["sh", "-c", PRIVATE_SHM + " true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no private /dev/shm per simulated node here (unshare/mount refused: {probe.stderr.strip()})")
    return PRIVATE_SHM


DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
        "PREEMPTED"}
WAIT_S = 420


def _free_ports(n: int) -> int:
    """A base port with `n` consecutive free ports after it (not the default cluster's 16817)."""
    for base in range(46817, 60000, 97):
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports for the local SLURM cluster")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """node1 + node2 under their own state directory and ports; SLURM_CONF set for this module."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs slurmd as root (CI runs as root)")
    state = tmp_path_factory.mktemp("slurm")
    base = _free_ports(3)
    env = {**os.environ, "RLIPV2_SLURM_STATE": str(state), "RLIPV2_SLURM_NODES": "2",
           "RLIPV2_SLURM_CTLD_PORT": str(base), "RLIPV2_SLURM_SLURMD_PORT": str(base + 1)}
    log = state / "up.log"
    with log.open("w") as out:    # the daemons inherit no pipe of ours: up.sh returns when they are up
        proc = subprocess.run(["bash", str(LOCAL / "up.sh")], env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, f"cluster/local/up.sh failed:\n{log.read_text()[-4000:]}"
    conf = log.read_text().strip().splitlines()[-1]
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", conf)
    mp.setenv("OMP_NUM_THREADS", "1")     # exported to the jobs by sbatch
    try:
        yield state
    finally:
        mp.undo()
        subprocess.run(["bash", str(LOCAL / "down.sh")], env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from rlipv2_scale.data.convert import convert
    from rlipv2_scale.data.synthetic import write_split

    root = tmp_path_factory.mktemp("data")
    # 24 images: an epoch (12 steps on 2 ranks of 1 image) outlasts every run here, so no resume
    # lands on an epoch's last step.
    write_split(root / "raw", 24, seed=0, split="train", size=96)
    convert("vg", root / "raw" / "scene_graphs.json", root / "raw", root / "shards", progress=False)
    return root / "shards"


def data_overrides(shards: Path) -> list[str]:
    return [f"data.sources=[{{name: vg, local: '{shards}'}}]", "data.batch_size=1", "checkpoint.every_steps=2"]


# ---------------------------------------------------------------------------------------------- helpers
def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def submit(run_dir: Path, shards: Path, *args: str, name: str) -> str:
    code, out, err = cli("cluster", "submit", str(RECIPE), "--gpus-per-node", "0",
                         "--job-name", name, "--run-dir", str(run_dir), *args, *data_overrides(shards))
    assert code == 0, err
    match = re.search(r"submitted job (\d+)", out)
    assert match, out
    return match.group(1)


def jobs(job_id: str) -> list[dict[str, str]]:
    """`scontrol show job` of the job (one record per array member); no accounting needed."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in proc.stdout.splitlines() if line.strip()]


def logs(run_dir: Path, job_id: str) -> str:
    text = [f"--- scontrol show job {job_id}\n"
            + subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout]
    for path in sorted(run_dir.rglob("logs/*.out")):
        lines = path.read_text(errors="replace").splitlines()
        text.append(f"--- {path} (last 60 lines)\n" + "\n".join(lines[-60:]))
    return "\n".join(text)


def wait_for(what: str, run_dir: Path, job_id: str, ready, timeout: float = WAIT_S) -> None:
    """Poll until `ready()`; fail with the job's state and logs on a timeout or a failed job."""
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        states = {j["JobState"] for j in jobs(job_id)}
        if states & DONE - {"COMPLETED"}:
            pytest.fail(f"job {job_id} ended {states} while waiting for {what}\n{logs(run_dir, job_id)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (job {job_id} {states})\n"
                        f"{logs(run_dir, job_id)}")
        time.sleep(0.5)


def completed(job_id: str) -> bool:
    return all(j["JobState"] == "COMPLETED" for j in jobs(job_id))


def metric_lines(run_dir: Path) -> list[str]:
    path = run_dir / "metrics.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metric_lines(run_dir)]


def batch_log(run_dir: Path, name: str, job_id: str) -> str:
    return (run_dir / "logs" / f"{name}-{job_id}.out").read_text()


def node_logs(run_dir: Path, name: str, job_id: str) -> dict[str, str]:
    prefix = f"{name}-{job_id}-"
    return {p.name[len(prefix):-4]: p.read_text(errors="replace")
            for p in (run_dir / "logs").glob(f"{prefix}*.out")}


# ---------------------------------------------------------------------------------------------- tests
def test_two_ranks_on_one_node_run_to_the_end(cluster, shards, tmp_path):
    run = tmp_path / "run"
    job = submit(run, shards, "--procs-per-node", "2", "train.max_steps=4", name="full")
    wait_for("the job to complete", run, job, lambda: completed(job))
    info = jobs(job)[0]
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", logs(run, job)
    assert json.loads((run / "COMPLETED").read_text())["step"] == 4
    assert steps(run) == [1, 2, 3, 4], logs(run, job)
    assert json.loads(metric_lines(run)[0])["samples"] == 2          # 2 ranks x 1 image: both ranks trained
    # per-job and per-node logs, the resolved recipe next to them
    node = info["NodeList"]
    assert set(node_logs(run, "full", job)) == {node}
    assert "restart 0" in batch_log(run, "full", job) and "run complete" in batch_log(run, "full", job)
    assert "max_steps: 4" in (run / "logs" / "recipe.yaml").read_text()


def test_requeued_job_resumes_from_its_checkpoint(cluster, shards, tmp_path):
    run = tmp_path / "run"
    job = submit(run, shards, "--procs-per-node", "2", "train.max_steps=12", name="requeue")
    wait_for("step 3 (a checkpoint at step 2 exists)", run, job, lambda: len(steps(run)) >= 3)
    before = metric_lines(run)
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_for("the requeued job to complete", run, job, lambda: completed(job) and jobs(job)[0]["Restarts"] != "0")
    assert jobs(job)[0]["Restarts"] == "1", logs(run, job)
    # SLURM's SIGTERM reached the trainer mid-run: it checkpointed before going
    trainer = "\n".join(node_logs(run, "requeue", job).values())
    match = re.search(r"stop signal received: checkpointed step (\d+)", trainer)
    assert match and 3 <= int(match.group(1)) < 12, logs(run, job)
    assert steps(run) == list(range(1, 13)), logs(run, job)       # each step once
    # Steps up to the checkpoint were not redone: their records (wall-clock throughput included)
    # are the first run's, byte for byte.
    assert metric_lines(run)[:2] == before[:2]
    text = batch_log(run, "requeue", job)
    assert "restart 0" in text and "restart 1" in text and "run complete" in text


def test_preemption_signal_checkpoints_and_requeues(cluster, shards, tmp_path):
    run = tmp_path / "run"
    job = submit(run, shards, "--procs-per-node", "2", "train.max_steps=10", name="preempt")
    wait_for("the first step (the trainer's signal handler is installed)", run, job, lambda: len(steps(run)) >= 1)
    before = metric_lines(run)
    # The job steps only, as SLURM does for `--signal=USR1@T` at the time limit.
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    wait_for("the preempted job to requeue and complete", run, job,
             lambda: completed(job) and jobs(job)[0]["Restarts"] != "0")
    assert jobs(job)[0]["Restarts"] == "1", logs(run, job)
    trainer = "\n".join(node_logs(run, "preempt", job).values())
    match = re.search(r"stop signal received: checkpointed step (\d+)", trainer)
    assert match, logs(run, job)
    stopped = int(match.group(1))
    assert 1 <= stopped < 10
    assert "checkpointed before the time limit: requeueing" in batch_log(run, "preempt", job)
    assert steps(run) == list(range(1, 11)), logs(run, job)
    # resumed at the preemption checkpoint: nothing before it was redone
    assert metric_lines(run)[:len(before)] == before and len(before) <= stopped


def test_time_limit_signal_is_wired_to_the_trainer(cluster, shards, tmp_path):
    """What the live signal test does not time: the limit's signal goes to the job steps (no `B:`),
    the launcher and torchrun ignore it, and the batch script requeues on the trainer's marker."""
    from rlipv2_scale.cluster.slurm import SlurmOptions, render_job

    script, path = render_job(RECIPE, SlurmOptions(gpus_per_node=0, time="00:30:00", signal="USR1@90"),
                              overrides=data_overrides(shards), run_dir=tmp_path / "run")
    assert "#SBATCH --time=00:30:00" in script and "#SBATCH --signal=USR1@90" in script
    assert "#SBATCH --requeue" in script
    node = (path.parent / "node.sh").read_text()
    assert node.index('trap "" USR1') < node.index("exec ") and "--resume auto" in node
    requeue = script[script.index('if [[ -f "$RUN_DIR/PREEMPTED" ]]'):]
    assert 'scontrol requeue "$SLURM_JOB_ID"' in requeue
    # sbatch accepts the job as rendered (--test-only: validated by the controller, not queued)
    proc = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0 and "to start" in proc.stderr, proc.stderr


def test_bad_recipe_fails_at_submit_time_and_nothing_is_queued(cluster, shards, tmp_path):
    run = tmp_path / "run"
    code, out, err = cli("cluster", "submit", str(RECIPE), "--gpus-per-node", "0", "--job-name", "bad",
                         "--run-dir", str(run), *data_overrides(shards), "train.max_stepz=3")
    assert code == 2 and "train.max_stepz" in err and "submitted" not in out
    code, _, err = cli("cluster", "submit", str(RECIPE), "--gpus-per-node", "0", "--job-name", "bad",
                       "--run-dir", str(run), *data_overrides(shards), "--sweep", "train.zero_stage=2,5")
    assert code == 2 and "zero_stage" in err
    queued = subprocess.run(["squeue", "-h", "-n", "bad", "-o", "%i"], capture_output=True, text=True, check=True)
    assert queued.stdout.strip() == "" and not (run / "slurm" / "job.sbatch").exists()


def test_two_nodes_one_rank_each(cluster, shards, tmp_path):
    run = tmp_path / "run"
    job = submit(run, shards, "--nodes", "2", "--procs-per-node", "1", "--container", private_shm(),
                 "train.max_steps=4", name="twonode")
    wait_for("the 2-node job to complete", run, job, lambda: completed(job))
    info = jobs(job)[0]
    assert info["NodeList"] == "node[1-2]" and info["ExitCode"] == "0:0", logs(run, job)
    assert steps(run) == [1, 2, 3, 4]
    assert json.loads(metric_lines(run)[0])["samples"] == 2          # one rank on each node
    per_node = node_logs(run, "twonode", job)
    assert set(per_node) == {"node1", "node2"} and all(per_node.values())
    assert "master 127.0.0.1:" in batch_log(run, "twonode", job)   # node1's NodeAddr


def test_sweep_array_runs_each_member(cluster, shards, tmp_path):
    run = tmp_path / "run"
    job = submit(run, shards, "--procs-per-node", "1", "--container", private_shm(), "--sweep", "train.max_steps=2,3",
                 name="sweep")
    wait_for("both array members to complete", run, job, lambda: len(jobs(job)) == 2 and completed(job))
    assert steps(run / "0") == [1, 2] and steps(run / "1") == [1, 2, 3], logs(run, job)
    for i in (0, 1):
        assert (run / "logs" / f"sweep-{job}_{i}.out").read_text().count("run complete") == 1
