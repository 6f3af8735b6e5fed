"""The `rlipv2` command: a thin layer over the library.

Each module in `COMMANDS` owns one command or one member of a command group (`rlipv2 data convert`,
`rlipv2 data synth`, ...) and exposes `register(tree: CommandTree)`. Handlers receive the parsed
`argparse.Namespace` and return an exit code. User errors raise `UserError`; they are printed as
one clear line (no traceback) and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import Callable

from rlipv2_scale.errors import UserError

COMMANDS = [
    "data_convert",
    "data_inspect",
    "data_synth",
    "data_subset",
    "data_pseudo",
    "model",
    "eval",
    "checkpoint",
    "train",
    "bench",
    "demo",
    "predict",
    "cluster",
    "scale",
]


DEVICE = re.compile(r"cpu|cuda(:\d+)?")       # what a --device option takes


def check_visible_device(device: str) -> None:
    """A `cuda` / `cuda:N` --device that this machine shows (cpu always passes), checked before any work."""
    if not device.startswith("cuda"):
        return
    import torch  # (here: every command would pay for importing it)

    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is visible here; use --device cpu")
    if int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


class CommandTree:
    """Top-level sub-commands plus named groups (`data`, `cluster`, ...) shared by modules."""

    def __init__(self, parser: argparse.ArgumentParser):
        self._root = parser.add_subparsers(dest="command", metavar="COMMAND")
        self._groups: dict[str, argparse._SubParsersAction] = {}

    def command(self, name: str, help: str, handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p = self._root.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    def group_command(self, group: str, name: str, help: str,
                      handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        if group not in self._groups:
            gp = self._root.add_parser(group, help=f"{group} commands")
            self._groups[group] = gp.add_subparsers(dest=f"{group}_command", metavar="COMMAND", required=True)
        p = self._groups[group].add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p


class _Version(argparse.Action):
    """`--version`: the installed package's version, read only when asked for."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from rlipv2_scale import __version__

        print(f"{parser.prog} {__version__}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """Every command's parser. Command modules import only light modules at the top and their logic in
    the handlers, so this (and `rlipv2 --help`) loads no torch, transformers, streaming, numpy, ..."""
    parser = argparse.ArgumentParser(prog="rlipv2", description="RLIPv2 at scale: data, training, evaluation.")
    parser.add_argument("--version", action=_Version, help="print the installed version and exit")
    tree = CommandTree(parser)
    for name in COMMANDS:
        importlib.import_module(f"rlipv2_scale.cli.{name}").register(tree)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may follow options (`rlipv2 train R --nproc 2 train.lr=1e-4`), which a
    # positional nargs="*" alone does not accept.
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"rlipv2: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
