"""A cost model for data-parallel RLIPv2 training under DDP and ZeRO-1/2/3.

Inputs are measured on the real model (FLOPs and activation bytes per image, parameter counts:
`rlipv2_scale.scale.measure`); the rest is arithmetic:

- model state per GPU (Ψ parameters; bf16 mixed precision keeps 2Ψ weights, 2Ψ gradients and
  12Ψ fp32 master weights + Adam moments; fp32 training 4Ψ + 4Ψ + 8Ψ): ZeRO-1 partitions the
  optimiser state over N ranks, ZeRO-2 also the gradients, ZeRO-3 also the weights;
- communication per step and rank (ring collectives move (N−1)/N of the buffer twice for an
  all-reduce): DDP all-reduce ≈ 2Ψ, ZeRO-1/2 reduce-scatter + all-gather ≈ 2Ψ, ZeRO-3 ≈ 3Ψ
  (weights gathered for the forward and again for the backward, gradients reduce-scattered);
- step time = compute + the part of communication that does not overlap it.

Frozen parameters (the R50 stem, Swin norms) take no gradient or optimiser state.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
    flops_per_image: float        # forward + backward
    activation_bytes_per_image: float
    precision: str = "bf16"       # "bf16" (mixed) or "fp32"


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
    t_image = cost.flops_per_image / peak
    for stage in ZERO_STAGES:
        base_rate = None
        base_strong_step = None
        for n in sorted(gpus):
            state = state_bytes(cost, stage, n)["total"]
            act = cost.activation_bytes_per_image * a.micro_batch
            budget = a.gpu.memory_gib * gib - a.memory_headroom_gib * gib
            total = state + act
            max_mb = max(0, int((budget - state) // cost.activation_bytes_per_image)) if budget > state else 0
            compute = t_image * a.micro_batch * a.grad_accum
            comm = comm_bytes(cost, stage, n) / bandwidth(a, n)
            exposed = max(comm - a.overlap * compute, (1 - a.overlap) * comm)
            step = compute + exposed
            rate = n * a.micro_batch * a.grad_accum / step
            base_rate = base_rate or rate / n * base_gpus
            weak = rate / (base_rate * n / base_gpus)
            per_gpu = max(global_batch / n, 1e-9)
            strong_step = t_image * per_gpu + max(comm - a.overlap * t_image * per_gpu, (1 - a.overlap) * comm)
            base_strong_step = base_strong_step or strong_step
            strong = base_strong_step / strong_step / (n / base_gpus)
            hours = images_per_epoch * epochs / rate / 3600 * n
            rows.append(PlanRow(n, stage, state / gib, act / gib, total / gib, total <= budget, max_mb,
                                compute, exposed, step, rate, weak, strong, hours))
    return rows


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"

