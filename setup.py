"""Package layout: the top-level folders are sub-packages of `rlipv2_scale`.

`kernels/`, `eval/`, `cluster/` and `recipes/` live at the top of the tree (so a reader finds
them), but install as `rlipv2_scale.kernels` etc., so nothing generic such as `kernels` (a
Hugging Face package that transformers probes for) or `eval` is ever importable at top level.
"""
from setuptools import find_packages, setup

ROOTS = {
    "rlipv2_scale": "rlipv2_scale",
    "rlipv2_scale.kernels": "kernels",
    "rlipv2_scale.eval": "eval",
    "rlipv2_scale.cluster": "cluster",
    "rlipv2_scale.recipes": "recipes",
}

packages, package_dir = [], {}
for name, folder in ROOTS.items():
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=package_dir)
