"""No code runs from a user's file: hostile pickles in a run directory (export, predict, init_from)
or as V-COCO detections are refused with one line naming the fix; `--trust-pickle` reads trusted
ones with a warning. Also the numeric options of `rlipv2 scale plan / sweep` (exit 2, one line)."""
from __future__ import annotations

import json
import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch

from rlipv2_scale.cli import main
from rlipv2_scale.errors import UserError

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny" / "pretrain" / "r50_vg.yaml"


class _RunsCode:
    """Unpickles to a shell command creating `marker`: what a full unpickle of a hostile file does."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


class _Custom:   # a harmless pickled object that is not plain data
    pass


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("rlipv2: error:")]
    assert len(lines) == 1, err
    return lines[0]


def checkpoint(run: Path, module_states: dict, zero: bool) -> Path:
    """A run directory laid out as the trainer writes it (stage 0: the module whole; ZeRO: shards)."""
    from rlipv2_scale.config import save_config

    from train_toy import toy_config

    ckpt = run / "checkpoints" / "step_00000001"
    (ckpt / "pytorch_model").mkdir(parents=True)
    (ckpt / "trainer.json").write_text(json.dumps({"step": 1}))
    (run / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    save_config(toy_config(str(run)), ckpt / "config.yaml")
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if zero else "mp_rank_00_model_states.pt"
    torch.save(module_states, ckpt / "pytorch_model" / name)
    if zero:
        torch.save(module_states, ckpt / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return ckpt


@pytest.mark.parametrize("zero", [False, True], ids=["stage0", "zero"])
def test_hostile_checkpoint_runs_no_code(tmp_path, capsys, zero):
    from rlipv2_scale.train.export import init_weights

    marker = tmp_path / "MARKER"
    run = tmp_path / "run"
    ckpt = checkpoint(run, {"module": {"w": torch.ones(2)}, "payload": _RunsCode(marker)}, zero)
    assert main(["export", str(run), "--out", str(tmp_path / "out.safetensors")]) == 2
    assert "--trust-pickle" in one_error_line(capsys)
    img = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(img)
    assert main(["predict", str(img), "--checkpoint", str(run), "--objects", "a,b", "--relations", "x",
                 "--out", str(tmp_path / "pred")]) == 2
    assert "--trust-pickle" in one_error_line(capsys)
    with pytest.raises(UserError, match=r"model_states\.pt' holds pickled objects.*train\.init_from") as err:
        init_weights(run)           # train.init_from=RUN
    assert str(ckpt / "pytorch_model") in str(err.value)
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "pred").exists()


def test_trusted_checkpoint_exports_with_a_warning(tmp_path, capsys):
    from safetensors.torch import load_file

    from rlipv2_scale.models.build import build_model
    from rlipv2_scale.train.config import load_run_config

    run = tmp_path / "run"
    ckpt = checkpoint(run, {"module": {}, "extra": _Custom()}, zero=False)
    torch.manual_seed(0)
    state = build_model(load_run_config(ckpt / "config.yaml").model, pretrained=False).state_dict()
    torch.save({"module": state, "extra": _Custom()}, ckpt / "pytorch_model" / "mp_rank_00_model_states.pt")
    out = tmp_path / "out.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "_Custom" in one_error_line(capsys) and not out.exists()
    assert main(["export", str(run), "--out", str(out), "--trust-pickle"]) == 0
    assert "rlipv2: warning: unpickling" in capsys.readouterr().err
    exported = load_file(str(out))
    assert all(torch.equal(exported[k], v.float()) for k, v in state.items())
    # an earlier export is replaced; a file of the user's at the path is not
    assert main(["export", str(run), "--out", str(out), "--trust-pickle"]) == 0
    mine = tmp_path / "mine.safetensors"
    mine.write_text("precious")
    assert main(["export", str(run), "--out", str(mine), "--trust-pickle"]) == 2
    assert "exists and is not a .safetensors weights file" in one_error_line(capsys)
    assert mine.read_text() == "precious"


def test_pickled_vcoco_detections_need_trust(tmp_path, capsys):
    from test_eval_vcoco import coco, detections, vcoco

    for name, data in (("vcoco.json", vcoco()), ("coco.json", coco())):
        (tmp_path / name).write_text(json.dumps(data))
    (tmp_path / "ids").write_text("1\n2\n")
    marker = tmp_path / "MARKER"
    (tmp_path / "hostile.pkl").write_bytes(pickle.dumps([_RunsCode(marker)]))
    (tmp_path / "dets.pkl").write_bytes(pickle.dumps(detections()))
    files = ["eval", "vcoco", "--vcoco", str(tmp_path / "vcoco.json"), "--coco", str(tmp_path / "coco.json"),
             "--image-ids", str(tmp_path / "ids")]
    for dets in ("hostile.pkl", "dets.pkl"):
        assert main(files + ["--detections", str(tmp_path / dets)]) == 2
        line = one_error_line(capsys)
        assert dets in line and "--trust-pickle" in line
    assert not marker.exists()
    assert main(files + ["--detections", str(tmp_path / "dets.pkl"), "--trust-pickle",
                         "--json", str(tmp_path / "out.json")]) == 0
    assert "rlipv2: warning: unpickling" in capsys.readouterr().err
    assert json.loads((tmp_path / "out.json").read_text())["AP_role_s2"] == pytest.approx(1.0)


@pytest.mark.parametrize("args, flag", [
    (["--resolution", "512"], "--resolution"), (["--resolution", "0x512"], "--resolution"),
    (["--mfu", "0"], "--mfu"), (["--mfu", "-1"], "--mfu"), (["--mfu", "1.5"], "--mfu"), (["--mfu", "nan"], "--mfu"),
    (["--interconnect", "0"], "--interconnect"), (["--images-per-epoch", "0"], "--images-per-epoch"),
    (["--gpus", "8,0"], "--gpus"),
])
def test_scale_plan_refuses_bad_numbers(tmp_path, capsys, args, flag):
    out = tmp_path / "plan"
    assert main(["scale", "plan", str(RECIPE), "--out", str(out), *args]) == 2
    assert flag in one_error_line(capsys) and not out.exists()


@pytest.mark.parametrize("args, flag", [
    (["--nproc", "0"], "--nproc"), (["--nodes", "0"], "--nodes"), (["--slurm", "--gpus-per-node", "-1"], "--gpus-per-node"),
])
def test_scale_sweep_refuses_bad_numbers(tmp_path, capsys, args, flag):
    out = tmp_path / "sweep"
    assert main(["scale", "sweep", str(RECIPE), "train.seed=1,2", "--out", str(out), "--dry-run", *args]) == 2
    assert flag in one_error_line(capsys) and not out.exists()


@pytest.mark.parametrize("content", [b"epoch 3: loss 0.5\n", b"\x80\x02}q\x00.", b"PK\x03\x04 not a zip"],
                         ids=["text", "bare-pickle-header", "broken-zip"])
def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path, capsys, content):
    """import-checkpoint (and every reader through safe_load) on bytes torch cannot read: one line."""
    bad = tmp_path / "model.pth"
    bad.write_bytes(content)
    assert main(["import-checkpoint", str(bad), "--config", "tiny", "--out", str(tmp_path / "m")]) == 2
    assert "cannot be read as a torch.save file" in one_error_line(capsys)
    assert not (tmp_path / "m").exists()
