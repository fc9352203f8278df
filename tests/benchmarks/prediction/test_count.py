"""Per-rank memory counted on fake tensors (benchmarks/prediction/count.py): checked against a real 2-process
run of the trainer, and the analytic model (benchmarks/prediction/analytic.py) checked against it per
component at full scale on every paper preset."""

import contextlib

import pytest
import torch
from distributed import run_distributed

from rsscale.benchmarks.prediction import analytic as A
from rsscale.benchmarks.prediction.count import COMPONENTS, count_finetune, count_plan, count_stage
from rsscale.scaling.spec.config import PAPER_PRESETS, get_preset
from rsscale.scaling.spec.layout import Layout


def _real_rank_bytes(rank, world, precision, sp, recompute):
    """One rank of a real gloo run of the trainer: the bytes its allocations and autograd hold."""
    from rsscale.scaling.spec.run import Compute, Recording
    from rsscale.scaling.train.pretrain import TrainConfig, Trainer

    cfg = TrainConfig(model="mini", parallel=Layout(tp=2, sp=sp, micro_batch=2, global_batch=4), compute=Compute(precision=precision, recompute=recompute),
                      data="random", recording=Recording(record=False))
    tr = Trainer.build(cfg)
    tr.train_step()  # leaves every p.grad allocated
    opt, model = tr.optimizer, tr.model
    frozen = [p for p in model.parameters() if not p.requires_grad]
    grads = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [opt.grad] + [p.grad for _, p in opt.named if p.grad is not None]}
    out = {"params": opt.flat.untyped_storage().nbytes() + sum(p.untyped_storage().nbytes() for p in frozen),
           "grads": sum(grads.values()),  # every gradient lives in the one flat buffer (bf16: p.grad freed by the hook)
           "optimizer": sum(t.untyped_storage().nbytes() for t in (opt.exp_avg, opt.exp_avg_sq, opt.master) if t is not None)}
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            saved[s.data_ptr()] = s.nbytes()
        return t

    imgs, noise = tr._micro_batches()[0]
    # The trainer's micro-batch images are views of one [num_micro, B, C, H, W] batch that it holds for
    # the whole step; in fp32 the patch embedding saves that view, whose storage is every micro-batch's
    # images. This micro-batch's own images are what its forward keeps (the count's and analytic's figure).
    imgs = imgs.clone()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), tr._autocast():
        loss = tr.model.forward_stage(None, imgs, noise)[0]
    saved[loss.untyped_storage().data_ptr()] = 4  # the fp32 micro-batch loss the schedule keeps
    out["activations"] = sum(saved.values())
    if recompute == "full":  # plus the largest block's whole saved set, live while backward runs it again
        out["activations"] += max(_saved_per_block(tr, imgs, noise, skip).values())
    return out


def _saved_per_block(tr, imgs, noise, skip):
    """Bytes each transformer block saves for backward when it is not checkpointed (a plain forward),
    its input left out (a checkpointed block keeps that anyway)."""
    blocks, current, per_block, seen = list(tr.model.transformer_blocks()), [None], {}, set()

    def enter(m, args):
        current[0] = m
        seen.update(a.untyped_storage().data_ptr() for a in args if torch.is_tensor(a))

    for blk in blocks:
        blk.recompute = "none"
        blk.register_forward_pre_hook(enter)
        blk.register_forward_hook(lambda m, *_: current.__setitem__(0, None))

    def pack(t):
        s = t.untyped_storage()
        if current[0] is not None and s.data_ptr() not in skip | seen:
            seen.add(s.data_ptr())
            per_block[current[0]] = per_block.get(current[0], 0) + s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), tr._autocast():
        tr.model.forward_stage(None, imgs, noise)
    return per_block


@pytest.mark.parametrize("precision,sp,recompute", [("bf16", True, "none"), pytest.param("fp32", False, "full", marks=pytest.mark.slow)])
def test_count_matches_a_real_two_process_run(precision, sp, recompute):
    """Fake-tensor counting of TP rank 0 == what a real TP=2 gloo run of the trainer holds."""
    real = run_distributed(_real_rank_bytes, 2, precision, sp, recompute)[0]
    plan = A.Plan(Layout(tp=2, sp=sp, micro_batch=2, global_batch=4), precision=precision, recompute=recompute)
    counted = count_stage(get_preset("mini"), plan, 0).as_dict()
    for c in ("params", "grads", "optimizer"):
        assert counted[c] == real[c], c
    # activations: one micro-batch in flight (PP=1); the real run's saved set is the reference
    assert counted["activations"] == pytest.approx(real["activations"], rel=0.005)


def test_count_restores_a_single_process_world():
    from rsscale.scaling.parallel import state

    state.init_parallel(1, 1)
    count_stage(get_preset("tiny"), A.Plan(Layout(tp=2, pp=2, dp=2, micro_batch=1, global_batch=4)), 1)
    assert state.is_initialized() and torch.distributed.get_world_size() == 1 and torch.distributed.get_backend() == "gloo"


def _plan(tp, pp, dp, sp=False, recompute=False, zero=False, precision="bf16", mb=2, vpp=1, fsdp=False):
    return A.Plan(Layout(tp=tp, pp=pp, dp=dp, sp=sp, micro_batch=mb, global_batch=mb * dp * 4, vpp=vpp), precision=precision,
                  recompute=recompute, distributed_optimizer=zero, fsdp=fsdp)


def _slow(plan):
    return pytest.param(plan, marks=pytest.mark.slow)


# TP 1/2/4/8, SP on/off, PP 1/2/4, recompute on/off, ZeRO-1 on/off, bf16 and fp32. CI runs the
# first of each group; `-m slow` runs the rest (about 1-3 s each on an idle 2-core machine).
# Interleaved 1F1B (vpp): each rank's chunks, in flight as its order holds them.
G12X4_PLANS = [_plan(8, 1, 1, sp=True), _plan(4, 4, 1), _plan(4, 4, 1, vpp=3), _plan(2, 2, 2, sp=True, recompute="selective"),
               _plan(2, 2, 4, fsdp=True)] + [_slow(p) for p in [
    _plan(2, 2, 2, sp=True, recompute=True, vpp=2), _plan(1, 2, 1, precision="fp32", vpp=6),
    _plan(1, 1, 8, fsdp=True, recompute="full", precision="fp32"), _plan(4, 2, 2, sp=True, fsdp=True, recompute="selective"),
    _plan(4, 1, 1, recompute="selective", precision="fp32"), _plan(1, 2, 2, recompute="selective", zero=True),
    _plan(8, 1, 1), _plan(8, 1, 4, sp=True, zero=True, precision="fp32"),
    _plan(4, 4, 2, sp=True, recompute=True, zero=True), _plan(4, 4, 2, precision="fp32"),
    _plan(2, 2, 2, sp=True, recompute=True), _plan(2, 2, 4, zero=True, precision="fp32"),
    _plan(1, 4, 2, recompute=True, zero=True), _plan(1, 1, 8, zero=True, mb=1), _plan(1, 2, 1, precision="fp32", recompute=True),
    _plan(4, 1, 2, sp=True, precision="fp32", mb=4), _plan(2, 1, 1, sp=True, recompute=True, precision="fp32"),
]]


PRESET_PLANS = [(name, _plan(4, 2, 2, sp=True)) for name in PAPER_PRESETS]


PRESET_PLANS += [pytest.param(name, _plan(2, 2, 1, recompute=True, zero=True, precision="fp32"), marks=pytest.mark.slow) for name in PAPER_PRESETS]


PRESET_PLANS += [pytest.param(name, _plan(2, 1, 2, recompute="selective"), marks=pytest.mark.slow) for name in PAPER_PRESETS]


PRESET_PLANS += [pytest.param(name, _plan(1, 2, 4, fsdp=True), marks=pytest.mark.slow) for name in PAPER_PRESETS]


def _check_every_component(cfg, plan):
    counted = count_plan(cfg, plan)
    predicted = A.memory_per_stage(cfg, plan)
    for stage, (c, a) in enumerate(zip(counted, predicted)):
        for comp in COMPONENTS:
            assert a[comp] == pytest.approx(getattr(c, comp), rel=0.03), f"{cfg.name} {plan.layout} stage {stage} {comp}"


def _id(p):
    return f"{p.layout}-{p.precision}-{p.flags}".replace(" ", "_") if isinstance(p, A.Plan) else p


@pytest.mark.parametrize("plan", G12X4_PLANS, ids=_id)
def test_analytic_memory_within_3pct_of_counted_g12x4(plan):
    _check_every_component(get_preset("g12x4"), plan)


@pytest.mark.parametrize("name,plan", PRESET_PLANS, ids=_id)
def test_analytic_memory_within_3pct_of_counted_every_paper_preset(name, plan):
    _check_every_component(get_preset(name), plan)


@pytest.mark.parametrize("precision,dp,zero", [("bf16", 4, True), ("bf16", 2, False), ("fp32", 2, True)])
def test_counted_bytes_per_parameter_are_megatrons(precision, dp, zero):
    """Weights + gradient buffer + optimizer state per trainable parameter, counted from the
    optimizer's buffers: 2 + 4 + 12/d with 16-bit weights (ZeRO-1 over d), 4 + 4 + 8/d in fp32;
    the analytic figure is the same (padding to a multiple of d per bucket is the only excess)."""
    cfg, plan = get_preset("b12x1"), _plan(2, 1, dp, zero=zero, precision=precision)
    counted = count_stage(cfg, plan, 0)
    n = A.stage_params(cfg, 2, 1, 0)
    per = (counted.params - 4 * n["frozen"] + counted.grads + counted.optimizer) / n["trainable"]
    d = dp if zero else 1
    bound = 2 + 4 + 12 / d if precision == "bf16" else 4 + 4 + 8 / d
    assert sum(A.bytes_per_param(precision, d).values()) == bound
    assert bound <= per <= bound * (1 + 1e-6)


VIT_L16_SUPERVISED = get_preset("b12x1").replace(name="vit-l16-sup", width=1024, heads=16, mlp=4096, depth=24, dec_depth=0, mask_ratio=0.0)


@pytest.mark.parametrize("plan", [_plan(4, 2, 2, sp=True), _plan(2, 1, 2, recompute=True, precision="fp32")], ids=_id)
def test_analytic_memory_within_3pct_of_counted_supervised_vit_l16(plan):
    """Supervised (no decoder, every patch, a classification head): the analytic model's last
    stage (head input, log-softmax, labels) against the count."""
    _check_every_component(VIT_L16_SUPERVISED, plan)




IMG = 64


def _batch(task, layout):
    """A fixed random micro-batch (equal on every rank): images and masks or one box per image."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(layout.micro_batch, 3, IMG, IMG, generator=g)
    if task == "seg":
        return imgs, torch.randint(0, 7, (layout.micro_batch, IMG, IMG), generator=g)
    box = {"boxes": torch.tensor([[30.0, 28.0, 20.0, 10.0, 0.3]]), "labels": torch.tensor([1])}
    return imgs, [box] * layout.micro_batch


@contextlib.contextmanager
def _saved_storages(model):
    """{storage address: bytes} of what autograd saves inside the block, parameters left out."""
    params, saved = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}

    def remember(t):
        address = t.untyped_storage().data_ptr()
        saved.update({} if address in params else {address: t.untyped_storage().nbytes()})
        return t

    with torch.autograd.graph.saved_tensors_hooks(remember, lambda t: t):
        yield saved


def _real_finetune_rank_bytes(rank, world, task, layout, precision, zero):
    """One rank of a real fine-tuning run: the bytes its model, gradients, optimizer and masks
    hold after a step, and what autograd saves in one micro-batch's forward (+ loss for seg)."""
    from rsscale.finetune import finetune as T
    from rsscale.scaling.parallel import state

    state.init_parallel(layout.tp, 1, layout.dp, seed=0)
    try:
        options = T.finetune_options(task, model="tiny", parallel=layout, crop=IMG, precision=precision, distributed_optimizer=zero)
        model = T.build_model(task, options, 7 if task == "seg" else 15, sequence_parallel=layout.sp)[0]
        tuner = T.Finetuner(options, model, None, torch.device("cpu"), steps=1)
        tuner.micro_batches = lambda step: [_batch(task, layout)] * layout.num_micro
        tuner.train_step()  # leaves every p.grad allocated
        opt = tuner.optimizer
        out = {"params": opt.flat.untyped_storage().nbytes() + sum(p.untyped_storage().nbytes() for p in model.parameters() if not p.requires_grad),
               "grads": sum({s.data_ptr(): s.nbytes() for s in [p.grad.untyped_storage() for _, p in opt.named] + [opt.grad.untyped_storage()]}.values()),
               "optimizer": opt.state_bytes()}
        imgs, target = _batch(task, layout)
        with _saved_storages(model) as saved, tuner._autocast():
            outs = model(imgs)
            if task == "seg":
                loss = model.loss_from(outs, target, model.normalizers(target))["total"]
                saved[loss.untyped_storage().data_ptr()] = loss.untyped_storage().nbytes()
        out["activations"] = sum(saved.values())
        return out
    finally:
        state.destroy_parallel()


@pytest.mark.parametrize("task,tp,precision,zero", [("seg", 1, "fp32", False), ("det", 1, "bf16", False),
                                                    ("seg", 2, "bf16", True),
                                                    pytest.param("det", 2, "fp32", False, marks=pytest.mark.slow)])
def test_counted_finetune_rank_equals_a_real_rank(task, tp, precision, zero):
    """Weights, gradients (every distinct storage) and optimizer state byte for byte; activations (forward through
    the segmentation loss / the dense detection outputs) within 0.5 %."""
    dp = 2 // tp if zero else 1
    layout = Layout(tp=tp, dp=dp, micro_batch=2, global_batch=2 * dp)
    if tp * dp == 1:
        from rsscale.scaling.parallel import state

        real = _real_finetune_rank_bytes(0, 1, task, layout, precision, zero)
        assert not state.is_initialized()
    else:
        real = run_distributed(_real_finetune_rank_bytes, tp * dp, task, layout, precision, zero)[0]
    plan = A.Plan(layout, precision=precision, distributed_optimizer=zero)
    counted, flops = count_finetune(get_preset("tiny"), plan, task, IMG)
    counted = counted.as_dict()
    for c in ("params", "grads", "optimizer"):
        assert counted[c] == real[c], (c, counted[c], real[c])
    assert counted["activations"] == pytest.approx(real["activations"], rel=0.005)
    assert flops["flops"] > flops["block_flops"] > 0


def test_profile_task_prints_counted_fine_tuning_layouts(capsys):
    """`rsscale profile --task seg`: every TP x DP layout (no pipeline), its memory the count's."""
    from rsscale.scaling.runtime.cli import main

    argv = ["profile", "--model", "tiny", "--gpus", "2", "--task", "seg", "--img", str(IMG), "--micro-batch", "1",
            "--global-batch", "2", "--precision", "fp32", "--memory-gb", "1", "--reserve-gb", "0.5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("TP")]
    assert {r.split()[0] for r in rows} == {"TP1", "TP2", "TP2+SP"} and all(" PP1 " in r for r in rows)
    counted = count_finetune(get_preset("tiny"), A.Plan(Layout(tp=2, micro_batch=1, global_batch=2), precision="fp32"), "seg", IMG)[0]
    row = next(r for r in rows if r.startswith("TP2 PP1 DP1 mb1") and r.split()[5] == "--")
    from rsscale.benchmarks.autolayout import size

    assert row.split()[10] == size(counted.total)  # small enough to be shown in MiB
    assert main(argv + ["--count"]) == 2  # --task counts already: a one-line error
