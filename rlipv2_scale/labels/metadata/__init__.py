"""Label spaces of the benchmarks, shipped as data (HICO-DET, V-COCO).

HICO-DET: 80 objects (index 0..79, COCO ids), 117 verbs (id 1..117), 600 HOI categories, the
valid verb-object matrix and the zero-shot splits. V-COCO: the 29 action-role classes and the 80 COCO
objects (+ index 80 "missing object").
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np


def _read_json(*parts: str) -> Any:
    return json.loads(resources.files(__package__).joinpath(*parts).read_text())


@lru_cache(maxsize=None)
def hico_objects() -> list[dict]:
    """80 entries {"index", "coco_id", "name", "hoi_name"} in index order (person = 0)."""
    return _read_json("hico", "objects.json")


@lru_cache(maxsize=None)
def hico_verbs() -> list[dict]:
    """117 entries {"id" 1..117, "index", "name" (underscores), "text" (spaces)}."""
    return _read_json("hico", "verbs.json")


@lru_cache(maxsize=None)
def hico_hoi_list() -> list[dict]:
    return _read_json("hico", "hoi_list.json")


@lru_cache(maxsize=None)
def hico_valid_verb_object() -> np.ndarray:
    """float64 [117, 80]: 1 where (verb index, object index) is one of the 600 HOIs."""
    with resources.files(__package__).joinpath("hico", "verb_object_valid.npy").open("rb") as f:
        return np.load(f)


@lru_cache(maxsize=None)
def hico_zero_shot_splits() -> dict:
    return _read_json("hico", "zero_shot_splits.json")


@lru_cache(maxsize=None)
def vcoco_verbs() -> list[dict]:
    """29 action-role classes {"index", "name", "action", "role", "text"}."""
    return _read_json("vcoco", "verbs.json")


@lru_cache(maxsize=None)
def vcoco_objects() -> dict:
    return _read_json("vcoco", "objects.json")
