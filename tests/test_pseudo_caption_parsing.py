import json

import pytest

from rlipv2_scale.data.pseudo.candidates import build_candidates
from rlipv2_scale.data.pseudo.caption_parsing import (
    ParseStats,
    RuleBasedParser,
    Triplet,
    _tokens,
    find_mentions,
    image_triplets,
    make_parser,
)
from rlipv2_scale.data.pseudo.paraphrases import ParaphraseTable, builtin_table, load_table, plural_forms
from rlipv2_scale.data.pseudo.synthetic_captions import NAME_PARAPHRASES
from rlipv2_scale.errors import UserError


@pytest.fixture(scope="module")
def coco():
    return builtin_table("coco80")


def test_builtin_tables_cover_their_class_lists():
    assert len(builtin_table("coco80").classes) == 80
    assert len(builtin_table("o365").classes) == 365
    assert "man" in builtin_table("coco80").classes["person"]


def test_plural_forms():
    assert plural_forms("man") == {"man", "men"}
    assert plural_forms("bus") == {"bus", "buses"}
    assert plural_forms("teddy bear") == {"teddy bear", "teddy bears"}
    assert plural_forms("pony") == {"pony", "ponies"}


def test_mentions_are_whole_words_longest_first_and_limited_to_present_classes(coco):
    toks = _tokens("A man holding a handbag near two hot dogs")
    found = find_mentions(toks, coco, {"person", "handbag", "hot dog"})
    assert [(m.cls, " ".join(toks[m.start:m.end])) for m in found] == [
        ("person", "man"), ("handbag", "handbag"), ("hot dog", "hot dogs")]
    # "hand" (a person paraphrase) must not fire inside "handbag"; absent classes never match.
    assert [m.cls for m in find_mentions(toks, coco, {"person"})] == ["person"]


@pytest.mark.parametrize("caption, classes, expected", [
    ("a man riding a horse", {"person", "horse"}, [("person", "riding", "horse")]),
    ("Two women are sitting on a wooden bench", {"person", "bench"}, [("person", "sitting on", "bench")]),
    ("a dog laying on a bed next to a cat", {"dog", "bed", "cat"},
     [("dog", "laying on", "bed"), ("bed", "next to", "cat")]),
    ("a man and a dog", {"person", "dog"}, []),                          # conjunction: no relation
    ("a man riding a horse", {"person"}, []),                            # object class not in the image
    ("a cat, a dog", {"cat", "dog"}, []),
])
def test_rule_based_parser(coco, caption, classes, expected):
    got = RuleBasedParser(coco).parse(caption, classes)
    assert [(t.subject, t.phrase, t.object) for t in got] == expected


def test_image_triplets_unique_with_stats(coco):
    stats = ParseStats()
    captions = ["a man riding a horse", "a woman riding a horse", "a horse", "a boy riding a horse in a field"]
    got = image_triplets(captions, {"person", "horse"}, RuleBasedParser(coco), stats)
    assert got == [Triplet("person", "riding", "horse")]
    assert stats.captions == 4 and stats.captions_without_triplet == 1 and stats.triplets == 1
    assert stats.as_dict()["top_phrases"] == [("riding", 1)]


def test_auto_parser_falls_back_to_rules_without_spacy_model(coco):
    assert isinstance(make_parser(coco, "rules"), RuleBasedParser)
    parser = make_parser(coco, "auto")
    assert parser.parse("a man riding a horse", {"person", "horse"})[0].phrase == "riding"


def test_candidates_ordered_pairs_and_chunks():
    objects = ["person", "horse", "person", "dog"]
    triplets = [Triplet("person", "riding", "horse"), Triplet("person", "walking", "dog"),
                Triplet("person", "next to", "horse")]
    chunks = build_candidates(objects, triplets, chunk_size=2)
    pairs = [p for c in chunks for p in c.pairs]
    assert pairs == [(0, 1), (0, 3), (2, 1), (2, 3)]
    assert [len(c.pairs) for c in chunks] == [2, 2]
    assert chunks[0].texts == ["riding", "next to", "walking"]
    assert chunks[0].pair_texts[0] == ["riding", "next to"]
    assert chunks[0].as_original() == [[[0, 1], [0, 3]], ["riding", "next to", "walking"]]
    assert build_candidates(objects, [], 100) == []
    # a pair is never an object with itself, even when both classes match
    assert build_candidates(["person", "person"], [Triplet("person", "talking to", "person")])[0].pairs == [(0, 1), (1, 0)]


def test_bad_paraphrase_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_table(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        load_table(str(tmp_path / "bad.json"))
    (tmp_path / "shape.json").write_text(json.dumps({"person": "man"}))
    with pytest.raises(UserError, match="must map class names"):
        load_table(str(tmp_path / "shape.json"))
    assert ParaphraseTable({"cup": ["mug"]}).missing(["cup", "plate"]) == ["plate"]


def test_synthetic_captions_parse_back_to_true_relations():
    from rlipv2_scale.data.pseudo.synthetic_captions import NAME_PARAPHRASES, SyntheticCaptioner, canonical_predicate

    table = ParaphraseTable(NAME_PARAPHRASES)
    names = ["person", "cup", "table", "ball"]
    truth = [(0, 1, "holding"), (1, 2, "on"), (3, 2, "under")]
    clean = SyntheticCaptioner(num_captions=4, p_drop=0.0, p_wrong=0.0, p_extra=0.0, seed=3)
    caps = clean.captions_for(7, names, truth)
    assert caps == clean.captions_for(7, names, truth)            # deterministic per image
    got = image_triplets(caps, set(names), RuleBasedParser(table))
    assert {(t.subject, canonical_predicate(t.phrase), t.object) for t in got} == {
        ("person", "holding", "cup"), ("cup", "on", "table"), ("ball", "under", "table")}
    noisy = SyntheticCaptioner(num_captions=10, p_drop=0.5, p_wrong=0.5, seed=3).captions_for(7, names, truth)
    found = {(t.subject, canonical_predicate(t.phrase), t.object)
             for t in image_triplets(noisy, set(names), RuleBasedParser(table))}
    assert found - {("person", "holding", "cup"), ("cup", "on", "table"), ("ball", "under", "table")}  # some wrong


class _Token:
    """The parts of a spaCy `Token` the dependency parser reads, for hand-built parses (the `spacy`
    package and its English model are not test dependencies)."""

    def __init__(self, doc: list, i: int, text: str, pos: str, dep: str, head: int):
        self.doc, self.i, self.text, self.lower_, self.pos_, self.dep_, self._head = doc, i, text, text.lower(), pos, dep, head

    @property
    def head(self):
        return self.doc[self._head]

    @property
    def children(self):
        return [t for t in self.doc if t._head == self.i and t.i != self.i]

    @property
    def subtree(self):
        out = [self] + [s for c in self.children for s in c.subtree]
        return sorted(out, key=lambda t: t.i)


def _doc(rows: list[tuple[str, str, str, int]]) -> list:
    doc: list = []
    doc.extend(_Token(doc, i, *row) for i, row in enumerate(rows))
    return doc


SYNTH = ParaphraseTable(NAME_PARAPHRASES)
PRESENT = {"person", "box", "cup", "table", "ball"}


@pytest.mark.parametrize("rows, expected", [
    # "a woman is holding a mug": nsubj + dobj of a verb
    ([("a", "DET", "det", 1), ("woman", "NOUN", "nsubj", 3), ("is", "AUX", "aux", 3), ("holding", "VERB", "ROOT", 3),
      ("a", "DET", "det", 5), ("mug", "NOUN", "dobj", 3)], [Triplet("person", "holding", "cup")]),
    # "a man sitting on a crate": a participle (acl) with a preposition
    ([("a", "DET", "det", 1), ("man", "NOUN", "ROOT", 1), ("sitting", "VERB", "acl", 1), ("on", "ADP", "prep", 2),
      ("a", "DET", "det", 5), ("crate", "NOUN", "pobj", 3)], [Triplet("person", "sitting on", "box")]),
    # "a cup on the big table": a preposition attached to a noun; the mention is the head's subtree
    ([("a", "DET", "det", 1), ("cup", "NOUN", "ROOT", 1), ("on", "ADP", "prep", 1), ("the", "DET", "det", 5),
      ("big", "ADJ", "amod", 5), ("table", "NOUN", "pobj", 2)], [Triplet("cup", "on", "table")]),
    # "a dog chasing a ball": the subject names no present class → nothing
    ([("a", "DET", "det", 1), ("dog", "NOUN", "ROOT", 1), ("chasing", "VERB", "acl", 1), ("a", "DET", "det", 4),
      ("ball", "NOUN", "dobj", 2)], []),
])
def test_spacy_parser_reads_the_dependency_tree(rows, expected):
    from rlipv2_scale.data.pseudo.caption_parsing import SpacyParser

    assert SpacyParser(SYNTH, nlp=None).parse_doc(_doc(rows), PRESENT) == expected
