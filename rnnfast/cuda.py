"""The CUDA backend: rnnfast.ops on GPU arrays.

rnnfast.ops hands its calls here when x is a GPU array: a CuPy array, or anything with
``__cuda_array_interface__`` or ``__dlpack__`` on a CUDA device (a torch tensor, a JAX array).
Every array of one call must be on the same GPU; the results are CuPy arrays on that device, and
the work is queued on CuPy's current stream of it (``with cupy.cuda.Stream(): ...`` picks another).
Same semantics as on the CPU (see rnnfast.ops), in float32, float64, float16 and bfloat16 (the
last two accumulate in float32 and keep the cell state and the reserve in float32; bfloat16
arrays need CuPy with ml_dtypes).

Needs the CUDA module (built where nvcc was found), CuPy (``pip install rnnfast[cuda]``) and
cuBLAS, loaded at run time from the nvidia-cublas wheel, the CUDA toolkit, or $RNNFAST_CUBLAS.
``cuda_available()`` says whether all three are there; ``unavailable_reason()`` says why not.

Options (``set_options``): ``tf32`` runs the float32 cuBLAS GEMMs on TF32 tensor cores (off by
default, about 1e-3 relative error); ``persistent`` is "auto" (the persistent recurrence kernels,
forward and backward, where w_hh fits in the GPU's shared memory and the batch is at most 32;
they multiply in float32 FMAs whatever tf32 says), "never" (a cuBLAS GEMM and a pointwise kernel
per step) or "always" (raise where the persistent kernels can't run). float64 never takes them.

A training forward's context holds the reserve (float32, or float64 for float64 inputs, laid out
as csrc/rnnfast/cell.h's ReserveLayout) and the h sequence; for float32 and float64 ``y`` is a
view of the reserve, so copy it before writing to it (CuPy has no read-only arrays).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from ._validate import (
    Checked,
    check_backward_inputs,
    check_context,
    check_forward_inputs,
)
from .cells import cell_spec

__all__ = [
    "CudaContext",
    "backward",
    "build_info",
    "cuda_available",
    "forward",
    "get_options",
    "is_gpu_array",
    "set_options",
    "unavailable_reason",
]

DTYPES = ("float32", "float64", "float16", "bfloat16")
_PERSISTENT = {"auto": -1, "never": 0, "always": 1}
_options: dict[str, Any] = {"tf32": False, "persistent": "auto"}
_state: dict[str, Any] = {}  # the loaded module, or the reason it could not be loaded


def _cublas_candidates() -> list[str]:
    paths = []
    if os.environ.get("RNNFAST_CUBLAS"):
        paths.append(os.environ["RNNFAST_CUBLAS"])
    try:  # the nvidia-cublas wheel (nvidia/cu13/lib), a namespace package
        import nvidia

        for root in list(getattr(nvidia, "__path__", [])):
            for sub in ("cu13", "cublas"):
                p = os.path.join(root, sub, "lib", "libcublas.so.13")
                if os.path.exists(p):
                    paths.append(p)
    except ImportError:
        pass
    paths.append("libcublas.so.13")  # the loader's search, or one already loaded (CuPy, torch)
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            paths.append(os.path.join(home, "lib64", "libcublas.so.13"))
    return paths


def _driver_loads() -> bool:
    """Whether the NVIDIA driver's library loads (a machine with no GPU has none)."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _load():
    """The _cuda module with cuBLAS loaded, or None (the reason in _state['error'])."""
    if "module" in _state:
        return _state["module"]
    mod, error = None, None
    try:
        from . import _cuda as mod
    except ImportError as e:
        error = f"rnnfast was built without its CUDA module ({e})"
    if mod is not None and not _driver_loads():
        error = (
            "no NVIDIA driver here (libcuda.so.1 does not load), so no GPU to run on; the CUDA "
            f"module itself is built (for {mod.architectures})"
        )
        mod = None
    if mod is not None:
        reasons = []
        for path in _cublas_candidates():
            why = mod.load_cublas(path)
            if not why:
                break
            reasons.append(why)
        else:
            error = ("cuBLAS not found (pip install rnnfast[cuda] brings it, or set RNNFAST_CUBLAS "
                     "to libcublas.so.13): " + "; ".join(reasons))  # fmt: skip
            mod = None
    _state["module"], _state["error"] = mod, error
    return mod


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError(
            "GPU arrays need CuPy for rnnfast's CUDA backend (pip install rnnfast[cuda])"
        ) from e
    return cupy


def unavailable_reason() -> str | None:
    """None where the CUDA backend can run, else why not."""
    if _load() is None:
        return _state["error"]
    try:
        cupy = _cupy()
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device is visible"
        cc = str(cupy.cuda.Device().compute_capability)  # "90" for sm_90
    except Exception as e:  # CuPy missing, or no driver
        return str(e)
    built = {a.split("-")[0].rstrip("af") for a in _state["module"].architectures.split(";")}
    if cc not in built:
        return (
            f"the CUDA module was built for sm_{', sm_'.join(sorted(built))} but the current "
            f"device is sm_{cc} (rebuild with RNNFAST_CUDA_ARCHITECTURES={cc})"
        )
    return None


def cuda_available() -> bool:
    """True where the CUDA module was built, cuBLAS loads, CuPy imports and a GPU is visible."""
    return unavailable_reason() is None


def build_info() -> dict:
    """What the CUDA module was built for, and what it runs on (where it can)."""
    mod = _load()
    if mod is None:
        return {"cuda": False, "reason": _state["error"]}
    info = {
        "cuda": True,
        "architectures": mod.architectures,
        "nvcc": mod.cuda_compiler_version,
        "cublas": mod.cublas_path(),
        "cublas_header_checked": bool(mod.cublas_header_checked),
    }
    try:
        info["runtime"] = mod.runtime_summary()
    except RuntimeError as e:
        info["runtime"] = str(e)
    return info


def set_options(*, tf32: bool | None = None, persistent: str | None = None) -> None:
    """Set the CUDA backend's options for later calls (see the module docstring)."""
    if persistent is not None:
        if persistent not in _PERSISTENT:
            raise ValueError(f"persistent must be one of {sorted(_PERSISTENT)}, got {persistent!r}")
        _options["persistent"] = persistent
    if tf32 is not None:
        _options["tf32"] = bool(tf32)


def get_options() -> dict:
    return dict(_options)


# ---- arrays --------------------------------------------------------------------------------
_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged


def is_gpu_array(a) -> bool:
    """Whether a is a CUDA array (CuPy, __cuda_array_interface__ or a CUDA __dlpack__)."""
    if a is None or type(a) is np.ndarray:
        return False
    try:
        if hasattr(a, "__cuda_array_interface__"):
            return True
    except Exception:  # torch raises TypeError for dtypes the interface lacks (bfloat16)
        return hasattr(a, "__dlpack_device__")
    dev = getattr(a, "__dlpack_device__", None)
    if dev is None:
        return False
    try:
        return int(dev()[0]) in _DLPACK_CUDA
    except Exception:
        return False


def _as_cupy(cupy, name, a):
    if isinstance(a, cupy.ndarray):
        return a
    if not is_gpu_array(a):
        raise TypeError(
            f"{name} is not a GPU array (got {type(a).__name__}); pass GPU arrays only together"
        )
    if hasattr(a, "__dlpack__"):
        try:
            return cupy.from_dlpack(a)
        except Exception:
            pass
    return cupy.asarray(a)


def _checked(cupy, name, a, dtype=None):
    """``a`` as a contiguous CuPy array of a supported dtype (matching ``dtype`` when given)."""
    a = _as_cupy(cupy, name, a)
    if a.dtype.name not in DTYPES:
        raise TypeError(f"{name} must be one of {', '.join(DTYPES)}, got dtype {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {a.dtype} but x has dtype {dtype}; mixing dtypes is not allowed "
            "(cast explicitly)"
        )
    return cupy.ascontiguousarray(a)


@dataclass(frozen=True)
class CudaContext:
    """What backward needs from a GPU forward. ``reserve`` is None for an inference forward."""

    cell: str
    inputs: Checked  # CuPy arrays; lengths an int32 device array or None
    reserve: Any
    hseq: Any  # [T+1, N, H], slot 0 = h0; y is hseq[1:]
    noise: Any = None  # the forward's dropout and zoneout (rnnfast._validate.Noise) or None

    @property
    def training(self) -> bool:
        return self.reserve is not None


def _check_forward(cupy, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths,
                   w_peephole=None, w_hr=None) -> Checked:  # fmt: skip
    """The CPU path's checks (rnnfast._validate) over CuPy arrays, then one device for all."""
    if lengths is not None and is_gpu_array(lengths):
        lengths = cupy.asnumpy(lengths)
    a = check_forward_inputs(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths,
                             array=functools.partial(_checked, cupy),
                             w_peephole=w_peephole, w_hr=w_hr)  # fmt: skip
    dev = a.x.device.id
    for f in fields(a):
        v = getattr(a, f.name)
        if f.name != "lengths" and v is not None and v.device.id != dev:
            raise ValueError(f"{f.name} is on device {v.device.id} but x is on device {dev}")
    return replace(a, lengths=None if a.lengths is None else cupy.asarray(a.lengths))


def _ptr(a) -> int:
    return 0 if a is None else int(a.data.ptr)


def _acc_dtype(cupy, dtype):
    return cupy.dtype(cupy.float64) if dtype == cupy.float64 else cupy.dtype(cupy.float32)


def _module():
    mod = _load()
    if mod is None:
        raise RuntimeError(f"rnnfast's CUDA backend is not available: {_state['error']}")
    return mod


def _sizes(a: Checked) -> tuple[int, int, int, int, int, int]:
    """T, N, C, H (the cell's size), R (h's size) and P (the projection's, or 0)."""
    T, N, C, R = a.dims
    H = a.cell_size
    return T, N, C, H, R, (R if a.w_hr is not None else 0)


def forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, training, w_peephole=None,
            w_hr=None, noise=None):  # fmt: skip
    """The GPU side of rnnfast.ops' forward: returns (y, h_n, c_n or None, CudaContext)."""
    mod = _module()
    cupy = _cupy()
    device = cupy.cuda.Device(_as_cupy(cupy, "x", x).device.id)
    with device:
        a = _check_forward(cupy, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, w_peephole,
                           w_hr)  # fmt: skip
        T, N, C, H, R, P = _sizes(a)
        dt = a.x.dtype
        stream = cupy.cuda.get_current_stream()
        reserve = None
        if training:
            acc = _acc_dtype(cupy, dt)
            nbytes = mod.reserve_bytes(cell, dt.name, T, N, C, H, P)
            reserve = cupy.empty(nbytes // acc.itemsize, dtype=acc)
        if reserve is not None and reserve.dtype == dt:
            at = mod.reserve_layout(cell, T, N, C, H, P)["hs"]  # y is a view of the reserve
            hseq = reserve[at : at + (T + 1) * N * R].reshape(T + 1, N, R)
        else:
            hseq = cupy.empty((T + 1, N, R), dtype=dt)
        h_n = cupy.empty((N, R), dtype=dt)
        c_n = cupy.empty((N, H), dtype=dt) if cell_spec(cell).has_c else None
        variational = noise is not None and noise.variational > 0
        ws = cupy.empty(
            mod.forward_workspace_bytes(cell, dt.name, T, N, C, H, training, P, variational),
            cupy.uint8,
        )
        mod.forward(
            cell, dt.name, T, N, C, H,
            x=_ptr(a.x), w_ih=_ptr(a.w_ih), w_hh=_ptr(a.w_hh), b_ih=_ptr(a.b_ih),
            b_hh=_ptr(a.b_hh), h0=_ptr(a.h0), c0=_ptr(a.c0), lengths=_ptr(a.lengths),
            hseq=_ptr(hseq), h_n=_ptr(h_n), c_n=_ptr(c_n), reserve=_ptr(reserve),
            workspace=_ptr(ws), stream=stream.ptr, device=device.id, tf32=_options["tf32"],
            persistent=_PERSISTENT[_options["persistent"]], w_peephole=_ptr(a.w_peephole), P=P,
            w_hr=_ptr(a.w_hr), noise=None if noise is None else tuple(noise),
        )  # fmt: skip
        return hseq[1:], h_n, c_n, CudaContext(cell, a, reserve, hseq, noise)


def backward(cell, ctx, dy, dh_n, dc_n):
    """The GPU side of rnnfast.ops' backward: the gradients as a dict of CuPy arrays."""
    check_context(cell, ctx, CudaContext, "rnnfast.ops")
    mod = _module()
    cupy = _cupy()
    a = ctx.inputs
    T, N, C, H, R, P = _sizes(a)
    dt = a.x.dtype
    spec = cell_spec(cell)
    G = spec.gates
    device = cupy.cuda.Device(a.x.device.id)
    with device:
        dy, dh_n, dc_n = check_backward_inputs(cell, a, dy, dh_n, dc_n,
                                               array=functools.partial(_checked, cupy))  # fmt: skip
        stream = cupy.cuda.get_current_stream()
        dx = cupy.empty((T, N, C), dtype=dt)
        dh0 = cupy.empty((N, R), dtype=dt)
        dc0 = cupy.empty((N, H), dtype=dt) if spec.has_c else None
        dw_ih = cupy.empty((G * H, C), dtype=dt)
        dw_hh = cupy.empty((G * H, R), dtype=dt)
        dw_hr = cupy.empty((P, H), dtype=dt) if P else None
        db_ih = None if a.b_ih is None else cupy.empty((G * H,), dtype=dt)
        db_hh = None if a.b_hh is None else cupy.empty((G * H,), dtype=dt)
        dw_peephole = None if a.w_peephole is None else cupy.empty((3, H), dtype=dt)
        noise = ctx.noise
        variational = noise is not None and noise.variational > 0
        ws = cupy.empty(
            mod.backward_workspace_bytes(cell, dt.name, T, N, C, H, P, variational), cupy.uint8
        )
        mod.backward(
            cell, dt.name, T, N, C, H,
            x=_ptr(a.x), w_ih=_ptr(a.w_ih), w_hh=_ptr(a.w_hh), lengths=_ptr(a.lengths),
            reserve=_ptr(ctx.reserve), hseq=_ptr(ctx.hseq), dy=_ptr(dy), dh_n=_ptr(dh_n),
            dc_n=_ptr(dc_n), dx=_ptr(dx), dh0=_ptr(dh0), dc0=_ptr(dc0), dw_ih=_ptr(dw_ih),
            dw_hh=_ptr(dw_hh), db_ih=_ptr(db_ih), db_hh=_ptr(db_hh), workspace=_ptr(ws),
            stream=stream.ptr, device=device.id, tf32=_options["tf32"],
            persistent=_PERSISTENT[_options["persistent"]], w_peephole=_ptr(a.w_peephole),
            dw_peephole=_ptr(dw_peephole), P=P, w_hr=_ptr(a.w_hr), dw_hr=_ptr(dw_hr),
            noise=None if noise is None else tuple(noise),
        )  # fmt: skip
    grads = {"dx": dx, "dh0": dh0, "dc0": dc0, "dw_ih": dw_ih, "dw_hh": dw_hh, "db_ih": db_ih,
             "db_hh": db_hh, "dw_peephole": dw_peephole, "dw_hr": dw_hr}  # fmt: skip
    return {k: grads[k] for k in spec.grads_of(a.w_peephole is not None, P > 0)}
