import pytest
import torch

from rlipv2_scale.scale.cost import GPUS, ModelCost, PlanAssumptions, comm_bytes, plan, state_bytes
from rlipv2_scale.scale.measure import activation_bytes, count_flops


def test_state_bytes_partition_by_stage():
    cost = ModelCost(params=1000, trainable_params=800, flops_per_image=1.0, activation_bytes_per_image=0)
    s0 = state_bytes(cost, 0, 4)
    assert s0 == {"weights": 2000, "gradients": 1600, "optimizer": 9600, "total": 13200}
    assert state_bytes(cost, 1, 4)["optimizer"] == 2400 and state_bytes(cost, 1, 4)["gradients"] == 1600
    assert state_bytes(cost, 2, 4)["gradients"] == 400 and state_bytes(cost, 2, 4)["weights"] == 2000
    assert state_bytes(cost, 3, 4)["weights"] == 500
    fp32 = ModelCost(1000, 1000, 1.0, 0, precision="fp32")
    assert state_bytes(fp32, 0, 1)["total"] == 16000
    with pytest.raises(ValueError):
        state_bytes(cost, 4, 2)


def test_comm_volume_ddp_vs_zero3():
    cost = ModelCost(params=1000, trainable_params=1000, flops_per_image=1.0, activation_bytes_per_image=0)
    assert comm_bytes(cost, 0, 1) == 0
    assert comm_bytes(cost, 0, 2) == pytest.approx(2 * 2000 * 0.5)
    assert comm_bytes(cost, 2, 8) == comm_bytes(cost, 0, 8)
    assert comm_bytes(cost, 3, 8) == pytest.approx(1.5 * comm_bytes(cost, 0, 8))


def test_plan_scaling_and_memory_fit():
    cost = ModelCost(params=200_000_000, trainable_params=190_000_000, flops_per_image=3e12,
                     activation_bytes_per_image=4 * 1024 ** 3)
    rows = plan(cost, [8, 64], PlanAssumptions(gpu=GPUS["h100"], micro_batch=4), images_per_epoch=1_000_000, epochs=20)
    by = {(r.gpus, r.zero_stage): r for r in rows}
    assert len(rows) == 8
    # ZeRO-3 holds the least state, and fits a larger micro-batch than DDP
    assert by[(8, 3)].state_gib < by[(8, 2)].state_gib < by[(8, 1)].state_gib < by[(8, 0)].state_gib
    assert by[(8, 3)].max_micro_batch >= by[(8, 0)].max_micro_batch
    # crossing nodes slows communication: weak-scaling efficiency ≤ 1, and 1 at the base count
    assert by[(8, 0)].weak_scaling_eff == pytest.approx(1.0)
    assert by[(64, 0)].weak_scaling_eff <= 1.0
    assert by[(64, 0)].images_per_s > by[(8, 0)].images_per_s
    # GPU-hours = images / rate × gpus
    r = by[(8, 0)]
    assert r.gpu_hours == pytest.approx(1_000_000 * 20 / r.images_per_s / 3600 * 8)


def test_flops_and_activations_of_a_linear_layer():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 32)
    x = torch.randn(8, 16)
    # forward 2·8·16·32 and the weight gradient 2·32·8·16; x needs no gradient
    assert count_flops(lambda: lin(x).sum()) == 2 * 2 * 8 * 16 * 32
    xg = x.clone().requires_grad_()
    assert count_flops(lambda: lin(xg).sum()) == 3 * 2 * 8 * 16 * 32
    # y = relu(lin(x)).sum(): autograd saves x for the weight gradient and relu's output
    lin.zero_grad()
    saved = activation_bytes(lambda: torch.relu(lin(x)).sum(), exclude=list(lin.parameters()))
    assert saved == x.numel() * 4 + 8 * 32 * 4
