"""Process-group arithmetic and the paths of scaling/parallel that two TP ranks alone never reach:
TP=2 inside a world of 4 (DP=2, then PP=2), where a collective on the wrong group sums the other
DP group's tensors; stacked column linears with K != B; the reduce-scatter fallback for backends
without reduce_scatter; init under torchrun's env:// with the --timeout; the heartbeat that names
a silent rank; the log lines that make an implicit world of size 1 visible."""

import datetime
import logging
import time

import pytest
import torch
import torch.nn.functional as F
from distributed import free_port, run_distributed

from rsscale.scaling.parallel import mappings as mp
from rsscale.scaling.parallel import state

B, N, D, K = 2, 4, 3, 3  # K stacked linears != batch B


def _tokens(seed):
    return torch.arange(B * N * D, dtype=torch.float64).reshape(B, N, D) * (seed + 1)


def _no_reduce_scatter(*args, **kwargs):
    raise NotImplementedError("this backend has no reduce_scatter")


def _world4_worker(rank, world):
    state.init_parallel(tp=2)
    out = {"ranks": (state.tp_rank(), state.tp_size(), state.dp_rank(), state.dp_size(), state.pp_rank(), state.pp_size())}
    tp, dp = state.tp_rank(), state.dp_rank()
    mine = slice(2 * tp, 2 * tp + 2)
    # reduce-scatter on the real collective and on the fallback: sums over my TP group only
    out["rs"] = mp.reduce_scatter_to_sequence_parallel_region(_tokens(rank)).numpy()
    chunk = torch.empty(2, 2)
    handle = mp.reduce_scatter_tensor(chunk, torch.full((4, 2), rank + 1.0), state.tp_group(), async_op=True)
    handle.wait()  # the real collective, asynchronous: a work handle, the sum once waited on
    out["async_real"] = chunk.numpy()
    real = mp._REDUCE_SCATTER
    mp._REDUCE_SCATTER = _no_reduce_scatter
    try:
        out["rs_fallback"] = mp.reduce_scatter_to_sequence_parallel_region(_tokens(rank)).numpy()
        chunk = torch.empty(2, 2)
        handle = mp.reduce_scatter_tensor(chunk, torch.full((4, 2), rank + 1.0), state.tp_group(), async_op=True)
        out["async"] = (handle.wait(), chunk.numpy())
    finally:
        mp._REDUCE_SCATTER = real
    # K=3 stacked column linears (3 real tokens of 4), inputs differ per DP group
    lins = [torch.nn.Linear(D, 4, dtype=torch.float64) for _ in range(K)]
    for k, lin in enumerate(lins):
        with torch.no_grad():
            lin.weight.copy_(torch.arange(4 * D, dtype=torch.float64).reshape(4, D) / (k + 1) + tp)
            lin.bias.copy_(torch.full((4,), k - tp, dtype=torch.float64))
    xs = torch.arange(K * B * N * D, dtype=torch.float64).reshape(K, B, N, D) / 7 + dp
    xs[:, :, 3] = 0
    chunk = xs[:, :, mine].clone().requires_grad_()
    y = mp.gather_column_linears(chunk, 3, lins)
    y.backward(torch.ones_like(y))
    out["col"], out["col_grad"], out["col_b"] = y.detach().numpy(), chunk.grad.numpy(), lins[2].bias.grad.numpy()
    # rebuilding the groups with other sizes: TP=2 x PP=2
    state.init_parallel(tp=2, pp=2)
    out["ranks_pp"] = (state.tp_rank(), state.tp_size(), state.dp_rank(), state.dp_size(), state.pp_rank(), state.pp_size())
    state.destroy_parallel()
    return out


def test_tp2_groups_inside_a_world_of_four():
    res = run_distributed(_world4_worker, 4)
    for r, o in enumerate(res):
        tp, dp = r % 2, r // 2  # megatron's order: TP ranks are neighbours, then DP, then PP
        assert o["ranks"] == (tp, 2, dp, 2, 0, 1), r
        assert o["ranks_pp"] == (tp, 2, 0, 1, dp, 2), r
        group = (2 * dp, 2 * dp + 1)
        want = (_tokens(group[0]) + _tokens(group[1]))[:, 2 * tp : 2 * tp + 2]
        torch.testing.assert_close(torch.from_numpy(o["rs"]), want)
        torch.testing.assert_close(torch.from_numpy(o["rs_fallback"]), want)
        done, chunk = o["async"]
        assert done is True
        for got in (chunk, o["async_real"]):
            torch.testing.assert_close(torch.from_numpy(got), torch.full((2, 2), float(group[0] + group[1] + 2)))
        # float64 reference on all tokens: each TP rank applies its own weights to the gathered tokens
        xs = torch.arange(K * B * N * D, dtype=torch.float64).reshape(K, B, N, D) / 7 + dp
        xr = xs[:, :, :3].clone().requires_grad_()
        grads = []
        for q in (0, 1):
            x = xr.detach().clone().requires_grad_()
            w = [torch.arange(4 * D, dtype=torch.float64).reshape(4, D) / (k + 1) + q for k in range(K)]
            ref = torch.stack([F.linear(x[k], w[k], torch.full((4,), k - q, dtype=torch.float64)) for k in range(K)])
            ref.backward(torch.ones_like(ref))
            grads.append(x.grad)
            if q == tp:
                torch.testing.assert_close(torch.from_numpy(o["col"]), ref.detach())
        dx = F.pad(grads[0] + grads[1], (0, 0, 0, 1))[:, :, 2 * tp : 2 * tp + 2]  # partial grads summed, my tokens
        torch.testing.assert_close(torch.from_numpy(o["col_grad"]), dx)
        torch.testing.assert_close(torch.from_numpy(o["col_b"]), torch.full((4,), float(B * 3), dtype=torch.float64))


def _heartbeat_worker(rank, world):
    state.init_parallel(tp=1)
    answered = state.unresponsive_ranks(10.0)
    if rank == 1:
        time.sleep(4.0)  # silent: never enters the second heartbeat
        return answered, None
    t0 = time.perf_counter()
    return answered, (state.unresponsive_ranks(1.0), time.perf_counter() - t0)


@pytest.mark.slow  # (the silent rank named end to end, through the trainer: test_faults.py's frozen-rank test)
def test_heartbeat_names_the_silent_rank():
    (all0, silent), (all1, _) = run_distributed(_heartbeat_worker, 2)
    assert all0 == all1 == "every rank answered a heartbeat afterwards (the stall was transient or inside one group)"
    message, seconds = silent
    assert message == "rank(s) 1 stopped responding (no heartbeat within 1 s)"
    assert seconds < 3.5  # the 1 s barrier timeout, not the 4 s until rank 1 wakes up


@pytest.fixture
def fresh_world():
    state.destroy_parallel()
    yield
    state.destroy_parallel()


def test_single_process_world_logs_its_layout(fresh_world, caplog):
    caplog.set_level(logging.INFO, logger=state.__name__)
    assert state.unresponsive_ranks(1.0) == "no peer to check"
    state.ensure_initialized()
    text = [r.getMessage() for r in caplog.records]
    assert text == ["parallel layout: world 1 = 1 node x 1 process; tp=1 pp=1 dp=1; rendezvous none (one process); backend gloo"]  # "init_parallel() was not called": DEBUG only
    assert state.unresponsive_ranks(1.0) == "no peer to check"  # a world of one has no heartbeat group
    with pytest.raises(ValueError, match="--timeout must be > 0 seconds, got 0"):
        state.init_parallel(timeout_s=0)


def test_implicit_world_is_announced_at_debug_once(fresh_world, caplog):
    caplog.set_level(logging.DEBUG, logger=state.__name__)
    state.ensure_initialized()
    state.ensure_initialized()  # already initialized: nothing to say
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert debug == ["init_parallel() was not called: starting a single-process world (tp=1, pp=1)"]


def test_keep_freed_host_memory_raises_glibc_thresholds(monkeypatch):
    """glibc's mallopt(M_MMAP_THRESHOLD=-3, 1 GiB), falling back to 32 MiB where glibc refuses
    (returns 0), then mallopt(M_TRIM_THRESHOLD=-1, 1 GiB); no glibc: a no-op."""
    import ctypes

    calls, accept, opened = [], [], []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return accept.pop(0)

    def cdll(name):
        opened.append(name)
        return Libc()

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    accept[:] = [1, 1]
    assert state.keep_freed_host_memory() is None
    assert (opened, calls) == (["libc.so.6"], [(-3, 1 << 30), (-1, 1 << 30)])
    calls.clear()
    accept[:] = [0, 1, 1]  # an older glibc caps M_MMAP_THRESHOLD
    state.keep_freed_host_memory()
    assert calls == [(-3, 1 << 30), (-3, 32 << 20), (-1, 1 << 30)]

    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_glibc)
    assert state.keep_freed_host_memory() is None


def test_torchrun_env_init_uses_the_timeout(fresh_world, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    state.init_parallel(timeout_s=7.5)
    backend = torch.distributed.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    assert backend.options._timeout == datetime.timedelta(seconds=7.5)
    assert (state.tp_size(), state.pp_size(), state.dp_size()) == (1, 1, 1)


def test_implicit_world_gets_the_ten_minute_default_timeout(fresh_world):
    state.ensure_initialized()  # no --timeout anywhere: init_parallel's default, 600 s
    backend = torch.distributed.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    assert backend.options._timeout == datetime.timedelta(seconds=600)


class _Stop(Exception):
    pass


def test_torchrun_on_cuda_binds_the_local_rank_gpu(fresh_world, monkeypatch):
    devices = []

    def set_device(device):
        devices.append(device)
        raise _Stop  # before nccl: this machine may have no GPU

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    with pytest.raises(_Stop):
        state.init_parallel()
    assert devices == [3]


def test_rendezvous_text_of_env_init(monkeypatch):
    from rsscale.scaling.runtime.launch import RENDEZVOUS

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv(RENDEZVOUS, raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert state._rendezvous_text() == "?:? (env://)"  # a harness that set neither: unknown, not invented
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert state._rendezvous_text() == "10.0.0.7:29500 (env://)"


def test_heartbeat_messages_without_processes(monkeypatch):
    """unresponsive_ranks on gloo's own monitored_barrier outcomes, faked in one process: every rank
    arrived; ranks 1 and 3 did not (the text of ProcessGroupGloo::monitoredBarrier with
    wait_all_ranks=True); a non-zero rank whose barrier with rank 0 broke."""
    calls, outcome = [], []

    def monitored_barrier(**kw):
        calls.append(kw)
        if outcome:
            raise RuntimeError(outcome[0])

    monkeypatch.setattr(state, "_HEARTBEAT", "heartbeat group")
    monkeypatch.setattr(state.dist, "monitored_barrier", monitored_barrier)
    assert state.unresponsive_ranks(2.0) == "every rank answered a heartbeat afterwards (the stall was transient or inside one group)"
    assert calls == [{"group": "heartbeat group", "timeout": datetime.timedelta(seconds=2), "wait_all_ranks": True}]
    outcome.append("[Rank 0]: Ranks 1, 3 failed to pass monitoredBarrier in 1500 ms")
    assert state.unresponsive_ranks(1.5) == "rank(s) 1, 3 stopped responding (no heartbeat within 1.5 s)"
    outcome[0] = "[Rank 0]: Rank 2 failed to pass monitoredBarrier in 1500 ms\n Original exception: \n[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"
    assert state.unresponsive_ranks(1.5) == "rank(s) 2 stopped responding (no heartbeat within 1.5 s)"
    outcome[0] = "[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242\nmore"
    assert state.unresponsive_ranks(1.5) == ("rank 0 did not confirm the heartbeat; see rank 0's message for the rank that stopped responding "
                                             "([../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242)")
