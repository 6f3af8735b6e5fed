"""Label-text encoder: the local BPE tokenizer and pooled label embeddings."""
import dataclasses

import pytest
import torch
from transformers import RobertaTokenizerFast

from rlipv2_scale.errors import ConfigError, UserError
from rlipv2_scale.models.config import named_config
from rlipv2_scale.models.text import LabelEncoder, build_local_tokenizer, from_pretrained, load_tokenizer


def test_local_tokenizer_round_trips_any_text_and_uses_robertas_special_ids(tmp_path):
    tok = build_local_tokenizer(["person rides a horse", "person holds a cup"] * 10, tmp_path, vocab_size=300)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    for text in ("person rides a horse", "zebra über naïve 🐎"):
        ids = tok(text)["input_ids"]
        assert ids[0] == 0 and ids[-1] == 2 and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    reloaded = RobertaTokenizerFast.from_pretrained(str(tmp_path))
    assert reloaded("person holds a cup")["input_ids"] == tok("person holds a cup")["input_ids"]
    with pytest.raises(ConfigError, match="vocab_size"):
        build_local_tokenizer(["a"], tmp_path / "x", vocab_size=100)


def test_label_embedding_does_not_depend_on_the_other_labels_padding():
    torch.manual_seed(0)
    enc = LabelEncoder.build(named_config("tiny").text, pretrained=False).eval()
    with torch.no_grad():
        alone = enc.embed(["horse"])
        batched = enc.embed(["horse", "a very long relation phrase with many tokens in it"])
    assert alone.shape == (1, 64) and batched.shape == (2, 64)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=0)


def test_tokenizer_larger_than_the_embedding_table_is_a_config_error(tmp_path):
    build_local_tokenizer([f"word{i} thing{i}" for i in range(200)], tmp_path, vocab_size=600)
    cfg = dataclasses.replace(named_config("tiny").text, tokenizer=str(tmp_path), vocab_size=300)
    enc = LabelEncoder.build(cfg, pretrained=False)
    with pytest.raises(ConfigError, match="text.vocab_size"):
        enc.embed(["word1"])


def test_tokenizer_and_text_encoder_not_cached_offline_are_user_errors_naming_them_and_the_fix(empty_offline_hub):
    cfg = dataclasses.replace(named_config("tiny").text, pretrained="roberta-base")
    with pytest.raises(UserError) as err:
        load_tokenizer(cfg)
    msg = str(err.value)
    assert "tokenizer 'roberta-base' (model.text.tokenizer)" in msg and "HF_HUB_OFFLINE" in msg
    assert "(`huggingface-cli download roberta-base --local-dir DIR`) and point model.text.tokenizer at DIR" in msg
    with pytest.raises(UserError, match=r"text encoder 'roberta-base' \(model.text.pretrained\).*"
                                        r"--local-dir DIR`\) and point model.text.pretrained at DIR"):
        LabelEncoder.build(cfg, pretrained=True)
    enc = LabelEncoder.build(cfg, pretrained=False)   # built without weights; the tokenizer fails when used
    with pytest.raises(UserError, match="tokenizer 'roberta-base'"):
        enc.embed(["horse"])


def test_a_tokenizer_folder_that_does_not_exist_is_a_user_error(tmp_path):
    cfg = dataclasses.replace(named_config("tiny").text, tokenizer=str(tmp_path / "nope"))
    with pytest.raises(UserError, match=r"tokenizer folder '.*nope' \(model.text.tokenizer\) does not exist"):
        load_tokenizer(cfg)


def test_an_unreachable_hub_is_asked_once_not_retried_per_file(monkeypatch):
    """Online but unreachable: one probe without retries decides, instead of transformers' minutes of
    retries for every file (ending in an unrelated TypeError)."""
    import huggingface_hub
    import huggingface_hub.constants as hf
    import requests

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    probes = []

    def unreachable(repo_id, timeout=None):
        probes.append(repo_id)
        raise requests.ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    calls = []

    def load(source, **kwargs):
        calls.append(kwargs)
        raise OSError("not in the cache")

    with pytest.raises(UserError, match=r"could not be fetched from the Hugging Face Hub \(ConnectionError\)"):
        from_pretrained(load, "roberta-base", "tokenizer", "model.text.tokenizer")
    assert calls == [{"local_files_only": True}] and probes == ["roberta-base"]
