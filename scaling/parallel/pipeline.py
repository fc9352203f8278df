"""1F1B pipeline schedules over micro-batches, plain and interleaved, on torch.distributed p2p.

Why not megatron-core's `get_forward_backward_func`: its p2p layer allocates the shape
handshake and receive buffers with `device=torch.cuda.current_device()`
(megatron/core/pipeline_parallel/p2p_communication.py) and the schedule counts tokens in a
`device="cuda"` tensor (schedules.py), so it cannot run on CPU/gloo. Why not
torch.distributed.pipelining: see docs/PIPELINE.md. This is the same schedule in three steps:

1. `compute_order(P, V, M, rank)`: the rank's forwards and backwards in Megatron's order. Rank r
   holds V chunks (virtual stages r, r+P, ..., chunk j = virtual stage j*P + r). Forwards go in
   groups of P micro-batches per chunk (chunk 0 for micro-batches 0..P-1, chunk 1 for the same,
   ..., then chunk 0 for P..2P-1), backwards likewise from the last chunk down. warmup forwards
   (V=1: P-r-1, the non-interleaved 1F1B = PipeDream-flush; V>1: 2(P-r-1) + (V-1)P, Megatron's
   interleaved 1F1B; both at most V*M), then one forward + one backward, then the backwards left.
2. `timetable(P, V, M)`: every rank's order laid out on a common clock (a forward takes one
   tick, a backward two) by running each action as soon as its input has arrived. An action's
   output is sent at the tick it ends and can be used from the next tick on.
3. `run_schedule`: each rank walks the timetable; at every tick where it or a neighbour has
   something to send, it posts its sends and receives as one grouped `dist.batch_isend_irecv`
   (as megatron's combined send_forward_recv_backward does: on NCCL, separate isend-then-irecv
   on both neighbours can deadlock for large messages; grouped operations cannot, and they run
   on gloo too). Every rank knows every rank's timetable, so each receive is posted at the
   tick its matching send is, and at most one message goes each way between two ranks per tick:
   no tags, nothing to mismatch on NCCL (which matches by order per pair). A rank waits on a
   receive only when an action needs it, and on its sends at the end: no deadlock (a rank
   blocked at tick t waits on a send of a tick < t, which its producer, never blocked on
   anything later, reaches), and no waiting for a neighbour's compute that the timetable runs
   beside its own.

Rank r keeps at most P - r micro-batches' activations (V=1) or 2(P-r-1) + (V-1)P + 1 chunk
activations (V>1; `in_flight_chunks`) alive; GPipe keeps all M. The interleaved bubble is
(P-1)/(V*M) of the compute time instead of (P-1)/M, for V times the p2p messages.
Activations cross stages in float32 with a known shape (see `MaskedAutoencoder.hidden_shape`:
[mb, 1+V, D], or this TP rank's token chunk under sequence parallelism, each TP rank talking to
the same TP rank of the next stage). The ring wraps: the last rank's chunk j feeds the first
rank's chunk j+1.
"""

from __future__ import annotations

import functools
import itertools
import time
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

FORWARD_TICKS, BACKWARD_TICKS = 1, 2  # the clock of the timetable: a backward costs two forwards


class Action(NamedTuple):
    kind: str  # "F" or "B"
    chunk: int  # this rank's chunk (virtual stage chunk * P + rank)
    micro: int  # micro-batch


class StageLinks:
    """The pipeline ranks around this one: previous and next stage (None at the ends), and the
    ring's neighbours (interleaved chunks wrap from the last rank to the first)."""

    def __init__(self, pp_ranks: list[int], rank: int):
        i = pp_ranks.index(rank)
        self.stage, self.num_stages = i, len(pp_ranks)
        self.prev = pp_ranks[i - 1] if i > 0 else None
        self.next = pp_ranks[i + 1] if i + 1 < len(pp_ranks) else None
        self.ring_prev, self.ring_next = pp_ranks[i - 1], pp_ranks[(i + 1) % len(pp_ranks)]

    @property
    def is_first(self) -> bool:
        return self.prev is None

    @property
    def is_last(self) -> bool:
        return self.next is None


def check_schedule(P: int, V: int, M: int) -> None:
    """Raise ValueError unless the schedule can take P ranks, V chunks each and M micro-batches."""
    if min(P, V, M) < 1:
        raise ValueError(f"pipeline size, --vpp and the micro-batch count must be >= 1, got {P}, {V}, {M}")
    if V > 1 and (P < 2 or M % P):
        raise ValueError(f"--vpp {V} (interleaved 1F1B) needs --pp >= 2 and micro-batches per step a multiple of --pp; got pp {P}, {M} micro-batches")


def compute_order(P: int, V: int, M: int, rank: int) -> list[Action]:
    """This rank's forwards and backwards in Megatron's order (module doc, step 1)."""
    return list(_order(P, V, M, rank))


def _warmup(P: int, V: int, M: int, rank: int) -> int:
    """Forwards a rank runs before its first backward."""
    return min(P - rank - 1 if V == 1 else 2 * (P - rank - 1) + (V - 1) * P, V * M)


def _order(P: int, V: int, M: int, rank: int):
    """`compute_order` as a generator (a prefix of it costs only that prefix)."""
    check_schedule(P, V, M)
    total, warmup = V * M, _warmup(P, V, M, rank)

    def unit(k: int, kind: str) -> Action:
        group, i = divmod(k, P * V)
        chunk = i // P
        return Action(kind, chunk if kind == "F" else V - 1 - chunk, group * P + i % P)

    for k in range(warmup):
        yield unit(k, "F")
    for k in range(total - warmup):
        yield unit(warmup + k, "F")
        yield unit(k, "B")
    for k in range(total - warmup, total):
        yield unit(k, "B")


@functools.lru_cache(maxsize=64)
def timetable(P: int, V: int, M: int) -> tuple[dict[int, tuple[int, Action]], ...]:
    """Per rank: {tick an action ends: (tick it starts, action)} (module doc, step 2)."""
    orders = [compute_order(P, V, M, r) for r in range(P)]
    ready: dict[tuple[str, int, int], int] = {}  # (kind, virtual stage, micro) -> first tick its output can be used
    pos, free = [0] * P, [0] * P  # next action per rank, first tick the rank is free
    table: list[dict[int, tuple[int, Action]]] = [{} for _ in range(P)]
    last = P * V - 1
    while any(pos[r] < len(orders[r]) for r in range(P)):
        progressed = False
        for r in range(P):
            if pos[r] == len(orders[r]):
                continue
            a = orders[r][pos[r]]
            v = a.chunk * P + r
            need = [("F", v - 1, a.micro)] if a.kind == "F" and v > 0 else []
            need += [("B", v + 1, a.micro)] if a.kind == "B" and v < last else []
            need += [("F", v, a.micro)] if a.kind == "B" else []
            if any(n not in ready for n in need):
                continue
            start = max([free[r]] + [ready[n] for n in need])
            end = start + (FORWARD_TICKS if a.kind == "F" else BACKWARD_TICKS) - 1
            table[r][end] = (start, a)
            ready[(a.kind, v, a.micro)], free[r], pos[r] = end + 1, end + 1, pos[r] + 1
            progressed = True
        if not progressed:  # cannot happen for Megatron's orders; a guard against a bad order
            raise RuntimeError(f"pipeline order deadlocks (P={P}, V={V}, M={M}) at {[orders[r][pos[r]] for r in range(P) if pos[r] < len(orders[r])]}")
    return tuple(table)


def in_flight_chunks(P: int, V: int, M: int, rank: int, weight: Callable[[int], float] = lambda chunk: 1.0) -> list[int]:
    """The chunks (one entry per micro-batch) whose activations this rank holds at once at the
    heaviest point of its order, by `weight(chunk)` (e.g. the bytes one micro-batch saves there)."""
    return list(_in_flight(P, V, M, rank, tuple(weight(c) for c in range(V))))


@functools.lru_cache(maxsize=4096)
def _in_flight(P: int, V: int, M: int, rank: int, weights: tuple[float, ...]) -> tuple[int, ...]:
    """in_flight_chunks with the weights as a tuple: cached, since the profiler asks for the same
    schedule under thousands of layouts (one walk of the order, a running sum)."""
    if V == 1:  # 1F1B: P - rank - 1 warm-up forwards, then one more before the first backward
        check_schedule(P, V, M)
        return (0,) * min(P - rank, M) if weights[0] > 0 else ()
    # Only the warm-up and one period of the steady state are walked: in the steady state each
    # forward is followed by a backward, and after P*V of them every chunk has gained and lost P
    # micro-batches, so what is held repeats; the drain at the end only releases.
    alive: list[int] = []
    best: tuple[int, ...] = ()
    held = best_sum = 0.0
    for a in itertools.islice(_order(P, V, M, rank), _warmup(P, V, M, rank) + 2 * (P * V + 1)):
        if a.kind == "F":
            alive.append(a.chunk)
            held += weights[a.chunk]
            if held > best_sum:
                best, best_sum = tuple(sorted(alive)), held
        else:
            alive.remove(a.chunk)
            held -= weights[a.chunk]
    return best


def bubble_fraction(P: int, V: int, M: int) -> float:
    """Theoretical bubble of (interleaved) 1F1B over the ideal compute time: (P-1) / (V*M)."""
    return (P - 1) / (V * M)


def _post(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> tuple[list, list[list]]:
    """Post all sends and receives as one group (`dist.batch_isend_irecv`); returns the works to
    wait on for the sends, and for each receive the works to wait on before using it. gloo gives
    one work per operation, each to be waited on exactly once (a second wait on a receive blocks
    until the process group times out: with 3+ stages two receives can share a tick); NCCL one
    work for the whole group, which may be waited on repeatedly."""
    ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
    works = dist.batch_isend_irecv(ops) if ops else []
    if len(works) == len(ops):
        return works[: len(sends)], [[w] for w in works[len(sends):]]
    return works, [works] * len(recvs)


def _wait(works: list) -> None:
    for w in works:
        w.wait()


def run_schedule(
    forward_step: Callable[[int, int, torch.Tensor | None], torch.Tensor],
    num_micro: int,
    links: StageLinks,
    hidden_shape: tuple[int, ...],
    device: torch.device | str = "cpu",
    loss_scale: float = 1.0,
    chunks: int = 1,
    clock: Callable[[], float] | None = None,
    before_backward: Callable[[int, int], None] | None = None,
) -> tuple[list[torch.Tensor], float]:
    """Run forward and backward of `num_micro` micro-batches through this rank's `chunks` chunks.

    `forward_step(chunk, i, x)` runs micro-batch i on this rank's chunk: x is the received
    activation (None on the first virtual stage); it returns the activation to send on, or on the
    last virtual stage the micro-batch loss, already divided by `num_micro` (the backward starts
    from loss * loss_scale). `clock()` (e.g. synchronize, then perf_counter) times the compute;
    `before_backward(chunk, i)` runs before each backward (the optimizer's: FSDP's deferred sync).
    Returns the last virtual stage's (detached) micro-batch losses, in micro-batch order (an
    empty list on other ranks), and the seconds spent computing (0.0 without `clock`).

    Each tick's group is posted when this rank reaches that tick and waited on only when an action
    needs what it receives (sends: at the end), so a rank never waits for a neighbour's compute
    that the timetable runs in parallel with its own.
    """
    P, r = links.num_stages, links.stage
    last = P * chunks - 1
    table = timetable(P, chunks, num_micro)
    arriving: dict[tuple[str, int, int], tuple[torch.Tensor, list]] = {}  # (kind, chunk, micro) -> (buffer, works)
    saved: dict[tuple[int, int], tuple] = {}  # (chunk, micro) -> (input, output) awaiting backward
    sending: list[tuple[torch.Tensor, list]] = []  # sent tensors and their works, alive until done
    losses: dict[int, torch.Tensor] = {}
    busy = 0.0

    def received(a: Action) -> torch.Tensor | None:
        """What `a` needs from a neighbour (activation or output gradient), once it has arrived."""
        v = a.chunk * P + r
        if (a.kind == "F" and v == 0) or (a.kind == "B" and v == last):
            return None
        t, works = arriving.pop((a.kind, a.chunk, a.micro))
        _wait(works)
        return t

    def run(a: Action, data: torch.Tensor | None) -> torch.Tensor | None:
        """Compute one action on its received data; returns what it sends (None on the ends)."""
        v, key = a.chunk * P + r, (a.chunk, a.micro)
        if a.kind == "F":
            x = None if data is None else data.requires_grad_()
            y = forward_step(a.chunk, a.micro, x)
            saved[key] = (x, y)
            if v == last:
                losses[a.micro] = y.detach()
                return None
            return y.detach().float().contiguous()
        x, y = saved.pop(key)
        if before_backward:
            before_backward(a.chunk, a.micro)
        if v == last:
            torch.autograd.backward(y * loss_scale)
        else:
            torch.autograd.backward(y, data.to(y.dtype))
        return None if x is None else x.grad.contiguous()

    def incoming(peer_stage: int, tick: int, kind: str):
        """(kind, chunk, micro) on this rank that a neighbour's action ending at `tick` feeds, if any."""
        entry = table[peer_stage].get(tick)
        if entry is None or entry[1].kind != kind:
            return None
        a = entry[1]
        v = a.chunk * P + peer_stage + (1 if kind == "F" else -1)
        if not 0 <= v <= last or v % P != r:
            return None
        return kind, v // P, a.micro

    starts = {start: (end, a) for end, (start, a) in table[r].items()}
    outgoing: dict[int, tuple[torch.Tensor, int]] = {}  # tick -> (tensor, peer) sent at that tick
    for tick in range(1 + max((end for t in table for end in t), default=-1)):
        if tick in starts:  # compute now; what it sends goes out at the tick it ends
            end, a = starts[tick]
            data = received(a)  # waits (not counted as compute) until the input is here
            t0 = clock() if clock else 0.0
            out = run(a, data)
            busy += clock() - t0 if clock else 0.0
            if out is not None:
                outgoing[end] = (out, links.ring_next if a.kind == "F" else links.ring_prev)
        sends = [outgoing.pop(tick)] if tick in outgoing else []
        recvs, keys = [], []
        for key, peer in ((incoming((r - 1) % P, tick, "F"), links.ring_prev), (incoming((r + 1) % P, tick, "B"), links.ring_next)):
            if P > 1 and key is not None:
                recvs.append((torch.empty(hidden_shape, dtype=torch.float32, device=device), peer))
                keys.append(key)
        send_works, recv_works = _post(sends, recvs)
        for key, (buffer, _), works in zip(keys, recvs, recv_works):
            arriving[key] = buffer, works
        if sends:
            sending.append((sends[0][0], send_works))
        while sending and all(w.is_completed() for w in sending[0][1]):
            sending.pop(0)  # free sent activations as their sends complete (where the backend says so)
    for _, works in sending:
        _wait(works)
    return [losses[i] for i in sorted(losses)], busy


def forward_backward_1f1b(
    forward_step: Callable[[int, torch.Tensor | None], torch.Tensor],
    num_micro: int,
    links: StageLinks,
    hidden_shape: tuple[int, ...],
    device: torch.device | str = "cpu",
    loss_scale: float = 1.0,
) -> list[torch.Tensor]:
    """Non-interleaved 1F1B: `run_schedule` with one chunk per rank and `forward_step(i, x)`."""
    losses, _ = run_schedule(lambda chunk, i, x: forward_step(i, x), num_micro, links, hidden_shape, device, loss_scale)
    return losses


def perf_clock(sync: Callable[[], None] = lambda: None) -> Callable[[], float]:
    """A `clock` for `run_schedule`: `sync()` (e.g. torch.cuda.synchronize), then perf_counter."""

    def clock() -> float:
        sync()
        return time.perf_counter()

    return clock
