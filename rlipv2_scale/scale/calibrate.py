"""Machine constants of the cost model, measured once on the machine that trains.

The cost model (`rlipv2_scale.scale.cost`) turns a model's measured FLOPs, bytes and tensor counts
into step time and memory; these probes give it the machine's rates, each measured on a workload
of its own (never on the run being predicted):

- collective latency and bandwidth: a 2-process ping of the backend (gloo on CPU, NCCL on GPUs):
  a 4-byte all-reduce (latency) and a 64 MiB one (bandwidth per rank, ring all-reduce);
- the optimiser: torch AdamW with gradient clipping, timed on a few large tensors, many small ones
  and a few small ones, which separates its cost per parameter, per tensor and per step;
- DeepSpeed's own work per ZeRO stage beyond that (flattening gradients into buckets, copies
  between the fp32 partition and the model's weights, ZeRO-3's per-module fetch and release
  hooks): the same three synthetic models trained through `deepspeed.initialize` with the trainer's
  DeepSpeed configuration on one rank, minus the plain step: a cost per parameter, one per tensor
  (per module under ZeRO-3) and one per step; the large one (`--probe-params`, near the size of
  the models planned for) again on 2 ranks at once, whose extra time per byte DeepSpeed
  communicates is the stage's effective collective cost (its own copies, the backend, and the
  ranks slowing each other's memory-bound work);
- on GPUs, the memory the framework adds: cuBLAS workspaces and the optimizer step's temporaries;
- the process's memory besides the model (interpreter, torch, DeepSpeed, Accelerate, the data
  loader): the peak resident memory of a process that imports the trainer and does nothing else.

The model's own compute rate (FLOP/s of its forward, loss and backward) is measured by
`rlipv2_scale.scale.measure.time_forward_backward` on the model itself: it depends on the mix of
operations (convolutions, attention, small ops) as much as on the machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rlipv2_scale.config import from_dict
from rlipv2_scale.errors import ConfigError, UserError
from rlipv2_scale.scale.measure import device_sync

ZERO_STAGES = (0, 1, 2, 3)


@dataclass
class MachineConstants:
    device: str                                  # "cpu" or a GPU's name
    threads: int                                 # torch threads per rank during the probes
    collective_latency_s: float = 0.0            # one small collective between 2 ranks
    collective_bytes_per_s: float = 0.0          # bytes one rank sends per second in a large all-reduce (0: not measured)
    adam_s_per_param: float = 0.0                # AdamW + clipping, per trainable parameter
    adam_s_per_tensor: float = 0.0               # ... per trainable tensor (dispatch, Python)
    adam_s_per_step: float = 0.0                 # ... once per step
    # DeepSpeed's work beyond the plain optimiser step, per ZeRO stage: [per parameter, per tensor
    # (per module under ZeRO-3), per step], on one rank.
    deepspeed_s: dict[str, list[float]] = field(default_factory=dict)
    # Per ZeRO stage, seconds per byte of `cost.deepspeed_comm_bytes` that 2 ranks add to the step
    # beyond their partitioned local work: DeepSpeed's collectives as it issues them (its copies
    # into and out of buckets, the backend) and the ranks slowing each other's memory-bound work.
    deepspeed_comm_s_per_byte: dict[str, float] = field(default_factory=dict)
    baseline_bytes: float = 0.0                  # resident memory of a trainer process without a model
    # GPUs: what the framework holds or allocates besides the model's tensors (0 on CPU, where the
    # process baseline covers it): the math libraries' persistent workspaces, and the optimizer
    # step's temporaries per trainable parameter (torch's multi-tensor AdamW works on every tensor
    # at once; on CPU it goes tensor by tensor).
    device_workspace_bytes: float = 0.0
    optimizer_temp_bytes_per_param: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def load_constants(path: str | os.PathLike) -> MachineConstants:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"machine constants '{path}' do not exist: measure them with `rlipv2 scale calibrate`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"'{path}' is not a machine-constants file of `rlipv2 scale calibrate`: {exc}") from exc
    except OSError as exc:
        raise UserError(f"cannot read machine constants '{path}': {exc}") from exc
    # The project's one strict loader: unknown keys and wrong types are errors naming the key.
    try:
        return from_dict(MachineConstants, data)
    except ConfigError as exc:
        raise UserError(f"machine constants '{path}': {exc}; measure them again with `rlipv2 scale calibrate`, "
                        f"or fix the file") from None


def check_out(path: str | os.PathLike) -> Path:
    """Where `save` will write, checked before minutes of measuring: not a folder, not under a file,
    and not a file of the user's (only an earlier machine-constants file is replaced)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--out '{path}' is a folder: give a file name for the constants, e.g. {path / 'machine.json'}")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--out '{path}': '{parent}' is a file, not a folder; choose another --out")
    if path.exists():
        try:
            load_constants(path)
        except UserError:
            raise UserError(f"--out '{path}' exists and is not a machine-constants file of `rlipv2 scale calibrate`: "
                            f"choose another --out (it is not overwritten)") from None
    return path


def best_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 2, sync: Callable[[], None] = lambda: None) -> float:
    """Fastest of `repeat` timed calls after `warmup` (timeit's convention: on a shared machine the
    least disturbed call estimates the undisturbed cost)."""
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def fit_costs(rows: list[tuple[float, float, float]]) -> list[float]:
    """[per parameter, per item, per step] ≥ 0 from (parameters, items, seconds) of the probe
    workloads: non-negative least squares (a cost is never negative; noise on a shared machine can
    push an unconstrained fit below 0). Three workloads that differ in both counts pin all three."""
    import numpy as np
    from scipy.optimize import nnls

    a = np.array([[p, n, 1.0] for p, n, _ in rows])
    b = np.array([t for _, _, t in rows])
    scale = np.abs(a).max(axis=0)            # columns of very different magnitudes: solve in units
    x, _ = nnls(a / scale, b)
    return [float(v) for v in x / scale]


# ------------------------------------------------------------------------------------------ probe models
PROBES = ("large", "small", "few")
# Parameters of the large probe. Per-parameter costs grow with the size of the buffers swept (on a
# CPU, a plain training step of the probe — forward, backward, AdamW — cost 4.6 ns per parameter at
# 25 M parameters, 8.7 ns at 134 M): probe near the size of the flat partitions DeepSpeed builds for
# RLIPv2 (200-400 M parameters).
LARGE_PROBE_PARAMS = 100_000_000


def _large_width(large_params: int) -> int:
    return max(64, int(round((large_params / 6) ** 0.5 / 64)) * 64)


def probe_model(name: str, large_params: int = LARGE_PROBE_PARAMS) -> torch.nn.Module:
    """A few large tensors ("large": six square layers of about `large_params` in all), many small
    ones ("small") and a few small ones ("few"): the workloads that separate the costs per
    parameter, per tensor (or module) and per step."""
    torch.manual_seed(0)
    width, count = {"large": (_large_width(large_params), 6), "small": (8, 160), "few": (8, 20)}[name]
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(count)])


def _probe_input(name: str, device: torch.device, large_params: int = LARGE_PROBE_PARAMS) -> torch.Tensor:
    return torch.randn(4, _large_width(large_params) if name == "large" else 8, device=device)


def _counts(model: torch.nn.Module) -> tuple[int, int, int]:
    params = [p for p in model.parameters() if p.requires_grad]
    modules = sum(1 for m in model.modules() if any(True for _ in m.parameters(recurse=False)))
    return sum(p.numel() for p in params), len(params), modules


def optimizer_probe(device: torch.device, repeat: int = 5,
                    large_params: int = LARGE_PROBE_PARAMS) -> tuple[list[float], dict, float]:
    """AdamW + clipping: seconds [per parameter, per tensor, per step], the probe times, and on a GPU
    the bytes per parameter the step allocates beyond weights, gradients and moments."""
    times, temp_per_param = {}, 0.0
    sync = device_sync(device)
    for name in PROBES:
        model = probe_model(name, large_params).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
        model(_probe_input(name, device, large_params)).sum().backward()

        def step() -> None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()

        times[name] = (*_counts(model)[:2], best_time(step, repeat, sync=sync))
        if device.type == "cuda" and name == "large":      # the moments exist now: only temporaries remain
            torch.cuda.reset_peak_memory_stats(device)
            held = torch.cuda.memory_allocated(device)
            step()
            sync()
            temp_per_param = (torch.cuda.max_memory_allocated(device) - held) / times[name][0]
    return fit_costs(list(times.values())), {k: v[2] for k, v in times.items()}, temp_per_param


def workspace_probe(device: torch.device) -> float:
    """Bytes the math libraries keep allocated on `device` after a matrix product's forward and
    backward (cuBLAS / cuBLASLt workspaces, through the framework's allocator)."""
    if device.type != "cuda":
        return 0.0
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:            # earlier products in this process already made them
        clear()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    a = torch.randn(256, 256, device=device, requires_grad=True)
    (a @ a).sum().backward()
    del a
    torch.cuda.synchronize(device)
    return float(torch.cuda.memory_allocated(device) - before)


# ------------------------------------------------------------------------------------------ subprocesses
def _spawn(target: str, world: int, payload: dict, timeout: float = 600) -> list[dict]:
    """Run `python -m rlipv2_scale.scale.calibrate TARGET` on `world` local ranks (a process group of
    their own through a file store); returns each rank's JSON answer."""
    with tempfile.TemporaryDirectory(prefix="rlipv2_calibrate_") as tmp:
        procs = []
        for rank in range(world):
            env = {**os.environ, "RLIPV2_CAL_RANK": str(rank), "RLIPV2_CAL_WORLD": str(world),
                   "RLIPV2_CAL_STORE": str(Path(tmp) / "store"), "RLIPV2_CAL_OUT": str(Path(tmp) / f"{rank}.json"),
                   "RLIPV2_CAL_PAYLOAD": json.dumps(payload)}
            procs.append(subprocess.Popen([sys.executable, "-m", "rlipv2_scale.scale.calibrate", target], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise UserError(f"calibration probe '{target}' did not finish in {timeout:.0f} s")
            outs.append(out)
        if any(p.returncode for p in procs):
            raise UserError(f"calibration probe '{target}' failed:\n" + "\n".join(o[-2000:] for o in outs))
        return [json.loads((Path(tmp) / f"{r}.json").read_text()) for r in range(world)]


def _init_group(backend: str) -> tuple[int, int]:
    import torch.distributed as dist

    rank, world = int(os.environ["RLIPV2_CAL_RANK"]), int(os.environ["RLIPV2_CAL_WORLD"])
    dist.init_process_group(backend, init_method=f"file://{os.environ['RLIPV2_CAL_STORE']}", rank=rank,
                            world_size=world)
    return rank, world


def _collectives_worker(payload: dict) -> dict:
    import torch.distributed as dist

    device = torch.device(payload["device"])
    rank, world = _init_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    sync = device_sync(device)
    small = torch.ones(1, device=device)
    large = torch.ones(payload["nbytes"] // 4, device=device)
    res = {"latency_s": best_time(lambda: [dist.all_reduce(small) for _ in range(20)], repeat=5, sync=sync) / 20,
           "large_s": best_time(lambda: dist.all_reduce(large), repeat=5, sync=sync)}
    dist.destroy_process_group()
    return res


def _deepspeed_worker(payload: dict) -> dict:
    """Per ZeRO stage: the time of a DeepSpeed step and of the plain one, for each probe model, on
    this process's rank of `RLIPV2_CAL_WORLD` (the ranks step together)."""
    rank, world = os.environ.get("RLIPV2_CAL_RANK", "0"), int(os.environ.get("RLIPV2_CAL_WORLD", "1"))
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(payload["port"]), "RANK": rank,
                       "WORLD_SIZE": str(world), "LOCAL_RANK": rank})
    import deepspeed

    from rlipv2_scale.train.config import TrainConfig
    from rlipv2_scale.train.launch import deepspeed_config

    trainer = TrainConfig()        # the trainer's DeepSpeed settings where a probe has no reason to differ

    device = torch.device(payload["device"])
    sync = device_sync(device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    out: dict = {"counts": {}, "plain": {}, "deepspeed": {}}
    large = payload.get("large_params", LARGE_PROBE_PARAMS)
    for name in payload.get("probes", PROBES):
        model = probe_model(name, large).to(device)
        out["counts"][name] = _counts(model)
        x = _probe_input(name, device, large)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)

        def plain() -> None:
            model(x).sum().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
            opt.zero_grad(set_to_none=True)

        if world == 1:             # on 2 ranks only the DeepSpeed steps are compared
            out["plain"][name] = best_time(plain, payload["repeat"], sync=sync)
        for stage in payload["stages"]:
            cfg = deepspeed_config(micro_batch_size=4, grad_accum=1, world_size=world, zero_stage=stage, bf16=False,
                                   grad_clip=trainer.grad_clip, zero3_persistence_threshold=0,
                                   reduce_bucket_size=trainer.reduce_bucket_size,
                                   allgather_bucket_size=trainer.allgather_bucket_size)
            m = probe_model(name, large).to(device)
            engine, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.AdamW(m.parameters(), lr=1e-4,
                                                                                  weight_decay=1e-4), config=cfg)

            def ds_step() -> None:
                loss = engine(x).sum()
                engine.backward(loss)
                engine.step()

            out["deepspeed"][f"{name}/{stage}"] = best_time(ds_step, payload["repeat"], warmup=3, sync=sync)
            engine.destroy()
    import torch.distributed as dist

    # Ranks leave together and close the group: a rank exiting with gloo's threads still running
    # aborts ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
    return out


def _baseline_worker(payload: dict) -> dict:
    # What every trainer process imports besides the model it builds.
    import accelerate  # noqa: F401
    import transformers  # noqa: F401

    try:
        import deepspeed  # noqa: F401
    except ImportError:
        pass
    try:
        from rlipv2_scale.data import streaming  # noqa: F401
    except ImportError:
        pass
    from rlipv2_scale.models import rlipv2  # noqa: F401
    from rlipv2_scale.models.losses import SetCriterion  # noqa: F401
    from rlipv2_scale.train import launch  # noqa: F401
    from rlipv2_scale.train.telemetry import peak_resident_bytes

    return {"maxrss_bytes": peak_resident_bytes()}


def _forward_backward_worker(payload: dict) -> dict:
    """The model of a recipe: forward, set criterion and backward on a synthetic micro-batch, timed
    on every rank at once (ranks that share a host slow each other down)."""
    from rlipv2_scale.models.build import build_model
    from rlipv2_scale.models.losses import SetCriterion
    from rlipv2_scale.scale.measure import calibration_step, time_forward_backward
    from rlipv2_scale.train.config import load_run_config

    world = int(os.environ["RLIPV2_CAL_WORLD"])
    if world > 1:
        import torch.distributed as dist

        _init_group("gloo")
    cfg = load_run_config(payload["recipe"], payload["overrides"])
    device = torch.device(payload["device"])
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False).to(device).train()
    step = calibration_step(model, SetCriterion(cfg.loss).to(device), payload["batch"], payload["height"],
                            payload["width"], cfg.data.num_obj_labels, cfg.data.num_rel_labels, device,
                            payload.get("texts"))
    if world > 1:
        dist.barrier()       # time the ranks together
    seconds = time_forward_backward(step, model, repeat=payload["repeat"])
    if world > 1:
        dist.destroy_process_group()
    optimizer = None
    if payload.get("optimizer") and world == 1:
        optimizer = model_optimizer_seconds(model, step, payload["repeat"])
    data = None
    if payload.get("data") and world == 1:
        from dataclasses import replace

        from rlipv2_scale.data.streaming import build_train_loader

        # Another job's live segments look like stale ones: this probe never cleans shared memory.
        loader = build_train_loader(replace(cfg.data, clean_shared_memory=False))
        batches = iter(loader)
        next(batches)
        data = best_time(lambda: next(batches), repeat=payload["repeat"] + 2, warmup=0)
    return {"seconds": seconds, "data_s": data, "optimizer_s": optimizer}


def model_optimizer_seconds(model: torch.nn.Module, step: Callable[[], torch.Tensor], repeat: int = 3) -> float:
    """Fastest AdamW + clipping step over `model`'s own trainable tensors (gradients from one
    `step()`): where the optimizer runs tensor by tensor (plain PyTorch, ZeRO-0), its cost depends
    on the model's tensor sizes as much as on their total, which the probes' rates miss."""
    model.zero_grad(set_to_none=True)
    step().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    device = params[0].device
    sync = device_sync(device)

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()

    seconds = best_time(update, repeat, warmup=1, sync=sync)
    model.zero_grad(set_to_none=True)
    return seconds


def forward_backward_seconds(recipe: str | os.PathLike, overrides: list[str], batch: int, height: int, width: int,
                             ranks: int = 1, device: str = "cpu", repeat: int = 3,
                             texts: tuple[list[str], list[str]] | None = None,
                             data: bool = False, optimizer: bool = False) -> tuple[float, float | None, float | None]:
    """Seconds of the recipe model's forward + loss + backward on one rank while `ranks` ranks run
    it at once on this host (the slowest rank's fastest pass); with `data` (one rank only) the
    seconds the recipe's training loader takes to produce a batch, and with `optimizer` (one rank
    only) those of an AdamW + clipping step over the model (`model_optimizer_seconds`)."""
    answers = _spawn("forward_backward", ranks, {"recipe": str(recipe), "overrides": overrides, "batch": batch,
                                                 "height": height, "width": width, "device": device,
                                                 "repeat": repeat, "texts": texts, "data": data,
                                                 "optimizer": optimizer})
    return max(a["seconds"] for a in answers), answers[0]["data_s"], answers[0]["optimizer_s"]


WORKERS = {"collectives": _collectives_worker, "deepspeed": _deepspeed_worker, "baseline": _baseline_worker,
           "forward_backward": _forward_backward_worker}


# ------------------------------------------------------------------------------------------ the measurement
def calibrate(device: str = "cpu", threads: int = 1, deepspeed: bool = True, collectives: bool = True,
              repeat: int = 5, log: Callable[[str], None] = lambda s: None,
              large_params: int = LARGE_PROBE_PARAMS) -> MachineConstants:
    """Every probe above; `deepspeed=False` where DeepSpeed is not installed (its costs stay 0)."""
    from rlipv2_scale.train.launch import free_port

    torch.set_num_threads(threads)
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    c = MachineConstants(device=name, threads=threads)
    if collectives and dev.type == "cuda" and torch.cuda.device_count() < 2:
        collectives = False
        c.notes.append("one GPU: collective latency and bandwidth not measured")
    if collectives:
        nbytes = 64 * 2 ** 20          # beyond the caches, as DeepSpeed's buckets are
        ranks = _spawn("collectives", 2, {"device": device, "nbytes": nbytes})
        c.collective_latency_s = max(r["latency_s"] for r in ranks)
        large = max(r["large_s"] for r in ranks) - c.collective_latency_s
        c.collective_bytes_per_s = nbytes * 2 * (2 - 1) / 2 / max(large, 1e-9)   # a ring all-reduce sends 2(N−1)/N
        log(f"collectives: {1e6 * c.collective_latency_s:.0f} µs latency, "
            f"{c.collective_bytes_per_s / 1e9:.2f} GB/s per rank")
    c.device_workspace_bytes = workspace_probe(dev)
    (c.adam_s_per_param, c.adam_s_per_tensor, c.adam_s_per_step), _, c.optimizer_temp_bytes_per_param = \
        optimizer_probe(dev, repeat, large_params)
    log(f"AdamW + clipping: {1e9 * c.adam_s_per_param:.2f} ns per parameter, {1e6 * c.adam_s_per_tensor:.1f} µs "
        f"per tensor, {1e3 * c.adam_s_per_step:.2f} ms per step")
    if dev.type == "cuda":
        log(f"device memory besides the model: {c.device_workspace_bytes / 2 ** 20:.0f} MiB of library workspaces, "
            f"{c.optimizer_temp_bytes_per_param:.1f} bytes per parameter of optimizer temporaries")
    if deepspeed:
        ds = _spawn("deepspeed", 1, {"device": device, "stages": list(ZERO_STAGES), "repeat": repeat,
                                     "port": free_port(), "large_params": large_params})[0]
        for stage in ZERO_STAGES:
            rows = []
            for probe in PROBES:
                params, tensors, modules = ds["counts"][probe]
                extra = ds["deepspeed"][f"{probe}/{stage}"] - ds["plain"][probe]
                rows.append((params, modules if stage == 3 else tensors, extra))
            c.deepspeed_s[str(stage)] = fit_costs(rows)
            unit = "module" if stage == 3 else "tensor"
            per_param, per_item, per_step = c.deepspeed_s[str(stage)]
            log(f"DeepSpeed ZeRO-{stage} beyond the plain step: {1e9 * per_param:.2f} ns per parameter, "
                f"{1e6 * per_item:.1f} µs per {unit}, {1e3 * per_step:.2f} ms per step")
        if collectives:
            _deepspeed_two_ranks(c, ds, device, repeat, large_params, log)
    else:
        c.notes.append("DeepSpeed not measured: its per-stage costs are 0 (plain PyTorch data parallelism)")
    c.baseline_bytes = float(_spawn("baseline", 1, {})[0]["maxrss_bytes"]) if dev.type == "cpu" else 0.0
    if dev.type == "cpu":
        log(f"process memory without a model: {c.baseline_bytes / 2 ** 30:.2f} GiB")
    return c


def _deepspeed_two_ranks(c: MachineConstants, one: dict, device: str, repeat: int, large_params: int,
                         log: Callable[[str], None]) -> None:
    """The large probe under each ZeRO stage on 2 ranks at once: what the step takes beyond the
    1-rank step with the partition's savings (as `cost.step_time` charges them), per byte that
    DeepSpeed communicates (`cost.deepspeed_comm_bytes`)."""
    from rlipv2_scale.scale.cost import ModelCost, deepspeed_comm_bytes, step_time
    from rlipv2_scale.train.launch import free_port

    two = _spawn("deepspeed", 2, {"device": device, "stages": list(ZERO_STAGES), "repeat": max(2, repeat - 2),
                                  "port": free_port(), "large_params": large_params, "probes": ["large"]})
    params, tensors, modules = one["counts"]["large"]
    probe = ModelCost(params=params, trainable_params=params, flops_per_image=0.0, activation_bytes_per_image=0.0,
                      precision="fp32", tensors=tensors, modules=modules)
    for stage in ZERO_STAGES:
        measured = max(r["deepspeed"][f"large/{stage}"] for r in two)
        local = {n: step_time(probe, c, stage, n, 1, 0.0, communication=False)["total"] for n in (1, 2)}
        extra = max(measured - (one["deepspeed"][f"large/{stage}"] - local[1] + local[2]), 0.0)
        nbytes = deepspeed_comm_bytes(probe, stage, 2)
        c.deepspeed_comm_s_per_byte[str(stage)] = extra / nbytes
        log(f"DeepSpeed ZeRO-{stage} on 2 ranks: {measured:.3f} s a step, {extra:.3f} s beyond the partitioned "
            f"local work: {nbytes / max(extra, 1e-12) / 1e9:.2f} GB/s effective per rank")


def _main() -> None:
    payload = json.loads(os.environ["RLIPV2_CAL_PAYLOAD"])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = WORKERS[sys.argv[1]](payload)
    Path(os.environ["RLIPV2_CAL_OUT"]).write_text(json.dumps(result))


if __name__ == "__main__":
    _main()
