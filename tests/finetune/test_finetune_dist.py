"""Distributed fine-tuning (CPU, gloo, float32) against one process on the same global batch:
one optimizer step of segmentation and of detection under DP=2 (ZeRO-1) and TP=2 (and TP=2 with
sequence parallelism) gives the loss, the global gradient norm, every gradient and every updated
weight of a plain one-process reference (model.loss on the whole batch, torch AdamW with the
same layer-wise lr decay); distributed evaluation gives the one-process mIoU / mAP."""

import math

import pytest
import torch
from distributed import run_distributed

TOL = dict(rtol=1e-5, atol=1e-5)


def _argv(task, data, *extra):
    return ["--task", task, "--dataset", "synthetic", "--data", str(data), "--model", "tiny", "--crop", "32",
            "--window", "2", "--channels", "16", "--drop-path", "0", "--global-batch", "4", "--lr", "1e-3",
            "--warmup", "1", "--steps", "1", "--clip-grad", "0", "--score-thr", "0.05", "--detector", "fcos", *extra]


def _options(argv, world=1):
    """The options `rsscale finetune ARGV` resolves to on `world` processes."""
    import argparse

    from rsscale.finetune.finetune import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv), world)


def _prepare(model, task):
    """Detection: raise the class prior to 0.2 so the untrained model's boxes pass the 0.05 threshold."""
    if task == "det":
        with torch.no_grad():
            model.head.cls.bias.fill_(-math.log(4.0))


def _eval_value(task, r):
    return r["metric"].compute()["mIoU"] if task == "seg" else r["ap"]["mAP"]


def _run_rank(rank, world, layout_argv, data):
    """One rank: for seg and det, distributed evaluation, then one optimizer step -> its results."""
    from rsscale.finetune import finetune as T
    from rsscale.scaling.parallel import state

    out = {}
    for task in ("seg", "det"):
        options = _options(_argv(task, data, *layout_argv), world)
        layout = options.parallel
        state.init_parallel(layout.tp, 1, layout.dp, seed=0)
        train_set, val_set, classes = T.build_datasets(task, "synthetic", str(data))
        model, _, _ = T.build_model(task, options, len(classes), sequence_parallel=layout.sp)
        _prepare(model, task)
        tuner = T.Finetuner(options, model, train_set, torch.device("cpu"), steps=1)  # (warmup: a fifth of the run, 1)
        evaluated = _eval_value(task, tuner.evaluate(val_set, classes))
        r = tuner.train_step()
        opt = tuner.optimizer
        own = torch.zeros(opt.grad.numel(), dtype=torch.bool)
        for b in opt.buckets:
            own[b.own_lo:b.own_hi] = True
        reduced = torch.where(own, opt.grad, torch.nan)  # ZeRO-1: a rank holds the reduced gradient of its own chunks only
        grads = {n: reduced[o:o + k].view_as(p).numpy().copy() for (n, p), (o, k) in zip(opt.named, opt.offsets.values())}
        params = {n: p.detach().numpy().copy() for n, p in opt.named}
        layout_of = {n: (p.partition_dim, p.partition_stride) if state.is_tp_sharded(p) else None for n, p in opt.named}
        out[task] = dict(loss=r["loss"], grad_norm=r["grad_norm"], lr=r["lr"], grads=grads, params=params,
                         layout=layout_of, eval=evaluated)
    return out


def _reference(task, data):
    """One process, no Finetuner: model.loss on the whole global batch, torch AdamW."""
    from rsscale.finetune import finetune as T
    from rsscale.finetune.model.vitdet import param_groups_lrd
    from rsscale.scaling.parallel import state
    from rsscale.scaling.train.optim import lr_at

    state.init_parallel(1, 1)
    options = _options(_argv(task, data))
    train_set, val_set, classes = T.build_datasets(task, "synthetic", str(data))
    model, cfg, _ = T.build_model(task, options, len(classes))
    _prepare(model, task)
    evaluated = _eval_value(task, T.Finetuner(options, model, train_set, torch.device("cpu")).evaluate(val_set, classes))
    model, cfg, _ = T.build_model(task, options, len(classes))  # fresh weights (the Finetuner re-packed the old ones)
    _prepare(model, task)
    norm = T.Normalize(cfg.in_chans)
    imgs, targets = zip(*(T.draw_sample(task, train_set, options.crop, norm, options.seed, 0, g) for g in range(4)))
    imgs = torch.stack(imgs)
    model.train()
    loss = model.loss(model(imgs), torch.stack(targets)) if task == "seg" else model.loss(model(imgs), list(targets))["total"]
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    grad_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))
    groups = param_groups_lrd(model, cfg.depth, options.optim.weight_decay, options.layer_decay)
    lr = lr_at(0, options.optim.lr, 1, 1)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), weight_decay=options.optim.weight_decay)
    opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return dict(loss=float(loss.detach()), grad_norm=grad_norm, grads=grads, params=params, eval=evaluated)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from rsscale.scaling.data.data import ensure_dataset

    root = tmp_path_factory.mktemp("ftdist") / "data"
    ensure_dataset(root, num_pretrain=0, num_seg=8, num_det=8, size=64)
    return root


@pytest.fixture(scope="module")
def reference(data):
    return {task: _reference(task, data) for task in ("seg", "det")}


def _dp_merged(results):
    """DP ranks' results as one: each rank's reduced gradient pieces (NaN elsewhere) filled in."""
    grads = {}
    for name, g in results[0]["grads"].items():
        g = torch.from_numpy(g)
        for r in results[1:]:
            g = torch.where(g.isnan(), torch.from_numpy(r["grads"][name]), g)
        grads[name] = g.numpy()
    return dict(results[0], grads=grads)


def _full(results, name, kind):
    """A parameter's full tensor from the ranks of one replica (TP shards glued back)."""
    from rsscale.scaling.parallel.state import unshard_tensors

    lay = results[0]["layout"][name]
    if lay is None:
        return torch.from_numpy(results[0][kind][name])
    return unshard_tensors([torch.from_numpy(r[kind][name]) for r in results], *lay)


@pytest.mark.parametrize("layout", [["--dp", "2", "--distributed-optimizer"], ["--tp", "2"],
                                    pytest.param(["--tp", "2", "--sp"], marks=pytest.mark.slow)],
                         ids=["dp2-zero1", "tp2", "tp2-sp"])
def test_one_step_and_evaluation_equal_one_process(layout, data, reference):
    ranks = run_distributed(_run_rank, 2, layout, data, timeout=600)
    tp = 2 if "--tp" in layout else 1
    for task in ("seg", "det"):
        ref, results = reference[task], [r[task] for r in ranks]
        for r in results:
            assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6), task
            assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), task
            assert r["eval"] == pytest.approx(ref["eval"], abs=1e-9), task
        replicas = [results[:tp]] if tp > 1 else [[_dp_merged(results)]]  # DP: every rank's pieces of the one mean gradient
        if tp == 1:  # ZeRO-1's all-gather leaves the same weights on every DP rank
            assert all((r["params"][n] == results[0]["params"][n]).all() for r in results for n in ref["params"])
        for replica in replicas:
            assert set(replica[0]["grads"]) == set(ref["grads"])
            for name in ref["grads"]:
                torch.testing.assert_close(_full(replica, name, "grads"), ref["grads"][name], **TOL, msg=f"{task} grad {name}")
                # Adam's first step moves a weight by about lr * sign(g): ill-conditioned where the exact
                # gradient is 0 (e.g. key biases) and rounding decides; compare where |g| > 1e-6.
                well = ref["grads"][name].abs() > 1e-6
                torch.testing.assert_close(_full(replica, name, "params")[well], ref["params"][name][well], **TOL,
                                           msg=f"{task} weight {name}")
    assert 0.0 < reference["seg"]["eval"] <= 1.0 and reference["det"]["eval"] >= 0.0


def test_pipeline_flags_are_refused_not_ignored():
    """Fine-tuning has no pipeline: --pp and --vpp other than 1 are an error, never dropped silently."""
    for flags in (["--pp", "2"], ["--vpp", "2"]):
        with pytest.raises(ValueError, match="tensor and data parallel only") as e:
            _options(["--task", "seg", "--dataset", "synthetic", *flags], 2)
        assert "\n" not in str(e.value)
