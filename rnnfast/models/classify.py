"""Many-to-one text classification: word tokens, an embedding, a (bidirectional) LSTM or GRU over
the exact lengths, pooling over the valid steps, a linear head; ``python -m rnnfast classify``.

Data: a TSV or CSV file with a header naming its text and label columns (GLUE SST-2's
``sentence<TAB>label`` works as it is), or an IMDB-style folder (``train/pos``, ``train/neg``,
``test/pos``, ``test/neg`` of text files, one review each; any label folder names work).
"""

from __future__ import annotations

import csv
import glob
import math
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from .. import optim
from ..init import as_generator
from ..layers import GRU, LSTM, Embedding, Linear, Module
from ..losses import softmax_cross_entropy
from ..sequences import BucketIterator, lengths_to_mask
from ..training import fit

__all__ = ["ClassifyConfig", "TextClassifier", "Vocabulary", "read_table", "read_folder",
           "tokenize", "load_embeddings", "train_classifier"]  # fmt: skip

PAD, UNK = 0, 1
TEXT_COLUMNS = ("sentence", "text", "review", "document")
LABEL_COLUMNS = ("label", "labels", "sentiment", "class")
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


class DataError(ValueError):
    """A data file or folder that cannot be used, with what is wrong and where."""


def tokenize(text: str) -> list[str]:
    """Lower-cased words (with their apostrophe suffix: don't, it's) and punctuation marks."""
    return _TOKEN.findall(text.lower())


def read_table(path: str, text_column: str | None = None,
               label_column: str | None = None) -> tuple[list[str], list[str]]:  # fmt: skip
    """(texts, labels) from a TSV or CSV file with a header; the delimiter is a tab for .tsv,
    a comma for .csv, else whichever of the two the header line holds. The columns default to
    the first of TEXT_COLUMNS and LABEL_COLUMNS the header has."""
    if not os.path.isfile(path):
        raise DataError(f"{path!r} is not a file")
    with open(path, encoding="utf-8", newline="") as f:
        header_line = f.readline()
        if not header_line.strip():
            raise DataError(f"{path!r} is empty: it needs a header line and at least one row")
        ext = os.path.splitext(path)[1].lower()
        delimiter = {".tsv": "\t", ".csv": ","}.get(ext, "\t" if "\t" in header_line else ",")
        f.seek(0)
        # a TSV's quotes are text (SST-2 has them unbalanced); a CSV's quote fields
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        header = [h.strip() for h in next(reader)]

        def column(wanted, defaults, what):
            if wanted is not None:
                if wanted not in header:
                    raise DataError(f"{path!r} has no column {wanted!r}; its header: {header}")
                return header.index(wanted)
            for name in defaults:
                if name in header:
                    return header.index(name)
            raise DataError(f"{path!r} has no {what} column (looked for {list(defaults)}; its "
                            f"header: {header}); name it with --{what}-column")  # fmt: skip

        ti = column(text_column, TEXT_COLUMNS, "text")
        li = column(label_column, LABEL_COLUMNS, "label")
        texts, labels = [], []
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) <= max(ti, li):
                raise DataError(f"{path!r} line {reader.line_num}: {len(row)} fields, the header "
                                f"has {len(header)}")  # fmt: skip
            texts.append(row[ti])
            labels.append(row[li].strip())
    if not texts:
        raise DataError(f"{path!r} has a header but no rows")
    return texts, labels


def read_folder(path: str) -> dict[str, tuple[list[str], list[str]]]:
    """IMDB's layout: ``{"train": (texts, labels), "test": ...}`` from ``<split>/<label>/*.txt``."""
    splits = {}
    for split in ("train", "test"):
        folders = sorted(d for d in glob.glob(os.path.join(path, split, "*")) if os.path.isdir(d))
        texts, labels = [], []
        for d in folders:
            for name in sorted(glob.glob(os.path.join(d, "*.txt"))):
                with open(name, encoding="utf-8") as f:
                    texts.append(f.read().replace("<br />", " "))
                labels.append(os.path.basename(d))
        if texts:
            splits[split] = (texts, labels)
    if "train" not in splits:
        raise DataError(f"{path!r} has no train/<label>/*.txt files (the IMDB layout)")
    return splits


class Vocabulary:
    """Word ids: 0 padding, 1 out-of-vocabulary, then the words seen at least ``min_freq`` times,
    most frequent first, at most ``max_size`` in all (0: no cut)."""

    def __init__(self, token_lists, min_freq: int = 1, max_size: int = 0) -> None:
        counts = Counter(t for tokens in token_lists for t in tokens)
        words = sorted((w for w, c in counts.items() if c >= min_freq),
                       key=lambda w: (-counts[w], w))  # fmt: skip
        if max_size:
            words = words[: max(max_size - 2, 0)]
        self.words = ["<pad>", "<unk>", *words]
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens) -> np.ndarray:
        return np.array([self.index.get(t, UNK) for t in tokens], dtype=np.int64)


def load_embeddings(path: str, vocab: Vocabulary, rng, dtype=np.float32) -> tuple[np.ndarray, int]:
    """A (len(vocab), dim) table from a GloVe-format text file (``word v1 ... vdim`` per line):
    the file's vector for each word it has, small random values for the rest, zeros for padding.
    Returns the table and how many vocabulary words the file had."""
    table, dim, found = None, None, 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip().split(" ")
            if len(parts) < 2:
                continue
            if dim is None:
                dim = len(parts) - 1
                table = (as_generator(rng).standard_normal((len(vocab), dim)) * 0.1).astype(dtype)
            if len(parts) - 1 != dim:
                raise DataError(f"{path!r} line {n}: {len(parts) - 1} values, line 1 has {dim}")
            i = vocab.index.get(parts[0])
            if i is not None and i > UNK:
                try:
                    table[i] = np.array(parts[1:], dtype=np.float64)
                except ValueError as e:
                    raise DataError(f"{path!r} line {n}: {e}") from e
                found += 1
    if table is None:
        raise DataError(f"{path!r} holds no word vectors")
    table[PAD] = 0
    return table, found


class TextClassifier(Module):
    """Embedding -> LSTM or GRU (bidirectional by default) over the exact lengths -> pooling over
    the valid steps ("last": the final states of the last layer's directions; "mean"; "max") ->
    dropout -> Linear -> logits (N, classes)."""

    def __init__(self, vocab_size: int, classes: int, embed: int = 100, hidden: int = 128,
                 layers: int = 1, cell: str = "lstm", bidirectional: bool = True,
                 pool: str = "max", dropout: float = 0.3, *, seed=None,
                 dtype=np.float32) -> None:  # fmt: skip
        super().__init__()
        if pool not in ("last", "mean", "max"):
            raise ValueError(f"pool must be 'last', 'mean' or 'max', got {pool!r}")
        if cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        self.config = {"vocab_size": int(vocab_size), "classes": int(classes), "embed": int(embed),
                       "hidden": int(hidden), "layers": int(layers), "cell": cell,
                       "bidirectional": bool(bidirectional), "pool": pool,
                       "dropout": float(dropout)}  # fmt: skip
        self.rng = as_generator(seed)
        self.embed = Embedding(vocab_size, embed, padding_idx=PAD, dtype=dtype, seed=self.rng)
        rnn = LSTM if cell == "lstm" else GRU
        between = dropout if layers > 1 else 0.0
        self.rnn = rnn(embed, hidden, num_layers=layers, bidirectional=bidirectional,
                       dropout=between, dtype=dtype, seed=self.rng)  # fmt: skip
        D = 2 if bidirectional else 1
        self.head = Linear(D * hidden, classes, dtype=dtype, seed=self.rng)
        self.pool, self.dropout, self.D = pool, float(dropout), D

    def forward(self, ids, lengths):
        """ids (T, N) padded with 0, lengths (N,) -> logits (N, classes)."""
        lengths = np.asarray(lengths)
        if lengths.size and lengths.min() < 1:
            raise ValueError("every text needs at least one token (an empty text has length 0)")
        y, state = self.rnn(self.embed(ids), lengths=lengths)
        h_n = state[0] if isinstance(state, tuple) else state
        T, N = ids.shape
        if self.pool == "last":  # the last layer's directions, forward first (as torch)
            feats = np.concatenate(list(h_n[-self.D :]), axis=1)
        elif self.pool == "mean":
            feats = y.sum(axis=0) / lengths[:, None].astype(y.dtype)
        else:
            masked = np.where(lengths_to_mask(lengths, T)[..., None], y, -np.inf)
            self._argmax = masked.argmax(axis=0)  # (N, D*H)
            feats = np.take_along_axis(y, self._argmax[None], axis=0)[0]
        keep = None
        if self.training and self.dropout > 0:
            keep = (self.rng.random(feats.shape) >= self.dropout) / (1 - self.dropout)
            feats = feats * keep.astype(feats.dtype)
        self._saved = (y.shape, lengths, keep, isinstance(state, tuple), h_n.shape)
        return self.head(feats)

    def backward(self, dlogits) -> None:
        shape, lengths, keep, has_c, h_shape = self._saved
        dfeats = self.head.backward(dlogits)
        if keep is not None:
            dfeats = dfeats * keep.astype(dfeats.dtype)
        dy, dstate = None, None
        if self.pool == "last":
            dh = np.zeros(h_shape, dtype=dfeats.dtype)
            dh[-self.D :] = np.stack(np.split(dfeats, self.D, axis=1))
            dstate = (dh, None) if has_c else dh
        elif self.pool == "mean":
            dy = np.broadcast_to(dfeats / lengths[:, None].astype(dfeats.dtype), shape).copy()
            dy *= lengths_to_mask(lengths, shape[0])[..., None]
        else:
            dy = np.zeros(shape, dtype=dfeats.dtype)
            np.put_along_axis(dy, self._argmax[None], dfeats[None], axis=0)
        dx, _ = self.rnn.backward(dy, dstate)
        self.embed.backward(dx)


@dataclass
class ClassifyConfig:
    data: str
    valid: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    cell: str = "lstm"
    embed: int = 100
    hidden: int = 128
    layers: int = 1
    bidirectional: bool = True
    pool: str = "max"
    dropout: float = 0.3
    epochs: int = 3
    batch: int = 64
    lr: float = 2e-3
    clip: float = 5.0
    min_freq: int = 2
    max_vocab: int = 30000
    max_len: int = 0
    embeddings: str | None = None
    val_fraction: float = 0.1
    seed: int = 0
    time_limit: float | None = 540.0
    quiet: bool = False


def _report(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> dict:
    """Accuracy, per-class precision, recall and F1, and the confusion matrix (rows: truth)."""
    C = len(names)
    confusion = np.zeros((C, C), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    per_class = {}
    for c, name in enumerate(names):
        tp = int(confusion[c, c])
        predicted, actual = int(confusion[:, c].sum()), int(confusion[c].sum())
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        per_class[name] = {"precision": p, "recall": r, "f1": f1, "support": actual}
    return {"accuracy": float((y_true == y_pred).mean()), "per_class": per_class,
            "confusion": confusion.tolist(), "labels": names}  # fmt: skip


def _format_report(report: dict) -> str:
    names = report["labels"]
    width = max(8, *(len(n) for n in names))
    lines = [f"{'label':>{width}} precision recall     f1 support"]
    for n in names:
        m = report["per_class"][n]
        lines.append(f"{n:>{width}} {m['precision']:9.4f} {m['recall']:6.4f} {m['f1']:6.4f} "
                     f"{m['support']:7d}")  # fmt: skip
    lines.append("confusion (rows: true label, columns: predicted): " + " ".join(
        f"{n}={row}" for n, row in zip(names, report["confusion"], strict=True)))  # fmt: skip
    return "\n".join(lines)


def _encode(texts, vocab, max_len):
    out = []
    for i, t in enumerate(texts):
        ids = vocab.encode(tokenize(t))
        if max_len:
            ids = ids[:max_len]
        if ids.size == 0:
            raise DataError(f"text {i} is empty (every text needs at least one token)")
        out.append(ids)
    return out


def train_classifier(cfg: ClassifyConfig) -> dict:
    """Trains a TextClassifier on ``cfg.data``; returns the held-out report and run's figures."""
    t0 = time.perf_counter()
    if os.path.isdir(cfg.data):
        splits = read_folder(cfg.data)
        train_texts, train_labels = splits["train"]
        held = splits.get("test")
    else:
        train_texts, train_labels = read_table(cfg.data, cfg.text_column, cfg.label_column)
        held = None
    if cfg.valid:
        held = read_table(cfg.valid, cfg.text_column, cfg.label_column)
    rng = np.random.default_rng(cfg.seed)
    if held is None:  # a held-out split of the training file
        if not 0 < cfg.val_fraction < 1:
            raise DataError(f"--val-fraction must be in (0, 1), got {cfg.val_fraction}")
        order = rng.permutation(len(train_texts))
        n_val = max(1, int(round(cfg.val_fraction * len(order))))
        if n_val >= len(order):
            raise DataError(f"{len(order)} rows are too few to hold out a validation split")
        val_idx, tr_idx = order[:n_val], order[n_val:]
        held = ([train_texts[i] for i in val_idx], [train_labels[i] for i in val_idx])
        train_texts = [train_texts[i] for i in tr_idx]
        train_labels = [train_labels[i] for i in tr_idx]
    names = sorted(set(train_labels))
    if len(names) < 2:
        raise DataError(f"the training data has {len(names)} label(s) {names}; need two or more")
    unseen = sorted(set(held[1]) - set(names))
    if unseen:
        raise DataError(f"the held-out data has labels the training data lacks: {unseen} "
                        f"(training labels: {names})")  # fmt: skip
    label_id = {n: i for i, n in enumerate(names)}
    vocab = Vocabulary((tokenize(t) for t in train_texts), cfg.min_freq, cfg.max_vocab)
    x_tr = _encode(train_texts, vocab, cfg.max_len)
    x_va = _encode(held[0], vocab, cfg.max_len)
    y_tr = np.array([label_id[n] for n in train_labels])
    y_va = np.array([label_id[n] for n in held[1]])
    model = TextClassifier(len(vocab), len(names), cfg.embed, cfg.hidden, cfg.layers, cfg.cell,
                           cfg.bidirectional, cfg.pool, cfg.dropout, seed=cfg.seed)  # fmt: skip
    found = None
    if cfg.embeddings:
        table, found = load_embeddings(cfg.embeddings, vocab, rng)
        if table.shape[1] != cfg.embed:
            raise DataError(f"{cfg.embeddings!r} has {table.shape[1]}-dimensional vectors; pass "
                            f"--embed {table.shape[1]}")  # fmt: skip
        model.embed.params["weight"][...] = table
    opt = optim.Adam(model.params, lr=cfg.lr)
    train = BucketIterator(x_tr, y_tr, cfg.batch, rng=rng)
    val = BucketIterator(x_va, y_va, 256, shuffle=False)

    def accuracy(logits, y):
        return float((logits.argmax(-1) == y).mean())

    history = fit(model, train, opt, softmax_cross_entropy, epochs=cfg.epochs, val_data=val,
                  clip_grad_norm=cfg.clip or None, metrics={"accuracy": accuracy},
                  progress=not cfg.quiet, time_limit=cfg.time_limit)  # fmt: skip
    model.eval()
    pred = np.empty(len(x_va), dtype=np.int64)
    for x, lengths, _, idx in val:
        pred[idx] = model(x, lengths).argmax(-1)
    report = _report(y_va, pred, names)
    return {
        **report,
        "report": _format_report(report),
        "n_train": len(x_tr),
        "n_heldout": len(x_va),
        "vocabulary": len(vocab),
        "embeddings_found": found,
        "epochs_run": len(history),
        "stopped_by_time_limit": bool(history.records[-1].get("stopped_by_time_limit")),
        "history": history.records,
        "seconds": time.perf_counter() - t0,
        "parameters": model.num_parameters(),
        "config": asdict(cfg),
        "chance": float(max(np.bincount(y_va, minlength=len(names))) / len(y_va)),
        "log_loss_uniform": math.log(len(names)),
    }
