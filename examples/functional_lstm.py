"""The fused LSTM as a function: forward over padded variable-length sequences, backward, and the
float64 reference agreeing with it. python examples/functional_lstm.py"""

import numpy as np

import rnnfast

rng = np.random.default_rng(0)
T, N, C, H = 30, 8, 16, 64
x = rng.standard_normal((T, N, C)).astype(np.float32)
w_ih = (rng.standard_normal((4 * H, C)) * 0.1).astype(np.float32)  # torch's layout: i, f, g, o
w_hh = (rng.standard_normal((4 * H, H)) * 0.1).astype(np.float32)
lengths = rng.integers(0, T + 1, size=N)  # 0 allowed: that row keeps its initial state

y, h_n, c_n, ctx = rnnfast.lstm_forward(x, w_ih, w_hh, lengths=lengths)
grads = rnnfast.lstm_backward(ctx, dy=np.ones_like(y))

ry, rh, rc, rctx = rnnfast.reference.lstm_forward(
    x.astype(np.float64), w_ih.astype(np.float64), w_hh.astype(np.float64), lengths=lengths
)
rgrads = rnnfast.reference.lstm_backward(rctx, dy=np.ones_like(ry))
print(f"y {y.shape}, max |y - reference| = {np.abs(y - ry).max():.2e}")
print(f"dw_hh max |error| = {np.abs(grads['dw_hh'] - rgrads['dw_hh']).max():.2e}")
assert np.abs(y - ry).max() < 1e-4
