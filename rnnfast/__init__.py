"""rnnfast: fused recurrent-network kernels (RNN, LSTM, GRU) with a NumPy-native API."""

import os as _os

import numpy as _np

from ._blas import preload as _preload_blas

# libgomp's threads spin ~300k rounds (over 10 ms) after every parallel region before sleeping;
# between kernel calls they then starve NumPy's own BLAS threads (3-10x slower training steps on
# 2 cores). A short spin still covers the microseconds between the steps inside a kernel. Read
# once, when libgomp loads with the extension; an explicit setting of either variable wins.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = "10000"

# read once by the extension: a value it does not know would silently mean "no cap"
_isa = _os.environ.get("RNNFAST_ISA")
if _isa is not None and _isa not in ("baseline", "avx2", "avx512", "amx"):
    raise ValueError(
        f"RNNFAST_ISA must be 'baseline', 'avx2', 'avx512' or 'amx' (the widest instruction set "
        f"the kernels may use), got {_isa!r}"
    )


def _installed_extension_dir() -> str | None:
    """The installed rnnfast's package folder, when this one (a source checkout) has no build."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        folder = _os.path.realpath(str(distribution("rnnfast").locate_file("rnnfast")))
    except (ImportError, PackageNotFoundError):
        return None
    here = _os.path.realpath(_os.path.dirname(__file__))
    return folder if folder != here and _os.path.isdir(folder) else None


def _has_extension() -> bool:
    """Whether a compiled _C exists here or in an installed rnnfast (checked before the BLAS,
    whose absence in an uninstalled checkout would otherwise be the error a user sees)."""
    import importlib.machinery

    folders = [_os.path.dirname(__file__), _installed_extension_dir()]
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return any(
        f and any(n.startswith("_C.") and n.endswith(suffixes) for n in _os.listdir(f))
        for f in folders
    )


if not _has_extension():
    raise ImportError(
        f"rnnfast's compiled extension _C is missing from {_os.path.dirname(__file__)} and no "
        "installed build was found: run `pip install .` (or `pip install -e .`) first"
    )

_preload_blas()

# read by the extension when it first allocates; a value it cannot use is an error here, not a
# silently unbounded (-1) or disabled (abc) cache
_cache_mb = _os.environ.get("RNNFAST_SCRATCH_CACHE_MB", "").strip()
if _cache_mb and not _cache_mb.isdigit():
    raise ValueError(
        f"RNNFAST_SCRATCH_CACHE_MB must be a whole number of MiB >= 0, got {_cache_mb!r}"
    )


try:
    from . import _C  # noqa: E402
except ImportError as e:
    # Run inside a source checkout (`python -m rnnfast`, `python -m pytest`), this folder shadows
    # the installed package and has no compiled extensions: take them from the install.
    _installed = _installed_extension_dir()
    if _installed is None:
        raise ImportError(
            f"rnnfast's compiled extension _C is missing from {_os.path.dirname(__file__)} and no "
            "installed build was found: run `pip install .` (or `pip install -e .`) first"
        ) from e
    __path__.append(_installed)
    from . import _C  # noqa: E402

from . import cuda, ops, reference  # noqa: E402
from .cuda import cuda_available  # noqa: E402
from .ops import (  # noqa: E402
    bfloat16_supported,
    gru_backward,
    gru_forward,
    lstm_backward,
    lstm_forward,
    rnn_backward,
    rnn_forward,
)

__version__ = _C.__version__


def build_info() -> dict:
    """What this build really contains: version, compiler, OpenMP and threads, BLAS, SIMD, CUDA."""
    info = dict(_C.build_info())
    info["cuda"] = cuda.build_info()
    return info


def _whole_number(what: str, value, minimum: int) -> int:
    """value as an int >= minimum, for an int or a NumPy integer only (not a float, a str or a
    bool, which int() would quietly convert)."""
    if isinstance(value, (bool, _np.bool_)) or not isinstance(value, (int, _np.integer)):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


def set_num_threads(n: int) -> None:
    """Threads the CPU kernels use (default: the OpenMP default, one per core).

    Raises RuntimeError when the system cannot start that many threads (OpenMP would end the
    process instead), and in a child forked after a multi-threaded kernel call, where the kernels
    run on one thread: OpenMP's threads do not survive fork."""
    _C.set_num_threads(_whole_number("set_num_threads' n", n, 1))


def get_num_threads() -> int:
    return int(_C.get_num_threads())


def set_scratch_cache_limit(nbytes: int) -> None:
    """Bound the CPU kernels' scratch cache (default 1 GiB, or $RNNFAST_SCRATCH_CACHE_MB).

    Large scratch buffers (packed weights, input projections, gate gradients) are kept after a
    call and reused by the next one, which saves the kernel re-faulting and zeroing them; 0 turns
    the cache off and frees what it holds. `scratch_cache_bytes()` says what it holds now."""
    _C.set_scratch_cache_limit(_whole_number("set_scratch_cache_limit's nbytes", nbytes, 0))


def scratch_cache_bytes() -> int:
    """Bytes of freed scratch the CPU kernels hold for reuse."""
    return int(_C.scratch_cache_bytes())


def empty_cache() -> None:
    """Free the CPU kernels' cached scratch now, keeping the cache's limit."""
    limit = int(_C.scratch_cache_limit())
    _C.set_scratch_cache_limit(0)
    _C.set_scratch_cache_limit(limit)


__all__ = [
    "bfloat16_supported",
    "build_info",
    "cuda",
    "cuda_available",
    "empty_cache",
    "get_num_threads",
    "gru_backward",
    "gru_forward",
    "lstm_backward",
    "lstm_forward",
    "ops",
    "reference",
    "rnn_backward",
    "rnn_forward",
    "scratch_cache_bytes",
    "set_num_threads",
    "set_scratch_cache_limit",
]

# the training layer (layers, sequences, optimizers, clipping, init, losses, checkpoints)
from . import (  # noqa: E402
    checkpoint,
    clip,
    init,
    layers,
    losses,
    lr_scheduler,
    optim,
    sequences,
    training,
)
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from .layers import (  # noqa: E402
    GRU,
    LSTM,
    RNN,
    Attention,
    Embedding,
    GRUCell,
    Linear,
    LSTMCell,
    Module,
    Parameter,
    RNNCell,
    Sequential,
)

__all__ += [
    "Attention",
    "GRU",
    "GRUCell",
    "LSTM",
    "LSTMCell",
    "Module",
    "Parameter",
    "RNN",
    "RNNCell",
    "Sequential",
    "Embedding",
    "Linear",
    "checkpoint",
    "clip",
    "init",
    "layers",
    "load_checkpoint",
    "losses",
    "lr_scheduler",
    "optim",
    "save_checkpoint",
    "sequences",
    "training",
]
