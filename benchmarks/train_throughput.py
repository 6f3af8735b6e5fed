"""Training throughput and per-rank memory of the tiny recipe under DDP and ZeRO-1/2/3 (2 CPU ranks).

For each ZeRO stage (0 = plain data parallel) the script launches the real trainer on 2 ranks
through torchrun on synthetic shards, trains `--steps` steps of the tiny pre-training recipe and
reports images/s (median over the steps after `--warmup`) and, per rank, the bytes of parameters,
gradients and optimizer state that rank holds — where ZeRO's partitioning shows: stage 1 splits
the optimizer state, stage 2 also the gradients, stage 3 also the parameters.

    python benchmarks/train_throughput.py [--steps 8] [--warmup 3]

Prints a table and writes benchmarks/results/train_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tiny" / "pretrain" / "r50_vg_coco_o365.yaml"
STAGES = (0, 1, 2, 3)


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def rank_bytes(engine, optimizer) -> dict[str, int]:
    """Bytes this rank holds for parameters, gradients (after a backward) and optimizer state."""
    opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer   # DeepSpeed's optimizer
    params = 0
    for p in engine.module.parameters():
        params += _tensor_bytes(p.ds_tensor) if hasattr(p, "ds_tensor") else _tensor_bytes(p.data)
    grads = sum(_tensor_bytes(p.grad) for p in engine.module.parameters())
    flat = getattr(opt, "grad_partitions_flat_buffer", None)
    if flat is not None:            # ZeRO-3: one flat buffer of this rank's gradient partitions
        grads += _tensor_bytes(flat)
    else:                           # ZeRO-1/2: the reduced partitions of this rank
        for part in getattr(opt, "averaged_gradients", {}).values():
            grads += sum(_tensor_bytes(g) for g in part) if isinstance(part, list) else _tensor_bytes(part)
    inner = getattr(opt, "optimizer", opt)                                     # the client AdamW
    state = sum(_tensor_bytes(v) for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)
                and v.dim() > 0)
    # ZeRO's fp32 master partitions that the client optimizer steps (stage 0 has none).
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        state += sum(_tensor_bytes(t) for t in getattr(opt, name, []) or [])
    return {"params": params, "grads": grads, "optimizer_state": state}


def worker(stage: int, steps: int, warmup: int, run_dir: str, out: str) -> None:
    """One rank of one stage (run under torchrun)."""
    import torch.distributed as dist
    from accelerate.utils import set_seed

    from rlipv2_scale.train.config import load_run_config
    from rlipv2_scale.train.engine import Trainer, build_rlipv2
    from rlipv2_scale.train.launch import init_distributed

    cfg = load_run_config(RECIPE, [f"train.zero_stage={stage}", f"train.max_steps={steps}", f"run.dir={run_dir}",
                                   "checkpoint.at_end=false", "checkpoint.every_steps=1000000",
                                   "logging.progress=false", "logging.every_steps=1"])
    info = init_distributed()
    set_seed(cfg.train.seed)
    parts = build_rlipv2(cfg, info)
    set_seed(cfg.train.seed + info.rank)
    trainer = Trainer(cfg, info, parts.model, parts.criterion, parts.loader)
    trainer.fit()
    # One more forward + backward (no step) so that the gradients are held where the stage keeps them.
    batch = next(iter(parts.loader)).to(info.device)
    trainer.engine.backward(trainer._forward(batch)["loss"])
    sizes = rank_bytes(trainer.engine, trainer.optimizer)
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, sizes)
    if info.rank == 0:
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        ips = [r["images_per_s"] for r in records if r["step"] > warmup]
        n_params = sum(p.numel() for p in parts.model.parameters())
        Path(out).write_text(json.dumps({"zero_stage": stage, "images_per_s": statistics.median(ips),
                                         "images_per_s_all": ips, "parameters": n_params,
                                         "per_rank_bytes": gathered}))


def make_shards(root: Path) -> None:
    from rlipv2_scale.data.convert import convert
    from rlipv2_scale.data.synthetic import write_split

    write_split(root / "raw", 64, seed=0, split="train", size=128)
    for name in ("vg", "coco", "o365"):
        convert("vg", root / "raw" / "scene_graphs.json", root / "raw", root / "data/synthetic/shards" / name,
                progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_throughput.json")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        worker(args.worker, args.steps, args.warmup, args.run_dir, args.result)
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="rlipv2-bench-") as tmp:
        root = Path(tmp)
        make_shards(root)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for stage in STAGES:
            result = root / f"stage{stage}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(29600 + stage), str(Path(__file__).resolve()),
                   "--worker", str(stage), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--run-dir", str(root / f"run{stage}"), "--result", str(result)]
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"stage {stage} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            rows.append(json.loads(result.read_text()))

    print(f"{'mode':<8} {'images/s':>9}  {'params MiB/rank':>16} {'grads MiB/rank':>15} {'optim MiB/rank':>15}")
    for r in rows:
        mode = "DDP" if r["zero_stage"] == 0 else f"ZeRO-{r['zero_stage']}"
        mib = [[b[k] / 2**20 for b in r["per_rank_bytes"]] for k in ("params", "grads", "optimizer_state")]
        cells = ["/".join(f"{v:.2f}" for v in col) for col in mib]
        print(f"{mode:<8} {r['images_per_s']:>9.2f}  {cells[0]:>16} {cells[1]:>15} {cells[2]:>15}")
    report = {
        "benchmark": "train_throughput",
        "recipe": str(RECIPE.relative_to(ROOT)),
        "ranks": 2, "steps": args.steps, "warmup": args.warmup,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine()},
        "note": "2 CPU ranks (gloo, DeepSpeed CPU accelerator, fp32); per_rank_bytes lists rank 0 then rank 1",
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
