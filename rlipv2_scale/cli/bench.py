"""`rlipv2 bench kernels`: microbenchmarks of the Triton kernels against their baselines."""
from __future__ import annotations

import argparse


def _kernels(args: argparse.Namespace) -> int:
    import torch  # (here: every command would pay for importing it)

    from rlipv2_scale.errors import UserError
    from rlipv2_scale.kernels.bench import microbench

    if args.reps < 1:
        raise UserError(f"--reps must be at least 1, got {args.reps}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    microbench.write_report(device, dtype, args.out, reduced=args.reduced, reps=args.reps, table_path=args.write_table)
    return 0


def register(tree) -> None:
    p = tree.group_command("bench", "kernels", "time ms_deform_attn and alif_bi_attention against their baselines",
                           _kernels)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--reduced", dest="reduced", action="store_true", default=None,
                      help="image 400x667 instead of 800x1333 (the default on cpu)")
    size.add_argument("--full", dest="reduced", action="store_false", help="image 800x1333 (the default on cuda)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement on cpu")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON report and PNG chart")
    p.add_argument("--write-table", nargs="?", const="kernels/dispatch_table.json", default=None, metavar="PATH",
                   help="CUDA, full size: merge the fastest accurate path per case into this dispatch table "
                        "(default kernels/dispatch_table.json), which backend='auto' reads")
