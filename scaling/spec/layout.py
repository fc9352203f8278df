"""Parallel layouts: how T*P*D processes split a model and a global batch, checked up front.

    layout = Layout(tp=2, pp=2, dp=1, sp=True, micro_batch=8, global_batch=32)
    problems = validate_layout(layout, cfg, world_size)   # [] when the layout can run
    return relaunch_checked("bench", args, layout_for)    # --nproc N: checked here, then torchrun

Every problem is one sentence. The trainer calls `validate_layout` before any process group is
created, so a bad layout fails at once on every rank instead of hanging in a collective.

Pipeline split rule (`stage_layer_range`): the `depth` encoder blocks are cut into P contiguous
ranges as evenly as possible, the earlier stages taking the extra block when P does not divide
the depth (depth 12 on P=5: 3,3,2,2,2). The first stage also holds patch embed, positions,
masking and cls token; the last stage also holds the encoder norm, the whole decoder and the
loss (see scaling/model/mae.py). Every stage must get at least one block, so P <= depth.

Interleaved 1F1B (`vpp` = V > 1, Megatron's virtual pipeline): the blocks are cut into P*V equal
chunks and rank r holds chunks r, r+P, r+2P, ... (`stage_chunk_ranges`); the first chunk keeps
the pre-process parts, the last the post-process ones. Megatron's rules apply: P >= 2, P*V
divides the depth, and the micro-batches per step are a multiple of P (scaling/parallel/pipeline.py).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from rsscale.scaling.runtime import launch
from rsscale.scaling.runtime.options import leaves, option
from rsscale.scaling.spec.config import ViTConfig


@dataclass(frozen=True)
class Layout:
    tp: int = option(1, "tensor-parallel size: heads / MLP columns split over T ranks", ge=1)
    pp: int = option(1, "pipeline-parallel size: encoder blocks split over P stages", ge=1)
    dp: int = option(1, "data-parallel size (default: world size / (tp*pp))", ge=1)
    sp: bool = option(False, "sequence parallelism inside the TP group (needs --tp >= 2)")
    micro_batch: int = option(8, "images per micro-batch per rank", ge=1)
    global_batch: int = option(8, "images per optimizer step (all ranks)", ge=1)
    vpp: int = option(1, "virtual pipeline stages per rank (interleaved 1F1B; needs --pp >= 2)", ge=1)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def num_micro(self) -> int:
        """Micro-batches per optimizer step on one DP rank (pipelined when pp > 1)."""
        return self.global_batch // (self.micro_batch * self.dp)

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        sp = "+SP" if self.sp else ""
        vpp = f"x{self.vpp}" if self.vpp > 1 else ""
        return f"TP{self.tp}{sp} PP{self.pp}{vpp} DP{self.dp} mb{self.micro_batch} gb{self.global_batch}"


LAYOUT_FLAGS = tuple(leaf.flag for leaf in leaves(Layout))  # --tp --pp --dp --sp --micro-batch --global-batch --vpp


def derive_dp(tp: int, pp: int, dp: int | None, world_size: int) -> int:
    """--dp when given, else the world size / (tp*pp) (at least 1; validation reports a mismatch)."""
    return dp if dp is not None else max(1, world_size // (tp * pp))


def fill_dp(tree: dict, given: set[str], world: int | None = None) -> None:
    """A config tree's `parallel.dp` where neither the file nor a flag gave it: world / (tp*pp)
    (`world`: the size about to be launched, else $WORLD_SIZE under torchrun, else 1)."""
    if "parallel.dp" not in given:
        p = tree["parallel"]
        p["dp"] = derive_dp(p["tp"], p["pp"], None, world or int(os.environ.get("WORLD_SIZE", 1)))


def stage_layer_range(depth: int, pp: int, stage: int) -> tuple[int, int]:
    """Encoder blocks [start, end) of pipeline stage `stage` (earlier stages take the remainder)."""
    base, extra = divmod(depth, pp)
    start = stage * base + min(stage, extra)
    return start, start + base + (1 if stage < extra else 0)


def stage_chunk_ranges(depth: int, pp: int, vpp: int, stage: int) -> list[tuple[int, int]]:
    """Encoder blocks [start, end) of each of the `vpp` chunks pipeline rank `stage` holds, in
    order: chunk j is virtual stage j*pp + stage of pp*vpp (one range, `stage_layer_range`, when vpp=1)."""
    return [stage_layer_range(depth, pp * vpp, j * pp + stage) for j in range(vpp)]


def validate_layout(layout: Layout, cfg: ViTConfig, world_size: int) -> list[str]:
    """All reasons `layout` cannot train `cfg` on `world_size` processes (empty list: it can)."""
    t, p, d, v = layout.tp, layout.pp, layout.dp, layout.vpp
    if min(t, p, d, v, layout.micro_batch, layout.global_batch) < 1:
        return [f"tp, pp, dp, vpp, micro_batch and global_batch must all be >= 1, got {layout}"]
    problems = []
    if t * p * d != world_size:
        problems.append(f"the world size {world_size} must equal tp*pp*dp = {t}*{p}*{d} = {t * p * d} (launch {t * p * d} processes: --nproc {t * p * d})")
    sizes = {
        "encoder heads": cfg.heads,
        "encoder width": cfg.width,
        "encoder MLP size": cfg.mlp,
        "decoder heads": cfg.dec_heads,
        "decoder width": cfg.dec_width,
        "decoder MLP size": cfg.dec_mlp,
    }
    problems += [f"TP size {t} does not divide the {what} ({n})" for what, n in sizes.items() if n % t]
    if p > cfg.depth:
        problems.append(f"PP size {p} exceeds the encoder depth {cfg.depth}: every stage needs at least one block")
    if v > 1:
        if p < 2:
            problems.append(f"--vpp {v} (interleaved 1F1B) needs --pp >= 2")
        elif cfg.depth % (p * v):
            problems.append(f"--vpp {v}: the encoder depth {cfg.depth} must be a multiple of pp*vpp = {p}*{v} = {p * v}")
        if p > 1 and layout.num_micro % p:
            problems.append(f"--vpp {v}: the micro-batches per step (global_batch / (micro_batch*dp) = {layout.num_micro}) "
                            f"must be a multiple of --pp {p} (interleaved 1F1B)")
    if layout.sp and t < 2:
        problems.append("sequence parallelism (--sp) needs TP size >= 2")
    if layout.global_batch % (layout.micro_batch * d):
        problems.append(
            f"the global batch {layout.global_batch} must be a multiple of micro_batch * dp = "
            f"{layout.micro_batch}*{d} = {layout.micro_batch * d}"
        )
    return problems


def check_layout(layout: Layout, cfg: ViTConfig, world_size: int) -> None:
    """Raise ValueError listing every problem of `validate_layout` (no-op for a valid layout)."""
    problems = validate_layout(layout, cfg, world_size)
    if problems:
        raise ValueError(f"invalid parallel layout ({layout}) for model {cfg.name!r}:\n  - " + "\n  - ".join(problems))


def launch_layout(args, layout_for) -> tuple[Layout, ViTConfig]:
    """The layout the ranks of `--nproc` x `--nnodes` processes will run (`layout_for(world) ->
    (Layout, ViTConfig)`), checked as they will check it."""
    world = (args.nproc or 1) * (getattr(args, "nnodes", None) or 1)
    layout, cfg = layout_for(world)
    check_layout(layout, cfg, world)
    return layout, cfg


def relaunch_checked(command: str, args, layout_for) -> int:
    """`rsscale <command> --nproc N`: check the layout as the ranks will (`launch_layout`), then
    start them under torchrun. A bad layout is one error (exit 2) before any process starts, not
    the same error from every rank and a torchrun traceback."""
    launch_layout(args, layout_for)
    return launch.relaunch(command, args, args.command_argv)
