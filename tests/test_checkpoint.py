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


def test_nonfinite_state_is_never_written_or_read(tmp_path):
    model, opt = trained()
    path = tmp_path / "ck.npz"
    checkpoint.save_checkpoint(path, model, opt)
    good = path.read_bytes()
    model.params["rnn.weight_hh_l0"][0, 0] = np.nan
    with pytest.raises(CheckpointError, match="rnn.weight_hh_l0 holds 1 NaN or infinite"):
        checkpoint.save_checkpoint(path, model, opt)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["ck.npz"]
    model.params["rnn.weight_hh_l0"][0, 0] = 0
    opt.state["rnn.weight_hh_l0"]["exp_avg"][1, 1] = np.inf
    with pytest.raises(CheckpointError, match="exp_avg holds 1"):
        checkpoint.save_checkpoint(path, model, opt)
    assert path.read_bytes() == good
    # written on purpose, it is refused on reading unless asked for
    checkpoint.save_checkpoint(path, model, opt, allow_nonfinite=True)
    target, topt = trained(seed=4)
    before = snapshot(target, topt)
    with pytest.raises(CheckpointError, match="refusing to read"):
        checkpoint.load_checkpoint(path, target, topt)
    assert_same(snapshot(target, topt), before)
    checkpoint.load_checkpoint(path, target, topt, allow_nonfinite=True)
    assert np.isinf(topt.state["rnn.weight_hh_l0"]["exp_avg"][1, 1])


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_save_removes_what_killed_saves_left(tmp_path):
    model, opt = trained()
    path = tmp_path / "ck.npz"
    orphan = tmp_path / f".ck.npz.tmp-{_dead_pid()}-abc123.npz"
    running = tmp_path / f".ck.npz.tmp-{os.getppid()}-def456.npz"  # its writer still runs
    other = tmp_path / f".other.npz.tmp-{_dead_pid()}-xyz.npz"  # another target's
    for p in (orphan, running, other):
        p.write_bytes(b"partial")
    checkpoint.save_checkpoint(path, model, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ck.npz", running.name, other.name]
    )


def test_kill_during_save_leaves_the_old_file_and_no_temporary(tmp_path):
    """SIGKILL a process in the middle of a large save: the old checkpoint is intact, and the
    next save to that path removes the temporary the killed one left."""
    import signal
    import subprocess
    import sys
    import time

    model, opt = trained()
    path = tmp_path / "ck.npz"
    checkpoint.save_checkpoint(path, model, opt)
    good = path.read_bytes()
    code = f"""
import numpy as np, rnnfast
from rnnfast import checkpoint
class Big(rnnfast.layers.Module):
    def __init__(self):
        super().__init__()
        self.add_module("head", rnnfast.Linear(4096, 4096))
print("ready", flush=True)
while True:
    checkpoint.save_checkpoint({str(path)!r}, Big())
"""
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 30
    prefix = ".ck.npz.tmp-"
    while not any(p.name.startswith(prefix) for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline, "the child never started a save"
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(prefix)]
    assert left, "the kill came after the save finished"
    # the old file or a whole new one, never part of one
    data = path.read_bytes()
    if data != good:
        checkpoint.read_checkpoint(path)
    checkpoint.save_checkpoint(path, model, opt)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.npz"]


def test_save_through_a_symlink_keeps_the_link(tmp_path):
    model, opt = trained()
    real = tmp_path / "runs" / "ck.npz"
    real.parent.mkdir()
    link = tmp_path / "latest.npz"
    link.symlink_to(real)
    checkpoint.save_checkpoint(link, model, opt, step=1)
    checkpoint.save_checkpoint(link, model, opt, step=2)
    assert link.is_symlink() and os.path.realpath(link) == str(real)
    assert checkpoint.read_checkpoint(real)[2] == {"step": 2}


def _crafted_files(tmp_path, good: bytes):
    """(name, path) of files that are not well-formed checkpoints, each a different way."""
    import io
    import json
    import zipfile

    def npz(name, members):
        path = tmp_path / f"{name}.npz"
        with open(path, "wb") as f:
            np.savez(f, **members)
        return name, path

    def header(h):
        return np.frombuffer(json.dumps(h).encode(), dtype=np.uint8)

    with np.load(io.BytesIO(good)) as z:
        members = {k: z[k] for k in z.files}
    h = json.loads(members["__meta__"].tobytes().decode())
    files = []
    npy = tmp_path / "array.npy"
    np.save(npy, np.zeros(3))
    files.append(("npy", npy))
    (tmp_path / "empty.npz").write_bytes(b"")
    files.append(("empty", tmp_path / "empty.npz"))
    (tmp_path / "dir.npz").mkdir()
    files.append(("directory", tmp_path / "dir.npz"))
    zpath = tmp_path / "not-npy.npz"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("__meta__.npy", b"this is no npy header")
    files.append(("zip of junk", zpath))
    files.append(npz("header list", {**members, "__meta__": header([1, 2])}))
    files.append(npz("header bytes", {**members, "__meta__": np.frombuffer(b"\xff\xfe", np.uint8)}))
    files.append(npz("meta list", {**members, "__meta__": header({**h, "meta": [1]})}))
    files.append(npz("model names", {**members, "__meta__": header({**h, "model": "abc"})}))
    files.append(npz("optimizer str", {**members, "__meta__": header({**h, "optimizer": "x"})}))
    no_class = header({**h, "optimizer": {"hparams": {}}})
    files.append(npz("optimizer no class", {**members, "__meta__": no_class}))
    files.append(npz("stray member", {**members, "junk": np.zeros(2)}))
    files.append(npz("bare optimizer member", {**members, "optimizer/x": np.zeros(2)}))
    files.append(npz("complex weights",
                     {**members, "model/head.bias": members["model/head.bias"] + 1j}))  # fmt: skip
    files.append(npz("string weights", {**members, "model/head.bias": np.array(["a"] * 5)}))
    files.append(npz("int weights",
                     {**members, "model/head.bias": np.zeros(5, np.int64)}))  # fmt: skip
    files.append(npz("scalar step", {**members, "optimizer/head.bias/step": np.zeros(2)}))
    files.append(npz("negative lr", {**members, "__meta__": header(
        {**h, "optimizer": {**h["optimizer"], "hparams": {**h["optimizer"]["hparams"], "lr": -1}}}
    )}))  # fmt: skip
    missing = {k: v for k, v in members.items() if not k.endswith("/exp_avg_sq")}
    files.append(npz("missing buffer", missing))
    return files


def test_malformed_files_are_checkpoint_errors_that_change_nothing(tmp_path):
    model, opt = trained()
    path = tmp_path / "ck.npz"
    checkpoint.save_checkpoint(path, model, opt)
    target, topt = trained(seed=5)
    before = snapshot(target, topt)
    files = _crafted_files(tmp_path, path.read_bytes())
    assert len(files) == 18
    for name, bad in files:
        try:
            checkpoint.load_checkpoint(bad, target, topt)
        except CheckpointError:
            pass
        else:
            pytest.fail(f"{name}: loaded without an error")
        assert_same(snapshot(target, topt), before)


class Dropped(rnnfast.layers.Module):
    """A model that draws random numbers each training step (dropout, zoneout)."""

    def __init__(self):
        super().__init__()
        self.rnn = rnnfast.LSTM(3, 8, num_layers=2, dropout=0.3, zoneout=0.2, seed=4)
        self.head = rnnfast.Linear(8, 5, seed=5)


def _steps(model, opt, n):
    rng = np.random.default_rng(9)
    out = []
    for _ in range(n):
        x = rng.standard_normal((6, 4, 3)).astype(np.float32)
        y, _ = model.rnn(x)
        loss, d = rnnfast.losses.softmax_cross_entropy(model.head(y), rng.integers(0, 5, (6, 4)))
        model.zero_grad()
        model.rnn.backward(model.head.backward(d))
        opt.step(model.grads)
        out.append(loss)
    return out


def test_resume_with_dropout_is_exact(tmp_path):
    model = Dropped()
    opt = optim.Adam(model.params, lr=0.01)
    _steps(model, opt, 2)
    checkpoint.save_checkpoint(tmp_path / "ck.npz", model, opt)
    straight = _steps(model, opt, 3)  # the uninterrupted run
    fresh = Dropped()
    fresh.rnn.rng = np.random.default_rng(123)  # whatever the generator was, it is restored
    fopt = optim.Adam(fresh.params, lr=0.01)
    checkpoint.load_checkpoint(tmp_path / "ck.npz", fresh, fopt)
    assert _steps(fresh, fopt, 3) == straight  # bit for bit


def test_generators_that_do_not_fit_are_refused_before_anything_changes(tmp_path):
    model = Dropped()
    checkpoint.save_checkpoint(tmp_path / "ck.npz", model)
    other = Dropped()
    other.noise = np.random.default_rng(0)
    before = other.state_dict()
    with pytest.raises(CheckpointError, match=r"random generators \['rnn.rng'\]"):
        checkpoint.load_checkpoint(tmp_path / "ck.npz", other)
    for k, v in other.state_dict().items():
        assert np.array_equal(v, before[k])


def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path):
    model, opt = trained()
    old = os.umask(0o022)
    try:
        checkpoint.save_checkpoint(tmp_path / "a.npz", model)
        assert os.stat(tmp_path / "a.npz").st_mode & 0o777 == 0o644
        os.chmod(tmp_path / "a.npz", 0o600)
        checkpoint.save_checkpoint(tmp_path / "a.npz", model)
        assert os.stat(tmp_path / "a.npz").st_mode & 0o777 == 0o600
        os.umask(0o077)
        checkpoint.save_checkpoint(tmp_path / "b.npz", model)
        assert os.stat(tmp_path / "b.npz").st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_metadata_json_cannot_hold_is_named():
    model, _ = trained()
    with pytest.raises(TypeError, match=r"metadata 'tags' has type set.*sorted list"):
        checkpoint.save_checkpoint("/nonexistent/x.npz", model, tags={"a", "b"})
    with pytest.raises(TypeError, match=r"metadata 'cfg'\['when'\] has type object"):
        checkpoint.save_checkpoint("/nonexistent/x.npz", model, cfg={"when": object()})
    with pytest.raises(TypeError, match="key 3 that is not a str"):
        checkpoint.save_checkpoint("/nonexistent/x.npz", model, cfg={3: "x"})
