"""SLURM jobs rendered from recipes: sbatch script + per-node launcher, submit, status, cancel, sweeps.

`render_job` validates the recipe (a bad key fails here, at submit time, not in the queue), writes
the resolved recipe, the sbatch script and the node launcher into the run directory, and returns
the sbatch text. `submit` hands it to `sbatch`. Sweeps over recipe keys become one job array whose
index selects a line of overrides.
"""
from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from rlipv2_scale.config import save_config, split_values
from rlipv2_scale.errors import UserError

TEMPLATES = Path(__file__).parent / "templates"

# What users give is checked before it is written into a script (nothing from a flag may run as a
# command). #SBATCH values must fit SLURM's own formats; values placed in double quotes on the node
# (--env, --scratch) may name node variables ($NAME, ${NAME}) and hold nothing else the shell expands.
_TIME = re.compile(r"\d+(?::\d+){0,2}|\d+-\d+(?::\d+){0,2}|UNLIMITED|INFINITE")   # sbatch --time formats
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_NAMES = re.compile(r"[A-Za-z0-9_.-]+(?:,[A-Za-z0-9_.-]+)*")
_MEM = re.compile(r"\d+[KMGT]?")
_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NODE_VALUE = re.compile(r'(?:[^"`\\$\x00-\x1f\x7f]|\$[A-Za-z_][A-Za-z0-9_]*|\$\{[A-Za-z_][A-Za-z0-9_]*\})*')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# sbatch splits an #SBATCH line at whitespace and strips quotes itself (no shell quoting works
# there), and reads '%' and '\' in --output as its file-name pattern.
_SBATCH_UNSAFE = re.compile(r"[\s'\"%\\]")

# Node-local scratch unless --scratch: expanded on the node.
DEFAULT_SCRATCH = "${SLURM_TMPDIR:-${TMPDIR:-/tmp}}"
# Exported to every job: NCCL reports errors instead of hanging, and fails fast on a dead peer.
DEFAULT_ENV = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "${NCCL_DEBUG:-WARN}",
    "WANDB_MODE": "${WANDB_MODE:-offline}",
    "PYTHONUNBUFFERED": "1",
}


@dataclass
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 8
    procs_per_node: int | None = None      # default: one rank per GPU, or 1 on CPU nodes
    cpus_per_task: int | None = None       # default: 8 per GPU, or 1 per rank on CPU nodes
    partition: str | None = None
    account: str | None = None
    time: str | None = None                # SLURM time limit, e.g. "2-00:00:00"
    mem: str | None = None
    signal: str = "USR1@120"               # signal and lead time before the limit
    job_name: str = "rlipv2"
    max_requeues: int = 50
    scratch: str | None = None             # node-local scratch (default: DEFAULT_SCRATCH)
    setup: list[str] = field(default_factory=list)      # site lines: module load, conda activate, ...
    container: str | None = None           # prefix of each node's launcher, e.g. "apptainer exec --nv img.sif"
    extra_sbatch: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable

    def __post_init__(self) -> None:
        for flag, value, least in (("--nodes", self.nodes, 1), ("--gpus-per-node", self.gpus_per_node, 0),
                                   ("--procs-per-node", self.procs_per_node, 1),
                                   ("--cpus-per-task", self.cpus_per_task, 1)):
            if value is not None and value < least:
                raise ValueError(f"{flag} must be ≥ {least}, got {value}")
        for flag, value, pattern, what in (
                ("--partition", self.partition, _NAMES, "a partition name or comma-separated list, e.g. gpu"),
                ("--account", self.account, _NAME, "an account name, e.g. proj123"),
                ("--time", self.time, _TIME, "a SLURM time limit, e.g. 2-00:00:00, 12:00:00 or 90 (minutes)"),
                ("--mem", self.mem, _MEM, "a memory size, e.g. 64G"),
                ("--job-name", self.job_name, _NAME, "a name of letters, digits, '_', '.' and '-'")):
            if value is not None and not pattern.fullmatch(value):
                raise ValueError(f"{flag} {value!r} is not {what}")
        for key, value in self.env.items():
            if not _VAR.fullmatch(key) or not _NODE_VALUE.fullmatch(value):
                raise ValueError(f"--env {key}={value!r}: a NAME and a one-line value that may name node variables "
                                 "($NAME, ${NAME}) but holds no quotes, backticks, backslashes or other $")
        if self.scratch is not None and not _NODE_VALUE.fullmatch(self.scratch):
            raise ValueError(f"--scratch {self.scratch!r}: a one-line path that may name node variables ($NAME, "
                             "${NAME}) but holds no quotes, backticks, backslashes or other $")
        if self.container is not None and _CONTROL.search(self.container):
            raise ValueError(f"--container {self.container!r} must be one line")
        for line in self.extra_sbatch:
            if _CONTROL.search(line) or not line.startswith("-"):
                raise ValueError(f"--sbatch {line!r} must be one option on one line, e.g. --qos=high")
            if re.search(r"\s", line):    # sbatch would split it there, whatever the quoting
                raise ValueError(f"--sbatch {line!r} holds a space: give one option joined to its value by '=' "
                                 "and without spaces, e.g. --qos=high")
        if not re.fullmatch(r"(?:[BR]:)?(?:SIG)?[A-Z0-9]+(?:@\d+)?", self.signal):
            raise ValueError(f"--signal '{self.signal}' is not of the form USR1@120")

    @property
    def ranks_per_node(self) -> int:
        return self.procs_per_node if self.procs_per_node is not None else max(self.gpus_per_node, 1)

    @property
    def signal_name(self) -> str:
        name = self.signal.split(":")[-1].split("@")[0]
        return name if name.startswith("SIG") or name.isdigit() else name

    @property
    def cpus(self) -> int:
        if self.cpus_per_task:
            return self.cpus_per_task
        # Not the submitting host's core count: a login node says nothing about the compute nodes.
        return 8 * self.gpus_per_node if self.gpus_per_node else self.ranks_per_node


def expand_sweep(sweep: list[str]) -> list[list[str]]:
    """`["model.name=tiny,r50", "train.lr=1e-4,2e-4"]` → the cross product as override lists."""
    axes = []
    for item in sweep:
        if "=" not in item:
            raise UserError(f"sweep '{item}' is not of the form key=v1,v2,...")
        if _CONTROL.search(item):   # the job reads a member's overrides as one tab-separated line
            raise UserError(f"sweep {item!r}: values must not hold tabs, line breaks or other control characters")
        key, values = item.split("=", 1)
        axes.append([f"{key}={v}" for v in split_values(values)])
    return [list(combo) for combo in itertools.product(*axes)] if axes else []


def _load_recipe(recipe: Path, overrides: list[str]):
    from rlipv2_scale.train.config import load_run_config  # the trainer's schema is the one truth

    return load_run_config(recipe, overrides)


def render_job(recipe: str | Path, opts: SlurmOptions, overrides: list[str] | None = None,
               sweep: list[str] | None = None, run_dir: str | Path | None = None) -> tuple[str, Path]:
    """Validate the recipe, write the job files into the run directory; returns (sbatch text, path)."""
    recipe = Path(recipe)
    overrides = list(overrides or [])
    cfg = _load_recipe(recipe, overrides)
    combos = expand_sweep(sweep or [])
    for combo in combos:                       # every array member must validate too
        _load_recipe(recipe, overrides + combo)
    run_dir = Path(run_dir or cfg.run.path).resolve()
    for what, text in (("recipe file name", recipe.name), ("run directory", str(run_dir))):
        if _CONTROL.search(text):   # both are written into #SBATCH and comment lines
            raise UserError(f"{what} {text!r} holds a line break or control character; rename it")
    bad = _SBATCH_UNSAFE.search(str(run_dir))
    if bad:                         # it is written unquoted into `#SBATCH --output`
        raise UserError(f"run directory {str(run_dir)!r} holds {'a space' if bad[0].isspace() else repr(bad[0])}, "
                        "which an #SBATCH line cannot carry: choose a path without spaces, quotes, '%' or "
                        "backslashes (--run-dir, or the recipe's run.dir)")
    job_dir = run_dir / "slurm"
    job_dir.mkdir(parents=True, exist_ok=True)
    resolved = job_dir / "recipe.yaml"
    save_config(cfg, resolved)

    sweep_file = None
    if combos:
        sweep_file = job_dir / "sweep.txt"
        sweep_file.write_text("".join("\t".join(c) + "\n" for c in combos))

    # The node's cores shared by its ranks (one task per node runs every rank of the node).
    env = {**DEFAULT_ENV, "OMP_NUM_THREADS": f"${{OMP_NUM_THREADS:-{max(1, opts.cpus // opts.ranks_per_node)}}}"}
    if opts.gpus_per_node == 0:
        env["DS_ACCELERATOR"] = "cpu"       # DeepSpeed on CPU nodes; the trainer uses gloo there
    env.update(opts.env)
    jenv = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True)
    values = dict(
        recipe_name=recipe.name, job_name=opts.job_name, nodes=opts.nodes, cpus_per_task=opts.cpus,
        gpus_per_node=opts.gpus_per_node, partition=opts.partition, account=opts.account, time=opts.time,
        mem=opts.mem, array=f"0-{len(combos) - 1}" if combos else None, signal=opts.signal,
        signal_name=opts.signal_name, log_dir=str(run_dir / "logs"), extra_sbatch=opts.extra_sbatch,
        setup=opts.setup, container=opts.container, run_dir=shlex.quote(str(run_dir)), sweep_file=shlex.quote(str(sweep_file or "")),
        resolved_recipe=shlex.quote(str(resolved)), port_base=20000, port_range=20000, env=env,
        node_script=shlex.quote(str(job_dir / "node.sh")), max_requeues=opts.max_requeues,
        scratch=opts.scratch or DEFAULT_SCRATCH, python=shlex.quote(opts.python), procs_per_node=opts.ranks_per_node,
    )
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (job_dir / "node.sh").write_text(jenv.get_template("node.sh.j2").render(values))
    script = jenv.get_template("train.sbatch.j2").render(values)
    path = job_dir / "job.sbatch"
    path.write_text(script)
    return script, path


def _slurm_bin(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise UserError(f"'{name}' not found: run on a SLURM login node, or start the local test cluster "
                        f"with cluster/local/up.sh and export SLURM_CONF")
    return found


def submit(script_path: Path) -> str:
    """sbatch the rendered script; returns the job id."""
    proc = subprocess.run([_slurm_bin("sbatch"), "--parsable", str(script_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"sbatch rejected {script_path}: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


_JOB_ID = re.compile(r"\d+(?:_\d+)?")   # a job, or one task of a job array (12345_3)


def check_job_id(job_id: str) -> str:
    """A SLURM job id as `squeue -j` / `scancel` take it; anything else (an option such as
    `--user=root`, a path, a name) is refused before a command is run."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise UserError(f"job id {job_id!r} is not a SLURM job id: give the number `rlipv2 cluster submit` "
                        f"printed (e.g. 12345, or 12345_3 for one task of a job array)")
    return job_id


def status(job_id: str | None = None) -> str:
    args = [_slurm_bin("squeue"), "-o", "%.18i %.9P %.30j %.8T %.10M %.6D %R"]
    args += ["-j", check_job_id(job_id)] if job_id is not None else ["-u", os.environ.get("USER", "root")]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"squeue failed: {proc.stderr.strip()}")
    return proc.stdout


def cancel(job_id: str) -> None:
    check_job_id(job_id)
    proc = subprocess.run([_slurm_bin("scancel"), job_id], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"scancel {job_id} failed: {proc.stderr.strip()}")
