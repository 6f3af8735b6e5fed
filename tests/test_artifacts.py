"""The model directory (models/artifacts.py): relocatable, self-contained, strict, one owner."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from rlipv2_scale.errors import UserError
from rlipv2_scale.models.artifacts import (
    CARD_FILE,
    CONFIG_FILE,
    TOKENIZER_DIR,
    WEIGHTS_FILE,
    ModelCard,
    load_state,
    read_model_dir,
    resolve_pretrained,
    save_model_dir,
)
from rlipv2_scale.models.build import build_model, load_pretrained
from rlipv2_scale.models.config import named_config
from rlipv2_scale.models.rlipv2 import RLIPv2
from rlipv2_scale.models.tagger import RelationTagger


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(named_config("tiny"), pretrained=False).eval()
    out = tmp_path_factory.mktemp("m") / "tiny"
    model.save_pretrained(out, ModelCard(objects=["a", "b"], relations=["x"], eval_size=96, max_size=128,
                                         metrics={"val/mAP": 12.5}))
    return model, out


def test_saved_directory_is_relocatable_and_loads_the_same_model(saved, tmp_path):
    model, out = saved
    assert (out / TOKENIZER_DIR / "tokenizer.json").is_file() and (out / "README.md").is_file()
    assert f"tokenizer: {TOKENIZER_DIR}\n" in (out / CONFIG_FILE).read_text()      # relative, not absolute
    moved = shutil.copytree(out, tmp_path / "somewhere" / "else")
    loaded = RLIPv2.from_pretrained(moved)
    assert loaded.card.objects == ["a", "b"] and loaded.card.eval_size == 96 and not loaded.training
    texts = (["a", "b", "no objects"], ["x"])
    images, mask = torch.rand(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        a, b = model(images, mask, *texts), loaded(images, mask, *texts)
    assert torch.equal(a.pred_rel_logits, b.pred_rel_logits)
    assert load_pretrained(str(moved)).card.metrics == {"val/mAP": 12.5}


def test_wrong_class_missing_files_and_mismatched_weights_are_named(saved, tmp_path):
    _, out = saved
    with pytest.raises(UserError, match="holds an RLIPv2 detector; load it with RLIPv2.from_pretrained"):
        RelationTagger.from_pretrained(out)
    for missing, pattern in ((WEIGHTS_FILE, "'model.safetensors' is missing"),
                             (TOKENIZER_DIR, "tokenizer folder 'tokenizer/', which is missing")):
        broken = shutil.copytree(out, tmp_path / f"no_{missing}")
        (shutil.rmtree if (broken / missing).is_dir() else lambda p: p.unlink())(broken / missing)
        with pytest.raises(UserError, match=pattern):
            load_pretrained(str(broken))
    other = shutil.copytree(out, tmp_path / "other")
    (other / CONFIG_FILE).write_text((other / CONFIG_FILE).read_text().replace("num_queries: 20", "num_queries: 24"))
    with pytest.raises(UserError, match="does not fit the model: shape mismatch .*tgt_embed.weight \\(20, 64\\) vs \\(24, 64\\)"):
        load_pretrained(str(other))
    card = json.loads((other / CARD_FILE).read_text())
    (other / CARD_FILE).write_text(json.dumps({**card, "colour": "red"}))
    with pytest.raises(UserError, match="unknown config key 'card.colour'"):
        read_model_dir(other)


def test_save_never_replaces_a_folder_that_is_not_a_model_directory(saved, tmp_path):
    model, _ = saved
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a model directory"):
        save_model_dir(precious, model.cfg, model.state_dict(), ModelCard())
    assert (precious / "notes.txt").read_text() == "mine"


def test_strict_loader_allows_only_the_listed_reinitialised_keys(saved):
    model, _ = saved
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    fresh = build_model(named_config("tiny"), pretrained=False)
    with pytest.raises(UserError, match="missing"):
        load_state(fresh, state, "x")
    assert load_state(fresh, state, "x", reinit=["classifier.*"]) == sorted(k for k in model.state_dict()
                                                                             if k.startswith("classifier."))


def test_a_hub_id_that_cannot_be_reached_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="could not be fetched from the Hugging Face Hub.*--local-dir DIR"):
        resolve_pretrained("some-org/rlipv2-not-cached")


def test_a_model_opened_from_a_temporary_export_keeps_its_tokenizer(saved, tmp_path, monkeypatch):
    """`open_model(RUN)` exports to a temporary directory removed on return: the tokenizer must be
    read from it before then (it was loaded lazily at the first label encoding, after removal)."""
    import contextlib

    from rlipv2_scale.train import export

    model, out = saved

    @contextlib.contextmanager
    def temporary_export(source, trust_pickle=False):
        tmp = shutil.copytree(out, tmp_path / "export" / "model")
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp_path / "export")

    monkeypatch.setattr(export, "as_model_dir", temporary_export)
    opened = export.open_model(tmp_path / "run")
    assert not (tmp_path / "export").exists()
    with torch.no_grad():
        assert torch.equal(opened.encode_labels(["a", "b"], ["x"]), model.encode_labels(["a", "b"], ["x"]))


def test_replacing_a_model_directory_never_deletes_what_it_did_not_write(saved, tmp_path):
    """A re-export replaces an earlier model directory as a whole, so files of the user's in it
    stop it; without them the directory is replaced."""
    model, out = saved
    target = shutil.copytree(out, tmp_path / "model")
    (target / "NOTES.txt").write_text("mine")
    card = ModelCard(objects=["a", "b"], relations=["x"], eval_size=96, max_size=128)
    with pytest.raises(UserError, match="also holds NOTES.txt, which replacing it would delete"):
        model.save_pretrained(target, card)
    assert (target / "NOTES.txt").read_text() == "mine" and (target / WEIGHTS_FILE).is_file()
    (target / "NOTES.txt").unlink()
    (target / TOKENIZER_DIR / "my_notes.txt").write_text("mine")          # one level down too
    with pytest.raises(UserError, match="also holds tokenizer/my_notes.txt"):
        model.save_pretrained(target, card)
    (target / TOKENIZER_DIR / "my_notes.txt").unlink()
    (target / CARD_FILE).write_text("{}")
    model.save_pretrained(target, card)
    assert json.loads((target / CARD_FILE).read_text())["objects"] == ["a", "b"]
