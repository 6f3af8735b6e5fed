"""`benchmarks/gpu_step.py` on CPU with the tiny config: the path a GPU run takes, end to end."""
import importlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_step.py"


@pytest.fixture(scope="module")
def gpu_step():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_largest_batch_doubles_then_bisects_once(gpu_step):
    never = float("inf")
    assert gpu_step.largest_batch(lambda b: b <= 11, cap=32, deadline=never) == (8, [1, 2, 4, 8, 16, 12])
    assert gpu_step.largest_batch(lambda b: b <= 13, cap=32, deadline=never) == (12, [1, 2, 4, 8, 16, 12])
    assert gpu_step.largest_batch(lambda b: True, cap=6, deadline=never) == (5, [1, 2, 4, 5])
    assert gpu_step.largest_batch(lambda b: False, cap=8, deadline=never) == (0, [1])
    assert gpu_step.largest_batch(lambda b: True, cap=64, deadline=0.0) == (1, [1])   # no time left: stop


@pytest.mark.slow
def test_tiny_cpu_run_times_both_setups_and_writes_json_and_markdown(gpu_step, tmp_path):
    report = gpu_step.main(["--device", "cpu", "--tiny", "--setups", "kernels,reference", "--max-batch", "1",
                            "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_step.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    (config,) = saved["results"]
    assert config["config"] == "tiny" and [r["setup"] for r in config["setups"]] == ["kernels", "reference"]
    for row in config["setups"]:
        assert row["batch"] == 1 and row["images_per_s"] > 0 and row["dtype"] == "fp32"
        assert set(row["share"]) == {"ms_deform_attn", "alif", "backbone", "text_encoder", "other"}
        assert row["share"]["ms_deform_attn"] > 0 and row["share"]["alif"] > 0
        assert sum(row["share"].values()) == pytest.approx(1.0, abs=0.01) or row["share"]["other"] == 0
    assert config["speedup_vs_reference"] > 0
    md = (tmp_path / "gpu_step.md").read_text()
    assert "| tiny | reference | fp32 | 1 |" in md and saved["machine"]["torch"] == torch.__version__


@pytest.mark.slow
def test_reference_setup_runs_the_pytorch_references_and_kernels_setup_does_not(gpu_step, monkeypatch):
    """The reference setup's step runs ALIF on the eager core and deformable attention on
    grid_sample (the original's setup), forced through `dispatch.override`; the kernels setup
    forces nothing: on CPU `auto` keeps the eager ALIF core too (kernels/alif.py: `_choose`), so
    here the forced choices are checked through what each setup leaves in force."""
    from rlipv2_scale.kernels import alif, dispatch
    from rlipv2_scale.models.losses import SetCriterion

    msda_module = importlib.import_module("rlipv2_scale.kernels.ms_deform_attn")
    seen = []
    for module, name in ((alif, "attention_core_reference"), (alif, "attention_core_sdpa"),
                         (msda_module, "ms_deform_attn_reference")):
        monkeypatch.setattr(module, name, lambda *a, _f=getattr(module, name), _n=name: seen.append(_n) or _f(*a))
    model = gpu_step._model("tiny", torch.device("cpu"))
    forced = {}
    for setup, want in (("reference", {"attention_core_reference", "ms_deform_attn_reference"}),
                        ("kernels", {"attention_core_reference", "ms_deform_attn_reference"})):
        seen.clear()
        step = gpu_step._Setup(model, SetCriterion(), setup, torch.device("cpu"), (64, 64), (4, 3)).step_fn(1)
        monkeypatch.setattr(alif, "forced_choice", lambda op, _f=dispatch.forced_choice, _s=setup:
                            forced.setdefault(_s, set()).add((op, _f(op))) or _f(op))
        step()
        assert set(seen) == want, setup
    assert ("alif_bi_attention", "eager") in forced["reference"]
    assert all(choice is None for _, choice in forced["kernels"])
    assert dispatch._overrides == {}
