"""Reading `torch.save` files without running code from them.

A full unpickle executes whatever the file names (`os.system`, ...); `torch.load(weights_only=True)`
rebuilds only tensors, containers and the classes allowed here. A file that needs anything else
is refused with one line naming the class and the fix, unless the caller was told to trust it.
"""
from __future__ import annotations

import pickle
import re
import sys
from pathlib import Path
from typing import Any, Iterable

import torch

from rlipv2_scale.errors import UserError

TRUST_HINT = "if you trust the file, pass --trust-pickle to unpickle it fully"


def torch_load(path: str | Path, allow: Iterable[Any] = (), trust_pickle: bool = False,
               hint: str = TRUST_HINT, what: str = "checkpoint") -> Any:
    """`torch.load(path)` on the CPU with `weights_only=True`, `allow` the classes and functions
    permitted beyond tensors and plain containers. `hint` is the fix named when a file needs more;
    `trust_pickle` unpickles it fully instead (with a warning: it can run code)."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return _load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(exc), re.IGNORECASE)
        if found is None:
            raise UserError(f"{what} '{path}' cannot be read as a torch.save file (not a pickle of "
                            "weights)") from None
        if not trust_pickle:
            raise UserError(f"{what} '{path}' holds pickled objects besides the weights ({found.group(1)}); "
                            f"{hint}") from None
        # One plain line, as every command warns (not Python's two-line warning with a source line).
        print(f"rlipv2: warning: unpickling '{path}' fully (--trust-pickle): this can run code from the file",
              file=sys.stderr, flush=True)
        return _load(path, weights_only=False)
    except (RuntimeError, EOFError, OSError) as exc:
        raise UserError(f"{what} '{path}' cannot be read as a torch.save file: {exc}") from None
    except (KeyError, ValueError, IndexError, TypeError) as exc:    # arbitrary bytes in torch's legacy reader
        raise UserError(f"{what} '{path}' cannot be read as a torch.save file ({type(exc).__name__}: {exc}); "
                        "is it the right file?") from None


def _load(path: Path, weights_only: bool) -> Any:
    try:   # memory-mapped: a 1.5 GB Swin-L file is not read into memory twice
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)   # legacy (non-zip) format
