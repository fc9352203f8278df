"""Layout-independent, per-rank sharded checkpoints that load without running code.

    <run>/checkpoints/step_00000050/index.json              layout-free description + file checksums
    <run>/checkpoints/step_00000050/rank_00003.safetensors  what rank 3 owns + its small state
    <run>/checkpoints/latest                                name of the newest checkpoint (a hint)
    <run>/.lock                                             host and PID of the run using the folder

Tensors are keyed `model/<name>`, `exp_avg/<name>`, `exp_avg_sq/<name>` with `<name>` the TP=1
parameter name (scaling/model/mae.py keeps those on every stage). Each rank writes only what it owns:
its TP slice of its stage's weights (DP rank 0 only; a TP-replicated tensor on TP rank 0 only)
and its optimizer moments (ZeRO-1: its own chunks, cut per parameter; a parameter that straddles
chunks is stored as flat pieces). With 16-bit weights `model/<name>` holds the optimizer's fp32
master weights, written like the moments (docs/OPTIMIZER.md). The index records, per key, the full shape,
megatron's partition dim/stride and which file holds which piece, so a checkpoint loads into any
(TP, PP, DP, SP) layout; a rank reads only the slices it needs (`safe_open(...).get_slice`).

Durable and atomic: every rank writes into a uniquely named `.tmp_step_N.<id>/` and fsyncs; rank 0
writes the index (size and sha256 of every file) last, renames the folder to `step_N` (an older
`step_N` is renamed aside first and removed only after the new one and `latest` are in place) and
replaces `latest` through a uniquely named temporary file. Resume takes the newest checkpoint whose
files match their index (`newest_complete`), skipping, with a warning, incomplete or corrupt ones.

Safe: files are safetensors (no pickle) and JSON; a file that cannot be read as such is refused
with a one-line `CheckpointError` naming it. A rank's non-tensor state is JSON in the safetensors
metadata. See docs/CHECKPOINTS.md for what is guaranteed.

Why not megatron-core dist_checkpointing: its sharded-tensor factories hang off megatron's
`MegatronModule.sharded_state_dict` machinery (which our plain nn.Modules do not implement) and its
optimizer integration needs megatron's DistributedOptimizer, which needs CUDA.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import struct
import uuid
from collections.abc import Mapping

import torch
import torch.distributed as dist

from rsscale.scaling.parallel import state
from rsscale.scaling.spec.config import ViTConfig

FORMAT = "rsscale-checkpoint-2"
_STEP = re.compile(r"^step_(\d{8})(\.replaced-[0-9a-f]+)?$")
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64", torch.int64: "I64",
           torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint or run folder that cannot be used as asked (the message names the file)."""


def log(msg: str, warn: bool = False) -> None:
    """Progress on rank 0; warnings on every rank, naming it."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if warn:
        logger.warning("[checkpoint] rank %d: WARNING: %s", rank, msg)
    elif rank == 0:
        logger.info("[checkpoint] %s", msg)


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically: a uniquely named temporary file, fsync, rename."""
    tmp = f"{os.path.join(os.path.dirname(path), '.' + os.path.basename(path))}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


# ---------------------------------------------------------------------------------------------
# Files: streamed safetensors out, safe_open slices in
# ---------------------------------------------------------------------------------------------


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """Write a safetensors file straight from each tensor's memory (fsynced); returns its size and sha256.

    safetensors.torch.save_file first copies every tensor into a bytes object (twice the host
    memory of what is saved) and refuses views of one buffer (our parameters are views of the
    optimizer's flat buffer); the format is a length-prefixed JSON header and the raw bytes, so
    streaming it is short. Files are read back with the library (`safe_open`)."""
    header, offset = {}, 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(head)), head):
            f.write(chunk)
            sha.update(chunk)
        for t in tensors.values():
            buf = memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
            f.write(buf)
            sha.update(buf)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": 8 + len(head) + offset, "sha256": sha.hexdigest()}


def file_digest(path: str) -> dict:
    sha, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            sha.update(chunk)
            n += len(chunk)
    return {"bytes": n, "sha256": sha.hexdigest()}


def _open(path: str):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: one line naming the file
        raise CheckpointError(f"cannot read {path} safely as safetensors ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _read(folder: str, file: str, key: str, index: tuple | None = None) -> torch.Tensor:
    """One tensor (or a slice of it) of one file; only those bytes are read."""
    path = os.path.join(folder, file)
    with _open(path) as f:
        try:
            return f.get_slice(key)[index] if index else f.get_tensor(key)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot read tensor {key!r} from {path} ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------


def tensor_meta(param: torch.Tensor) -> dict:
    """How a local tensor relates to its full (TP=1) tensor."""
    if state.is_tp_sharded(param):
        return {"partition_dim": int(param.partition_dim), "stride": int(getattr(param, "partition_stride", 1))}
    return {"partition_dim": None, "stride": 1}


def _broadcast(obj, group=None):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]
    return obj


def save_checkpoint(root: str, step: int, tensors: dict[str, tuple[torch.Tensor, dict]], rank_state: dict, meta: dict, keep: int = 0,
                    group=None) -> str:
    """Collective: every rank calls it with only the tensors it owns.

    `tensors` maps key -> (local tensor, info): info is `tensor_meta` plus, for a flat piece of a
    parameter's moments, `flat=[a, b]` (elements a..b of the flattened local tensor) and
    `local_shape` (several pieces of one key from one rank: keys "key@a"). `rank_state` values are tensors or JSON values. `meta` (same on all ranks) goes
    into the index. `keep` > 0 keeps only that many newest checkpoints. `group`: the process group
    of its collectives (a whole-world gloo group of its own when a background thread saves while
    training uses the default one). Returns the new folder."""
    rank, world = _world()
    tp_rank, tp_size = (state.tp_rank(), state.tp_size()) if state.is_initialized() else (0, 1)
    name = f"step_{step:08d}"
    tmp = None
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            for stale in os.listdir(root):  # temporaries of a killed save (the run lock says nobody else writes here)
                if stale.startswith(".tmp_"):
                    shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
            tmp = os.path.join(root, f".tmp_{name}.{uuid.uuid4().hex[:8]}")
            os.makedirs(tmp)
        except OSError as e:
            if world == 1:
                raise
            tmp = OSError(f"checkpoint of step {step} failed: rank 0 could not create a folder under {root}: {e}")
    tmp = _broadcast(tmp, group)
    if isinstance(tmp, OSError):
        raise tmp
    file = f"rank_{rank:05d}.safetensors"
    report: dict = {}
    try:
        out, entries = {}, {}
        for key, (t, info) in tensors.items():
            key = key.partition("@")[0]  # "key@a": one of several flat pieces of key written by this rank
            flat = info.get("flat")
            fkey = key if flat is None else f"{key}@{flat[0]}"
            out[fkey] = t
            entries[fkey] = dict(info, key=key, shape=list(info.get("local_shape", t.shape)), dtype=_DTYPES[t.dtype], tp_rank=tp_rank, tp_size=tp_size)
        plain = {k: v for k, v in rank_state.items() if not isinstance(v, torch.Tensor)}
        out.update({f"rank_state/{k}": v for k, v in rank_state.items() if isinstance(v, torch.Tensor)})
        digest = write_safetensors(os.path.join(tmp, file), out, {"rank_state": json.dumps(plain)})
        report = {"file": file, "digest": digest, "entries": entries}
    except Exception as e:  # noqa: BLE001 - every rank learns that the save failed
        if world == 1:
            raise
        report = {"error": f"rank {rank}: {type(e).__name__}: {e}"}
    reports = [None] * world if rank == 0 else None
    if world > 1:
        dist.gather_object(report, reports, dst=0, group=group)
    else:
        reports = [report]
    error = None
    if rank == 0:
        errors = [r["error"] for r in reports if "error" in r]
        try:
            if errors:
                raise OSError("; ".join(errors))
            index = {"format": FORMAT, "step": step, "world_size": world, **meta,
                     "files": {r["file"]: r["digest"] for r in reports}, "tensors": _merge(reports)}
            _commit(root, tmp, name, index, keep)
        except Exception as e:  # noqa: BLE001
            if world == 1:
                raise
            error = f"{type(e).__name__}: {e}"
    error = _broadcast(error, group)
    if error:
        raise OSError(f"checkpoint of step {step} failed: {error}")
    return os.path.join(root, name)


def _merge(reports: list[dict]) -> dict:
    """Per key: full shape, dtype, partition dim/stride, the writers' TP size and every piece."""
    out = {}
    for r in reports:
        for fkey, e in r["entries"].items():
            shape = list(e["shape"])
            if e["partition_dim"] is not None:
                shape[e["partition_dim"]] *= e["tp_size"]
            item = out.setdefault(e["key"], {"shape": shape, "dtype": e["dtype"], "partition_dim": e["partition_dim"], "stride": e["stride"],
                                             "tp_size": e["tp_size"] if e["partition_dim"] is not None else 1, "local_shape": e["shape"], "pieces": []})
            item["pieces"].append({"file": r["file"], "key": fkey, "tp_rank": e["tp_rank"] if e["partition_dim"] is not None else 0, "flat": e.get("flat")})
    for key, item in out.items():
        numel = 1
        for n in item["local_shape"]:
            numel *= n
        for q in range(item["tp_size"]):
            pieces = [p for p in item["pieces"] if p["tp_rank"] == q]
            covered = sum(numel if p["flat"] is None else p["flat"][1] - p["flat"][0] for p in pieces)
            if covered != numel:
                raise RuntimeError(f"checkpoint is missing pieces of {key} (TP slice {q}: {covered} of {numel} elements)")
    return out


def _commit(root: str, tmp: str, name: str, index: dict, keep: int) -> None:
    """Rank 0: index last, then rename into place without ever removing the old copy first."""
    _write_text(os.path.join(tmp, "index.json"), json.dumps(index, indent=1))
    _fsync_dir(tmp)
    final = os.path.join(root, name)
    aside = None
    if os.path.exists(final):
        aside = f"{final}.replaced-{uuid.uuid4().hex[:8]}"
        os.rename(final, aside)  # still found by newest_complete if we die before the next rename
    os.rename(tmp, final)
    _fsync_dir(root)
    _write_text(os.path.join(root, "latest"), name + "\n")
    if aside:
        shutil.rmtree(aside, ignore_errors=True)
    log(f"saved step {index['step']} to {final}")
    if keep > 0:
        prune(root, keep)


def candidates(root: str) -> list[str]:
    """Checkpoint folders under `root`, newest step first (a folder renamed aside last per step)."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), m.group(2) is None, d) for d in os.listdir(root) if (m := _STEP.match(d))]
    return [os.path.join(root, d) for _, _, d in sorted(found, reverse=True)]


def prune(root: str, keep: int) -> None:
    """Delete all but the `keep` newest complete checkpoints (never the newest complete one)."""
    complete = [c for c in candidates(root) if not problems(c, sizes_only=True)]
    for old in complete[max(1, keep):]:
        shutil.rmtree(old, ignore_errors=True)
        log(f"removed {old} (--keep {keep})")


# ---------------------------------------------------------------------------------------------
# Find and check
# ---------------------------------------------------------------------------------------------


def problems(folder: str, part: tuple[int, int] = (0, 1), sizes_only: bool = False) -> list[str]:
    """Why `folder` is not a complete checkpoint ([] when it is): its index and every file's size;
    the sha256 of the files this `part` (i, n) checks (file number % n == i)."""
    try:
        index = _load_index(folder)
    except (OSError, CheckpointError) as e:
        return [str(e)]
    out = []
    for i, (file, want) in enumerate(sorted(index.get("files", {}).items())):
        path = os.path.join(folder, file)
        if not os.path.isfile(path):
            out.append(f"{file} missing")
        elif os.path.getsize(path) != want["bytes"]:
            out.append(f"{file} has {os.path.getsize(path)} bytes, index says {want['bytes']}")
        elif not sizes_only and i % part[1] == part[0] and file_digest(path)["sha256"] != want["sha256"]:
            out.append(f"{file} sha256 differs from the index")
    return out


def newest_complete(root: str, collective: bool = False) -> str | None:
    """The newest checkpoint under `root` whose files match their index, or None; skipped ones are
    logged with the reason. `collective`: every rank calls it and checksums a share of the files."""
    rank, world = _world() if collective else (0, 1)
    for folder in _broadcast(candidates(root)) if collective else candidates(root):
        found = problems(folder, part=(rank, world))
        bad = torch.tensor([float(bool(found))], device="cuda" if world > 1 and dist.get_backend() == "nccl" else "cpu")
        if world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if not bad.item():
            return folder
        if found:
            log(f"skipping incomplete or corrupt checkpoint {folder}: {'; '.join(found)}", warn=True)
    return None


def resolve(path: str) -> str:
    """A checkpoint folder from itself, a `checkpoints/` folder or a run folder (its newest complete checkpoint)."""
    if os.path.exists(os.path.join(path, "index.json")):
        return path
    for root in (path, os.path.join(path, "checkpoints")):
        if candidates(root):
            folder = newest_complete(root)
            if folder is None:
                raise CheckpointError(f"no complete checkpoint under {root} (see the warnings above)")
            return folder
    raise FileNotFoundError(f"no checkpoint at {path} (looked for index.json or step_* folders, also under checkpoints/)")


def _load_index(folder: str) -> dict:
    path = os.path.join(folder, "index.json")
    try:
        with open(path, "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a JSON checkpoint index ({type(e).__name__}); refusing it") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise CheckpointError(f"{path} is not an {FORMAT} index (format {got!r}); older rsscale checkpoints held pickles and are not loaded")
    return index


def read_index(path: str) -> tuple[str, dict]:
    folder = resolve(path)
    return folder, _load_index(folder)


# ---------------------------------------------------------------------------------------------
# Load: only the slices a rank needs
# ---------------------------------------------------------------------------------------------


def _local(folder: str, e: dict, q: int) -> torch.Tensor:
    """The whole TP-local tensor q of an index entry (assembled from flat pieces if needed)."""
    pieces = [p for p in e["pieces"] if p["tp_rank"] == q]
    if len(pieces) == 1 and pieces[0]["flat"] is None:
        return _read(folder, pieces[0]["file"], pieces[0]["key"])
    flat = None
    for p in pieces:
        part = _read(folder, p["file"], p["key"]).reshape(-1)
        flat = torch.empty(sum(x["flat"][1] - x["flat"][0] for x in pieces), dtype=part.dtype) if flat is None else flat
        flat[p["flat"][0] : p["flat"][1]] = part
    return flat.view(e["local_shape"])


def read_local(folder: str, e: dict, tp_rank: int = 0, tp_size: int = 1) -> torch.Tensor:
    """The part of index entry `e` that TP rank `tp_rank` of `tp_size` holds (the whole tensor if
    it is replicated), read slice by slice from the writers' files (any writer TP size)."""
    d, s, T = e["partition_dim"], e["stride"], e["tp_size"]
    if d is None:
        return _local(folder, e, 0)
    D = e["shape"][d]
    if D % (tp_size * s):
        raise CheckpointError(f"dimension {d} of size {D} does not split into {tp_size}x{s} chunks")
    new_c, old_c = D // (tp_size * s), D // (T * s)
    assembled: dict[int, torch.Tensor] = {}
    parts = []
    for j in range(s):
        pos = (tp_rank + j * tp_size) * new_c
        hi = pos + new_c
        while pos < hi:  # the old chunks (of the writers' layout) overlapping this new chunk
            g = pos // old_c
            q, end = g % T, min(hi, (g + 1) * old_c)
            a = (g // T) * old_c + pos - g * old_c
            piece = [p for p in e["pieces"] if p["tp_rank"] == q]
            if len(piece) == 1 and piece[0]["flat"] is None:
                parts.append(_read(folder, piece[0]["file"], piece[0]["key"], (slice(None),) * d + (slice(a, a + end - pos),)))
            else:
                if q not in assembled:
                    assembled[q] = _local(folder, e, q)
                parts.append(assembled[q].narrow(d, a, end - pos))
            pos = end
    return torch.cat(parts, dim=d) if len(parts) > 1 else parts[0]


def read_for(folder: str, index: dict, key: str, param: torch.Tensor) -> torch.Tensor:
    """What this rank holds of `key` for its tensor `param` (current TP rank/size), shape-checked."""
    if key not in index["tensors"]:
        raise CheckpointError(f"{folder} has no tensor {key!r}")
    sharded = state.is_tp_sharded(param)
    t = read_local(folder, index["tensors"][key], state.tp_rank() if sharded else 0, state.tp_size() if sharded else 1)
    if t.shape != param.shape:
        raise CheckpointError(f"{folder}: {key} has local shape {tuple(t.shape)} here, the model's is {tuple(param.shape)}")
    return t


def load_full_tensors(path: str, prefix: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(index, {key: full unsharded tensor}) for every key (or those starting with `prefix`)."""
    folder, index = read_index(path)
    return index, {k: read_local(folder, e) for k, e in index["tensors"].items() if not prefix or k.startswith(prefix)}


class ModelTensors(Mapping):
    """A checkpoint's model tensors by TP=1 name, read when asked for: `weights[name]` reads the
    full tensor, `weights.local(name, param)` only the slice this TP rank holds for `param` (what a
    fine-tuning start reads, so no rank holds the whole encoder). `cfg`: the model's ViTConfig."""

    def __init__(self, path: str):
        self.folder, self.index = read_index(path)
        self.cfg = ViTConfig(**self.index["model"])
        self._names = [k[len("model/") :] for k in self.index["tensors"] if k.startswith("model/")]

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self.index["tensors"].get(f"model/{name}")
        if entry is None:
            raise KeyError(name)
        return read_local(self.folder, entry)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def local(self, name: str, param: torch.Tensor) -> torch.Tensor:
        return read_for(self.folder, self.index, f"model/{name}", param)


def load_full_state_dict(path: str) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """(ViTConfig, {TP=1 parameter name: full tensor}) of the model in a checkpoint (any layout)."""
    weights = ModelTensors(path)
    return weights.cfg, dict(weights)  # each tensor read whole


def load_rank_state(folder: str, rank: int) -> dict:
    """The state rank `rank` saved: its JSON values and its tensors (e.g. the RNG state)."""
    path = os.path.join(folder, f"rank_{rank:05d}.safetensors")
    with _open(path) as f:
        try:
            out = json.loads((f.metadata() or {}).get("rank_state", "{}"))
            out.update({k[len("rank_state/") :]: f.get_tensor(k) for k in f.keys() if k.startswith("rank_state/")})
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot read the rank state in {path} ({type(e).__name__}: {e})") from None
    return out


def shard_for(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The slice of a full tensor that this TP rank holds for `param` (the tensor itself if replicated)."""
    m = tensor_meta(param)
    if m["partition_dim"] is None:
        return full
    return state.shard_tensor(full, m["partition_dim"], m["stride"], state.tp_rank(), state.tp_size())


# ---------------------------------------------------------------------------------------------
# The run folder: one run at a time, no silent overwrite
# ---------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`<out>/.lock` holding this host, PID and start time, created exclusively (O_EXCL).

    A lock whose holder is a dead process on this host is reported and taken over; a live holder
    (or one on another host, which cannot be checked) is refused with a message naming it."""

    def __init__(self, out: str):
        self.path = os.path.join(out, ".lock")
        self.held = False

    def acquire(self) -> "RunLock":
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
                    self.held = True  # this process already holds it (a second Trainer in one process)
                    return self
                if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                    log(f"stale lock {self.path}: its holder (PID {holder['pid']} on {holder['host']}) is dead; taking it over", warn=True)
                    os.replace(self.path, f"{self.path}.stale-{uuid.uuid4().hex[:8]}")
                    continue
                if not holder:
                    raise CheckpointError(f"run folder {os.path.dirname(self.path)} has an unreadable lock file {self.path}; "
                                          "if no run uses the folder, delete it")
                raise CheckpointError(f"run folder {os.path.dirname(self.path)} is in use by PID {holder.get('pid')} on {holder.get('host')} "
                                      f"(since {holder.get('started')}; lock file {self.path}); if that run is gone, delete the lock file")
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise CheckpointError(f"could not take the lock {self.path} (another process took it over at the same time)")

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.held and self._holder().get("pid") == os.getpid():
            os.remove(self.path)
        self.held = False


def claim_run_folder(out: str, resume: bool, overwrite: bool) -> RunLock | None:
    """Collective: rank 0 locks `out`; a fresh run (no --resume) in a folder that already holds
    checkpoints is refused unless `overwrite`, which deletes them first. Same error on every rank."""
    rank, _ = _world()
    lock, error = None, None
    if rank == 0:
        try:
            lock = RunLock(out).acquire()
            root = os.path.join(out, "checkpoints")
            existing = candidates(root)
            if existing and not resume:
                if not overwrite:
                    lock.release()
                    raise CheckpointError(f"{root} already holds checkpoints (newest {os.path.basename(existing[0])}); "
                                          "pass --resume to continue that run or --overwrite to delete them and start over")
                log(f"--overwrite: deleting {len(existing)} checkpoint(s) under {root}", warn=True)
                for folder in existing:
                    shutil.rmtree(folder)
                if os.path.exists(os.path.join(root, "latest")):
                    os.remove(os.path.join(root, "latest"))
        except CheckpointError as e:
            error = str(e)
    error = _broadcast(error)
    if error:
        raise CheckpointError(error)
    return lock
