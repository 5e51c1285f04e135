"""A NumPy stand-in for CuPy, for checking rnnfast.cuda against a host emulation of _cuda."""

from types import SimpleNamespace

import numpy as np

__version__ = "emu"


class ndarray(np.ndarray):
    @property
    def data(self):
        return SimpleNamespace(ptr=self.__array_interface__["data"][0])

    @property
    def device(self):
        return SimpleNamespace(id=0)

    @property
    def __cuda_array_interface__(self):
        return {"emulated": True}


def _wrap(a):
    return np.asarray(a).view(ndarray)


def _poisoned(a):
    if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
        a[...] = np.nan
    elif a.dtype == np.uint8:
        a[...] = 0xFF
    return a


def asarray(a, dtype=None):
    return _wrap(np.array(np.asarray(a), dtype=dtype, copy=True))


def asnumpy(a):
    return np.array(np.asarray(a))


def empty(shape, dtype=np.float64):
    return _poisoned(np.empty(shape, dtype).view(ndarray))


def zeros(shape, dtype=np.float64):
    return _wrap(np.zeros(shape, dtype))


def ones(shape, dtype=np.float64):
    return _wrap(np.ones(shape, dtype))


def full(shape, v, dtype=np.float64):
    return _wrap(np.full(shape, v, dtype))


def ones_like(a):
    return _wrap(np.ones_like(np.asarray(a)))


def ascontiguousarray(a):
    return _wrap(np.ascontiguousarray(np.asarray(a)))


def from_dlpack(a):
    return _wrap(np.from_dlpack(a))


dtype = np.dtype
float16, float32, float64, uint8 = np.float16, np.float32, np.float64, np.uint8


class _Device:
    def __init__(self, id=0):
        self.id = id
        self.compute_capability = "90"

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class _Stream:
    def __init__(self, non_blocking=False):
        self.ptr = 0

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def synchronize(self):
        pass


cuda = SimpleNamespace(
    Device=_Device,
    Stream=_Stream,
    get_current_stream=lambda: _Stream(),
    runtime=SimpleNamespace(getDeviceCount=lambda: 1),
)
