"""Loads the BLAS that the extension links against before the extension itself.

The extension finds libscipy_openblas through a relative rpath in an ordinary install; loading
it here by absolute path also covers user-site and other split layouts.
"""

import ctypes
import os


def preload() -> None:
    try:
        import scipy_openblas32
    except ImportError as e:  # a broken install: say which package is missing
        raise ImportError(
            "rnnfast needs the scipy-openblas32 package (pip install scipy-openblas32)"
        ) from e
    path = os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(True))
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
