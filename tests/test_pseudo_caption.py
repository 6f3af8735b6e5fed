import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from rlipv2_scale.data.pseudo.caption import (
    BlipCaptioner,
    ImageItem,
    SamplingConfig,
    output_path,
    read_captions,
    run_captioning,
)

WORDS = "a picture of man woman dog horse riding sitting on next to holding bench table cup ball".split()


def _jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    """A randomly initialised BLIP with a locally trained WordPiece tokenizer: the real classes and
    the real generation path, nothing downloaded."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainers.WordPieceTrainer(
        vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    tokenizer = BertTokenizerFast(tokenizer_file=str(path), bos_token="[DEC]")
    vocab = tokenizer.get_vocab()
    cfg = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=vocab["[DEC]"],
                         pad_token_id=vocab["[PAD]"], sep_token_id=vocab["[SEP]"], eos_token_id=vocab["[SEP]"]))
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(cfg)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    return model, processor


def test_blip_nucleus_sampling_returns_n_captions_per_image(tiny_blip):
    model, processor = tiny_blip
    sampling = SamplingConfig(num_captions=3, min_length=5, max_length=12, prompt="a picture of ", seed=1)
    captioner = BlipCaptioner(model, processor, sampling)
    images = [Image.open(io.BytesIO(_jpeg(i))) for i in range(2)]
    caps = captioner.caption(images)
    assert len(caps) == 2 and all(len(c) == 3 for c in caps)
    assert all(isinstance(t, str) and not t.startswith("a picture of") for c in caps for t in c)
    # seeded: the same call gives the same captions, and does not disturb the global RNG
    before = torch.random.get_rng_state()
    assert captioner.caption(images) == caps
    assert torch.equal(before, torch.random.get_rng_state())


class CountingCaptioner:
    def __init__(self):
        self.seen = []

    def caption(self, images, image_ids):
        self.seen += [im.size for im in images]
        return [[f"caption {len(self.seen)}"] for _ in images]


def test_sharded_resumable_captioning(tmp_path):
    items = [ImageItem(i, (lambda i=i: _jpeg(i))) for i in range(7)]
    items.append(ImageItem("broken", lambda: b"not a jpeg"))
    # rank 0 of 2 takes items 0, 2, 4, 6 (and the broken one at position 7 belongs to rank 1)
    cap = CountingCaptioner()
    s0 = run_captioning(items, cap, tmp_path, rank=0, world_size=2, batch_size=3)
    assert s0.captioned == 4 and s0.already_done == 0
    s1 = run_captioning(items, CountingCaptioner(), tmp_path, rank=1, world_size=2, batch_size=3)
    assert s1.captioned == 3 and [i for i, _ in s1.failed_to_decode] == ["broken"]
    # an interrupted rank file (torn last line) resumes without captioning anything twice
    path = output_path(tmp_path, 0)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:7])
    again = CountingCaptioner()
    s0b = run_captioning(items, again, tmp_path, rank=0, world_size=2, batch_size=3)
    assert s0b.already_done == 2 and s0b.captioned == 2 and len(again.seen) == 2
    got = read_captions(tmp_path)
    assert sorted(got) == sorted(str(i) for i in range(7))
    ids = [json.loads(l)["image_id"] for l in path.read_text().splitlines()]
    assert sorted(ids) == [0, 2, 4, 6] and len(ids) == len(set(ids))


def test_a_whole_last_row_without_its_newline_is_kept(tmp_path, capsys):
    items = [ImageItem(i, (lambda i=i: _jpeg(i))) for i in range(3)]
    run_captioning(items[:2], CountingCaptioner(), tmp_path)
    path = output_path(tmp_path, 0)
    path.write_text(path.read_text().rstrip("\n"))          # e.g. an editor that drops the final newline
    again = CountingCaptioner()
    s = run_captioning(items, again, tmp_path)
    assert (s.already_done, s.captioned, len(again.seen)) == (2, 1, 1)
    assert [json.loads(l)["image_id"] for l in path.read_text().splitlines()] == [0, 1, 2]
    assert "warning" not in capsys.readouterr().err


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, capsys):
    items = [ImageItem(i, (lambda i=i: _jpeg(i))) for i in range(3)]
    run_captioning(items[:2], CountingCaptioner(), tmp_path)
    path = output_path(tmp_path, 0)
    path.write_text(path.read_text() + '{"image_id": 2, "capt')
    assert sorted(read_captions(tmp_path)) == ["0", "1"]      # reading leaves the file as it is
    err = capsys.readouterr().err
    assert str(path) in err and "dropping its last line" in err and path.read_text().endswith("capt")
    s = run_captioning(items, CountingCaptioner(), tmp_path)
    assert (s.already_done, s.captioned) == (2, 1) and str(path) in capsys.readouterr().err
    assert [json.loads(l)["image_id"] for l in path.read_text().splitlines()] == [0, 1, 2]


@pytest.mark.parametrize("line, problem", [
    ('{"image_id": 3, "captions": "oops', "line 2 is not JSON"),
    ('{"image_id": 3, "captions": [42]}', r"line 2 has captions \[42\]: they must be a list of strings"),
    ('{"image_id": 3, "captions": "a dog"}', "line 2 has captions 'a dog'"),
    ('{"image_id": null, "captions": ["a dog"]}', "line 2 has image_id None"),
    ('{"image_id": 1.5, "captions": ["a dog"]}', "line 2 has image_id 1.5"),
    ('["a dog"]', "line 2 is not a JSON object"),
])
def test_a_bad_row_names_its_file_and_line(tmp_path, line, problem):
    from rlipv2_scale.errors import UserError

    items = [ImageItem(i, (lambda i=i: _jpeg(i))) for i in range(4)]
    run_captioning(items[:3], CountingCaptioner(), tmp_path)
    path = output_path(tmp_path, 0)
    rows = path.read_text().splitlines()
    path.write_text("\n".join([rows[0], line, rows[2]]) + "\n")
    before = path.read_text()
    for read in (lambda: read_captions(tmp_path), lambda: run_captioning(items, CountingCaptioner(), tmp_path)):
        with pytest.raises(UserError, match=problem) as err:
            read()
        assert str(path) in str(err.value) and "rlipv2 data caption" in str(err.value)
    assert path.read_text() == before                         # a refused rerun writes nothing
    # the same damage on the last line (with its newline, or whole JSON) is not taken for a torn write
    path.write_text("\n".join([rows[0], rows[2], line]) + ("" if line.endswith("}") else "\n"))
    with pytest.raises(UserError, match=problem.replace("line 2", "line 3")):
        read_captions(tmp_path)
