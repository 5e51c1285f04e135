"""Sequence to sequence with attention: a bidirectional encoder over the exact source lengths, a
decoder LSTM or GRU started from the encoder's final states, Luong's global attention over the
encoder outputs (any rnnfast.Attention score) and an attentional layer
h~ = tanh(W_c [context; h]) before the output softmax. Teacher forcing trains the decoder over all
target steps in one fused call; decoding is greedy, step by step. ``python -m rnnfast seq2seq``.

Not yet here: Luong's input feeding (it makes training step by step), beam search, BLEU, the
translate command and attention plots (issue 15).
"""

from __future__ import annotations

import calendar
import datetime as dt
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from .. import optim
from ..init import as_generator
from ..layers import GRU, LSTM, Attention, Embedding, Linear, Module
from ..losses import softmax_cross_entropy
from ..sequences import pad_sequences
from ..training import evaluate, fit

__all__ = ["Seq2Seq", "TokenVocab", "read_pairs", "date_pairs", "Seq2SeqConfig", "train_seq2seq"]

PAD, BOS, EOS, UNK = 0, 1, 2, 3


class DataError(ValueError):
    """A pairs file that cannot be used, with what is wrong and where."""


class TokenVocab:
    """Characters or words to ids: 0 padding, 1 start, 2 end, 3 unknown, then by frequency."""

    def __init__(self, texts, tokens: str = "char") -> None:
        if tokens not in ("char", "word"):
            raise ValueError(f"tokens must be 'char' or 'word', got {tokens!r}")
        self.tokens = tokens
        counts: dict[str, int] = {}
        for t in texts:
            for tok in self.split(t):
                counts[tok] = counts.get(tok, 0) + 1
        self.words = ["<pad>", "<s>", "</s>", "<unk>",
                      *sorted(counts, key=lambda w: (-counts[w], w))]  # fmt: skip
        self.index = {w: i for i, w in enumerate(self.words)}

    def split(self, text: str) -> list[str]:
        return list(text) if self.tokens == "char" else text.split()

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(t, UNK) for t in self.split(text)]

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            if i == EOS:
                break
            if i > UNK:
                out.append(self.words[i])
        return ("" if self.tokens == "char" else " ").join(out)


def read_pairs(path: str) -> list[tuple[str, str]]:
    """``source<TAB>target`` per line (Tatoeba/Anki's layout; further columns ignored)."""
    if not os.path.isfile(path):
        raise DataError(f"{path!r} is not a file")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) < 2 or not cols[0].strip() or not cols[1].strip():
                raise DataError(f"{path!r} line {n}: expected source<TAB>target, got {line[:60]!r}")
            pairs.append((cols[0].strip(), cols[1].strip()))
    if not pairs:
        raise DataError(f"{path!r} holds no pairs")
    return pairs


_FORMATS = ["%d %B %Y", "%B %d, %Y", "%d %b %Y", "%b %d %Y", "%A, %d %B %Y", "%a %d %b %Y",
            "%d.%m.%Y", "%Y/%m/%d", "%B %Y, %d", "%d %B, %Y"]  # fmt: skip


def date_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Dates written the ways people write them (English month and day names, several orders,
    upper or lower case, stray spaces) paired with ISO 8601; made here, nothing downloaded."""
    rng = np.random.default_rng(seed)
    start, span = dt.date(1950, 1, 1).toordinal(), 100 * 365
    pairs = []
    for _ in range(n):
        d = dt.date.fromordinal(start + int(rng.integers(span)))
        fmt = _FORMATS[int(rng.integers(len(_FORMATS)))]
        # English names whatever the machine's locale (strftime's would follow it)
        fmt = (fmt.replace("%B", calendar.month_name[d.month])
               .replace("%b", calendar.month_abbr[d.month])
               .replace("%A", calendar.day_name[d.weekday()])
               .replace("%a", calendar.day_abbr[d.weekday()]))  # fmt: skip
        text = d.strftime(fmt)
        case = rng.random()
        text = text.lower() if case < 0.3 else (text.upper() if case < 0.4 else text)
        if rng.random() < 0.2:
            text = text.replace(" ", "  ", 1)
        pairs.append((text, d.isoformat()))
    return pairs


class Seq2Seq(Module):
    """Encoder-decoder with attention; see the module docstring."""

    def __init__(self, src_vocab: int, tgt_vocab: int, embed: int = 32, hidden: int = 128,
                 layers: int = 1, cell: str = "lstm", score: str = "bilinear", *, seed=None,
                 dtype=np.float32) -> None:  # fmt: skip
        super().__init__()
        if cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        self.config = {"src_vocab": int(src_vocab), "tgt_vocab": int(tgt_vocab),
                       "embed": int(embed), "hidden": int(hidden), "layers": int(layers),
                       "cell": cell, "score": score}  # fmt: skip
        rng = as_generator(seed)
        rnn = LSTM if cell == "lstm" else GRU
        H = hidden
        self.src_embed = Embedding(src_vocab, embed, padding_idx=PAD, dtype=dtype, seed=rng)
        self.encoder = rnn(embed, H, num_layers=layers, bidirectional=True, dtype=dtype, seed=rng)
        self.bridge = Linear(2 * H, H, dtype=dtype, seed=rng)  # the decoder's h0 (and c0)
        self.tgt_embed = Embedding(tgt_vocab, embed, padding_idx=PAD, dtype=dtype, seed=rng)
        self.decoder = rnn(embed, H, dtype=dtype, seed=rng)
        self.attention = Attention(H, 2 * H, score, dtype=dtype, seed=rng)
        self.combine = Linear(3 * H, H, dtype=dtype, seed=rng)
        self.out = Linear(H, tgt_vocab, dtype=dtype, seed=rng)
        self.has_c, self.H = cell == "lstm", H

    def encode(self, src, src_lengths):
        keys, state = self.encoder(self.src_embed(src), lengths=src_lengths)
        h_n = state[0] if self.has_c else state
        last = np.concatenate([h_n[-2], h_n[-1]], axis=1)  # the top layer's two directions
        bridged = self.bridge(last)
        h0 = np.tanh(bridged)
        return keys, h0

    def forward(self, src, src_lengths, tgt_in):
        """src (T, N) and tgt_in (S, N) ids (tgt_in starts with <s>) -> logits (S, N, V)."""
        keys, h0 = self.encode(src, src_lengths)
        state0 = (h0[None], np.zeros_like(h0)[None]) if self.has_c else h0[None]
        y, _ = self.decoder(self.tgt_embed(tgt_in), state0)
        context, _ = self.attention(y, keys, src_lengths)
        att = np.tanh(self.combine(np.concatenate([context, y], axis=2)))
        self._saved = (h0, att, y.shape[2])
        return self.out(att)

    def backward(self, dlogits) -> None:
        h0, att, H = self._saved
        datt = self.out.backward(dlogits) * (1 - att * att)
        dcat = self.combine.backward(datt)
        dcontext, dy = dcat[..., : 2 * H], dcat[..., 2 * H :]
        dq, dkeys = self.attention.backward(dcontext)
        dx_dec, dstate0 = self.decoder.backward(dy + dq)
        self.tgt_embed.backward(dx_dec)
        dh0 = (dstate0[0] if self.has_c else dstate0)[0]
        dlast = self.bridge.backward(dh0 * (1 - h0 * h0))
        dh_n = np.zeros((self.encoder.num_layers * 2, *dlast.shape[:1], H), dtype=dlast.dtype)
        dh_n[-2], dh_n[-1] = dlast[:, :H], dlast[:, H:]
        dx_enc, _ = self.encoder.backward(dkeys, (dh_n, None) if self.has_c else dh_n)
        self.src_embed.backward(dx_enc)

    def greedy(self, src, src_lengths, max_len: int) -> np.ndarray:
        """Decodes (max_len, N) ids greedily, one fused decoder step at a time."""
        was = self.training
        self.eval()
        try:
            keys, h0 = self.encode(src, src_lengths)
            N = src.shape[1]
            state = (h0[None], np.zeros_like(h0)[None]) if self.has_c else h0[None]
            token = np.full(N, BOS)
            out = np.full((max_len, N), PAD)
            done = np.zeros(N, bool)
            for t in range(max_len):
                y, state = self.decoder(self.tgt_embed(token[None]), state)
                context, _ = self.attention(y[0], keys, src_lengths)
                att = np.tanh(self.combine(np.concatenate([context, y[0]], axis=1)))
                token = np.where(done, PAD, self.out(att).argmax(-1))
                out[t] = token
                done |= token == EOS
                if done.all():
                    break
            return out
        finally:
            self.train(was)


@dataclass
class Seq2SeqConfig:
    data: str | None = None
    tokens: str = "char"
    cell: str = "lstm"
    score: str = "bilinear"
    embed: int = 32
    hidden: int = 128
    layers: int = 1
    epochs: int = 6
    batch: int = 64
    lr: float = 3e-3
    clip: float = 5.0
    pairs: int = 20000
    seed: int = 0
    time_limit: float | None = 540.0
    quiet: bool = False


class _Batches:
    """Batches of (src, tgt) id lists as fit wants them, reshuffled each epoch."""

    def __init__(self, src, tgt, batch, rng, shuffle=True):
        self.src, self.tgt, self.batch, self.rng, self.shuffle = src, tgt, batch, rng, shuffle

    def __len__(self):
        return -(-len(self.src) // self.batch)

    def __iter__(self):
        order = self.rng.permutation(len(self.src)) if self.shuffle else np.arange(len(self.src))
        for i in range(0, len(order), self.batch):
            idx = order[i : i + self.batch]
            src, src_len = pad_sequences([self.src[j] for j in idx], padding_value=PAD)
            tin, _ = pad_sequences([[BOS, *self.tgt[j]] for j in idx], padding_value=PAD)
            tout, _ = pad_sequences([[*self.tgt[j], EOS] for j in idx], padding_value=PAD)
            yield src, tout, {"src_lengths": src_len, "tgt_in": tin}


def _masked_loss(logits, target):
    return softmax_cross_entropy(logits, target, mask=target != PAD)


def train_seq2seq(cfg: Seq2SeqConfig) -> dict:
    """Trains on cfg.data's pairs (or the dates task) and reports on a held-out test split."""
    t0 = time.perf_counter()
    pairs = read_pairs(cfg.data) if cfg.data else date_pairs(cfg.pairs, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(pairs))
    n_test = n_val = max(1, len(pairs) // 10)
    if len(pairs) < 3 * n_test:
        raise DataError(f"{len(pairs)} pairs are too few to split into train, validation, test")
    test = [pairs[i] for i in order[:n_test]]
    val = [pairs[i] for i in order[n_test : n_test + n_val]]
    train = [pairs[i] for i in order[n_test + n_val :]]
    src_vocab = TokenVocab([s for s, _ in train], cfg.tokens)
    tgt_vocab = TokenVocab([t for _, t in train], cfg.tokens)

    def ids(split):
        return [src_vocab.encode(s) for s, _ in split], [tgt_vocab.encode(t) for _, t in split]

    model = Seq2Seq(len(src_vocab), len(tgt_vocab), cfg.embed, cfg.hidden, cfg.layers, cfg.cell,
                    cfg.score, seed=cfg.seed)  # fmt: skip
    opt = optim.Adam(model.params, lr=cfg.lr)
    tr_s, tr_t = ids(train)
    va_s, va_t = ids(val)

    def token_accuracy(logits, target):
        keep = target != PAD
        return float((logits.argmax(-1) == target)[keep].mean())

    history = fit(model, _Batches(tr_s, tr_t, cfg.batch, rng),
                  opt, _masked_loss, epochs=cfg.epochs,
                  val_data=_Batches(va_s, va_t, 256, rng, shuffle=False),
                  clip_grad_norm=cfg.clip or None, metrics={"token_accuracy": token_accuracy},
                  progress=not cfg.quiet, time_limit=cfg.time_limit)  # fmt: skip
    te_s, te_t = ids(test)
    max_len = max(len(t) for t in te_t) + 5
    hyps = []
    for i in range(0, len(te_s), 256):
        src, lengths = pad_sequences(te_s[i : i + 256], padding_value=PAD)
        out = model.greedy(src, lengths, max_len)
        hyps += [tgt_vocab.decode(out[:, n]) for n in range(out.shape[1])]
    refs = [t for _, t in test]
    exact = float(np.mean([h == r for h, r in zip(hyps, refs, strict=True)]))
    test_metrics = evaluate(
        model,
        _Batches(te_s, te_t, 256, rng, False),
        _masked_loss,
        {"token_accuracy": token_accuracy},
    )
    return {
        "exact_match": exact,
        "token_accuracy": test_metrics["token_accuracy"],
        "test_loss": test_metrics["loss"],
        "bleu": None,  # not yet: a maintained BLEU (sacrebleu) is issue 15's
        "examples": [(s, h, r) for (s, r), h in zip(test[:5], hyps[:5], strict=True)],
        "n_train": len(train),
        "n_test": len(test),
        "epochs_run": len(history),
        "history": history.records,
        "seconds": time.perf_counter() - t0,
        "parameters": model.num_parameters(),
        "config": asdict(cfg),
    }
