"""Faults injected into the trainer (issue #21): a killed launcher, two runs on one run directory,
a diverging run, bad optimizer values, a stale PREEMPTED marker, a config error found by the
ranks, a cut-short metrics line and damaged checkpoint files. Each test fails on a trainer without
the matching guard. The model is `tests/train_toy.py`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from rlipv2_scale.cli import main as cli_main
from rlipv2_scale.errors import UserError
from rlipv2_scale.train import checkpoint as ckpt_io
from rlipv2_scale.train.checkpoint import CheckpointManager, gathered_state_dict, read_trainer_state, resolve_resume
from rlipv2_scale.train.launch import spawn_local
from rlipv2_scale.train.runlock import RunLock
from rlipv2_scale.train.telemetry import prune_metrics

REPO = Path(__file__).resolve().parent.parent
TOY = Path(__file__).with_name("train_toy.py")
TINY = REPO / "recipes" / "tiny" / "pretrain" / "r50_vg.yaml"
# `spawn_local` on the toy entry, printing a UserError as the CLI does.
LAUNCHER = (
    "import sys\nfrom pathlib import Path\nfrom rlipv2_scale.errors import UserError\n"
    "from rlipv2_scale.train.launch import spawn_local\n"
    "try:\n    sys.exit(spawn_local(int(sys.argv[1]), sys.argv[2:], Path(sys.argv[2]), entry=({toy!r},)))\n"
    "except UserError as exc:\n    print(f'rlipv2: error: {{exc}}', file=sys.stderr)\n    sys.exit(2)\n"
).format(toy=str(TOY))


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TOY.parent.parent)}


def _toy(run_dir: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    """One toy run in one process (a group of one, no torchrun)."""
    proc = subprocess.run([sys.executable, str(TOY), str(run_dir), *args], env=_env(), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("rlipv2: error:")]


# ---------------------------------------------------------------------------------------- item 3
@pytest.mark.distributed
@pytest.mark.slow
def test_ranks_die_with_a_killed_launcher_and_the_run_directory_is_locked(tmp_path, capsys):
    """SIGKILL to the launcher's process group takes its ranks with it (torchrun starts them in
    sessions of their own); while it runs, a second run on its directory stops at once naming it;
    afterwards its lock is taken over with a message."""
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, "1", str(tmp_path), "train.max_steps=1000",
                                 "--delay", "0.3"], env=_env(), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (tmp_path / "metrics.jsonl").is_file():
            time.sleep(0.1)
        assert (tmp_path / "metrics.jsonl").is_file(), "the run never started"
        torchrun, = psutil.Process(launcher.pid).children()
        ranks = torchrun.children()
        assert ranks, "no rank found"

        from rlipv2_scale.train.engine import run

        from train_toy import toy_builder, toy_config

        for second in (lambda: run(toy_config(str(tmp_path)), build=toy_builder()),                # `rlipv2 train`
                       lambda: spawn_local(1, [str(tmp_path)], tmp_path, entry=(str(TOY),))):    # `--nproc N`
            with pytest.raises(UserError, match=rf"in use by another run \(host \S+, pid {launcher.pid}, since"):
                second()
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, f"ranks outlived their launcher: {[p.pid for p in alive]}"
    capsys.readouterr()
    with RunLock(tmp_path):
        pass
    assert "taking over the run-directory lock of a run that is gone (host" in capsys.readouterr().err
    with RunLock(tmp_path):    # released cleanly: nothing to take over
        pass
    assert "taking over" not in capsys.readouterr().err


def test_a_lock_holder_is_named_and_a_dead_ones_lock_taken_over(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom rlipv2_scale.train.runlock import "
                               "RunLock\nRunLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(60)",
                               str(tmp_path)], env=_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=rf"'{tmp_path}' is in use by another run \(host \S+, pid {holder.pid},"):
        RunLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    with RunLock(tmp_path):
        assert f" {os.getpid()} " in (tmp_path / "run.lock").read_text()
    assert f"pid {holder.pid}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- item 4
@pytest.mark.slow
@pytest.mark.parametrize("keep_last", [3, 1])
def test_a_diverging_run_keeps_its_last_good_checkpoint_as_latest(tmp_path, keep_last):
    """lr ×1e30 after step 3: step 4's loss is still finite but its update blows the weights up, so
    every later loss is non-finite. The state of step 4 (and the periodic checkpoint of step 4) is
    set aside; `latest` stays step 2, the newest whose weights gave a finite loss (also when only
    one checkpoint is kept: step 2 is not pruned while step 4's weights are untried)."""
    proc = _toy(tmp_path, "train.max_steps=20", "train.steps_per_epoch=3", "optim.lr_drop_epochs=[1]",
                "optim.lr_drop_factor=1e30", "train.max_nonfinite_in_row=2", "checkpoint.every_steps=2",
                f"checkpoint.keep_last={keep_last}", expect=2)
    root = tmp_path / "checkpoints"
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "2 non-finite losses in a row at step 4" in lines[0], proc.stderr[-3000:]
    assert f"'{root / 'diverged-step_00000004'}'" in lines[0] and f"'{root / 'step_00000002'}'" in lines[0]
    assert CheckpointManager(tmp_path).steps() == [2] and resolve_resume("auto", tmp_path) == root / "step_00000002"
    assert read_trainer_state(root / "diverged-step_00000004")["step"] == 4
    diverged = gathered_state_dict(root / "diverged-step_00000004")
    good = gathered_state_dict(root / "step_00000002")
    assert max(v.abs().max() for v in diverged.values() if v.is_floating_point()) > 1e20
    assert all(torch.isfinite(v).all() and v.abs().max() < 1e3 for v in good.values() if v.is_floating_point())


def test_diverged_states_are_set_aside_never_deleted(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    for step in (2, 4):
        _fake_save(m, step)
    m.begin(5)
    (m.tmp_dir(5) / ckpt_io.TRAINER_STATE).write_text(json.dumps({"step": 5}))
    assert m.commit_diverged(5, good_step=3) == m.root / "diverged-step_00000005"
    assert m.latest() == m.final_dir(2)
    assert (m.root / "diverged-step_00000004").is_dir() and m.steps() == [2]
    m.begin(5)
    (m.tmp_dir(5) / ckpt_io.TRAINER_STATE).write_text(json.dumps({"step": 5}))
    assert m.commit_diverged(5, good_step=3) == m.root / "diverged-step_00000005-2"   # a second attempt
    assert (m.root / "diverged-step_00000005").is_dir()
    m.begin(2)
    (m.tmp_dir(2) / ckpt_io.TRAINER_STATE).write_text(json.dumps({"step": 2}))
    assert m.commit_diverged(2, good_step=1) == m.root / "diverged-step_00000002" and m.latest() is None


@pytest.mark.parametrize("override, named", [
    ("optim.lr=nan", "optim.lr is nan"), ("optim.lr=-1", "optim.lr is -1.0"), ("optim.lr=inf", "optim.lr is inf"),
    ("train.grad_clip=nan", "train.grad_clip is nan"), ("optim.weight_decay=-0.1", "optim.weight_decay is -0.1"),
    ("optim.eps=0", "optim.eps is 0.0"), ("optim.betas=[0.9, 1.5]", "optim.betas[1] is 1.5"),
    ("optim.groups=[{name: b, patterns: ['backbone.*'], lr: .inf}]", "optim.groups 'b' lr is inf"),
    ("optim.groups=[{name: b, patterns: ['backbone.*'], lr: 0.1, weight_decay: .nan}]",
     "optim.groups 'b' weight_decay is nan"),
])
def test_bad_optimizer_values_fail_when_the_recipe_loads(tmp_path, capsys, override, named):
    run_dir = tmp_path / "run"
    assert cli_main(["train", str(TINY), override, f"run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == err.strip().splitlines() and named in err, err
    assert not run_dir.exists()


# ---------------------------------------------------------------------------------------- items 5, 6
@pytest.mark.distributed
@pytest.mark.slow
def test_a_failed_resume_after_a_preemption_exits_2_not_75(tmp_path):
    """A run stopped by SIGTERM left PREEMPTED; resumed under --nproc 2 with its data now missing, it
    must say so once and exit 2 (SLURM would requeue an exit 75 forever), leaving no marker."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "PREEMPTED").write_text(json.dumps({"step": 3}))
    proc = subprocess.run([sys.executable, "-m", "rlipv2_scale.cli", "train", str(TINY), "--nproc", "2",
                           f"run.dir={run_dir}", "data.sources=[{name: vg, local: gone/vg}]", "--resume", "auto"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert len(_error_lines(out)) == 1 and "gone/vg" in _error_lines(out)[0], out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out
    assert not (run_dir / "PREEMPTED").exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_a_config_error_found_by_the_ranks_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, "2", str(tmp_path),
                           "optim.groups=[{name: heads, patterns: ['head.*'], lr: 0.1}]"],
                          env=_env(), capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert len(_error_lines(out)) == 1 and "optim.groups ['heads']" in out, out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out and "exitcode" not in out


def test_a_new_run_refuses_a_used_run_directory_and_leaves_it_as_it_was(tmp_path):
    """Without --resume a run would overwrite the folder's config and metrics and rotate its
    checkpoints (or the user's folders named like them) away: it stops, naming the way on."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000001" / "mydata").write_text("mine")
    (run_dir / "metrics.jsonl").write_text("user metrics\n")
    proc = _toy(run_dir, "train.max_steps=2", expect=2)
    line = _error_lines(proc.stderr)[0]
    assert f"run.dir '{run_dir}' is not empty (checkpoints, metrics.jsonl)" in line and "--resume auto" in line
    assert (run_dir / "checkpoints" / "step_00000001" / "mydata").read_text() == "mine"
    assert (run_dir / "metrics.jsonl").read_text() == "user metrics\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "metrics.jsonl"]   # no config, no lock
    # an empty folder, or one holding only a launcher's lock, is a new run's
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "run.lock").touch()
    _toy(fresh, "train.max_steps=1", "checkpoint.every_steps=1")
    assert (fresh / "COMPLETED").is_file()


def test_a_resume_that_changes_the_model_or_the_zero_stage_names_what_changed(tmp_path):
    run_dir = tmp_path / "run"
    _toy(run_dir, "train.max_steps=2", "checkpoint.every_steps=2")
    latest = CheckpointManager(run_dir).latest_intact()
    proc = _toy(run_dir, "train.max_steps=4", "model.d_model=32", "model.num_queries=10", "--resume", "auto",
                expect=2)
    line = _error_lines(proc.stderr)[0]
    assert f"checkpoint '{latest}' does not fit this run's model (" in line, proc.stderr[-2000:]
    assert "model.d_model: 64 in the checkpoint, 32 now; model.num_queries: " in line
    assert f"train.init_from={run_dir}" in line and "Traceback" not in proc.stderr
    proc = _toy(run_dir, "train.max_steps=4", "train.zero_stage=1", "--resume", "auto", expect=2)
    assert (f"checkpoint '{latest}' was written with train.zero_stage=2, this run has 1: resume with "
            "train.zero_stage=2" in _error_lines(proc.stderr)[0])
    assert CheckpointManager(run_dir).latest_intact() == latest      # nothing written over


def test_a_cut_short_last_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    records = "".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3))
    path.write_text(records + '{"step": 4, "lo')
    prune_metrics(path, 10)
    assert path.read_text() == records
    assert "dropping its last line, cut short" in capsys.readouterr().err
    path.write_text(records.replace('{"step": 2', '{"step": 2,,', 1))    # damage elsewhere: not guessed at
    with pytest.raises(UserError, match="line 2 is not a JSON record"):
        prune_metrics(path, 10)


def _fake_save(manager: CheckpointManager, step: int) -> Path:
    tmp = manager.begin(step)
    (tmp / "pytorch_model").mkdir()
    (tmp / "pytorch_model" / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * step)
    (tmp / "scheduler.pt").write_bytes(b"s" * 10)
    (tmp / ckpt_io.TRAINER_STATE).write_text(json.dumps({"step": step}))
    return manager.commit(step)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, damage):
    m = CheckpointManager(tmp_path, keep_last=3)
    first, second = _fake_save(m, 1), _fake_save(m, 2)
    states = second / "pytorch_model" / "mp_rank_00_model_states.pt"
    data = states.read_bytes()
    if damage == "truncate":
        states.write_bytes(data[:100])
    elif damage == "flip":
        states.write_bytes(data[:-1] + b"\x00")
    else:
        states.unlink()
    with pytest.raises(UserError, match="the checkpoint is damaged"):
        resolve_resume(str(second), tmp_path)          # asked for by name: no silent substitute
    assert resolve_resume("auto", tmp_path) == first
    err = capsys.readouterr().err
    assert f"checkpoint '{second}'" in err and "mp_rank_00_model_states.pt" in err and f"from '{first}'" in err
    assert (tmp_path / "checkpoints" / "damaged-step_00000002").is_dir()   # set aside, not deleted
    assert m.latest() == first and m.steps() == [1]
    assert _fake_save(m, 2) == second and m.damage(second) is None       # redone, and whole again


def test_every_damaged_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    m = CheckpointManager(tmp_path)
    (_fake_save(m, 1) / "scheduler.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"no intact checkpoint.*scheduler.pt has 0 bytes, 10 were written"):
        resolve_resume("auto", tmp_path)


def test_commit_syncs_files_and_directories_before_renaming(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path)
    tmp = m.begin(1)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "a.pt").write_bytes(b"a")
    (tmp / ckpt_io.TRAINER_STATE).write_text("{}")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(ckpt_io.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                         real_fsync(fd)))
    monkeypatch.setattr(ckpt_io.os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    m.commit(1)
    rename = events.index(("replace", str(tmp)))
    synced = {path for kind, path in events[:rename] if kind == "fsync"}
    assert {str(tmp / "sub" / "a.pt"), str(tmp / ckpt_io.TRAINER_STATE), str(tmp / ckpt_io.MANIFEST),
            str(tmp / "sub"), str(tmp)} <= synced
    assert ("fsync", str(m.root)) in events[rename:]       # the rename itself made durable


@pytest.mark.slow
def test_resume_falls_back_past_a_truncated_checkpoint_file(tmp_path):
    """A 6-step run (checkpoints 3 and 6) whose step-6 scheduler state is cut short: `--resume auto`
    says so, resumes from step 3 and finishes; every step logged once. A cut-short last line of
    metrics.jsonl does not stop it either."""
    _toy(tmp_path)
    (tmp_path / "checkpoints" / "step_00000006" / "scheduler.pt").write_bytes(b"\x80")
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')
    proc = _toy(tmp_path, "train.max_steps=7", "--resume", "auto")
    assert "scheduler.pt has 1 bytes" in proc.stderr and "step_00000003' instead" in proc.stderr, proc.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        [1, 2, 3, 4, 5, 6, 7]
    assert CheckpointManager(tmp_path).latest().name == "step_00000007"
