"""A cost model for data-parallel RLIPv2 training under DDP and ZeRO-1/2/3.

Inputs are measured on the real model (FLOPs and activation bytes per image, parameter counts:
`rlipv2_scale.scale.measure`); the rest is arithmetic:

- model state per GPU (Ψ parameters; bf16 mixed precision keeps 2Ψ weights, 2Ψ gradients and
  12Ψ fp32 master weights + Adam moments; fp32 training 4Ψ + 4Ψ + 8Ψ): ZeRO-1 partitions the
  optimiser state over N ranks, ZeRO-2 also the gradients, ZeRO-3 also the weights;
- communication per step and rank (ring collectives move (N−1)/N of the buffer twice for an
  all-reduce): DDP all-reduce ≈ 2Ψ, ZeRO-1/2 reduce-scatter + all-gather ≈ 2Ψ, ZeRO-3 ≈ 3Ψ
  (weights gathered for the forward and again for the backward, gradients reduce-scattered);
- step time = compute + the part of communication that does not overlap it, plus a fixed latency
  per collective times the collectives a step issues.

Compute is charged per micro-batch, not per image: the label-text encoder runs once per batch over
the label list (`ModelCost.flops_per_step`), the image path once per image (`flops_per_image`).

`rank_memory` and `step_time` are the detailed model that `benchmarks/scale_validation.py` checks
against the real trainer: DeepSpeed's own buffers per stage (flattened weights, the fp32 master
partition, gradient buckets, ZeRO-3's gathered weights) and the machine's measured constants
(`rlipv2_scale.scale.calibrate`): collective latency and bandwidth, the optimiser's cost per
parameter and per tensor, DeepSpeed's per-stage work.

Frozen parameters (the R50 stem, Swin norms) take no gradient or optimiser state.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_tflops: float        # dense bf16 tensor-core rate (datasheet)
    memory_gib: float
    intra_node_gbps: float    # per-GPU NVLink bandwidth, GB/s one direction


GPUS = {
    "h100": GPUSpec("h100", 989.0, 80.0, 450.0),
    "h200": GPUSpec("h200", 989.0, 141.0, 450.0),
    "a100": GPUSpec("a100", 312.0, 80.0, 300.0),
    "a100-40g": GPUSpec("a100-40g", 312.0, 40.0, 300.0),
    "l40s": GPUSpec("l40s", 362.0, 48.0, 32.0),
    "v100": GPUSpec("v100", 125.0, 32.0, 150.0),
}

ZERO_STAGES = (0, 1, 2, 3)


@dataclass
class ModelCost:
    """What the model costs per image, measured on a real forward/backward."""

    params: int                   # Ψ, all parameters
    trainable_params: int
    flops_per_image: float        # forward + backward, per image of a micro-batch
    activation_bytes_per_image: float
    precision: str = "bf16"       # "bf16" (mixed) or "fp32"
    flops_per_step: float = 0.0   # once per micro-batch whatever its size (the label-text encoder)
    activation_bytes_per_step: float = 0.0
    tensors: int = 0              # trainable parameter tensors
    modules: int = 0              # modules holding parameters (ZeRO-3 gathers each)

    def flops(self, micro_batch: float) -> float:
        return self.flops_per_step + micro_batch * self.flops_per_image

    def activation_bytes(self, micro_batch: float) -> float:
        return self.activation_bytes_per_step + micro_batch * self.activation_bytes_per_image


@dataclass
class PlanAssumptions:
    gpu: GPUSpec = field(default_factory=lambda: GPUS["h100"])
    gpus_per_node: int = 8
    inter_node_gbps: float = 50.0     # per-GPU network bandwidth across nodes, GB/s (400 Gb/s IB)
    mfu: float = 0.35                 # achieved share of peak on the model's mix of ops
    overlap: float = 0.7              # share of communication hidden behind the backward
    micro_batch: int = 4
    grad_accum: int = 1
    memory_headroom_gib: float = 6.0  # CUDA context, allocator fragmentation, workspace
    collective_latency_s: float = 30e-6   # one NCCL collective (launch + synchronisation)
    # Measured constants (`rlipv2 scale calibrate` on a GPU of the kind planned for): the optimiser's
    # and DeepSpeed's own time per step, and the measured collective latency, join the projection.
    machine: Any = None
    buckets: "DeepSpeedBuckets" = field(default_factory=lambda: DeepSpeedBuckets())


def state_bytes(cost: ModelCost, stage: int, world: int) -> dict[str, float]:
    """Bytes of weights, gradients and optimiser state held by one rank."""
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage}")
    psi, trainable = cost.params, cost.trainable_params
    w_bytes, g_bytes, o_bytes = (2, 2, 12) if cost.precision == "bf16" else (4, 4, 8)
    weights = psi * w_bytes / (world if stage >= 3 else 1)
    grads = trainable * g_bytes / (world if stage >= 2 else 1)
    optim = trainable * o_bytes / (world if stage >= 1 else 1)
    return {"weights": weights, "gradients": grads, "optimizer": optim, "total": weights + grads + optim}


def comm_bytes(cost: ModelCost, stage: int, world: int) -> float:
    """Bytes sent per rank per optimiser step (ring collectives)."""
    if world <= 1:
        return 0.0
    ring = (world - 1) / world
    g = cost.trainable_params * (2 if cost.precision == "bf16" else 4)
    w = cost.params * (2 if cost.precision == "bf16" else 4)
    if stage in (0, 1, 2):
        return 2 * g * ring                     # all-reduce, or reduce-scatter + all-gather
    return (2 * w + g) * ring                   # ZeRO-3: gather weights twice, reduce-scatter gradients


def bandwidth(a: PlanAssumptions, world: int) -> float:
    """Bottleneck per-GPU bandwidth of a ring over `world` GPUs, bytes/s."""
    gbps = a.gpu.intra_node_gbps if world <= a.gpus_per_node else a.inter_node_gbps
    return gbps * 1e9


@dataclass
class PlanRow:
    gpus: int
    zero_stage: int
    state_gib: float
    activation_gib: float
    total_gib: float
    fits: bool
    max_micro_batch: int
    compute_s: float
    comm_s: float
    step_s: float
    images_per_s: float
    weak_scaling_eff: float
    strong_scaling_eff: float
    gpu_hours: float

    def as_dict(self) -> dict:
        return asdict(self)


def plan(cost: ModelCost, gpus: list[int], a: PlanAssumptions, images_per_epoch: int, epochs: int,
         global_batch: int | None = None) -> list[PlanRow]:
    """Projected memory, step time, throughput and GPU-hours for each GPU count and ZeRO stage.

    Weak scaling keeps the per-GPU micro-batch; strong scaling keeps `global_batch` fixed (default:
    the global batch at the smallest GPU count) and shrinks the per-GPU share.
    """
    rows = []
    gib = 1024 ** 3
    base_gpus = min(gpus)
    global_batch = global_batch or base_gpus * a.micro_batch * a.grad_accum
    peak = a.gpu.peak_tflops * 1e12 * (a.mfu if cost.precision == "bf16" else a.mfu / 8)
    buckets = a.buckets

    def compute_s(images: float) -> float:      # one optimizer step of `images` per GPU in micro-batches
        micro = min(a.micro_batch, images)
        return cost.flops(micro) / peak * images / micro

    for stage in ZERO_STAGES:
        base_rate = None
        base_strong_step = None
        for n in sorted(gpus):
            state = state_bytes(cost, stage, n)["total"]
            act = cost.activation_bytes(a.micro_batch)
            budget = a.gpu.memory_gib * gib - a.memory_headroom_gib * gib
            total = state + act
            free = budget - state - cost.activation_bytes_per_step
            max_mb = max(0, int(free // max(cost.activation_bytes_per_image, 1.0))) if free > 0 else 0
            compute = compute_s(a.micro_batch * a.grad_accum)
            latency = a.machine.collective_latency_s if a.machine is not None else a.collective_latency_s
            comm = (comm_bytes(cost, stage, n) / bandwidth(a, n)
                    + collectives_per_step(cost, stage, n, buckets) * latency)
            exposed = max(comm - a.overlap * compute, (1 - a.overlap) * comm)
            local = 0.0           # optimiser and DeepSpeed bookkeeping, once per optimizer step
            if a.machine is not None:
                parts = step_time(cost, a.machine, stage, n, a.micro_batch, 0.0, b=buckets, communication=False)
                local = parts["optimizer"] + parts["deepspeed"]
            step = compute + exposed + local
            rate = n * a.micro_batch * a.grad_accum / step
            base_rate = base_rate or rate / n * base_gpus
            weak = rate / (base_rate * n / base_gpus)
            per_gpu = max(global_batch / n, 1e-9)
            strong_compute = compute_s(per_gpu)
            strong_step = strong_compute + max(comm - a.overlap * strong_compute, (1 - a.overlap) * comm) + local
            base_strong_step = base_strong_step or strong_step
            strong = base_strong_step / strong_step / (n / base_gpus)
            hours = images_per_epoch * epochs / rate / 3600 * n
            rows.append(PlanRow(n, stage, state / gib, act / gib, total / gib, total <= budget, max_mb,
                                compute, exposed, step, rate, weak, strong, hours))
    return rows


# ---------------------------------------------------------------------------------- DeepSpeed, in detail
@dataclass(frozen=True)
class DeepSpeedBuckets:
    """What sets the number and size of DeepSpeed's collectives and buffers (DeepSpeed's defaults;
    a recipe's `train.reduce_bucket_size` / `train.allgather_bucket_size`: `from_train_config`)."""

    reduce_bucket: float = 5e8        # elements per gradient bucket (reduce_bucket_size)
    allgather_bucket: float = 5e8     # elements per all-gather of updated weights (allgather_bucket_size)
    param_groups: int = 1             # optimiser parameter groups (a flat partition each)
    trainer_collectives: int = 3      # per step outside DeepSpeed: the loss's pair count, the trainer's
    #                                   stop / non-finite agreement and its logged-metrics reduction
    multi_rank_allreduce: bool = True  # ZeRO-1/2 reduce a bucket by all-reduce (DeepSpeed's default), not
    #                                    reduce-scatter: 2Ψ, then the all-gather of updated weights Ψ

    @classmethod
    def from_train_config(cls, train) -> "DeepSpeedBuckets":
        return cls(reduce_bucket=float(train.reduce_bucket_size), allgather_bucket=float(train.allgather_bucket_size))


def deepspeed_comm_bytes(cost: ModelCost, stage: int, world: int, b: DeepSpeedBuckets = DeepSpeedBuckets()) -> float:
    """Bytes one rank sends per step as DeepSpeed does it: like `comm_bytes`, except that ZeRO-1/2
    all-reduce whole gradient buckets by default (then all-gather the updated weights): 3Ψ."""
    if world <= 1:
        return 0.0
    if stage in (1, 2) and b.multi_rank_allreduce:
        ring = (world - 1) / world
        g = cost.trainable_params * (2 if cost.precision == "bf16" else 4)
        w = cost.params * (2 if cost.precision == "bf16" else 4)
        return (2 * g + w) * ring
    return comm_bytes(cost, stage, world)


def collectives_per_step(cost: ModelCost, stage: int, world: int, b: DeepSpeedBuckets = DeepSpeedBuckets()) -> int:
    """Collectives one rank issues per optimizer step (each pays the backend's latency once).

    ZeRO-0: one all-reduce per gradient bucket. ZeRO-1/2: one all-reduce per bucket (DeepSpeed's
    multi-rank bucket reduction), the gradient-norm all-reduce of clipping, an overflow check and
    the all-gathers of updated weights (per parameter group, one per all-gather bucket). ZeRO-3: a gather
    of each parameter-holding module's weights in the forward and again in the backward, one
    reduce-scatter per bucket, the gradient norm and overflow check.
    """
    if world <= 1:
        return 0
    buckets = math.ceil(cost.trainable_params / b.reduce_bucket) if cost.trainable_params else 0
    gathers = b.param_groups * max(1, math.ceil(cost.trainable_params / b.param_groups / b.allgather_bucket))
    if stage == 0:
        n = buckets
    elif stage in (1, 2):
        n = buckets + 2 + gathers
    else:
        n = 2 * cost.modules + buckets + 2
    return n + b.trainer_collectives


def rank_memory(cost: ModelCost, stage: int | None, world: int, micro_batch: int,
                b: DeepSpeedBuckets = DeepSpeedBuckets(), optimizer_temp_per_param: float = 0.0) -> dict[str, float]:
    """Peak bytes one rank holds for the model under DeepSpeed, by buffer (add the process's own
    baseline for its resident memory).

    Persistent: the model's weights (partitioned under ZeRO-3), AdamW's two moments, DeepSpeed's
    fp32 master partition (ZeRO ≥ 1 keeps one even when the model is fp32; ZeRO-0 only under
    bf16). At the step: the gradients (full under ZeRO-0/1, a partition under ZeRO-2/3) and what
    DeepSpeed flattens them into: ZeRO-0 a flat all-reduce bucket; ZeRO-1 a gradient bucket plus the
    averaged partition and its flat copy for the optimizer; ZeRO-2 a gradient bucket, the gradient
    partition and its flat copy; ZeRO-3 additionally the gathered full weights (every module stays
    gathered within DeepSpeed's live-parameter limit), a reduce-scatter staging buffer and a flat
    all-gather buffer for the updated partition. Activations live in the forward/backward; the
    peak is the larger of that phase and the step's. Where whole gradients are kept (plain PyTorch,
    ZeRO-0/1) they build up in the backward while activations are still held, so that phase counts
    them too. `optimizer_temp_per_param`: the optimizer step's temporaries per parameter it updates
    (`MachineConstants.optimizer_temp_bytes_per_param`; the rank's partition under ZeRO).
    `stage=None`: plain PyTorch (no DeepSpeed).
    """
    if stage is not None and stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage}")
    n = max(world, 1)
    psi, tr = cost.params, cost.trainable_params
    w = 2 if cost.precision == "bf16" else 4                 # bytes of a weight / gradient in the model's dtype
    bucket = w * min(tr, b.reduce_bucket)
    act = cost.activation_bytes(micro_batch)
    persistent: dict[str, float]
    step: dict[str, float]
    if stage is None:
        persistent = {"weights": w * psi, "optimizer": 8 * tr, "master": 4 * tr if w == 2 else 0.0}
        step = {"gradients": w * tr}
    elif stage == 0:
        persistent = {"weights": w * psi, "optimizer": 8 * tr, "master": 4 * tr if w == 2 else 0.0}
        step = {"gradients": w * tr, "buckets": bucket}
    elif stage == 1:
        persistent = {"weights": w * psi, "optimizer": 8 * tr / n, "master": 4 * tr / n}
        step = {"gradients": w * tr, "buckets": bucket + 8 * tr / n}
    elif stage == 2:
        persistent = {"weights": w * psi, "optimizer": 8 * tr / n, "master": 4 * tr / n, "buckets": bucket}
        step = {"gradients": 4 * tr / n, "buckets": 4 * tr / n}
    else:
        persistent = {"weights": w * psi / n, "optimizer": 8 * tr / n, "master": 4 * tr / n,
                      "gradients": 4 * tr / n, "buckets": bucket + 8 * tr / n}
        # the gathered weights and the reduce-scatter staging coexist with the activations
        step = {"gathered": w * psi + w * min(tr, b.reduce_bucket)}
    step["optimizer_temps"] = optimizer_temp_per_param * (tr if stage in (None, 0) else tr / n)
    held = sum(persistent.values())
    whole_grads = w * tr if stage in (None, 0, 1) else 0.0
    train_phase = held + act + whole_grads + step.get("gathered", 0.0)
    step_phase = held + sum(step.values())
    out = {k: float(v) for k, v in persistent.items()}
    for k, v in step.items():
        out[k] = out.get(k, 0.0) + float(v)
    out["activations"] = float(act)
    out["peak"] = float(max(train_phase, step_phase))
    return out


def machine_rank_memory(cost: ModelCost, machine, stage: int | None, world: int, micro_batch: int,
                        b: DeepSpeedBuckets = DeepSpeedBuckets()) -> dict[str, float]:
    """`rank_memory` on a calibrated machine (`MachineConstants`): with its optimizer temporaries,
    and a "baseline" part, the trainer process's own resident memory (CPU) or the math libraries'
    workspaces (GPU), included in the peak."""
    mem = rank_memory(cost, stage, world, micro_batch, b, machine.optimizer_temp_bytes_per_param)
    mem["baseline"] = float(machine.baseline_bytes + machine.device_workspace_bytes)
    mem["peak"] += mem["baseline"]
    return mem


# Share of DeepSpeed's per-parameter copying that works on the rank's partition, by the bytes of
# `rank_memory`'s step buffers: ZeRO-1/2 copy the whole gradient into a bucket and gather the whole
# weights (12 bytes/param) but flatten, average and write back only the partition (24/N); ZeRO-3
# gathers whole weights twice and buckets whole gradients (24) against 24/N of partition copies.
PARTITIONED_COPIES = {0: 0.0, 1: 2 / 3, 2: 2 / 3, 3: 1 / 2}


def step_time(cost: ModelCost, machine, stage: int | None, world: int, micro_batch: int, forward_backward_s: float,
              contention: float = 1.0, data_s: float = 0.0, b: DeepSpeedBuckets = DeepSpeedBuckets(),
              communication: bool = True, optimizer_s: float | None = None) -> dict[str, float]:
    """Seconds of one optimizer step (one micro-batch) on one rank, by part.

    `forward_backward_s`: the model's forward, loss and backward at this micro-batch (measured FLOP
    rate); `data_s`: the loader's time per batch (in the training process: num_workers=0); `machine`:
    `calibrate.MachineConstants`; `contention`: how much slower a rank's local
    work runs when `world` ranks share the host (1 on separate GPUs); `stage=None`: plain PyTorch,
    no DeepSpeed. Optimiser: AdamW with clipping on the rank's share of the parameters (the whole
    model under ZeRO-0, a 1/N partition under ZeRO ≥ 1). DeepSpeed: its per-stage cost per
    trainable parameter (measured on one rank, the partition's share of it divided by N), per
    tensor (per module under ZeRO-3) and per step. Communication: bytes × the stage's measured
    seconds per byte on 2 ranks (`MachineConstants.deepspeed_comm_s_per_byte`; else the backend's
    bandwidth) plus latency × collectives, not overlapped (gloo and DeepSpeed on a CPU do not overlap); left out
    with `communication=False` (the GPU plan models it with the interconnect's bandwidth).
    `optimizer_s`: AdamW + clipping measured on the model itself (`calibrate.model_optimizer_seconds`);
    it replaces the probes' rates where the optimizer runs over the model's own tensors (plain,
    ZeRO-0), not where it runs over one flat partition (ZeRO ≥ 1, as the probes do).
    """
    n = max(world, 1)
    tr = cost.trainable_params
    # The probes time DeepSpeed's step against the plain one (AdamW per tensor over every
    # parameter): the optimiser term is that plain step on the rank's share of the parameters,
    # DeepSpeed's term what its stage adds or saves on top (flat groups, copies, hooks).
    share = tr if stage in (None, 0) else tr / n
    optimizer = (machine.adam_s_per_param * share + machine.adam_s_per_tensor * cost.tensors
                 + machine.adam_s_per_step)
    if optimizer_s is not None and stage in (None, 0):
        optimizer = optimizer_s
    deepspeed = 0.0
    if stage is not None and str(stage) in machine.deepspeed_s:
        per_param, per_item, per_step = (list(machine.deepspeed_s[str(stage)]) + [0.0])[:3]   # older files: 2 terms
        # Measured on one rank; on N ranks the copies into and out of the rank's partition shrink.
        share = 1 - PARTITIONED_COPIES[stage] + PARTITIONED_COPIES[stage] / n
        deepspeed = (per_param * tr * share + per_item * (cost.modules if stage == 3 else cost.tensors)
                     + per_step)
    comm = 0.0
    if communication and stage is not None and n > 1:
        # DeepSpeed's own collectives as measured on 2 ranks where calibrated, else the backend's
        per_byte = machine.deepspeed_comm_s_per_byte.get(str(stage))
        if per_byte is None:
            if machine.collective_bytes_per_s <= 0:
                raise ValueError("machine constants without a collective bandwidth cannot predict a multi-rank step")
            per_byte = 1.0 / machine.collective_bytes_per_s
        comm = (deepspeed_comm_bytes(cost, stage, n, b) * per_byte
                + collectives_per_step(cost, stage, n, b) * machine.collective_latency_s)
    local = contention * (forward_backward_s + data_s + optimizer + deepspeed)
    return {"compute": contention * forward_backward_s, "data": contention * data_s, "optimizer": contention * optimizer,
            "deepspeed": contention * deepspeed, "communication": comm, "total": local + comm}


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"

