"""Many-to-one classification of scikit-learn's handwritten digits, read as 8 rows of 8 pixels.

Each 8x8 image is a sequence of 8 steps with 8 features; an LSTM or GRU reads it and a Linear head
classifies its last output. The data ships with scikit-learn (no download); scikit-learn is the
optional ``examples`` extra (``pip install rnnfast[examples]``).
"""

from __future__ import annotations

import time

import numpy as np

from .. import optim
from ..init import as_generator
from ..layers import GRU, LSTM, Linear, Module
from ..losses import softmax_cross_entropy
from ..training import fit

__all__ = ["DigitsClassifier", "load_digits_sequences", "train_digits"]

CELLS = {"lstm": LSTM, "gru": GRU}


def load_digits_sequences(test_size: float = 0.25, seed: int = 0, dtype=np.float32):
    """(x_train, y_train, x_test, y_test); x time-major (8, N, 8) in [0, 1], a stratified split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise SystemExit(
            "the digits example needs scikit-learn: pip install scikit-learn (or rnnfast[examples])"
        ) from e
    data = load_digits()
    images = (data.images / 16.0).astype(dtype)  # (n, 8 rows, 8 pixels)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, data.target, test_size=test_size, random_state=seed, stratify=data.target
    )
    return x_tr.transpose(1, 0, 2).copy(), y_tr, x_te.transpose(1, 0, 2).copy(), y_te


class DigitsClassifier(Module):
    """An LSTM or GRU over the rows, then Linear(hidden, 10) on the last output."""

    def __init__(self, cell: str = "gru", hidden: int = 64, layers: int = 1, *, seed=None,
                 dtype=np.float32):  # fmt: skip
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
        rng = as_generator(seed)
        self.add_module("rnn", CELLS[cell](8, hidden, num_layers=layers, dtype=dtype, seed=rng,
                                           init="orthogonal"))  # fmt: skip
        self.add_module("head", Linear(hidden, 10, dtype=dtype, seed=rng))

    def forward(self, x):
        """x (8, N, 8) -> logits (N, 10)."""
        y, _ = self.rnn(x)
        self._shape = y.shape
        return self.head(y[-1])

    def backward(self, dlogits) -> None:
        dy = np.zeros(self._shape, dtype=dlogits.dtype)
        dy[-1] = self.head.backward(dlogits)
        self.rnn.backward(dy)

    def predict(self, x, batch: int = 512) -> np.ndarray:
        was = self.training
        self.eval()
        try:
            return np.concatenate(
                [self(x[:, i : i + batch]).argmax(-1) for i in range(0, x.shape[1], batch)]
            )
        finally:
            self.train(was)


def train_digits(cell: str = "gru", hidden: int = 64, epochs: int = 30, batch: int = 32,
                 lr: float = 5e-3, seed: int = 0, quiet: bool = False) -> dict:  # fmt: skip
    """Trains a DigitsClassifier with Adam; returns {"test_accuracy", "train_accuracy", ...}."""
    t0 = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_digits_sequences(seed=seed)
    model = DigitsClassifier(cell, hidden, seed=seed)
    opt = optim.Adam(model.params, lr=lr)
    rng = np.random.default_rng(seed)
    n = x_tr.shape[1]

    def epoch_batches():  # a fresh shuffle each epoch
        order = rng.permutation(n)
        return [(x_tr[:, idx], y_tr[idx]) for idx in np.array_split(order, range(batch, n, batch))]

    def accuracy(logits, y):
        return float((logits.argmax(-1) == y).mean())

    history = fit(model, epoch_batches, opt, softmax_cross_entropy, epochs=epochs,
                  val_data=[(x_te, y_te)], clip_grad_norm=5.0, metrics={"accuracy": accuracy},
                  progress=not quiet)  # fmt: skip
    result = {
        "cell": cell,
        "hidden": hidden,
        "epochs": epochs,
        "train_accuracy": float((model.predict(x_tr) == y_tr).mean()),
        "test_accuracy": float((model.predict(x_te) == y_te).mean()),
        "n_train": int(n),
        "n_test": int(x_te.shape[1]),
        "seconds": time.perf_counter() - t0,
        "history": history.records,
    }
    return result
