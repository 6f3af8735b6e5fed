"""Process-group setup for the trainer, and `--nproc N` local launches through torchrun.

The trainer runs the same way in one process, under torchrun (local or multi-node) and under
SLURM (one torchrun per node): it reads RANK / WORLD_SIZE / LOCAL_RANK from the environment,
creating a one-process group when they are absent. On CPU it selects DeepSpeed's CPU accelerator
and gloo. Accelerate derives its world size from its own backend detection, which finds no
backend on a CPU-only machine under DeepSpeed and reports one process; it is told the backend of
the existing process group (its public `InitProcessGroupKwargs`), so it reads ranks from
`torch.distributed`, and the result is asserted, so that ranks, data sharding and ZeRO
partitioning are real. The same holds under `accelerate launch`, which starts ranks as torchrun does.

`spawn_local` holds the run directory's lock for its ranks, ties torchrun and the ranks to its own
life, and turns a user error of the ranks into one line of its own (no torchrun report).
"""
from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rlipv2_scale.errors import ConfigError, UserError

PREEMPTED_MARKER = "PREEMPTED"
COMPLETED_MARKER = "COMPLETED"
# EX_TEMPFAIL: checkpointed on a preemption signal; run again (requeue) to continue.
EXIT_PREEMPTED = 75


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Create (or join) the process group: nccl on GPU, gloo on CPU."""
    import torch.distributed as dist

    # DeepSpeed calls these collectives every step; torch's rename notice would flood the log.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    cuda = torch.cuda.is_available()
    if not cuda:
        # Read once, at DeepSpeed's first accelerator lookup: set before anything asks for it.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:   # a plain `rlipv2 train`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != int(os.environ["WORLD_SIZE"]) or rank != int(os.environ["RANK"]):
        raise RuntimeError(f"process group says rank {rank}/{world}, environment says "
                           f"{os.environ['RANK']}/{os.environ['WORLD_SIZE']}")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def build_accelerator(ds_config: dict, info: DistInfo):
    """An `Accelerator` with a DeepSpeed plugin whose process layout matches `torch.distributed`."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    _refuse_launcher_settings()
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    # The group exists already: naming its backend makes Accelerate take ranks from it (on CPU its
    # own detection finds no backend). mixed_precision="no": the DeepSpeed config decides, not an
    # ACCELERATE_MIXED_PRECISION that `accelerate launch` may export.
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config), mixed_precision="no",
                              kwargs_handlers=[InitProcessGroupKwargs(backend=torch.distributed.get_backend())])
    assert accelerator.num_processes == info.world_size and accelerator.process_index == info.rank, (
        f"Accelerate sees process {accelerator.process_index}/{accelerator.num_processes}, torch.distributed "
        f"{info.rank}/{info.world_size}")
    return accelerator


# What `accelerate launch` flags (or an accelerate config file) export, and the recipe key that decides it here.
_LAUNCHER_SETTINGS = {
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": ("--zero_stage", "train.zero_stage"),
    "ACCELERATE_DEEPSPEED_CONFIG_FILE": ("--deepspeed_config_file", "train.deepspeed"),
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": ("--offload_optimizer_device", "train.deepspeed"),
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": ("--offload_param_device", "train.deepspeed"),
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": ("--gradient_accumulation_steps", "train.grad_accum"),
    "ACCELERATE_GRADIENT_CLIPPING": ("--gradient_clipping", "train.grad_clip"),
}


def _refuse_launcher_settings() -> None:
    """`accelerate launch` starts the ranks; training settings it would pass come from the recipe,
    so one given to the launcher is an error rather than silently ignored."""
    given = [(flag, key) for var, (flag, key) in _LAUNCHER_SETTINGS.items() if os.environ.get(var)]
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        given.append(("--mixed_precision", "train.precision"))
    if given:
        raise UserError(f"accelerate launch {', '.join(f for f, _ in given)}: the recipe decides this here; drop "
                        f"them (and from the accelerate config) and set {', '.join(dict.fromkeys(k for _, k in given))}")
    if os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true":
        raise UserError("accelerate launch --cpu turns DeepSpeed off; on CPU launch with "
                        "`accelerate launch --multi_gpu --num_processes N` (the ranks use gloo)")


def deepspeed_config(*, micro_batch_size: int, grad_accum: int, world_size: int, zero_stage: int, bf16: bool,
                     grad_clip: float, zero3_persistence_threshold: int, reduce_bucket_size: int,
                     allgather_bucket_size: int, fp16: bool = False) -> dict:
    zero: dict = {"stage": zero_stage, "reduce_bucket_size": int(reduce_bucket_size),
                  "allgather_bucket_size": int(allgather_bucket_size)}
    if zero_stage == 3:
        # Parameters below this size stay whole on every rank; the default (1e5) would leave a
        # small model entirely unpartitioned.
        zero["stage3_param_persistence_threshold"] = zero3_persistence_threshold
    return {
        # The streaming loader is not prepared by Accelerate, so it cannot infer these.
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # Dynamic loss scaling (DeepSpeed's default loss_scale 0): an overflowing step is skipped
        # and the scale lowered; train.deepspeed.fp16.* tunes it.
        "fp16": {"enabled": fp16},
        "zero_allow_untested_optimizer": True,   # torch AdamW as the client optimizer
        # ... also when ZeRO offloads it to the CPU (train.deepspeed.zero_optimization.offload_optimizer).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


# Set by `spawn_local` for its ranks: where each rank reports a UserError, for the launcher to print once.
ERRORS_ENV = "RLIPV2_ERROR_DIR"


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux; elsewhere nothing).

    torchrun starts each rank in a session of its own, so a SIGKILL to the launcher's process group
    would leave the ranks training; a rank calls this first thing, so it dies with its torchrun."""
    prctl = _prctl()
    if prctl is None:
        return
    parent = os.getppid()
    prctl(1, int(sig), 0, 0, 0)   # PR_SET_PDEATHSIG
    if os.getppid() != parent:    # the parent died before the request: nobody will send it
        os.kill(os.getpid(), sig)


@functools.cache
def _prctl():
    # Looked up once, before any fork: a child of a threaded process should not load libraries.
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def report_to_launcher(message: str, rank: int) -> bool:
    """Under `spawn_local`: leave this rank's user error for the launcher (which prints one line
    for all ranks) and return True; elsewhere return False (print it as usual)."""
    errors = os.environ.get(ERRORS_ENV)
    if not errors:
        return False
    Path(errors, f"rank{rank:05d}").write_text(message)
    return True


def torchrun_main() -> None:
    """torchrun, without its ChildFailedError report when the ranks ended as planned: a user error
    they left for the launcher, or a preemption checkpoint (every rank EXIT_PREEMPTED)."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # Its "failed (exitcode: N)" line: the ChildFailedError below says the same when it is raised.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(parse_args(sys.argv[1:]))
    except ChildFailedError as exc:
        codes = {f.exitcode for f in exc.failures.values()}
        if not (any(Path(os.environ[ERRORS_ENV]).iterdir()) or codes == {EXIT_PREEMPTED}):
            raise
        sys.exit(max(codes))


def spawn_local(nproc: int, argv: list[str], run_dir: Path, entry: tuple[str, ...] = ("-m", "rlipv2_scale.cli")) -> int:
    """Run `rlipv2 <argv>` (or another `entry` script) on `nproc` local ranks through torchrun;
    return the run's exit code (EXIT_PREEMPTED when it checkpointed on a signal, which torchrun
    itself cannot pass on). A user error of the ranks is raised once, as the launcher's."""
    from rlipv2_scale.errors import UserError
    from rlipv2_scale.train.runlock import HELD_ENV, RunLock

    cmd = [sys.executable, "-c", "from rlipv2_scale.train.launch import torchrun_main; torchrun_main()",
           "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           *entry, *argv]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    _prctl()   # here, not in the forked child

    def child_setup() -> None:
        # torchrun dies on SIGUSR1 (see `forward`), and with this launcher however it dies.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        die_with_parent()

    with RunLock(run_dir), tempfile.TemporaryDirectory(prefix="rlipv2-errors-") as errors:
        # A marker of an earlier run would make this one look preempted: the ranks write it anew.
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        env.update({HELD_ENV: "1", ERRORS_ENV: errors})
        rc = _run_torchrun(cmd, env, child_setup)
        reports = sorted(Path(errors).iterdir())
        if reports:   # the lowest rank's: the others usually say the same
            raise UserError(reports[0].read_text())
    if (run_dir / PREEMPTED_MARKER).is_file():
        return EXIT_PREEMPTED
    return rc


def _run_torchrun(cmd: list[str], env: dict, child_setup: Callable[[], None]) -> int:
    # torchrun dies on SIGUSR1 and kills its workers shortly after a SIGTERM (and starts them in
    # sessions of their own): it ignores SIGUSR1, and a SIGTERM or SIGUSR1 that reaches us becomes
    # a SIGUSR1 to each rank, which checkpoints at the next step boundary and exits.
    proc = subprocess.Popen(cmd, env=env, preexec_fn=child_setup)

    def forward(signum, frame):
        import psutil  # a dependency of accelerate

        # The ranks only: their data-loader workers would die of a SIGUSR1.
        for child in psutil.Process(proc.pid).children(recursive=False):
            try:
                child.send_signal(signal.SIGUSR1)
            except psutil.NoSuchProcess:
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# DeepSpeed settings the trainer derives from the recipe, and the recipe key to change instead.
_RECIPE_OWNED = {
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "data.batch_size (x train.grad_accum x ranks)",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "zero_optimization.reduce_bucket_size": "train.reduce_bucket_size",
    "zero_optimization.allgather_bucket_size": "train.allgather_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold": "train.zero3_persistence_threshold",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "optimizer": "optim.* (the trainer's AdamW with per-group lrs)",
    "scheduler": "optim.schedule",
    "zero_allow_untested_optimizer": "optim.* (the trainer's AdamW is DeepSpeed's client optimizer)",
    "zero_force_ds_cpu_optimizer": "optim.* (the trainer's AdamW is DeepSpeed's client optimizer)",
}


def merge_deepspeed(generated: dict, extra: dict) -> dict:
    """`generated` with the recipe's `train.deepspeed` mapping merged in (nested mappings merge key
    by key). Setting what the recipe already decides, or a key DeepSpeed does not know, is a
    `ConfigError` naming the key and what to set instead."""
    def merge(base: dict, update: dict, prefix: str) -> dict:
        out = dict(base)
        for key, value in update.items():
            path = prefix + str(key)
            if path in _RECIPE_OWNED:
                if base.get(key, None) != value:
                    raise ConfigError(f"train.deepspeed.{path}={value!r} conflicts with {_RECIPE_OWNED[path]}, "
                                      f"which sets it{'' if key not in base else f' to {base[key]!r}'}: "
                                      f"remove it from train.deepspeed and set {_RECIPE_OWNED[path].split()[0]}")
            elif isinstance(value, dict) and isinstance(base.get(key), dict):
                out[key] = merge(base[key], value, path + ".")
                continue
            out[key] = value
        return out

    merged = merge(generated, extra, "")
    _validate_deepspeed(merged, extra)
    return merged


class _ReadKeys(dict):
    """A config mapping that records which top-level keys DeepSpeed's parser looks up."""

    def __init__(self, data: dict):
        super().__init__(data)
        self.read: set = set()

    def get(self, key, *default):
        self.read.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)

    def keys(self):   # `KEY in config.keys()`, as DeepSpeed often writes it, goes through __contains__
        return self


# Top-level sections read by DeepSpeed outside its `DeepSpeedConfig` parser (engine, profiler, I/O).
_READ_ELSEWHERE = {"flops_profiler", "aio", "autotuning", "activation_checkpointing"}


def _validate_deepspeed(merged: dict, extra: dict) -> None:
    """DeepSpeed's own parser on the merged config: its pydantic sections reject unknown keys and
    bad values; a top-level key it never reads is unknown."""
    from deepspeed.runtime.config import DeepSpeedConfig

    # The global batch is checked against the process group's size when the engine starts.
    probe = _ReadKeys({k: v for k, v in merged.items() if k != "train_batch_size"})
    try:
        DeepSpeedConfig(probe)
    except Exception as exc:   # pydantic ValidationError, DeepSpeed's asserts and ValueErrors
        errors = getattr(exc, "errors", None)
        if callable(errors):   # pydantic: which field of which section, and why
            detail = f"{getattr(exc, 'title', '')}: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                               for e in errors())
        else:
            detail = " ".join(str(exc).split())
        raise ConfigError(f"train.deepspeed is not a valid DeepSpeed config: {detail[:400]}; see "
                          f"https://www.deepspeed.ai/docs/config-json/") from None
    unknown = sorted(str(k) for k in extra if k not in probe.read and k not in _READ_ELSEWHERE)
    if unknown:
        raise ConfigError(f"train.deepspeed: unknown DeepSpeed key(s) {unknown}; see "
                          f"https://www.deepspeed.ai/docs/config-json/ for the keys DeepSpeed reads")
