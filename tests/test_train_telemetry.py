"""Telemetry pieces: FLOP counting (hand-computed), metrics pruning on resume, window means."""
from __future__ import annotations

import json

import torch
from torch import nn

from rlipv2_scale.train.telemetry import Telemetry, Window, count_flops, prune_metrics


def test_count_flops_of_a_linear_forward_and_backward():
    layer = nn.Linear(8, 4, bias=False)
    x = torch.randn(2, 8, requires_grad=True)
    flops = count_flops(lambda: layer(x).sum().backward())
    # forward 2·B·in·out; backward: grad of input and grad of weight, the same again each
    assert flops == 3 * (2 * 2 * 8 * 4)


def test_resumed_run_drops_records_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 7)))
    prune_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    t = Telemetry(tmp_path, enabled=True, total_steps=6, start_step=2, progress=False, wandb_cfg=None,
                  wandb_id=None, config={})
    t.log({"step": 3, "loss": 1.5, "images_per_s": 2.0})
    t.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_window_means_and_reset():
    w = Window()
    w.add({"loss": 1.0, "loss_ce": 0.5}, images=4)
    w.add({"loss": 3.0, "loss_ce": 1.5}, images=4)
    assert w.means() == {"loss": 2.0, "loss_ce": 1.0} and w.images == 8 and w.steps == 2
    w.reset()
    assert w.means() == {} and w.images == 0


def test_peak_resident_memory_is_the_process_own_not_its_launchers():
    # Linux carries the launcher's resident size over exec into ru_maxrss; a rank started by a
    # large process must still report only what it used itself.
    import subprocess
    import sys

    ballast = b"\x01" * (3 << 29)          # 1.5 GiB resident in this (launching) process
    code = "from rlipv2_scale.train.telemetry import peak_resident_bytes; print(peak_resident_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert len(ballast) == 3 << 29
    assert 10 * 2 ** 20 < child < 2 ** 30
