"""`rlipv2 scale report`: the curves of a set of runs, and their throughput against the plan.

Reads each run's `metrics.jsonl` (the trainer's records: `step`, `samples`, `loss`,
`images_per_s`, `peak_memory_bytes`, and `val/mAP` from the validation hook) and `config.yaml`,
with the sweep's `sweep.json` when the runs came from `rlipv2 scale sweep` (names, swept values,
ranks). Writes PNG plots and `report.md` (+ `report.json`):

- training loss and validation mAP against images seen (the x axis that compares runs of
  different batch sizes and rank counts),
- images/s against ranks, per group of runs that differ only in their rank count, with the
  speed-up and scaling efficiency over the group's smallest run,
- measured images/s against planned, where a `plan.json` (`rlipv2 scale plan`) has a row for the
  run's rank count and ZeRO stage.

Throughput is the median of a run's logged windows after the first (which holds start-up work).
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlipv2_scale.errors import UserError
from rlipv2_scale.scale.sweep import INDEX, PSEUDO_KEYS, SweepRun, load_sweep
from rlipv2_scale.train.config import load_run_config

METRICS = "metrics.jsonl"


@dataclass
class RunSummary:
    name: str
    run_dir: str
    values: dict[str, str]               # swept values (empty for a run outside a sweep)
    world_size: int
    zero_stage: int | None
    batch_size: int | None               # per rank
    steps: int
    images_seen: int
    final_loss: float | None
    images_per_s: float | None
    peak_memory_bytes: int | None
    loss_curve: list[tuple[int, float]] = field(default_factory=list)    # (images seen, loss)
    map_curve: list[tuple[int, float]] = field(default_factory=list)     # (images seen, val mAP %)

    @property
    def label(self) -> str:
        """Swept values except the rank count: runs that share it differ only in their ranks."""
        if not self.values:
            return self.name
        parts = [f"{k.split('.')[-1]}={v}" for k, v in self.values.items() if k not in PSEUDO_KEYS]
        return ", ".join(parts) or "all runs"

    @property
    def final_map(self) -> float | None:
        return self.map_curve[-1][1] if self.map_curve else None

    @property
    def best_map(self) -> float | None:
        return max(m for _, m in self.map_curve) if self.map_curve else None


_COUNTS = ("step", "samples")                                            # non-negative integers
_NUMBERS = ("loss", "images_per_s", "peak_memory_bytes", "val/mAP")      # numbers (or null)


def _check_record(path: Path, n: int, record: Any) -> dict:
    """A record as the trainer writes it: an object whose counts are integers and whose measures are
    numbers; a training record (loss, samples) and a validation record (val/mAP) name their step."""
    where = f"{path}, line {n}"
    if not isinstance(record, dict):
        raise UserError(f"{where}: a record must be a JSON object such as the trainer writes "
                        f"({{\"step\": ..., \"loss\": ...}}), not {type(record).__name__} {json.dumps(record)[:60]}; "
                        f"fix or remove that line")
    needs_step = ("loss" in record and "samples" in record) or record.get("val/mAP") is not None
    if needs_step and "step" not in record:
        raise UserError(f"{where}: a training or validation record without 'step'; fix or remove that line")
    for key in _COUNTS:
        value = record.get(key)
        if key in record and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise UserError(f"{where}: '{key}' is {json.dumps(value)[:60]}, not a count (an integer ≥ 0); "
                            f"fix or remove that line")
    for key in _NUMBERS:
        value = record.get(key)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise UserError(f"{where}: '{key}' is {json.dumps(value)[:60]}, not a number; fix or remove that line")
    return record


def _read_records(path: Path) -> list[dict]:
    records = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}, line {n}: not a JSON record ({exc}); was the file cut short?") from exc
        records.append(_check_record(path, n, record))
    return records


def summarise_run(run_dir: str | os.PathLike, name: str | None = None, values: dict[str, str] | None = None,
                  world_size: int | None = None) -> RunSummary:
    run_dir = Path(run_dir)
    path = run_dir / METRICS
    if not path.is_file():
        raise UserError(f"run directory '{run_dir}' has no {METRICS}: did the run start? (a sweep's run logs to OUT/logs/<name>.log)")
    records = _read_records(path)
    train = [r for r in records if "loss" in r and "samples" in r]
    if not train:
        raise UserError(f"{path} holds no training record (step, samples, loss)")
    # The run's resolved config, through the one strict loader.
    cfg = load_run_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    batch = cfg.data.batch_size if cfg is not None else None
    accum = cfg.train.grad_accum if cfg is not None else 1
    last = train[-1]
    if world_size is None:
        if not batch:
            raise UserError(f"'{run_dir}' has no config.yaml to read its batch size from, and no sweep.json that "
                            f"names its rank count")
        # samples grow by batch × grad_accum × ranks per optimizer step
        world_size = max(1, round(last["samples"] / max(last["step"], 1) / (batch * accum)))
    per_step = last["samples"] / max(last["step"], 1)
    windows = [r["images_per_s"] for r in train if r.get("images_per_s")]
    steady = windows[1:] or windows
    memory = [r["peak_memory_bytes"] for r in train if r.get("peak_memory_bytes") is not None]
    map_curve = [(round(r["step"] * per_step), float(r["val/mAP"])) for r in records
                 if r.get("val/mAP") is not None]
    return RunSummary(
        name=name or run_dir.name, run_dir=str(run_dir), values=dict(values or {}), world_size=world_size,
        zero_stage=cfg.train.zero_stage if cfg is not None else None, batch_size=batch, steps=int(last["step"]),
        images_seen=int(last["samples"]), final_loss=float(last["loss"]),
        images_per_s=statistics.median(steady) if steady else None, peak_memory_bytes=max(memory) if memory else None,
        loss_curve=[(int(r["samples"]), float(r["loss"])) for r in train], map_curve=map_curve)


def collect(paths: list[str | os.PathLike], allow_missing: bool = False) -> tuple[list[RunSummary], list[str]]:
    """Runs from sweep directories, `sweep.json` files and plain run directories; returns the runs
    and notes on the ones left out (with `allow_missing`, runs without metrics are noted, not fatal)."""
    runs, notes = [], []
    for p in paths:
        p = Path(p)
        if (p.is_dir() and (p / INDEX).is_file()) or (p.is_file() and p.name == INDEX):
            sweep = load_sweep(p)
            members: list[SweepRun] = sweep.runs
            for r in members:
                if not (Path(r.run_dir) / METRICS).is_file():
                    msg = f"{r.name}: no {METRICS} (status {r.status})"
                    if not allow_missing:
                        raise UserError(f"sweep '{p}' run {msg}; pass --allow-missing to report the others")
                    notes.append(msg)
                    continue
                runs.append(summarise_run(r.run_dir, r.name, r.values, r.world_size))
        elif p.is_dir():
            runs.append(summarise_run(p))
        else:
            raise UserError(f"'{p}' is neither a run directory (with {METRICS}) nor a sweep (with {INDEX})")
    if not runs:
        raise UserError("no run with metrics to report")
    return runs, notes


def planned_rate(plan: dict | None, world: int, stage: int | None) -> float | None:
    if not plan:
        return None
    for row in plan.get("rows", []):
        if row["gpus"] == world and (stage is None or row["zero_stage"] == stage):
            return float(row["images_per_s"])
    return None


def scaling_table(runs: list[RunSummary], plan: dict | None = None) -> list[dict]:
    """Per group of runs that differ only in ranks: images/s, speed-up and efficiency over the
    group's smallest rank count, and the plan's images/s where it has one."""
    groups: dict[str, list[RunSummary]] = {}
    for r in runs:
        groups.setdefault(r.label, []).append(r)
    rows = []
    for label, members in groups.items():
        members = sorted(members, key=lambda r: r.world_size)
        base = members[0]
        for r in members:
            speedup = (r.images_per_s / base.images_per_s) if r.images_per_s and base.images_per_s else None
            planned = planned_rate(plan, r.world_size, r.zero_stage)
            rows.append({"group": label, "run": r.name, "ranks": r.world_size, "zero_stage": r.zero_stage,
                         "images_per_s": r.images_per_s, "speedup": speedup,
                         "efficiency": speedup / (r.world_size / base.world_size) if speedup else None,
                         "planned_images_per_s": planned,
                         "measured_over_planned": (r.images_per_s / planned) if planned and r.images_per_s else None})
    return rows


def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "–"
    return format(v, spec) if isinstance(v, float) else str(v)


def write_report(runs: list[RunSummary], out: str | os.PathLike, plan: dict | None = None, title: str = "Scaling report",
                 notes: list[str] | None = None, intro: str = "") -> dict[str, Path]:
    """Plots, `report.md` and `report.json` into `out`; returns their paths by kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def curve_plot(key: str, attr: str, ylabel: str, log: bool) -> None:
        drawn = [r for r in runs if getattr(r, attr)]
        if not drawn:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in drawn:
            xs, ys = zip(*getattr(r, attr))
            label = r.label + (f" ({r.world_size} ranks)" if len({x.world_size for x in runs}) > 1 else "")
            ax.plot(xs, ys, marker="o" if attr == "map_curve" else None, ms=3, label=label)
        ax.set_xlabel("images seen")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{ylabel} against images seen")
        fig.tight_layout()
        paths[key] = out / f"{key}.png"
        fig.savefig(paths[key], dpi=100)
        plt.close(fig)

    curve_plot("loss_vs_images", "loss_curve", "training loss", True)
    curve_plot("map_vs_images", "map_curve", "validation mAP (%)", False)

    table = scaling_table(runs, plan)
    fig, ax = plt.subplots(figsize=(6, 4))
    for group in dict.fromkeys(t["group"] for t in table):
        rows = [t for t in table if t["group"] == group and t["images_per_s"]]
        if rows:
            ax.plot([t["ranks"] for t in rows], [t["images_per_s"] for t in rows], marker="o", label=f"{group} measured")
    stages = sorted({r.zero_stage for r in runs if r.zero_stage is not None})
    for s in stages:
        pts = sorted((row["gpus"], row["images_per_s"]) for row in (plan or {}).get("rows", [])
                     if row["zero_stage"] == s and row["gpus"] <= 2 * max(r.world_size for r in runs))
        if pts:
            ax.plot(*zip(*pts), ls="--", marker="x", label=f"planned, ZeRO-{s}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("ranks")
    ax.set_ylabel("images/s")
    ax.set_title("throughput against ranks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths["throughput_vs_ranks"] = out / "throughput_vs_ranks.png"
    fig.savefig(paths["throughput_vs_ranks"], dpi=100)
    plt.close(fig)

    lines = [f"# {title}", ""]
    if intro:
        lines += [intro, ""]
    lines += ["## Runs", "", "| run | swept values | ranks | ZeRO | steps | images seen | final loss | final mAP | "
              "best mAP | images/s | peak memory (GiB) |", "|" + "---|" * 11]
    for r in runs:
        values = ", ".join(f"`{k}={v}`" for k, v in r.values.items()) or "–"
        mem = r.peak_memory_bytes / 1024 ** 3 if r.peak_memory_bytes else None
        lines.append(f"| {r.name} | {values} | {r.world_size} | {_fmt(r.zero_stage)} | {r.steps} | {r.images_seen} | "
                     f"{_fmt(r.final_loss, '.4f')} | {_fmt(r.final_map, '.2f')} | {_fmt(r.best_map, '.2f')} | "
                     f"{_fmt(r.images_per_s, '.2f')} | {_fmt(mem, '.2f')} |")
    for key, caption in (("loss_vs_images", "Training loss against images seen"),
                         ("map_vs_images", "Validation mAP against images seen")):
        if key in paths:
            lines += ["", f"## {caption}", "", f"![{caption}]({paths[key].name})"]
    lines += ["", "## Throughput against ranks", "",
              "Speed-up and efficiency are over the smallest rank count of runs that differ only in ranks.", "",
              "| group | ranks | ZeRO | images/s | speed-up | efficiency | planned images/s | measured / planned |",
              "|" + "---|" * 8]
    for t in table:
        lines.append(f"| {t['group']} | {t['ranks']} | {_fmt(t['zero_stage'])} | {_fmt(t['images_per_s'], '.2f')} | "
                     f"{_fmt(t['speedup'], '.2f')} | {_fmt(t['efficiency'], '.2f')} | "
                     f"{_fmt(t['planned_images_per_s'], '.1f')} | {_fmt(t['measured_over_planned'], '.3f')} |")
    lines += ["", f"![throughput against ranks]({paths['throughput_vs_ranks'].name})"]
    if plan:
        gpu = plan.get("assumptions", {}).get("gpu", {}).get("name", "?")
        lines += ["", f"Planned figures: `plan.json` for {plan.get('model')} on {gpu} "
                      f"({plan.get('resolution')}), from `rlipv2 scale plan`."]
    if notes:
        lines += ["", "## Left out", ""] + [f"- {n}" for n in notes]
    paths["report"] = out / "report.md"
    paths["report"].write_text("\n".join(lines) + "\n")
    paths["json"] = out / "report.json"
    paths["json"].write_text(json.dumps({"runs": [asdict(r) | {"label": r.label} for r in runs],
                                         "scaling": table, "notes": notes or []}, indent=1) + "\n")
    return paths


def find_plan(paths: list[str | os.PathLike]) -> dict | None:
    """A `plan.json` next to the runs: in a sweep or run directory, or its `plan/` folder."""
    for p in paths:
        p = Path(p)
        base = p.parent if p.is_file() else p
        for candidate in (base / "plan.json", base / "plan" / "plan.json"):
            if candidate.is_file():
                return load_plan(candidate)
    return None


def load_plan(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plan '{path}' does not exist; write one with `rlipv2 scale plan RECIPE --out DIR`")
    try:
        plan = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"plan '{path}' is not JSON: {exc}") from exc
    if "rows" not in plan:
        raise UserError(f"'{path}' is not a plan.json written by `rlipv2 scale plan` (no 'rows')")
    return plan
