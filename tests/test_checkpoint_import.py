"""Importing / exporting the released RLIPv2 checkpoints, and the `compat_original` quirks they need.

Full-size layouts (200-400 M values) are checked on the meta device: names, shapes, dtypes, order,
aliases, strictness. Values are checked end to end on the tiny config through the real files.
"""
import argparse
import dataclasses
import json
import re
from importlib import resources

import pytest
import torch

from rlipv2_scale.cli import main
from rlipv2_scale.errors import UserError
from rlipv2_scale.models import original as O
from rlipv2_scale.models.build import build_model, load_pretrained
from rlipv2_scale.models.config import named_config
from rlipv2_scale.models.outputs import OUTPUT_KEYS
from rlipv2_scale.models.rlipv2 import resize_query_rows

OBJ = ["person", "cup", "horse", "no objects"]
REL = ["hold", "ride", "feed"]


def _meta_state(name: str) -> dict[str, torch.Tensor]:
    """A released checkpoint's state dict, shapes only, aliases as the same tensor objects."""
    entries = O.released_layout_entries(name)
    tensors = {e["key"]: torch.empty(e["shape"], dtype=getattr(torch, e["dtype"]), device="meta")
               for e in entries if "alias_of" not in e}
    return {e["key"]: tensors[e.get("alias_of", e["key"])] for e in entries}


def _compat(name: str):
    cfg = named_config(name)
    cfg.compat_original = True
    return cfg


# ------------------------------------------------------------------------------------------ full layouts
@pytest.mark.parametrize("name", O.RELEASED)
def test_released_layout_imports_strictly_and_exports_identically(name):
    cfg = _compat(name)
    state = _meta_state(name)
    ours, optional = O.import_state_dict(state, cfg)
    assert optional == []
    assert set(ours) == set(O.our_layout(cfg))
    with torch.device("meta"):
        model = build_model(cfg, pretrained=False)
    model.load_state_dict(ours, strict=True, assign=True)   # every parameter and buffer filled, nothing extra

    back = O.export_state_dict(model.state_dict(), cfg, position_ids=False)
    entries = O.released_layout_entries(name)
    assert list(back) == [e["key"] for e in entries]        # same keys, same order
    for e in entries:
        assert tuple(back[e["key"]].shape) == tuple(e["shape"]) and str(back[e["key"]].dtype) == f"torch.{e['dtype']}"
        if "alias_of" in e:
            assert back[e["key"]] is back[e["alias_of"]]       # one tensor registered twice, as in the original
    aliases = sum("alias_of" in e for e in entries)
    swin_indices = {"swin_t": 12, "swin_l": 24, "swin_l_hico": 24}.get(name, 0)   # relative_position_index
    assert aliases == 72 and len(ours) == len(entries) - aliases - swin_indices


@pytest.mark.parametrize("name", O.RELEASED)
def test_position_ids_are_written_before_the_embeddings_own_children(name):
    cfg = _compat(name)
    ours, _ = O.import_state_dict(_meta_state(name), cfg)
    back = O.export_state_dict(ours, cfg, position_ids=True)
    keys = list(back)
    i = keys.index(O.POSITION_IDS)
    assert keys[i + 1] == "transformer.text_encoder.embeddings.word_embeddings.weight"
    assert back[O.POSITION_IDS].tolist() == [list(range(514))]
    assert O.import_state_dict(back, cfg)[1] == [O.POSITION_IDS]


@pytest.mark.parametrize("name", O.RELEASED)
def test_every_original_key_is_mapped_or_a_documented_dropped_key(name):
    cfg = _compat(name)
    km = O.key_map(cfg)
    ours = O.our_layout(cfg)
    for e in O.released_layout_entries(name):
        key = e["key"]
        dropped = [d for d in O.DROPPED_KEYS if d.pattern.match(key)]
        if key in km.to_ours:
            assert not dropped, key
            assert ours[km.to_ours[key]][0] == tuple(e["shape"])
        else:
            assert len(dropped) == 1, key
            if "alias_of" in e:
                assert dropped[0].name == "box-MLP aliases" and km.aliases[key] == e["alias_of"]
    # ... and no dropped key names a tensor of ours
    assert not [k for k in ours if any(d.pattern.match(O.original_key(k, cfg.variant)) for d in O.DROPPED_KEYS)]
    assert not any(re.search(r"position_ids|relative_position_index", k) for k in ours)


@pytest.mark.parametrize("name", O.RELEASED)
def test_parameter_kinds_and_frozen_parts_match_the_original(name):
    """Param/buffer kind equal everywhere; requires_grad too, except the documented differences:
    the relation decoder's box refiners are frozen here (they never receive a gradient there), and
    the Tagger's unused query_embed."""
    cfg = _compat(name)
    with torch.device("meta"):
        model = build_model(cfg, pretrained=False)
    params = {O.original_key(k, cfg.variant): p for k, p in model.named_parameters()}
    buffers = {O.original_key(k, cfg.variant) for k, _ in model.named_buffers() if k in model.state_dict()}
    differ = []
    for e in O.released_layout_entries(name):
        if "alias_of" in e or e["key"].endswith("relative_position_index"):
            continue
        assert (e["key"] in params) == (e["kind"] == "param") and (e["key"] in buffers) == (e["kind"] == "buffer")
        if e["kind"] == "param" and params[e["key"]].requires_grad != e["requires_grad"]:
            differ.append(e["key"])
    expected = {k for k in params if re.match(r"^(sub|obj)_bbox_embed\.[345]\.", k)}
    if cfg.tagger:
        expected.add("query_embed.weight")
    assert set(differ) == expected


# ------------------------------------------------------------------------------------------ clear errors
def test_wrong_config_names_the_first_unexpected_key_and_the_fitting_config():
    with pytest.raises(O.CheckpointMismatch, match=r"unexpected key 'backbone\.0\.body\.conv1\.weight \(64, 3, 7, 7\)"
                       r".*released 'r50' checkpoint: use --config r50"):
        O.import_state_dict(_meta_state("r50"), _compat("swin_t"))
    with pytest.raises(O.CheckpointMismatch, match=r"missing key 'backbone\.0\.body\.layers\.2\.blocks\.6\..*"
                       r"use --config swin_t"):
        O.import_state_dict(_meta_state("swin_t"), _compat("swin_l"))
    with pytest.raises(O.CheckpointMismatch, match=r"'tgt_embed\.weight \(128, 256\) float32' should be \(200, 256\)"
                       r".*use --config swin_l_hico"):
        O.import_state_dict(_meta_state("swin_l_hico"), _compat("swin_l"))
    with pytest.raises(O.CheckpointMismatch, match="use --config tagger_r50"):
        O.import_state_dict(_meta_state("tagger_r50"), _compat("r50"))


def test_fitting_config_for_other_query_counts_and_unknown_layouts():
    state = _meta_state("r50")
    for key in ("tgt_embed.weight", "verb_tgt_embed.weight", "refpoint_embed.weight"):
        state[key] = torch.empty(128, state[key].shape[1], device="meta")
    assert O.fitting_config(state) == ("it is a 'r50' checkpoint with 128 queries: use --config r50 "
                                       "--set num_queries=128")
    cfg = O.resolve_import_config("r50", ["num_queries=128"])
    assert cfg.num_queries == 128 and cfg.compat_original
    O.import_state_dict(state, cfg)   # the advice works
    del state["bias_obj_a"]
    with pytest.raises(O.CheckpointMismatch, match=r"missing key 'bias_obj_a'.*none of the released layouts.*"
                       r"closest is 'r50' \(4 keys"):
        O.import_state_dict(state, cfg)


def test_constant_buffers_are_checked_against_the_recomputed_ones():
    cfg = _compat("swin_t")
    state = _meta_state("swin_t")
    key = "backbone.0.body.layers.0.blocks.0.attn.relative_position_index"
    # hand-derived: pair (0, 0) of a 7x7 window has relative offset (0, 0) -> (0+6)*13 + (0+6) = 84;
    # pair (0, 1) has (0, -1) -> 6*13 + 5 = 83; pair (0, 7) has (-1, 0) -> 5*13 + 6 = 71.
    index = O.relative_position_index((7, 7))
    assert index[0, 0] == 84 and index[0, 1] == 83 and index[0, 7] == 71 and index.shape == (49, 49)
    state[key] = index.clone()
    O.import_state_dict(state, cfg)
    state[key] = torch.zeros(49, 49, dtype=torch.int64)
    with pytest.raises(O.CheckpointMismatch, match="constant buffer 'backbone.0.body.layers.0.blocks.0.attn"):
        O.import_state_dict(state, cfg)


# ------------------------------------------------------------------------------------------ values (tiny)
@pytest.fixture(scope="module")
def tiny_original(tmp_path_factory):
    """A tiny model and its export in the original format, saved as a training checkpoint would be."""
    torch.manual_seed(0)
    cfg = named_config("tiny")
    cfg.compat_original = True
    model = build_model(cfg, pretrained=False).eval()
    with torch.no_grad():   # non-trivial values everywhere (zero-initialised box layers, gates, ...)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = O.export_state_dict(model.state_dict(), cfg)
    path = tmp_path_factory.mktemp("orig") / "checkpoint0019.pth"
    torch.save({"model": state, "optimizer": {"lr": 1e-4}, "epoch": 19, "args": argparse.Namespace(lr=1e-4)}, path)
    return cfg, model, state, path


def _images():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 96, generator=g)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 80:] = True
    mask[1, 48:] = True
    return images, mask


def test_cli_import_export_round_trip_is_the_identity(tiny_original, tmp_path):
    cfg, model, state, path = tiny_original
    config_yaml = tmp_path / "tiny.yaml"
    from rlipv2_scale.config import save_config
    save_config(cfg, config_yaml)
    assert main(["import-checkpoint", str(path), "--config", str(config_yaml), "--out", str(tmp_path / "m")]) == 0
    assert main(["export-checkpoint", str(tmp_path / "m"), "--to-original", str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(back) == ["model"]
    back = back["model"]
    assert list(back) == list(state)
    for k in state:
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k]), k
    km = O.key_map(cfg)
    for alias, target in km.aliases.items():   # still one storage after save / load
        assert back[alias].data_ptr() == back[target].data_ptr()
    assert O.POSITION_IDS in back   # the imported file had it

    imported = load_pretrained(str(tmp_path / "m"))
    assert imported.cfg.compat_original
    images, mask = _images()
    with torch.no_grad():
        a, b = model(images, mask, OBJ, REL), imported(images, mask, OBJ, REL)
    for key in OUTPUT_KEYS:
        assert torch.equal(getattr(a, key), getattr(b, key)), key


def test_import_with_a_model_directorys_yaml_finds_its_tokenizer_from_any_folder(tiny_original, tmp_path,
                                                                                 monkeypatch):
    """`--config DIR/model.yaml` names `tokenizer` relative to DIR, not to the current folder."""
    _, model, _, path = tiny_original
    assert main(["import-checkpoint", str(path), "--config", "tiny", "--out", str(tmp_path / "models" / "m")]) == 0
    assert main(["export-checkpoint", str(tmp_path / "models" / "m"), "--to-original", str(tmp_path / "back.pth")]) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["import-checkpoint", "../back.pth", "--config", "../models/m/model.yaml", "--out", "again"]) == 0
    again = load_pretrained("again")
    assert (tmp_path / "elsewhere" / "again" / "tokenizer").is_dir()
    assert again.text_encoder.tokenizer("person rides a horse")["input_ids"] == \
        model.text_encoder.tokenizer("person rides a horse")["input_ids"]


def test_import_with_a_yaml_whose_tokenizer_folder_is_missing_is_one_line(tiny_original, tmp_path, capsys):
    cfg, _, _, path = tiny_original
    from rlipv2_scale.config import save_config
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, tokenizer="tokenizer"))
    save_config(cfg, tmp_path / "model.yaml")   # no tokenizer/ beside it, nor in the current folder
    assert main(["import-checkpoint", str(path), "--config", str(tmp_path / "model.yaml"),
                 "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlipv2: error: tokenizer folder 'tokenizer' (model.text.tokenizer) does not exist")
    assert "\n" not in err and not (tmp_path / "m").exists()


def test_position_ids_follow_the_imported_file(tiny_original, tmp_path):
    cfg, _, state, _ = tiny_original
    without = {k: v for k, v in state.items() if k != O.POSITION_IDS}   # saved by a newer transformers
    torch.save({"model": without}, tmp_path / "a.pth")
    O.import_checkpoint(tmp_path / "a.pth", "tiny", tmp_path / "m")
    O.export_checkpoint(tmp_path / "m", tmp_path / "auto.pth")
    assert list(torch.load(tmp_path / "auto.pth", weights_only=True)["model"]) == list(without)
    O.export_checkpoint(tmp_path / "m", tmp_path / "yes.pth", position_ids="yes")
    assert list(torch.load(tmp_path / "yes.pth", weights_only=True)["model"]) == list(state)


def test_inconsistent_aliases_and_bad_files_are_refused(tiny_original, tmp_path):
    cfg, _, state, path = tiny_original
    bad = dict(state)
    alias = next(iter(O.key_map(cfg).aliases))
    bad[alias] = bad[alias] + 1
    with pytest.raises(O.CheckpointMismatch, match=f"'{re.escape(alias)}' should be the same tensor as"):
        O.import_state_dict(bad, cfg)
    bad = dict(state)
    bad[O.POSITION_IDS] = bad[O.POSITION_IDS].flip(-1)
    with pytest.raises(O.CheckpointMismatch, match="constant buffer"):
        O.import_state_dict(bad, cfg)

    with pytest.raises(UserError, match="does not exist"):
        O.load_original(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read as a torch.save file"):
        O.load_original(tmp_path / "junk.pth")
    torch.save({"optimizer": {}}, tmp_path / "opt.pth")
    with pytest.raises(UserError, match="no state dict under 'model'"):
        O.load_original(tmp_path / "opt.pth")
    assert set(O.load_original(path)) == set(state)   # the Namespace of a training checkpoint is allowed


class _Custom:   # a pickled object that is not plain data
    pass


def test_pickled_objects_need_trust(tmp_path, capsys):
    torch.save({"model": {"w": torch.ones(2)}, "extra": _Custom()}, tmp_path / "c.pth")
    with pytest.raises(UserError, match="--trust-pickle"):
        O.load_original(tmp_path / "c.pth")
    assert torch.equal(O.load_original(tmp_path / "c.pth", trust_pickle=True)["w"], torch.ones(2))
    assert capsys.readouterr().err.startswith("rlipv2: warning: unpickling")


def test_cli_reports_mismatch_as_one_line(tiny_original, tmp_path, capsys):
    _, _, _, path = tiny_original
    assert main(["import-checkpoint", str(path), "--config", "r50", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlipv2: error: checkpoint") and "does not fit model config 'r50'" in err
    assert "closest is" in err and "\n" not in err
    assert not (tmp_path / "m").exists()


def test_model_dir_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="model.safetensors' is missing"):
        load_pretrained(str(tmp_path))


# ------------------------------------------------------------------------------------------ compat quirks
def _tiny(compat: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = named_config("tiny")
    cfg.compat_original = compat
    model = build_model(cfg, pretrained=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_alif_masks_are_no_ops_with_compat_and_real_masks_without():
    """Original: the bi-attention masks add +1 to every logit (softmax-invariant), so padded image
    tokens act as keys of the language side. Fixed: they do not, so changing them changes nothing."""
    g = torch.Generator().manual_seed(2)
    for compat in (True, False):
        model = _tiny(compat)
        d = model.cfg.d_model
        src = torch.randn(2, 12, d, generator=g)
        pos = torch.randn(2, 12, d, generator=g)
        pad = torch.zeros(2, 12, dtype=torch.bool)
        pad[1, 8:] = True                       # image 1: its last 4 tokens are padding
        lang = torch.randn(2, len(OBJ) + len(REL), model.cfg.text.hidden_size, generator=g)
        changed = src.clone()
        changed[1, 8:] = 3 * torch.randn(4, d, generator=g)   # (a constant shift would vanish in LayerNorm)
        with torch.no_grad():
            v1, l1 = model.encoder._fuse(0, src, pos, pad, lang, None, 0)
            v2, l2 = model.encoder._fuse(0, changed, pos, pad, lang, None, 0)
        assert torch.equal(l1[0], l2[0])        # image 0 untouched
        diff = max((l1[1] - l2[1]).abs().max(), (v1[1, :8] - v2[1, :8]).abs().max())
        if compat:
            assert diff > 1e-4
        else:
            assert diff < 1e-5


def test_label_padding_mask_from_the_sign_of_the_sum():
    """Compat: labels whose embedding sums to <= 0 are masked as keys of the language layers (the
    original's training path); the evaluation path uses no label mask, as the original's did."""
    from rlipv2_scale.inference import forward_eval

    model = _tiny(True)
    images, mask = _images()
    embeds = model.encode_labels(OBJ, REL).detach().clone()
    embeds[0] = embeds[0] - embeds[0].mean() - 0.1      # sum < 0: "padding" for the original
    for i in range(1, len(embeds)):
        embeds[i] = embeds[i] - embeds[i].mean() + 0.1  # sum > 0: real labels
    perturbed = embeds.clone()
    perturbed[0] = perturbed[0].flip(0)                 # same (negative) sum, other values
    with torch.no_grad():
        # The RoBERTa layer of round 0: the other labels must not see label 0 as a key. ALIF itself
        # has no label-to-label path, so compare right after the first round's language layer.
        lang = embeds[None].expand(2, -1, -1)
        lang_p = perturbed[None].expand(2, -1, -1)
        src = torch.randn(2, 5, model.cfg.d_model)
        pos = torch.zeros_like(src)
        pad = torch.zeros(2, 5, dtype=torch.bool)
        _, a = model.encoder._fuse(0, src, pos, pad, lang, lang.sum(-1) <= 0, 0)
        _, b = model.encoder._fuse(0, src, pos, pad, lang_p, lang_p.sum(-1) <= 0, 0)
        assert torch.allclose(a[:, 1:], b[:, 1:], atol=1e-6)
        _, c = model.encoder._fuse(0, src, pos, pad, lang, None, 0)
        _, d = model.encoder._fuse(0, src, pos, pad, lang_p, None, 0)
        assert (c[:, 1:] - d[:, 1:]).abs().max() > 1e-4
    # model level, training path: the other labels' first language state ignores label 0 (same
    # dropout draws for both passes)
    model.train()
    states = []
    for e in (embeds, perturbed):
        torch.manual_seed(3)
        with torch.no_grad():
            states.append(model.encode(images, mask, OBJ, REL, e).text_states[0])
    assert torch.allclose(states[0][:, 1:], states[1][:, 1:], atol=1e-5)
    # evaluation path: no label mask at all, as the original's evaluation (all-False mask)
    model.eval()
    with torch.no_grad():
        ev = forward_eval(model, images, mask, OBJ, REL, label_embeds=embeds)
        assert model.cfg.compat_original   # restored
        model.cfg.compat_original = False
        ref = model.decode(model.encode(images, mask, OBJ, REL, embeds))
        model.cfg.compat_original = True
    # same language encoding as a pass without the mask (the decoders differ: compat refiners)
    for i in range(len(ref.aux_outputs)):
        assert torch.equal(ref.aux_outputs[i].pred_obj_logits, ev.aux_outputs[i].pred_obj_logits)


def test_query_split_when_the_number_of_queries_changes():
    rows = torch.arange(200.0)[:, None].expand(200, 4)
    compat = resize_query_rows(rows, 128, compat_original=True)[:, 0]
    fixed = resize_query_rows(rows, 128, compat_original=False)[:, 0]
    # original: rows 0-127 re-split at 64, so object queries 64-99 were subject queries 64-99
    assert compat.tolist() == list(range(128))
    # fixed: the first 64 subject rows (0-63) and the first 64 object rows (100-163)
    assert fixed.tolist() == list(range(64)) + list(range(100, 164))
    assert resize_query_rows(rows, 200, compat_original=True) is rows
    with pytest.raises(UserError, match="cannot grow"):
        resize_query_rows(rows, 300)


def test_relation_decoder_box_refiners_are_frozen_and_used_only_with_compat():
    images, mask = _images()
    n = named_config("tiny").dec_layers
    for compat in (True, False):
        model = _tiny(compat)
        refiners = [p for mlps in (model.sub_bbox_embed[n:], model.obj_bbox_embed[n:]) for p in mlps.parameters()]
        assert refiners and not any(p.requires_grad for p in refiners)
        with torch.no_grad():
            a = model(images, mask, OBJ, REL).pred_rel_logits
            for p in refiners:
                p.add_(torch.randn_like(p))
            b = model(images, mask, OBJ, REL).pred_rel_logits
        if compat:
            assert (a - b).abs().max() > 1e-4     # the relation queries' reference boxes moved
        else:
            assert torch.equal(a, b)              # fixed midpoint box: refiners unused
    model.train()
    model(images, mask, OBJ, REL).pred_rel_logits.sum().backward()
    assert all(p.grad is None for p in refiners)


def test_layout_files_are_complete():
    for name in O.RELEASED:
        data = json.loads((resources.files("rlipv2_scale.models") / "original_layouts" / f"{name}.json").read_text())
        assert data["num_keys"] == len(data["keys"]) and data["config"] == name
        total = sum(torch.Size(e["shape"]).numel() for e in data["keys"]
                    if e["kind"] == "param" and "alias_of" not in e)
        assert total == data["total_params"]
