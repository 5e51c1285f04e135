"""A training loop for library users: epochs over batches, loss, backward, clipping, optimizer and
scheduler steps, validation, a progress bar with an ETA, and a history to save and plot.

    model = rnnfast.Sequential(rnnfast.Embedding(V, 32), rnnfast.GRU(32, 64), rnnfast.Linear(64, 2))
    history = rnnfast.training.fit(model, train_batches, rnnfast.optim.Adam(model.params),
                                   rnnfast.losses.softmax_cross_entropy, epochs=5,
                                   val_data=val_batches, clip_grad_norm=5.0)
    history.save("history.json"); history.plot("history.png")

A batch is ``(x, target)``, ``(x, target, forward_kwargs)`` (a dict such as ``{"lengths": l}``),
or what rnnfast.sequences.BucketIterator yields (its lengths go to the model's forward). The model
is any Module whose ``forward`` returns one array and whose ``backward`` takes its gradient
(Sequential, or a subclass of Module). ``loss_fn(output, target)`` returns ``(loss, doutput)``, as
every loss in rnnfast.losses does. The bar is tqdm's where tqdm is installed (the ``progress``
extra), plain lines otherwise.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from .clip import NonFiniteGuard, clip_grad_norm_, grad_norm
from .layers import Module
from .lr_scheduler import LRScheduler, ReduceLROnPlateau
from .optim import Optimizer
from .sequences import BucketIterator

__all__ = ["fit", "evaluate", "History", "ProgressBar"]


class ProgressBar:
    """One line of progress with rate and ETA on stderr: tqdm's bar where tqdm is installed;
    otherwise a line redrawn in place on a terminal, or a full line every ``every`` seconds
    (and at the end) when stderr is a file or a pipe."""

    def __init__(self, total: int | None, desc: str = "", *, quiet: bool = False,
                 every: float = 10.0) -> None:  # fmt: skip
        self.total, self.desc, self.quiet, self.every = total, desc, quiet, every
        self.count, self.start, self.last_line = 0, time.perf_counter(), 0.0
        self._done_at_start = 0
        self.tty = sys.stderr.isatty()
        self._tqdm = None
        if not quiet:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._tqdm = tqdm(total=total, desc=desc or None, leave=True, file=sys.stderr)

    def _eta(self) -> str:
        elapsed = time.perf_counter() - self.start
        done = self.count - self._done_at_start
        if not self.total or done <= 0:
            return f"{elapsed:.0f}s"
        left = elapsed / done * max(self.total - self.count, 0)
        return f"{elapsed:.0f}s<{left:.0f}s"

    def update(self, n: int = 1, postfix: str = "") -> None:
        """Advances the bar by n and shows ``postfix`` (the loss, a rate...) after it."""
        self.count += n
        if self.quiet:
            return
        if self._tqdm is not None:
            self._tqdm.update(n)
            if postfix:
                self._tqdm.set_postfix_str(postfix, refresh=False)
            return
        width = 24
        total = self.total or 0
        done = int(width * self.count / total) if total else 0
        bar = f"[{'#' * done}{'.' * (width - done)}] " if total else ""
        head = f"{self.desc} " if self.desc else ""
        line = f"{head}{bar}{self.count}/{total or '?'} {self._eta()} {postfix}".rstrip()
        if self.tty:
            sys.stderr.write("\r" + line[:150] + "\x1b[K")
            sys.stderr.flush()
        elif time.monotonic() - self.last_line > self.every or self.count == total:
            self.last_line = time.monotonic()
            print(line, file=sys.stderr, flush=True)

    def set_count(self, count: int) -> None:
        """Starts the bar at ``count`` done (a resumed run); the ETA counts from here."""
        self.count, self.start = count, time.perf_counter()
        self._done_at_start = count
        if self._tqdm is not None:
            self._tqdm.n = count
            self._tqdm.refresh()

    def print(self, text: str) -> None:
        """A message on its own line, above the bar."""
        if self.quiet:
            return
        if self._tqdm is not None:
            self._tqdm.write(text, file=sys.stderr)
            return
        if self.tty:
            sys.stderr.write("\r\x1b[K")
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self.tty and not self.quiet:
            sys.stderr.write("\n")


def pyplot(who_needs: str):
    """matplotlib.pyplot on the Agg backend (files, no display), or an ImportError that says
    ``who_needs`` it and how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(f"{who_needs} matplotlib: pip install matplotlib") from e
    return plt


class History:
    """One record per epoch: ``{"epoch", "train_loss", "val_loss", "lr", "seconds", ...}`` with
    each metric as ``train_<name>`` and ``val_<name>``. ``history["val_loss"]`` is that column."""

    def __init__(self, records: list[dict] | None = None) -> None:
        self.records: list[dict] = list(records or [])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: str) -> list:
        return [r.get(key) for r in self.records]

    def __repr__(self) -> str:
        return f"History({len(self.records)} epochs, keys {sorted(self.keys())})"

    def keys(self) -> set[str]:
        return {k for r in self.records for k in r}

    def save(self, path: str | os.PathLike) -> None:
        """Writes the records as JSON (NaN as null)."""
        clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                  for k, v in r.items()} for r in self.records]  # fmt: skip
        with open(path, "w") as f:
            json.dump({"format": "rnnfast-history", "records": clean}, f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> History:
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{os.fspath(path)!r} is not a history file: {e}") from e
        if not isinstance(data, dict) or data.get("format") != "rnnfast-history":
            raise ValueError(f"{os.fspath(path)!r} is not an rnnfast history file")
        records = data.get("records")
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError(f"{os.fspath(path)!r} has no list of epoch records")
        return cls(records)

    def plot(self, path: str | os.PathLike, keys: Iterable[str] | None = None) -> None:
        """Plots ``keys`` (default: every loss) against the epoch into an image file; needs
        matplotlib (the ``bench`` extra, or pip install matplotlib)."""
        plt = pyplot("History.plot needs")
        keys = sorted(k for k in self.keys() if k.endswith("loss")) if keys is None else list(keys)
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in keys:
            pts = [(r["epoch"], r[k]) for r in self.records if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=k)
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _unpack(batch, bucketed: bool):
    """(x, target, forward kwargs) of one batch."""
    if bucketed:  # BucketIterator: (x, lengths, targets, index)
        x, lengths, y, _ = batch
        return x, y, {"lengths": lengths}
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        what = type(batch).__name__
        if isinstance(batch, (tuple, list)):
            what += f" of {len(batch)}"
        raise TypeError(
            f"each batch must be (x, target) or (x, target, forward_kwargs), got {what}"
        )
    kwargs = batch[2] if len(batch) == 3 else {}
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"a batch's third entry must be a dict of forward kwargs, got {kwargs!r}")
    return batch[0], batch[1], dict(kwargs)


def _size(target) -> int:
    return int(np.shape(target)[0]) if np.ndim(target) else 1


def _batches(data):
    """A fresh iterator over the batches each epoch (a list, an iterator class, or a callable)."""
    items = data() if callable(data) else data
    if iter(items) is items and not callable(data):
        raise TypeError(
            "the data is a one-shot iterator (a generator?), which the second epoch would find "
            "empty: pass a list of batches, a re-iterable object, or a function returning the "
            "batches of an epoch"
        )
    return items


def evaluate(model: Module, data, loss_fn: Callable,
             metrics: Mapping[str, Callable] | None = None) -> dict:  # fmt: skip
    """Mean loss and metrics over ``data`` in eval mode (weighted by each batch's size)."""
    was = model.training
    model.eval()
    sums, count = {}, 0
    try:
        bucketed = isinstance(data, BucketIterator)
        for batch in _batches(data):
            x, y, kwargs = _unpack(batch, bucketed)
            out = model(x, **kwargs)
            n = _size(y)
            sums["loss"] = sums.get("loss", 0.0) + float(loss_fn(out, y)[0]) * n
            for name, fn in (metrics or {}).items():
                sums[name] = sums.get(name, 0.0) + float(fn(out, y)) * n
            count += n
    finally:
        model.train(was)
    if not count:
        raise ValueError("evaluate got no batches")
    return {k: v / count for k, v in sums.items()}


def fit(model: Module, train_data, optimizer: Optimizer, loss_fn: Callable, *, epochs: int = 1,
        val_data=None, scheduler=None, scheduler_interval: str = "epoch",
        clip_grad_norm: float | None = None, metrics: Mapping[str, Callable] | None = None,
        progress: bool = True, history: History | None = None,
        time_limit: float | None = None) -> History:  # fmt: skip
    """Trains ``model`` for ``epochs`` passes over ``train_data``; returns the History.

    Each step: forward, ``loss_fn``, zero_grad, backward, clipping to ``clip_grad_norm`` (if
    given), ``optimizer.step(model.grads)``; a step whose loss or gradient norm is not finite is
    skipped (five in a row raise rnnfast.clip.NonFiniteError). ``scheduler`` steps once an epoch
    (or once a step with ``scheduler_interval="step"``); a ReduceLROnPlateau steps on the
    validation loss (the training loss without val_data). ``metrics`` maps names to
    ``fn(output, target) -> float``, averaged over each epoch's batches. Passing the History of
    an earlier call continues its epoch count.
    """
    if not isinstance(model, Module):
        raise TypeError(f"fit needs an rnnfast Module, got {type(model).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"fit needs an rnnfast optimizer, got {type(optimizer).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if scheduler_interval not in ("epoch", "step"):
        raise ValueError(
            f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}"
        )
    if scheduler is not None and not isinstance(scheduler, (LRScheduler, ReduceLROnPlateau)):
        raise TypeError(f"scheduler must be an rnnfast.lr_scheduler schedule, got {scheduler!r}")
    if isinstance(scheduler, ReduceLROnPlateau) and scheduler_interval == "step":
        raise ValueError(
            "a ReduceLROnPlateau steps on an epoch's loss: use scheduler_interval='epoch'"
        )
    if clip_grad_norm is not None and not clip_grad_norm > 0:
        raise ValueError(f"clip_grad_norm must be > 0 or None, got {clip_grad_norm!r}")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds or None, got {time_limit!r}")
    history = History() if history is None else history
    guard = NonFiniteGuard()
    t_start, out_of_time = time.perf_counter(), False
    bucketed = isinstance(train_data, BucketIterator)
    first = len(history) + 1
    for epoch in range(first, first + epochs):
        batches = _batches(train_data)
        total = len(batches) if hasattr(batches, "__len__") else None
        bar = ProgressBar(total, f"epoch {epoch}/{first + epochs - 1}", quiet=not progress)
        t0, sums, count = time.perf_counter(), {}, 0
        model.train()
        for batch in batches:
            x, y, kwargs = _unpack(batch, bucketed)
            out = model(x, **kwargs)
            loss, dout = loss_fn(out, y)
            model.zero_grad()
            model.backward(dout)
            norm = (clip_grad_norm_(model.grads, clip_grad_norm) if clip_grad_norm
                    else grad_norm(model.grads))  # fmt: skip
            if not guard.step_ok(float(loss), norm):
                bar.print(f"epoch {epoch}: non-finite loss {loss} or gradient norm {norm}; step "
                          "skipped")  # fmt: skip
                continue
            optimizer.step(model.grads)
            if scheduler is not None and scheduler_interval == "step":
                scheduler.step()
            n = _size(y)
            sums["loss"] = sums.get("loss", 0.0) + float(loss) * n
            for name, fn in (metrics or {}).items():
                sums[name] = sums.get(name, 0.0) + float(fn(out, y)) * n
            count += n
            bar.update(1, f"loss {sums['loss'] / count:.4f}")
            if time_limit is not None and time.perf_counter() - t_start > time_limit:
                out_of_time = True
                break
        bar.close()
        if not count:
            raise ValueError(f"epoch {epoch} trained on no batches (empty data, or every step "
                             "skipped)")  # fmt: skip
        record = {"epoch": epoch, "lr": float(optimizer.lr)}
        record.update({f"train_{k}": v / count for k, v in sums.items()})
        if val_data is not None:
            record.update({f"val_{k}": v for k, v in
                           evaluate(model, val_data, loss_fn, metrics).items()})  # fmt: skip
        record["seconds"] = time.perf_counter() - t0
        if out_of_time:
            record["stopped_by_time_limit"] = True
        history.records.append(record)
        if progress:
            hidden = ("epoch", "seconds", "stopped_by_time_limit")
            shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in hidden)
            print(f"epoch {epoch}: {shown} ({record['seconds']:.1f} s)", file=sys.stderr,
                  flush=True)  # fmt: skip
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(record.get("val_loss", record["train_loss"]))
        elif scheduler is not None and scheduler_interval == "epoch":
            scheduler.step()
        if out_of_time:
            if progress:
                print(f"time limit of {time_limit:g} s reached in epoch {epoch}", file=sys.stderr)
            break
    return history
