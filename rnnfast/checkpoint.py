"""Model and optimizer state in one .npz file, written atomically and read back exactly.

Layout inside the archive: ``model/<name>`` for every entry of ``model.state_dict()``,
``optimizer/<param>/<buffer>`` for optimizer state, and ``__meta__`` (UTF-8 JSON as uint8) with
the format version, the optimizer's class and hyperparameters and the caller's metadata (a step
count, the model's configuration...). No pickles: the file loads with ``allow_pickle=False``.

Saving writes a temporary file in the target's directory, fsyncs it, renames it over the target
(os.replace) and fsyncs the directory, so a crash leaves either the old file or the new one, never
half of one; the temporary file a killed save leaves behind is removed by the next save to the same
path. A symlink is written through: its target is replaced and the link stays. A model or optimizer
state holding NaN or infinity is refused (CheckpointError), so that a diverged run never replaces a
good checkpoint; ``allow_nonfinite=True`` writes or reads one anyway.

Loading reads and checks everything (zip CRCs, member names, header fields, shapes, dtypes,
finiteness, optimizer class) before it changes anything, and raises CheckpointError naming the
problem for any file that is not a well-formed checkpoint.
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


def _check_finite(arrays: dict[str, np.ndarray], path: str, verb: str) -> None:
    for name, v in arrays.items():
        if v.dtype.kind in "fc" and not np.isfinite(v).all():
            bad = int(v.size - np.count_nonzero(np.isfinite(v)))
            raise CheckpointError(
                f"{verb} checkpoint {path!r}: {name} holds {bad} NaN or infinite values (a "
                "diverged run?); pass allow_nonfinite=True to do it anyway"
            )


def _temporary_prefix(target: str) -> str:
    return f".{os.path.basename(target)}.tmp-"


def _remove_orphans(target: str) -> None:
    """Deletes the temporary files that killed saves to ``target`` left (their writer is gone)."""
    directory, prefix = os.path.dirname(target), _temporary_prefix(target)
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".npz")):
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its writer still runs
        except ProcessLookupError:
            pass
        except OSError:  # another user's process, or no way to tell: leave it
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, model=None, optimizer=None, *,
                    allow_nonfinite: bool = False, **meta: Any) -> None:  # fmt: skip
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
    if not allow_nonfinite:
        _check_finite(arrays, path, "refusing to write")
    try:
        header["meta"] = json.loads(json.dumps(meta, default=_to_jsonable))
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from e
    arrays["__meta__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)

    target = os.path.realpath(path)  # through a symlink: the link stays, its target is replaced
    directory = os.path.dirname(target)
    _remove_orphans(target)
    fd, tmp = tempfile.mkstemp(prefix=f"{_temporary_prefix(target)}{os.getpid()}-", suffix=".npz",
                               dir=directory)  # fmt: skip
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)  # the rename itself survives a power loss


def _expect(ok: bool, path: str, problem: str) -> None:
    if not ok:
        raise CheckpointError(f"checkpoint {path!r} is malformed: {problem}")


def _read_members(path: str) -> dict[str, np.ndarray]:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, not a file")
    try:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"checkpoint {path!r} is truncated or corrupt and cannot be read (not a zip "
                "archive: cut short, or another kind of file such as a .npy array)"
            )
        with np.load(path, allow_pickle=False) as z:
            members = {k: z[k] for k in z.files}  # reading every member checks its CRC
    except CheckpointError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # anything the archive or a member's .npy header can raise
        raise CheckpointError(
            f"checkpoint {path!r} is truncated or corrupt and cannot be read ({type(e).__name__}: "
            f"{e})"
        ) from e
    for k, v in members.items():  # NumPy hands back a member that is no .npy file as bytes
        _expect(isinstance(v, np.ndarray), path, f"member {k!r} is not a NumPy array")
    return members


def read_checkpoint(path: str | os.PathLike, *,
                    allow_nonfinite: bool = False) -> tuple[dict, dict | None, dict]:  # fmt: skip
    """Reads and checks a checkpoint without applying it.

    Returns ``(model_state, optimizer_state, meta)``: the model state_dict, the optimizer
    state_dict plus its ``"class"`` (None if none was saved) and the caller's metadata.
    """
    path = os.fspath(path)
    data = _read_members(path)
    if "__meta__" not in data:
        raise CheckpointError(
            f"{path!r} is an .npz file but not an rnnfast checkpoint (no __meta__)"
        )
    try:
        header = json.loads(data.pop("__meta__").tobytes().decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r} has a corrupt header: {e}") from e
    _expect(isinstance(header, dict), path, "its header is not a JSON object")
    if header.get("format") != FORMAT:
        raise CheckpointError(
            f"{path!r} is not an rnnfast checkpoint (format {header.get('format')!r})"
        )
    if header.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path!r} has format version {header.get('version')}, this rnnfast reads "
            f"version {VERSION}"
        )
    meta = header.get("meta", {})
    _expect(isinstance(meta, dict), path, "its metadata is not a JSON object")
    names = header.get("model")
    _expect(names is None or (isinstance(names, list) and all(isinstance(n, str) for n in names)),
            path, "the header's model entry is not a list of names")  # fmt: skip
    opt_header = header.get("optimizer")
    _expect(opt_header is None or (isinstance(opt_header, dict)
                                   and isinstance(opt_header.get("class"), str)
                                   and isinstance(opt_header.get("hparams"), dict)),
            path, "the header's optimizer entry lacks a class name or hyperparameters")  # fmt: skip

    model: dict[str, np.ndarray] = {}
    state: dict[str, dict[str, np.ndarray]] = {}
    for k, v in data.items():
        _expect(v.dtype.kind in "biuf", path, f"{k} has dtype {v.dtype}, not a real number type")
        if k.startswith("model/") and len(k) > len("model/"):
            model[k[len("model/") :]] = v
        elif k.startswith("optimizer/") and k.count("/") >= 2 and opt_header is not None:
            name, buf = k[len("optimizer/") :].rsplit("/", 1)
            _expect(bool(name and buf), path, f"member {k!r} names no parameter or buffer")
            state.setdefault(name, {})[buf] = v
        else:
            _expect(False, path, f"unexpected member {k!r}")
    if names is not None and sorted(model) != sorted(names):
        raise CheckpointError(f"checkpoint {path!r} is missing model arrays its header lists")
    if not allow_nonfinite:
        _check_finite({f"model/{k}": v for k, v in model.items()}, path, "refusing to read")
        _check_finite({f"optimizer/{n}/{b}": v for n, s in state.items() for b, v in s.items()},
                      path, "refusing to read")  # fmt: skip
    optim = None
    if opt_header is not None:
        optim = {"class": opt_header["class"], "hparams": opt_header["hparams"], "state": state}
    return model, optim, meta


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
        if (state[k].dtype.kind == "f") != (np.asarray(v).dtype.kind == "f"):
            raise CheckpointError(
                f"checkpoint {path!r} does not fit the model: {k} has dtype {state[k].dtype} in "
                f"the file and {np.asarray(v).dtype} in the model"
            )


def load_checkpoint(path: str | os.PathLike, model=None, optimizer=None, *,
                    allow_nonfinite: bool = False) -> dict:  # fmt: skip
    """Restores ``model`` and ``optimizer`` (either may be None) from path; returns the metadata.

    Everything is checked before anything changes: on any error the model and the optimizer are
    as they were.
    """
    path = os.fspath(path)
    model_state, optim_state, meta = read_checkpoint(path, allow_nonfinite=allow_nonfinite)
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
