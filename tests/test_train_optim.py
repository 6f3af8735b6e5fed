"""Parameter groups by module path and the lr schedules (values computed by hand)."""
from __future__ import annotations

import pytest
from torch import nn

from rlipv2_scale.errors import ConfigError
from rlipv2_scale.train.config import OptimConfig, ParamGroupConfig
from rlipv2_scale.train.optim import build_optimizer, build_scheduler, group_lrs, lr_multiplier, param_groups


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(2, 3)
        self.text_encoder = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 3))
        self.encoder = nn.Linear(3, 3)            # ALIF / in-encoder language layers: base lr
        self.head = nn.Linear(3, 1)
        self.backbone.bias.requires_grad_(False)  # frozen: not optimised


def test_groups_by_module_path():
    groups = {g["name"]: g for g in param_groups(Net(), OptimConfig())}
    assert set(groups) == {"backbone", "text_encoder", "default"}
    assert len(groups["backbone"]["params"]) == 1                       # frozen bias left out
    assert len(groups["text_encoder"]["params"]) == 3
    assert len(groups["default"]["params"]) == 4                        # encoder + head
    assert groups["backbone"]["lr"] == 1.41e-5 and groups["default"]["lr"] == 1.41e-4
    assert all(g["weight_decay"] == 1e-4 for g in groups.values())


def test_first_matching_group_wins_and_own_weight_decay():
    cfg = OptimConfig(lr=1.0, groups=[ParamGroupConfig("bias", ["*.bias"], 0.5, weight_decay=0.0),
                                      ParamGroupConfig("backbone", ["backbone.*"], 0.1)])
    groups = {g["name"]: g for g in param_groups(Net(), cfg)}
    assert len(groups["bias"]["params"]) == 3 and groups["bias"]["weight_decay"] == 0.0
    assert len(groups["backbone"]["params"]) == 1


def test_a_group_matching_nothing_is_an_error():
    cfg = OptimConfig(groups=[ParamGroupConfig("vision", ["vision_tower.*"], 1e-5)])
    with pytest.raises(ConfigError, match=r"optim.groups \['vision'\]"):
        param_groups(Net(), cfg)


def test_step_schedule_drops_at_epoch_boundaries():
    f = lr_multiplier(OptimConfig(lr_drop_epochs=[15]), total_steps=200, steps_per_epoch=10)
    assert [f(s) for s in (0, 149)] == [1.0, 1.0]
    assert f(150) == pytest.approx(0.1) and f(199) == pytest.approx(0.1)
    f = lr_multiplier(OptimConfig(lr_drop_epochs=[2, 4], warmup_steps=4), total_steps=100, steps_per_epoch=5)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(10) == pytest.approx(0.1) and f(20) == pytest.approx(0.01)


def test_cosine_schedule():
    f = lr_multiplier(OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1), 110, 1)
    assert f(9) == 1.0 and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)          # half way: cos(pi/2) = 0
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_scheduler_scales_every_group_once_per_step():
    cfg = OptimConfig(lr=1.0, groups=[ParamGroupConfig("backbone", ["backbone.*"], 0.1)], lr_drop_epochs=[1])
    opt = build_optimizer(Net(), cfg)
    sched = build_scheduler(opt, cfg, total_steps=4, steps_per_epoch=2)
    seen = []
    for _ in range(3):
        seen.append(group_lrs(opt))
        opt.step()
        sched.step()
    assert seen[0] == {"backbone": 0.1, "default": 1.0}
    assert seen[1] == {"backbone": 0.1, "default": 1.0}
    assert seen[2] == pytest.approx({"backbone": 0.01, "default": 0.1})
    restored = build_scheduler(build_optimizer(Net(), cfg), cfg, 4, 2)
    restored.load_state_dict(sched.state_dict())
    assert restored.last_epoch == 3 and restored.get_last_lr() == pytest.approx(sched.get_last_lr())
