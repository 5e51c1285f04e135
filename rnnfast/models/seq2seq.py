"""Sequence to sequence with attention: a bidirectional encoder over the exact source lengths, a
decoder LSTM or GRU started from the encoder's final states, Luong's global attention over the
encoder outputs (any rnnfast.Attention score) and an attentional layer
h~ = tanh(W_c [context; h]) before the output softmax, optionally fed back into the decoder's next
input (Luong's input feeding). Teacher forcing trains the decoder over all target steps in one
fused call (one fused step at a time with input feeding); decoding is greedy or a batched beam
search with GNMT's length penalty. ``python -m rnnfast seq2seq`` trains and reports exact match,
token accuracy and BLEU (sacrebleu, when installed); ``python -m rnnfast translate`` decodes
with a saved model.
"""

from __future__ import annotations

import calendar
import datetime as dt
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from .. import checkpoint as ckpt
from .. import ops, optim
from ..init import as_generator
from ..layers import GRU, LSTM, Attention, Embedding, GRUCell, Linear, LSTMCell, Module
from ..losses import softmax_cross_entropy
from ..sequences import pad_sequences
from ..training import evaluate, fit, pyplot

__all__ = [
    "Seq2Seq",
    "TokenVocab",
    "read_pairs",
    "date_pairs",
    "Seq2SeqConfig",
    "train_seq2seq",
    "translate",
    "bleu",
    "length_penalty",
    "plot_attention",
    "save_model",
    "load_model",
]

PAD, BOS, EOS, UNK = 0, 1, 2, 3


class DataError(ValueError):
    """A pairs file (or an output path) that cannot be used, with what is wrong and where."""


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

    @classmethod
    def from_words(cls, words: list[str], tokens: str) -> TokenVocab:
        """The vocabulary a checkpoint saved (its ``words``, specials first)."""
        if (
            not isinstance(words, list)
            or words[:4] != ["<pad>", "<s>", "</s>", "<unk>"]
            or not all(isinstance(w, str) for w in words)
        ):
            raise ValueError("a vocabulary is a list of strings starting <pad>, <s>, </s>, <unk>")
        vocab = cls([], tokens)
        vocab.words, vocab.index = list(words), {w: i for i, w in enumerate(words)}
        return vocab

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
    days with and without a leading zero, upper or lower case, stray spaces) paired with ISO 8601;
    made here, nothing downloaded."""
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
        if rng.random() < 0.3:
            fmt = fmt.replace("%d", str(d.day))  # 5 March as often as 05 March
        text = d.strftime(fmt)
        case = rng.random()
        text = text.lower() if case < 0.3 else (text.upper() if case < 0.4 else text)
        if rng.random() < 0.2:
            text = text.replace(" ", "  ", 1)
        pairs.append((text, d.isoformat()))
    return pairs


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's length normalisation (Wu et al. 2016): ((5 + length) / 6) ** alpha."""
    return ((5.0 + length) / 6.0) ** alpha


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z[:, [PAD, BOS]] = -np.inf  # never generated
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class Seq2Seq(Module):
    """Encoder-decoder with attention; see the module docstring.

    ``input_feeding=True`` is Luong's input feeding: the decoder's input at step t is its
    embedded token next to the attentional vector h~ of step t-1, so training runs the decoder
    one fused step at a time (an LSTMCell or GRUCell); without it the whole target sequence goes
    through the decoder layer in one fused call.
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, embed: int = 32, hidden: int = 128,
                 layers: int = 1, cell: str = "lstm", score: str = "bilinear",
                 input_feeding: bool = False, *, seed=None, dtype=np.float32) -> None:  # fmt: skip
        super().__init__()
        if cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        self.config = {"src_vocab": int(src_vocab), "tgt_vocab": int(tgt_vocab),
                       "embed": int(embed), "hidden": int(hidden), "layers": int(layers),
                       "cell": cell, "score": score,
                       "input_feeding": bool(input_feeding)}  # fmt: skip
        rng = as_generator(seed)
        H = hidden
        self.src_embed = Embedding(src_vocab, embed, padding_idx=PAD, dtype=dtype, seed=rng)
        rnn = LSTM if cell == "lstm" else GRU
        self.encoder = rnn(embed, H, num_layers=layers, bidirectional=True, dtype=dtype, seed=rng)
        self.bridge = Linear(2 * H, H, dtype=dtype, seed=rng)  # the decoder's h0
        self.tgt_embed = Embedding(tgt_vocab, embed, padding_idx=PAD, dtype=dtype, seed=rng)
        if input_feeding:
            step = LSTMCell if cell == "lstm" else GRUCell
            self.decoder = step(embed + H, H, dtype=dtype, seed=rng)
        else:
            self.decoder = rnn(embed, H, dtype=dtype, seed=rng)
        self.attention = Attention(H, 2 * H, score, dtype=dtype, seed=rng)
        self.combine = Linear(3 * H, H, dtype=dtype, seed=rng)  # h~ = tanh(W_c [context; h] + b)
        self.out = Linear(H, tgt_vocab, dtype=dtype, seed=rng)
        self.has_c, self.H, self.E = cell == "lstm", H, int(embed)
        self.input_feeding = bool(input_feeding)

    def encode(self, src, src_lengths):
        """Encoder outputs (T, N, 2H) and the decoder's initial h (N, H)."""
        keys, state = self.encoder(self.src_embed(src), lengths=src_lengths)
        h_n = state[0] if self.has_c else state
        last = np.concatenate([h_n[-2], h_n[-1]], axis=1)  # the top layer's two directions
        return keys, np.tanh(self.bridge(last))

    def _attentional(self, cat):
        p = self.combine.params
        pre = ops.gemm(cat.reshape(-1, cat.shape[-1]), p["weight"], trans_b=True)
        pre += p["bias"]
        return np.tanh(pre, out=pre).reshape(*cat.shape[:-1], self.H)

    def _start(self, src, src_lengths):
        """Encoder outputs and the decoder's state (h, c or None, h~ of the step before or None)."""
        keys, h0 = self.encode(src, src_lengths)
        c0 = np.zeros_like(h0) if self.has_c else None
        return keys, (h0, c0, np.zeros_like(h0) if self.input_feeding else None)

    def _decoder_step(self, emb, state):
        """One decoder step from embedded tokens (N, E): its output h and new (h, c)."""
        h, c, fed = state
        if self.input_feeding:
            out = self.decoder(np.concatenate([emb, fed], axis=1), (h, c) if self.has_c else h)
            return out if self.has_c else (out, None)
        y, st = self.decoder(emb[None], (h[None], c[None]) if self.has_c else h[None])
        return y[0], (st[1][0] if self.has_c else None)

    def _teacher_forced(self, src, src_lengths, tgt_in):
        """(logits (S, N, V), attention weights (S, N, T)) with tgt_in (S, N) as the inputs."""
        self.attention.clear()
        keys, state = self._start(src, src_lengths)
        h0 = state[0]
        emb = self.tgt_embed(tgt_in)
        if not self.input_feeding:
            h, c, _ = state
            y, _ = self.decoder(emb, (h[None], c[None]) if self.has_c else h[None])
            context, weights = self.attention(y, keys, src_lengths)
            cat = np.concatenate([context, y], axis=2)
            att = self._attentional(cat)
        else:
            self.decoder.clear()
            prepared = self.attention.prepare(keys, src_lengths)
            cats, atts, ws = [], [], []
            for t in range(emb.shape[0]):
                h, c = self._decoder_step(emb[t], state)
                context, w = self.attention(h, prepared)
                cats.append(np.concatenate([context, h], axis=1))
                atts.append(self._attentional(cats[-1]))
                ws.append(w)
                state = (h, c, atts[-1])
            cat, att, weights = np.stack(cats), np.stack(atts), np.stack(ws)
        self._saved = (h0, cat, att)
        return self.out(att), weights

    def forward(self, src, src_lengths, tgt_in):
        """src (T, N) and tgt_in (S, N) ids (tgt_in starts with <s>) -> logits (S, N, V)."""
        return self._teacher_forced(src, src_lengths, tgt_in)[0]

    def attention_weights(self, src, src_lengths, tgt_in) -> np.ndarray:
        """The attention (S, N, T) of each decoder step over the source, in eval mode."""
        was = self.training
        self.eval()
        try:
            return self._teacher_forced(src, src_lengths, tgt_in)[1]
        finally:
            self.train(was)

    def backward(self, dlogits) -> None:
        h0, cat, att = self._saved
        H, E = self.H, self.E
        datt = self.out.backward(dlogits)
        W = self.combine.params["weight"]
        if not self.input_feeding:
            dpre = datt * (1 - att * att)
            dcat = ops.gemm(dpre.reshape(-1, H), W).reshape(*dpre.shape[:-1], 3 * H)
            dq, dkeys = self.attention.backward(dcat[..., : 2 * H])
            demb, dstate0 = self.decoder.backward(dcat[..., 2 * H :] + dq)
            dh0 = (dstate0[0] if self.has_c else dstate0)[0]
        else:
            dpre = np.empty_like(att)
            demb = np.empty((att.shape[0], att.shape[1], E), att.dtype)
            dkeys, dfed, dh, dc = None, 0, 0, None
            for t in reversed(range(att.shape[0])):
                dpre[t] = (datt[t] + dfed) * (1 - att[t] * att[t])
                dcat = ops.gemm(dpre[t], W)
                dq, dk = self.attention.backward(dcat[:, : 2 * H])
                if dkeys is None:
                    dkeys = dk  # a fresh array each step: summed into in place
                else:
                    dkeys += dk
                dh = dh + dcat[:, 2 * H :] + dq
                dx, dprev = self.decoder.backward((dh, dc) if self.has_c else dh)
                demb[t], dfed = dx[:, :E], dx[:, E:]
                dh, dc = dprev if self.has_c else (dprev, None)
            dh0 = dh
        ops.gemm(dpre.reshape(-1, H), cat.reshape(-1, 3 * H), trans_a=True,
                 out=self.combine.grads["weight"], accumulate=True)  # fmt: skip
        self.combine.grads["bias"] += dpre.reshape(-1, H).sum(axis=0)
        self.tgt_embed.backward(demb)
        dlast = self.bridge.backward(dh0 * (1 - h0 * h0))
        dh_n = np.zeros((self.encoder.num_layers * 2, dlast.shape[0], H), dtype=dlast.dtype)
        dh_n[-2], dh_n[-1] = dlast[:, :H], dlast[:, H:]
        dx_enc, _ = self.encoder.backward(dkeys, (dh_n, None) if self.has_c else dh_n)
        self.src_embed.backward(dx_enc)

    def _step(self, tokens, state, keys):
        """One decoding step from the previous tokens (N,) over prepared keys: logits (N, V),
        attention weights (N, T) and the new decoder state."""
        h, c = self._decoder_step(self.tgt_embed(tokens[None])[0], state)
        context, weights = self.attention(h, keys)
        att = self._attentional(np.concatenate([context, h], axis=1))
        return self.out(att), weights, (h, c, att if self.input_feeding else None)

    def greedy(self, src, src_lengths, max_len: int) -> np.ndarray:
        """(max_len, N) ids, the most likely token at each step (padding after </s>)."""
        was = self.training
        self.eval()
        try:
            keys, state = self._start(src, src_lengths)
            keys = self.attention.prepare(keys, src_lengths)
            N = src.shape[1]
            token, out, done = np.full(N, BOS), np.full((max_len, N), PAD), np.zeros(N, bool)
            for t in range(max_len):
                logits, _, state = self._step(token, state, keys)
                token = np.where(done, PAD, _log_softmax(logits).argmax(axis=1))
                out[t] = token
                done |= token == EOS
                if done.all():
                    break
            return out
        finally:
            self.train(was)

    def beam_search(self, src, src_lengths, max_len: int, beam: int = 5,
                    alpha: float = 0.6) -> list[list[int]]:  # fmt: skip
        """The best hypothesis of a batched beam search for each source: its ids up to and
        including </s> (max_len ids if none ended). Hypotheses are ranked by their log
        probability over GNMT's length penalty ``length_penalty(len, alpha)``; a source stops
        once no live beam can beat its beam-th finished hypothesis (exact for alpha >= 0)."""
        if isinstance(beam, bool) or not isinstance(beam, (int, np.integer)) or beam < 1:
            raise ValueError(f"beam must be a positive integer, got {beam!r}")
        if not np.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        was = self.training
        self.eval()
        try:
            return self._beam_search(src, np.asarray(src_lengths), max_len, int(beam), alpha)
        finally:
            self.train(was)

    def _beam_search(self, src, src_lengths, max_len, K, alpha):
        keys, state = self._start(src, src_lengths)
        N = src.shape[1]
        rows = np.repeat(np.arange(N), K)  # beam k of source n is row n*K + k
        keys = self.attention.prepare(keys[:, rows], src_lengths[rows])
        state = tuple(None if s is None else s[rows] for s in state)
        scores = np.full((N, K), -np.inf)
        scores[:, 0] = 0.0  # the first step expands one beam per source
        tokens, history = np.full(N * K, BOS), np.zeros((0, N * K), np.int64)
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(N)]
        done = np.zeros(N, bool)
        for t in range(max_len):
            logits, _, state = self._step(tokens, state, keys)
            logp = _log_softmax(logits)
            V = logp.shape[1]
            cand = (scores.reshape(-1, 1) + logp).reshape(N, K * V)
            top = np.argsort(-cand, axis=1, kind="stable")[:, : 2 * K]
            new_scores, origin = np.full((N, K), -np.inf), np.zeros((N, K), np.int64)
            new_tokens = np.full((N, K), PAD)
            for n in np.flatnonzero(~done):
                k = 0
                for j in top[n]:
                    s = cand[n, j]
                    if s == -np.inf:
                        break
                    b, v = divmod(int(j), V)
                    if v == EOS:
                        ids = [*history[:, n * K + b].tolist(), EOS]
                        finished[n].append((s / length_penalty(t + 1, alpha), ids))
                    else:
                        new_scores[n, k], origin[n, k], new_tokens[n, k] = s, b, v
                        k += 1
                        if k == K:
                            break
                finished[n] = sorted(finished[n], key=lambda h: -h[0])[:K]
                bound = new_scores[n, 0] / length_penalty(max_len, alpha)
                if k == 0 or (len(finished[n]) == K and bound <= finished[n][-1][0]):
                    done[n] = True
            if done.all():
                break
            idx = (np.arange(N)[:, None] * K + origin).ravel()
            history = np.concatenate([history[:, idx], new_tokens.reshape(1, -1)])
            state = tuple(None if s is None else s[idx] for s in state)
            scores, tokens = new_scores, new_tokens.ravel()
        best = []
        for n in range(N):
            hyps = list(finished[n])
            if not done[n]:  # max_len reached: the live beams count as they are
                hyps += [(scores[n, k] / length_penalty(max_len, alpha),
                          history[:, n * K + k].tolist()) for k in range(K)
                         if scores[n, k] > -np.inf]  # fmt: skip
            best.append(max(hyps, key=lambda h: h[0])[1])
        return best


@dataclass
class Seq2SeqConfig:
    data: str | None = None
    tokens: str = "char"
    cell: str = "lstm"
    score: str = "bilinear"
    input_feeding: bool = False
    embed: int = 32
    hidden: int = 128
    layers: int = 1
    epochs: int = 6
    batch: int = 64
    lr: float = 3e-3
    clip: float = 5.0
    pairs: int = 20000
    beam: int = 5
    alpha: float = 0.6
    seed: int = 0
    time_limit: float | None = 540.0
    checkpoint: str | None = "seq2seq.npz"
    plot_attention: str | None = None
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


def bleu(hypotheses: list[str], references: list[list[str]]) -> float | None:
    """Corpus BLEU with sacrebleu's defaults (13a tokens) against one or more references per
    hypothesis; None when sacrebleu is missing."""
    try:
        import sacrebleu
    except ImportError:
        return None
    streams = [[refs[k] if k < len(refs) else None for refs in references]
               for k in range(max(len(refs) for refs in references))]  # fmt: skip
    return float(sacrebleu.corpus_bleu(hypotheses, streams).score)


def translate(model: Seq2Seq, src_vocab: TokenVocab, tgt_vocab: TokenVocab, texts: list[str],
              max_len: int, beam: int = 5, alpha: float = 0.6,
              batch: int = 256) -> list[list[int]]:  # fmt: skip
    """Decoded target ids (up to </s>) for each text: beam search, or greedy for beam 1."""
    out = []
    for i in range(0, len(texts), batch):
        ids = []
        for text in texts[i : i + batch]:
            ids.append(src_vocab.encode(text.strip()))  # as read_pairs reads sources
            if not ids[-1]:
                raise ValueError(f"nothing to translate in {text!r}: it holds no tokens")
        src, lengths = pad_sequences(ids, padding_value=PAD)
        if beam == 1:
            greedy = model.greedy(src, lengths, max_len)
            for n in range(greedy.shape[1]):
                row = greedy[:, n].tolist()
                out.append(row[: row.index(EOS) + 1] if EOS in row else row)
        else:
            out += model.beam_search(src, lengths, max_len, beam, alpha)
    return out


def _pyplot():
    try:
        return pyplot("attention plots need")
    except ImportError as e:
        raise DataError(str(e)) from e


def plot_attention(path: str, model: Seq2Seq, src_vocab: TokenVocab, tgt_vocab: TokenVocab,
                   texts: list[str], outputs: list[list[int]]) -> None:  # fmt: skip
    """Heatmaps of the attention each output token paid to the source tokens, one per text."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(texts), figsize=(4.5 * len(texts), 4.5), squeeze=False)
    for ax, text, ids in zip(axes[0], texts, outputs, strict=True):
        src_ids = src_vocab.encode(text.strip())
        src, lengths = pad_sequences([src_ids], padding_value=PAD)
        tin, _ = pad_sequences([[BOS, *ids[:-1]] if ids else [BOS]], padding_value=PAD)
        w = model.attention_weights(src, lengths, tin)[:, 0, :]  # (S, T)
        ax.imshow(w, cmap="viridis", aspect="auto", vmin=0, vmax=1)

        def label(vocab, i):
            return "\u2423" if vocab.words[i] == " " else vocab.words[i]  # a visible space

        ax.set_xticks(range(len(src_ids)), [label(src_vocab, i) for i in src_ids], fontsize=7,
                      rotation=90)  # fmt: skip
        ax.set_yticks(range(len(ids)), [label(tgt_vocab, i) for i in ids], fontsize=7)
        ax.set_xlabel("source")
        ax.set_ylabel("output")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_model(path: str, model: Seq2Seq, src_vocab: TokenVocab, tgt_vocab: TokenVocab,
               max_len: int, **meta) -> None:  # fmt: skip
    ckpt.save_checkpoint(path, model, model_config=model.config, tokens=src_vocab.tokens,
                         src_words=src_vocab.words, tgt_words=tgt_vocab.words, max_len=max_len,
                         **meta)  # fmt: skip


def load_model(path: str) -> tuple[Seq2Seq, TokenVocab, TokenVocab, dict]:
    """A trained Seq2Seq, its source and target vocabularies and the metadata from ``path``."""
    state, _, meta = ckpt.read_checkpoint(path)
    need = ("model_config", "tokens", "src_words", "tgt_words", "max_len")
    missing = [k for k in need if k not in meta]
    if missing:
        raise ckpt.CheckpointError(f"{path!r} is not a seq2seq checkpoint (it lacks {missing})")
    config = meta["model_config"]
    try:
        model = Seq2Seq(**config)
        src_vocab = TokenVocab.from_words(meta["src_words"], meta["tokens"])
        tgt_vocab = TokenVocab.from_words(meta["tgt_words"], meta["tokens"])
    except (TypeError, ValueError) as e:
        raise ckpt.CheckpointError(
            f"{path!r}: its model_config or vocabulary is unusable: {e}"
        ) from e
    for name, size in (("src_vocab", len(src_vocab)), ("tgt_vocab", len(tgt_vocab))):
        if config[name] != size:
            raise ckpt.CheckpointError(f"{path!r}: model_config {name} is {config[name]} but its "
                                       f"vocabulary has {size} entries")  # fmt: skip
    ckpt.load_checkpoint(path, model)
    return model, src_vocab, tgt_vocab, meta


def train_seq2seq(cfg: Seq2SeqConfig) -> dict:
    """Trains on cfg.data's pairs (or the dates task) and reports on a held-out test split."""
    t0 = time.perf_counter()
    # what would fail after training fails now instead
    if cfg.plot_attention:
        _pyplot()
    for path in (cfg.checkpoint, cfg.plot_attention):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise DataError(f"cannot write {path!r}: its folder does not exist")
    pairs = read_pairs(cfg.data) if cfg.data else date_pairs(cfg.pairs, cfg.seed)
    # split by source: every translation of a source goes to the same split (Tatoeba gives one
    # sentence several), and all of them are its references on the test split
    by_source: dict[str, list[str]] = {}
    for src, tgt in pairs:
        by_source.setdefault(src, []).append(tgt)
    sources = list(by_source)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(sources))
    n_test = n_val = max(1, len(sources) // 10)
    if len(sources) < 3 * n_test:
        raise DataError(f"{len(sources)} distinct sources are too few to split into train, "
                        "validation and test")  # fmt: skip

    def split(idx):
        return [(sources[i], t) for i in idx for t in by_source[sources[i]]]

    test, val = split(order[:n_test]), split(order[n_test : n_test + n_val])
    train = split(order[n_test + n_val :])
    src_vocab = TokenVocab([s for s, _ in train], cfg.tokens)
    tgt_vocab = TokenVocab([t for _, t in train], cfg.tokens)

    def ids(split):
        return [src_vocab.encode(s) for s, _ in split], [tgt_vocab.encode(t) for _, t in split]

    model = Seq2Seq(len(src_vocab), len(tgt_vocab), cfg.embed, cfg.hidden, cfg.layers, cfg.cell,
                    cfg.score, cfg.input_feeding, seed=cfg.seed)  # fmt: skip
    opt = optim.Adam(model.params, lr=cfg.lr)
    tr_s, tr_t = ids(train)
    va_s, va_t = ids(val)
    # long enough for any training target and its </s>, with room to spare
    longest = max(len(t) for t in tr_t)
    max_len = longest + 1 + max(5, longest // 2)

    def token_accuracy(logits, target):
        keep = target != PAD
        return float((logits.argmax(-1) == target)[keep].mean())

    history = fit(model, _Batches(tr_s, tr_t, cfg.batch, rng),
                  opt, _masked_loss, epochs=cfg.epochs,
                  val_data=_Batches(va_s, va_t, 256, rng, shuffle=False),
                  clip_grad_norm=cfg.clip or None, metrics={"token_accuracy": token_accuracy},
                  progress=not cfg.quiet, time_limit=cfg.time_limit)  # fmt: skip
    te_s, te_t = ids(test)
    sources = [sources[i] for i in order[:n_test]]
    refs = [by_source[src] for src in sources]
    t_decode = time.perf_counter()
    outputs = translate(model, src_vocab, tgt_vocab, sources, max_len, cfg.beam, cfg.alpha)
    decode_seconds = time.perf_counter() - t_decode
    hyps = [tgt_vocab.decode(o) for o in outputs]
    greedy = hyps if cfg.beam == 1 else [
        tgt_vocab.decode(o) for o in translate(model, src_vocab, tgt_vocab, sources, max_len, 1)
    ]  # fmt: skip
    test_metrics = evaluate(model, _Batches(te_s, te_t, 256, rng, False), _masked_loss,
                            {"token_accuracy": token_accuracy})  # fmt: skip
    result = {
        "exact_match": float(np.mean([h in r for h, r in zip(hyps, refs, strict=True)])),
        "exact_match_greedy": float(np.mean([h in r for h, r in zip(greedy, refs, strict=True)])),
        "bleu": bleu(hyps, refs),
        "bleu_greedy": bleu(greedy, refs),
        "token_accuracy": test_metrics["token_accuracy"],
        "test_loss": test_metrics["loss"],
        "decoding": f"beam {cfg.beam}, alpha {cfg.alpha}" if cfg.beam > 1 else "greedy",
        "decode_seconds": decode_seconds,
        "examples": [(s, h, r) for s, h, r in zip(sources[:5], hyps[:5], refs[:5], strict=True)],
        "n_train": len(train),
        "n_test": len(sources),
        "n_test_pairs": len(test),
        "epochs_run": len(history),
        "stopped_by_time_limit": bool(history.records[-1].get("stopped_by_time_limit")),
        "history": history.records,
        "parameters": model.num_parameters(),
        "config": asdict(cfg),
    }
    if cfg.checkpoint:
        save_model(cfg.checkpoint, model, src_vocab, tgt_vocab, max_len,
                   exact_match=result["exact_match"])  # fmt: skip
    if cfg.plot_attention:
        plot_attention(cfg.plot_attention, model, src_vocab, tgt_vocab, sources[:4], outputs[:4])
    result["seconds"] = time.perf_counter() - t0
    return result
