"""`rlipv2 --help` stays fast: building the parser imports none of the heavy libraries (the robust form
of "under a second"; each command imports its logic in its handler)."""
import subprocess
import sys
from importlib.metadata import version

import pytest

HEAVY = ("torch", "transformers", "deepspeed", "streaming", "accelerate", "timm", "numpy", "PIL", "rich", "scipy")

# Runs the CLI in a fresh interpreter, then reports which heavy top-level packages it loaded.
PROBE = """
import sys
from rlipv2_scale.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("LOADED", ",".join(sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["data", "convert", "--help"],
                                  ["import-checkpoint", "--help"]])
def test_building_the_parser_imports_no_heavy_library(argv):
    out = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}" + PROBE, *argv],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage: rlipv2" in out.stdout
    loaded = out.stderr.rsplit("LOADED", 1)[1].strip()
    assert loaded == "", f"`rlipv2 {' '.join(argv)}` imported {loaded}"


def test_version_prints_the_installed_version():
    out = subprocess.run([sys.executable, "-m", "rlipv2_scale.cli", "--version"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"rlipv2 {version('rlipv2-scale')}"


def test_light_help_constants_match_the_library():
    from rlipv2_scale.data.constants import FORMAT_NAMES
    from rlipv2_scale.data.sources import FORMATS
    from rlipv2_scale.models.config import NAMED_CONFIGS, RELEASED

    assert FORMAT_NAMES == tuple(FORMATS)        # `--format` choices are the readers that exist
    assert set(RELEASED) <= set(NAMED_CONFIGS)
