"""`rlipv2 scale plan`: measure the configured model, then project a run on N GPUs.

FLOPs and activation bytes are measured on a real forward/backward of the recipe's model (random
weights, no download) with the recipe's label-sequence length, at micro-batches of 1 and 2: the
difference is the cost per image (backbone, encoder, decoders), the rest the cost per step (the
label-text encoder runs once per batch over the label list, whatever the batch size). Big models at full
resolution are slow on a CPU, so by default the measurement is taken at two smaller square
resolutions and extrapolated linearly in the pixel count (backbone, encoder and deformable
attention grow with pixels; the text encoder and decoders do not): the fit is reported with the
plan. On a GPU, or with `--measure-at full`, the recipe's resolution is measured directly.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from rlipv2_scale.errors import UserError
from rlipv2_scale.scale.cost import GPUS, DeepSpeedBuckets, ModelCost, PlanAssumptions, PlanRow, fmt_bytes, plan


@dataclass
class Measurement:
    height: int
    width: int
    flops: float                  # per image
    activation_bytes: float       # per image
    flops_per_step: float = 0.0
    activation_bytes_per_step: float = 0.0


def measure_total(model: torch.nn.Module, height: int, width: int, num_obj: int, num_rel: int,
                  batch: int, device: torch.device | str = "cpu",
                  texts: tuple[list[str], list[str]] | None = None) -> tuple[float, float]:
    """(FLOPs, activation bytes) of a forward/backward of a whole micro-batch of `batch` images."""
    from rlipv2_scale.scale.measure import activation_bytes, calibration_step, count_flops

    # Every output feeds the loss; the matcher and loss terms are negligible in FLOPs.
    step = calibration_step(model, None, batch, height, width, num_obj, num_rel, device, texts)
    model.train()
    flops = count_flops(step)
    model.zero_grad(set_to_none=True)
    act = activation_bytes(step, exclude=list(model.parameters()))
    model.zero_grad(set_to_none=True)
    return float(flops), float(act)


def measure_once(model: torch.nn.Module, height: int, width: int, num_obj: int, num_rel: int,
                 device: torch.device | str = "cpu", texts: tuple[list[str], list[str]] | None = None) -> Measurement:
    """Per-image and per-step cost from micro-batches of 1 and 2 images."""
    f1, a1 = measure_total(model, height, width, num_obj, num_rel, 1, device, texts)
    f2, a2 = measure_total(model, height, width, num_obj, num_rel, 2, device, texts)
    # Activations are counted by storage, which can make the split slightly noisy: keep both ≥ 0.
    per_image_act = max(a2 - a1, 0.0)
    return Measurement(height, width, f2 - f1, per_image_act, max(2 * f1 - f2, 0.0), max(a1 - per_image_act, 0.0))


def extrapolate(a: Measurement, b: Measurement, height: int, width: int) -> Measurement:
    """Per-image cost linear in the pixel count through two measurements; the per-step cost (the
    label-text encoder) does not depend on the resolution: their mean."""
    pa, pb, p = a.height * a.width, b.height * b.width, height * width

    def line(ya: float, yb: float) -> float:
        slope = (yb - ya) / (pb - pa)
        return ya + slope * (p - pa)

    return Measurement(height, width, line(a.flops, b.flops), line(a.activation_bytes, b.activation_bytes),
                       (a.flops_per_step + b.flops_per_step) / 2,
                       (a.activation_bytes_per_step + b.activation_bytes_per_step) / 2)


def model_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters, trainable parameters and tensors, and the modules that hold parameters."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"params": sum(p.numel() for p in model.parameters()), "trainable_params": sum(p.numel() for p in trainable),
            "tensors": len(trainable),
            "modules": sum(1 for m in model.modules() if any(True for _ in m.parameters(recurse=False)))}


def model_cost(model: torch.nn.Module, m: Measurement, precision: str) -> ModelCost:
    return ModelCost(flops_per_image=m.flops, activation_bytes_per_image=m.activation_bytes, precision=precision,
                     flops_per_step=m.flops_per_step, activation_bytes_per_step=m.activation_bytes_per_step,
                     **model_counts(model))


@dataclass
class PlanReport:
    recipe: str
    model: str
    resolution: tuple[int, int]
    num_labels: tuple[int, int]
    cost: ModelCost
    measurements: list[Measurement]
    assumptions: dict
    rows: list[PlanRow]
    images_per_epoch: int
    epochs: int

    def as_dict(self) -> dict:
        return {"recipe": self.recipe, "model": self.model, "resolution": list(self.resolution),
                "num_labels": list(self.num_labels), "cost": asdict(self.cost),
                "measurements": [asdict(m) for m in self.measurements], "assumptions": self.assumptions,
                "images_per_epoch": self.images_per_epoch, "epochs": self.epochs,
                "rows": [r.as_dict() for r in self.rows]}


def build_plan(cfg, recipe_name: str, gpus: list[int], gpu: str = "h100", inter_node_gbps: float = 50.0,
               mfu: float = 0.35, resolution: tuple[int, int] = (800, 1333), images_per_epoch: int | None = None,
               measure_at: str = "extrapolate", probe_sizes: tuple[int, int] = (256, 384),
               machine=None) -> PlanReport:
    """`cfg` is a RunConfig: its model, its label-sequence sizes, micro-batch and schedule;
    `machine`: measured constants (`rlipv2 scale calibrate`) to add the optimiser's and DeepSpeed's
    time and the measured collective latency."""
    from rlipv2_scale.models.build import build_model

    model_cfg = replace(cfg.model, text=replace(cfg.model.text, pretrained=None, tokenizer=None))
    model = build_model(model_cfg, pretrained=False)
    n_obj, n_rel = cfg.data.num_obj_labels, cfg.data.num_rel_labels
    if cfg.data.fixed_labels:
        n_obj, n_rel = len(cfg.data.fixed_obj_labels), len(cfg.data.fixed_rel_labels)
    h, w = resolution
    if measure_at == "full":
        m = measure_once(model, h, w, n_obj, n_rel)
        measurements = [m]
    else:
        small, large = probe_sizes
        measurements = [measure_once(model, small, small, n_obj, n_rel), measure_once(model, large, large, n_obj, n_rel)]
        m = extrapolate(measurements[0], measurements[1], h, w)
    precision = "bf16" if cfg.train.precision in ("bf16", "fp16", "auto") else "fp32"   # fp16: bf16's bytes
    cost = model_cost(model, m, precision)
    a = PlanAssumptions(gpu=GPUS[gpu], inter_node_gbps=inter_node_gbps, mfu=mfu, micro_batch=cfg.data.batch_size,
                        grad_accum=cfg.train.grad_accum, machine=machine,
                        buckets=DeepSpeedBuckets.from_train_config(cfg.train))
    ipe = images_per_epoch or cfg.data.epoch_size or 1_000_000
    rows = plan(cost, gpus, a, ipe, cfg.train.epochs)
    assumptions = asdict(a)
    assumptions["gpu"] = asdict(a.gpu)
    assumptions["machine"] = machine.to_dict() if machine is not None else None
    return PlanReport(recipe_name, cfg.model.name, resolution, (n_obj, n_rel), cost, measurements, assumptions,
                      rows, ipe, cfg.train.epochs)


def format_table(rep: PlanReport) -> str:
    c = rep.cost
    lines = [f"{rep.model} at {rep.resolution[0]}x{rep.resolution[1]}, {rep.num_labels[0]}+{rep.num_labels[1]} labels: "
             f"{c.params / 1e6:.1f} M params ({c.trainable_params / 1e6:.1f} M trainable), "
             f"{c.flops_per_image / 1e12:.2f} TFLOP and {fmt_bytes(c.activation_bytes_per_image)} of activations "
             f"per image + {c.flops_per_step / 1e12:.2f} TFLOP and {fmt_bytes(c.activation_bytes_per_step)} per step "
             f"(label-text encoder) (fwd+bwd)",
             f"{'GPUs':>6} {'ZeRO':>4} {'state/GPU':>10} {'act/GPU':>10} {'fits':>4} {'max mb':>6} {'step s':>8} "
             f"{'img/s':>9} {'weak':>6} {'strong':>6} {'GPU-h':>9}"]
    for r in rep.rows:
        lines.append(f"{r.gpus:>6} {r.zero_stage:>4} {r.state_gib:>8.1f}Gi {r.activation_gib:>8.1f}Gi "
                     f"{'yes' if r.fits else 'NO':>4} {r.max_micro_batch:>6} {r.step_s:>8.3f} {r.images_per_s:>9.1f} "
                     f"{r.weak_scaling_eff:>6.2f} {r.strong_scaling_eff:>6.2f} {r.gpu_hours:>9.0f}")
    return "\n".join(lines)


def check_out(out: str | Path) -> Path:
    """The plan's folder, checked before the model is measured: a folder (new or not), not a file,
    and any `plan.json` in it one that `rlipv2 scale plan` wrote (the user's files are not replaced)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file: give a folder for plan.json and its plots")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--out '{out}': '{parent}' is a file, not a folder; choose another --out")
    existing = out / "plan.json"
    if existing.exists():
        try:
            data = json.loads(existing.read_text()) if existing.is_file() else None
        except (OSError, UnicodeDecodeError, ValueError):
            data = None
        ours = isinstance(data, dict) and "rows" in data and "assumptions" in data
        if not ours:
            raise UserError(f"'{existing}' exists and is not a plan of `rlipv2 scale plan`: choose another --out "
                            f"(it is not overwritten)")
    return out


def write_outputs(rep: PlanReport, out: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "plan.json", out / "plan_throughput.png", out / "plan_memory.png"]
    paths[0].write_text(json.dumps(rep.as_dict(), indent=1))
    stages = sorted({r.zero_stage for r in rep.rows})
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for s in stages:
        rows = [r for r in rep.rows if r.zero_stage == s]
        ax[0].plot([r.gpus for r in rows], [r.images_per_s for r in rows], marker="o", label=f"ZeRO-{s}" if s else "DDP")
        ax[1].plot([r.gpus for r in rows], [r.weak_scaling_eff for r in rows], marker="o", label=f"ZeRO-{s}" if s else "DDP")
    for a, title in zip(ax, ("images/s (projected)", "weak-scaling efficiency")):
        a.set_xscale("log", base=2)
        a.set_xlabel("GPUs")
        a.set_title(title)
        a.legend()
    fig.suptitle(f"{rep.model} — {rep.recipe}")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    n0 = min(r.gpus for r in rep.rows)
    rows = [r for r in rep.rows if r.gpus == n0]
    ax.bar([f"ZeRO-{r.zero_stage}" if r.zero_stage else "DDP" for r in rows], [r.state_gib for r in rows],
           label="params+grads+optimizer")
    ax.bar([f"ZeRO-{r.zero_stage}" if r.zero_stage else "DDP" for r in rows], [r.activation_gib for r in rows],
           bottom=[r.state_gib for r in rows], label="activations")
    ax.axhline(rep.assumptions["gpu"]["memory_gib"], color="k", ls="--", label="GPU memory")
    ax.set_ylabel("GiB per GPU")
    ax.set_title(f"memory per GPU at {n0} GPUs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[2], dpi=100)
    plt.close(fig)
    return paths
