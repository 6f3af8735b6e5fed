"""Sweeps over recipe keys: one training run per combination, locally or as a SLURM job array.

`key=v1,v2` axes multiply out into combinations; values are split at top-level commas only, so a
value may be a YAML list or mapping (`data.sources=[{name: a, local: x}],[{name: b, local: y}]`).
The pseudo-key `nproc` sweeps the number of local ranks (`rlipv2 train --nproc`), `nodes` the number
of SLURM nodes (one job array per node count); every other key is a recipe key, and every
combination is validated against the recipe schema before anything runs.

The sweep directory holds one run directory per combination and `sweep.json`, the index that
`rlipv2 scale report` reads: the recipe, the axes, and per run its name, directory, overrides,
ranks, status and wall time. Local sweeps rewrite it after each run, and skip runs that already
completed, so an interrupted sweep continues where it stopped; a completed run is reused only if its
saved `config.yaml` is what this sweep would run there (otherwise an error names the keys).
"""
from __future__ import annotations

import itertools
import json
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlipv2_scale.config import split_values
from rlipv2_scale.errors import UserError

INDEX = "sweep.json"
PSEUDO_KEYS = ("nproc", "nodes")


@dataclass(frozen=True)
class Axis:
    key: str
    values: list[str]


def parse_axes(items: list[str]) -> list[Axis]:
    axes: list[Axis] = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or not raw:
            raise UserError(f"sweep axis '{item}' is not of the form key=v1,v2,... (e.g. model.alif.fusion=none,last_level)")
        values = split_values(raw)
        if key in PSEUDO_KEYS and not all(v.isdigit() and int(v) > 0 for v in values):
            raise UserError(f"sweep axis '{item}': {key} takes positive integers")
        if key in (a.key for a in axes):
            raise UserError(f"sweep axis '{key}' is given twice; list all its values in one key=v1,v2")
        axes.append(Axis(key, values))
    if not axes:
        raise UserError("a sweep needs at least one key=v1,v2 axis")
    return axes


def combinations(axes: list[Axis]) -> list[dict[str, str]]:
    """Cross product of the axes, the first axis varying slowest."""
    return [dict(zip([a.key for a in axes], combo)) for combo in itertools.product(*[a.values for a in axes])]


def run_name(index: int, combo: dict[str, str]) -> str:
    """`03_fusion-none_nproc-2`: the index keeps names unique, the rest keeps them readable."""
    parts = []
    for key, value in combo.items():
        if re.search(r"[\[{/]", value):      # a list, mapping or path: its last word (a folder's name)
            value = (re.findall(r"[A-Za-z0-9._-]+", value) or ["x"])[-1]
        short = re.sub(r"[^A-Za-z0-9._]+", "-", value).strip("-")[:24] or "x"
        parts.append(f"{key.split('.')[-1]}-{short}")
    return f"{index:02d}_" + "_".join(parts)


@dataclass
class SweepRun:
    name: str
    run_dir: str
    overrides: list[str]                 # the combination's recipe overrides (not the base ones)
    values: dict[str, str]               # axis → value, pseudo-keys included
    nproc: int = 1                       # ranks per node
    nodes: int = 1
    status: str = "pending"              # pending | completed | failed | rendered | submitted
    returncode: int | None = None
    seconds: float | None = None
    cpu_seconds: float | None = None     # user + system time of the run's processes: independent of the machine's load

    @property
    def world_size(self) -> int:
        return self.nproc * self.nodes


@dataclass
class Sweep:
    recipe: str
    out: str
    mode: str                            # local | slurm
    axes: list[dict]
    base_overrides: list[str]
    runs: list[SweepRun]
    jobs: list[dict] = field(default_factory=list)   # slurm: {"nodes", "script", "job_id"}

    def save(self) -> Path:
        path = Path(self.out) / INDEX
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        tmp.replace(path)
        return path


def load_sweep(path: str | os.PathLike) -> Sweep:
    path = Path(path)
    if path.is_dir():
        path = path / INDEX
    if not path.is_file():
        raise UserError(f"'{path}' does not exist: run `rlipv2 scale sweep` first, or pass run directories")
    not_ours = f"'{path}' is not a sweep index written by `rlipv2 scale sweep`"
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{not_ours}: {exc}") from exc
    except OSError as exc:
        raise UserError(f"cannot read '{path}': {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise UserError(f"{not_ours}: it holds {type(data).__name__ if not isinstance(data, dict) else 'an object'} "
                        f"without a 'runs' list")
    try:
        runs = []
        for i, r in enumerate(data["runs"]):
            if not isinstance(r, dict):
                raise TypeError(f"runs[{i}] is {type(r).__name__}, not an object")
            run = SweepRun(**r)
            if not (isinstance(run.run_dir, str) and isinstance(run.name, str) and isinstance(run.values, dict)
                    and isinstance(run.nproc, int) and isinstance(run.nodes, int)):
                raise TypeError(f"runs[{i}] has a field of the wrong type")
            runs.append(run)
        sweep = Sweep(runs=runs, **{k: v for k, v in data.items() if k != "runs"})
        if not (isinstance(sweep.recipe, str) and isinstance(sweep.out, str) and isinstance(sweep.axes, list)
                and isinstance(sweep.base_overrides, list)):
            raise TypeError("a field of the wrong type")
        return sweep
    except TypeError as exc:
        raise UserError(f"{not_ours}: {exc}") from exc


def check_out(sweep: Sweep, same_sweep: bool = False) -> dict[str, SweepRun]:
    """The sweep directory may be new, or hold a sweep index (what a rerun continues from): a file in
    its place, or a `sweep.json` that is not an index, is refused before anything is written; with
    `same_sweep` (SLURM: the index holds the job ids and the array folders are rendered anew) so is the
    index of another sweep (other recipe, axes, --set values or mode). A local sweep checks each
    completed run's config instead (`config_differences`). Returns the earlier runs by run directory."""
    out = Path(sweep.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file, not a folder: choose a folder for the sweep (new, or one of "
                        f"this sweep's)")
    index = out / INDEX
    if not index.exists():
        return {}
    if not index.is_file():
        raise UserError(f"'{index}' is not a file: choose another --out for the sweep")
    try:
        earlier = load_sweep(index)
    except UserError as exc:
        raise UserError(f"{exc}; it would be overwritten: choose another --out for the sweep") from None
    differs = [name for name, old, new in (("recipe", earlier.recipe, sweep.recipe), ("mode", earlier.mode, sweep.mode),
                                           ("axes", earlier.axes, sweep.axes),
                                           ("--set values", earlier.base_overrides, sweep.base_overrides))
               if old != new]
    if same_sweep and differs:
        raise UserError(f"'{index}' indexes another sweep (its {', '.join(differs)} differ from this one's): "
                        f"choose another --out for this sweep")
    return {r.run_dir: r for r in earlier.runs}


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def config_differences(sweep: Sweep, run: SweepRun) -> list[str]:
    """The resolved-config keys where the run folder's `config.yaml` (what its completed run trained)
    differs from what this sweep would run there (run.dir aside); a missing or unreadable config is a
    difference too."""
    from rlipv2_scale.config import to_dict
    from rlipv2_scale.train.config import load_run_config

    saved_path = Path(run.run_dir) / "config.yaml"
    if not saved_path.is_file():
        return ["config.yaml (missing)"]
    try:
        saved = _flat(to_dict(load_run_config(saved_path)))
    except (UserError, ValueError, TypeError, OSError) as exc:
        return [f"config.yaml (unreadable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"]
    wanted = _flat(to_dict(load_run_config(Path(sweep.recipe), [*sweep.base_overrides, *run.overrides,
                                                                 f"run.dir={run.run_dir}"])))
    return sorted(k for k in saved.keys() | wanted.keys() if k != "run.dir" and saved.get(k) != wanted.get(k))


def plan_sweep(recipe: str | os.PathLike, axes_items: list[str], out: str | os.PathLike,
               base_overrides: list[str] | None = None, nproc: int = 1, nodes: int = 1, mode: str = "local") -> Sweep:
    """Expand and validate every combination (a bad key or value fails here, before any run)."""
    from rlipv2_scale.train.config import load_run_config

    base = list(base_overrides or [])
    if any(o.split("=", 1)[0] == "run.dir" for o in base):
        raise UserError("a sweep sets run.dir itself (OUT/<run name>): leave run.dir out of the overrides")
    axes = parse_axes(axes_items)
    if mode == "local" and any(a.key == "nodes" for a in axes):
        raise UserError("the 'nodes' axis needs --slurm; sweep 'nproc' for local ranks")
    if mode == "slurm" and any(a.key == "nproc" for a in axes):
        raise UserError("the 'nproc' axis is for local sweeps; under --slurm sweep 'nodes' (ranks per node: --gpus-per-node)")
    out = Path(out).resolve()
    runs = []
    for i, combo in enumerate(combinations(axes)):
        overrides = [f"{k}={v}" for k, v in combo.items() if k not in PSEUDO_KEYS]
        try:
            load_run_config(Path(recipe), base + overrides)
        except (UserError, ValueError, TypeError) as exc:
            raise UserError(f"sweep combination {combo} is not a valid run of '{recipe}': {exc}") from exc
        name = run_name(i, combo)
        runs.append(SweepRun(name=name, run_dir=str(out / name), overrides=overrides, values=combo,
                             nproc=int(combo.get("nproc", nproc)), nodes=int(combo.get("nodes", nodes))))
    return Sweep(recipe=str(Path(recipe).resolve()), out=str(out), mode=mode,
                 axes=[{"key": a.key, "values": a.values} for a in axes], base_overrides=base, runs=runs)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)   # waited-for descendants: torchrun and its ranks
    return usage.ru_utime + usage.ru_stime


def run_local(sweep: Sweep, skip_completed: bool = True, stop_on_failure: bool = False,
              env: dict[str, str] | None = None, log=print) -> Sweep:
    """Each combination as `rlipv2 train RECIPE ... run.dir=OUT/<name> --nproc N`, one after another
    (a run gets the whole machine, so that its throughput is its own); output in `OUT/logs/<name>.log`."""
    from rlipv2_scale.train.launch import COMPLETED_MARKER

    earlier = check_out(sweep)
    # A completed run is this sweep's result only if it trained what this sweep would train there:
    # checked for every run before any runs, so that a mismatch costs no training time.
    completed = [r for r in sweep.runs if (Path(r.run_dir) / COMPLETED_MARKER).is_file()] if skip_completed else []
    for run in completed:
        differs = config_differences(sweep, run)
        old = earlier.get(run.run_dir)
        if old is not None and (old.nproc, old.nodes) != (run.nproc, run.nodes):
            differs.append(f"ranks ({old.world_size} then, {run.world_size} now)")
        if differs:
            shown = ", ".join(differs[:8]) + (f" and {len(differs) - 8} more" if len(differs) > 8 else "")
            raise UserError(f"run folder '{run.run_dir}' holds a completed run of other settings ({shown} differ "
                            f"from this sweep's): sweep into a new --out, or remove that run folder yourself")
    reused = {r.run_dir for r in completed}
    Path(sweep.out).mkdir(parents=True, exist_ok=True)
    sweep.save()
    for run in sweep.runs:
        run_dir = Path(run.run_dir)
        if run.run_dir in reused:
            if run.run_dir in earlier:      # keep what the run that completed it measured
                run.seconds, run.cpu_seconds = earlier[run.run_dir].seconds, earlier[run.run_dir].cpu_seconds
                run.returncode = earlier[run.run_dir].returncode
            run.status = "completed"
            log(f"[{run.name}] already completed, skipped")
            continue
        # The trainer starts a new run only in an empty run.dir: its output goes beside it.
        log_path = Path(sweep.out) / "logs" / f"{run.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "rlipv2_scale.cli", "train", sweep.recipe, *sweep.base_overrides, *run.overrides,
               f"run.dir={run_dir}", "--nproc", str(run.nproc)]
        log(f"[{run.name}] rlipv2 {' '.join(cmd[3:])}")
        t0, cpu0 = time.perf_counter(), _children_cpu()
        with log_path.open("w") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        run.seconds = round(time.perf_counter() - t0, 2)
        run.cpu_seconds = round(_children_cpu() - cpu0, 2)
        run.returncode = proc.returncode
        run.status = "completed" if proc.returncode == 0 and (run_dir / COMPLETED_MARKER).is_file() else "failed"
        log(f"[{run.name}] {run.status} in {run.seconds:.0f} s"
            + ("" if run.status == "completed" else f" (exit {proc.returncode}; see {log_path})"))
        sweep.save()
        if run.status == "failed" and stop_on_failure:
            break
    sweep.save()
    return sweep


def render_slurm(sweep: Sweep, opts, submit: bool = False) -> Sweep:
    """One SLURM job array per node count through `cluster/slurm.py` (array index i → run i of the
    node count's combinations, in `<sweep>/nodes-<n>/<i>`); with `submit`, sbatch each."""
    from dataclasses import replace

    from rlipv2_scale.cluster import slurm

    check_out(sweep, same_sweep=True)
    by_nodes: dict[int, list[SweepRun]] = {}
    for run in sweep.runs:
        by_nodes.setdefault(run.nodes, []).append(run)
    recipe_axes = [a for a in sweep.axes if a["key"] not in PSEUDO_KEYS]
    items = [f"{a['key']}={','.join(a['values'])}" for a in recipe_axes]
    for nodes, runs in by_nodes.items():
        job_dir = Path(sweep.out) / f"nodes-{nodes}"
        script, path = slurm.render_job(sweep.recipe, replace(opts, nodes=nodes), overrides=sweep.base_overrides,
                                        sweep=items or None, run_dir=job_dir)
        expected = slurm.expand_sweep(items) if items else [[]]
        for i, (run, combo) in enumerate(zip(runs, expected)):
            assert run.overrides == combo, (run.overrides, combo)   # the array's order is ours
            run.run_dir = str(job_dir / str(i)) if items else str(job_dir)
            run.nproc = opts.ranks_per_node
            run.status = "rendered"
        job = {"nodes": nodes, "script": str(path), "job_id": None}
        if submit:
            job["job_id"] = slurm.submit(path)
            for run in runs:
                run.status = "submitted"
        sweep.jobs.append(job)
    Path(sweep.out).mkdir(parents=True, exist_ok=True)
    sweep.save()
    return sweep
