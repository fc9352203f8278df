"""--compile: torch.compile of each transformer block gives the gradients of the plain blocks.

CI compiles with the aot_eager backend (dynamo graph capture + AOT autograd, no code generation:
seconds); inductor (C++ code generation on CPU, minutes on a busy 2-core machine) and the 4-process
TP x SP x PP trainer run are marked slow."""


import pytest
import torch
from distributed import run_distributed

from rsscale.scaling.model.vit import ParallelBlock
from rsscale.scaling.spec.layout import Layout


def _block_grads(block, x):
    xi = x.clone().requires_grad_()
    block(xi).square().sum().backward()
    return [xi.grad] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("backend,recompute", [("aot_eager", "none"), ("aot_eager", "selective"),
                                               pytest.param("inductor", "none", marks=pytest.mark.slow)])
def test_compiled_block_same_gradients(backend, recompute):
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = ParallelBlock(32, 4, 64, branches=2, recompute=recompute)
    compiled = ParallelBlock(32, 4, 64, branches=2, recompute=recompute)
    compiled.load_state_dict(plain.state_dict())
    compiled.compile(backend=backend)
    x = torch.randn(2, 16, 32)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    want, got = _block_grads(plain, x), _block_grads(compiled, x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > before  # it was compiled
    names = ["input"] + [n for n, _ in plain.named_parameters()]
    for n, a, b in zip(names, want, got):
        scale = a.abs().max().item()
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * max(1.0, scale), msg=n)


def _train(rank, world, compile_, layout):
    """Two optimizer steps of the trainer; (losses, full weights of this rank's stage, graphs compiled)."""
    import torch._dynamo

    from rsscale.scaling.spec.run import Checkpointing, Compute, OptimConfig, Recording
    from rsscale.scaling.train.pretrain import TrainConfig, Trainer

    cfg = TrainConfig(model="tiny", parallel=Layout(**layout), optim=OptimConfig(lr=2e-3, warmup=1, eps=1e-6), steps=5, data="random",
                      checkpointing=Checkpointing(out="unused"), recording=Recording(record=False), compute=Compute(compile=compile_, compile_backend="aot_eager"))
    trainer = Trainer.build(cfg)
    losses = [trainer.train_step()["loss"] for _ in range(2)]
    return losses, {k: v.numpy() for k, v in trainer.full_state_dict().items()}, torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_compiled_trainer_tp2_sp_pp2_matches_plain():
    """4 processes, TP=2 + SP x PP=2 with --compile (aot_eager): losses and weights after two
    steps equal the uncompiled run's to 1e-5 (about 3 minutes on 2 cores)."""
    layout = dict(tp=2, pp=2, sp=True, micro_batch=2, global_batch=8)
    ref = run_distributed(_train, 4, False, layout, timeout=600)
    got = run_distributed(_train, 4, True, layout, timeout=600)
    assert all(r[2] > 0 for r in got)
    assert got[0][0] == pytest.approx(ref[0][0], abs=1e-5)
    want, have = {}, {}
    for r, g in zip(ref, got):
        want.update(r[1])
        have.update(g[1])
    assert set(have) == set(want)
    assert max(abs(have[k] - want[k]).max() for k in want) < 1e-5


def test_compile_without_a_cxx_compiler_is_refused(monkeypatch):
    from rsscale.scaling.spec.run import Compute, Recording
    from rsscale.scaling.train.pretrain import TrainConfig, Trainer

    monkeypatch.setenv("CXX", "no-such-compiler-rsscale")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--compile with inductor on CPU needs a C\\+\\+ compiler"):
        Trainer.build(TrainConfig(model="tiny", data="random", recording=Recording(record=False), compute=Compute(compile=True)))
