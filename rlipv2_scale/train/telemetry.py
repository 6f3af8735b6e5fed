"""Run telemetry: `metrics.jsonl`, wandb, a progress bar, throughput, memory, FLOPs and MFU.

Only rank 0 writes. Loss terms are averaged over the steps of a logging window and over ranks
by the trainer before they arrive here. On resume, records after the resumed step are dropped
from `metrics.jsonl`, so that no step appears twice.
"""
from __future__ import annotations

import json
import resource
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from rlipv2_scale.errors import UserError

if TYPE_CHECKING:
    import wandb

# Dense bf16 tensor-core peaks (TFLOP/s) for MFU, matched against the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "V100": 125.0}


def peak_resident_bytes() -> int:
    """This process's peak resident memory since it started (its own program, not its launcher's).

    Linux's `ru_maxrss` carries the launching process's resident size over `exec` (a rank started
    by a 1 GiB parent reports at least 1 GiB), so the address space's own high-water mark,
    `VmHWM` in /proc/self/status, is read where it exists."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024          # kB
    except OSError:
        pass
    # Elsewhere ru_maxrss: KiB on Linux-likes, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_resident_bytes()


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class FlopMeter:
    """`with FlopMeter():` counts the FLOPs of everything run inside, forward and backward (torch's
    FLOP counter); `.flops` afterwards. Disabled (`FlopMeter(False)`) it measures nothing: None."""

    def __init__(self, enabled: bool = True):
        from torch.utils.flop_counter import FlopCounterMode

        self.counter = FlopCounterMode(display=False) if enabled else None
        self.flops: int | None = None

    def __enter__(self) -> "FlopMeter":
        if self.counter is not None:
            self.counter.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.counter is not None:
            self.counter.__exit__(*exc)
            self.flops = int(self.counter.get_total_flops())


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of everything `fn` runs (forward and backward)."""
    with FlopMeter() as meter:
        fn()
    assert meter.flops is not None
    return meter.flops


def prune_metrics(path: Path, last_step: int) -> None:
    """Drop records of steps after `last_step` (they are redone after a resume), and a last line cut
    short by a kill mid-write (with a warning); any other line that is not JSON is an error."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number < len(lines):
                raise UserError(f"'{path}' line {number} is not a JSON record: repair or delete that line, "
                                f"then resume") from None
            print(f"rlipv2: warning: '{path}': dropping its last line, cut short when the run was killed "
                  f"({line[:60]!r})", file=sys.stderr, flush=True)
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


class Telemetry:
    """Rank-0 sink for per-step records: JSONL, wandb, progress bar."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int, progress: bool,
                 wandb_cfg: dict | None, wandb_id: str | None, config: dict):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.bar = None
        self.wandb: wandb.Run | None = None
        self.wandb_id = wandb_id
        if not enabled:
            return
        prune_metrics(self.path, start_step)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)
        if wandb_cfg is not None:
            self._start_wandb(run_dir, wandb_cfg, config)

    def _start_wandb(self, run_dir: Path, cfg: dict, config: dict) -> None:
        import wandb

        if self.wandb_id is None:
            self.wandb_id = secrets.token_hex(4)   # not from `random`: the training RNG stays untouched
        # The same id (kept in every checkpoint) continues the same wandb run after a resume.
        self.wandb = wandb.init(project=cfg["project"], entity=cfg.get("entity"), name=run_dir.name,
                                id=self.wandb_id, resume="allow", mode=cfg["mode"], dir=str(run_dir),
                                config=config)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", ips=f"{record['images_per_s']:.1f}", refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


class Window:
    """Accumulates the loss terms and timings of the steps between two log records."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.images = 0
        self.data_time = 0.0
        self.start = time.perf_counter()

    def add(self, losses: dict[str, float], images: int) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.images += images

    def means(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.sums.items()}
