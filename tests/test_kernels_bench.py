"""`rlipv2 bench kernels` on CPU with tiny cases: report contents, table, chart, errors."""
import json

import pytest
import torch

from rlipv2_scale.cli import build_parser
from rlipv2_scale.errors import UserError
from rlipv2_scale.kernels.bench import microbench


def _tiny_cases(device, dtype, reduced):
    return [microbench._msda_case("encoder", (64, 96), None, 1, dtype, device),
            microbench._alif_case("original (coarsest level)", 6, 8, 1, dtype, device)]


def test_level_shapes_of_the_reference_image():
    shapes = microbench.level_shapes(800, 1333)
    assert shapes == [(100, 167), (50, 84), (25, 42), (13, 21)]
    assert sum(h * w for h, w in shapes) == 22223


def test_compulsory_bytes_of_the_encoder_call_match_the_design_figures():
    case = microbench._msda_case("encoder", (800, 1333), None, 1, torch.bfloat16, "cpu")
    assert case.bytes_fwd / 1e6 == pytest.approx(39.8, abs=0.1)
    assert case.bytes_bwd / 1e6 == pytest.approx(68.3, abs=0.1)


def test_cpu_run_times_torch_paths_and_writes_json_and_png(tmp_path, monkeypatch):
    monkeypatch.setattr(microbench, "build_cases", _tiny_cases)
    args = build_parser().parse_args(["bench", "kernels", "--device", "cpu", "--reps", "2", "--out", str(tmp_path)])
    assert args.handler(args) == 0
    report = json.loads((tmp_path / "kernels_cpu_fp32.json").read_text())
    assert (tmp_path / "kernels_cpu_fp32.png").stat().st_size > 0
    assert report["reduced"] is True and report["machine"]["torch"] == torch.__version__
    backends = {(r["op"], r["backend"]) for r in report["results"]}
    assert backends == {("ms_deform_attn", "torch"), ("alif_bi_attention", "torch"), ("alif_bi_attention", "sdpa")}
    case = _tiny_cases("cpu", torch.float32, True)[0]
    row = next(r for r in report["results"] if r["op"] == "ms_deform_attn")
    assert row["fwd_gbps"] == pytest.approx(case.bytes_fwd / row["fwd_ms"] / 1e6)
    assert row["floor_share_fwd"] is None  # floors are GPU figures
    assert "sdpa" in microbench.table(report)


def test_sdpa_baseline_computes_the_same_block():
    case = _tiny_cases("cpu", torch.float32, True)[1]
    errors = microbench.check_case(case, "sdpa")
    assert errors["rel_err_vs_fp64"] < 1e-5 and errors["baseline_rel_err_vs_fp64"] < 1e-5


def test_cuda_request_without_a_device_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(UserError, match="no CUDA device"):
        microbench.run("cuda", "bf16")
