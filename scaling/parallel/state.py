"""Process groups for tensor (TP), pipeline (PP) and data (DP) parallelism.

A thin layer over megatron-core's `parallel_state`: we start torch.distributed ourselves (so a
plain `python script.py` gets a world of size 1 without torchrun) and ask megatron for the
TP/PP/DP groups. Everything else reads ranks and groups through the accessors below.

Also here: the one `ModelParallelConfig` every megatron linear is built with (always
`sequence_parallel=False`: megatron's SP paths allocate on `torch.cuda.current_device()`, so we
run sequence parallelism with our own collectives in `mappings.py`), and the layout helpers that
cut a full (TP=1) tensor into a rank's shard and glue shards back together.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
_HEARTBEAT = None  # a gloo group over all ranks for `unresponsive_ranks` (monitored_barrier is gloo-only)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parallel_state():
    from megatron.core import parallel_state  # imported lazily: megatron warns loudly on import

    return parallel_state


def init_parallel(tp: int = 1, pp: int = 1, dp: int | None = None, timeout_s: float = 600.0, seed: int | None = None):
    """Start torch.distributed if needed and build megatron's TP/PP/DP groups.

    Under torchrun (WORLD_SIZE set) the group comes from env://; otherwise this process becomes a
    world of size 1 on a free local port. gloo on CPU, nccl on CUDA. Calling it again with the
    same sizes is a no-op; with other sizes the model-parallel groups are rebuilt. Global rank 0
    logs one line: the world over its nodes, the layout, the rendezvous and the backend, e.g.
    `parallel layout: world 4 = 2 nodes x 2 processes; tp=2 pp=1 dp=2 (TP groups inside nodes);
    rendezvous 127.0.0.1:29500 (c10d); backend gloo`.
    """
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor and pipeline parallel sizes must be >= 1, got tp={tp}, pp={pp}")
    if not timeout_s > 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {timeout_s}")
    timeout = datetime.timedelta(seconds=timeout_s)
    exact_fp32_math()
    if not torch.cuda.is_available():
        keep_freed_host_memory()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "WORLD_SIZE" in os.environ:
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=timeout)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp*pp = {tp}*{pp}; use a multiple of {tp * pp} processes")
    if dp is not None and dp * tp * pp != world:
        raise ValueError(f"dp*tp*pp = {dp}*{tp}*{pp} must equal the world size {world}")
    ps = _parallel_state()
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) == (tp, pp):
            return
        ps.destroy_model_parallel()
    # the timeout exactly (megatron takes minutes, a float is fine); no megatron gloo groups (unused,
    # and its expert gloo group would get torch's default timeout)
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, distributed_timeout_minutes=timeout_s / 60.0,
                                 create_gloo_process_groups=False)
    global _HEARTBEAT
    _HEARTBEAT = dist.new_group(backend="gloo", timeout=timeout) if world > 1 else None
    if seed is not None:
        seed_rng(seed)
    if dist.get_rank() == 0:
        log.info("parallel layout: world %s; tp=%d pp=%d dp=%d%s; rendezvous %s; backend %s", _nodes_text(world), tp, pp, world // (tp * pp),
                 _tp_placement(world, tp), _rendezvous_text(), dist.get_backend())


def _local_world(world: int) -> tuple[int, int]:
    """(nodes, processes on this node) as torchrun set them ($GROUP_WORLD_SIZE, $LOCAL_WORLD_SIZE);
    one node of `world` processes without torchrun."""
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", 1))
    return nodes, int(os.environ.get("LOCAL_WORLD_SIZE", world // nodes))


def _nodes_text(world: int) -> str:
    """'4 = 2 nodes x 2 processes': the global world and its node-local part."""
    nodes, local = _local_world(world)
    node_s, proc_s = ("node" if nodes == 1 else "nodes"), ("process" if local == 1 else "processes")
    if nodes * local == world:
        return f"{world} = {nodes} {node_s} x {local} {proc_s}"
    return f"{world} over {nodes} {node_s} (rank 0's node: {local} {proc_s})"  # torchrun nodes of unequal --nproc


def _tp_placement(world: int, tp: int) -> str:
    """Across nodes: whether each TP group (consecutive global ranks; torchrun numbers ranks node by
    node) stays inside one node, where its per-layer collectives are fast. Unsaid for nodes of
    unequal --nproc (rank 0's node alone does not tell)."""
    nodes, local = _local_world(world)
    if nodes == 1 or tp == 1 or nodes * local != world:
        return ""
    return " (TP groups inside nodes)" if local % tp == 0 else " (TP groups span nodes)"


def _rendezvous_text() -> str:
    """How the ranks met: none (a world of one process, no torchrun), the launcher's rendezvous
    (`rsscale ... --nproc`), else env:// (torchrun or a harness: MASTER_ADDR:MASTER_PORT)."""
    from rsscale.scaling.runtime.launch import RENDEZVOUS

    if "WORLD_SIZE" not in os.environ:
        return "none (one process)"
    if os.environ.get(RENDEZVOUS):
        return os.environ[RENDEZVOUS]
    return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')} (env://)"


def exact_fp32_math() -> None:
    """fp32 means fp32 on every GPU: torch's defaults let cuDNN convolutions (the patch embedding)
    run in TF32 on Ampere and newer, which CPU tests cannot see. bf16/fp16 runs are unaffected
    (their matmuls are 16-bit under autocast); the Triton attention does the same for its fp32 dots."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def keep_freed_host_memory() -> None:
    """CPU training: glibc hands freed activation memory back to the OS and faults it in again on
    the next step (b12x1 on 2 cores: about 110k minor page faults and 0.5 s of a 3.5 s step);
    raising its mmap and trim thresholds keeps it for reuse, as jemalloc or tcmalloc would. The
    whole process runs under it (in `bench --peer torch` the native peer too). No-op without glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        if not libc.mallopt(m_mmap_threshold, 1 << 30):  # older glibc caps it at 32 MiB
            libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.mallopt(m_trim_threshold, 1 << 30)  # (mallopt takes a C int)
    except (OSError, AttributeError):
        pass


def is_timeout(error: BaseException) -> bool:
    """Whether a collective failed because a peer did not answer in time (gloo or NCCL wording)."""
    text = str(error).lower()
    return any(w in text for w in ("timed out", "timeout", "connection closed by peer", "connection reset by peer"))


def unresponsive_ranks(timeout_s: float) -> str:
    """Collective over the ranks still running: which rank stopped responding, in one sentence.

    Every live rank enters a `dist.monitored_barrier` (gloo) on a side group; rank 0 names the
    ranks that do not arrive within `timeout_s`, the others point to rank 0's message."""
    if _HEARTBEAT is None:
        return "no peer to check"
    try:
        dist.monitored_barrier(group=_HEARTBEAT, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as e:
        text = str(e)
        if "failed to pass monitoredBarrier" in text:
            ranks = text.split("failed to pass monitoredBarrier")[0].rsplit("Ranks", 1)[-1].rsplit("Rank", 1)[-1].strip(" :")
            return f"rank(s) {ranks} stopped responding (no heartbeat within {timeout_s:g} s)"
        return f"rank 0 did not confirm the heartbeat; see rank 0's message for the rank that stopped responding ({text.splitlines()[0][:160]})"
    return "every rank answered a heartbeat afterwards (the stall was transient or inside one group)"


def seed_rng(seed: int) -> None:
    """Seed torch, and megatron's CUDA RNG tracker where CUDA exists.

    megatron's `model_parallel_cuda_manual_seed` asserts on a CPU-only torch; its tracker only
    matters for dropout inside TP regions and megatron's own checkpointing, neither of which we
    use (no dropout; torch.utils.checkpoint), so on CPU seeding torch is all there is to do.
    """
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group (if we are in one)."""
    global _HEARTBEAT
    ps = _parallel_state()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    _HEARTBEAT = None
    if dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_initialized() and _parallel_state().model_parallel_is_initialized()


def ensure_initialized() -> None:
    """Build a world of size 1 (tp=pp=1) when nobody called init_parallel (the normal case of a
    single-process run: logged at DEBUG only)."""
    if not is_initialized():
        log.debug("init_parallel() was not called: starting a single-process world (tp=1, pp=1)")
        init_parallel()


# Accessors: every rank/size/group question goes through megatron's parallel_state.
def tp_rank() -> int:
    return _parallel_state().get_tensor_model_parallel_rank()


def tp_size() -> int:
    return _parallel_state().get_tensor_model_parallel_world_size()


def tp_group():
    return _parallel_state().get_tensor_model_parallel_group()


def pp_rank() -> int:
    return _parallel_state().get_pipeline_model_parallel_rank()


def pp_size() -> int:
    return _parallel_state().get_pipeline_model_parallel_world_size()


def pp_group():
    return _parallel_state().get_pipeline_model_parallel_group()


def dp_rank() -> int:
    return _parallel_state().get_data_parallel_rank()


def dp_size() -> int:
    return _parallel_state().get_data_parallel_world_size()


def dp_group():
    return _parallel_state().get_data_parallel_group()


def model_parallel_config(tp: int | None = None, params_dtype: torch.dtype = torch.float32, **kw):
    """The ModelParallelConfig for every megatron linear in the model.

    CPU initialization makes each rank build the full weight from the (shared) torch RNG and keep
    its slice, so a TP=T model's shards equal slices of the TP=1 model built from the same seed.
    """
    from megatron.core import ModelParallelConfig

    ensure_initialized()
    if tp is not None and tp != tp_size():
        raise ValueError(f"model_parallel_config(tp={tp}) does not match the initialized TP size {tp_size()}; call init_parallel(tp={tp}) first")
    return ModelParallelConfig(tensor_model_parallel_size=tp_size(), sequence_parallel=False, use_cpu_initialization=True, params_dtype=params_dtype, **kw)


# ---------------------------------------------------------------------------------------------
# Layout helpers: a TP parameter carries megatron's `partition_dim` and `partition_stride`.
# With stride s, the full tensor is cut into T*s chunks along partition_dim and rank r owns
# chunks r, r+T, r+2T, ... (e.g. the fused qkv weight: rank r owns its heads' q, k and v rows).
# ---------------------------------------------------------------------------------------------


def shard_tensor(full: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    """The slice of a full tensor that TP rank `rank` of `size` holds."""
    if full.shape[dim] % (size * stride):
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} does not split into {size}x{stride} chunks")
    chunks = full.chunk(size * stride, dim=dim)
    return torch.cat(chunks[rank::size], dim=dim)


def unshard_tensors(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of `shard_tensor`: glue all ranks' shards (in rank order) into the full tensor."""
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(len(shards))], dim=dim)


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))
