"""rnnfast.training.fit: the loop does what a hand-written one does, and its history, schedules,
validation, variable-length batches, progress output and misuse."""

from __future__ import annotations

import numpy as np
import pytest

import rnnfast
from rnnfast import losses, lr_scheduler, optim, training


def _regression(seed=0, n=64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]], np.float32)).astype(np.float32)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def _model():
    return rnnfast.Sequential(rnnfast.Linear(3, 8, seed=0), rnnfast.Linear(8, 1, seed=1))


def test_fit_is_the_hand_written_loop():
    data = _regression()
    model = _model()
    opt = optim.Adam(model.params, lr=1e-2)
    history = training.fit(model, data, opt, losses.mse_loss, epochs=3, clip_grad_norm=1.0,
                           progress=False)  # fmt: skip
    ref = _model()
    ropt = optim.Adam(ref.params, lr=1e-2)
    epoch_losses = []
    for _ in range(3):
        total = 0.0
        for x, y in data:
            loss, d = losses.mse_loss(ref(x), y)
            ref.zero_grad()
            ref.backward(d)
            rnnfast.clip.clip_grad_norm_(ref.grads, 1.0)
            ropt.step(ref.grads)
            total += loss * len(y)
        epoch_losses.append(total / 64)
    assert history["train_loss"] == pytest.approx(epoch_losses, rel=1e-12)
    for k, v in model.params.items():
        np.testing.assert_array_equal(v, ref.params[k])
    assert history["epoch"] == [1, 2, 3] and history["train_loss"][-1] < history["train_loss"][0]


def test_validation_metrics_schedules_and_continuing():
    data = _regression()
    model = _model()
    opt = optim.SGD(model.params, lr=0.05)
    sched = lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    mae = {"mae": lambda out, y: float(np.abs(out - y).mean())}
    h = training.fit(model, data, opt, losses.mse_loss, epochs=2, val_data=data[:1],
                     scheduler=sched, metrics=mae, progress=False)  # fmt: skip
    assert h["lr"] == [0.05, 0.025] and opt.lr == 0.0125
    assert {"train_mae", "val_mae", "val_loss", "seconds"} <= h.keys()
    # the last epoch's validation is evaluate() on the trained model
    assert h["val_loss"][-1] == pytest.approx(
        training.evaluate(model, data[:1], losses.mse_loss)["loss"], rel=1e-12
    )
    h = training.fit(model, data, opt, losses.mse_loss, epochs=1, history=h, progress=False)
    assert h["epoch"] == [1, 2, 3]
    flat = [(np.zeros((4, 3), np.float32), np.ones((4, 1), np.float32))]
    frozen = rnnfast.Sequential(rnnfast.Linear(3, 1, seed=0))
    fopt = optim.SGD(frozen.params, lr=0.0)
    plateau = lr_scheduler.ReduceLROnPlateau(fopt, patience=0, factor=0.5)
    fopt.lr = 1e-30  # no progress: the plateau halves the rate every epoch after the first
    training.fit(frozen, flat, fopt, losses.mse_loss, epochs=3, scheduler=plateau,
                 progress=False)  # fmt: skip
    assert fopt.lr == pytest.approx(1e-30 / 4)


def test_bucketed_variable_length_sequences():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 9, size=rng.integers(1, 12)) for _ in range(40)]
    labels = np.array([int(s.sum() % 2) for s in seqs])

    class Classifier(rnnfast.Module):
        def __init__(self):
            super().__init__()
            self.embed = rnnfast.Embedding(9, 8, padding_idx=0, seed=0)
            self.rnn = rnnfast.GRU(8, 16, seed=1)
            self.head = rnnfast.Linear(16, 2, seed=2)

        def forward(self, ids, lengths):
            _, h = self.rnn(self.embed(ids), lengths=lengths)
            self._T = ids.shape
            return self.head(h[-1])

        def backward(self, dlogits):
            dh = self.head.backward(dlogits)
            dy, _ = self.rnn.backward(None, dh[None])
            self.embed.backward(dy)

    model = Classifier()
    data = rnnfast.sequences.BucketIterator(seqs, labels, batch_size=8, rng=0)
    h = training.fit(model, data, optim.Adam(model.params, lr=1e-2),
                     losses.softmax_cross_entropy, epochs=4, val_data=data,
                     progress=False)  # fmt: skip
    assert len(h) == 4 and all(np.isfinite(h["val_loss"]))


def test_history_save_load_and_plot(tmp_path):
    h = training.History([{"epoch": 1, "train_loss": 1.0, "val_loss": float("nan")},
                          {"epoch": 2, "train_loss": 0.5, "val_loss": 0.7}])  # fmt: skip
    h.save(tmp_path / "h.json")
    back = training.History.load(tmp_path / "h.json")
    assert back["train_loss"] == [1.0, 0.5] and back["val_loss"] == [None, 0.7]
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an rnnfast history"):
        training.History.load(tmp_path / "bad.json")
    pytest.importorskip("matplotlib")
    h.plot(tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_progress_lines_and_skipped_steps(capsys):
    data = _regression()
    poisoned = data[:2] + [(data[2][0] * np.nan, data[2][1])] + data[3:]
    model = _model()
    h = training.fit(model, poisoned, optim.SGD(model.params, lr=0.01), losses.mse_loss,
                     epochs=1)  # fmt: skip
    err = capsys.readouterr().err
    assert "step skipped" in err and "epoch 1: lr 0.01, train_loss" in err
    assert np.isfinite(h["train_loss"][0])
    assert all(np.isfinite(v).all() for v in model.params.values())


def test_fit_misuse():
    model, data = _model(), _regression()
    opt = optim.SGD(model.params, lr=0.1)
    with pytest.raises(TypeError, match="one-shot iterator"):
        training.fit(model, (b for b in data), opt, losses.mse_loss, epochs=2, progress=False)
    with pytest.raises(TypeError, match=r"\(x, target\)"):
        training.fit(model, [data[0][0]], opt, losses.mse_loss, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        training.fit(model, data, opt, losses.mse_loss, epochs=0)
    with pytest.raises(TypeError, match="rnnfast optimizer"):
        training.fit(model, data, {"lr": 1}, losses.mse_loss)
    with pytest.raises(ValueError, match="no batches"):
        training.fit(model, [], opt, losses.mse_loss, progress=False)


def test_time_limit_ends_training_early():
    data = _regression() * 50  # 200 batches an epoch
    model = _model()
    h = training.fit(model, data, optim.SGD(model.params, lr=0.01), losses.mse_loss, epochs=100,
                     val_data=data[:1], time_limit=0.05, progress=False)  # fmt: skip
    assert len(h) < 100 and h.records[-1]["stopped_by_time_limit"]
    assert "val_loss" in h.records[-1]
