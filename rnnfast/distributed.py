"""Data-parallel training of rnnfast's NumPy models over torch.distributed (gloo on CPUs):
every process holds the whole model, trains on its shard of each batch, and the gradients are
averaged before each optimizer step, so all processes keep equal parameters.

    import torch.distributed as dist
    from rnnfast import distributed as rd
    dist.init_process_group("gloo")                # torchrun sets rank, world size, address
    rd.broadcast_parameters(model)                 # rank 0's initial weights everywhere
    for x, y in rd.shard(batches):                 # this process's share of the data
        ...forward, loss, model.backward(...)...
        rd.all_reduce_gradients(model)             # the mean over all processes
        opt.step(model.grads)
    if rd.is_main_process(): save_checkpoint(...)  # one writer

The arrays travel as zero-copy torch views of the NumPy memory, gathered into buckets of at
most ``bucket_mb`` MiB per dtype so that a model of many small arrays costs a few all-reduce
calls, not one per array. Needs torch (optional for rnnfast itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["broadcast_parameters", "all_reduce_gradients", "shard", "is_main_process",
           "rank", "world_size"]  # fmt: skip


def _dist():
    try:
        import torch
        import torch.distributed as dist
    except ImportError as e:
        raise ImportError("rnnfast.distributed needs PyTorch: pip install torch") from e
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group"
            '("gloo") first (torchrun sets the rank and the address)'
        )
    return torch, dist


def rank() -> int:
    """This process's rank (0 without an initialised process group)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return 0
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    try:
        import torch.distributed as dist
    except ImportError:
        return 1
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the one that writes checkpoints and prints."""
    return rank() == 0


def _arrays(what) -> list[np.ndarray]:
    arrays = what.grads if hasattr(what, "grads") else what
    if isinstance(arrays, Mapping):
        arrays = [arrays[k] for k in sorted(arrays)]  # the same order in every process
    out = list(arrays)
    for a in out:
        if not isinstance(a, np.ndarray) or not a.flags.c_contiguous or not a.flags.writeable:
            raise TypeError("rnnfast.distributed reduces writeable C-contiguous ndarrays in place")
    return out


def broadcast_parameters(model, src: int = 0) -> None:
    """Copies rank ``src``'s parameters into every process's, in place (call once, before
    training, so that all processes start equal)."""
    torch, dist = _dist()
    params = model.params if hasattr(model, "params") else model
    for name in sorted(params):
        dist.broadcast(torch.from_numpy(params[name]), src)


def all_reduce_gradients(model_or_grads, bucket_mb: float = 25.0) -> None:
    """Replaces every gradient by its mean over the processes, in place (``model.grads``, a dict
    of arrays, or a list of them)."""
    torch, dist = _dist()
    arrays, world = _arrays(model_or_grads), dist.get_world_size()
    limit = max(1, int(bucket_mb * 2**20))
    by_dtype: dict[np.dtype, list[np.ndarray]] = {}
    for a in arrays:
        by_dtype.setdefault(a.dtype, []).append(a)
    for group in by_dtype.values():
        bucket: list[np.ndarray] = []
        size = 0
        for a in [*group, None]:
            if a is not None and (not bucket or size + a.nbytes <= limit):
                bucket.append(a)
                size += a.nbytes
                continue
            if len(bucket) == 1:  # one array: reduce its own memory
                flat = bucket[0].reshape(-1)
                dist.all_reduce(torch.from_numpy(flat))
                flat /= world
            elif bucket:
                buf = np.concatenate([b.reshape(-1) for b in bucket])
                dist.all_reduce(torch.from_numpy(buf))
                buf /= world
                offset = 0
                for b in bucket:
                    b.reshape(-1)[...] = buf[offset : offset + b.size]
                    offset += b.size
            bucket, size = ([a], a.nbytes) if a is not None else ([], 0)


def shard(data: Sequence, rank_: int | None = None, world: int | None = None) -> Sequence:
    """This process's share of ``data``: items rank, rank + world, ... (a list or any sequence
    that slices)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if not 0 <= r < w:
        raise ValueError(f"rank {r} is outside [0, {w})")
    return data[r::w]
