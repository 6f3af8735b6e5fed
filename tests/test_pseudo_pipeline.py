import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from rlipv2_scale.data.pseudo.caption import read_captions
from rlipv2_scale.data.pseudo.caption_parsing import RuleBasedParser
from rlipv2_scale.data.pseudo.paraphrases import ParaphraseTable
from rlipv2_scale.data.pseudo.pipeline import (
    caption_shards,
    export_pseudo_labels,
    load_candidates,
    load_caption_evidence,
    parse_shards,
    tag_shards,
)
from rlipv2_scale.data.pseudo.synthetic_captions import NAME_PARAPHRASES, SyntheticCaptioner, TruthCaptioner
from rlipv2_scale.data.schema import ImageInfo, Object, RelationalRecord
from rlipv2_scale.data.shards import iter_records, write_shards
from rlipv2_scale.errors import UserError


def _jpeg():
    buf = io.BytesIO()
    Image.fromarray(np.full((60, 80, 3), 128, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


class OracleScorer:
    """Confidence 0.9 for the true (pair, predicate), 0.1 otherwise."""

    def __init__(self, truth):
        self.truth = truth

    def score(self, record, chunk):
        true = {(s, o, p) for s, o, p in self.truth[str(record.image.id)][1]}
        return np.array([[0.9 if (s, o, t) in true else 0.1 for t in chunk.texts] for s, o in chunk.pairs])


def test_detection_shards_to_pseudo_labelled_shards(tmp_path):
    names = {1: ["person", "cup", "table"], 2: ["ball", "basket"], 3: ["car", "lamp"]}
    truth = {"1": (names[1], [(0, 1, "holding"), (1, 2, "on")]), "2": (names[2], [(0, 1, "inside")]),
             "3": (names[3], [])}
    recs = [RelationalRecord(ImageInfo(i, "synthetic", "train", 80, 60),
                             [Object((2 + 10 * k, 2, 10 + 10 * k, 20), n) for k, n in enumerate(names[i])],
                             image_bytes=_jpeg()) for i in names]
    write_shards(recs, tmp_path / "det")
    captioner = TruthCaptioner(truth, SyntheticCaptioner(num_captions=5, p_drop=0.0, p_wrong=0.0, seed=1))
    # two ranks caption disjoint halves; together every image once
    for rank in range(2):
        caption_shards(tmp_path / "det", tmp_path / "caps", captioner, rank=rank, world_size=2, batch_size=2)
    assert sorted(read_captions(tmp_path / "caps")) == ["1", "2", "3"]

    stats = parse_shards(tmp_path / "det", tmp_path / "caps", RuleBasedParser(ParaphraseTable(NAME_PARAPHRASES)),
                         tmp_path / "parse")
    cands = load_candidates(tmp_path / "parse")
    assert set(cands) == {"1", "2"}                      # image 3 has no relation in its captions
    assert (0, 1) in cands["1"][0].pairs and stats.triplets >= 3
    parse_stats = json.loads((tmp_path / "parse" / "parse_stats.json").read_text())
    assert parse_stats["images_without_candidates"] == 1

    summary = tag_shards(tmp_path / "det", tmp_path / "parse", OracleScorer(truth), tmp_path / "tags")
    assert summary.tagged == 3 and summary.without_candidates == 1
    conv, rep = export_pseudo_labels(tmp_path / "det", tmp_path / "tags", tmp_path / "out", "synthetic", 0.2)
    out = list(iter_records(tmp_path / "out" / "shards"))
    got = {(str(r.image.id), rel.subject, rel.object): rel.predicate for r in out for rel in r.relations}
    # synonyms stay free-form phrases; pairs and confidences come from the tagger
    assert set(got) == {("1", 0, 1), ("1", 1, 2), ("2", 0, 1)}
    # confidence √(Tagger 0.9 × the share of captions relating the two classes: all 5, none dropped)
    assert all(rel.confidence == pytest.approx(0.9 ** 0.5) for r in out for rel in r.relations)
    assert rep["relations_per_threshold"]["0.05"] == rep["relations_per_threshold"]["0.5"] == 3   # one per pair
    sg = json.loads((tmp_path / "out" / "scene_graphs.json").read_text())
    assert {e["image_id"] for e in sg} == {1, 2, 3} and all(e["dataset"] == "synthetic" for e in sg)


def test_missing_stage_outputs_are_named(tmp_path):
    write_shards([RelationalRecord(ImageInfo(1, "coco2017", "train", 80, 60), [Object((0, 0, 5, 5), "cup")],
                                   image_bytes=_jpeg())], tmp_path / "det")
    with pytest.raises(UserError, match="run `rlipv2 data caption` first"):
        parse_shards(tmp_path / "det", tmp_path / "nocaps", RuleBasedParser(ParaphraseTable({})), tmp_path / "p")
    with pytest.raises(UserError, match="run `rlipv2 data parse` first"):
        load_candidates(tmp_path / "p")
    with pytest.raises(UserError, match="rerun `rlipv2 data parse`, or tag with --no-use-captions"):
        load_caption_evidence(tmp_path / "p")


class FixedCaptioner:
    def __init__(self, captions):
        self.captions = captions

    def caption(self, images, image_ids):
        return [self.captions[str(i)] for i in image_ids]


def test_bad_input_is_counted_and_reported_never_fatal(tmp_path):
    from rlipv2_scale.data.pseudo.candidates import CandidateChunk
    from rlipv2_scale.data.pseudo.tag import run_tagging
    from rlipv2_scale.data.pseudo.tagger_scorer import TaggerScorer
    from rlipv2_scale.models.build import build_model
    from rlipv2_scale.models.config import named_config

    names = {1: ["person", "cup"], 2: ["person", "ball"], 3: ["zebra", "person"], 4: ["person", "box"]}
    images = {1: _jpeg(), 2: b"not an image at all", 3: _jpeg(), 4: _jpeg()}
    recs = [RelationalRecord(ImageInfo(i, "coco2017", "train", 80, 60),
                             [Object((2 + 20 * k, 2, 18 + 20 * k, 20), n) for k, n in enumerate(names[i])],
                             image_bytes=images[i]) for i in names]
    write_shards(recs, tmp_path / "det")
    captions = {"1": ["a man holding a mug", "a blurry photo"], "3": ["a zebra next to a man"],
                "4": ["a man and a crate", "nothing here"]}
    summary = caption_shards(tmp_path / "det", tmp_path / "caps", FixedCaptioner(captions))
    assert summary.captioned == 3 and [i for i, _ in summary.failed_to_decode] == [2]

    parse_shards(tmp_path / "det", tmp_path / "caps", RuleBasedParser(ParaphraseTable(NAME_PARAPHRASES)),
                 tmp_path / "parse")
    stats = json.loads((tmp_path / "parse" / "parse_stats.json").read_text())
    # "a blurry photo", "a zebra next to a man" (zebra has no paraphrases), "a man and a crate", "nothing here"
    assert stats["captions"] == 5 and stats["captions_without_triplet"] == 4
    assert stats["images_without_captions"] == 1 and stats["classes_without_paraphrases"] == {"zebra": 1}
    assert stats["images_with_candidates"] == 1 and stats["images_without_candidates"] == 2

    # The Tagger decodes the image: a corrupt one is counted, not written, and the run goes on.
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    scorer = TaggerScorer(build_model(named_config("tiny_tagger"), pretrained=False),
                          ["person", "cup", "ball", "box", "zebra"], eval_size=64, max_size=96)
    chunk = CandidateChunk([(0, 1)], ["holding"], [["holding"]])
    by_id = {r.image.id: r for r in iter_records(tmp_path / "det")}
    items = [(by_id[2], [chunk]), (by_id[1], [chunk]), (by_id[4], [])]
    tagged = run_tagging(items, scorer, tmp_path / "tags")
    assert tagged.tagged == 2 and tagged.without_candidates == 1
    assert [i for i, _ in tagged.failed_to_decode] == [2] and "do not decode" in tagged.failed_to_decode[0][1]


def _captioned(tmp_path, ids=(1, 2, 3, 4)):
    recs = [RelationalRecord(ImageInfo(i, "synthetic", "train", 80, 60), [Object((2, 2, 20, 20), "person")],
                             image_bytes=_jpeg()) for i in ids]
    write_shards(recs, tmp_path / "det")
    caption_shards(tmp_path / "det", tmp_path / "caps", FixedCaptioner({str(i): ["a person"] for i in ids}))
    return tmp_path / "caps" / "captions.rank00000.jsonl"


@pytest.mark.parametrize("line, problem", [
    ('{"image_id": 3, "captions": "oops', "line 3 is not JSON"),
    ('{"image_id": 3, "captions": [42]}', "line 3 has captions \\[42\\]: they must be a list of strings"),
])
def test_cli_parse_and_caption_rerun_name_a_damaged_captions_line(tmp_path, capsys, line, problem):
    from rlipv2_scale.cli import main

    path = _captioned(tmp_path)
    rows = path.read_text().splitlines()
    rows[2] = line
    path.write_text("\n".join(rows) + "\n")
    parse = ["data", "parse", "--shards", str(tmp_path / "det"), "--captions", str(tmp_path / "caps"),
             "--paraphrases", "synthetic", "--out", str(tmp_path / "parse")]
    caption = ["data", "caption", "--shards", str(tmp_path / "det"), "--captioner", "synthetic",
               "--truth", str(tmp_path / "det"), "--out", str(tmp_path / "caps")]
    for argv in (parse, caption):
        assert main(argv) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]           # after `data caption`'s progress bar, if any
        assert "Traceback" not in err and last.startswith("rlipv2: error: ") and str(path) in last, err
        assert re.search(problem, last) and "repair or delete that line" in last
    assert not (tmp_path / "parse").exists()


def test_parse_refuses_captions_of_images_the_shards_do_not_have(tmp_path):
    path = _captioned(tmp_path)
    with path.open("a") as f:
        f.write(json.dumps({"image_id": "zz", "captions": ["a person"]}) + "\n")
    with pytest.raises(UserError, match=r"1 image id\(s\) that .*det does not have \(e.g. 'zz'\).*new folder"):
        parse_shards(tmp_path / "det", tmp_path / "caps", RuleBasedParser(ParaphraseTable(NAME_PARAPHRASES)),
                     tmp_path / "parse")
    assert not (tmp_path / "parse").exists()


def test_caption_of_shards_with_no_images_is_an_error_naming_them(tmp_path, capsys):
    from rlipv2_scale.cli import main

    write_shards([], tmp_path / "empty")
    with pytest.raises(UserError, match=r"empty holds no images .*nothing to caption"):
        caption_shards(tmp_path / "empty", tmp_path / "caps", FixedCaptioner({}))
    argv = ["data", "caption", "--shards", str(tmp_path / "empty"), "--captioner", "synthetic",
            "--truth", str(tmp_path / "empty"), "--out", str(tmp_path / "caps")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().startswith("rlipv2: error: ") and len(err.strip().splitlines()) == 1
    assert f"{tmp_path / 'empty'} holds no images" in err and "nothing to caption" in err
    assert not (tmp_path / "caps").exists()


def test_pseudo_label_warns_when_the_threshold_keeps_no_image(tmp_path, capsys):
    from rlipv2_scale.cli import main

    names = ["person", "cup"]
    truth = {"1": (names, [(0, 1, "holding")]), "2": (names, [(0, 1, "holding")])}
    recs = [RelationalRecord(ImageInfo(i, "synthetic", "train", 80, 60),
                             [Object((2 + 10 * k, 2, 10 + 10 * k, 20), n) for k, n in enumerate(names)],
                             image_bytes=_jpeg()) for i in (1, 2)]
    write_shards(recs, tmp_path / "det")
    caption_shards(tmp_path / "det", tmp_path / "caps", FixedCaptioner({"1": ["a man holding a mug"],
                                                                        "2": ["a man holding a mug"]}))
    parse_shards(tmp_path / "det", tmp_path / "caps", RuleBasedParser(ParaphraseTable(NAME_PARAPHRASES)),
                 tmp_path / "parse")
    tag_shards(tmp_path / "det", tmp_path / "parse", OracleScorer(truth), tmp_path / "tags")   # confidences ≈ 0.95
    base = ["data", "pseudo-label", "--shards", str(tmp_path / "det"), "--tags", str(tmp_path / "tags")]

    assert main(base + ["--out", str(tmp_path / "kept"), "--threshold", "0.5"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "none"), "--threshold", "0.99"]) == 0
    captured = capsys.readouterr()
    assert "wrote 0 images" in captured.out
    assert re.search(r"rlipv2: warning: no image kept a relation at --threshold 0\.99: .*none/shards holds no "
                     r"samples and cannot be trained on; lower --threshold", captured.err), captured.err
