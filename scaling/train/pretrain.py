"""MAE pretraining: one config tree, one short loop.

Where each parallelism lives: TP and SP are inside the model (megatron Column/Row linears and our
SP collectives in the blocks, scaling/model/vit.py + scaling/parallel/mappings.py); PP and DP are the
trainer's (each rank builds only its pipeline stage and runs the 1F1B schedule; gradients are
averaged over DP in buckets during backward, optimizer state optionally sharded over DP).

    torchrun --nproc-per-node 4 -m rsscale.scaling.runtime.cli pretrain --model tiny --tp 2 --pp 2 --sp \
        --micro-batch 4 --global-batch 16 --steps 50 --out runs/tiny-tp2pp2
    rsscale pretrain --nproc 4 ...            # the same, launching torchrun itself
    rsscale pretrain --config run.yaml --lr 2e-3   # file first, flags override

For the benchmark harness:
    trainer = Trainer.build(TrainConfig(model="small", parallel=Layout(tp=2, micro_batch=8, global_batch=8)))
    rec = trainer.train_step()   # loss, lr, grad_norm, t_data, t_fwd_bwd, t_dp_exposed, t_optim, t_step, images
    trainer.config, trainer.layout, trainer.cfg (ViTConfig), trainer.model (this rank's stage),
    trainer.optimizer (FlatAdamW: .flat params, .state_bytes(); under --fsdp scaling.fsdp.ShardedAdamW)

One step: every rank draws its DP rank's micro-batches (images + masking noise; every randomness
is a pure function of (seed, step, sample), so any layout sees the same global batch and mask),
runs the (interleaved with --vpp) 1F1B schedule (scaling/parallel/pipeline.py; a plain loop when PP=1) while
the DP gradient buckets are reduced as the last micro-batch's backward fills them (docs/OPTIMIZER.md),
waits for the rest, unscales (fp16), clips by the global norm over TP x PP, and steps AdamW
(16-bit weights with fp32 master weights under bf16/fp16; ZeRO-1 sharded with
--distributed-optimizer; scaling/train/optim.py). Resume is exact within a
layout and loads weights + optimizer moments into any other layout (scaling/train/checkpoint.py).
With --fsdp the model is sharded over DP by FSDP2 instead (scaling/train/fsdp.py: gradients arrive
reduce-scattered, AdamW steps the shards); --recompute and --compile act inside the blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from rsscale.scaling.runtime.config_file import check_tree
from rsscale.scaling.runtime.launch import MAX_RESTARTS, Interrupted, StopRequest, add_launch_arguments, note_bad_input, restart_count, wants_launch
from rsscale.scaling.runtime.log import ScalarWriter, peak_memory_bytes, reset_peak_memory
from rsscale.scaling.runtime.options import add_options, as_config, build, check, leaves, option, resolve, section
from rsscale.scaling.runtime.store import NullRun
from rsscale.scaling.spec import layout as layout_mod
from rsscale.scaling.spec.config import get_preset, param_count
from rsscale.scaling.spec.layout import Layout
from rsscale.scaling.spec.run import Checkpointing, Compute, DataParallel, OptimConfig, Recording
from rsscale.scaling.train import checkpoint
from rsscale.scaling.train.optim import FlatAdamW, LossScaler, lr_at

# ---------------------------------------------------------------------------------------------
# Config tree
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every option of a pretraining run; its flags, --config file and --print-config come from these fields."""
    model: str = option("tiny", "model preset (rsscale models) or a model file")
    in_chans: int = option(3, "image bands; overrides the preset's (4: the RGB+NIR TIFFs of `rsscale data --bands 4`)", ge=1)
    parallel: Layout = section(Layout)
    compute: Compute = section(Compute)
    data_parallel: DataParallel = section(DataParallel)
    optim: OptimConfig = section(OptimConfig)
    steps: int = option(50, "optimizer steps", ge=1)
    seed: int = option(0, "seed of weights, data order, augmentation and masks", ge=0)
    data: str = option("synthetic", "'synthetic' (bundled, generated if missing), 'random' (in-memory noise) or an image folder")
    data_backend: str = option("auto", "auto (DALI where installed and usable, else torch) | dali | torch; both resume exactly",
                               choices=("auto", "torch", "dali"))
    num_workers: int = option(2, "data loader workers per rank", ge=0)
    checkpointing: Checkpointing = section(Checkpointing, out="runs/pretrain")
    timeout: float = option(300.0, "process-group timeout in seconds: a dead peer fails the step instead of hanging", gt=0)
    recording: Recording = section(Recording)

    def __post_init__(self):
        check(self)
        if self.data_parallel.fsdp and self.compute.precision == "fp16":
            raise ValueError("--fsdp runs fp32 or bf16: drop --precision fp16")
        if self.data_parallel.defer_fsdp_sync and self.parallel.vpp > 1:
            raise ValueError("--defer-fsdp-sync runs with --vpp 1 (each chunk's last backward would need its own sync)")
        if self.optim.min_lr > self.optim.lr:
            raise ValueError(f"--min-lr (config key 'optim.min_lr') must be <= --lr, got {self.optim.min_lr} > {self.optim.lr}")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        return build(cls, check_tree(source, d, cls))  # unknown keys and mistyped values, named

    def to_dict(self) -> dict:
        return as_config(self)


RECENT = 10  # steps whose mean loss is a run's final loss
SCHEDULE = ("steps", "optim.lr", "optim.warmup", "optim.min_lr")  # what the learning rate of a step depends on
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # model weights; grads and master stay fp32


def add_arguments(parser) -> None:
    add_launch_arguments(parser)
    parser.add_argument("--emit-slurm", metavar="DIR", default=None, help="write DIR/pretrain.sbatch running this command on "
                        "--nnodes nodes x --nproc GPUs (one torchrun per node, resuming when requeued) instead of running it")
    add_options(parser, TrainConfig)


def config_from_args(args, world: int | None = None) -> TrainConfig:
    """Defaults <- config file <- flags; --dp defaults to world / (tp*pp) (world: $WORLD_SIZE
    under torchrun, or the size about to be launched)."""
    return resolve(TrainConfig, args, adjust=lambda tree, given: layout_mod.fill_dp(tree, given, world))


# ---------------------------------------------------------------------------------------------
# Data: per-rank micro-batches; every random draw is keyed by (seed, step, global sample index)
# ---------------------------------------------------------------------------------------------


def _generator(seed: int, step: int, index: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 100_003 + index) * 7 + stream)


def masking_noise_for(cfg, seed: int, step: int, first_index: int, n: int) -> torch.Tensor:
    """Masking noise [n, N] for global samples first_index.. of a step (layout independent)."""
    return torch.stack([torch.rand(cfg.num_patches, generator=_generator(seed, step, first_index + i, 1)) for i in range(n)])


def random_images(cfg, seed: int, step: int, first_index: int, n: int) -> torch.Tensor:
    """In-memory N(0, 1) images for tests and benchmarks (no I/O), layout independent."""
    shape = (cfg.in_chans, cfg.img_size, cfg.img_size)
    return torch.stack([torch.randn(shape, generator=_generator(seed, step, first_index + i, 2)) for i in range(n)])


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


def check_precision(precision: str) -> None:
    """A precision this machine can run (every task's check, before any process group exists)."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, not {precision!r}")
    if precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--precision fp16 (autocast + loss scaling) needs CUDA; on CPU only fp32 and bf16 run")


def rank_device() -> torch.device:
    """This rank's device: its CUDA device (torchrun's LOCAL_RANK, set by init_parallel), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def log(msg: str) -> None:
    """Progress line (rank 0 shows INFO; see scaling/runtime/log.py)."""
    logging.getLogger(__name__).info(msg)


class Trainer:
    """One rank's view of a pretraining run; build with `Trainer.build(config)`."""

    KIND = "pretrain"  # the store's run kind

    @classmethod
    def build(cls, config: TrainConfig) -> "Trainer":
        self = cls()
        self._start(config, dataclasses.replace(get_preset(config.model), in_chans=config.in_chans))
        opt = config.optim
        self.links = self._stage_links()
        self.model = self._build_model()
        zero = config.data_parallel.distributed_optimizer and self.layout.dp > 1
        if config.data_parallel.fsdp:  # ZeRO-3 with FSDP2: the model is sharded in place, the optimizer steps the shards
            from rsscale.scaling.train import fsdp

            self.optimizer = fsdp.shard_model(self.model, betas=(opt.beta1, opt.beta2), eps=opt.eps, weight_decay=opt.weight_decay,
                                              defer_sync=config.data_parallel.defer_fsdp_sync)
        else:
            self.optimizer = self._flat_adamw(param_dtype=PARAM_DTYPES[config.compute.precision])
        self._ready()
        self.loader = self._build_loader()
        log(f"model {self.cfg.name} ({param_count(self.cfg, 'mae'):,} {'supervised' if self.cfg.supervised else 'MAE'} params), layout {self.layout}, "
            f"world {dist.get_world_size()}, precision {config.compute.precision}, data {config.data}, "
            f"optimizer {'FSDP (ZeRO-3) over DP' if config.data_parallel.fsdp else 'ZeRO-1 over DP' if zero else 'replicated'} AdamW, starting at step {self.step}")
        return self

    def _flat_adamw(self, **options) -> FlatAdamW:
        """AdamW over this rank's parameters (config.optim), its state ZeRO-1-sharded over DP with
        --distributed-optimizer; TP-replicated parameters count once in the gradient norm."""
        opt, sync, state = self.config.optim, self.config.data_parallel, self.state
        zero = sync.distributed_optimizer and self.layout.dp > 1
        return FlatAdamW(self.model.named_parameters(), betas=(opt.beta1, opt.beta2), eps=opt.eps, weight_decay=opt.weight_decay,
                         shards=self.layout.dp if zero else 1, shard_rank=state.dp_rank() if zero else 0, group=state.dp_group(),
                         dp_size=self.layout.dp, bucket_mb=sync.bucket_mb, overlap=sync.overlap_grad_reduce,
                         counted=lambda n, p: state.is_tp_sharded(p) or state.tp_rank() == 0, **options)

    def _start(self, config: TrainConfig, cfg, seed: int | None = None) -> None:
        """What every task does first: check the layout and the device support before any process
        group exists (no hangs), then create the groups (seeding torch and megatron's CUDA RNG
        tracker with `seed`) and pick this rank's device."""
        self.config, self.layout, self.cfg = config, config.parallel, cfg
        world = int(os.environ.get("WORLD_SIZE", dist.get_world_size() if dist.is_initialized() else 1))
        layout_mod.check_layout(self.layout, self.cfg, world)
        self._check_precision()
        from rsscale import kernels
        from rsscale.scaling.parallel import state

        kernels.set_backend(config.compute.kernels)
        state.init_parallel(self.layout.tp, self.layout.pp, self.layout.dp, seed=seed, timeout_s=config.timeout)
        self.state = state
        self.device = rank_device()
        self.memory_at_start = reset_peak_memory(self.device)  # the run's peak memory and its increase are recorded

    def _ready(self) -> None:
        """After the model and optimizer: the loss scaler, step 0, and --resume."""
        self.scaler = LossScaler(enabled=self.config.compute.precision == "fp16")
        self.step = 0
        self.saved_step = None  # step of the newest checkpoint this run saved or resumed from
        self.recent_losses = []  # the last RECENT steps' losses, kept in checkpoints: a resumed run's final loss is the whole run's
        self.time_compute = False  # time each forward/backward (synchronized) into the step record's t_compute (bench)
        self.loader, self.loader_state = None, None  # the data loader state of the checkpoint resumed (exact stream)
        self.ckpt_dir = os.path.join(self.config.checkpointing.out or "", "checkpoints")  # (no --out: a fine-tune that saves nothing)
        self.restarts, self.lost_steps = restart_count(), 0
        if self.restarts and not self.config.checkpointing.resume:  # the launcher restarted the ranks (--max-restarts): continue, never start over
            log(f"elastic restart {self.restarts}: resuming from the newest complete checkpoint under {self.ckpt_dir}")
            self.config = dataclasses.replace(self.config, checkpointing=dataclasses.replace(self.config.checkpointing, resume=True, overwrite=False))
        if self.config.checkpointing.resume:
            self._resume()
            if self.restarts:
                self.lost_steps = max(self._progress() - self.step, 0)

    # --- setup helpers -------------------------------------------------------------------------
    def _check_precision(self):
        check_precision(self.config.compute.precision)
        c = self.config
        if c.compute.compile and c.compute.compile_backend == "inductor" and not torch.cuda.is_available() and not shutil.which(os.environ.get("CXX", "g++")):
            raise ValueError(f"--compile with inductor on CPU needs a C++ compiler ({os.environ.get('CXX', 'g++')} not found); "
                             "install one or pass --compile-backend aot_eager")

    def _stage_links(self):
        from rsscale.scaling.parallel.pipeline import StageLinks

        group = self.state.pp_group()
        ranks = dist.get_process_group_ranks(group) if dist.get_world_size() > 1 else [dist.get_rank()]
        return StageLinks(ranks, dist.get_rank())

    def _build_model(self):
        from rsscale.scaling.model.mae import MaskedAutoencoder

        L = self.layout
        chunks = layout_mod.stage_chunk_ranges(self.cfg.depth, L.pp, L.vpp, self.state.pp_rank())  # one per virtual stage
        model = MaskedAutoencoder(self.cfg, sequence_parallel=L.sp, recompute=self.config.compute.recompute,
                                  pre_process=self.links.is_first, post_process=self.links.is_last, layer_range=chunks, seed=self.config.seed)
        if self.config.compute.compile:
            for block in model.transformer_blocks():
                block.compile(backend=self.config.compute.compile_backend)  # in place: parameter names and hooks stay
        return model.to(self.device)

    def _is_data_source(self) -> bool:
        """The first TP rank of the first stage reads each replica's batches; its model-parallel peers receive them."""
        return self.state.tp_rank() == 0 and self.state.pp_rank() == 0

    def _build_loader(self):
        c = self.config
        if c.data == "random" or not self._is_data_source():
            return None
        root = c.data
        if c.data == "synthetic":
            from rsscale.scaling.data.data import dataset_for, dataset_paths

            root = "data/synthetic"  # what `rsscale data` writes by default: used as it is, written only where missing
            if dist.get_rank() == 0:
                dataset_for(root, "pretrain")
            if self.state.dp_size() > 1:
                dist.barrier(group=self.state.dp_group())  # the data sources: rank 0 and the other replicas' first ranks
            root = dataset_paths(root)["pretrain"]
        from rsscale.scaling.data.loader import build_pretrain_loader

        return build_pretrain_loader(root, self.cfg.img_size, self.layout.micro_batch, dp_rank=self.state.dp_rank(), dp_size=self.layout.dp,
                                     seed=c.seed, backend=c.data_backend, num_workers=c.num_workers, device=str(self.device),
                                     in_chans=self.cfg.in_chans, start_step=self.step * self.layout.num_micro, state=self.loader_state)

    # --- one step ------------------------------------------------------------------------------
    def _micro_batches(self):
        """This rank's (images, noise) per micro-batch of the current step. Loaded images come from
        the replica's data source (`_is_data_source`), broadcast over its TP x PP ranks, so every
        rank of a replica consumes the same batch whatever its own loader would have done."""
        L, cfg = self.layout, self.cfg
        base = self.state.dp_rank() * L.num_micro * L.micro_batch
        firsts = [base + m * L.micro_batch for m in range(L.num_micro)]
        noise = [masking_noise_for(cfg, self.config.seed, self.step, f, L.micro_batch).to(self.device) for f in firsts]
        if self.config.data == "random":
            imgs = torch.stack([random_images(cfg, self.config.seed, self.step, f, L.micro_batch) for f in firsts]).to(self.device)
        elif self.loader is not None:
            imgs = torch.stack([next(self.loader).to(self.device, torch.float32) for _ in firsts])
        else:
            imgs = torch.empty((L.num_micro, L.micro_batch, cfg.in_chans, cfg.img_size, cfg.img_size), device=self.device)
        if self.config.data != "random":
            (imgs,) = self._broadcast_batch(imgs)
        return list(zip(imgs.unbind(0), noise))

    def _broadcast_batch(self, *items) -> list:
        """`items` of the model-parallel group's first rank on all its ranks, so every rank of a replica
        computes on the same batch whatever its own loader did. A tensor is sent in place (other ranks
        pass one of the same shape); anything else (detection targets) is pickled (other ranks pass None)."""
        group = self.state._parallel_state().get_model_parallel_group()
        if dist.get_world_size(group) == 1:
            return list(items)
        src, out = dist.get_global_rank(group, 0), []
        for item in items:
            if isinstance(item, torch.Tensor):
                dist.broadcast(item, src=src, group=group)
            else:
                box = [item]
                dist.broadcast_object_list(box, src=src, group=group)
                item = box[0]
            out.append(item)
        return out

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.compute.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns its metrics (same on every rank)."""
        from rsscale.scaling.parallel.pipeline import perf_clock, run_schedule

        L = self.layout
        t0 = time.perf_counter()
        micro = self._micro_batches()
        self._sync()
        t1 = time.perf_counter()

        last_chunk = L.vpp - 1

        def forward_step(chunk, i, x):
            imgs, noise = micro[i]
            with self._autocast():
                out = self.model.forward_stage(x, imgs, noise, chunk=chunk)
            return out[0].float() / L.num_micro if self.links.is_last and chunk == last_chunk else out

        self.optimizer.zero_grad(L.num_micro)  # DP buckets are reduced during the last micro-batch's backward
        clock = perf_clock(self._sync) if self.time_compute else None
        losses, t_compute = run_schedule(forward_step, L.num_micro, self.links, self.model.hidden_shape(L.micro_batch), self.device,
                                         self.scaler.scale, chunks=L.vpp, clock=clock, before_backward=self.optimizer.before_backward)
        self._sync()
        t2 = time.perf_counter()
        self.optimizer.finish_grad_sync()
        self._sync()
        t_comm = time.perf_counter() - t2  # DP communication not hidden behind backward
        loss = self._global_loss(losses)
        lr, grad_norm, finite = self._apply_gradients(loss)
        t3 = time.perf_counter()
        return self._record(loss, lr, grad_norm, finite, (t0, t1, t2, t3), t_comm, **({"t_compute": t_compute} if clock else {}))

    def _apply_gradients(self, loss: float) -> tuple[float, float, bool]:
        """The optimizer step every task shares, after the gradients are reduced: stop on a non-finite
        loss, unscale (fp16) and skip on overflow, clip over the model-parallel group, step at this
        step's learning rate. Returns (lr, grad norm before clipping, whether the step was taken)."""
        opt = self.config.optim
        if not math.isfinite(loss):  # before the optimizer step: the weights and the last checkpoint stay good
            raise FloatingPointError(f"non-finite loss ({loss}) at step {self.step + 1}; stopping before its optimizer step "
                                     f"(the newest checkpoint under {self.ckpt_dir}, if any, is from an earlier step and intact)")
        if self.config.data_parallel.fsdp:  # gradients arrive reduce-scattered (averaged) over DP: clip the shards
            finite, grad_norm = True, self.optimizer.clip_grad_norm_(opt.clip_grad)
        else:
            finite = self.scaler.unscale_and_check(self.optimizer.grad)
            mp_group = self.state._parallel_state().get_model_parallel_group()
            grad_norm = self.optimizer.clip_grad_norm_(opt.clip_grad, group=mp_group)
        lr = lr_at(self.step, opt.lr, opt.warmup, self.config.steps, opt.min_lr)
        if finite:
            self.optimizer.step(lr)
        self._sync()
        self.step += 1
        return lr, grad_norm, finite

    def _record(self, loss, lr, grad_norm, finite, times, t_comm, **extra) -> dict:
        """The step record (same on every rank): what fit() logs, records and summarizes."""
        t0, t1, t2, t3 = times
        images = self.layout.global_batch
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped": not finite, "loss_scale": self.scaler.scale,
                "t_data": t1 - t0, "t_fwd_bwd": t2 - t1, "t_dp_exposed": t_comm, "t_optim": t3 - t2, "t_step": t3 - t0, "images": images,
                "images_per_s": images / (t3 - t0), **extra}

    def _global_loss(self, losses) -> float:
        """Mean loss over the global batch, known on every rank (sum over PP, mean over DP)."""
        t = torch.tensor([float(sum(losses)) if losses else 0.0], dtype=torch.float64, device=self.device)
        if self.layout.pp > 1:
            dist.all_reduce(t, group=self.state.pp_group())
        if self.layout.dp > 1:
            dist.all_reduce(t, group=self.state.dp_group())
            t /= self.layout.dp
        return float(t)

    # --- checkpoints ---------------------------------------------------------------------------
    def _claim(self) -> None:
        """Collective, once: lock the run folder; refuse a fresh run over checkpoints unless --overwrite."""
        if getattr(self, "_lock", None) is None:
            ck = self.config.checkpointing  # (--keep >= 0 is the option's own range check, made when the config is built)
            self._lock = checkpoint.claim_run_folder(ck.out, ck.resume, ck.overwrite) or False

    def save(self) -> str:
        """Collective: each rank writes what it owns (loadable into any layout; scaling/train/checkpoint.py)."""
        self._claim()
        if self.config.data_parallel.fsdp:  # every DP rank writes its shard of each weight and moment
            tensors = self.optimizer.checkpoint_tensors(self.model)
        else:
            params = dict(list(self.model.named_parameters()) + list(self.model.named_buffers()))
            owns = {n: self.state.is_tp_sharded(p) or self.state.tp_rank() == 0 for n, p in params.items()}
            first_replica = self.state.dp_rank() == 0
            state_pieces = self.optimizer.state_pieces()  # moments, and the fp32 master weights ("model") with 16-bit weights
            tensors = {f"model/{n}": (p, checkpoint.tensor_meta(p)) for n, p in params.items() if owns[n] and first_replica and n not in state_pieces.get("model", {})}
            if first_replica or self.optimizer.shards > 1:  # ZeRO-1: every DP rank writes its own shard
                for key, per_name in state_pieces.items():
                    for n, pieces in per_name.items():
                        p, info = params[n], checkpoint.tensor_meta(params[n])
                        for t, a, b in pieces if owns[n] else ():
                            whole = (a, b) == (0, p.numel())
                            tensors[f"{key}/{n}" if whole else f"{key}/{n}@{a}"] = (t.view_as(p), info) if whole else (t, dict(info, flat=[a, b], local_shape=list(p.shape)))
        meta = {"model": asdict(self.cfg), "layout": self.layout.as_dict(), "config": self.config.to_dict(),
                "trainer": {"step": self.step, "optimizer_steps": self.optimizer.step_count, "scaler": self.scaler.state_dict(),
                            "recent_losses": self.recent_losses},
                **self.checkpoint_meta()}
        rank_state = {"torch_rng": torch.get_rng_state(), "layout": self.layout.as_dict()}
        if self.device.type == "cuda":  # dropout/drop-path masks drawn on the GPU continue exactly too
            rank_state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        rank_state["loader"] = self.loader.state_dict() if self.loader is not None else None  # JSON values: the exact stream
        if not self.config.checkpointing.async_save:
            folder = checkpoint.save_checkpoint(self.ckpt_dir, self.step, tensors, rank_state, meta, keep=self.config.checkpointing.keep)
            self.saved_step = self.step
            return folder
        return self._save_in_background(tensors, rank_state, meta)

    def _save_in_background(self, tensors: dict, rank_state: dict, meta: dict) -> str:
        """--async-save: wait for the previous save, copy this rank's pieces to host memory (the
        training step after this one changes the originals in place), and let a thread write them
        with save_checkpoint over a gloo group of its own: its collectives never interleave with
        training's on the default group. A failed background save is raised at the next save or at
        the end of fit(); the newest complete checkpoint before it stays valid (atomic rename)."""
        import threading

        self.wait_for_save()
        if getattr(self, "_save_group", None) is None:
            self._save_group = dist.new_group(backend="gloo") if dist.get_world_size() > 1 else None
        host = {k: (t.detach().to("cpu", copy=True), info) for k, (t, info) in tensors.items()}
        state = {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in rank_state.items()}
        step, self._save_error = self.step, None

        def write():
            try:
                checkpoint.save_checkpoint(self.ckpt_dir, step, host, state, meta, keep=self.config.checkpointing.keep, group=self._save_group)
                self.saved_step = step
            except BaseException as e:  # noqa: BLE001 - raised on the training thread (wait_for_save)
                self._save_error = e

        self._save_thread = threading.Thread(target=write, name=f"checkpoint-step-{step}", daemon=True)
        self._save_thread.start()
        return os.path.join(self.ckpt_dir, f"step_{step:08d}")

    def wait_for_save(self) -> None:
        """Block until a background save is written; raise its error if it failed."""
        thread = getattr(self, "_save_thread", None)
        if thread is not None:
            thread.join()
            self._save_thread = None
            if self._save_error is not None:
                raise OSError(f"background checkpoint save failed: {self._save_error}") from self._save_error

    def _resume(self):
        """Continue from the newest complete checkpoint; start fresh only when there is none at all."""
        self._claim()
        folder = checkpoint.newest_complete(self.ckpt_dir, collective=True)
        if folder is None:
            if checkpoint.candidates(self.ckpt_dir):
                raise checkpoint.CheckpointError(f"--resume: no complete checkpoint under {self.ckpt_dir} (every one is incomplete or corrupt, "
                                                 "see the warnings); repair them, or pass --overwrite without --resume to start over")
            log(f"--resume: no checkpoint under {self.ckpt_dir}, starting from step 0")
            return
        _, index = checkpoint.read_index(folder)
        if index["trainer"]["step"] < self.config.steps:  # (a finished run has nothing to do: fit says so)
            self._check_schedule(index.get("config") or {}, index["trainer"]["step"])
        index = self.load(folder)
        self.saved_step = self.step
        if Layout(**index["layout"]) == self.layout:  # (a checkpoint from before --vpp has no vpp: 1)
            rank_state = checkpoint.load_rank_state(folder, dist.get_rank())
            torch.set_rng_state(rank_state["torch_rng"])
            if self.device.type == "cuda" and rank_state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(rank_state["cuda_rng"], self.device)
            self.loader_state = rank_state.get("loader")
        log(f"resumed from {folder} at step {self.step}")

    def _progress(self, step: int | None = None) -> int:
        """The last step an elastic job finished (rank 0 notes it in <out>/.progress after each step),
        so that a restart can say how many steps the failure cost; with `step`, note it."""
        if not self.config.checkpointing.out:  # (a fine-tune without --out saves nothing to resume from)
            return step or 0
        path = os.path.join(self.config.checkpointing.out, ".progress")
        if step is None:
            try:
                with open(path) as f:
                    return int(f.read().strip() or 0)
            except (OSError, ValueError):
                return 0
        if dist.get_rank() == 0 and os.environ.get(MAX_RESTARTS, "0") not in ("", "0"):
            with open(path, "w") as f:
                f.write(str(step))
        return step

    def _check_schedule(self, saved: dict, step: int) -> None:
        """--resume continues the checkpoint's learning-rate schedule: other steps, lr, warmup or
        min_lr than its run had would change it, which --allow-schedule-change must accept."""
        def get(config: dict, path: str):  # a path of the saved config's JSON (None where an older run has no such key)
            for key in path.split("."):
                config = config.get(key) if isinstance(config, dict) else None
            return config

        config = self.config.to_dict()
        now = {p: get(config, p) for p in SCHEDULE}
        was = {p: now[p] if get(saved, p) is None else get(saved, p) for p in SCHEDULE}
        changed = [p for p in SCHEDULE if was[p] != now[p]]
        if not changed:
            return
        lr = {name: lr_at(step, v["optim.lr"], v["optim.warmup"], v["steps"], v["optim.min_lr"]) for name, v in (("was", was), ("now", now))}
        flags = {leaf.path: leaf.flag for leaf in leaves(TrainConfig)}
        what = ", ".join(f"{flags[p]} {was[p]:g} -> {now[p]:g}" for p in changed)
        msg = f"--resume with {what} changes the run's learning-rate schedule (step {step + 1}: lr {lr['was']:.2e} -> {lr['now']:.2e})"
        if not self.config.checkpointing.allow_schedule_change:
            raise ValueError(f"{msg}; pass --allow-schedule-change to accept that, or resume with the run's values")
        log(f"--allow-schedule-change: {msg}")

    def checkpoint_meta(self) -> dict:
        """A task's own entries in the checkpoint index (fine-tuning: what rebuilds its model)."""
        return {}

    def load(self, path: str, weights_only: bool = False) -> dict:
        """Load weights, optimizer moments and trainer state from a checkpoint of any layout, reading
        only this rank's slices; returns the checkpoint's index. `weights_only`: the weights alone
        (evaluation and prediction)."""
        folder, index = checkpoint.read_index(path)
        if index["model"] != asdict(self.cfg):
            raise ValueError(f"checkpoint {path} holds model {index['model']['name']!r} with another shape than {self.cfg.name!r}")
        t = index["trainer"]
        if self.config.data_parallel.fsdp and not weights_only:
            self.optimizer.load(self.model, folder, index, t["optimizer_steps"])
        else:
            params = dict(list(self.model.named_parameters()) + list(self.model.named_buffers()))
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(checkpoint.read_for(folder, index, f"model/{name}", p))
            if weights_only:
                return index
            self.optimizer.load_state(lambda key, name: checkpoint.read_for(folder, index, f"{key}/{name}", params[name]), t["optimizer_steps"])
        self.scaler.load_state_dict(t["scaler"])
        self.step = int(t["step"])
        self.recent_losses = list(t.get("recent_losses", []))
        return index

    # --- the loop ------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        """Train to `config.steps`, logging, recording and checkpointing; returns the step records.
        Holds the run-folder lock meanwhile; a collective that times out is reported naming the
        rank that stopped responding."""
        c, records, stalls = self.config, [], []
        self._claim()
        try:
            if self.step >= c.steps:  # a finished run resumed: no empty run in the store
                log(f"nothing to do: run already at step {self.step} (--steps {c.steps}); nothing recorded")
                return records
            with self._store_run() as run, StopRequest() as stop, ScalarWriter(c.recording.tensorboard, prefix=self.tb_prefix()) as tb:
                while self.step < c.steps:
                    rec = self.train_step()
                    records.append(rec)
                    self._progress(rec["step"])
                    self.recent_losses = (self.recent_losses + [rec["loss"]])[-RECENT:]
                    parts = rec.get("parts", {})  # a task's loss terms
                    tb.add(rec["step"], **{k: rec[k] for k in ("loss", "lr", "grad_norm", "images_per_s")}, **parts,
                           peak_memory_bytes=peak_memory_bytes(self.device))
                    run.log_many((k, rec[k], rec["step"]) for k in ("loss", "lr", "grad_norm", "images_per_s", "t_step", "t_data", "t_fwd_bwd", "t_optim"))
                    if rec["step"] % max(1, c.recording.log_every) == 0 or rec["step"] in (1, c.steps):
                        log(f"step {rec['step']}/{c.steps} loss {rec['loss']:.4f} " + "".join(f"{k} {v:.3f} " for k, v in parts.items())
                            + f"lr {rec['lr']:.2e} grad_norm {rec['grad_norm']:.3f} "
                            f"img/s {rec['images_per_s']:.1f} (data {rec['t_data']:.3f}s fwd+bwd {rec['t_fwd_bwd']:.3f}s opt {rec['t_optim']:.3f}s)"
                            + (" [fp16 overflow: step skipped]" if rec["skipped"] else ""))
                    if c.checkpointing.save_every and rec["step"] % c.checkpointing.save_every == 0 and rec["step"] < c.steps:
                        t0 = time.perf_counter()
                        self.save()
                        stalls.append(time.perf_counter() - t0)  # what the save cost the training thread
                    if rec["step"] < c.steps and (signum := self._agreed_signal(stop)):  # Ctrl-C/SIGTERM: after the step and its due save
                        raise Interrupted(signum=signum)
                if self.restarts:
                    log(f"elastic restarts: {self.restarts}; this attempt resumed at step {self.step - len(records)}, "
                        f"{self.lost_steps} step(s) of the failed attempt lost")
                    run.log_many([("elastic_restarts", self.restarts, None), ("lost_steps", self.lost_steps, None)])
                if records:
                    peak = peak_memory_bytes(self.device)
                    memory = {"peak_mem_bytes": peak, "peak_mem_delta_bytes": peak - self.memory_at_start}
                    if stalls:
                        memory["save_stall_median_s"] = float(np.median(stalls))
                        log(f"{len(stalls)} checkpoint save(s) during training stalled it a median {memory['save_stall_median_s']:.3f} s each "
                            f"({'in the background' if c.checkpointing.async_save else 'written in place; --async-save writes in the background'})")
                    run.log_many((k, v, None) for k, v in {**summarize(records), **memory}.items())
                if records or c.checkpointing.save_every:
                    self.save()
                self.after_training(run, tb, records)
            if run.id is not None:
                log(f"recorded run {run.id} in {os.path.abspath(run.store.path)} (kind={self.KIND})")
        except RuntimeError as e:
            if self.state.is_timeout(e):
                raise TimeoutError(f"step {self.step + 1}: a collective timed out (--timeout {c.timeout:g} s); "
                                   f"{self.state.unresponsive_ranks(c.timeout)}") from e
            raise
        finally:
            try:
                self.wait_for_save()  # the last checkpoint is on disk before the lock goes
            finally:
                if self._lock:
                    self._lock.release()
                self._lock = False  # claimed once for this trainer: a later save() does not re-check
        return records

    def tb_prefix(self) -> str:
        """The TensorBoard tag prefix of this task's scalars."""
        return "train"

    def after_training(self, run, tb, records: list[dict]) -> None:
        """A task's work after its last step and checkpoint, inside the store run (fine-tuning
        evaluates here); pretraining has none."""

    def _agreed_signal(self, stop: StopRequest) -> int:
        """The signal any rank received (0: none), the same on every rank: all stop after one step."""
        if dist.get_world_size() == 1:
            return stop.signum or 0
        t = torch.tensor([stop.signum or 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def stopped_message(self) -> str:
        """The one line an interrupted run ends with."""
        if self.saved_step is None:
            return f"interrupted at step {self.step}; no checkpoint saved (--save-every N saves one every N steps)"
        return f"interrupted at step {self.step}; last checkpoint step {self.saved_step}; continue with --resume"

    def _store_run(self):
        if not self.config.recording.record:
            return contextlib.nullcontext(NullRun())
        from rsscale.scaling.runtime.store import ResultsStore

        L = self.layout
        return ResultsStore(self.config.recording.results).run(
            kind=self.KIND, enabled=dist.get_rank() == 0, layout=dict(tp=L.tp, pp=L.pp, dp=L.dp, sp=L.sp), micro_batch=L.micro_batch,
            global_batch=L.global_batch, precision=self.config.compute.precision, kernels=self.config.compute.kernels, **self.run_fields())

    def run_fields(self) -> dict:
        """The task's part of its store run: what it trains and its whole configuration."""
        return dict(preset=self.cfg.name, params=param_count(self.cfg, "mae"), config=self.config.to_dict())

    def full_state_dict(self) -> dict:
        """TP=1 named full weights gathered over TP (this stage's parameters only), for tests."""
        from rsscale.scaling.parallel.state import unshard_tensors

        out = {}
        for name, p in self.model.named_parameters():
            local = p.full_tensor() if self.config.data_parallel.fsdp else p  # FSDP: gathered over DP (tests only)
            if self.state.is_tp_sharded(p) and self.layout.tp > 1:
                shards = [torch.empty_like(local) for _ in range(self.layout.tp)]
                dist.all_gather(shards, local.detach().contiguous(), group=self.state.tp_group())
                out[name] = unshard_tensors(shards, p.partition_dim, p.partition_stride)
            else:
                out[name] = local.detach().clone()
        return out


def summarize(records: list[dict]) -> dict:
    """Run-level throughput from step records (the first step, with its warm-up, left out)."""
    steady = records[1:] or records
    t = np.array([r["t_step"] for r in steady])
    images = records[0]["images"]
    return {"images_per_s": float(images / np.median(t)), "step_time_median_s": float(np.median(t)),
            "step_time_p25_s": float(np.percentile(t, 25)), "step_time_p75_s": float(np.percentile(t, 75)),
            "final_loss": float(np.mean([r["loss"] for r in records[-3:]]))}


# ---------------------------------------------------------------------------------------------
# `rsscale pretrain`
# ---------------------------------------------------------------------------------------------


def main(args) -> int:
    """Exit codes: 0 done, 1 a failed run, 2 bad input (a flag, config, layout or checkpoint refused);
    an interrupted run ends with one line and 130 (Ctrl-C) or 143 (SIGTERM) through the CLI."""
    def layout_for(world):
        config = config_from_args(args, world=world)
        return config.parallel, get_preset(config.model)

    if getattr(args, "emit_slurm", None):
        return emit_slurm(args, layout_for)
    if wants_launch(args):
        return layout_mod.relaunch_checked("pretrain", args, layout_for)

    def work(started):
        trainer = started(Trainer.build(config_from_args(args)))
        records = trainer.fit()
        if records:
            log(f"done: loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f} over steps {records[0]['step']}..{records[-1]['step']}; "
                f"checkpoints in {trainer.ckpt_dir}")

    return run_rank("pretrain", work)


def emit_slurm(args, layout_for) -> int:
    """`pretrain --emit-slurm DIR`: this command line, checked for --nnodes x --nproc processes, as
    an sbatch script (scaling/runtime/launch.py `sbatch_script`) with --resume, so a requeued or restarted
    job continues from its newest checkpoint."""
    from rsscale.scaling.runtime.launch import sbatch_script, strip_launch_flags

    nodes, gpus = getattr(args, "nnodes", None) or 1, getattr(args, "nproc", None) or 1
    layout, cfg = layout_mod.launch_layout(args, layout_for)
    argv = strip_launch_flags(args.command_argv, also=("--emit-slurm",))
    if "--resume" not in argv:
        argv.append("--resume")
    folder = os.path.abspath(args.emit_slurm)
    os.makedirs(os.path.join(folder, "logs"), exist_ok=True)
    path = os.path.join(folder, "pretrain.sbatch")
    with open(path, "w") as f:
        f.write(sbatch_script(f"rsscale-pretrain-{cfg.name}", f"rsscale pretrain {cfg.name} {layout}", {"nodes": nodes, "gpus_per_node": gpus},
                              os.path.join(folder, "logs"), "pretrain", argv))
    os.chmod(path, 0o755)
    print(f"wrote {path} ({nodes} node(s) x {gpus} GPU(s), {layout}): sbatch it; it resumes from its newest checkpoint when requeued")
    return 0


def run_rank(command: str, work) -> int:
    """Run `work(started)` on this rank with every training command's conventions (exit codes in
    `main`'s docstring). `work` passes its trainer through `started` (which returns it), so that an
    interrupt ends with the trainer's one line. A failure names its rank and leaves without waiting
    on peers blocked in a collective; one process raises bad input for the CLI's one-line error."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    trainers = []
    try:
        work(lambda trainer: trainers.append(trainer) or trainer)
        from rsscale.scaling.parallel.state import destroy_parallel

        destroy_parallel()
        return 0
    except KeyboardInterrupt as e:  # the CLI shows the line (rank 0) and exits 130/143
        raise Interrupted(trainers[0].stopped_message() if trainers else "interrupted before training started",
                          getattr(e, "signum", signal.SIGINT)) from None
    except Exception as e:  # noqa: BLE001 - name the failing rank, then leave without waiting on peers
        bad_input = isinstance(e, (ValueError, FileNotFoundError, NotADirectoryError))
        if bad_input:
            note_bad_input()  # (under --nproc: the launcher's exit code says so too)
        if bad_input and world == 1:
            raise  # the CLI's one-line error, exit 2
        print(f"[{command}] rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if os.environ.get("RSSCALE_TRACEBACK"):
            traceback.print_exc()
        code = 2 if bad_input else 1
        if world > 1:
            sys.stderr.flush()
            os._exit(code)  # peers blocked in a collective are stopped by torchrun or their group timeout
        return code
