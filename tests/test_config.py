from dataclasses import dataclass, field
from typing import Literal

import pytest

from rlipv2_scale.config import deep_merge, from_dict, load_config, parse_overrides, read_yaml, save_config, to_dict
from rlipv2_scale.errors import ConfigError


@dataclass
class Inner:
    lr: float = 1e-4
    layers: list[int] = field(default_factory=lambda: [1, 2])
    kind: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    steps: int = 10
    note: str | None = None


def test_from_dict_builds_nested_and_converts_numbers():
    cfg = from_dict(Outer, {"name": "x", "inner": {"lr": "1e-3", "layers": [3]}, "steps": 5})
    assert cfg.inner.lr == pytest.approx(1e-3) and cfg.inner.layers == [3] and cfg.steps == 5


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.lrr'.*did you mean 'lr'"):
        from_dict(Outer, {"name": "x", "inner": {"lrr": 1.0}})


@pytest.mark.parametrize("data, key", [
    ({"name": "x", "steps": "ten"}, "steps"),
    ({"name": "x", "steps": True}, "steps"),
    ({"name": 3}, "name"),
    ({"name": "x", "inner": {"kind": "c"}}, "inner.kind"),
    ({"name": "x", "inner": {"layers": "1,2"}}, "inner.layers"),
])
def test_bad_types_are_named(data, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        from_dict(Outer, data)


def test_missing_required_key():
    with pytest.raises(ConfigError, match="missing required key.*name"):
        from_dict(Outer, {})


def test_overrides_parse_yaml_scalars_and_nest():
    assert parse_overrides(["inner.lr=0.5", "steps=3", "note=null", "name=abc"]) == {
        "inner": {"lr": 0.5}, "steps": 3, "note": None, "name": "abc"}
    # YAML 1.1 reads "2e-4" as a string; float fields still accept it.
    assert from_dict(Outer, {"name": "x", **parse_overrides(["inner.lr=2e-4"])}).inner.lr == 2e-4
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["steps"])


def test_load_config_extends_overrides_and_round_trips(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\ninner:\n  lr: 0.5\n  layers: [4, 5]\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nsteps: 7\ninner:\n  kind: b\n")
    cfg = load_config(Outer, tmp_path / "child.yaml", ["inner.lr=0.25"])
    assert cfg == Outer(name="base", inner=Inner(lr=0.25, layers=[4, 5], kind="b"), steps=7)
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = from_dict(Outer, read_yaml(tmp_path / "run" / "config.yaml"))
    assert again == cfg and to_dict(again) == to_dict(cfg)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(tmp_path / "bad.yaml")


def test_deep_merge_keeps_siblings():
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


def test_extends_several_parents_in_order_and_refuses_cycles(tmp_path):
    from rlipv2_scale.config import read_yaml
    from rlipv2_scale.errors import ConfigError

    (tmp_path / "a.yaml").write_text("x: 1\ny: {p: 1, q: 1}\n")
    (tmp_path / "b.yaml").write_text("y: {q: 2}\nz: 2\n")
    (tmp_path / "c.yaml").write_text("extends: [a.yaml, b.yaml]\nz: 3\n")
    assert read_yaml(tmp_path / "c.yaml") == {"x": 1, "y": {"p": 1, "q": 2}, "z": 3}
    (tmp_path / "loop.yaml").write_text("extends: [loop2.yaml]\n")
    (tmp_path / "loop2.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        read_yaml(tmp_path / "loop.yaml")
    (tmp_path / "bad.yaml").write_text("extends: {a: 1}\n")
    with pytest.raises(ConfigError, match="'extends' must be a file name or a list"):
        read_yaml(tmp_path / "bad.yaml")


def test_an_override_that_is_not_yaml_is_a_config_error():
    from rlipv2_scale.config import parse_overrides
    from rlipv2_scale.errors import ConfigError

    with pytest.raises(ConfigError, match=r"override 'optim.groups=\[\{name:': the value is not valid YAML"):
        parse_overrides(["optim.groups=[{name:"])


def test_a_key_given_twice_is_refused_at_any_depth(tmp_path):
    # safe_load keeps the last `train:` block: max_steps and zero_stage would be silently lost
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: x\ntrain:\n  max_steps: 3\n  zero_stage: 0\nmodel: tiny\ntrain:\n  seed: 7\n")
    with pytest.raises(ConfigError, match=r"'.*recipe.yaml': key 'train' appears twice \(lines 2 and 6\)"):
        read_yaml(recipe)
    recipe.write_text("inner:\n  lr: 0.5\n  layers: [4]\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"key 'lr' appears twice \(lines 2 and 4\)"):
        load_config(Outer, recipe)
    # in a parent named by `extends`, the parent is named
    (tmp_path / "child.yaml").write_text("extends: recipe.yaml\nname: y\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml': key 'lr'"):
        read_yaml(tmp_path / "child.yaml")
    # and in a mapping written inline in an override value
    with pytest.raises(ConfigError, match="override 'inner={lr: 1, lr: 2}': 'lr' appears twice"):
        parse_overrides(["inner={lr: 1, lr: 2}"])


def test_the_strict_loader_stays_safe_and_keeps_yaml_merge_keys(tmp_path):
    from rlipv2_scale.config import strict_yaml

    assert strict_yaml("base: &b {lr: 1, kind: a}\ninner:\n  <<: *b\n  lr: 2\n")["inner"] == {"lr": 2, "kind": "a"}
    (tmp_path / "evil.yaml").write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(tmp_path / "evil.yaml")


def test_the_cli_names_a_duplicate_recipe_key_in_one_line(tmp_path, capsys):
    from rlipv2_scale.cli import main

    recipe = tmp_path / "dup.yaml"
    recipe.write_text("run: {name: t, dir: %s}\nmodel: {name: tiny}\ntrain:\n  max_steps: 3\n  zero_stage: 0\n"
                      "train:\n  seed: 7\n" % (tmp_path / "run"))
    assert main(["cluster", "submit", str(recipe), "--gpus-per-node", "0", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dup.yaml': key 'train' appears twice (lines 3 and 6)" in err, err
    assert not (tmp_path / "run").exists()
