"""rnnfast.onnx.export: every exportable cell, stacked and bidirectional with lengths, run in
onnxruntime, gives what the layer gives; what ONNX cannot express is refused."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close

import rnnfast
import rnnfast.onnx

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

LAYERS = {
    "lstm": lambda: rnnfast.LSTM(5, 6, num_layers=2, bidirectional=True, seed=0),
    "lstm_peephole": lambda: rnnfast.LSTM(5, 6, num_layers=2, peephole=True, seed=1),
    "lstm_cifg": lambda: rnnfast.LSTM(
        5, 6, coupled_input_forget=True, peephole=True, bidirectional=True, seed=2
    ),
    "gru": lambda: rnnfast.GRU(5, 6, num_layers=2, bidirectional=True, seed=3),
    "gru_reset_before": lambda: rnnfast.GRU(5, 6, reset_after=False, bidirectional=True, seed=4),
    "rnn_relu": lambda: rnnfast.RNN(5, 6, nonlinearity="relu", num_layers=2, seed=5),
    "rnn_tanh_nobias": lambda: rnnfast.RNN(5, 6, bias=False, bidirectional=True, seed=6),
}


@pytest.mark.parametrize("name", LAYERS)
def test_export_runs_in_onnxruntime_as_the_layer(name, tmp_path):
    layer = LAYERS[name]().eval()
    rng = np.random.default_rng(0)
    for p in layer.params.values():  # away from the init's scale, so every weight matters
        p[...] = rng.uniform(-0.6, 0.6, p.shape)
    x = rng.standard_normal((7, 4, 5)).astype(np.float32)
    lengths = np.array([7, 2, 5, 1], np.int32)
    rnnfast.onnx.export(layer, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x, "lengths": lengths})
    y, state = layer(x, lengths=lengths)
    want = [y, *state] if isinstance(state, tuple) else [y, state]
    for g, w, what in zip(got, want, ["y", "h_n", "c_n"], strict=False):
        assert_close(g, w, 2e-5, 2e-5, what)


def test_what_onnx_cannot_express_is_refused(tmp_path):
    with pytest.raises(ValueError, match="proj_size"):
        rnnfast.onnx.export(rnnfast.LSTM(4, 6, proj_size=2), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="layer_norm, zoneout"):
        rnnfast.onnx.export(rnnfast.LSTM(4, 6, layer_norm=True, zoneout=0.1), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="LSTM, GRU or RNN"):
        rnnfast.onnx.export(rnnfast.Linear(2, 2), tmp_path / "m.onnx")


@pytest.mark.parametrize("name", LAYERS)
def test_weights_come_back_from_onnx(name, tmp_path):
    layer = LAYERS[name]()
    rnnfast.onnx.export(layer, tmp_path / "m.onnx")
    fresh = LAYERS[name]()
    for p in fresh.params.values():
        p[...] = 0
    rnnfast.onnx.load_weights(fresh, tmp_path / "m.onnx")
    for k, v in layer.params.items():  # exact to float32 (ONNX's storage)
        assert_close(fresh.params[k], v, 1e-7, 0, k)


def test_loading_into_a_layer_that_does_not_fit(tmp_path):
    rnnfast.onnx.export(rnnfast.GRU(5, 6, num_layers=2), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="linear_before_reset is 1, the layer needs 0"):
        rnnfast.onnx.load_weights(rnnfast.GRU(5, 6, num_layers=2, reset_after=False),
                                  tmp_path / "m.onnx")  # fmt: skip
    with pytest.raises(ValueError, match="2 GRU nodes; the layer has 1"):
        rnnfast.onnx.load_weights(rnnfast.GRU(5, 6), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="hidden_size is 6, the layer needs 7"):
        rnnfast.onnx.load_weights(rnnfast.GRU(5, 7, num_layers=2), tmp_path / "m.onnx")
