"""rnnfast.optim, rnnfast.clip and rnnfast.init: against torch where it is installed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import assert_close

from rnnfast import clip, init, optim

SHAPES = {"weight_ih_l0": (8, 5), "weight_hh_l0": (8, 2), "bias_ih_l0": (8,)}

CONFIGS = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.05, "momentum": 0.5, "maximize": True}),
    ("Adagrad", {}),
    (
        "Adagrad",
        {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.2},
    ),
    ("RMSprop", {}),
    ("RMSprop", {"centered": True}),
    ("RMSprop", {"momentum": 0.9, "alpha": 0.9}),
    ("RMSprop", {"momentum": 0.9, "centered": True, "weight_decay": 0.05}),
    ("Adadelta", {}),
    ("Adadelta", {"lr": 0.5, "rho": 0.8, "weight_decay": 0.1}),
    ("Adam", {}),
    ("Adam", {"lr": 0.01, "betas": (0.8, 0.99), "amsgrad": True}),
    ("Adam", {"lr": 0.01, "weight_decay": 0.1}),
    ("AdamW", {}),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
]


def _params(rng):
    return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


def _grads(rng, step):
    g = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    if step % 7 == 3:
        g["bias_ih_l0"] = None  # a parameter without a gradient is skipped, as torch skips it
    return g


@pytest.mark.parametrize(
    "name,kwargs", CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)]
)
def test_matches_torch_step_for_step(name, kwargs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    params = _params(rng)
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    ours = getattr(optim, name)(params, **kwargs)
    theirs = getattr(torch.optim, name)(list(tparams.values()), **kwargs)
    for step in range(20):
        grads = _grads(rng, step)
        for k, t in tparams.items():
            t.grad = None if grads[k] is None else torch.tensor(grads[k])
        theirs.step()
        ours.step(grads)
        for k, t in tparams.items():
            assert_close(params[k], t.detach().numpy(), rtol=1e-6, atol=1e-12, name=f"{k}@{step}")


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW"])
def test_defaults_match_torch(name):
    torch = pytest.importorskip("torch")
    ours = getattr(optim, name)({"w": np.zeros(3)}).hparams
    theirs = getattr(torch.optim, name)([torch.zeros(3, requires_grad=True)]).defaults
    for k, v in ours.items():
        assert theirs[k] == v, f"{name}.{k}: ours {v}, torch {theirs[k]}"


RESUME = [("SGD", {"momentum": 0.9}), ("RMSprop", {"centered": True}), ("Adam", {"amsgrad": True})]


@pytest.mark.parametrize("name,kwargs", [*RESUME, ("Adadelta", {})])
def test_state_dict_resumes_exactly(name, kwargs):
    rng = np.random.default_rng(1)
    grads = [_grads(rng, s) for s in range(10)]
    a = _params(np.random.default_rng(2))
    b = {k: v.copy() for k, v in a.items()}
    opt_a = getattr(optim, name)(a, **kwargs)
    for g in grads:
        opt_a.step(g)
    opt_b = getattr(optim, name)(b, **kwargs)
    for g in grads[:5]:
        opt_b.step(g)
    sd = opt_b.state_dict()
    opt_c = getattr(optim, name)(b, lr=123.0)  # hyperparameters come back too
    opt_c.load_state_dict(sd)
    assert opt_c.hparams == opt_b.hparams
    for g in grads[5:]:
        opt_c.step(g)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_step_and_state_errors():
    p = {"w": np.zeros((2, 3))}
    opt = optim.Adam(p)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        opt.step({"w": np.zeros(3)})
    with pytest.raises(KeyError, match="not parameters"):
        opt.step({"v": np.zeros(3)})
    with pytest.raises(ValueError, match="lr"):
        optim.SGD(p, lr=-1)
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD(p, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        optim.Adam(p, betas=(1.5, 0.9))
    with pytest.raises(TypeError, match="dict"):
        optim.Adam([np.zeros(3)])
    with pytest.raises(ValueError, match="hyperparameters"):
        opt.load_state_dict(optim.SGD(p).state_dict())
    opt.step({"w": np.ones((2, 3))})
    sd = opt.state_dict()
    sd["state"]["w"]["exp_avg"] = np.zeros(5)
    before = opt.state_dict()
    with pytest.raises(ValueError, match="exp_avg"):
        opt.load_state_dict(sd)
    np.testing.assert_array_equal(opt.state["w"]["exp_avg"], before["state"]["w"]["exp_avg"])


# ---- clipping ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "max_norm,norm_type", [(0.5, 2.0), (100.0, 2.0), (0.5, 1.0), (0.3, math.inf)]
)
def test_clip_grad_norm_matches_torch(max_norm, norm_type):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    grads = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    ts = [torch.tensor(v, requires_grad=True) for v in grads.values()]
    for t, g in zip(ts, grads.values(), strict=True):
        t.grad = torch.tensor(g)
    expected = torch.nn.utils.clip_grad_norm_(ts, max_norm, norm_type)
    total = clip.clip_grad_norm_(grads, max_norm, norm_type)
    assert total == pytest.approx(float(expected), rel=1e-12)
    for t, g in zip(ts, grads.values(), strict=True):
        assert_close(g, t.grad.numpy(), rtol=1e-12, atol=0, name="clipped")


def test_clip_grad_value_matches_torch():
    torch = pytest.importorskip("torch")
    g = np.random.default_rng(4).standard_normal((5, 7))
    t = torch.tensor(g, requires_grad=True)
    t.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_value_([t], 0.5)
    clip.clip_grad_value_({"g": g}, 0.5)
    np.testing.assert_array_equal(g, t.grad.numpy())
    with pytest.raises(ValueError):
        clip.clip_grad_value_({"g": g}, -1)


def test_clip_grad_norm_nonfinite():
    g = {"a": np.array([np.inf, 1.0])}
    with pytest.raises(RuntimeError, match="non-finite"):
        clip.clip_grad_norm_(g, 1.0, error_if_nonfinite=True)


# ---- init -------------------------------------------------------------------------------------


def test_orthogonal_per_gate_block():
    w = init.orthogonal_(np.empty((4 * 16, 16)), rng=0, gates=4)
    for k in range(4):
        b = w[16 * k : 16 * (k + 1)]
        assert_close(b @ b.T, np.eye(16), rtol=0, atol=1e-12, name="block")
    tall = init.orthogonal_(np.empty((6, 3)), gain=2.0, rng=1)
    assert_close(tall.T @ tall, 4 * np.eye(3), rtol=0, atol=1e-12, name="tall")


def test_scaled_inits_bounds_and_spread():
    rng = np.random.default_rng(5)
    w = init.xavier_uniform_(np.empty((300, 200)), rng=rng)
    bound = math.sqrt(6 / 500)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    w = init.kaiming_normal_(np.empty((400, 300)), rng=rng)
    assert w.std() == pytest.approx(math.sqrt(2 / 300), rel=0.02)
    w = init.lecun_uniform_(np.empty((400, 300)), rng=rng)
    assert np.abs(w).max() <= math.sqrt(3 / 300)
    w = init.xavier_normal_(np.empty((3 * 100, 50)), rng=rng, gates=3)
    assert w.std() == pytest.approx(math.sqrt(2 / 150), rel=0.03)
    w = init.identity_(np.empty((6, 3)), gain=0.5, gates=2)
    np.testing.assert_array_equal(w, np.vstack([0.5 * np.eye(3)] * 2))
    b = init.forget_gate_bias_(np.zeros(12))
    np.testing.assert_array_equal(b, [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    a = init.uniform_(np.empty(10), -1, 1, rng=7)
    np.testing.assert_array_equal(a, init.uniform_(np.empty(10), -1, 1, rng=7))  # seeded


def test_init_gains_match_torch():
    torch = pytest.importorskip("torch")
    for nl in ["linear", "sigmoid", "tanh", "relu", "selu"]:
        assert init.calculate_gain(nl) == pytest.approx(torch.nn.init.calculate_gain(nl))
    assert init.calculate_gain("leaky_relu", 0.2) == pytest.approx(
        torch.nn.init.calculate_gain("leaky_relu", 0.2)
    )


def test_init_errors():
    with pytest.raises(ValueError, match="gates"):
        init.orthogonal_(np.empty((10, 3)), gates=3)
    with pytest.raises(TypeError, match="ndarray"):
        init.xavier_uniform_([[1.0]])
    with pytest.raises(ValueError, match="dimensions"):
        init.xavier_uniform_(np.empty(5))
    with pytest.raises(TypeError, match="rng"):
        init.normal_(np.empty(3), rng="seed")


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW"])
def test_float32_stays_float32(name):
    p = {"w": np.ones((2, 3), np.float32)}
    kwargs = {"momentum": 0.9} if name in ("SGD", "RMSprop") else {}
    opt = getattr(optim, name)(p, **kwargs)
    w = p["w"]
    for _ in range(3):
        opt.step({"w": np.full((2, 3), 0.5, np.float32)})
    assert p["w"] is w and w.dtype == np.float32 and not np.all(w == 1)
    assert all(v.dtype == np.float32 for k, v in opt.state["w"].items() if k != "step")


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_clip_grad_norm_leaves_nonfinite_gradients_unchanged(poison):
    grads = {"a": np.ones((3, 4), np.float32), "b": np.full(5, 10.0, np.float32)}
    grads["a"][1, 2] = poison
    before = {k: v.copy() for k, v in grads.items()}
    total = clip.clip_grad_norm_(grads, 1.0)
    assert not math.isfinite(total)
    for k in grads:  # nothing scaled: the caller sees the norm and skips the step
        np.testing.assert_array_equal(grads[k], before[k])
    with pytest.raises(RuntimeError, match="non-finite"):
        clip.clip_grad_norm_(grads, 1.0, error_if_nonfinite=True)
    np.testing.assert_array_equal(grads["b"], before["b"])


def test_clip_grad_norm_float16_does_not_overflow():
    """Four float16 gradients of 300: the norm is 600 (a float16 sum of squares is inf)."""
    g = [np.full(4, 300, np.float16)]
    assert clip.clip_grad_norm_(g, 1.0) == pytest.approx(600.0)
    np.testing.assert_allclose(g[0], 0.5, rtol=1e-3)
    assert g[0].dtype == np.float16
    torch = pytest.importorskip("torch")
    t = torch.zeros(4, dtype=torch.float16, requires_grad=True)
    t.grad = torch.full((4,), 300, dtype=torch.float16)
    assert float(torch.nn.utils.clip_grad_norm_([t], 1.0)) == pytest.approx(600.0)
    np.testing.assert_allclose(t.grad.numpy(), g[0], rtol=1e-3)


def test_nonfinite_guard_skips_then_stops():
    guard = clip.NonFiniteGuard(patience=3)
    assert guard.step_ok(1.0, 2.0)
    assert not guard.step_ok(float("nan"), 2.0)
    assert not guard.step_ok(1.0, float("inf"))
    assert guard.step_ok(1.0, 2.0)  # a finite step resets the count
    assert not guard.step_ok(1.0, float("nan"))
    assert not guard.step_ok(1.0, float("nan"))
    with pytest.raises(clip.NonFiniteError, match="3 training steps in a row"):
        guard.step_ok(float("inf"), 1.0)
    assert guard.skipped == 5
    with pytest.raises(ValueError):
        clip.NonFiniteGuard(patience=0)


NOT_FLOATING = [np.array(["a"] * 3), np.ones(3, complex), np.ones(3, bool),
                np.array([1, None, 2], dtype=object), np.ones(3, np.int64)]  # fmt: skip


@pytest.mark.parametrize("grad", NOT_FLOATING)
def test_step_refuses_gradients_that_are_not_floating(grad):
    params = {"w": np.zeros(3, np.float32)}
    opt = optim.Adam(params)
    with pytest.raises(TypeError, match="floating-point"):
        opt.step({"w": grad})
    np.testing.assert_array_equal(params["w"], 0)
    assert opt.state == {}


def _stepped_adam(amsgrad=False):
    params = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    opt = optim.Adam(params, lr=0.1, amsgrad=amsgrad)
    opt.step({"w": np.full((2, 3), 0.5, np.float32), "b": np.full(3, 0.5, np.float32)})
    return opt


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda sd: sd["hparams"].update(lr=-1), "lr"),
        (lambda sd: sd["hparams"].update(betas=(0.9, 1.5)), "betas"),
        (lambda sd: sd["hparams"].update(eps="small"), "eps"),
        (lambda sd: sd["state"]["w"].pop("exp_avg_sq"), "buffers"),
        (lambda sd: sd["state"]["w"].update(max_exp_avg_sq=np.zeros((2, 3))), "buffers"),
        (lambda sd: sd["state"]["w"].update(step=np.zeros(3)), "step must be one number"),
        (lambda sd: sd["state"]["w"].update(step=np.array(-1.0)), "step must be one number"),
        (lambda sd: sd["state"]["w"].update(exp_avg=np.array(["a"] * 6).reshape(2, 3)), "dtype"),
        (lambda sd: sd["state"]["w"].update(exp_avg=np.zeros((3, 2))), "shape"),
        (lambda sd: sd["state"].update(w=[1, 2]), "dict of buffers"),
    ],
)
def test_load_state_dict_refuses_what_it_cannot_use(change, match):
    opt = _stepped_adam()
    sd = opt.state_dict()
    change(sd)
    target = _stepped_adam()
    before = target.state_dict()
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(sd)
    after = target.state_dict()
    assert after["hparams"] == before["hparams"]
    for name, bufs in before["state"].items():
        for k, v in bufs.items():
            np.testing.assert_array_equal(after["state"][name][k], v)


def test_load_state_dict_takes_json_lists_and_amsgrad_buffers():
    opt = _stepped_adam(amsgrad=True)
    sd = opt.state_dict()
    sd["hparams"]["betas"] = list(sd["hparams"]["betas"])  # as a checkpoint's JSON gives it
    target = optim.Adam({"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)},
                        amsgrad=True)  # fmt: skip
    target.load_state_dict(sd)
    assert target.betas == (0.9, 0.999) and target.lr == 0.1
    assert set(target.state["w"]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("Adam", {}),
        ("Adam", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
        ("Adam", {"lr": 0.003, "betas": (0.8, 0.95), "maximize": True}),
        ("AdamW", {"lr": 0.01, "weight_decay": 0.1}),
        ("AdamW", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True, "maximize": True}),
    ],
)
def test_fused_adam_has_the_numpy_forms_bits(name, kwargs, dtype, monkeypatch):
    # the fused kernel (contiguous float arrays; the large one on a team of threads) against the
    # NumPy form that strided views take, bit for bit over several steps
    rng = np.random.default_rng(1)
    shapes = {"big": (300, 700), "small": (7, 3)}
    start = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()} for _ in range(4)]
    fused, plain = {k: v.copy() for k, v in start.items()}, {k: v.copy() for k, v in start.items()}
    opt_fused = getattr(optim, name)(fused, **kwargs)
    opt_plain = getattr(optim, name)(plain, **kwargs)
    calls = []
    real = optim._C.adam_step
    monkeypatch.setattr(optim._C, "adam_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    for g in grads:
        opt_fused.step(g)
    assert len(calls) == 2 * len(grads)
    monkeypatch.setattr(optim, "_fused", lambda *arrays: False)
    for g in grads:
        opt_plain.step(g)
    for k in shapes:
        assert fused[k].dtype == dtype
        np.testing.assert_array_equal(fused[k], plain[k], err_msg=k)
        for s in opt_fused.state[k]:
            np.testing.assert_array_equal(opt_fused.state[k][s], opt_plain.state[k][s], err_msg=s)
    assert not np.array_equal(fused["big"], start["big"])


def test_adam_takes_strided_and_foreign_arrays_by_numpy():
    base = np.zeros((6, 8))
    p = {"w": base[:, ::2]}  # a strided view: updated in place through NumPy
    opt = optim.Adam(p, lr=0.1)
    opt.step({"w": np.ones((6, 4))})
    assert np.all(base[:, ::2] < 0) and np.all(base[:, 1::2] == 0)
    hyper = dict(keep=1.0, weight_decay=0.0, one_minus_beta1=0.1, beta2=0.999,
                 one_minus_beta2=0.001, bias2_sqrt=1.0, step_size=0.1, eps=1e-8,
                 maximize=False)  # fmt: skip
    frozen = np.ones(3)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="param is read-only"):
        optim._C.adam_step(frozen, np.ones(3), np.zeros(3), np.zeros(3), None, **hyper)
    m = np.zeros(3)
    with pytest.raises(ValueError, match="exp_avg_sq shares memory with exp_avg"):
        optim._C.adam_step(np.ones(3), np.ones(3), m, m, None, **hyper)
    with pytest.raises(TypeError, match="grad has dtype float32"):
        optim._C.adam_step(np.ones(3), np.ones(3, np.float32), m, np.zeros(3), None, **hyper)
