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


def _jsonable(v, where: str):
    """v as JSON's types (NumPy scalars and arrays, tuples as lists); TypeError naming the entry
    for anything JSON cannot hold, rather than json's own "Circular reference detected"."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x, f"{where}[{i}]") for i, x in enumerate(v)]
    if isinstance(v, dict):
        bad = [k for k in v if not isinstance(k, str)]
        if bad:
            raise TypeError(f"checkpoint metadata {where} has a key {bad[0]!r} that is not a str")
        return {k: _jsonable(x, f"{where}[{k!r}]") for k, x in v.items()}
    hint = " (a sorted list?)" if isinstance(v, (set, frozenset)) else ""
    raise TypeError(
        f"checkpoint metadata {where} has type {type(v).__name__}, which JSON cannot hold; convert "
        f"it to a str, number, list or dict{hint}"
    )


def _generator_states(model) -> dict:
    """The bit-generator state of every random generator in the model, by dotted name."""
    if model is None or not hasattr(model, "generators"):
        return {}
    return {k: g.bit_generator.state for k, g in model.generators().items()}


def _check_generators(model, saved, path: str) -> dict:
    """The saved generator states that apply to ``model``, checked; CheckpointError for a state
    that cannot be restored (another kind of generator, or a malformed entry)."""
    if saved is None or model is None or not hasattr(model, "generators"):
        return {}
    _expect(isinstance(saved, dict), path, "its generators entry is not a JSON object")
    current = model.generators()
    if set(saved) != set(current):
        raise CheckpointError(
            f"checkpoint {path!r} does not fit the model: it saved random generators "
            f"{sorted(saved)}, the model has {sorted(current)}"
        )
    for name, state in saved.items():
        kind = type(current[name].bit_generator).__name__
        ok = isinstance(state, dict) and state.get("bit_generator") == kind
        _expect(ok, path, f"generator {name!r} is not a saved {kind} state")
        try:  # a probe, so that a bad state is found before anything changes
            probe = getattr(np.random, kind)()
            probe.state = state
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path!r}: generator {name!r}: {e}") from e
    return saved


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
    """Writes ``model.state_dict()``, the states of ``model.generators()``,
    ``optimizer.state_dict()`` and ``meta`` (str, numbers, None, lists, dicts with str keys, NumPy
    scalars and arrays; TypeError naming the entry otherwise) to path, as a new file would be
    created (the umask applies; a replaced file keeps its mode)."""
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
            "hparams": {k: _jsonable(v, f"hparams[{k!r}]") for k, v in sd["hparams"].items()},
        }
        for name, state in sd["state"].items():
            for buf, v in state.items():
                if "/" in buf:
                    raise ValueError(f"optimizer buffer name {buf!r} must not contain '/'")
                arrays[f"optimizer/{name}/{buf}"] = np.asarray(v)
    if not allow_nonfinite:
        _check_finite(arrays, path, "refusing to write")
    header["meta"] = {k: _jsonable(v, repr(k)) for k, v in meta.items()}
    header["generators"] = _generator_states(model)
    arrays["__meta__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)

    target = os.path.realpath(path)  # through a symlink: the link stays, its target is replaced
    directory = os.path.dirname(target)
    _remove_orphans(target)
    fd, tmp = tempfile.mkstemp(prefix=f"{_temporary_prefix(target)}{os.getpid()}-", suffix=".npz",
                               dir=directory)  # fmt: skip
    try:
        # mkstemp makes the file 0600; a checkpoint gets what any new file would (or keeps the
        # mode of the one it replaces)
        try:
            mode = os.stat(target).st_mode & 0o7777
        except FileNotFoundError:
            umask = os.umask(0o022)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.fchmod(fd, mode)
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
    return _read(path, allow_nonfinite)[:3]


def _read(path, allow_nonfinite: bool):
    """read_checkpoint's three parts and the saved generator states (None in older files)."""
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
    generators = header.get("generators")
    _expect(generators is None or isinstance(generators, dict), path,
            "its generators entry is not a JSON object")  # fmt: skip
    return model, optim, meta, generators


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

    The model's random generators (``model.generators()``: dropout masks, noise seeds) continue
    from where they were saved, so a resumed run draws what the uninterrupted one would have.

    Everything is checked before anything changes: on any error the model and the optimizer are
    as they were.
    """
    path = os.fspath(path)
    model_state, optim_state, meta, generators = _read(path, allow_nonfinite)
    if model is not None:
        _check_model_state(model, model_state, path)
    generators = _check_generators(model, generators, path)
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
    for name, g in model.generators().items() if generators else ():
        g.bit_generator.state = generators[name]
    return meta
