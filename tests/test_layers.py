"""rnnfast.layers and rnnfast.losses: the whole stack against torch.nn and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, tol

import rnnfast
from rnnfast import _C, layers, losses

CLASSES = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}
T, N, C, H = 5, 3, 4, 3


def make_layer(cell, **kwargs):
    cls = getattr(layers, CLASSES[cell])
    if cell.startswith("rnn_"):
        kwargs["nonlinearity"] = cell[4:]
    return cls(C, H, **kwargs)


def random_state(layer, n, rng):
    shape = (layer.num_layers * layer.num_directions, n, H)
    h = rng.standard_normal(shape)
    return (h, rng.standard_normal(shape)) if layer.spec.has_c else h


def as_tuple(state):
    return state if isinstance(state, tuple) else (state,)


# ---- against torch ----------------------------------------------------------------------------


def torch_run(torch, tlayer, x, state, lengths, batch_first):
    """Forward through torch (packing when there are lengths); returns y and the final state."""
    xt = torch.tensor(x, requires_grad=True)
    st = None
    if state is not None:
        st = tuple(torch.tensor(s, requires_grad=True) for s in as_tuple(state))
    arg = st if st is None or len(st) == 2 else st[0]
    if lengths is None:
        y, s_n = tlayer(xt, arg)
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            xt, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False
        )
        yp, s_n = tlayer(packed, arg)
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(yp, batch_first=batch_first, total_length=T)
    return xt, st, y, as_tuple(s_n)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_stack_matches_torch(cell, bidirectional, with_lengths):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng([len(cell), ord(cell[-1]), bidirectional, with_lengths])
    batch_first = with_lengths  # cover both layouts
    ours = make_layer(cell, num_layers=3, bidirectional=bidirectional, batch_first=batch_first,
                      dtype=np.float64, seed=1)  # fmt: skip
    kw = {"nonlinearity": cell[4:]} if cell.startswith("rnn_") else {}
    tlayer = getattr(torch.nn, CLASSES[cell])(C, H, num_layers=3, bidirectional=bidirectional,
                                              batch_first=batch_first, **kw).double()  # fmt: skip
    tlayer.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})
    x = rng.standard_normal((N, T, C) if batch_first else (T, N, C))
    state = random_state(ours, N, rng)
    lengths = np.array([T, 1, 3]) if with_lengths else None

    y, s_n = ours(x, state, lengths=lengths)
    xt, st, yt, s_nt = torch_run(torch, tlayer, x, state, lengths, batch_first)
    out_tol = tol(np.float64, "output")
    assert_close(y, yt.detach().numpy(), **out_tol, name="y")
    for a, b in zip(as_tuple(s_n), s_nt, strict=True):
        assert_close(a, b.detach().numpy(), **out_tol, name="state")

    dy = rng.standard_normal(y.shape)
    ds = tuple(rng.standard_normal(s.shape) for s in as_tuple(s_n))
    dx, ds0 = ours.backward(dy, ds if len(ds) == 2 else ds[0])
    loss = (yt * torch.tensor(dy)).sum() + sum(
        (a * torch.tensor(b)).sum() for a, b in zip(s_nt, ds, strict=True)
    )
    loss.backward()
    g_tol = tol(np.float64, "grad")
    assert_close(dx, xt.grad.numpy(), **g_tol, name="dx")
    for a, b in zip(as_tuple(ds0), st, strict=True):
        assert_close(a, b.grad.numpy(), **g_tol, name="dstate0")
    tgrads = {k: p.grad.numpy() for k, p in tlayer.named_parameters()}
    assert set(tgrads) == set(ours.grads)
    for k, g in tgrads.items():
        assert_close(ours.grads[k], g, **g_tol, name=k)


def test_state_dict_round_trips_through_torch():
    torch = pytest.importorskip("torch")
    tl = torch.nn.LSTM(C, H, num_layers=2, bidirectional=True)
    ours = layers.LSTM(C, H, num_layers=2, bidirectional=True)
    ours.load_state_dict({k: v.numpy() for k, v in tl.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((T, N, C)).astype(np.float32)
    ours.eval()
    y, (h, c) = ours(x)
    with torch.no_grad():
        yt, (ht, ct) = tl(torch.tensor(x))
    assert_close(y, yt.numpy(), **tol(np.float32), name="y")
    assert_close(c, ct.numpy(), **tol(np.float32), name="c_n")
    tl2 = torch.nn.LSTM(C, H, num_layers=2, bidirectional=True)
    tl2.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})
    for k, v in tl2.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), tl.state_dict()[k].numpy())


# ---- against central finite differences -------------------------------------------------------


def numeric_check(layer, x, state, lengths, rng, n_probe=6, reseed=None):
    """Compares backward with central differences of L = <y, R> + <state_n, S> on probes."""

    def run(x, state):
        if reseed is not None:
            layer.rng = np.random.default_rng(reseed)  # the same dropout mask every call
        y, s = layer(x, state, lengths=lengths)
        return y, as_tuple(s)

    y, s_n = run(x, state)
    R = rng.standard_normal(y.shape)
    S = [rng.standard_normal(s.shape) for s in s_n]

    def loss():
        y, s_n = run(x, state)
        return float((y * R).sum() + sum((a * b).sum() for a, b in zip(s_n, S, strict=True)))

    layer.zero_grad()
    run(x, state)
    dx, ds0 = layer.backward(R, tuple(S) if len(S) == 2 else S[0])
    targets = [("x", x, dx)]
    if state is not None:
        targets += [
            (f"state{i}", s, d)
            for i, (s, d) in enumerate(zip(as_tuple(state), as_tuple(ds0), strict=True))
        ]  # noqa: E501
    targets += [(k, layer.params[k], layer.grads[k]) for k in sorted(layer.params)]
    eps = 1e-6
    for name, arr, grad in targets:
        for _ in range(n_probe):
            i = tuple(int(rng.integers(0, s)) for s in arr.shape)
            old = arr[i]
            arr[i] = old + eps
            up = loss()
            arr[i] = old - eps
            down = loss()
            arr[i] = old
            num = (up - down) / (2 * eps)
            assert abs(grad[i] - num) <= 1e-6 + 1e-5 * abs(num), f"{name}{i}: {grad[i]} vs {num}"


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_stack_finite_differences(cell):
    rng = np.random.default_rng(7)
    layer = make_layer(cell, num_layers=2, bidirectional=True, dtype=np.float64, seed=2)
    x = rng.standard_normal((T, N, C))
    numeric_check(layer, x, random_state(layer, N, rng), np.array([2, T, 4]), rng)


def test_dropout_finite_differences_with_a_fixed_mask():
    rng = np.random.default_rng(8)
    layer = layers.GRU(C, H, num_layers=3, dropout=0.4, dtype=np.float64, seed=3)
    numeric_check(layer, rng.standard_normal((T, N, C)), None, None, rng, reseed=11)


def test_learned_initial_state_finite_differences():
    rng = np.random.default_rng(9)
    layer = layers.LSTM(C, H, num_layers=2, bidirectional=True, learn_initial_state=True,
                        dtype=np.float64, seed=4)  # fmt: skip
    layer.params["h0"][...] = rng.standard_normal(layer.params["h0"].shape)
    layer.params["c0"][...] = rng.standard_normal(layer.params["c0"].shape)
    assert layer.params["h0"].shape == (4, 1, H)
    numeric_check(layer, rng.standard_normal((T, N, C)), None, np.array([T, 0, 2]), rng)


# ---- behaviour --------------------------------------------------------------------------------


def test_dropout_only_in_training():
    x = np.random.default_rng(0).standard_normal((T, N, C)).astype(np.float32)
    layer = layers.LSTM(C, H, num_layers=2, dropout=0.5, seed=0)
    plain = layers.LSTM(C, H, num_layers=2, seed=0)
    y1, _ = layer(x)
    y2, _ = layer(x)
    assert not np.allclose(y1, y2)
    layer.eval()
    y3, _ = layer(x)
    y4, _ = plain.eval()(x)
    np.testing.assert_array_equal(y3, y4)
    with pytest.raises(RuntimeError, match="training mode"):
        layer.backward(np.zeros_like(y3))


@pytest.mark.skipif(not rnnfast.bfloat16_supported(), reason="CPU lacks AVX512_BF16")
@pytest.mark.parametrize("cls", [layers.LSTM, layers.GRU, layers.RNN])
def test_bfloat16_layer_trains_and_infers(cls):
    x = np.random.default_rng(2).standard_normal((T, N, C)).astype(np.float32)
    fast = cls(C, H, num_layers=2, bidirectional=True, seed=0, matmul_precision="bfloat16")
    plain = cls(C, H, num_layers=2, bidirectional=True, seed=0)
    assert "matmul_precision='bfloat16'" in repr(fast)
    # training multiplies in bfloat16 too, forward and backward, close to float32's gradients
    y16, y32 = fast(x)[0], plain(x)[0]
    assert 1e-5 < np.abs(y16 - y32).max() < 3e-2
    dy = np.ones_like(y16)
    g16, g32 = fast.backward(dy), plain.backward(dy)
    dx16, dx32 = (g[0] if isinstance(g, tuple) else g for g in (g16, g32))
    assert 1e-6 < np.linalg.norm(dx16 - dx32) < 3e-2 * np.linalg.norm(dx32)
    for name, _ in plain.named_parameters():
        d16, d32 = fast.grads[name], plain.grads[name]
        assert np.linalg.norm(d16 - d32) <= 3e-2 * np.linalg.norm(d32) + 1e-7, name
    y16, y32 = fast.eval()(x)[0], plain.eval()(x)[0]
    assert 1e-5 < np.abs(y16 - y32).max() < 3e-2
    lengths = np.array([T, 0, 1][:N] + [T] * max(0, N - 3))
    y16 = fast(x, lengths=lengths)[0]
    assert np.all(y16[:, lengths == 0] == 0)


@pytest.mark.skipif(not rnnfast.bfloat16_supported(), reason="CPU lacks AVX512_BF16")
def test_bfloat16_linear():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 7, 48)).astype(np.float32)
    fast = layers.Linear(48, 33, seed=1, matmul_precision="bfloat16")
    plain = layers.Linear(48, 33, seed=1)
    assert "matmul_precision='bfloat16'" in repr(fast)
    y16, y32 = fast(x), plain(x)
    assert 1e-5 < np.abs(y16 - y32).max() < 3e-2 * np.abs(y32).max()
    dy = rng.standard_normal(y32.shape).astype(np.float32)
    dx16, dx32 = fast.backward(dy), plain.backward(dy)
    assert 1e-6 < np.linalg.norm(dx16 - dx32) < 3e-2 * np.linalg.norm(dx32)
    for name, _ in plain.named_parameters():
        g16, g32 = fast.grads[name], plain.grads[name]
        assert np.linalg.norm(g16 - g32) <= 3e-2 * np.linalg.norm(g32), name


def test_bfloat16_layer_errors():
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        layers.GRU(C, H, matmul_precision="half")
    with pytest.raises(TypeError, match="needs dtype float32"):
        layers.GRU(C, H, dtype=np.float64, matmul_precision="bfloat16")
    with pytest.raises(TypeError, match="needs dtype float32"):
        layers.Linear(C, H, dtype=np.float64, matmul_precision="bfloat16")
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        layers.Linear(C, H, matmul_precision="half")


def test_unbatched_matches_batch_of_one():
    rng = np.random.default_rng(1)
    layer = layers.GRU(C, H, num_layers=2, bidirectional=True, dtype=np.float64, seed=0)
    x = rng.standard_normal((T, C))
    y, h = layer(x)
    yb, hb = layer(x[:, None])
    np.testing.assert_allclose(y, yb[:, 0])
    np.testing.assert_allclose(h, hb[:, 0])
    assert y.shape == (T, 2 * H) and h.shape == (4, H)


def test_reverse_direction_starts_at_each_sequence_end():
    rng = np.random.default_rng(2)
    layer = layers.RNN(C, H, bidirectional=True, dtype=np.float64, seed=0)
    x = rng.standard_normal((T, N, C))
    lengths = np.array([T, 2, 4])
    y, h = layer(x, lengths=lengths)
    for n, k in enumerate(lengths):
        yn, hn = layer(x[:k, n : n + 1])
        np.testing.assert_allclose(y[:k, n], yn[:, 0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(h[:, n], hn[:, 0], rtol=1e-12, atol=1e-12)
        assert not y[k:, n].any()


def test_grads_accumulate_and_zero():
    rng = np.random.default_rng(3)
    layer = layers.LSTM(C, H, dtype=np.float64, seed=0)
    x = rng.standard_normal((T, N, C))
    dy = rng.standard_normal((T, N, H))
    layer(x)
    layer.backward(dy)
    once = {k: v.copy() for k, v in layer.grads.items()}
    layer(x)
    layer.backward(dy)
    for k in once:
        np.testing.assert_allclose(layer.grads[k], 2 * once[k])
    with pytest.raises(RuntimeError, match="once"):
        layer.backward(dy)
    grads_before = layer.grads
    layer.zero_grad()
    assert grads_before is layer.grads and not any(g.any() for g in layer.grads.values())


def test_layer_errors():
    layer = layers.LSTM(C, H, num_layers=2)
    x = np.zeros((T, N, C), np.float32)
    with pytest.raises(TypeError, match="float64"):
        layer(x.astype(np.float64))
    with pytest.raises(ValueError, match="input_size"):
        layer(np.zeros((T, N, C + 1), np.float32))
    with pytest.raises(ValueError, match=r"\(2, 3, 3\)"):
        layer(x, (np.zeros((1, N, H), np.float32), np.zeros((2, N, H), np.float32)))
    with pytest.raises(TypeError, match="tuple"):
        layer(x, np.zeros((2, N, H), np.float32))
    with pytest.raises(ValueError, match="lengths"):
        layer(x, lengths=[T + 1, 1, 1])
    with pytest.raises(RuntimeError, match="forward"):
        layers.GRU(C, H).backward(np.zeros((T, N, H), np.float32))
    with pytest.raises(ValueError, match="dropout"):
        layers.GRU(C, H, dropout=1.0)
    with pytest.raises(ValueError, match="nonlinearity"):
        layers.RNN(C, H, nonlinearity="sigmoid")
    y, _ = layer(x)
    with pytest.raises(ValueError, match="shape of y"):
        layer.backward(y[:-1])
    before = layer.state_dict()
    bad = dict(before)
    bad["weight_hh_l1"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match="weight_hh_l1"):
        layer.load_state_dict(bad)
    bad = {k: v + 1 for k, v in before.items() if k != "bias_hh_l1"}
    with pytest.raises(KeyError, match="bias_hh_l1"):
        layer.load_state_dict(bad)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_orthogonal_init_and_seed():
    a = layers.LSTM(C, 8, init="orthogonal", seed=5)
    b = layers.LSTM(C, 8, init="orthogonal", seed=5)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    w = a.params["weight_hh_l0"].astype(np.float64)
    assert_close(w[8:16] @ w[8:16].T, np.eye(8), rtol=0, atol=1e-6, name="orthogonal")
    assert (a.params["bias_ih_l0"][8:16] == 1).all() and not a.params["bias_hh_l0"].any()


# ---- Embedding, Linear, losses ----------------------------------------------------------------


def test_embedding_and_linear_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    emb = layers.Embedding(10, 4, padding_idx=0, dtype=np.float64, seed=0)
    lin = layers.Linear(4, 6, dtype=np.float64, seed=0)
    temb = torch.nn.Embedding(10, 4, padding_idx=0).double()
    tlin = torch.nn.Linear(4, 6).double()
    temb.load_state_dict({k: torch.tensor(v) for k, v in emb.state_dict().items()})
    tlin.load_state_dict({k: torch.tensor(v) for k, v in lin.state_dict().items()})
    ids = rng.integers(0, 10, (T, N))
    ids[0, 0] = 0
    y = lin(emb(ids))
    yt = tlin(temb(torch.tensor(ids)))
    assert_close(y, yt.detach().numpy(), **tol(np.float64), name="y")
    dy = rng.standard_normal(y.shape)
    emb.backward(lin.backward(dy))
    (yt * torch.tensor(dy)).sum().backward()
    assert_close(lin.grads["weight"], tlin.weight.grad.numpy(), **tol(np.float64, "grad"), name="w")
    assert_close(lin.grads["bias"], tlin.bias.grad.numpy(), **tol(np.float64, "grad"), name="b")
    assert_close(emb.grads["weight"], temb.weight.grad.numpy(), **tol(np.float64, "grad"), name="e")
    with pytest.raises(IndexError, match="10"):
        emb(np.array([10]))


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_embedding_gradient_large_batch(padding_idx):
    """The scatter-add on the kernels' team (rows x dim above its threshold, dim not a multiple of
    a cache line): equal to np.add.at in float64, the padding row untouched, and the same bits
    from 1 and 2 threads (each element is one sum in row order)."""
    rng = np.random.default_rng(11)
    V, D = 50, 70
    ids = rng.integers(0, V, (40, 64))
    dy = rng.standard_normal((40, 64, D)).astype(np.float32)
    want = np.zeros((V, D))
    keep = ids.reshape(-1) != (-1 if padding_idx is None else padding_idx)
    np.add.at(want, ids.reshape(-1)[keep], dy.reshape(-1, D)[keep].astype(np.float64))
    grads, before = [], rnnfast.get_num_threads()
    for threads in (1, 2):
        rnnfast.set_num_threads(threads)
        try:
            emb = layers.Embedding(V, D, padding_idx=padding_idx, seed=0)
            emb(ids)
            emb.grads["weight"][...] = 0.5
            emb.backward(dy)
        finally:
            rnnfast.set_num_threads(before)
        grads.append(emb.grads["weight"].copy())
    assert_close(grads[0] - 0.5, want, rtol=1e-5, atol=1e-5, name="weight")
    np.testing.assert_array_equal(grads[0], grads[1])
    if padding_idx is not None:
        assert np.all(grads[0][padding_idx] == 0.5)
    with pytest.raises(ValueError, match=r"ids\[1\] = 50 is outside \[0, 50\)"):
        _C.embedding_backward(np.array([0, 50]), np.zeros((2, D), np.float32), grads[0])
    with pytest.raises(ValueError, match="columns"):
        _C.embedding_backward(np.array([0, 1]), np.zeros((2, 3), np.float32), grads[0])


@pytest.mark.parametrize("mode", ["plain", "ignore", "mask", "sum"])
def test_cross_entropy_matches_torch(mode):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((T, N, 7)) * 3
    targets = rng.integers(0, 7, (T, N))
    mask = rng.random((T, N)) < 0.7
    kw, tkw = {}, {}
    if mode == "ignore":
        targets[~mask] = -100
        kw["ignore_index"] = tkw["ignore_index"] = -100
    tt = torch.tensor(np.where(mask, targets, -100) if mode == "mask" else targets)
    if mode == "mask":
        kw["mask"] = mask
    if mode == "sum":
        kw["reduction"] = tkw["reduction"] = "sum"
    loss, grad = losses.softmax_cross_entropy(logits, targets, **kw)
    lt = torch.tensor(logits, requires_grad=True)
    expected = torch.nn.functional.cross_entropy(lt.reshape(-1, 7), tt.reshape(-1), **tkw)
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-12)
    assert_close(grad, lt.grad.numpy(), rtol=1e-10, atol=1e-14, name="dlogits")
    assert losses.perplexity(loss) == pytest.approx(np.exp(loss))


@pytest.mark.parametrize("mode", ["ignore", "mask"])
def test_cross_entropy_never_reads_dropped_positions(mode):
    """NaN logits at padded positions change neither the loss nor the other gradients."""
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((T, N, 7))
    targets = rng.integers(0, 7, (T, N))
    keep = rng.random((T, N)) < 0.7
    kw = {"mask": keep} if mode == "mask" else {"ignore_index": -1}
    if mode == "ignore":
        targets[~keep] = -1
    clean_loss, clean_grad = losses.softmax_cross_entropy(logits, targets, **kw)
    logits[~keep] = np.nan
    for reduction in ("mean", "sum", "none"):
        loss, grad = losses.softmax_cross_entropy(logits, targets, reduction=reduction, **kw)
        assert np.isfinite(loss).all() and np.isfinite(grad).all(), reduction
        if reduction == "mean":
            assert loss == clean_loss
            np.testing.assert_array_equal(grad, clean_grad)
        assert (grad[~keep] == 0).all()


def test_cross_entropy_errors():
    with pytest.raises(IndexError, match="out of range"):
        losses.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        losses.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        losses.softmax_cross_entropy(np.zeros((2, 3)), np.array([0.0, 1.0]))


def test_exports():
    for name in ["LSTM", "GRU", "RNN", "Embedding", "Linear"]:
        assert getattr(rnnfast, name) is getattr(layers, name)


@pytest.mark.parametrize("cls", [layers.LSTM, layers.GRU])
def test_stacked_bidirectional_layer_never_reads_padding(cls):
    """NaN in the padding of x: outputs, final states and every gradient as with zero padding."""
    rng = np.random.default_rng(7)
    T_, N_, C_, H_ = 6, 4, 5, 8
    lengths = np.array([6, 0, 3, 1])
    padded = (np.arange(T_)[:, None] >= lengths[None, :])[:, :, None]
    x = rng.standard_normal((T_, N_, C_))
    dy = rng.standard_normal((T_, N_, 2 * H_))
    results = []
    for fill in (0.0, np.nan):
        layer = cls(C_, H_, num_layers=2, bidirectional=True, dtype=np.float64, seed=0)
        y, state = layer(np.where(padded, fill, x), lengths=lengths)
        dx, _ = layer.backward(dy)
        results.append((y, state, dx, {k: v.copy() for k, v in layer.grads.items()}))
    (y0, s0, dx0, g0), (y1, s1, dx1, g1) = results
    np.testing.assert_array_equal(y1, y0)
    for a, b in zip(s1 if isinstance(s1, tuple) else (s1,), s0 if isinstance(s0, tuple) else (s0,),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.where(padded, 0, dx1), np.where(padded, 0, dx0))
    for k in g0:
        assert np.isfinite(g1[k]).all(), k
        np.testing.assert_array_equal(g1[k], g0[k], err_msg=k)


def test_cross_entropy_large_vocabulary_float32_and_threads():
    """The fused kernel's float32 path (vectorised exp) against the float64 formula, at an output
    head's size, with the same bits on one thread as on two; NaN in a kept row reaches the loss."""
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((64, 5, 3000)) * 4).astype(np.float32)
    targets = rng.integers(0, 3000, (64, 5))
    loss, grad = losses.softmax_cross_entropy(logits, targets)
    x = logits.astype(np.float64).reshape(-1, 3000)
    logp = x - x.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    expected = np.exp(logp)
    expected[np.arange(len(x)), targets.reshape(-1)] -= 1
    expected /= len(x)
    assert grad.dtype == np.float32
    assert loss == pytest.approx(-logp[np.arange(len(x)), targets.reshape(-1)].mean(), rel=1e-6)
    assert_close(grad.reshape(-1, 3000), expected, rtol=1e-5, atol=1e-10, name="dlogits")
    before = rnnfast.get_num_threads()
    try:
        rnnfast.set_num_threads(1)
        loss1, grad1 = losses.softmax_cross_entropy(logits, targets)
    finally:
        rnnfast.set_num_threads(before)
    assert loss1 == loss
    np.testing.assert_array_equal(grad1, grad)
    logits[3, 2, 17] = np.nan
    assert np.isnan(losses.softmax_cross_entropy(logits, targets)[0])
