"""Export rnnfast's recurrent layers to ONNX, ``rnnfast.onnx.export(layer, "model.onnx")``, and
load ONNX LSTM/GRU/RNN nodes' weights back, ``rnnfast.onnx.load_weights(layer, "model.onnx")``.

Each layer of the stack becomes one ONNX LSTM, GRU or RNN node (both directions in one node),
with the gates reordered to ONNX's (LSTM i, o, f, c; GRU z, r, h), the GRU's reset placement as
``linear_before_reset``, the coupled-gate LSTM as ``input_forget``, peepholes as ``P``, and
``sequence_lens`` for exact lengths. The graph takes ``x`` (T, N, C) float32 and optionally
``lengths`` (N,) int32, and returns ``y`` (T, N, D*H), ``h_n`` (L*D, N, H) and, for the LSTM,
``c_n``: what the layer returns. Runs in onnxruntime (tests/test_onnx.py checks it against the
layer). Not exportable: a projection (ONNX has none), layer norm, recurrent dropout and zoneout
(training-time noise; eval-mode zoneout scales h, which ONNX's nodes cannot), a learned initial
state. Needs the onnx package (the ``bench`` and ``test`` extras).
"""

from __future__ import annotations

import os

import numpy as np

from . import layers as _layers

__all__ = ["export", "load_weights", "ONNX_GATE_BLOCKS"]

# ONNX's gate blocks as blocks of ours: LSTM i, o, f, c (ours i, f, g, o; coupled i, g, o, with
# ONNX's unused f), GRU z, r, h (ours r, z, n); a None block is unused by ONNX
ONNX_GATE_BLOCKS = {"lstm": [0, 3, 1, 2], "lstm_cifg": [0, 2, None, 1], "gru": [1, 0, 2],
                    "gru_reset_before": [1, 0, 2], "rnn_tanh": [0], "rnn_relu": [0]}  # fmt: skip


def onnx_blocks(a: np.ndarray, cell: str, H: int) -> np.ndarray:
    """a's gate blocks ((G*H, ...) or (G*H,)) in ONNX's order; an unused block is zeros."""
    blocks = [np.zeros_like(a[:H]) if b is None else a[b * H : (b + 1) * H]
              for b in ONNX_GATE_BLOCKS[cell]]  # fmt: skip
    return np.concatenate(blocks)


def export(layer: _layers._Recurrent, path: str | os.PathLike, *, opset: int = 14) -> None:
    """Writes ``layer`` (rnnfast.LSTM, GRU or RNN, any depth and direction) as an ONNX model."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:
        raise ImportError("rnnfast.onnx needs the onnx package: pip install onnx") from e
    if not isinstance(layer, _layers._Recurrent):
        raise TypeError(f"export takes an rnnfast LSTM, GRU or RNN, got {type(layer).__name__}")
    options = {"proj_size": layer.proj_size, "layer_norm": layer.layer_norm,
               "recurrent_dropout": layer.recurrent_dropout, "zoneout": layer.zoneout,
               "learn_initial_state": layer.learn_initial_state}  # fmt: skip
    refused = [what for what, on in options.items() if on]
    if refused:
        raise ValueError(f"ONNX's recurrent nodes cannot express {', '.join(refused)}")
    cell, H, L, D = layer.spec.name, layer.hidden_size, layer.num_layers, layer.num_directions
    op = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[layer.spec.family]
    p, G = layer.params, len(ONNX_GATE_BLOCKS[cell])
    f32 = np.float32
    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    inp = "x"
    h_outs, c_outs = [], []
    for k in range(L):
        suffixes = layer._suffixes(k)
        W = np.stack([onnx_blocks(p["weight_ih" + s], cell, H) for s in suffixes]).astype(f32)
        R = np.stack([onnx_blocks(p["weight_hh" + s], cell, H) for s in suffixes]).astype(f32)
        if layer.bias:
            B = np.stack([np.concatenate([onnx_blocks(p[b + s], cell, H)
                                          for b in ("bias_ih", "bias_hh")])
                          for s in suffixes]).astype(f32)  # fmt: skip
        else:
            B = np.zeros((D, 2 * G * H), f32)
        inputs = [inp, const(f"W{k}", W), const(f"R{k}", R), const(f"B{k}", B), "lengths"]
        attrs = {"hidden_size": H, "direction": "bidirectional" if D == 2 else "forward"}
        if op == "LSTM":
            inputs += ["", ""]
            if layer.peephole:  # ours rows i, f, o; ONNX's P is i, o, f
                P = np.stack([p["weight_peephole" + s][[0, 2, 1]].reshape(-1)
                              for s in suffixes]).astype(f32)  # fmt: skip
                inputs.append(const(f"P{k}", P))
            attrs["input_forget"] = int(cell == "lstm_cifg")
        elif op == "GRU":
            attrs["linear_before_reset"] = int(cell == "gru")
        else:
            attrs["activations"] = ["Relu" if cell == "rnn_relu" else "Tanh"] * D
        outs = [f"Y{k}", f"h{k}"] + ([f"c{k}"] if op == "LSTM" else [])
        nodes.append(helper.make_node(op, inputs, outs, name=f"{op.lower()}{k}", **attrs))
        h_outs.append(f"h{k}")
        if op == "LSTM":
            c_outs.append(f"c{k}")
        # Y (T, D, N, H) -> (T, N, D*H), the next layer's input and the output
        nodes.append(helper.make_node("Transpose", [f"Y{k}"], [f"Yt{k}"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [f"Yt{k}", const(f"shape{k}",
                                      np.array([0, 0, -1], np.int64))], [f"y{k}"]))  # fmt: skip
        inp = f"y{k}"
    nodes.append(helper.make_node("Identity", [inp], ["y"]))
    nodes.append(helper.make_node("Concat", h_outs, ["h_n"], axis=0))
    outputs = ["y", "h_n"]
    if op == "LSTM":
        nodes.append(helper.make_node("Concat", c_outs, ["c_n"], axis=0))
        outputs.append("c_n")
    C = layer.input_size
    graph = helper.make_graph(
        nodes, f"rnnfast_{cell}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "N", C]),
         helper.make_tensor_value_info("lengths", TensorProto.INT32, ["N"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
         for n, shape in zip(outputs, (["T", "N", D * H], [L * D, "N", H], [L * D, "N", H]),
                             strict=False)],
        initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="rnnfast")  # fmt: skip
    onnx.checker.check_model(model)
    onnx.save(model, os.fspath(path))


def _from_onnx_blocks(a: np.ndarray, cell: str, H: int) -> np.ndarray:
    """The inverse of onnx_blocks: ONNX's gate blocks back in rnnfast's order."""
    order = ONNX_GATE_BLOCKS[cell]
    ours = [None] * sum(b is not None for b in order)
    for position, b in enumerate(order):
        if b is not None:
            ours[b] = a[position * H : (position + 1) * H]
    return np.concatenate(ours)


def load_weights(layer: _layers._Recurrent, path: str | os.PathLike) -> None:
    """Copies the weights of an ONNX model's LSTM, GRU or RNN nodes into ``layer``, in place: the
    k-th such node (in graph order) into layer k of the stack (both directions), with the gate
    blocks reordered back; the node's hidden size, direction, GRU reset placement and coupled
    gates must match the layer's (ValueError naming what differs)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise ImportError("rnnfast.onnx needs the onnx package: pip install onnx") from e
    model = onnx.load(os.fspath(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    op = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[layer.spec.family]
    nodes = [n for n in model.graph.node if n.op_type == op]
    if len(nodes) != layer.num_layers:
        raise ValueError(f"{os.fspath(path)!r} has {len(nodes)} {op} nodes; the layer has "
                         f"{layer.num_layers} layers")  # fmt: skip
    cell, H, D = layer.spec.name, layer.hidden_size, layer.num_directions
    for k, node in enumerate(nodes):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        direction = attrs.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        checks = [("hidden_size", attrs.get("hidden_size"), H),
                  ("direction", direction, "bidirectional" if D == 2 else "forward")]  # fmt: skip
        if op == "GRU":
            checks.append(("linear_before_reset", attrs.get("linear_before_reset", 0),
                           int(cell == "gru")))  # fmt: skip
        if op == "LSTM":
            checks.append(("input_forget", attrs.get("input_forget", 0), int(cell == "lstm_cifg")))
        for name, got, want in checks:
            if got != want:
                raise ValueError(f"node {node.name or k}: {name} is {got!r}, the layer needs "
                                 f"{want!r}")  # fmt: skip
        names = list(node.input) + [""] * 8
        try:
            W, R = inits[names[1]], inits[names[2]]
        except KeyError as e:
            raise ValueError(f"node {node.name or k}: its weights are not initializers") from e
        B = inits.get(names[3])
        P = inits.get(names[7]) if op == "LSTM" else None
        if P is not None and not layer.peephole:
            raise ValueError(f"node {node.name or k} has peepholes; build the layer with "
                             "peephole=True")  # fmt: skip
        for d, s in enumerate(layer._suffixes(k)):
            updates = {"weight_ih": _from_onnx_blocks(W[d], cell, H),
                       "weight_hh": _from_onnx_blocks(R[d], cell, H)}  # fmt: skip
            if layer.bias:
                half = B.shape[1] // 2 if B is not None else 0
                zero = np.zeros(layer.params["bias_ih" + s].shape)
                updates["bias_ih"] = zero if B is None else _from_onnx_blocks(B[d, :half], cell, H)
                updates["bias_hh"] = zero if B is None else _from_onnx_blocks(B[d, half:], cell, H)
            if layer.peephole:
                # ONNX's P is i, o, f; ours rows i, f, o
                updates["weight_peephole"] = (np.zeros((3, H)) if P is None
                                              else P[d].reshape(3, H)[[0, 2, 1]])  # fmt: skip
            for name, value in updates.items():
                target = layer.params[name + s]
                if value.shape != target.shape:
                    raise ValueError(f"node {node.name or k}: {name} has shape {value.shape}, "
                                     f"the layer's is {target.shape}")  # fmt: skip
                target[...] = value
