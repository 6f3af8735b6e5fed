"""The top-level folders install under `rlipv2_scale`, never as generic top-level packages."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)


def test_subpackages_import_under_the_project_name(tmp_path):
    code = ("import rlipv2_scale.kernels as k, rlipv2_scale.eval as e, rlipv2_scale.cluster as c, "
            "rlipv2_scale.recipes as r; print(k.ms_deform_attn.__module__)")
    out = _run(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("rlipv2_scale.kernels")


def test_no_generic_top_level_packages_outside_the_checkout(tmp_path):
    for name in ("kernels", "eval", "cluster", "recipes"):
        out = _run(f"import {name}", tmp_path)
        assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, name


def test_transformers_does_not_take_our_kernels_for_the_hub_package():
    # Run from the checkout, where the folder `kernels/` is on sys.path ('' first).
    out = _run("from transformers.utils import import_utils as iu; print(iu.is_kernels_available())", ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_constraints_pin_every_declared_dependency_within_its_range():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            pins[canonicalize_name(name)] = pinned.strip()
    # What `make` installs: the core and the dev extra (the other extras are the user's choice).
    for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} has no tested version in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} outside {req.specifier}"
