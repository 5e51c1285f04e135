"""The training layer's containers, as torch.nn users expect them: attribute assignment registers
children and parameters, params stay live through nesting, Sequential, and the single-step cells
(LSTMCell, GRUCell, RNNCell) against torch's, with backpropagation through a loop of steps."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close

import rnnfast
from rnnfast import losses


class Encoder(rnnfast.Module):
    def __init__(self):
        super().__init__()
        self.embed = rnnfast.Embedding(7, 4, seed=0)
        self.rnn = rnnfast.LSTM(4, 5, seed=1)


class Model(rnnfast.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.head = rnnfast.Linear(5, 3, seed=2)
        self.scale = rnnfast.Parameter(np.ones(3, dtype=np.float32))


def test_attribute_assignment_registers_children_and_parameters():
    m = Model()
    names = set(m.params)
    assert {"encoder.embed.weight", "encoder.rnn.weight_ih_l0", "head.weight", "head.bias",
            "scale"} <= names  # fmt: skip
    assert set(m.grads) == names and len(m.params) == len(names)
    assert m.params["encoder.rnn.weight_hh_l0"] is m.encoder.rnn.params["weight_hh_l0"]
    assert m.scale is m.params["scale"]
    assert dict(m.named_parameters()).keys() == names
    assert sum(p.size for p in m.parameters()) == m.num_parameters()
    assert [n for n, _ in m.named_modules()] == ["", "encoder", "encoder.embed", "encoder.rnn",
                                                  "head"]  # fmt: skip
    # the state_dict holds every array, so a checkpoint of it is the whole model
    assert set(m.state_dict()) == names


def test_params_stay_live_through_nesting():
    m = Model()
    opt = rnnfast.optim.SGD(m.params, lr=0.1)
    m.encoder.extra = rnnfast.Linear(2, 2, seed=3)  # added to a child after it joined m
    assert "encoder.extra.weight" in m.params and "encoder.extra.weight" in opt.params
    m.encoder.extra = None  # a plain value replaces the child, as in torch
    assert "encoder.extra.weight" not in m.params
    del m.head
    assert not any(k.startswith("head.") for k in m.params)
    with pytest.raises(AttributeError, match="head"):
        m.head  # noqa: B018


def test_misuse_gets_clear_errors():
    m = Model()
    with pytest.raises(TypeError, match="update it in place"):
        m.scale = np.zeros(3, dtype=np.float32)
    with pytest.raises(TypeError, match="views of its arrays"):
        m.params["scale"] = np.zeros(3, dtype=np.float32)
    with pytest.raises(TypeError, match="float32 or float64"):
        rnnfast.Parameter(np.zeros(3, dtype=np.int64))
    with pytest.raises(NotImplementedError, match="Model has no forward"):
        m(np.zeros(3))
    with pytest.raises(ValueError, match="without '.'"):
        m.add_module("a.b", rnnfast.Linear(1, 1))

    class Early(rnnfast.Module):
        def __init__(self):
            self.rnn = rnnfast.GRU(2, 2)  # before super().__init__()
            super().__init__()

    with pytest.raises(AttributeError, match=r"super\(\).__init__\(\) first"):
        Early()


def test_packed_and_ragged_inputs_are_refused_with_what_to_pass():
    torch = pytest.importorskip("torch")
    layer = rnnfast.LSTM(3, 4)
    seqs = [torch.randn(5, 3), torch.randn(2, 3)]
    packed = torch.nn.utils.rnn.pack_sequence(seqs)
    with pytest.raises(TypeError, match="pad_packed_sequence"):
        layer(packed)
    with pytest.raises(TypeError, match="pad_sequences"):
        layer([np.zeros((5, 3), np.float32), np.zeros((2, 3), np.float32)])


def test_sequential_chains_forward_and_backward():
    rng = np.random.default_rng(0)
    seq = rnnfast.Sequential(rnnfast.Embedding(9, 6, seed=0),
                             rnnfast.GRU(6, 5, num_layers=2, seed=1),
                             rnnfast.Linear(5, 4, seed=2))  # fmt: skip
    assert len(seq) == 3 and isinstance(seq[1], rnnfast.GRU)
    assert {"0.weight", "1.weight_ih_l1", "2.bias"} <= set(seq.params)
    ids = rng.integers(0, 9, size=(7, 3))
    lengths = np.array([7, 0, 4])
    logits = seq(ids, lengths=lengths)
    targets = rng.integers(0, 4, size=(7, 3))
    loss, dlogits = losses.softmax_cross_entropy(logits, targets)
    seq.zero_grad()
    assert seq.backward(dlogits) is None  # the Embedding first: no dx
    # the same chain by hand
    e, r, h = seq[0], seq[1], seq[2]
    y, _ = r(e(ids), lengths=lengths)
    _, d = losses.softmax_cross_entropy(h(y), targets)
    grads = {k: v.copy() for k, v in seq.grads.items()}
    seq.zero_grad()
    e.backward(r.backward(h.backward(d))[0])
    for k, g in seq.grads.items():
        assert_close(g, grads[k], 0, 0, name=k)
    with pytest.raises(ValueError, match="no recurrent layer"):
        rnnfast.Sequential(rnnfast.Linear(2, 2))(np.zeros((1, 2), np.float32), lengths=[1])

    class Sink(rnnfast.Module):  # a module whose backward gives nothing back
        def forward(self, x):
            return x

        def backward(self, dy):
            return None

    chain = rnnfast.Sequential(rnnfast.Linear(2, 2), Sink(), rnnfast.Linear(2, 2))
    chain(np.ones((1, 2), np.float32))
    with pytest.raises(TypeError, match=r"module 0 \(Linear\) got no gradient"):
        chain.backward(np.ones((1, 2), np.float32))
    with pytest.raises(RuntimeError, match="no modules"):
        rnnfast.Sequential()(np.zeros(2))


def test_sequential_matches_torch():
    torch = pytest.importorskip("torch")
    seq = rnnfast.Sequential(rnnfast.Linear(4, 6, dtype=np.float64, seed=0),
                             rnnfast.Linear(6, 2, dtype=np.float64, seed=1))  # fmt: skip
    ref = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2)).double()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in seq.state_dict().items()})
    x = np.random.default_rng(1).standard_normal((5, 4))
    xt = torch.from_numpy(x).requires_grad_()
    out = ref(xt)
    out.square().sum().backward()
    y = seq(x)
    dx = seq.backward(2 * y)
    assert_close(y, out.detach().numpy(), 1e-12, 1e-12, "y")
    assert_close(dx, xt.grad.numpy(), 1e-12, 1e-12, "dx")
    for k, p in ref.named_parameters():
        assert_close(seq.grads[k], p.grad.numpy(), 1e-12, 1e-12, k)


CELL_CLASSES = [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {"nonlinearity": "tanh"}),
                ("RNNCell", {"nonlinearity": "relu"})]  # fmt: skip


@pytest.mark.parametrize(("name", "kwargs"), CELL_CLASSES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cells_match_torch_through_a_loop(name, kwargs, dtype):
    """T calls of the cell, then T backward calls in reverse: the loss over every step's h
    differentiated as torch's autograd does it through the same loop."""
    torch = pytest.importorskip("torch")
    T, N, C, H = 5, 3, 4, 6
    cell = getattr(rnnfast, name)(C, H, dtype=dtype, seed=0, **kwargs)
    ref = getattr(torch.nn, name)(C, H, **kwargs).double()
    ref.load_state_dict({k: torch.from_numpy(v.astype(np.float64))
                         for k, v in cell.state_dict().items()})  # fmt: skip
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((T, N, C)).astype(dtype)
    h0 = rng.standard_normal((N, H)).astype(dtype)
    lstm = name == "LSTMCell"
    state = (h0, h0 * 0.5) if lstm else h0
    weights = rng.standard_normal((T, N, H))  # loss = sum_t <weights_t, h_t>

    xt = torch.from_numpy(xs.astype(np.float64)).requires_grad_()
    st = tuple(torch.from_numpy(s.astype(np.float64)).requires_grad_() for s in
               (state if lstm else (state,)))  # fmt: skip
    s, loss, hs = (st if lstm else st[0]), 0, []
    for t in range(T):
        s = ref(xt[t], s)
        h = s[0] if lstm else s
        loss = loss + (h * torch.from_numpy(weights[t])).sum()
        hs.append(h.detach().numpy())
    loss.backward()

    s, ours = state, []
    for t in range(T):
        s = cell(xs[t], s)
        ours.append(s[0] if lstm else s)
    kind = {"rtol": 1e-10, "atol": 1e-11} if dtype == np.float64 else {"rtol": 2e-4, "atol": 2e-4}
    for t in range(T):
        assert_close(ours[t], hs[t], **kind, name=f"h_{t}")
    dxs = [None] * T
    dnext = (np.zeros((N, H), dtype), np.zeros((N, H), dtype)) if lstm else np.zeros((N, H), dtype)
    for t in reversed(range(T)):
        w = weights[t].astype(dtype)
        ds = (dnext[0] + w, dnext[1]) if lstm else dnext + w
        dxs[t], dnext = cell.backward(ds)
    assert_close(np.stack(dxs), xt.grad.numpy(), **kind, name="dx")
    dstate0 = dnext if lstm else (dnext,)
    for i, (ours_d, ref_s) in enumerate(zip(dstate0, st, strict=True)):
        assert_close(ours_d, ref_s.grad.numpy(), **kind, name=f"dstate0[{i}]")
    for k, p in ref.named_parameters():
        assert_close(cell.grads[k], p.grad.numpy(), **kind, name=k)
    with pytest.raises(RuntimeError, match="not yet backpropagated"):
        cell.backward(ds)


def test_cells_unbatched_eval_and_misuse():
    cell = rnnfast.LSTMCell(3, 4, seed=0)
    x = np.ones(3, np.float32)
    h, c = cell(x)
    assert h.shape == c.shape == (4,)
    hb, cb = cell(x[None], (h[None], c[None]))
    h2, c2 = cell(x, (h, c))
    assert_close(h2, hb[0], 0, 0)
    assert_close(c2, cb[0], 0, 0)
    dx, (dh, dc) = cell.backward((np.ones(4, np.float32), None))  # the unbatched step
    assert dx.shape == (3,) and dh.shape == dc.shape == (4,)
    dx, (dh, dc) = cell.backward((np.ones((1, 4), np.float32), None))  # the batched one
    assert dx.shape == (1, 3) and dh.shape == (1, 4)
    cell.clear()
    cell.eval()
    cell(x, (h, c))
    assert not cell._steps
    with pytest.raises(RuntimeError, match="training-mode forward"):
        cell.backward((h, c))
    with pytest.raises(TypeError, match=r"tuple \(h, c\)"):
        cell(x, h)
    with pytest.raises(ValueError, match=r"state\[1\] must have shape \(4,\)"):
        cell(x, (h, np.ones(5, np.float32)))
    with pytest.raises(ValueError, match=r"x must be \(N, 3\)"):
        cell(np.ones((2, 2), np.float32))
    gru = rnnfast.GRUCell(2, 3, reset_after=False)
    assert "reset_after" in vars(gru) and gru(np.ones(2, np.float32)).shape == (3,)


def test_pickled_models_and_explicit_little_endian_arrays_run():
    """A pickle round trip gives arrays of dtype '<f4': equal to float32 but another dtype object,
    which the kernels must accept as float32 (they once raised "float32 ... got float32")."""
    import copy
    import pickle

    m = rnnfast.Sequential(rnnfast.Embedding(5, 3, seed=0), rnnfast.LSTM(3, 4, seed=1),
                           rnnfast.Linear(4, 2, seed=2))  # fmt: skip
    ids = np.array([[1, 2], [3, 4]])
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert set(clone.params) == set(m.params)
        assert clone.params["1.weight_hh_l0"] is not m.params["1.weight_hh_l0"]
        assert_close(clone(ids), m(ids), 0, 0, "logits")
    x = np.frombuffer(np.ones((2, 1, 3), np.float32).tobytes(), dtype="<f4").reshape(2, 1, 3)
    w = np.full((16, 3), 0.1, dtype="<f4")
    y, *_ = rnnfast.lstm_forward(x, w, np.zeros((16, 4), "<f4"), training=False)
    assert y.dtype == np.float32 and np.isfinite(y).all()
