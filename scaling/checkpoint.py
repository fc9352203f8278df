"""Layout-independent sharded checkpoints (our own format; see below for why not megatron's).

    <run>/checkpoints/step_00000050/index.json     layout-free description of every tensor
    <run>/checkpoints/step_00000050/rank_00003.pt  tensors rank 3 wrote + its own small state
    <run>/checkpoints/latest                       name of the newest complete checkpoint

Tensors are keyed `model/<name>`, `exp_avg/<name>`, `exp_avg_sq/<name>` with `<name>` the TP=1
parameter name (scaling/mae.py keeps those on every stage). A TP-sharded tensor is written by
DP rank 0 of every TP rank; a replicated one by DP rank 0 and TP rank 0 only; pipeline stages own
disjoint names. The index records, per key, the full shape, megatron's partition dim/stride and
which file holds which TP slice, so a checkpoint loads into any (TP, PP, DP, SP) layout - the
optimizer moments included (they are stored per parameter, gathered from ZeRO shards on save).

Atomic: every rank writes into `.tmp_step_N/`, rank 0 writes the index last, renames the folder
to `step_N` and only then points `latest` at it (write + os.replace). A crash at any moment
leaves the previous checkpoint as `latest`.

Why not megatron-core dist_checkpointing: its sharded-tensor factories hang off megatron's
`MegatronModule.sharded_state_dict` machinery (which our plain nn.Modules do not implement) and its
optimizer integration needs megatron's DistributedOptimizer, which needs CUDA; the format above is
~150 lines and is what fine-tuning reads (`load_full_state_dict`).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist

from rsscale.scaling.config import ViTConfig
from rsscale.scaling.parallel import state

FORMAT = "rsscale-checkpoint-1"
LOADER_STATE = "loader_{rank:05d}.json"  # a rank's data loader state (scaling/data.py state_dict)


def log(msg: str) -> None:
    print(f"[checkpoint] {msg}", flush=True)


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def tensor_meta(param: torch.Tensor) -> dict:
    """How a local tensor relates to its full (TP=1) tensor."""
    if state.is_tp_sharded(param):
        return {"partition_dim": int(param.partition_dim), "stride": int(getattr(param, "partition_stride", 1))}
    return {"partition_dim": None, "stride": 1}


def save_checkpoint(root: str, step: int, tensors: dict[str, tuple[torch.Tensor, dict]], rank_state: dict, meta: dict, writer: bool,
                    loader_state: dict | None = None) -> str:
    """Collective: every rank calls it. `tensors` maps key -> (local tensor, tensor_meta);
    `writer` says whether this rank writes its tensors (False on DP replicas);
    `meta` (same on all ranks) goes into the index (model config, layout, trainer state);
    `loader_state` (this rank's data loader state, plain JSON values) goes to its own JSON file.
    Returns the final checkpoint folder."""
    rank, world = _world()
    tp_rank, tp_size = (state.tp_rank(), state.tp_size()) if state.is_initialized() else (0, 1)
    name = f"step_{step:08d}"
    tmp, final = os.path.join(root, f".tmp_{name}"), os.path.join(root, name)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    mine = {}
    for key, (t, m) in tensors.items():
        if writer and (m["partition_dim"] is not None or tp_rank == 0):
            mine[key] = (t.detach().to("cpu").clone(), m)  # clone: params are views of one flat buffer
    if loader_state is not None:
        with open(os.path.join(tmp, LOADER_STATE.format(rank=rank)), "w") as f:
            json.dump(loader_state, f)
    file = f"rank_{rank:05d}.pt"
    torch.save({"tensors": {k: t for k, (t, _) in mine.items()}, "rank_state": rank_state}, os.path.join(tmp, file))
    entries = {k: dict(m, local_shape=list(t.shape), tp_rank=tp_rank, tp_size=tp_size, file=file) for k, (t, m) in mine.items()}
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, entries)
    else:
        gathered = [entries]
    if rank == 0:
        index = {"format": FORMAT, "step": step, "world_size": world, **meta, "tensors": _merge(gathered)}
        with open(os.path.join(tmp, "index.json"), "w") as f:
            json.dump(index, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        latest_tmp = os.path.join(root, ".latest.tmp")
        with open(latest_tmp, "w") as f:
            f.write(name + "\n")
        os.replace(latest_tmp, os.path.join(root, "latest"))
        log(f"saved step {step} to {final}")
    _barrier()
    return final


def _merge(gathered: list[dict]) -> dict:
    """Per key: full shape, partition dim/stride and the file of every TP slice (in TP order)."""
    out = {}
    for entries in gathered:
        for key, e in entries.items():
            item = out.setdefault(key, {"partition_dim": e["partition_dim"], "stride": e["stride"], "shards": [None] * e["tp_size"] if e["partition_dim"] is not None else [None]})
            shape = list(e["local_shape"])
            if e["partition_dim"] is not None:
                shape[e["partition_dim"]] *= e["tp_size"]
                item["shards"][e["tp_rank"]] = e["file"]
            else:
                item["shards"][0] = e["file"]
            item["shape"] = shape
    missing = [k for k, v in out.items() if None in v["shards"]]
    if missing:
        raise RuntimeError(f"checkpoint is missing TP slices of {missing[:3]}")
    return out


def resolve(path: str) -> str:
    """A checkpoint folder from itself, a `checkpoints/` folder (its `latest`) or a run folder."""
    for cand in (path, os.path.join(path, "checkpoints")):
        if os.path.exists(os.path.join(cand, "index.json")):
            return cand
        latest = os.path.join(cand, "latest")
        if os.path.exists(latest):
            with open(latest) as f:
                return os.path.join(cand, f.read().strip())
    raise FileNotFoundError(f"no checkpoint at {path} (looked for index.json or a 'latest' file, also under checkpoints/)")


def read_index(path: str) -> tuple[str, dict]:
    folder = resolve(path)
    with open(os.path.join(folder, "index.json")) as f:
        index = json.load(f)
    if index.get("format") != FORMAT:
        raise ValueError(f"{folder} is not an rsscale checkpoint (format {index.get('format')!r}, expected {FORMAT!r})")
    return folder, index


def load_full_tensors(path: str, prefix: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(index, {key: full unsharded tensor}) for every key (or those starting with `prefix`)."""
    folder, index = read_index(path)
    files: dict[str, dict] = {}

    def shard(file, key):
        if file not in files:
            files[file] = torch.load(os.path.join(folder, file), map_location="cpu", weights_only=True)["tensors"]
        return files[file][key]

    out = {}
    for key, e in index["tensors"].items():
        if prefix and not key.startswith(prefix):
            continue
        shards = [shard(f, key) for f in e["shards"]]
        out[key] = shards[0] if e["partition_dim"] is None else state.unshard_tensors(shards, e["partition_dim"], e["stride"])
    return index, out


def load_full_state_dict(path: str) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """(ViTConfig, {TP=1 parameter name: full tensor}) of the model in a checkpoint (any layout)."""
    index, tensors = load_full_tensors(path, prefix="model/")
    return ViTConfig(**index["model"]), {k[len("model/") :]: v for k, v in tensors.items()}


def load_loader_state(path: str, rank: int) -> dict | None:
    """The data loader state `rank` saved with a checkpoint (JSON, never pickle), or None."""
    file = os.path.join(resolve(path), LOADER_STATE.format(rank=rank))
    if not os.path.exists(file):
        return None
    with open(file) as f:
        return json.load(f)


def load_rank_state(path: str, rank: int) -> dict:
    folder = resolve(path)
    return torch.load(os.path.join(folder, f"rank_{rank:05d}.pt"), map_location="cpu", weights_only=False)["rank_state"]


def shard_for(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The slice of a full tensor that this TP rank holds for `param` (the tensor itself if replicated)."""
    m = tensor_meta(param)
    if m["partition_dim"] is None:
        return full
    return state.shard_tensor(full, m["partition_dim"], m["stride"], state.tp_rank(), state.tp_size())
