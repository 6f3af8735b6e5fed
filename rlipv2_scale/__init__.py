"""RLIPv2 at scale."""


def __getattr__(name: str) -> str:
    # `__version__` on demand: reading the installed metadata costs ~50 ms that only `--version` needs.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("rlipv2-scale")
        except PackageNotFoundError:      # a source tree that was never installed
            return "0+unknown"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
