"""`rlipv2 data inspect`: print shard records as JSON lines, one per image, in source order."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def register(tree) -> None:
    p = tree.group_command("data", "inspect", "print the records of MDS shards as JSON lines", run)
    p.add_argument("shards", type=Path, help="folder written by `rlipv2 data convert`")
    p.add_argument("--limit", type=int, default=None, help="print at most this many records")


def run(args: argparse.Namespace) -> int:
    from rlipv2_scale.data.shards import iter_records
    from rlipv2_scale.errors import UserError

    if args.limit is not None and args.limit < 0:
        raise UserError(f"--limit must be 0 or more, got {args.limit}")
    try:
        for record in iter_records(args.shards, limit=args.limit):
            sys.stdout.write(json.dumps(record.inspect_line()) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:   # `| head` closed the pipe: not an error; silence the flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
