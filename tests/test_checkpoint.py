"""rnnfast.checkpoint: exact round trip, atomic writes, and clear errors that change nothing."""

from __future__ import annotations

import os

import numpy as np
import pytest

import rnnfast
from rnnfast import checkpoint, optim
from rnnfast.checkpoint import CheckpointError


class Model(rnnfast.layers.Module):
    def __init__(self, hidden=6, seed=0):
        super().__init__()
        self.add_module("embed", rnnfast.Embedding(5, 3, seed=seed))
        self.add_module("rnn", rnnfast.LSTM(3, hidden, num_layers=2, seed=seed))
        self.add_module("head", rnnfast.Linear(hidden, 5, seed=seed))


def trained(seed=0):
    model = Model(seed=seed)
    opt = optim.Adam(model.params, lr=0.01)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        grads = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in model.params.items()}
        opt.step(grads)
    return model, opt


def snapshot(model, opt):
    return model.state_dict(), opt.state_dict()


def assert_same(a, b):
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys()
    for k in ma:
        np.testing.assert_array_equal(ma[k], mb[k])
    assert oa["hparams"] == ob["hparams"] and oa["state"].keys() == ob["state"].keys()
    for k in oa["state"]:
        for buf in oa["state"][k]:
            np.testing.assert_array_equal(oa["state"][k][buf], ob["state"][k][buf])


def test_round_trip_is_exact(tmp_path):
    model, opt = trained()
    path = tmp_path / "ck.npz"
    checkpoint.save_checkpoint(path, model, opt, step=3, config={"hidden": 6})
    assert model.params["rnn.weight_ih_l0"] is model.rnn.params["weight_ih_l0"]
    fresh, fopt = Model(seed=1), None
    fopt = optim.Adam(fresh.params, lr=0.5)
    meta = checkpoint.load_checkpoint(path, fresh, fopt)
    assert meta == {"step": 3, "config": {"hidden": 6}}
    assert_same(snapshot(fresh, fopt), snapshot(model, opt))
    assert fopt.betas == (0.9, 0.999) and fopt.lr == 0.01
    # the restored optimizer updates the model's own arrays
    before = fresh.rnn.params["weight_hh_l1"].copy()
    fopt.step({"rnn.weight_hh_l1": np.ones_like(before)})
    assert not np.array_equal(before, fresh.rnn.params["weight_hh_l1"])
    assert [p.name for p in tmp_path.iterdir()] == ["ck.npz"]  # no temporary left behind


def test_truncated_and_corrupt_files_change_nothing(tmp_path):
    model, opt = trained()
    path = tmp_path / "ck.npz"
    checkpoint.save_checkpoint(path, model, opt)
    data = path.read_bytes()
    target, topt = trained(seed=5)
    before = snapshot(target, topt)
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    corrupt = bytearray(data)
    i = data.find(b"rnn.weight_hh_l0") + 400  # inside that array's bytes
    corrupt[i] ^= 0xFF
    (tmp_path / "corrupt.npz").write_bytes(bytes(corrupt))
    (tmp_path / "garbage.npz").write_bytes(b"not a zip at all")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    for name, pattern in [("trunc", "truncated or corrupt"), ("corrupt", "truncated or corrupt"),
                          ("garbage", "truncated or corrupt"), ("other", "not an rnnfast"),
                          ("missing", "does not exist")]:  # fmt: skip
        with pytest.raises(CheckpointError, match=pattern):
            checkpoint.load_checkpoint(tmp_path / f"{name}.npz", target, topt)
        assert_same(snapshot(target, topt), before)


def test_mismatched_model_or_optimizer_changes_nothing(tmp_path):
    model, opt = trained()
    path = tmp_path / "ck.npz"
    checkpoint.save_checkpoint(path, model, opt)
    other = Model(hidden=7)
    other_opt = optim.Adam(other.params)
    before = snapshot(other, other_opt)
    with pytest.raises(CheckpointError, match="shape"):
        checkpoint.load_checkpoint(path, other, other_opt)
    assert_same(snapshot(other, other_opt), before)
    same, sgd = Model(seed=3), None
    sgd = optim.SGD(same.params)
    before = same.state_dict()
    with pytest.raises(CheckpointError, match="Adam state, not SGD"):
        checkpoint.load_checkpoint(path, same, sgd)
    for k, v in same.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    plain = tmp_path / "model-only.npz"
    checkpoint.save_checkpoint(plain, model)
    with pytest.raises(CheckpointError, match="no optimizer"):
        checkpoint.load_checkpoint(plain, same, optim.Adam(same.params))
    checkpoint.load_checkpoint(plain, same)
    for k, v in same.state_dict().items():
        np.testing.assert_array_equal(v, model.state_dict()[k])


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    model, opt = trained()
    path = tmp_path / "ck.npz"
    checkpoint.save_checkpoint(path, model, opt, step=1)
    old = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(path, model, opt, step=2)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["ck.npz"]
    with pytest.raises(TypeError, match="JSON"):
        checkpoint.save_checkpoint(path, model, opt, thing=object())
    assert path.read_bytes() == old
