"""`rlipv2 model summary CONFIG [--json]`: parameter counts of a model config, per group."""
from __future__ import annotations

import argparse
import json

from rlipv2_scale.cli import CommandTree
from rlipv2_scale.models.config import NAMED_CONFIGS


def _summary(args: argparse.Namespace) -> int:
    from rlipv2_scale.models.summary import model_summary, resolve_config

    summary = model_summary(resolve_config(args.config))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"model {summary['config']}: {summary['total']:,} parameters ({summary['trainable']:,} trainable)")
    width = max(len(g) for g in summary["groups"])
    for group, n in sorted(summary["groups"].items(), key=lambda kv: -kv[1]):
        print(f"  {group:<{width}}  {n:>13,}")
    return 0


def register(tree: CommandTree) -> None:
    p = tree.group_command("model", "summary", "parameter counts of a model config (total, trainable, per group)",
                           _summary)
    p.add_argument("config", help=f"a named config ({', '.join(NAMED_CONFIGS)}) or a YAML file")
    p.add_argument("--json", action="store_true", help="print JSON: {config, total, trainable, groups}")
