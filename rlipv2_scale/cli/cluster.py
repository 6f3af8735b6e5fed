"""`rlipv2 cluster submit|status|cancel`: SLURM jobs rendered from recipes."""
from __future__ import annotations

import argparse

from rlipv2_scale.errors import UserError


def _env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"--env '{item}' is not of the form NAME=VALUE")
        env[key] = value
    return env


def _submit(args: argparse.Namespace) -> int:
    from rlipv2_scale.cluster.slurm import SlurmOptions, render_job, submit

    try:
        opts = SlurmOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node, procs_per_node=args.procs_per_node,
                            cpus_per_task=args.cpus_per_task, partition=args.partition, account=args.account,
                            time=args.time, mem=args.mem, signal=args.signal, job_name=args.job_name,
                            setup=args.setup or [], container=args.container, extra_sbatch=args.sbatch or [],
                            env=_env(args.env or []), scratch=args.scratch)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    script, path = render_job(args.recipe, opts, overrides=args.overrides, sweep=args.sweep, run_dir=args.run_dir)
    if args.dry_run:
        print(script, end="")
        print(f"# written to {path} (not submitted: --dry-run)")
        return 0
    job_id = submit(path)
    print(f"submitted job {job_id}: {path}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from rlipv2_scale.cluster.slurm import status

    print(status(args.job_id), end="")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from rlipv2_scale.cluster.slurm import cancel

    cancel(args.job_id)
    print(f"cancelled {args.job_id}")
    return 0


def register(tree) -> None:
    p = tree.group_command("cluster", "submit", "render a recipe into an sbatch job and submit it", _submit)
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="0 for CPU nodes (gloo)")
    p.add_argument("--procs-per-node", type=int, default=None, help="ranks per node (default: GPUs, or 1)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", help="time limit, e.g. 2-00:00:00")
    p.add_argument("--mem")
    p.add_argument("--signal", default="USR1@120", help="preemption signal and seconds before the limit")
    p.add_argument("--job-name", default="rlipv2")
    p.add_argument("--run-dir", help="run directory (default: the recipe's run.dir)")
    p.add_argument("--sweep", action="append", metavar="key=v1,v2", help="job array over recipe values")
    p.add_argument("--setup", action="append", metavar="LINE", help="site set-up line (module load ...)")
    p.add_argument("--container", metavar="PREFIX",
                   help="command each node's launcher runs under, e.g. 'apptainer exec --nv image.sif'")
    p.add_argument("--sbatch", action="append", metavar="OPTION", help="extra #SBATCH option")
    p.add_argument("--env", action="append", metavar="NAME=VALUE",
                   help="exported to every rank, e.g. NCCL_SOCKET_IFNAME=ib0")
    p.add_argument("--scratch", metavar="DIR",
                   help="node-local scratch for TMPDIR and the streaming cache (default: $SLURM_TMPDIR, $TMPDIR, /tmp)")
    p.add_argument("--dry-run", action="store_true", help="print the job instead of submitting it")

    p = tree.group_command("cluster", "status", "show queued and running jobs", _status)
    p.add_argument("job_id", nargs="?")
    p = tree.group_command("cluster", "cancel", "cancel a job", _cancel)
    p.add_argument("job_id")
