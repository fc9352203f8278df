"""Exact per-rank memory of an MAE training step, counted without a GPU and without the memory.

    counted = count_stage(get_preset("g12x4"), Plan(Layout(tp=4, pp=4, dp=2, micro_batch=2, global_batch=64)), stage=0)
    counted.params, counted.grads, counted.optimizer, counted.activations, counted.total

How. The process joins a fake process group of the layout's full world size as the rank that holds
TP rank 0, DP rank 0 of pipeline stage `stage` (torch's "fake" backend: collectives return at
once and move nothing), megatron-core builds the TP/PP/DP groups in it
(`create_gloo_process_groups=False`), and that rank's model stage is built twice without data:
on the meta device, where the trainer's optimizer is built over it, and under torch's
FakeTensorMode for the forward passes: fake tensors have a shape, dtype and a "cpu" device but
no data, so CPU autocast applies exactly as on a real run (autocast ignores the meta device,
which would count bf16 runs in fp32). Nothing is allocated. Then:

  params, grads, optimizer: the trainer's own allocations, built by the trainer's own code
      (scaling/train/optim.py `FlatAdamW` over the stage's parameters, in the run's weight dtype: the
      flat weight buffer (16-bit under bf16/fp16), the flat fp32 gradient buffer that every
      parameter's gradient is a view into, AdamW moments and, with 16-bit weights, the fp32
      master weights of this DP rank's ZeRO-1 shard) plus the frozen position tables.
  activations: the storages autograd saves for backward, seen by
      `torch.autograd.graph.saved_tensors_hooks` (each storage counted once, parameters
      excluded), plus the stage output the 1F1B schedule keeps until its backward: one forward of
      each of the stage's chunks (one chunk unless --vpp > 1) run as the trainer runs it (the
      run's autocast dtype, recompute mode), then summed over the (chunk, micro-batch)
      activations the (interleaved) 1F1B order holds at once at its heaviest point, weighed by
      these counts (`analytic.in_flight`).
      With full recompute the blocks save only their inputs in forward; during backward one
      block at a time is recomputed, so the largest block's full saved set (counted in a run
      without checkpointing, its input left out) is added once. With selective recompute the
      checkpoint of each attention core holds q, k, v (its inputs, counted explicitly: a
      checkpoint keeps them by reference, not through autograd's hooks); the largest core's
      own saves (output, log-sum-exp), counted in a run without checkpointing, are added once.

What this does not count: transient buffers (gradients of activations during backward, matmul
workspaces, collective buffers, the allocator's fragmentation), the step's input batch beyond what
the in-flight micro-batches' forwards save of it (the trainer holds every micro-batch's images, as
views of one stacked fp32 tensor, for the whole step), and the CUDA context; these are
what --reserve-gb in `rsscale profile` is for. The torch kernel backend is what is counted; what
the Triton kernels save is not checked here (`rsscale bench --trace` on a GPU puts the allocator
peak beside these counts).
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from rsscale.benchmarks.prediction.analytic import Plan, in_flight
from rsscale.scaling.spec.config import ViTConfig
from rsscale.scaling.spec.layout import check_layout, stage_chunk_ranges

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_INPUT = "block input"
COMPONENTS = ("params", "grads", "optimizer", "activations", "gathered")


@dataclass
class Counted:
    """Bytes one rank of a pipeline stage holds, by component (see the module doc)."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    gathered: int = 0  # FSDP: unsharded weights and gradients at the backward peak (analytic.fsdp_gathered_bytes)
    block_activations: int = 0  # the part of `activations` saved inside transformer blocks (one micro-batch)

    @property
    def total(self) -> int:
        return sum(getattr(self, c) for c in COMPONENTS)

    def as_dict(self) -> dict:
        return {**{c: getattr(self, c) for c in COMPONENTS}, "total": self.total}


@contextlib.contextmanager
def fake_world(world_size: int, rank: int, tp: int, pp: int):
    """This process as `rank` of a fake process group of `world_size` with megatron's groups.

    A single-process world that existed before (the tests', a `build_mae` call) is torn down and
    rebuilt afterwards; inside a real multi-process run this refuses instead of breaking it."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from rsscale.scaling.parallel import state

    ps = state._parallel_state()
    previous = None
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            raise RuntimeError("memory counting needs its own fake process group; it cannot run inside a multi-process run")
        previous = (state.tp_size(), state.pp_size()) if ps.model_parallel_is_initialized() else (1, 1)
        state.destroy_parallel()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, create_gloo_process_groups=False)
        yield state
    finally:
        state.destroy_parallel()
        if previous is not None:
            state.init_parallel(*previous)


def stage_rank(tp: int, pp: int, dp: int, stage: int) -> int:
    """Global rank of TP rank 0, DP rank 0 on pipeline stage `stage` (megatron's tp-dp-pp order)."""
    return stage * tp * dp


def _storage(t: torch.Tensor):
    s = t.untyped_storage()
    return s._cdata, s.nbytes()


class _SavedBytes:
    """Unique storages saved for backward, attributed to the transformer block running (if any)."""

    def __init__(self, skip: set):
        self.skip, self.seen, self.where = skip, {}, None

    def add(self, t: torch.Tensor, where=None):
        key, n = _storage(t)
        if key not in self.skip and key not in self.seen:
            self.seen[key] = (n, where)

    def pack(self, t):
        self.add(t, self.where)
        return t

    def total(self) -> int:
        return sum(n for n, _ in self.seen.values())

    def by_block(self, cores: bool = False) -> dict:
        """Bytes per block (its attention core's saves included), or with `cores` only those of
        each block's attention core."""
        out: dict = {}
        for n, where in self.seen.values():
            core = isinstance(where, tuple)
            if where not in (None, _INPUT) and (core or not cores):
                name = where[1] if core else where
                out[name] = out.get(name, 0) + n
        return out

    @contextlib.contextmanager
    def attribute_cores(self, blocks):
        """Count each attention core's inputs q, k, v for its block and tag what the core saves
        itself as ("core", block)."""
        for name, blk in blocks:
            def attend(q, k, v, grid, orig=blk._attend, name=name):
                for t in (q, k, v):
                    self.add(t, self.where)
                outer, self.where = self.where, ("core", name)
                try:
                    return orig(q, k, v, grid)
                finally:
                    self.where = outer

            blk._attend = attend
        try:
            yield
        finally:
            for _, blk in blocks:
                del blk._attend

    @contextlib.contextmanager
    def attribute_blocks(self, blocks):
        """Attribute saves made inside each block's forward to that block (inputs excluded)."""
        handles = []
        for name, blk in blocks:
            def pre(mod, args, name=name):
                self.add(args[0], _INPUT)  # counted, but not as the block's own activations
                self.where = name

            def post(mod, args, out):
                self.where = None

            handles += [blk.register_forward_pre_hook(pre), blk.register_forward_hook(post)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _blocks(model):
    named = [(f"enc{i}", b) for i, b in model.blocks.items()]
    if model.post_process:
        named += [(f"dec{j}", b) for j, b in enumerate(model.decoder_blocks)]
    return named


def _forward_saves(model, cfg, plan: Plan, stage_input: bool, chunk: int, skip: set, attribute: bool = False, cores: bool = False) -> _SavedBytes:
    """Run one forward of this stage's `chunk` as the trainer does and collect what autograd saves."""
    from rsscale.scaling.model.mae import masking_noise

    L = plan.layout
    saved = _SavedBytes(set(skip))
    dtype = AUTOCAST.get(plan.precision)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
    ctx = contextlib.ExitStack()
    if attribute:
        ctx.enter_context(saved.attribute_blocks(_blocks(model)))
    if cores:
        ctx.enter_context(saved.attribute_cores(_blocks(model)))
    last = model.post_process and chunk == len(model.chunk_ranges) - 1
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), ctx:
        imgs = torch.empty(L.micro_batch, cfg.in_chans, cfg.img_size, cfg.img_size)
        noise = masking_noise(L.micro_batch, cfg)
        x = None if stage_input else torch.empty(model.hidden_shape(L.micro_batch)).requires_grad_()
        with autocast:
            out = model.forward_stage(x, imgs, noise, chunk=chunk)
        y = out[0].float() / L.num_micro if last else out
        saved.add(y)  # kept by the 1F1B schedule until this micro-batch's backward
    return saved


def _as_trained(model, dtype: torch.dtype) -> None:
    """Give the trainable weights the dtype the trainer trains them in (FlatAdamW makes them views
    of its flat buffer: 16-bit under bf16/fp16), which decides what autocast casts and saves. Only
    the dtype and being a parameter's storage matter to the count, so each weight gets its own
    empty storage: building the optimizer itself on fake tensors took most of the counting time."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = torch.empty(p.shape, dtype=dtype)


def count_stage(cfg: ViTConfig, plan: Plan, stage: int) -> Counted:
    """Count the bytes one rank of pipeline stage `stage` holds for `plan` (see the module doc)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rsscale.scaling.model.mae import MaskedAutoencoder
    from rsscale.scaling.train.optim import FlatAdamW
    from rsscale.scaling.train.pretrain import PARAM_DTYPES

    L = plan.layout
    check_layout(L, cfg, L.world_size)
    zero = plan.distributed_optimizer and L.dp > 1
    with fake_world(L.world_size, stage_rank(L.tp, L.pp, L.dp, stage), L.tp, L.pp) as state:
        if state.pp_rank() != stage or state.tp_rank() or state.dp_rank():
            raise RuntimeError(f"rank {stage_rank(L.tp, L.pp, L.dp, stage)} is not TP0/DP0 of stage {stage} in megatron's rank order")
        # megatron's weight init is skipped (perform_initialization=False): shapes are all that count here.
        config = state.model_parallel_config(perform_initialization=False)

        def build():
            return MaskedAutoencoder(cfg, sequence_parallel=L.sp, recompute=plan.recompute, pre_process=stage == 0,
                                     post_process=stage == L.pp - 1, layer_range=stage_chunk_ranges(cfg.depth, L.pp, L.vpp, stage), config=config)

        with torch.device("meta"):  # the trainer's allocations: its optimizer over the stage's parameters
            model = build()
            frozen = [p for p in model.parameters() if not p.requires_grad]
            if plan.fsdp:
                out = _count_fsdp(model, deferred=plan.defer_fsdp_sync and L.num_micro > 1)
            else:
                opt = FlatAdamW(model.named_parameters(), shards=L.dp if zero else 1, shard_rank=0, dp_size=L.dp,
                                param_dtype=PARAM_DTYPES[plan.precision], bucket_mb=plan.bucket_mb)
                out = Counted(params=opt.flat.untyped_storage().nbytes() + sum(p.untyped_storage().nbytes() for p in frozen),
                              grads=opt.grad.untyped_storage().nbytes(), optimizer=opt.state_bytes())
        with FakeTensorMode():  # the forward passes, on "cpu" fake tensors so that autocast applies
            model = build()
            _as_trained(model, PARAM_DTYPES[plan.precision])
            skip = {_storage(p)[0] for p in model.parameters()}
            chunks = range(L.vpp)
            selective = plan.recompute == "selective"
            saves = [_forward_saves(model, cfg, plan, stage == 0 and c == 0, c, skip, attribute=plan.recompute != "full", cores=selective)
                     for c in chunks]
            chunk_bytes = [sv.total() for sv in saves]
            out.activations = sum(chunk_bytes[c] for c in in_flight(L, stage, chunk_bytes.__getitem__))
            if plan.recompute == "none":
                out.block_activations = sum(n for sv in saves for n in sv.by_block().values())
            else:  # the largest block's (full) or attention core's (selective) activations, live while it runs again in backward
                for _, blk in _blocks(model):
                    blk.recompute = "none"
                plain = [_forward_saves(model, cfg, plan, stage == 0 and c == 0, c, skip, attribute=True, cores=selective) for c in chunks]
                out.activations += max((n for p in plain for n in p.by_block(cores=selective).values()), default=0)
                out.block_activations = sum(n for p in (plain if plan.recompute == "full" else saves) for n in p.by_block().values())
    return out


def _count_fsdp(model, deferred: bool = False) -> Counted:
    """The trainer's FSDP allocations (scaling/train/fsdp.py) on DP rank 0 of a meta-device stage: each
    parameter's padded shard, a gradient shard per trainable one, the AdamW moments, and the
    unsharded weights and gradients at the backward peak (the module doc of analytic.py; `deferred`:
    all of them, as a deferred sync holds them between micro-batches)."""
    from rsscale.scaling.train.fsdp import shard_model

    opt = shard_model(model)

    def full_bytes(params):  # DTensor numel: the whole (TP-local) tensor, as gathered
        return sum(p.numel() * p.element_size() for p in params)

    shard = {p: p.to_local().untyped_storage().nbytes() for p in model.parameters()}
    blocks = [full_bytes(b.parameters()) for b in model.transformer_blocks()]
    in_blocks = {p for b in model.transformer_blocks() for p in b.parameters()}
    root = [p for p in model.parameters() if p not in in_blocks]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if deferred:
        gathered = full_bytes(model.parameters()) + full_bytes(trainable)
    else:
        gathered = full_bytes(root) + full_bytes(p for p in root if p.requires_grad) + 3 * max(blocks, default=0)
    return Counted(params=sum(shard.values()), grads=sum(n for p, n in shard.items() if p.requires_grad), optimizer=opt.state_bytes(),
                   gathered=gathered)


def count_plan(cfg: ViTConfig, plan: Plan) -> list[Counted]:
    """`count_stage` for every pipeline stage of the plan."""
    return [count_stage(cfg, plan, s) for s in range(plan.layout.pp)]


# ------------------------------------------------------------------------------- fine-tuning
FINETUNE_CLASSES = {"seg": 7, "det": 15}  # LoveDA's classes; DOTA-v1.0's


class _LayerNormStatsFp32(TorchDispatchMode):
    """LayerNorm's saved mean and rstd as the CPU and CUDA kernels return them: float32 for 16-bit
    inputs (torch's fake/meta kernel gives them the input's dtype). Matters where a LayerNorm
    sees bf16/fp16 inputs: the pyramid's channel norms under autocast."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.native_layer_norm.default and out[1].dtype in (torch.bfloat16, torch.float16):
            return out[0], out[1].float(), out[2].float()
        return out


def _finetune_saves(model, task: str, plan: Plan, img: int, skip: set, attribute: bool) -> _SavedBytes:
    """What autograd saves in one micro-batch's forward (and, for segmentation, its loss) as
    finetune/finetune.py runs it; fine-tuning runs each micro-batch's backward before the next forward."""
    L = plan.layout
    saved = _SavedBytes(set(skip))
    dtype = AUTOCAST.get(plan.precision)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
    blocks = [(f"blk{i}", b) for i, b in enumerate(model.backbone.blocks)]
    ctx = saved.attribute_blocks(blocks) if attribute else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), ctx, autocast, _LayerNormStatsFp32():
        imgs = torch.empty(L.micro_batch, model.backbone.cfg.in_chans, img, img)
        outs = model(imgs)
        if task == "seg":
            masks = torch.zeros(L.micro_batch, img, img, dtype=torch.int64)
            saved.add(model.loss_from(outs, masks, model.normalizers(masks))["total"])
    return saved


def count_finetune(cfg: ViTConfig, plan: Plan, task: str, img: int, num_classes: int | None = None,
                   parts=("allocations", "activations"), **options) -> tuple[Counted, dict]:
    """Bytes one rank (TP rank 0, DP rank 0) of an `rsscale finetune --task TASK --crop IMG` run
    holds, counted like `count_stage`: the run's own model (finetune/finetune.py `build_model`: the
    ViTDet backbone with window and global blocks and the UperNet or detection head, this rank's
    TP slices) and its own optimizer (`Finetuner`, ZeRO-1 shard, layer-wise lr scales),
    built on the meta device inside a fake process group of the full world size; activations
    are the storages autograd saves in one micro-batch's forward on fake tensors (segmentation:
    through the loss; detection: through the dense head outputs, without the loss's sampled
    anchors / RoIs / positives, which depend on the data). `options`: other `rsscale finetune`
    options (by name: detector, channels, window, rel_pos, ...). `parts`: count only the
    allocations (params, grads, optimizer) or only the activations (and FLOPs).

    Returns (Counted, {"flops": forward FLOPs of one micro-batch on this rank, "block_flops": the
    part in the transformer blocks, "trainable": this rank's trainable parameter count})."""
    from rsscale.finetune import finetune as FT

    L = plan.layout
    if L.pp != 1:
        raise ValueError(f"fine-tuning runs tensor and data parallel only, got pp={L.pp}")
    check_layout(L, cfg, L.world_size)
    run = FT.finetune_options(task, model=cfg.name, parallel=L, crop=img, precision=plan.precision,
                              activation_checkpointing=plan.recompute == "full", distributed_optimizer=plan.distributed_optimizer, **options)
    classes = num_classes or FINETUNE_CLASSES[task]
    quiet = logging.getLogger(FT.__name__)  # build_model's progress lines are about a real run
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return _count_finetune(cfg, plan, task, img, run, classes, parts)
    finally:
        quiet.setLevel(level)


def _count_finetune(cfg, plan, task, img, run, classes, parts):
    """count_finetune with the run's options built (see there)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from rsscale.finetune import finetune as FT

    L = plan.layout
    out, work = Counted(), {}
    with fake_world(L.world_size, 0, L.tp, 1) as state:
        config = state.model_parallel_config(perform_initialization=False)

        def build():
            return FT.build_model(task, run, classes, sequence_parallel=L.sp, config=config)[0]

        with torch.device("meta") if "allocations" in parts else contextlib.nullcontext():  # the run's allocations: its model and its optimizer
            if "allocations" in parts:
                model = build()
                tuner = FT.Finetuner(run, model, None, torch.device("meta"))
                opt = tuner.optimizer
                frozen = [p for p in model.parameters() if not p.requires_grad]
                work["trainable"] = sum(p.numel() for _, p in opt.named)
                out.params = opt.flat.untyped_storage().nbytes() + sum(p.untyped_storage().nbytes() for p in frozen)
                out.grads = opt.grad.untyped_storage().nbytes()
                out.optimizer = opt.state_bytes()
        if "activations" not in parts:
            return out, work
        with FakeTensorMode():  # one micro-batch's forward, on "cpu" fake tensors so that autocast applies
            model = build().train()
            skip = {_storage(p)[0] for p in model.parameters()}
            with FlopCounterMode(display=False) as flops:
                saves = _finetune_saves(model, task, plan, img, skip, attribute=plan.recompute != "full")
            out.activations = saves.total()
            per_block = saves.by_block()
            if plan.recompute == "full":  # the largest block's activations, live while it is recomputed in backward
                for blk in model.backbone.blocks:
                    blk.recompute = "none"
                per_block = _finetune_saves(model, task, plan, img, skip, attribute=True).by_block()
                out.activations += max(per_block.values(), default=0)
            out.block_activations = sum(per_block.values())
    counts = flops.get_flop_counts()
    block_flops = sum(sum(v.values()) for k, v in counts.items() if re.search(r"\.blocks\.\d+$", k))
    return out, {**work, "flops": flops.get_total_flops(), "block_flops": block_flops}
