"""`rlipv2 bench kernels` on CPU with tiny cases: report contents, table, chart, errors."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

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
    assert backends == {("ms_deform_attn", "torch"), ("alif_bi_attention", "eager"), ("alif_bi_attention", "sdpa")}
    if microbench._xformers_core() is None:   # the absent baseline is named, not silently dropped
        assert [e["backend"] for e in report["skipped"]] == ["xformers"]
        assert "xformers is not installed" in microbench.table(report)
    case = _tiny_cases("cpu", torch.float32, True)[0]
    row = next(r for r in report["results"] if r["op"] == "ms_deform_attn")
    assert row["fwd_gbps"] == pytest.approx(case.bytes_fwd / row["fwd_ms"] / 1e6)
    assert row["floor_share_fwd"] is None  # floors are GPU figures
    assert "sdpa" in microbench.table(report)


def test_sdpa_row_computes_the_same_block_and_gradients():
    case = _tiny_cases("cpu", torch.float32, True)[1]
    errors = microbench.check_case(case, "sdpa")
    assert errors["rel_err_vs_fp64"] < 1e-5 and errors["baseline_rel_err_vs_fp64"] < 1e-5
    assert 0 < errors["grad_rel_err_vs_fp64"] < 1e-5 and errors["baseline_grad_rel_err_vs_fp64"] < 1e-5
    assert microbench.accurate(errors, "fp32")


def test_check_case_sees_a_wrong_gradient():
    case = _tiny_cases("cpu", torch.float32, True)[1]

    class Scaled(torch.autograd.Function):   # right forward, gradient off by 10 %
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.1

    sdpa = case.runners["sdpa"]
    case.runners["wrong"] = lambda **kw: tuple(Scaled.apply(o) for o in sdpa(**kw))
    errors = microbench.check_case(case, "wrong")
    assert errors["rel_err_vs_fp64"] < 1e-5 and errors["grad_rel_err_vs_fp64"] > 0.05
    assert not microbench.accurate(errors, "bf16")


def test_xformers_bias_rows_start_on_multiples_of_8_and_mask_padded_keys():
    mask = torch.zeros(2, 13, dtype=torch.bool)
    mask[0, 10:] = True
    mask[1] = True    # every key padded: left unmasked (the caller zeroes that output)
    bias = microbench.padded_key_bias(mask, heads=3, queries=5, dtype=torch.float32)
    assert bias.shape == (2, 3, 5, 13) and bias.stride(-2) % 8 == 0 and bias.stride(-1) == 1
    assert torch.isinf(bias[0, :, :, 10:]).all() and (bias[0, :, :, :10] == 0).all()
    assert (bias[1] == 0).all()


def _cuda_report(dtype="bf16"):
    rows = [dict(op="alif_bi_attention", case="original", tokens=273, backend=b, fwdbwd_ms=ms)
            for b, ms in (("eager", 2.4), ("sdpa", 1.4), ("triton", 2.0), ("xformers", 1.0))]
    rows += [dict(op="alif_bi_attention", case="all levels", tokens=22223, backend=b, fwdbwd_ms=ms)
             for b, ms in (("eager", 6.2), ("sdpa", 5.4), ("triton", 2.9))]
    rows += [dict(op="ms_deform_attn", case="encoder", tokens=22223, backend=b, fwdbwd_ms=ms)
             for b, ms in (("torch", 12.8), ("triton", 0.76), ("triton_dense", 0.3))]
    ok = dict(rel_err_vs_fp64=1e-3, grad_rel_err_vs_fp64=1e-3, baseline_rel_err_vs_fp64=1e-1,
              baseline_grad_rel_err_vs_fp64=1e-1)
    bad = {**ok, "grad_rel_err_vs_fp64": 0.9}
    checks = [dict(op="ms_deform_attn", case="encoder", backend="triton_dense", **bad),
              dict(op="alif_bi_attention", case="all levels", backend="triton", **ok)]
    return dict(machine=dict(device="cuda", card="NVIDIA Test", capability="sm_90", commit="abc", torch="t",
                             triton="x"), dtype=dtype, reduced=False, results=rows, correctness=checks)


def test_dispatch_entries_take_the_fastest_accurate_dispatchable_row(tmp_path):
    entries = microbench.dispatch_entries(_cuda_report())
    # xformers is faster but not a dispatch choice; the dense backward is faster but failed its check
    assert entries == {"alif_bi_attention": {"bf16": {"273": "torch", "22223": "triton"}},
                       "ms_deform_attn": {"bf16": {"22223": "atomic"}}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"devices": {"sm_90": {"alif_bi_attention": {"fp32": {"273": "eager"}}}}}))
    microbench.write_table(_cuda_report(), path)
    table = json.loads(path.read_text())
    assert table["devices"]["sm_90"]["alif_bi_attention"] == {"fp32": {"273": "eager"},
                                                               "bf16": {"273": "torch", "22223": "triton"}}
    assert table["devices"]["NVIDIA Test"] == entries
    with pytest.raises(UserError, match="CUDA run"):
        microbench.dispatch_entries({**_cuda_report(), "reduced": True})


def test_cuda_request_without_a_device_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(UserError, match="no CUDA device"):
        microbench.run("cuda", "bf16")


RUN_ALL = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu" / "run_all.sh"


def test_run_all_parts_fit_eight_minutes_and_need_a_gpu(tmp_path):
    text = RUN_ALL.read_text()
    budget = {k: int(v) for k, v in re.findall(r"\b(T_[A-Z_]+)=(\d+)", text)}
    parts = budget["T_ENV"] + budget["T_GATE"] + 2 * budget["T_BENCH"] + budget["T_TILES"] + budget["T_STEP"] \
        + budget["T_SUMMARY"]
    assert parts <= 480 and budget["T_STEP_BUDGET"] < budget["T_STEP"]
    # every timed part uses its own timeout variable
    for var in ("T_GATE", "T_BENCH", "T_TILES", "T_STEP", "T_SUMMARY"):
        assert f'"${var}"' in text, var
    assert subprocess.run(["bash", "-n", str(RUN_ALL)]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    run = subprocess.run(["bash", str(RUN_ALL)], env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "needs torch and triton with a visible CUDA device" in run.stderr


def _bench_report(dtype, rows, skipped=()):
    results = [dict(op=op, case=case, backend=b, fwd_ms=f, fwdbwd_ms=fb, floor_share_fwdbwd=share)
               for op, case, b, f, fb, share in rows]
    return dict(machine=dict(card="NVIDIA Test", driver="1.0", torch="t", triton="x", cuda="c", commit="abc"),
                dtype=dtype, results=results, skipped=list(skipped), correctness=[])


def test_gpu_summary_sets_each_measure_beside_its_target(tmp_path):
    from rlipv2_scale.kernels.bench import gpu_summary

    bf16 = [("ms_deform_attn", "encoder", "torch", 4.0, 12.8, 0.003),
            ("ms_deform_attn", "encoder", "triton", 0.1, 0.76, 0.048),
            ("ms_deform_attn", "encoder", "triton_dense", 0.1, 0.2, 0.18),
            ("alif_bi_attention", "original (coarsest level)", "sdpa", 0.3, 1.4, None),
            ("alif_bi_attention", "original (coarsest level)", "triton", 0.4, 2.0, None),
            ("alif_bi_attention", "all levels", "eager", 2.2, 6.0, None),
            ("alif_bi_attention", "all levels", "triton", 0.7, 3.0, None)]
    fp32 = [("alif_bi_attention", "all levels", "eager", 5.8, 16.0, None),
            ("alif_bi_attention", "all levels", "sdpa", 6.5, 36.0, None)]
    no_xformers = dict(op="alif_bi_attention", case="original", backend="xformers", error="xformers is not installed")
    (tmp_path / "kernels_cuda_bf16.json").write_text(json.dumps(_bench_report("bf16", bf16, [no_xformers])))
    (tmp_path / "kernels_cuda_fp32.json").write_text(json.dumps(_bench_report("fp32", fp32)))
    (tmp_path / "dispatch_table.json").write_text(json.dumps({"devices": {"NVIDIA Test": {
        "alif_bi_attention": {"fp32": {"273": "torch", "22223": "eager"}}}}}))
    summary = gpu_summary.summarize(tmp_path)
    by = {c["what"]: c for c in summary["checks"]}
    assert by["ALIF bf16 original: SDPA ms / Triton ms"]["value"] == pytest.approx(0.7)
    assert by["ALIF bf16 original: SDPA ms / Triton ms"]["met"] is False
    assert by["ALIF bf16 all levels: eager ms / Triton ms"]["value"] == pytest.approx(2.0)
    assert by["ALIF fp32 all levels: eager ms / auto's choice (eager) ms"]["met"] is True
    floor = by["MSDA bf16 encoder f+b: share of the compulsory-bytes floor (best backward)"]
    assert floor["value"] == pytest.approx(18) and floor["met"] is True
    assert by["MSDA bf16 encoder forward: reference ms / Triton ms"]["value"] == pytest.approx(40)
    assert any("xformers is not installed" in w and by[w]["met"] is False for w in by)
    assert by["training step (gpu_step.py)"]["met"] is False          # the part that did not run is named
    assert "| NO |" in (tmp_path / "summary.md").read_text()


def test_a_written_table_is_what_auto_then_picks(tmp_path, monkeypatch):
    """The regeneration path end to end: a CUDA report -> write_table -> RLIPV2_DISPATCH_TABLE ->
    table_choice, for a card the shipped table does not name."""
    from types import SimpleNamespace

    from rlipv2_scale.kernels import dispatch

    path = microbench.write_table(_cuda_report(), tmp_path / "measured.json")
    monkeypatch.setenv(dispatch.TABLE_ENV, str(path))
    monkeypatch.setattr(dispatch, "device_keys", lambda index: ("NVIDIA Test", "sm_90"))
    dispatch.load_table.cache_clear()
    try:
        t = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=SimpleNamespace(index=0))
        assert dispatch.table_choice("alif_bi_attention", t, 273) == "torch"
        assert dispatch.table_choice("alif_bi_attention", t, 22223) == "triton"
        assert dispatch.table_choice("ms_deform_attn", t, 22223) == "atomic"
    finally:
        dispatch.load_table.cache_clear()


def test_no_timed_repetition_is_refused_before_anything_runs(tmp_path, capsys):
    from rlipv2_scale.cli import main

    assert main(["bench", "kernels", "--device", "cpu", "--reps", "0", "--out", str(tmp_path)]) == 2
    assert "--reps must be at least 1, got 0" in capsys.readouterr().err and not any(tmp_path.iterdir())
