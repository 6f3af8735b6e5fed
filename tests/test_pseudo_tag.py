import json

import numpy as np
import pytest

from rlipv2_scale.data.pseudo.candidates import CandidateChunk
from rlipv2_scale.data.pseudo.paraphrases import predicate_synonyms
from rlipv2_scale.data.pseudo.tag import (
    CaptionEvidence,
    TagConfig,
    read_tags,
    report,
    run_tagging,
    tag_image,
    to_record,
    to_scene_graph,
)
from rlipv2_scale.data.schema import ImageInfo, Object, RelationalRecord
from rlipv2_scale.errors import UserError


def _record(i=1):
    return RelationalRecord(ImageInfo(i, "coco2017", "train2017", 100, 80),
                            [Object((0, 0, 10, 10), "person"), Object((20, 20, 50, 60), "horse"),
                             Object((5, 5, 30, 30), "person")])


class TableScorer:
    """Scores from a fixed table keyed by (subject, object, text)."""

    def __init__(self, table):
        self.table = table
        self.calls = 0

    def score(self, record, chunk):
        self.calls += 1
        return np.array([[self.table.get((s, o, t), 0.0) for t in chunk.texts] for s, o in chunk.pairs])


def test_threshold_topk_dedup_and_candidate_texts():
    chunks = [CandidateChunk([(0, 1), (2, 1)], ["riding", "feeding"], [["riding"], ["riding", "feeding"]]),
              CandidateChunk([(0, 1)], ["riding"], [["riding"]])]
    scorer = TableScorer({(0, 1, "riding"): 0.9, (0, 1, "feeding"): 0.3, (2, 1, "riding"): 0.04,
                          (2, 1, "feeding"): 0.5})
    # every text of the forward (the original): (0, 1) also takes (2, 1)'s "feeding"
    got = tag_image(_record(), chunks, scorer, TagConfig(texts="all"))
    # 0.04 < keep threshold; (0,1,riding) appears in two chunks → kept once with its max
    assert [(r.subject, r.object, r.predicate, r.confidence) for r in got] == [
        (0, 1, "riding", 0.9), (0, 1, "feeding", 0.3), (2, 1, "feeding", 0.5)]
    top1 = tag_image(_record(), chunks, scorer, TagConfig(texts="all", top_k_per_pair=1))
    assert [(r.subject, r.predicate) for r in top1] == [(0, "riding"), (2, "feeding")]
    own = tag_image(_record(), chunks, scorer, TagConfig(texts="candidates"))
    assert [(r.subject, r.object, r.predicate) for r in own] == [(0, 1, "riding"), (2, 1, "feeding")]
    nodedup = tag_image(_record(), chunks, scorer, TagConfig(texts="all", deduplicate=False))
    assert sum(r.predicate == "riding" and r.subject == 0 for r in nodedup) == 2
    with pytest.raises(ValueError, match="texts"):
        TagConfig(texts="own")


def test_synonyms_merge_into_one_tag_per_pair_at_their_max():
    chunk = CandidateChunk([(0, 1), (2, 1)], ["riding", "sitting on top of", "next to"],
                           [["riding", "sitting on top of", "next to"], ["sitting on top of"]])
    scorer = TableScorer({(0, 1, "riding"): 0.4, (0, 1, "sitting on top of"): 0.7, (0, 1, "next to"): 0.5,
                          (2, 1, "sitting on top of"): 0.3})
    syn = {"riding": "riding", "sitting on top of": "riding", "next to": "next to"}
    got = tag_image(_record(), [chunk], scorer, TagConfig(synonyms=syn))
    assert [(r.subject, r.predicate, r.confidence) for r in got] == [
        (0, "riding", 0.7), (0, "next to", 0.5), (2, "riding", 0.3)]
    # top-k counts merged predicates, not wordings: top-1 keeps riding (0.7), not both riding wordings
    top1 = tag_image(_record(), [chunk], scorer, TagConfig(synonyms=syn, top_k_per_pair=1))
    assert [(r.subject, r.predicate) for r in top1] == [(0, "riding"), (2, "riding")]
    unmerged = tag_image(_record(), [chunk], scorer, TagConfig(top_k_per_pair=2))
    assert [r.predicate for r in unmerged if r.subject == 0] == ["sitting on top of", "next to"]


def test_predicate_synonym_tables(tmp_path):
    assert predicate_synonyms("none") is None
    syn = predicate_synonyms("synthetic")
    assert syn["sitting on top of"] == syn["riding"] == "riding" and syn["beside"] == "next to"
    f = tmp_path / "syn.json"
    f.write_text(json.dumps({"holding": ["carrying", "Holding  onto"]}))
    assert predicate_synonyms(str(f)) == {"holding": "holding", "carrying": "holding", "holding onto": "holding"}
    f.write_text(json.dumps(["holding"]))
    with pytest.raises(UserError, match="must map each predicate"):
        predicate_synonyms(str(f))
    with pytest.raises(UserError, match="does not exist"):
        predicate_synonyms(str(tmp_path / "missing.json"))


def test_captions_pick_the_predicate_and_how_many_pairs():
    # two people (0, 2) and a horse (1): both person → horse pairs are candidates, the captions
    # relate one person to the horse, in 3 of 4 captions as "riding" (twice as "sitting on top of")
    chunk = CandidateChunk([(0, 1), (2, 1)], ["riding", "sitting on top of", "next to"],
                           [["riding", "sitting on top of", "next to"], ["riding", "sitting on top of", "next to"]])
    evidence = CaptionEvidence([[("person", "riding", "horse")], [("person", "sitting on top of", "horse")],
                                [("person", "sitting on top of", "horse")], [("person", "next to", "horse")]])
    scorer = TableScorer({(0, 1, "riding"): 0.3, (0, 1, "sitting on top of"): 0.2, (0, 1, "next to"): 0.4,
                          (2, 1, "riding"): 0.1, (2, 1, "next to"): 0.2})
    syn = {"riding": "riding", "sitting on top of": "riding", "next to": "next to"}
    got = tag_image(_record(), [chunk], scorer, TagConfig(synonyms=syn), evidence)
    # riding: Tagger 0.3 (max of its wordings) × 3/4 beats next to: 0.4 × 1/4; person 2 is left out
    assert [(r.subject, r.object, r.predicate) for r in got] == [(0, 1, "riding")]
    # confidence: every caption relates person → horse, whatever the words
    assert got[0].confidence == pytest.approx(np.sqrt(0.3 * 1.0))
    # without merging, each wording has its own share: next to 0.4 × 1/4 beats riding 0.3 × 1/4
    plain = tag_image(_record(), [chunk], scorer, TagConfig(), evidence)
    assert [(r.subject, r.predicate) for r in plain] == [(0, "next to")]
    # a caption relating two people to the horse keeps both pairs
    two = CaptionEvidence(evidence.captions + [[("person", "riding", "horse"), ("person", "next to", "horse")]])
    assert {r.subject for r in tag_image(_record(), [chunk], scorer, TagConfig(synonyms=syn), two)} == {0, 2}
    # --no-use-captions: the Tagger alone
    alone = tag_image(_record(), [chunk], scorer, TagConfig(use_captions=False, top_k_per_pair=1), evidence)
    assert [(r.subject, r.predicate) for r in alone] == [(0, "next to"), (2, "next to")]


def test_bad_scorer_shape_is_reported():
    class Bad:
        def score(self, record, chunk):
            return np.zeros((1, 1))

    with pytest.raises(ValueError, match="shape"):
        tag_image(_record(), [CandidateChunk([(0, 1), (2, 1)], ["a"], [["a"], ["a"]])], Bad(), TagConfig())


def test_resumable_run_outputs_and_report(tmp_path):
    chunk = CandidateChunk([(0, 1)], ["riding"], [["riding"]])
    items = [(_record(i), [chunk] if i != 3 else []) for i in range(5)]
    scorer = TableScorer({(0, 1, "riding"): 0.25})
    s = run_tagging(items[:2], scorer, tmp_path)
    assert s.tagged == 2
    s = run_tagging(items, scorer, tmp_path)
    assert s.already_done == 2 and s.tagged == 3 and s.without_candidates == 1 and scorer.calls == 4
    rows = list(read_tags(tmp_path))
    assert [ann["image"]["id"] for ann, _ in rows] == [0, 1, 2, 3, 4]
    rep = report(rows).as_dict()
    assert rep["relations_per_threshold"]["0.2"] == 4 and rep["relations_per_threshold"]["0.3"] == 0
    assert rep["top_predicates"] == [("riding", 4)]

    ann, rels = rows[0]
    counter = [10_000_000]
    sg = to_scene_graph(ann, rels, "coco2017", counter)
    assert sg["objects"][1] == {"object_id": 10_000_001, "x": 20, "y": 20, "w": 30, "h": 40, "names": "horse"}
    assert sg["relationships"] == [{"relationship_id": 10_000_003, "predicate": "riding", "subject_id": 10_000_000,
                                    "object_id": 10_000_001, "confidence": 0.25}]
    json.dumps(sg)
    rec = to_record(ann, rels, threshold=0.2)
    rec.validate()
    assert [(r.subject, r.object, r.predicate, r.confidence) for r in rec.relations] == [(0, 1, "riding", 0.25)]
    assert to_record(ann, rels, threshold=0.3) is None


def test_a_rerun_with_other_options_does_not_mix_into_the_folder(tmp_path):
    chunk = CandidateChunk([(0, 1)], ["riding"], [["riding"]])
    items = [(_record(i), [chunk]) for i in range(3)]
    scorer = TableScorer({(0, 1, "riding"): 0.25})
    run_tagging(items[:2], scorer, tmp_path, TagConfig(use_captions=False))
    assert json.loads((tmp_path / "tag_options.json").read_text())["use_captions"] is False
    with pytest.raises(UserError, match=r"other settings \(texts, use_captions differ.*new --out"):
        run_tagging(items, scorer, tmp_path, TagConfig(texts="all"))
    assert len(list(read_tags(tmp_path))) == 2                      # nothing written by the refused rerun
    s = run_tagging(items, scorer, tmp_path, TagConfig(use_captions=False))   # the same options resume
    assert (s.already_done, s.tagged) == (2, 1)
    # a folder emptied of tags may be reused with any options
    for f in tmp_path.glob("tags.rank*.jsonl"):
        f.unlink()
    assert run_tagging(items, scorer, tmp_path, TagConfig(texts="all")).tagged == 3


def test_tagger_scorer_scores_every_pair_and_text():
    import io

    import torch
    from PIL import Image

    from rlipv2_scale.data.pseudo.tagger_scorer import TaggerScorer
    from rlipv2_scale.errors import UserError
    from rlipv2_scale.models.build import build_model
    from rlipv2_scale.models.config import named_config

    torch.manual_seed(0)
    tagger = build_model(named_config("tiny_tagger"), pretrained=False)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(buf, "JPEG")
    rec = _record()
    rec.image_bytes = buf.getvalue()
    scorer = TaggerScorer(tagger, ["person", "horse", "dog"], eval_size=64, max_size=96)
    chunk = CandidateChunk([(0, 1), (2, 1), (0, 2)], ["riding", "next to"], [["riding"], ["riding"], ["next to"]])
    scores = scorer.score(rec, chunk)
    assert scores.shape == (3, 2) and np.all((scores > 0) & (scores < 1))
    # boxes go in as cxcywh normalised by the original size, labels index the class list + "no objects"
    import torch.nn.functional as F

    from rlipv2_scale.data.transforms import decode, normalize

    image = F.interpolate(decode(rec.image_bytes, "k")[None].float(), size=(64, 80), mode="bilinear",
                          antialias=True, align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
    pixels = normalize(image, None, torch.empty(image.shape))[None]
    boxes = torch.tensor([[5 / 100, 5 / 80, 10 / 100, 10 / 80], [35 / 100, 40 / 80, 30 / 100, 40 / 80],
                          [17.5 / 100, 17.5 / 80, 25 / 100, 25 / 80]])
    direct = tagger.score_candidates(pixels, torch.zeros(1, 64, 80, dtype=torch.bool),
                                     ["person", "horse", "dog", "no objects"], chunk.texts,
                                     [torch.tensor(chunk.pairs)], [boxes], [torch.tensor([0, 1, 0])])
    np.testing.assert_allclose(direct.numpy(), scores, rtol=1e-3, atol=1e-3)
    with pytest.raises(UserError, match="not in the tagger's class list"):
        TaggerScorer(tagger, ["person"], eval_size=64).score(rec, chunk)


def _proof_benchmark():
    """benchmarks/pseudo_label_proof.py, whose scorer the README's pseudo-label figures come from."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "pseudo_label_proof.py"
    spec = importlib.util.spec_from_file_location("pseudo_label_proof", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_proof_scorer_counts_the_wordings_of_one_pair_once():
    bench = _proof_benchmark()

    def ann(i, rels, names=("person", "cup", "table")):
        return {"image": {"id": i}, "objects": [{"name": n} for n in names],
                "relations": [{"subject": s, "object": o, "predicate": p, "confidence": c} for s, o, p, c in rels]}

    truth = {"1": ann(1, [(0, 1, "holding", None), (1, 2, "on", None)]), "2": ann(2, [(0, 1, "inside", None)])}
    pseudo = {"1": ann(1, [(0, 1, "carrying", 0.6), (0, 1, "holding", 0.3),    # two wordings: one prediction at 0.6
                           (1, 2, "under", 0.25), (2, 1, "gripping", 0.1)]),
              "2": ann(2, [(0, 1, "in", 0.07), (0, 1, "floating", 0.9)])}      # "floating" is no predicate: wrong
    q = bench.score_shards(pseudo, truth, thresholds=(0.05, 0.2, 0.5))
    # 0.05: {1:(0,1,holding), (1,2,under), (2,1,holding), 2:(0,1,inside), (0,1,?floating)} → 2 of 5 right, 2 of 3 found
    assert {k: q["0.05"][k] for k in ("predicted", "correct", "true", "pairs", "precision", "recall")} == {
        "predicted": 5, "correct": 2, "true": 3, "pairs": 4, "precision": 0.4, "recall": 0.6667}
    assert (q["0.2"]["predicted"], q["0.2"]["correct"], q["0.2"]["precision"]) == (3, 1, 0.3333)
    assert q["0.5"]["predicted"] == 2 and q["0.5"]["correct"] == 1
    assert bench.score_shards({}, truth, (0.5,))["0.5"]["precision"] is None
    errors = bench.label_errors(pseudo, truth)     # every label kept, whatever its confidence
    assert errors["total"] == {"true": 3, "found": 2, "wrong_predicate": 2, "no_relation": 1}
    assert errors["by_predicate"]["on"] == {"true": 1, "found": 0, "wrong_predicate": 0, "no_relation": 0}
    assert errors["by_predicate"]["under"]["wrong_predicate"] == 1       # (1, 2) holds "on"
    assert errors["by_predicate"]["holding"] == {"true": 1, "found": 1, "wrong_predicate": 0, "no_relation": 1}
    assert errors["by_predicate"]["?floating"]["wrong_predicate"] == 1   # no predicate's wording
    with pytest.raises(SystemExit, match="objects differ"):
        bench.score_shards({"1": ann(1, [], names=("cup", "person", "table"))}, truth)


def test_proof_summary_pairs_gains_by_seed_and_bounds_the_share():
    """The share of the ceiling's gain the README quotes: paired by seed, with a bootstrap interval."""
    bench = _proof_benchmark()
    maps = {"vg": (10, 20, 30), "vg+pseudo": (14, 24, 36), "vg+truth": (18, 28, 38), "vg+pseudo05": (11, 22, 33)}
    runs = [{"sources": name, "seed": 42 + i, "relation_map": v[i], "zero_shot_relation_map": v[i] / 2}
            for name, v in maps.items() for i in range(3)]
    summary = bench.pretraining_summary(runs)
    gain = summary["vg+pseudo"]["gain_over_vg"]["relation_map"]
    assert gain["per_seed"] == [4, 4, 6] and gain["mean"] == 4.67
    share = summary["share_of_ceiling_gain"]
    assert share["relation_map"] == 0.584 and share["relation_map_per_seed"] == [0.5, 0.5, 0.75]
    # resampling three seeds: two or more draws of the 0.75 seed are 7 in 27 (the 95th percentile is
    # 16/24), none of it 8 in 27 (the 5th percentile is 0.5)
    assert share["relation_map_interval_90"] == [0.5, 0.667]
    # the target as a paired margin: 4 - 0.7 * 8, 4 - 5.6, 6 - 5.6
    assert share["relation_map_margin"]["per_seed"] == [-1.6, -1.6, 0.4]
    assert share["relation_map_margin"]["mean"] == -0.93 and share["relation_map_margin"]["sem"] == 0.67
    # std 1.155 over a mean of 0.933: 2 s.e. = |mean| once (2 × 1.155 / 0.933)² = 6.1 → 7 seeds
    assert share["relation_map_margin"]["seeds_for_two_se"] == 7
    assert bench.margin_text(share["relation_map_margin"]) == "-0.93 ± 0.67 (2 s.e. from 0 at ~7 seeds)"
    assert summary["vg+pseudo05"]["share_of_ceiling_gain"]["relation_map"] == 0.25
    # another labelling gets the same paired margin: gains 1, 2, 3 against 0.7 × 8
    assert summary["vg+pseudo05"]["share_of_ceiling_gain"]["relation_map_margin"] == {
        "per_seed": [-4.6, -3.6, -2.6], "mean": -3.6, "sem": 0.58, "seeds_for_two_se": 2}
    # ... and is paired with the default pseudo-labels too: 11 - 14, 22 - 24, 33 - 36
    assert summary["vg+pseudo05"]["gain_over_vg+pseudo"]["relation_map"]["per_seed"] == [-3, -2, -3]
    assert "gain_over_vg+pseudo" not in summary["vg+truth"]
    assert bench.bootstrap_share([1.0, 2.0], [2.0, 2.0]) is None          # too few seeds to resample
    # runs of another length are a comparison of their own: seed 42 of 2000 steps pairs with its own vg
    longer = [{"sources": name, "seed": 42, "steps": 2000, "relation_map": m, "zero_shot_relation_map": m}
              for name, m in (("vg", 40), ("vg+pseudo", 41), ("vg+truth", 43))]
    by_steps = bench.summaries_by_steps([dict(r, steps=1000) for r in runs] + longer)
    assert list(by_steps) == ["1000", "2000"] and by_steps["1000"] == summary
    assert by_steps["2000"]["vg+pseudo"]["gain_over_vg"]["relation_map"]["per_seed"] == [1]
    assert by_steps["2000"]["share_of_ceiling_gain"]["relation_map"] == 0.333
    # a study under way: the ceiling's seed 44 not trained yet, so the share pairs seeds 42 and 43 only
    partial = bench.pretraining_summary([r for r in runs if (r["sources"], r["seed"]) != ("vg+truth", 44)])
    assert partial["share_of_ceiling_gain"]["relation_map_per_seed"] == [0.5, 0.5]
    assert partial["share_of_ceiling_gain"]["relation_map_margin"]["per_seed"] == [-1.6, -1.6]


def test_proof_breaks_zero_shot_map_into_its_held_out_combinations(tmp_path):
    """Zero-shot mAP averages a handful of held-out combinations: each one's AP comes from the
    eval's JSON, is averaged over seeds per mix and sits beside its predicate's label recall."""
    bench = _proof_benchmark()
    scores = tmp_path / "test_scores.json"
    per_triplet = [{"triplet": "lamp next to car", "held_out": True, "n_gt": 3, "ap": 40.0},
                   {"triplet": "cup on box", "held_out": True, "n_gt": 2, "ap": 10.0},
                   {"triplet": "person on horse", "held_out": False, "n_gt": 9, "ap": 70.0}]
    scores.write_text(json.dumps({"relation_map": 70.0, "zero_shot_relation_map": 25.0, "full_map": 60.0,
                                  "mean_max_recall": 80.0, "per_triplet": per_triplet}))
    got = bench.read_scores("large_", scores)
    assert got["large_zero_shot_relation_map"] == 25.0
    assert got["large_held_out_ap"] == {"lamp next to car": 40.0, "cup on box": 10.0}
    runs = [{"sources": name, "seed": 42 + i, "relation_map": 1.0 + i + k, "zero_shot_relation_map": 1.0 + i,
             "held_out_ap": {"lamp next to car": 10.0 * k + i, "cup on box": 5.0}}
            for k, name in enumerate(("vg", "vg+pseudo", "vg+truth")) for i in range(2)]
    summary = bench.pretraining_summary(runs)
    assert summary["vg+pseudo"]["held_out_ap"] == {"lamp next to car": 10.5, "cup on box": 5.0}
    errors = {"by_predicate": {"next to": {"true": 4, "found": 3}, "on": {"true": 2, "found": 2},
                               "to": {"true": 1, "found": 0}}}
    table = bench.held_out_table(summary, "", errors)
    assert table[3].startswith("| combination | vg (2 seeds) | vg+pseudo (2 seeds) | vg+truth (2 seeds) |")
    assert table[5:] == ["| cup on box | 5.0 | 5.0 | 5.0 | 1.0 |",
                         "| lamp next to car | 0.5 | 10.5 | 20.5 | 0.75 |"]     # "next to", not "to"
    assert bench.held_out_table(summary, "large_", errors) == []           # no such split scored


def test_proof_reports_the_taggers_training_length_as_a_lever(tmp_path):
    """`--tagger-lengths`: checkpoints of one longer Tagger run, each a lever with its label errors
    by predicate beside the default Tagger's; lengths the run keeps no checkpoint at are refused."""
    import argparse

    bench = _proof_benchmark()
    args = argparse.Namespace(tagger_lengths=[1600, 2000], tagger_steps=800, resume=False)
    with pytest.raises(SystemExit, match="multiple of --tagger-steps \\(800\\)"):
        bench.longer_taggers(tmp_path, args, {})
    argv = bench.tagger_training(tmp_path, argparse.Namespace(tagger_batch=4, seed=0), tmp_path / "run", 2400, every=800)
    assert argv[-3:] == ("checkpoint.every_steps=800", "checkpoint.keep_last=3", "logging.every_steps=50")

    def errors(found_under, wrong):
        return {"by_predicate": {"under": {"true": 4, "found": found_under, "wrong_predicate": wrong, "no_relation": 1},
                                 "on": {"true": 2, "found": 2, "wrong_predicate": 0, "no_relation": 0}},
                "total": {"true": 6, "found": 2 + found_under, "wrong_predicate": wrong, "no_relation": 1}}

    curve = {str(t): {"precision": 0.9, "recall": 0.5} for t in bench.THRESHOLDS}
    at = {"predicted": 4, "pairs": 4, "relations_per_pair": 1.0, "correct": 3, "precision": 0.75, "recall": 0.5}
    res = {"plan": {"vg_images": 8, "detection_images": 4, "captions_per_image": 2, "tagger_steps": 800,
                    "tagger_batch": 4, "tagger_lengths": [2400]},
           "truth_relations": 6, "candidates_all_accepted": {"predicted": 9, "correct": 6, "precision": 0.67,
                                                             "recall": 1.0},
           "levers": {"default (captions weigh the Tagger)": {"tag_options": [], "shards_at_default": at,
                                                              "curve": curve},
                      bench.tagger_length_lever(2400): {"tag_options": [], "shards_at_default": at, "curve": curve,
                                                        "tagger_relation_loss": 0.13}},
           "parse": {}, "commands": [], "machine": {}, "default_label_errors": errors(1, 0),
           "tagger_length_label_errors": {"2400": errors(3, 2)}}
    text = bench.markdown(res)
    assert "| default, Tagger trained 2400 steps (`no option`) | 4 | 4 | 1.0 | 3 | 0.75 | 0.5 |" in text
    assert "| predicate | true | 800 steps | 2400 steps |" in text
    assert "| under | 4 | 0.25 (1) | 0.75 (3) |" in text and "| all | 6 | 0.50 (1) | 0.83 (3) |" in text
    assert "| the Tagger's logged relation loss at that step | | – | 0.13 |" in text
    assert "(and, as levers of their own, 2400 steps: checkpoints of one longer run)." in text
    # the checkpoint as long as the default Tagger's training must give its labels, and is checked
    res["plan"]["tagger_lengths"] = [800, 2400]
    res["levers"][bench.tagger_length_lever(800)] = {"tag_options": [], "shards_at_default": at, "curve": curve}
    assert "its 800-step checkpoint gives the same labels as the default's Tagger)" in bench.markdown(res)
    res["levers"][bench.tagger_length_lever(800)] = {"tag_options": [], "shards_at_default": dict(at, correct=2),
                                                     "curve": curve}
    assert "its 800-step checkpoint gives OTHER labels than the default's Tagger)" in bench.markdown(res)


def test_proof_splits_the_margins_spread_into_test_scenes_and_training_seeds(tmp_path):
    """`--second-test`: the same runs scored on two test splits of as many scenes; half the variance of
    the splits' difference is the test scenes', the rest of one split's the training seeds'."""
    import subprocess
    import sys

    bench = _proof_benchmark()
    # ceiling gain 10 on every seed and split, so the margin is the pseudo gain − 7:
    # split A margins 2, 0, 4, -2 and split B 0, 2, 2, 0
    got = bench.spread_sources(([9, 7, 11, 5], [10] * 4), ([7, 9, 9, 7], [10] * 4))
    # differences ±2: variance 16/3, half of it 8/3 the scenes' (s.d. 1.63); one split's variance
    # (20/3 + 4/3) / 2 = 4, so 4/3 the training's (s.d. 1.15)
    assert got["test_sd"] == 1.63 and got["seed_sd"] == 1.15
    # both splits' mean: margins 1, 1, 3, -1 (mean 1, s.d. 1.63); share 8 / 10
    assert got["both_splits"]["per_seed"] == [1, 1, 3, -1] and got["both_splits"]["sem"] == 0.82
    assert got["share_both_splits"] == 0.8
    # 2 s.e. from 0: (2 × 1.63 / 1)² = 10.7 → 11 seeds on both splits, 4 × (4/3) / 1 = 5.3 → 6 without test noise
    assert got["both_splits"]["seeds_for_two_se"] == 11 and got["seeds_for_two_se_training_only"] == 6
    # from the runs' records: the summary carries it for each labelling scored on both splits
    gains = {"vg+pseudo": ([9, 7, 11, 5], [7, 9, 9, 7]), "vg+truth": ([10] * 4, [10] * 4)}
    runs = [{"sources": "vg", "seed": 42 + i, "relation_map": 1, "zero_shot_relation_map": 1, "large_relation_map": 20,
             "large_zero_shot_relation_map": 20, "second_relation_map": 30, "second_zero_shot_relation_map": 30}
            for i in range(4)]
    runs += [{"sources": name, "seed": 42 + i, "relation_map": 1, "zero_shot_relation_map": 1,
              "large_relation_map": 20 + a[i], "large_zero_shot_relation_map": 20 + a[i],
              "second_relation_map": 30 + b[i], "second_zero_shot_relation_map": 30 + b[i]}
             for name, (a, b) in gains.items() for i in range(4)]
    summary = bench.pretraining_summary(runs)
    assert list(summary["spread_sources"]) == ["vg+pseudo"]
    assert summary["spread_sources"]["vg+pseudo"]["zero_shot_relation_map"]["test_sd"] == 1.63
    res = {"plan": {"vg_images": 8, "detection_images": 4, "captions_per_image": 2, "tagger_steps": 800,
                    "tagger_batch": 4, "test_images": 128, "large_test_images": 512, "second_test_images": 512},
           "truth_relations": 6, "candidates_all_accepted": {"predicted": 9, "correct": 6, "precision": 0.67,
                                                             "recall": 1.0},
           "levers": {}, "parse": {}, "commands": [], "machine": {},
           "pretraining": [dict(r, steps=2000, full_map=1) for r in runs]}
    res["pretraining_summary"] = bench.summaries_by_steps(res["pretraining"])
    text = bench.markdown(res)
    assert "| vg+pseudo | relation mAP | 0.8 | +1.00 ± 0.82 | 1.63 | 1.15 | 11 | 6 |" in text
    assert "Scored on 512 further test scenes (`--seed 3000`):" in text
    # every run's row has its scores on both splits
    assert "| vg+pseudo | 42 | 2000 | 1 | 1 | 1 | 29 | 29 | 37 | 37 |" in text
    # each run is scored on the replicate split too, and it needs the split it replicates
    assert [c[0] for c in bench.eval_commands(tmp_path, tmp_path / "run", tmp_path / "a", tmp_path / "b")] == [
        "", "large_", "second_"]
    proc = subprocess.run([sys.executable, bench.__file__, "--second-test", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "give --large-test N as well" in proc.stderr


def test_proof_scores_the_labels_each_held_out_combination_is_composed_from():
    """Zero-shot mAP learns an unseen combination from relations of its predicate with its subject or
    its object class: their recall / precision per mix, beside the mix's zero-shot share."""
    bench = _proof_benchmark()

    def ann(rels):
        return {"image": {"id": 1}, "objects": [{"name": n} for n in ("person", "ball", "cup", "table")],
                "relations": [{"subject": s, "object": o, "predicate": p, "confidence": 0.5} for s, o, p in rels]}

    # person holding ball (a part of "person holding cup"), cup on table ("cup on box"), ball under
    # table ("bottle under table"); "above" is no held-out combination's predicate
    truth = {"1": ann([(0, 1, "holding"), (2, 3, "on"), (1, 3, "under")])}
    pseudo = {"1": ann([(0, 1, "carrying"), (0, 2, "holding"), (2, 3, "above"), (1, 3, "beneath")])}
    q = bench.composing_labels(pseudo, truth)
    assert q["person holding cup"] == {"true": 1, "recall": 1.0, "precision": 0.5}   # (0, 2) holds nothing
    assert q["cup on box"] == {"true": 1, "recall": 0.0, "precision": None}
    assert q["bottle under table"] == {"true": 1, "recall": 1.0, "precision": 1.0}
    assert q["lamp next to car"] == {"true": 0, "recall": None, "precision": None}
    assert q["all"] == {"true": 3, "recall": 0.67, "precision": 0.67}
    summ = {"spread_sources": {"vg+pseudo": {"zero_shot_relation_map": {"share_both_splits": 0.55}}}}
    table = bench.composing_table({"vg+pseudo": q, "vg+pseudo05": q}, summ)
    assert "| labels | ball inside basket (0 true) |" in table[3] and table[3].endswith("| zero-shot share, both splits |")
    assert table[5:] == ["| vg+pseudo | – / – | 1.0 / 1.0 | 0.0 / – | – / – | 1.0 / 0.5 | 0.67 / 0.67 | 0.55 |"]
    # (vg+pseudo05 was not scored on both splits)
    assert bench.composing_table({"vg+pseudo": q}, {}) == []


def test_proof_pretrains_on_a_longer_taggers_tags_at_another_threshold_only_when_named(tmp_path, monkeypatch):
    """`vg+pseudoNN-taggerN`: the N-step Tagger's tags pseudo-labelled at 0.NN; `data pseudo-label` runs
    for it only when --mixes names it, and it is not among the mixes run by default."""
    import argparse

    bench = _proof_benchmark()
    ran = []
    monkeypatch.setattr(bench, "cli", lambda *argv: ran.append([str(a) for a in argv]))
    monkeypatch.setattr(bench, "record", lambda *argv: None)
    monkeypatch.setattr(bench, "read_shards", lambda path: {})
    monkeypatch.setattr(bench, "confidence_by_correctness", lambda labels, truth: {})
    monkeypatch.setattr(bench, "label_errors", lambda labels, truth: {})
    monkeypatch.setattr(bench, "test_scores", lambda *a: {})
    monkeypatch.setattr(bench, "write", lambda *a, **k: None)

    def call(mixes):
        args = argparse.Namespace(pseudo_thresholds=[0.05], tagger_lengths=[1600], mixes=mixes, resume=False,
                                  large_test=0, second_test=False, rescore=False, pretrain_seeds=[0],
                                  pretrain_steps=2000, nproc=2, results=tmp_path / "results")
        ran.clear()
        bench.pretraining(tmp_path, args, {})
        return [argv for argv in ran if argv[:2] == ["data", "pseudo-label"]]

    def trained():
        return [next(a for a in argv if a.startswith("run.dir=")).split("/")[-1] for argv in ran if argv[0] == "train"]

    assert [argv[argv.index("--tags") + 1] for argv in call(None)] == [str(tmp_path / "tags" / "default")]
    assert trained() == ["vg_seed42_2000steps", "vg+pseudo_seed42_2000steps", "vg+truth_seed42_2000steps",
                         "vg+detection_seed42_2000steps", "vg+pseudo05_seed42_2000steps",
                         "vg+pseudo-tagger1600_seed42_2000steps"]
    named = call(["vg+pseudo05-tagger1600"])
    assert [argv[argv.index("--tags") + 1] for argv in named][-1] == str(tmp_path / "tags" / "default_tagger1600")
    assert named[-1][named[-1].index("--threshold") + 1] == "0.05"
    assert named[-1][named[-1].index("--out") + 1] == str(tmp_path / "pseudo" / "default_tagger1600_pseudo05")
    assert trained() == ["vg+pseudo05-tagger1600_seed42_2000steps"]
    with pytest.raises(SystemExit, match="vg\\+pseudo05-tagger1600"):
        call(["vg+nothing"])


def test_cli_tag_rejects_a_bad_synonym_file_in_one_line(tmp_path, capsys):
    from rlipv2_scale.cli import main

    bad = tmp_path / "syn.json"
    bad.write_text("{not json")
    argv = ["data", "tag", "--shards", str(tmp_path), "--candidates", str(tmp_path), "--checkpoint", str(tmp_path),
            "--out", str(tmp_path / "tags"), "--synonyms", str(bad)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "syn.json" in err[0] and "not valid JSON" in err[0]


def test_tags_rows_are_checked_and_a_torn_last_line_resumes(tmp_path, capsys):
    chunk = CandidateChunk([(0, 1)], ["riding"], [["riding"]])
    items = [(_record(i), [chunk]) for i in range(3)]
    scorer = TableScorer({(0, 1, "riding"): 0.25})
    run_tagging(items[:2], scorer, tmp_path)
    path = tmp_path / "tags.rank00000.jsonl"
    good = path.read_text()
    path.write_text(good + good.splitlines()[0][:30])        # killed mid-write
    assert run_tagging(items, scorer, tmp_path).tagged == 1
    assert "dropping its last line" in capsys.readouterr().err
    assert [ann["image"]["id"] for ann, _ in read_tags(tmp_path)] == [0, 1, 2]
    rows = path.read_text().splitlines()
    rows[1] = json.dumps({**json.loads(rows[1]), "relations": [{"subject": 0}]})
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError, match=r"tags.rank00000.jsonl' line 2 has relations .*rlipv2 data tag"):
        list(read_tags(tmp_path))
