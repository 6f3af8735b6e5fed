"""V-COCO role AP: hand-computed scenario 1 / 2 cases and the places where the official script fails."""
from __future__ import annotations

import json
import math

import pytest

from rlipv2_scale.errors import UserError
from rlipv2_scale.eval.files import read_coco_instances
from rlipv2_scale.eval.vcoco import evaluate_vcoco, evaluate_vcoco_files

NAN4 = [math.nan] * 4
A, B, CUP, C = [0, 0, 100, 100], [300, 300, 100, 100], [200, 0, 50, 50], [0, 0, 80, 120]  # COCO xywh


def xyxy(b):  # the toolkit's conversion: x2 = x1 + w - 1
    return [b[0], b[1], b[0] + b[2] - 1, b[1] + b[3] - 1]


def coco():
    anns = [(10, 1, 1, A), (11, 1, 47, CUP), (12, 1, 1, B), (20, 2, 1, C)]
    return {"images": [{"id": 1, "width": 640, "height": 480}, {"id": 2, "width": 640, "height": 480}],
            "categories": [{"id": 1, "name": "person"}, {"id": 47, "name": "cup"}],
            "annotations": [{"id": i, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                            for i, im, c, b in anns]}


def vcoco():
    # persons 10 (image 1, holds cup 11) and 20 (image 2, points at nothing); person 12 is not annotated
    common = {"image_id": [1, 2], "ann_id": [10, 20]}
    return [dict(common, action_name="hold", role_name=["agent", "obj"], label=[1, 0], role_object_id=[10, 20, 11, 0]),
            dict(common, action_name="point", role_name=["agent", "instr"], label=[0, 1], role_object_id=[10, 20, 0, 0])]


def det(image_id, person, hold, point):
    return {"image_id": image_id, "person_box": xyxy(person), "hold_agent": 0.0, "point_agent": 0.0,
            "hold_obj": hold, "point_instr": point}


def detections():
    return [
        det(1, A, xyxy(CUP) + [0.9], [0, 0, 0, 0, 0.1]),  # hold: true; point: person 10 does not point
        det(1, B, xyxy(CUP) + [0.95], [0, 0, 0, 0, 0.05]),  # person 12 is not annotated: skipped entirely
        det(1, A, xyxy(CUP) + [0.7], [0, 0, 0, 0, 0.02]),  # hold: person already covered -> false
        det(2, C, NAN4 + [0.6], [10, 10, 20, 20, 0.5]),  # hold: false; point: an object where there is none
    ]


def test_scenarios_one_and_two_by_hand():
    res = evaluate_vcoco(vcoco(), coco(), [1, 2], detections())
    # hold-obj: 0.9 true, 0.7 false, 0.6 false (0.95 skipped) -> precision 1 up to recall 1 -> AP 1
    # point-instr: 0.5 (image 2) then 0.1 (false); scenario 1 rejects the predicted object, scenario 2 not
    assert res["per_role_s1"] == {"hold-obj": 1.0, "point-instr": 0.0}
    assert res["per_role_s2"] == {"hold-obj": 1.0, "point-instr": 1.0}
    assert res["AP_role_s1"] == pytest.approx(0.5) and res["AP_role_s2"] == pytest.approx(1.0)
    assert res["AP_role_s1_no_point"] == pytest.approx(1.0)
    assert res["warnings"] == []


def test_an_empty_role_prediction_is_right_in_scenario_one():
    dets = detections()
    dets[3]["point_instr"] = NAN4 + [0.5]
    assert evaluate_vcoco(vcoco(), coco(), [1, 2], dets)["per_role_s1"]["point-instr"] == 1.0


def test_ignored_person_is_skipped_not_counted():
    dets = detections()
    dets[1]["person_box"] = xyxy(A)  # now the 0.95 detection lands on person 10: the first true positive
    res = evaluate_vcoco(vcoco(), coco(), [1, 2], dets)
    assert res["per_role_s1"]["hold-obj"] == 1.0
    dets[1]["hold_obj"] = [400, 400, 450, 450, 0.95]  # wrong object, ranked first -> precision 1/2 at recall 1
    res = evaluate_vcoco(vcoco(), coco(), [1, 2], dets)
    assert res["per_role_s1"]["hold-obj"] == pytest.approx(0.5)


def test_where_the_official_script_fails_it_says_what_is_missing():
    dets = [d for d in detections() if d["image_id"] == 1]
    for d in dets:
        d["point_instr"] = NAN4 + [math.nan]  # no point detection at all
    res = evaluate_vcoco(vcoco(), coco(), [1, 2], dets)
    assert res["per_role_s1"]["point-instr"] == 0.0
    assert any("point-instr: no detections" in w for w in res["warnings"])

    no_person = coco()
    no_person["annotations"] = [a for a in no_person["annotations"] if a["id"] != 20]
    v = vcoco()
    for a in v:
        a.update(image_id=[1], ann_id=[10], label=a["label"][:1], role_object_id=[10, 11 if a["action_name"] == "hold" else 0])
    res = evaluate_vcoco(v, no_person, [1, 2][:1], [d for d in detections() if d["image_id"] == 1])
    assert res["per_role_s1"]["point-instr"] is None  # no positives: undefined, out of the mean
    assert res["AP_role_s1"] == pytest.approx(1.0)


def test_detections_on_an_image_without_persons_are_false_positives():
    c = coco()
    c["images"].append({"id": 3, "width": 640, "height": 480})
    v = vcoco()
    for a in v:  # image 3 is in the split but has no person
        a.update(image_id=a["image_id"] + [3], ann_id=a["ann_id"] + [11], label=a["label"] + [0],
                 role_object_id=a["role_object_id"][:2] + [11] + a["role_object_id"][2:] + [0])
    dets = detections() + [det(3, A, xyxy(CUP) + [0.99], [0, 0, 0, 0, 0.0])]
    res = evaluate_vcoco(v, c, [1, 2, 3], dets)
    assert res["per_role_s1"]["hold-obj"] == pytest.approx(0.5)
    assert any("no ground-truth person" in w for w in res["warnings"])


@pytest.mark.parametrize("mutate, message", [
    (lambda v, c, ids, d: d[0].pop("hold_obj"), r"detection 0 \(image 1\) has no 'hold_obj'"),
    (lambda v, c, ids, d: ids.append(5), r"image-id list .* disagree"),
    (lambda v, c, ids, d: c["images"].pop(), r"image 2 of the split is not in the COCO instances"),
    (lambda v, c, ids, d: d.append(dict(d[0], image_id=9)), r"outside the split"),
    (lambda v, c, ids, d: v[0]["role_object_id"].__setitem__(2, 99), r"object 99 of action 'hold'"),
])
def test_inconsistent_inputs_raise_clear_errors(mutate, message):
    v, c, ids, d = vcoco(), coco(), [1, 2], detections()
    mutate(v, c, ids, d)
    with pytest.raises(UserError, match=message):
        evaluate_vcoco(v, c, ids, d)


def test_files_round_trip(tmp_path):
    for name, data in (("vcoco.json", vcoco()), ("coco.json", coco()), ("dets.json", detections())):
        (tmp_path / name).write_text(json.dumps(data))
    (tmp_path / "ids").write_text("1\n2\n")
    res = evaluate_vcoco_files(tmp_path / "vcoco.json", tmp_path / "coco.json", tmp_path / "ids", tmp_path / "dets.json")
    assert res["AP_role_s2"] == pytest.approx(1.0)
    with pytest.raises(UserError, match="does not exist"):
        evaluate_vcoco_files(tmp_path / "nope.json", tmp_path / "coco.json", tmp_path / "ids", tmp_path / "dets.json")


@pytest.mark.parametrize("edit", [
    lambda c: None,
    lambda c: c["annotations"][2].update(ignore=1),  # the toolkit drops it
    lambda c: c["annotations"][3].update(bbox=[0.5, 0.25, 79.5, 120.0], area=9540.0),
    lambda c: c["annotations"][0].update(id=10.0),  # not the typed form: read as plain JSON, same numbers
])
def test_coco_instances_file_reads_only_what_the_toolkit_uses(edit, tmp_path):
    c = coco()
    for a in c["annotations"]:  # what real files carry beside the boxes, and the typed reader skips
        a["segmentation"] = [[float(x) for x in range(40)]]
    c["info"], c["licenses"] = {"year": 2014}, []
    edit(c)
    (tmp_path / "coco.json").write_text(json.dumps(c))
    read = read_coco_instances(tmp_path / "coco.json")
    assert ("segmentation" in read["annotations"][0]) == isinstance(c["annotations"][0]["id"], float)
    assert evaluate_vcoco(vcoco(), read, [1, 2], detections()) == evaluate_vcoco(vcoco(), c, [1, 2], detections())


def _set(seq, i, value):
    seq[i] = value


@pytest.mark.parametrize("mutate, message", [
    (lambda v, c, ids, d: d[0].update(image_id="abc"), r"^detections: detection 0 has image_id 'abc'; it must be the integer"),
    (lambda v, c, ids, d: d[0].update(image_id=None), r"detection 0 has image_id None"),
    (lambda v, c, ids, d: d[3].update(image_id=1.7), r"detection 3 has image_id 1\.7"),
    (lambda v, c, ids, d: _set(ids, 0, 1.7), r"image id 1\.7 is not a whole number"),
    (lambda v, c, ids, d: ids.append(2), r"image id\(s\) \[2\] listed more than once"),
    (lambda v, c, ids, d: c.pop("categories"), r"^COCO instances: 'categories' is missing"),
    (lambda v, c, ids, d: c["annotations"][0].update(bbox=[0, 0, 100]),
     r"annotation 10 \(annotations\[0\]\): bbox must be 4 finite numbers \[x, y, width, height\], got \[0, 0, 100\]"),
    (lambda v, c, ids, d: c["annotations"][1].update(category_id=99), r"annotation 11 \(image 1\) has category_id 99"),
    (lambda v, c, ids, d: c["images"][0].pop("width"), r"image 1 \(images\[0\]\) needs a positive 'width'"),
    (lambda v, c, ids, d: d[0].update(person_box=NAN4), r"detection 0 \(image 1\) has person_box \[nan, nan, nan, nan\]"),
    (lambda v, c, ids, d: d[0].update(person_box=None), r"detection 0 \(image 1\): 'person_box' must be 4 numbers"),
    (lambda v, c, ids, d: d[1]["hold_obj"].__setitem__(4, "0.9"),
     r"detection 1 \(image 1\): 'hold_obj' must be 5 numbers \[x1, y1, x2, y2, score\], got \[.*'0\.9'\]"),
    (lambda v, c, ids, d: d[1]["hold_obj"].__setitem__(4, None), r"detection 1 \(image 1\): 'hold_obj' must be 5 numbers"),
    (lambda v, c, ids, d: d[3].update(hold_obj=[1, 2, 3, 4]), r"detection 3 \(image 2\): 'hold_obj' must be 5 numbers"),
    (lambda v, c, ids, d: d[0]["hold_obj"].__setitem__(4, math.inf), r"detection 0 \(image 1\) has 'hold_obj' .* finite"),
    (lambda v, c, ids, d: v[0].update(label=[1]),
     r"action 'hold' \(entry 0\) has 1 'label' values for 2 image_id values; expected 2"),
    (lambda v, c, ids, d: v[1].update(role_object_id=[10, 20, 30, 0, 0, 0]),
     r"action 'point' \(entry 1\) has 6 'role_object_id' values for 2 image_id values; expected 2 x 2"),
    (lambda v, c, ids, d: v[0].update(label=["1", "0"]), r"action 'hold' \(entry 0\): 'label' must hold whole numbers"),
])
def test_malformed_entries_raise_clear_errors(mutate, message):
    """Each is a one-line error naming the entry, never a traceback from numpy / pycocotools or a
    silently converted value (1.7 -> 1, "0.9" -> 0.9, NaN person box -> lower AP)."""
    v, c, ids, d = vcoco(), coco(), [1, 2], detections()
    mutate(v, c, ids, d)
    with pytest.raises(UserError, match=message):
        evaluate_vcoco(v, c, ids, d)


@pytest.mark.parametrize("bad", [[coco()], "coco", None])
def test_coco_instances_must_be_an_object(bad):
    with pytest.raises(UserError, match=r"^COCO instances: expected a COCO instances object"):
        evaluate_vcoco(vcoco(), bad, [1, 2], detections())


def test_nan_keeps_its_toolkit_meaning_in_role_entries():
    """A NaN role box is "no object", a NaN role score "no detection for that role" (the toolkit drops
    it): both are still accepted, and whole-number floats and NumPy integers are ids like any other."""
    import numpy as np

    dets = detections()
    dets[2]["hold_obj"] = xyxy(CUP) + [math.nan]   # the 0.7 false positive is dropped: AP unchanged
    dets[0]["image_id"] = np.int64(1)
    dets[3]["image_id"] = 2.0
    res = evaluate_vcoco(vcoco(), coco(), [1.0, np.int64(2)], dets)
    assert res["per_role_s1"] == {"hold-obj": 1.0, "point-instr": 0.0}


def _write_files(tmp_path, v=None, c=None, d=None, ids="1\n2\n"):
    for name, data in (("vcoco.json", v or vcoco()), ("coco.json", c or coco()), ("dets.json", d or detections())):
        (tmp_path / name).write_text(json.dumps(data))
    (tmp_path / "ids").write_text(ids)
    return [tmp_path / n for n in ("vcoco.json", "coco.json", "ids", "dets.json")]


@pytest.mark.parametrize("ids, message", [
    ("1\n1.7\n", r"image-id file '.*ids', line 2: '1\.7' is not an image id"),
    ("1\nabc\n", r"line 2: 'abc' is not an image id"),
    ("1\n2\n1\n", r"line 3: image id 1 is listed again \(first on line 1\)"),
])
def test_image_id_file_errors_name_the_line(tmp_path, ids, message):
    with pytest.raises(UserError, match=message):
        evaluate_vcoco_files(*_write_files(tmp_path, ids=ids))


def test_image_id_file_reads_whole_numbers(tmp_path):
    from rlipv2_scale.eval.vcoco import read_image_ids

    (tmp_path / "ids").write_text("1\n 2.0\n\n300000000000000001\n")
    assert read_image_ids(tmp_path / "ids") == [1, 2, 300000000000000001]


def test_file_errors_name_the_file(tmp_path):
    c = coco()
    del c["categories"]
    with pytest.raises(UserError, match=r"^COCO instances file '.*coco\.json': 'categories' is missing"):
        evaluate_vcoco_files(*_write_files(tmp_path, c=c))
    d = detections()
    d[1]["image_id"] = "abc"
    with pytest.raises(UserError, match=r"^detections file '.*dets\.json': detection 1 has image_id 'abc'"):
        evaluate_vcoco_files(*_write_files(tmp_path, d=d))
    v = vcoco()
    v[1]["label"] = [0]
    with pytest.raises(UserError, match=r"^V-COCO annotations file '.*vcoco\.json': action 'point' \(entry 1\)"):
        evaluate_vcoco_files(*_write_files(tmp_path, v=v))


def test_trusted_pickle_warns_in_one_line(tmp_path, capsys):
    import pickle
    import warnings

    paths = _write_files(tmp_path)
    with (tmp_path / "dets.pkl").open("wb") as f:
        pickle.dump(detections(), f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no Python warning (printed over several lines by the CLI)
        res = evaluate_vcoco_files(*paths[:3], tmp_path / "dets.pkl", trust_pickle=True)
    assert res["AP_role_s2"] == pytest.approx(1.0)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"rlipv2: warning: unpickling '{tmp_path / 'dets.pkl'}' (--trust-pickle): this can run code "
                   "from the file"]
