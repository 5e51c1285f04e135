"""rnnfast.keras.load_weights against Keras's documented LSTM and GRU equations, written here
in NumPy in Keras's own weight layout (kernel (C, G*H), recurrent_kernel (H, G*H), gate order
LSTM i, f, c, o and GRU z, r, h); keras itself is not needed."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close

import rnnfast
import rnnfast.keras


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def keras_lstm(x, kernel, recurrent, bias):
    T, N, _ = x.shape
    H = recurrent.shape[0]
    h, c, ys = np.zeros((N, H)), np.zeros((N, H)), []
    for t in range(T):
        z = x[t] @ kernel + h @ recurrent + bias
        i, f = _sigmoid(z[:, :H]), _sigmoid(z[:, H : 2 * H])
        g, o = np.tanh(z[:, 2 * H : 3 * H]), _sigmoid(z[:, 3 * H :])
        c = f * c + i * g
        h = o * np.tanh(c)
        ys.append(h)
    return np.stack(ys), h


def keras_gru(x, kernel, recurrent, bias, reset_after):
    T, N, _ = x.shape
    H = recurrent.shape[0]
    b_in, b_rec = (bias[0], bias[1]) if reset_after else (bias, np.zeros_like(bias))
    h, ys = np.zeros((N, H)), []
    for t in range(T):
        xz = x[t] @ kernel + b_in
        if reset_after:  # Keras: r applied to the recurrent product (with its bias)
            hz = h @ recurrent + b_rec
            z = _sigmoid(xz[:, :H] + hz[:, :H])
            r = _sigmoid(xz[:, H : 2 * H] + hz[:, H : 2 * H])
            hh = np.tanh(xz[:, 2 * H :] + r * hz[:, 2 * H :])
        else:  # r applied to h before the product
            z = _sigmoid(xz[:, :H] + h @ recurrent[:, :H])
            r = _sigmoid(xz[:, H : 2 * H] + h @ recurrent[:, H : 2 * H])
            hh = np.tanh(xz[:, 2 * H :] + (r * h) @ recurrent[:, 2 * H :])
        h = z * h + (1 - z) * hh
        ys.append(h)
    return np.stack(ys), h


@pytest.mark.parametrize("kind", ["lstm", "gru_after", "gru_before"])
def test_loaded_layer_computes_keras_formulas(kind):
    rng = np.random.default_rng(0)
    C, H, T, N = 4, 5, 6, 3
    G = 4 if kind == "lstm" else 3
    kernel = rng.uniform(-0.5, 0.5, (C, G * H))
    recurrent = rng.uniform(-0.5, 0.5, (H, G * H))
    x = rng.standard_normal((T, N, C))
    if kind == "lstm":
        bias = rng.uniform(-0.5, 0.5, G * H)
        layer = rnnfast.LSTM(C, H, dtype=np.float64)
        want = keras_lstm(x, kernel, recurrent, bias)
    else:
        after = kind == "gru_after"
        bias = rng.uniform(-0.5, 0.5, (2, G * H) if after else G * H)
        layer = rnnfast.GRU(C, H, reset_after=after, dtype=np.float64)
        want = keras_gru(x, kernel, recurrent, bias, after)
    rnnfast.keras.load_weights(layer.eval(), [kernel, recurrent, bias])
    y, state = layer(x)
    h = state[0] if isinstance(state, tuple) else state
    assert_close(y, want[0], 1e-12, 1e-12, "y")
    assert_close(h[0], want[1], 1e-12, 1e-12, "h_n")


def test_stacks_directions_and_misuse():
    layer = rnnfast.GRU(4, 5, num_layers=2, bidirectional=True)
    k1 = np.ones((10, 15))
    rnnfast.keras.load_weights(layer, [k1, np.ones((5, 15)), np.zeros((2, 15))], layer_index=1,
                               reverse=True)  # fmt: skip
    assert (layer.params["weight_ih_l1_reverse"] == 1).all()
    with pytest.raises(
        ValueError, match=r"kernel has shape \(4, 15\); this layer needs \(10, 15\)"
    ):
        rnnfast.keras.load_weights(layer, [np.ones((4, 15)), np.ones((5, 15)), np.zeros((2, 15))],
                                   layer_index=1)  # fmt: skip
    with pytest.raises(ValueError, match="reset_after=True takes"):
        rnnfast.keras.load_weights(layer, [np.ones((4, 15)), np.ones((5, 15)), np.zeros(15)])
    with pytest.raises(ValueError, match="projection"):
        rnnfast.keras.load_weights(rnnfast.LSTM(4, 5, proj_size=2), [])
