"""Non-interleaved 1F1B pipeline schedule over micro-batches, on torch.distributed p2p.

Why not megatron-core's `get_forward_backward_func`: its p2p layer allocates the shape
handshake and receive buffers with `device=torch.cuda.current_device()`
(megatron/core/pipeline_parallel/p2p_communication.py) and the schedule counts tokens in a
`device="cuda"` tensor (schedules.py), so it cannot run on CPU/gloo. This is the same schedule
(PipeDream-flush / Megatron's non-interleaved 1F1B) in ~100 lines:

    stage s of P, M micro-batches: warmup = min(P - s - 1, M) forwards,
    then M - warmup steady rounds of (forward i, backward i - warmup), then `warmup` backwards.

At most P - s micro-batches' activations are alive on stage s (GPipe keeps all M). Every
exchange posts its sends and receives as one grouped `dist.batch_isend_irecv` (as megatron's
combined send_forward_recv_backward does): on NCCL, separate isend-then-irecv on both neighbours
can deadlock for large messages; grouped operations cannot, and they run on gloo too.
Activations cross stages in float32 with a known shape (see `MaskedAutoencoder.hidden_shape`:
[mb, 1+V, D], or this TP rank's token chunk under sequence parallelism, each TP rank talking to
the same TP rank of the next stage).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import torch
import torch.distributed as dist


class StageLinks:
    """Global ranks of the previous and next pipeline stage of this rank (None at the ends)."""

    def __init__(self, pp_ranks: list[int], rank: int):
        i = pp_ranks.index(rank)
        self.stage, self.num_stages = i, len(pp_ranks)
        self.prev = pp_ranks[i - 1] if i > 0 else None
        self.next = pp_ranks[i + 1] if i + 1 < len(pp_ranks) else None

    @property
    def is_first(self) -> bool:
        return self.prev is None

    @property
    def is_last(self) -> bool:
        return self.next is None


def _exchange(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
    """Post all sends and receives as one group (`dist.batch_isend_irecv`), then wait for them all."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
    if ops:
        for w in dist.batch_isend_irecv(ops):
            w.wait()


def forward_backward_1f1b(
    forward_step: Callable[[int, torch.Tensor | None], torch.Tensor],
    num_micro: int,
    links: StageLinks,
    hidden_shape: tuple[int, ...],
    device: torch.device | str = "cpu",
    loss_scale: float = 1.0,
) -> list[torch.Tensor]:
    """Run forward and backward of `num_micro` micro-batches through this pipeline stage.

    `forward_step(i, x)` runs micro-batch i on this stage: x is the received activation (None on
    the first stage); it returns the activation to send on, or on the last stage the micro-batch
    loss, already divided by `num_micro` (the backward starts from loss * loss_scale).
    Returns the last stage's (detached) micro-batch losses; an empty list on other stages.
    """
    warmup = min(links.num_stages - links.stage - 1, num_micro)
    pending: deque = deque()  # (input activation, output) per micro-batch awaiting its backward
    losses = []

    def recv_forward():
        if links.is_first:
            return None
        x = torch.empty(hidden_shape, dtype=torch.float32, device=device)
        _exchange([], [(x, links.prev)])
        return x.requires_grad_()

    def run_forward(i, x):
        y = forward_step(i, x)
        if links.is_last:
            losses.append(y.detach())
        pending.append((x, y))
        return y

    def run_backward(grad_out):
        x, y = pending.popleft()
        if links.is_last:
            torch.autograd.backward(y * loss_scale)
        else:
            torch.autograd.backward(y, grad_out.to(y.dtype))
        return None if x is None else x.grad

    def send_forward_recv_backward(y):
        if links.is_last:
            return None
        g = torch.empty(hidden_shape, dtype=torch.float32, device=device)
        _exchange([(y.detach().float(), links.next)], [(g, links.next)])
        return g

    def send_backward_recv_forward(gx, want_next: bool):
        if links.is_first:
            return None
        x = torch.empty(hidden_shape, dtype=torch.float32, device=device) if want_next else None
        _exchange([(gx, links.prev)], [(x, links.prev)] if want_next else [])
        return None if x is None else x.requires_grad_()

    for i in range(warmup):
        y = run_forward(i, recv_forward())
        if not links.is_last:
            _exchange([(y.detach().float(), links.next)], [])
    x = recv_forward() if num_micro > warmup else None
    steady = num_micro - warmup
    for j in range(steady):
        y = run_forward(warmup + j, x)
        gx = run_backward(send_forward_recv_backward(y))
        x = send_backward_recv_forward(gx, want_next=j + 1 < steady)
    for _ in range(warmup):
        g = None
        if not links.is_last:
            g = torch.empty(hidden_shape, dtype=torch.float32, device=device)
            _exchange([], [(g, links.next)])
        gx = run_backward(g)
        if not links.is_first:
            _exchange([(gx, links.prev)], [])
    return losses
