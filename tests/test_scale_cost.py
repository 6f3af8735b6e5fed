import json
from pathlib import Path

import pytest
import torch

from rlipv2_scale.errors import UserError
from rlipv2_scale.scale.cost import GPUS, ModelCost, PlanAssumptions, comm_bytes, plan, state_bytes
from rlipv2_scale.scale.measure import activation_bytes, count_flops

RECIPES_TINY = Path(__file__).resolve().parent.parent / "recipes" / "tiny" / "pretrain" / "r50_vg.yaml"


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


def test_activation_bytes_leaves_no_model_alive():
    # relu saves its own output; on a branch the loss does not use, the backward never frees it:
    # packed as itself, that output would hold its graph, and through it the model's weights,
    # forever (a cycle through autograd that Python's collector cannot break)
    import weakref

    lin = torch.nn.Linear(16, 32)
    weight = weakref.ref(lin.weight)
    x = torch.randn(8, 16)

    def step():
        out = lin(x)  # noqa: F821 (deleted below on purpose: the test checks nothing keeps it alive)
        torch.relu(out)            # an output the loss leaves out (RLIPv2 has such heads)
        return out.sum()

    assert activation_bytes(step, exclude=list(lin.parameters())) > 0
    del lin
    assert weight() is None


# ------------------------------------------------------------------------------ per step vs per image
class TextAndImages(torch.nn.Module):
    """A label-text path run once per batch and an image path run once per image: the shape of
    RLIPv2's cost (the text encoder over the label list, the backbone over each image)."""

    def __init__(self):
        super().__init__()
        self.text = torch.nn.Linear(32, 32, bias=False)
        self.image = torch.nn.Linear(3 * 4 * 4, 16, bias=False)

    def forward(self, images, mask, obj_texts, rel_texts):
        labels = self.text(torch.ones(len(obj_texts) + len(rel_texts), 32))
        feats = self.image(images.flatten(1))
        out = feats.sum() + labels.sum()
        return {k: out.reshape(1) for k in ("pred_sub_boxes", "pred_obj_boxes", "pred_sub_logits", "pred_obj_logits",
                                            "pred_rel_logits")}


def test_measure_once_splits_flops_into_per_step_and_per_image():
    from rlipv2_scale.scale.plan import Measurement, extrapolate, measure_once

    m = measure_once(TextAndImages(), 4, 4, num_obj=3, num_rel=2)
    labels = 3 + 1 + 2                                 # objects + "no objects" + relations
    # forward and weight gradient of each linear layer; the inputs need no gradient
    assert m.flops_per_step == 2 * 2 * labels * 32 * 32
    assert m.flops == 2 * 2 * 48 * 16
    # the old charge: one batch-of-1 measurement per image counts the text path once per image
    batch = 8
    assert m.flops_per_step + batch * m.flops < batch * (m.flops_per_step + m.flops)
    # per image linear in pixels, per step independent of the resolution
    a = Measurement(10, 10, flops=100.0, activation_bytes=10.0, flops_per_step=50.0, activation_bytes_per_step=5.0)
    b = Measurement(20, 20, flops=400.0, activation_bytes=40.0, flops_per_step=70.0, activation_bytes_per_step=5.0)
    e = extrapolate(a, b, 30, 30)
    assert (e.flops, e.activation_bytes, e.flops_per_step, e.activation_bytes_per_step) == (900.0, 90.0, 60.0, 5.0)


def test_model_cost_charges_the_text_encoder_once_per_step():
    cost = ModelCost(params=10, trainable_params=10, flops_per_image=5.0, activation_bytes_per_image=2.0,
                     flops_per_step=100.0, activation_bytes_per_step=7.0)
    assert cost.flops(4) == 120.0 and cost.activation_bytes(4) == 15.0


# ------------------------------------------------------------------------------ DeepSpeed in detail
def test_collectives_per_step_by_stage_buckets_and_modules():
    from rlipv2_scale.scale.cost import DeepSpeedBuckets, collectives_per_step

    cost = ModelCost(params=1_200, trainable_params=1_000, flops_per_image=1.0, activation_bytes_per_image=0,
                     tensors=30, modules=20)
    b = DeepSpeedBuckets(reduce_bucket=300, param_groups=2, trainer_collectives=3)
    assert collectives_per_step(cost, 0, 1, b) == 0              # one rank: nothing to wait for
    assert collectives_per_step(cost, 0, 2, b) == 4 + 3          # ceil(1000 / 300) buckets + trainer
    assert collectives_per_step(cost, 2, 2, b) == 4 + 2 + 2 + 3  # + norm, overflow, one gather per group
    assert collectives_per_step(cost, 3, 8, b) == 2 * 20 + 4 + 2 + 3
    # bigger buckets, fewer collectives
    assert collectives_per_step(cost, 0, 2, DeepSpeedBuckets(reduce_bucket=5e8)) == 1 + 3
    # all-gathers of updated weights: per group, one per all-gather bucket (500 per group / 200)
    small = DeepSpeedBuckets(reduce_bucket=300, allgather_bucket=200, param_groups=2, trainer_collectives=3)
    assert collectives_per_step(cost, 2, 2, small) == 4 + 2 + 2 * 3 + 3


def test_plan_counts_the_recipes_deepspeed_buckets():
    from rlipv2_scale.scale.cost import DeepSpeedBuckets
    from rlipv2_scale.train.config import load_run_config

    train = load_run_config(RECIPES_TINY, ["train.reduce_bucket_size=1000", "train.allgather_bucket_size=500"]).train
    assert DeepSpeedBuckets.from_train_config(train) == DeepSpeedBuckets(reduce_bucket=1000.0, allgather_bucket=500.0)
    cost = ModelCost(params=1_000_000, trainable_params=1_000_000, flops_per_image=1e12, activation_bytes_per_image=0)
    rows = {b: {(r.gpus, r.zero_stage): r for r in plan(cost, [16], PlanAssumptions(buckets=b, overlap=0.0), 1000, 1)}
            for b in (DeepSpeedBuckets(), DeepSpeedBuckets(reduce_bucket=1000.0))}
    # 1000 buckets of 1000 gradients instead of one: a latency each (nothing hidden behind compute)
    a, b = rows.values()
    assert b[(16, 0)].comm_s - a[(16, 0)].comm_s == pytest.approx(999 * PlanAssumptions().collective_latency_s)


def test_rank_memory_of_deepspeed_stages_in_fp32():
    from rlipv2_scale.scale.cost import rank_memory

    psi = 1_000_000
    cost = ModelCost(params=psi, trainable_params=psi, flops_per_image=1.0, activation_bytes_per_image=100.0,
                     precision="fp32", activation_bytes_per_step=50.0)
    # ZeRO-0: weights 4 + Adam 8 + at the step gradients 4 and a flat all-reduce bucket 4 bytes/param
    assert rank_memory(cost, 0, 2, 1)["peak"] == 20 * psi
    # plain PyTorch: no bucket, so the backward (gradients built up beside the activations) is the peak
    assert rank_memory(cost, None, 1, 1)["peak"] == 16 * psi + 150
    # the optimizer's temporaries join the step: over every parameter (plain, ZeRO-0) or the partition
    assert rank_memory(cost, None, 1, 1, optimizer_temp_per_param=8.0)["peak"] == 24 * psi
    assert rank_memory(cost, 2, 2, 1, optimizer_temp_per_param=8.0)["optimizer_temps"] == 4 * psi
    # ZeRO-1 keeps full gradients and a bucket; the fp32 master, moments and partition copies shrink with N
    assert rank_memory(cost, 1, 1, 1)["peak"] == (4 + 4 + 4 + 20) * psi
    assert rank_memory(cost, 1, 2, 1)["peak"] == (4 + 4 + 4 + 10) * psi
    assert rank_memory(cost, 2, 2, 1)["peak"] == (4 + 4 + 10) * psi
    # ZeRO-3: partitioned weights, master, moments, gradients and two flat copies (28/N bytes/param);
    # whole: the gradient bucket, and in the forward/backward the gathered weights and a staging
    # buffer, with the activations (2 images × 100 + 50)
    z3 = rank_memory(cost, 3, 4, 2)
    assert z3["peak"] == 28 * psi / 4 + 4 * psi + 4 * psi + 4 * psi + 250.0
    assert [rank_memory(cost, s, 8, 1)["peak"] for s in (1, 2)] == sorted(
        [rank_memory(cost, s, 8, 1)["peak"] for s in (1, 2)], reverse=True)
    # activations dominate a small model: the forward phase is the peak
    act = ModelCost(params=10, trainable_params=10, flops_per_image=1.0, activation_bytes_per_image=1e6,
                    precision="fp32")
    assert rank_memory(act, 2, 2, 3)["peak"] == pytest.approx(3e6 + 4 * 10 + 4 * 10 + 12 * 10 / 2)
    # where whole gradients are kept (plain, ZeRO-0/1) they build up while activations are held
    assert rank_memory(act, None, 1, 3)["peak"] == pytest.approx(3e6 + 4 * 10 + 8 * 10 + 4 * 10)
    assert rank_memory(act, 0, 2, 3)["peak"] == pytest.approx(3e6 + 4 * 10 + 8 * 10 + 4 * 10)


def test_machine_rank_memory_adds_the_machines_baseline_and_optimizer_temporaries():
    from rlipv2_scale.scale.calibrate import MachineConstants
    from rlipv2_scale.scale.cost import machine_rank_memory, rank_memory

    cost = ModelCost(params=1000, trainable_params=1000, flops_per_image=1.0, activation_bytes_per_image=10.0,
                     precision="fp32")
    gpu = MachineConstants(device="gpu", threads=1, device_workspace_bytes=500.0, optimizer_temp_bytes_per_param=8.0)
    mem = machine_rank_memory(cost, gpu, None, 1, 2)
    assert mem["baseline"] == 500.0 and mem["optimizer_temps"] == 8000.0
    assert mem["peak"] == rank_memory(cost, None, 1, 2, optimizer_temp_per_param=8.0)["peak"] + 500.0
    cpu = MachineConstants(device="cpu", threads=1, baseline_bytes=2e6)
    assert machine_rank_memory(cost, cpu, 2, 2, 2)["peak"] == rank_memory(cost, 2, 2, 2)["peak"] + 2e6


def test_step_time_adds_optimizer_deepspeed_and_communication():
    from rlipv2_scale.scale.calibrate import MachineConstants
    from rlipv2_scale.scale.cost import DeepSpeedBuckets, collectives_per_step, step_time

    cost = ModelCost(params=1_000, trainable_params=1_000, flops_per_image=1.0, activation_bytes_per_image=0,
                     precision="fp32", tensors=10, modules=5)
    m = MachineConstants(device="cpu", threads=1, collective_latency_s=1e-3, collective_bytes_per_s=4e3,
                         adam_s_per_param=1e-6, adam_s_per_tensor=1e-4,
                         deepspeed_s={"0": [0.0, 0.0, 0.0], "2": [2e-6, 1e-4, 0.0], "3": [1e-6, 1e-3, 0.5]})
    alone = step_time(cost, m, 0, 1, 2, forward_backward_s=1.0)
    assert alone["communication"] == 0 and alone["optimizer"] == pytest.approx(1e-3 + 1e-3)
    assert alone["total"] == pytest.approx(1.0 + 2e-3)
    two = step_time(cost, m, 2, 2, 2, forward_backward_s=1.0, contention=1.5)
    # ZeRO-2 on 2 ranks: Adam on half the parameters, DeepSpeed's own work, and DeepSpeed's
    # bucket all-reduce (2·(N−1)/N·4Ψ) + weight all-gather ((N−1)/N·4Ψ) at 4 kB/s, plus one latency
    # per collective
    optimizer = 1e-6 * 500 + 1e-4 * 10
    deepspeed = 2e-6 * 1000 * (1 / 3 + 2 / 3 / 2) + 1e-4 * 10      # partition copies halve on 2 ranks
    comm = 6000 / 4e3 + collectives_per_step(cost, 2, 2, DeepSpeedBuckets()) * 1e-3
    assert two["total"] == pytest.approx(1.5 * (1.0 + optimizer + deepspeed) + comm)
    # ZeRO-3 pays per module
    z3 = step_time(cost, m, 3, 1, 2, forward_backward_s=1.0)
    assert z3["deepspeed"] == pytest.approx(1e-6 * 1000 + 1e-3 * 5 + 0.5)
    z3_comm = step_time(cost, m, 3, 2, 2, forward_backward_s=1.0)["communication"]
    # AdamW measured on the model replaces the probes' rates where it runs over the model's own
    # tensors (ZeRO-0, plain), not over a flat partition (ZeRO >= 1)
    assert step_time(cost, m, 0, 1, 2, forward_backward_s=1.0, optimizer_s=0.25)["optimizer"] == 0.25
    assert step_time(cost, m, None, 1, 2, forward_backward_s=1.0, optimizer_s=0.25)["optimizer"] == 0.25
    assert step_time(cost, m, 2, 2, 2, forward_backward_s=1.0, optimizer_s=0.25)["optimizer"] == pytest.approx(optimizer)
    # DeepSpeed's collectives as measured on 2 ranks replace the backend's bandwidth for that stage
    m.deepspeed_comm_s_per_byte = {"2": 1e-3}
    measured = step_time(cost, m, 2, 2, 2, forward_backward_s=1.0)
    assert measured["communication"] == pytest.approx(6000 * 1e-3 + collectives_per_step(cost, 2, 2,
                                                                                           DeepSpeedBuckets()) * 1e-3)
    assert step_time(cost, m, 3, 2, 2, forward_backward_s=1.0)["communication"] == pytest.approx(z3_comm)


def test_fit_costs_separates_per_parameter_per_tensor_and_per_step_costs(tmp_path):
    from rlipv2_scale.scale.calibrate import MachineConstants, fit_costs, load_constants

    # 1e-9 s per parameter, 1e-5 s per tensor, 2e-3 s per step
    def t(params, tensors):
        return (params, tensors, params * 1e-9 + tensors * 1e-5 + 2e-3)

    x = fit_costs([t(6e6, 12), t(1e4, 320), t(1e3, 40)])
    assert x == pytest.approx([1e-9, 1e-5, 2e-3], rel=1e-6)
    # noise that would make a term negative gives it 0, never a negative cost
    x = fit_costs([(1e6, 10, 1e-3), (1e3, 100, 0.5e-3), (1e3, 20, 0.6e-3)])
    assert min(x) >= 0
    m = MachineConstants(device="cpu", threads=1, deepspeed_s={"1": [1.0, 2.0, 3.0]})
    assert load_constants(m.save(tmp_path / "m.json")) == m
    (tmp_path / "bad.json").write_text(json.dumps({**m.to_dict(), "flops": 1}))
    with pytest.raises(UserError, match="unknown config key .*flops"):
        load_constants(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({**m.to_dict(), "threads": "two"}))
    with pytest.raises(UserError, match="threads.*expected an integer"):
        load_constants(tmp_path / "bad.json")


def test_plan_with_measured_constants_adds_the_optimizer_deepspeed_and_latency():
    from rlipv2_scale.scale.calibrate import MachineConstants

    cost = ModelCost(params=200_000_000, trainable_params=190_000_000, flops_per_image=3e12,
                     activation_bytes_per_image=2 ** 30, flops_per_step=1e12, tensors=700, modules=400)
    a = PlanAssumptions(gpu=GPUS["h100"], micro_batch=4)
    m = MachineConstants(device="h100", threads=1, collective_latency_s=1e-3, adam_s_per_param=1e-11,
                         adam_s_per_tensor=1e-5, deepspeed_s={"3": [0.0, 1e-4, 0.0]})
    base = {(r.gpus, r.zero_stage): r for r in plan(cost, [8], a, images_per_epoch=1000, epochs=1)}
    measured = {(r.gpus, r.zero_stage): r for r in plan(cost, [8], PlanAssumptions(gpu=GPUS["h100"], micro_batch=4,
                                                                                    machine=m),
                                                         images_per_epoch=1000, epochs=1)}
    for key, r in base.items():
        assert measured[key].step_s > r.step_s
    # ZeRO-3 pays DeepSpeed's measured cost per module on top of AdamW on its 1/8 share
    extra = measured[(8, 3)].step_s - base[(8, 3)].step_s
    assert extra >= 1e-4 * 400 + 1e-11 * 190_000_000 / 8 + 1e-5 * 700
    # compute is charged per step for the text encoder: 4 images cost 1 + 4·3 TFLOP, not 4·4
    peak = GPUS["h100"].peak_tflops * 1e12 * a.mfu
    assert base[(8, 0)].compute_s == pytest.approx((1e12 + 4 * 3e12) / peak)


def test_deepspeed_reduces_zero12_buckets_by_all_reduce():
    from rlipv2_scale.scale.cost import DeepSpeedBuckets, deepspeed_comm_bytes

    cost = ModelCost(params=1000, trainable_params=1000, flops_per_image=1.0, activation_bytes_per_image=0,
                     precision="fp32")
    # all-reduce of the bucket (2Ψ) + all-gather of the updated partitions (Ψ), ring share 1/2
    assert deepspeed_comm_bytes(cost, 2, 2) == pytest.approx(3 * 4000 * 0.5)
    assert deepspeed_comm_bytes(cost, 1, 2, DeepSpeedBuckets(multi_rank_allreduce=False)) == comm_bytes(cost, 1, 2)
    assert deepspeed_comm_bytes(cost, 0, 2) == comm_bytes(cost, 0, 2)
    assert deepspeed_comm_bytes(cost, 3, 1) == 0


def test_optimizer_probe_measures_nonnegative_costs():
    from rlipv2_scale.scale.calibrate import optimizer_probe

    costs, raw, temps = optimizer_probe(torch.device("cpu"), repeat=2, large_params=1_000_000)
    assert len(costs) == 3 and min(costs) >= 0 and sum(costs) > 0
    assert set(raw) == {"large", "small", "few"} and all(t > 0 for t in raw.values())
    assert temps == 0.0       # memory probes need a device allocator's statistics (GPUs)


def test_model_optimizer_seconds_times_adamw_over_the_models_tensors():
    from rlipv2_scale.scale.calibrate import model_optimizer_seconds

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 1))
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 64)
    seconds = model_optimizer_seconds(model, lambda: model(x).sum(), repeat=2)
    assert 0 < seconds < 5
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))   # it really stepped
    assert all(p.grad is None for p in model.parameters())


def test_synthetic_targets_are_well_formed():
    from rlipv2_scale.scale.measure import synthetic_targets

    targets = synthetic_targets(3, 64, 96, num_obj=5, num_rel=4, objects=4, pairs=3)
    assert len(targets) == 3
    for t in targets:
        assert t.boxes.shape == (4, 4) and bool(((t.boxes >= 0) & (t.boxes <= 1)).all())
        assert t.labels.max() < 5 and t.rel_labels.shape == (3, 4) and bool((t.rel_labels.sum(1) == 1).all())
        assert torch.equal(t.sub_boxes, t.boxes[t.sub_index]) and torch.equal(t.obj_labels, t.labels[t.obj_index])
        assert bool((t.sub_index != t.obj_index).all()) and t.orig_size == (64, 96)


def test_forward_backward_of_the_recipe_model_is_timed_in_a_process_of_its_own():
    from pathlib import Path

    from rlipv2_scale.scale.calibrate import forward_backward_seconds

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "demo" / "demo.yaml"
    seconds, data, opt = forward_backward_seconds(recipe, ["model.text.tokenizer=null"], batch=1, height=64,
                                                  width=64, ranks=1, repeat=1, optimizer=True)
    assert 0 < seconds < 30 and data is None and 0 < opt < 30


def test_calibrate_measures_deepspeed_on_one_and_two_ranks(tmp_path):
    # The whole `rlipv2 scale calibrate` on small probes: gloo ping, AdamW, DeepSpeed per stage on one
    # rank and on two at once, the process baseline.
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "machine.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "rlipv2_scale.cli", "scale", "calibrate", "--out", str(out),
                           "--repeat", "2", "--probe-params", "600000"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    c = json.loads(out.read_text())
    assert c["collective_latency_s"] > 0 and c["collective_bytes_per_s"] > 0 and c["baseline_bytes"] > 2 ** 27
    assert sorted(c["deepspeed_s"]) == sorted(c["deepspeed_comm_s_per_byte"]) == ["0", "1", "2", "3"]
    assert all(v >= 0 for v in c["deepspeed_comm_s_per_byte"].values())
    assert sum(c["deepspeed_comm_s_per_byte"].values()) > 0        # two ranks cost more than one
    assert c["device_workspace_bytes"] == 0 and c["optimizer_temp_bytes_per_param"] == 0   # CPU


def _one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rlipv2: error:") and all(w in err for w in words), err
    return err


def test_calibrate_and_plan_check_device_and_outputs_before_measuring(tmp_path, capsys, monkeypatch):
    from rlipv2_scale.cli import main
    from rlipv2_scale.scale import calibrate, plan

    def measured(*a, **k):
        raise AssertionError("measured before the arguments were checked")

    monkeypatch.setattr(calibrate, "calibrate", measured)
    monkeypatch.setattr(plan, "build_plan", measured)
    assert main(["scale", "calibrate", "--device", "tpu", "--no-deepspeed"]) == 2
    _one_line_error(capsys, "--device 'tpu'", "cpu, cuda")
    folder = tmp_path / "folder"
    folder.mkdir()
    assert main(["scale", "calibrate", "--out", str(folder), "--no-deepspeed"]) == 2
    _one_line_error(capsys, str(folder), "is a folder", "machine.json")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for out in (notes, notes / "machine.json"):
        assert main(["scale", "calibrate", "--out", str(out), "--no-deepspeed"]) == 2
        _one_line_error(capsys, str(out), "another --out")
    assert notes.read_text() == "mine"
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "demo" / "demo.yaml"
    assert main(["scale", "plan", str(recipe), "--out", str(notes)]) == 2
    _one_line_error(capsys, str(notes), "is a file")
    (folder / "plan.json").write_text("[1]")
    assert main(["scale", "plan", str(recipe), "--out", str(folder)]) == 2
    _one_line_error(capsys, str(folder / "plan.json"), "not a plan")
    assert notes.read_text() == "mine" and (folder / "plan.json").read_text() == "[1]"


def test_machine_constants_with_an_unknown_key_name_the_file_and_the_key_once(tmp_path):
    from rlipv2_scale.scale.calibrate import MachineConstants, load_constants

    path = tmp_path / "m.json"
    path.write_text(json.dumps({**MachineConstants(device="cpu", threads=1).to_dict(), "foo": 1}))
    with pytest.raises(UserError) as err:
        load_constants(path)
    msg = str(err.value)
    assert msg.startswith(f"machine constants '{path}': unknown config key 'foo'") and "calibrate" in msg, msg
    assert f"'{path}'." not in msg
