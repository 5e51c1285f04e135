"""Loads the BLAS that the extension links against before the extension itself.

The extension finds libscipy_openblas through a relative rpath in an ordinary install; loading
it here by absolute path also covers user-site and other split layouts.
"""

import ctypes
import os


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= set(line.split())
    except OSError:
        pass
    return False


def preload() -> None:
    # This OpenBLAS instance is rnnfast's alone (NumPy and SciPy bundle their own), so it picks
    # its kernels for itself: its run-time dispatch misreads some AVX-512 machines, and an
    # OPENBLAS_CORETYPE set for NumPy's copy (Haswell on our CI machines) would halve its speed
    # (bench/RESULTS.md). RNNFAST_OPENBLAS_CORETYPE overrides: a core name, or "auto".
    # Under RNNFAST_ISA (a cap on the kernels' instruction set) it takes the matching core, so
    # that RNNFAST_ISA=baseline runs no AVX instruction anywhere in rnnfast.
    choice = os.environ.get("RNNFAST_OPENBLAS_CORETYPE", "auto")
    capped = {"baseline": "Prescott", "avx2": "Haswell"}.get(os.environ.get("RNNFAST_ISA", ""))
    auto = capped or ("SkylakeX" if _has_avx512() else None)
    coretype = auto if choice.lower() == "auto" else choice
    # it runs single-threaded inside the kernels' OpenMP team: no idle worker pool of its own
    wanted = {"OPENBLAS_NUM_THREADS": "1"}
    if coretype is not None:
        wanted["OPENBLAS_CORETYPE"] = coretype
    saved = {k: os.environ.get(k) for k in wanted}
    try:
        os.environ.update(wanted)
        try:
            import scipy_openblas32  # loads the library, reading OPENBLAS_CORETYPE once
        except ImportError as e:  # a broken install: say which package is missing
            raise ImportError(
                "rnnfast needs the scipy-openblas32 package, which installing rnnfast brings: "
                "run `pip install .` in a source checkout (or pip install scipy-openblas32)"
            ) from e
        path = os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(True))
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
