"""rnnfast.torch: the fused kernels behind torch.nn.LSTM/GRU/RNN's interface, against torch.nn
itself (outputs and every gradient through autograd), gradcheck, packed sequences, batch_first,
unbatched input, convert() keeping the Parameter objects, and eval / no_grad."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import rnnfast.torch as rt  # noqa: E402

KINDS = [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "relu"}), ("LSTM", {"proj_size": 3})]


def _pair(kind, kwargs, **more):
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(5, 6, num_layers=2, bidirectional=True, **kwargs, **more).double()
    ours = rt.convert(getattr(torch.nn, kind)(5, 6, num_layers=2, bidirectional=True, **kwargs,
                                              **more).double())  # fmt: skip
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _close(a, b, what):
    np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-10, atol=1e-11,
                               err_msg=what)  # fmt: skip


@pytest.mark.parametrize(("kind", "kwargs"), KINDS, ids=lambda v: str(v))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_matches_torch_nn_with_autograd(kind, kwargs, packed):
    ref, ours = _pair(kind, kwargs)
    assert type(ours) is getattr(rt, kind)
    T, N = 7, 4
    x = torch.randn(T, N, 5, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 5, 1])
    out_size = kwargs.get("proj_size") or 6
    h0 = torch.randn(4, N, out_size, dtype=torch.float64, requires_grad=True)
    hx = (h0, torch.randn(4, N, 6, dtype=torch.float64, requires_grad=True)) if kind == "LSTM" \
        else h0  # fmt: skip
    results = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        inp = torch.nn.utils.rnn.pack_padded_sequence(xi, lengths, enforce_sorted=False) \
            if packed else xi  # fmt: skip
        y, s = m(inp, hx)
        if packed:
            y = torch.nn.utils.rnn.pad_packed_sequence(y)[0]
        h_n = s[0] if kind == "LSTM" else s
        (y.square().sum() + h_n.sin().sum()).backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        results.append((y, h_n, xi.grad.clone(), h0.grad.clone(), grads))
        h0.grad = None
        m.zero_grad()
    (y1, h1, dx1, dh1, g1), (y2, h2, dx2, dh2, g2) = results
    _close(y2, y1, "y")
    _close(h2, h1, "h_n")
    _close(dx2, dx1, "dx")
    _close(dh2, dh1, "dh0")
    for n in g1:
        _close(g2[n], g1[n], n)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_gradcheck(kind):
    torch.manual_seed(1)
    m = getattr(rt, kind)(3, 4, batch_first=True, bidirectional=True, dtype=torch.float64)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    hx = (h0, torch.zeros_like(h0)) if kind == "LSTM" else h0
    assert torch.autograd.gradcheck(lambda x, h0, w: m(x, hx)[0],
                                    (x, h0, m.weight_hh_l0_reverse))  # fmt: skip


def test_convert_keeps_parameters_and_optimizer():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LSTM(5, 4, batch_first=True))
    before = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rt.convert(model)
    assert isinstance(model[1], rt.LSTM) and list(model.parameters()) == before
    x = torch.randn(2, 6, 3)
    y, _ = model[1](model[0](x))
    y.sum().backward()
    w = model[1].weight_hh_l0.detach().clone()
    opt.step()
    assert not torch.equal(w, model[1].weight_hh_l0)  # the optimizer's step reached our layer
    y2, _ = model[1](model[0](x))  # and our layer reads the updated weights
    back = rt.convert(model, back=True)
    assert type(back[1]) is torch.nn.LSTM and back[1].weight_hh_l0 is before[3]
    assert list(back.parameters()) == before
    ref_y, _ = back[1](back[0](x))
    np.testing.assert_allclose(ref_y.detach().numpy(), y2.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_unbatched_eval_no_grad_and_misuse():
    m = rt.LSTM(3, 4)
    x = torch.randn(6, 3)
    y, (h, c) = m(x)
    assert y.shape == (6, 4) and h.shape == (1, 4)
    with torch.no_grad():
        y2, _ = m(x)
    torch.testing.assert_close(y, y2)
    m.eval()
    y3, _ = m(x)
    torch.testing.assert_close(y, y3)
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randn(6, 2, 3, dtype=torch.float64))


def test_dataloader_workers_forked_after_the_kernels_ran():
    """A DataLoader's fork-started workers calling the module after the parent ran multi-threaded
    kernels: no hang (the child runs the kernels on one thread), the same outputs."""
    import rnnfast

    if not rnnfast.build_info()["openmp"]:
        pytest.skip("needs the OpenMP build")
    rnnfast.set_num_threads(2)
    m = rt.GRU(8, 64).eval()
    x = torch.randn(20, 16, 8)
    with torch.no_grad():
        expected = m(x)[0]

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            with torch.no_grad():
                return m(x)[0]

    loader = torch.utils.data.DataLoader(Data(), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", timeout=60)  # fmt: skip
    for y in loader:
        torch.testing.assert_close(y, expected)
