"""Per-rank memory of a fine-tuning run counted on fake tensors (benchmarks/prediction/count.py
`count_finetune`) against what a real CPU fine-tuning rank (finetune/train.py `Finetuner`)
allocates after one optimizer step: one process, and TP rank 0 of a 2-process TP=2 run."""

import contextlib

import pytest
import torch
from distributed import run_distributed

from rsscale.benchmarks.prediction import analytic as A
from rsscale.benchmarks.prediction.count import count_finetune
from rsscale.scaling.spec.config import get_preset
from rsscale.scaling.spec.layout import Layout

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


def _real_rank_bytes(rank, world, task, layout, precision, zero):
    """One rank of a real fine-tuning run: the bytes its model, gradients, optimizer and masks
    hold after a step, and what autograd saves in one micro-batch's forward (+ loss for seg)."""
    from rsscale.finetune import train as T
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

        real = _real_rank_bytes(0, 1, task, layout, precision, zero)
        assert not state.is_initialized()
    else:
        real = run_distributed(_real_rank_bytes, tp * dp, task, layout, precision, zero)[0]
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
