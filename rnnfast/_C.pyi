"""Type stub of the private extension rnnfast._C (use rnnfast.ops; it checks every argument)."""

import numpy as np
from numpy.typing import NDArray

__version__: str

_Forward = tuple[NDArray, NDArray, NDArray | None, NDArray | None]
_Backward = tuple[
    NDArray,
    NDArray,
    NDArray | None,
    NDArray,
    NDArray,
    NDArray | None,
    NDArray | None,
    NDArray | None,
]

def _forward(
    x: NDArray,
    w_ih: NDArray,
    w_hh: NDArray,
    b_ih: NDArray | None,
    b_hh: NDArray | None,
    h0: NDArray | None,
    c0: NDArray | None,
    lengths: NDArray[np.int32] | None,
    training: bool,
    bf16: bool = False,
    w_peephole: NDArray | None = None,
    w_hr: NDArray | None = None,
    noise: tuple | None = None,
    ln: tuple | None = None,
) -> _Forward: ...
def _backward(
    x: NDArray,
    w_ih: NDArray,
    w_hh: NDArray,
    has_b_ih: bool,
    has_b_hh: bool,
    lengths: NDArray[np.int32] | None,
    reserve: NDArray,
    dy: NDArray | None,
    dh_n: NDArray | None,
    dc_n: NDArray | None,
    w_peephole: NDArray | None = None,
    w_hr: NDArray | None = None,
    noise: tuple | None = None,
    ln: tuple | None = None,
    bf16: bool = False,
) -> _Backward: ...

# (y, h_n, c_n or None, reserve or None); y is a view of the reserve in training
lstm_forward = _forward
gru_forward = _forward
rnn_tanh_forward = _forward
rnn_relu_forward = _forward
lstm_cifg_forward = _forward
gru_reset_before_forward = _forward
# (dx, dh0, dc0 or None, dw_ih, dw_hh, db_ih or None, db_hh or None, dw_peephole or None)
lstm_backward = _backward
gru_backward = _backward
rnn_tanh_backward = _backward
rnn_relu_backward = _backward
lstm_cifg_backward = _backward
gru_reset_before_backward = _backward

def build_info() -> dict[str, object]: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def set_scratch_cache_limit(bytes: int) -> None: ...
def scratch_cache_limit() -> int: ...
def scratch_cache_bytes() -> int: ...
def cell_table() -> list[dict[str, object]]: ...
def gemm(
    a: NDArray,
    b: NDArray,
    out: NDArray,
    trans_a: bool = False,
    trans_b: bool = False,
    accumulate: bool = False,
    bf16: bool = False,
) -> None: ...

# (out, the fastest call's seconds): out = a w^T (+ a2 w2^T, w2 stacked under w) through the step
# product's kernels
def step_product(
    a: NDArray[np.float32],
    w: NDArray[np.float32],
    out: NDArray[np.float32],
    bf16: bool = False,
    rows: int = 0,
    repeats: int = 1,
    accumulate: bool = False,
    a2: NDArray[np.float32] | None = None,
    w2: NDArray[np.float32] | None = None,
) -> tuple[NDArray[np.float32], float]: ...
def register_peak_flops(kind: str, iterations: int = 2000000) -> float: ...
