"""Model and optimizer state in one .npz file, written atomically and read back exactly.

Layout inside the archive: ``model/<name>`` for every entry of ``model.state_dict()``,
``optimizer/<param>/<buffer>`` for optimizer state, and ``__meta__`` (UTF-8 JSON as uint8) with
the format version, the optimizer's class and hyperparameters and the caller's metadata (a step
count, the model's configuration...). No pickles: the file loads with ``allow_pickle=False``.

Saving writes a temporary file in the target's directory, fsyncs it and renames it over the target
(os.replace), so a crash leaves either the old file or the new one, never half of one. Loading
reads and checks everything (zip CRCs, names, shapes, dtypes, optimizer class) before it changes
anything, and raises CheckpointError naming the problem.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from typing import Any

import numpy as np

__all__ = ["CheckpointError", "save_checkpoint", "read_checkpoint", "load_checkpoint"]

FORMAT = "rnnfast-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt or does not fit the model/optimizer."""


def _to_jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, tuple):
        return list(v)
    return v


def save_checkpoint(path: str | os.PathLike, model=None, optimizer=None, **meta: Any) -> None:
    """Writes ``model.state_dict()``, ``optimizer.state_dict()`` and JSON-able ``meta`` to path."""
    path = os.fspath(path)
    arrays: dict[str, np.ndarray] = {}
    header: dict[str, Any] = {"format": FORMAT, "version": VERSION, "optimizer": None}
    if model is not None:
        for k, v in model.state_dict().items():
            arrays[f"model/{k}"] = np.asarray(v)
        header["model"] = sorted(model.state_dict())
    if optimizer is not None:
        sd = optimizer.state_dict()
        header["optimizer"] = {
            "class": type(optimizer).__name__,
            "hparams": {k: _to_jsonable(v) for k, v in sd["hparams"].items()},
        }
        for name, state in sd["state"].items():
            for buf, v in state.items():
                if "/" in buf:
                    raise ValueError(f"optimizer buffer name {buf!r} must not contain '/'")
                arrays[f"optimizer/{name}/{buf}"] = np.asarray(v)
    try:
        header["meta"] = json.loads(json.dumps(meta, default=_to_jsonable))
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from e
    arrays["__meta__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict | None, dict]:
    """Reads and checks a checkpoint without applying it.

    Returns ``(model_state, optimizer_state, meta)``: the model state_dict, the optimizer
    state_dict plus its ``"class"`` (None if none was saved) and the caller's metadata.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}  # reading every member checks its CRC
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"checkpoint {path!r} is truncated or corrupt and cannot be read ({type(e).__name__}: "
            f"{e})"
        ) from e
    if "__meta__" not in data:
        raise CheckpointError(
            f"{path!r} is an .npz file but not an rnnfast checkpoint (no __meta__)"
        )
    try:
        header = json.loads(data.pop("__meta__").tobytes().decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r} has a corrupt header: {e}") from e
    if header.get("format") != FORMAT:
        raise CheckpointError(
            f"{path!r} is not an rnnfast checkpoint (format {header.get('format')!r})"
        )
    if header.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path!r} has format version {header.get('version')}, this rnnfast reads "
            f"version {VERSION}"
        )
    model = {k[len("model/") :]: v for k, v in data.items() if k.startswith("model/")}
    if "model" in header and sorted(model) != header["model"]:
        raise CheckpointError(f"checkpoint {path!r} is missing model arrays its header lists")
    optim = None
    if header.get("optimizer") is not None:
        state: dict[str, dict[str, np.ndarray]] = {}
        for k, v in data.items():
            if k.startswith("optimizer/"):
                name, buf = k[len("optimizer/") :].rsplit("/", 1)
                state.setdefault(name, {})[buf] = v
        optim = {"class": header["optimizer"]["class"],
                 "hparams": header["optimizer"]["hparams"], "state": state}  # fmt: skip
    return model, optim, header.get("meta", {})


def _check_model_state(model, state: dict, path: str) -> None:
    current = model.state_dict()
    missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path!r} does not fit the model: missing {missing}, "
            f"unexpected {unexpected}"
        )
    for k, v in current.items():
        if state[k].shape != np.shape(v):
            raise CheckpointError(
                f"checkpoint {path!r} does not fit the model: {k} has shape {state[k].shape} in "
                f"the file and {np.shape(v)} in the model"
            )


def load_checkpoint(path: str | os.PathLike, model=None, optimizer=None) -> dict:
    """Restores ``model`` and ``optimizer`` (either may be None) from path; returns the metadata.

    Everything is checked before anything changes: on any error the model and the optimizer are
    as they were.
    """
    path = os.fspath(path)
    model_state, optim_state, meta = read_checkpoint(path)
    if model is not None:
        _check_model_state(model, model_state, path)
    if optimizer is not None:
        if optim_state is None:
            raise CheckpointError(f"checkpoint {path!r} holds no optimizer state")
        if optim_state["class"] != type(optimizer).__name__:
            raise CheckpointError(
                f"checkpoint {path!r} holds {optim_state['class']} state, not "
                f"{type(optimizer).__name__}"
            )
    model_before = (
        {k: np.array(v, copy=True) for k, v in model.state_dict().items()}
        if model is not None
        else None
    )
    optim_before = optimizer.state_dict() if optimizer is not None else None
    try:
        if model is not None:
            model.load_state_dict(model_state)
        if optimizer is not None:
            optimizer.load_state_dict(
                {"hparams": optim_state["hparams"], "state": optim_state["state"]}
            )
    except Exception as e:
        if model is not None:
            model.load_state_dict(model_before)
        if optimizer is not None:
            optimizer.load_state_dict(optim_before)
        raise CheckpointError(f"checkpoint {path!r} does not fit: {e}") from e
    return meta
