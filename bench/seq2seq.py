"""The encoder-decoder's training step (python -m rnnfast seq2seq's model) against the same model
written in PyTorch: bidirectional LSTM or GRU encoder over exact lengths (torch: packed
sequences), bridged initial state, decoder with Luong attention (bilinear score, padding masked),
attentional layer, output softmax, masked cross-entropy, backward, Adam. With input feeding both
run the decoder one cell step at a time (torch: nn.LSTMCell / nn.GRUCell). 2 threads each, each
backend in its own process, rounds interleaved; the table reports minimum times per step.

    python bench/seq2seq.py                        # 8 cases, 3 rounds
    python bench/seq2seq.py --write-results        # ... and update bench/RESULTS.md

``TorchSeq2Seq`` is also the oracle of tests/test_seq2seq.py: the model timed here is checked
there to compute what rnnfast's computes (outputs and every gradient, float64).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import (  # noqa: E402
    best_of_interleaved,
    machine_info,
    min_step_ms,
    write_marked_block,
)

RESULTS_MD = HERE / "RESULTS.md"
BEGIN, END = "<!-- bench/seq2seq.py: begin -->", "<!-- bench/seq2seq.py: end -->"
PAD, BOS = 0, 1
# name: (source vocabulary, target vocabulary, embedding, hidden, N, source T, target S)
SHAPES = {
    "dates": (60, 16, 32, 128, 64, 28, 11),  # the command's default task and model
    "words": (8000, 8000, 256, 256, 64, 20, 20),  # a Tatoeba-sized word-level model
}
CASES = [(cell, feed, shape) for shape in SHAPES for cell in ("lstm", "gru")
         for feed in (False, True)]  # fmt: skip


def torch_seq2seq_class():
    """TorchSeq2Seq, defined on first use so that importing this file needs no torch."""
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, Q, K, score):
            super().__init__()
            self.score = score
            if score == "bilinear":
                self.weight = nn.Parameter(torch.empty(Q, K))
            else:  # additive
                self.weight = nn.Parameter(torch.empty(K, Q + K))
                self.v = nn.Parameter(torch.empty(K))
            self.Q = Q

        def forward(self, q, keys, valid):
            """q (S, N, Q), keys (T, N, K), valid (N, T) -> context (S, N, K), weights."""
            kb = keys.transpose(0, 1)  # (N, T, K)
            qb = q.transpose(0, 1)  # (N, S, Q)
            if self.score == "bilinear":
                e = (qb @ self.weight) @ kb.transpose(1, 2)
            else:
                hq = qb @ self.weight[:, : self.Q].T
                hk = kb @ self.weight[:, self.Q :].T
                e = torch.tanh(hq[:, :, None] + hk[:, None]) @ self.v
            e = e.masked_fill(~valid[:, None, :], float("-inf"))
            a = torch.softmax(e, dim=-1)
            return (a @ kb).transpose(0, 1), a.transpose(0, 1)

    class TorchSeq2Seq(nn.Module):
        """rnnfast.models.seq2seq.Seq2Seq in torch, with the same parameter names."""

        def __init__(self, src_vocab, tgt_vocab, embed, hidden, layers=1, cell="lstm",
                     score="bilinear", input_feeding=False):  # fmt: skip
            super().__init__()
            rnn = nn.LSTM if cell == "lstm" else nn.GRU
            H = hidden
            self.src_embed = nn.Embedding(src_vocab, embed, padding_idx=PAD)
            self.encoder = rnn(embed, H, num_layers=layers, bidirectional=True)
            self.bridge = nn.Linear(2 * H, H)
            self.tgt_embed = nn.Embedding(tgt_vocab, embed, padding_idx=PAD)
            if input_feeding:
                self.decoder = (nn.LSTMCell if cell == "lstm" else nn.GRUCell)(embed + H, H)
            else:
                self.decoder = rnn(embed, H)
            self.attention = Attention(H, 2 * H, score)
            self.combine = nn.Linear(3 * H, H)
            self.out = nn.Linear(H, tgt_vocab)
            self.has_c, self.feed = cell == "lstm", input_feeding

        def forward(self, src, src_lengths, tgt_in):
            T = src.shape[0]
            packed = nn.utils.rnn.pack_padded_sequence(self.src_embed(src), src_lengths,
                                                       enforce_sorted=False)  # fmt: skip
            keys, state = self.encoder(packed)
            keys, _ = nn.utils.rnn.pad_packed_sequence(keys, total_length=T)
            h_n = state[0] if self.has_c else state
            h0 = torch.tanh(self.bridge(torch.cat([h_n[-2], h_n[-1]], dim=1)))
            valid = torch.arange(T)[None, :] < src_lengths[:, None]
            emb = self.tgt_embed(tgt_in)
            if not self.feed:
                s0 = (h0[None], torch.zeros_like(h0)[None]) if self.has_c else h0[None]
                y, _ = self.decoder(emb, s0)
                context, _ = self.attention(y, keys, valid)
                att = torch.tanh(self.combine(torch.cat([context, y], dim=2)))
            else:
                h, c, fed, atts = h0, torch.zeros_like(h0), torch.zeros_like(h0), []
                for t in range(emb.shape[0]):
                    x = torch.cat([emb[t], fed], dim=1)
                    if self.has_c:
                        h, c = self.decoder(x, (h, c))
                    else:
                        h = self.decoder(x, h)
                    context, _ = self.attention(h[None], keys, valid)
                    fed = torch.tanh(self.combine(torch.cat([context[0], h], dim=1)))
                    atts.append(fed)
                att = torch.stack(atts)
            return self.out(att)

    return TorchSeq2Seq


def batch(V_src, V_tgt, N, T, S, seed=0):
    rng = np.random.default_rng(seed)

    def ids(V, L):
        lengths = rng.integers(L // 2, L + 1, size=N)
        lengths[0] = L
        x = rng.integers(4, V, size=(L, N))
        x[np.arange(L)[:, None] >= lengths[None, :]] = PAD
        return x, lengths

    src, src_len = ids(V_src, T)
    tgt, _ = ids(V_tgt, S)
    tin = np.concatenate([np.full((1, N), BOS), tgt[:-1]])
    return src, src_len, tin, tgt


def ours_step(cell, feed, shape):
    import rnnfast
    from rnnfast.models.seq2seq import Seq2Seq, _masked_loss

    rnnfast.set_num_threads(2)
    Vs, Vt, E, H, N, T, S = SHAPES[shape]
    model = Seq2Seq(Vs, Vt, E, H, 1, cell, "bilinear", feed, seed=0)
    opt = rnnfast.optim.Adam(model.params, lr=1e-3)
    src, src_len, tin, tgt = batch(Vs, Vt, N, T, S)

    def step():
        _, d = _masked_loss(model(src, src_len, tin), tgt)
        model.zero_grad()
        model.backward(d)
        opt.step(model.grads)

    return step


def torch_step(cell, feed, shape):
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    Vs, Vt, E, H, N, T, S = SHAPES[shape]
    model = torch_seq2seq_class()(Vs, Vt, E, H, 1, cell, "bilinear", feed)
    for p in model.attention.parameters():
        torch.nn.init.uniform_(p, -0.05, 0.05)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    src, src_len, tin, tgt = (torch.from_numpy(a) for a in batch(Vs, Vt, N, T, S))

    def step():
        opt.zero_grad()
        logits = model(src, src_len, tin)
        torch.nn.functional.cross_entropy(logits.reshape(-1, Vt), tgt.reshape(-1),
                                          ignore_index=PAD).backward()  # fmt: skip
        opt.step()

    return step


def worker(backend, cell, feed, shape, calls):
    step = (ours_step if backend == "ours" else torch_step)(cell, feed, shape)
    print(json.dumps({"min_ms": min_step_ms(step, calls)}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--write-results", action="store_true")
    p.add_argument("--worker", nargs=4, metavar=("BACKEND", "CELL", "FEED", "SHAPE"),
                   help=argparse.SUPPRESS)  # fmt: skip
    args = p.parse_args(argv)
    if args.worker:
        backend, cell, feed, shape = args.worker
        return worker(backend, cell, feed == "1", shape, args.calls)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "2"}
    t_start = time.time()
    cases = [(cell, int(feed), shape) for cell, feed, shape in CASES]
    best = best_of_interleaved(__file__, cases, ("ours", "torch"), args.rounds, args.calls, env)
    info = machine_info()
    title = (
        "### bench/seq2seq.py: the encoder-decoder's training step against PyTorch "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})"
    )
    lines = [
        f"`python bench/seq2seq.py --rounds {args.rounds}`: bidirectional 1-layer encoder over "
        "exact lengths (torch: pack_padded_sequence), bridge, decoder with bilinear attention "
        "over the valid source positions, attentional layer, output layer, masked "
        "cross-entropy, backward, Adam; lengths uniform in [L/2, L]; 2 threads each, each "
        f"backend in its own process, rounds interleaved, minimum of {args.calls} steps a "
        f"round; {time.time() - t_start:.0f} s in all. Shapes (V_src, V_tgt, E, H, N, T, S): "
        + ", ".join(f"{k} {v}" for k, v in SHAPES.items())
        + ".",
        "",
        f"- CPU: {info['cpu_model']} ({info['cpu_family_model']}), {info['cpus']} CPUs",
        "",
        "| shape | cell | input feeding | rnnfast ms | torch ms | torch / rnnfast |",
        "|---|---|---|---:|---:|---:|",
    ]
    ratios = []
    for cell, feed, shape in CASES:
        case = (cell, int(feed), shape)
        o, t = best[(case, "ours")], best[(case, "torch")]
        ratios.append(t / o)
        lines.append(f"| {shape} | {cell} | {'yes' if feed else 'no'} | {o:.2f} | {t:.2f} | "
                     f"{t / o:.2f}x |")  # fmt: skip
    geo = float(np.exp(np.mean(np.log(ratios))))
    lines += ["", f"Geometric mean {geo:.2f}x, lowest {min(ratios):.2f}x."]
    print("\n".join([title, "", *lines]))
    if args.write_results:
        write_marked_block(RESULTS_MD, BEGIN, END, title, lines)


if __name__ == "__main__":
    sys.exit(main())
