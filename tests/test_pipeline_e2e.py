"""The paper's workflow through the public commands only, on the synthetic world (README: "From data to
a shared model"): train a tiny Relation Tagger -> caption / parse / tag / pseudo-label detection
scenes -> pre-train on 2 ranks on VG-format + pseudo-labelled shards -> export -> fine-tune on the
HICO-DET-format split from the exported directory -> export -> `eval hico-det --checkpoint` ->
`predict`. Every model directory is moved to another path before it is used. The fine-tuning run's
validation hook and `eval --checkpoint` score the same weights on the same split identically."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_TAGGER = ROOT / "recipes" / "tagger" / "tiny.yaml"
TINY_PRETRAIN = ROOT / "recipes" / "tiny" / "pretrain" / "r50_vg.yaml"
TINY_FINETUNE = ROOT / "recipes" / "tiny" / "finetune" / "hico_full_r50.yaml"


def rlipv2(cwd: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "rlipv2_scale.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"rlipv2 {' '.join(args)}\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def move(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dst))
    return dst


@pytest.mark.slow
@pytest.mark.distributed
def test_from_data_to_a_shared_model(tmp_path):
    w = tmp_path
    raw, shards = w / "raw", w / "data" / "synthetic" / "shards"    # the tiny recipes' default paths
    for split, n, seed in (("train", 12, 0), ("val", 6, 2)):
        rlipv2(w, "data", "synth", "--out", str(raw / split), "--images", str(n), "--seed", str(seed),
               "--size", "128", "--split", split, "--no-progress")
    rlipv2(w, "data", "synth", "--out", str(raw / "det"), "--images", "6", "--seed", "1", "--size", "128",
           "--no-progress")
    for fmt, ann, images, out, split in (
            ("vg", raw / "train/scene_graphs.json", raw / "train", shards / "vg", "train"),
            ("vg", raw / "det/scene_graphs.json", raw / "det", w / "det", "train"),
            ("hico-det", raw / "train/trainval_hico.json", raw / "train/images", shards / "hico", "train"),
            ("hico-det", raw / "val/val_hico.json", raw / "val/images", shards / "hico_val", "val")):
        rlipv2(w, "data", "convert", "--format", fmt, "--annotations", str(ann), "--images", str(images),
               "--out", str(out), "--split", split, "--workers", "1")

    # 1. the Relation Tagger, trained by the one trainer (task: tagger), exported, moved
    rlipv2(w, "train", str(TINY_TAGGER), f"run.dir={w / 'runs/tagger'}", "train.max_steps=2")
    rlipv2(w, "export", str(w / "runs/tagger"), "--out", str(w / "models/tagger"))
    tagger = move(w / "models/tagger", w / "elsewhere/tagger")

    # 2. pseudo-labels for the detection scenes
    rlipv2(w, "data", "caption", "--shards", str(w / "det"), "--out", str(w / "work/captions"), "--captioner",
           "synthetic", "--truth", str(w / "det"), "--num-captions", "3")
    rlipv2(w, "data", "parse", "--shards", str(w / "det"), "--captions", str(w / "work/captions"), "--paraphrases",
           "synthetic", "--out", str(w / "work/parse"))
    rlipv2(w, "data", "tag", "--shards", str(w / "det"), "--candidates", str(w / "work/parse"), "--checkpoint",
           str(tagger), "--classes", "synthetic", "--out", str(w / "work/tags"), "--eval-size", "128",
           "--max-size", "128")
    rlipv2(w, "data", "pseudo-label", "--shards", str(w / "det"), "--tags", str(w / "work/tags"), "--out",
           str(w / "pseudo"), "--dataset", "synthetic-det", "--threshold", "0.0")
    pseudo = next(p.parent for p in (w / "pseudo").rglob("index.json"))

    # 3. pre-training on 2 ranks, VG-format + pseudo-labelled shards; exported and moved
    rlipv2(w, "train", str(TINY_PRETRAIN), "--nproc", "2", f"run.dir={w / 'runs/pretrain'}", "train.max_steps=2",
           f"data.sources=[{{name: vg, local: '{shards / 'vg'}'}}, {{name: pseudo, local: '{pseudo}'}}]")
    rlipv2(w, "export", str(w / "runs/pretrain"), "--out", str(w / "models/pretrain"))
    pretrained = move(w / "models/pretrain", w / "elsewhere/pretrain")
    card = json.loads((pretrained / "card.json").read_text())
    assert card["task"] == "rlipv2" and card["steps"] == 2 and card["data"] == ["vg", "pseudo"]
    assert card["objects"] is None                                  # pre-training is open-vocabulary

    # 4. fine-tuning on the HICO-DET-format split from the exported directory, validated at its end
    rlipv2(w, "train", str(TINY_FINETUNE), f"run.dir={w / 'runs/finetune'}", f"train.init_from={pretrained}",
           "train.max_steps=2", "eval.max_batches=null")
    rlipv2(w, "export", str(w / "runs/finetune"), "--out", str(w / "models/finetune"))
    fine_tuned = move(w / "models/finetune", w / "elsewhere/finetune")
    assert json.loads((fine_tuned / "card.json").read_text())["objects"][:2] == ["person", "ball"]

    # 5. evaluation of the moved directory: the same mAP as the run's own validation of those weights
    rlipv2(w, "eval", "hico-det", "--checkpoint", str(fine_tuned), "--gt", str(raw / "val/val_hico.json"),
           "--images", str(raw / "val/images"), "--json", str(w / "eval.json"), "--device", "cpu")
    scored = json.loads((w / "eval.json").read_text())
    validated = [json.loads(x) for x in (w / "runs/finetune/metrics.jsonl").read_text().splitlines()
                 if "val/mAP" in x][-1]
    assert validated["step"] == 2 and validated["val/images"] == 6.0
    assert 100.0 * scored["mAP"] == pytest.approx(validated["val/mAP"], abs=1e-9)
    # the run directory itself is accepted too (exported on the fly): the same numbers
    rlipv2(w, "eval", "hico-det", "--checkpoint", str(w / "runs/finetune"), "--gt", str(raw / "val/val_hico.json"),
           "--images", str(raw / "val/images"), "--json", str(w / "eval_run.json"))
    assert json.loads((w / "eval_run.json").read_text())["mAP"] == scored["mAP"]

    # 6. predict with the model's own label lists and input size
    image = next((raw / "val/images").iterdir())
    rlipv2(w, "predict", str(image), "--checkpoint", str(fine_tuned), "--out", str(w / "predicted"))
    predicted = json.loads((w / "predicted/predictions.json").read_text())
    assert predicted["size"] == 128 and predicted["objects"][0] == "person" and len(predicted["images"]) == 1
