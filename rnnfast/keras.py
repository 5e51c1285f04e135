"""Weights from Keras: ``rnnfast.keras.load_weights(layer, weights)`` copies what
``keras.layers.LSTM(...).get_weights()`` or ``keras.layers.GRU(...).get_weights()`` returns into an
rnnfast layer of one direction and one layer (or ``layer_index``/``reverse`` of a stack, for
Keras's stacked or Bidirectional models). Keras itself is not needed: the arrays are enough.

Keras keeps ``kernel`` (C, G*H) and ``recurrent_kernel`` (H, G*H), the transposes of torch's
layout, in its own gate order: LSTM i, f, c, o (the same as torch's i, f, g, o) and GRU z, r, h
(torch's is r, z, n). Its LSTM has one bias (4H,), loaded as b_ih with b_hh zero; its GRU with
``reset_after=True`` (Keras's default) has a bias (2, 3H), the input and the recurrent one, and
with ``reset_after=False`` one (3H,), for ``rnnfast.GRU(..., reset_after=False)``. Keras's GRU
updates h = z h_{t-1} + (1 - z) h~, as torch's does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import layers as _layers

__all__ = ["load_weights"]


def _gru_blocks(a: np.ndarray, H: int) -> np.ndarray:
    """Keras's GRU blocks z, r, h along axis 0 in rnnfast's order r, z, n."""
    return np.concatenate([a[H : 2 * H], a[:H], a[2 * H :]])


def load_weights(layer: _layers._Recurrent, weights: Sequence[np.ndarray], *,
                 layer_index: int = 0, reverse: bool = False) -> None:  # fmt: skip
    """Copies Keras's ``[kernel, recurrent_kernel, bias]`` into one layer and direction of an
    rnnfast LSTM or GRU, in place; ValueError naming the array for a shape that does not fit."""
    if not isinstance(layer, (_layers.LSTM, _layers.GRU)):
        raise TypeError(f"load_weights takes an rnnfast LSTM or GRU, got {type(layer).__name__}")
    if layer.proj_size or layer.peephole or getattr(layer, "coupled_input_forget", False):
        raise ValueError("Keras's LSTM has no projection, peepholes or coupled gates")
    if not 0 <= layer_index < layer.num_layers:
        raise ValueError(f"layer_index must be in [0, {layer.num_layers}), got {layer_index}")
    if reverse and not layer.bidirectional:
        raise ValueError("reverse=True needs a bidirectional layer")
    weights = [np.asarray(w) for w in weights]
    want_arrays = 3 if layer.bias else 2  # Keras's use_bias=False gives no bias array
    if len(weights) != want_arrays:
        raise ValueError(
            f"expected {want_arrays} arrays ([kernel, recurrent_kernel"
            f"{', bias' if layer.bias else ''}] for a layer with bias={layer.bias}), got "
            f"{len(weights)}"
        )
    kernel, recurrent = weights[0], weights[1]
    bias = weights[2] if len(weights) == 3 else None
    G, H = layer.spec.gates, layer.hidden_size
    suffix = layer._suffixes(layer_index)[1 if reverse else 0]
    w_ih, w_hh = layer.params["weight_ih" + suffix], layer.params["weight_hh" + suffix]
    for name, a, want in (("kernel", kernel, w_ih.shape[::-1]),
                          ("recurrent_kernel", recurrent, w_hh.shape[::-1])):  # fmt: skip
        if a.shape != want:
            raise ValueError(f"{name} has shape {a.shape}; this layer needs {want}")
    gru = layer.spec.family == "gru"
    if gru:
        reset_after = layer.spec.name == "gru"
        want = (2, G * H) if reset_after else (G * H,)
        if bias is not None and bias.shape != want:
            raise ValueError(
                f"bias has shape {bias.shape}; a GRU with reset_after={reset_after} takes {want} "
                f"(Keras's reset_after={reset_after})"
            )
    elif bias is not None and bias.shape != (G * H,):
        raise ValueError(f"bias has shape {bias.shape}; this LSTM needs ({G * H},)")
    order = (lambda a: _gru_blocks(a, H)) if gru else (lambda a: a)
    new = {"weight_ih": order(kernel.T), "weight_hh": order(recurrent.T)}
    if layer.bias:
        if gru and bias.ndim == 2:
            new["bias_ih"], new["bias_hh"] = order(bias[0]), order(bias[1])
        else:
            new["bias_ih"], new["bias_hh"] = order(bias), np.zeros(G * H)
    for name, value in new.items():
        layer.params[name + suffix][...] = value
