"""The text classifier's training step (python -m rnnfast classify's model) against the same model
in PyTorch: embedding, bidirectional LSTM or GRU over exact lengths, max pooling over the valid
steps, linear head, cross-entropy, backward, Adam. torch runs its packed sequences (the exact-length
path torch users take) with 2 threads; rnnfast its fused kernels with 2 threads. Each backend runs
in its own process, rounds interleaved; the table reports minimum times per step.

    python bench/classify.py                       # LSTM and GRU, T = 20 and 50, 3 rounds
    python bench/classify.py --write-results       # ... and update bench/RESULTS.md
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
BEGIN, END = "<!-- bench/classify.py: begin -->", "<!-- bench/classify.py: end -->"
V, E, H, CLASSES = 20000, 100, 128, 2
CASES = [(cell, N, T) for cell in ("lstm", "gru") for N, T in ((64, 20), (64, 50), (16, 50))]


def batch(N, T, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(T // 2, T + 1, size=N)
    lengths[0] = T
    ids = rng.integers(2, V, size=(T, N))
    ids[np.arange(T)[:, None] >= lengths[None, :]] = 0
    return ids, lengths, rng.integers(0, CLASSES, size=N)


def ours_step(cell, N, T):
    import rnnfast
    from rnnfast.losses import softmax_cross_entropy
    from rnnfast.models.classify import TextClassifier

    rnnfast.set_num_threads(2)
    model = TextClassifier(V, CLASSES, E, H, cell=cell, pool="max", dropout=0.0, seed=0)
    opt = rnnfast.optim.Adam(model.params, lr=1e-3)
    ids, lengths, y = batch(N, T)

    def step():
        loss, d = softmax_cross_entropy(model(ids, lengths), y)
        model.zero_grad()
        model.backward(d)
        opt.step(model.grads)

    return step


def torch_step(cell, N, T):
    import torch
    from torch import nn

    torch.set_num_threads(2)
    torch.manual_seed(0)
    rnn_cls = nn.LSTM if cell == "lstm" else nn.GRU

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, E, padding_idx=0)
            self.rnn = rnn_cls(E, H, bidirectional=True)
            self.head = nn.Linear(2 * H, CLASSES)

        def forward(self, ids, lengths):
            packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths,
                                                       enforce_sorted=False)  # fmt: skip
            y, _ = self.rnn(packed)
            y, _ = nn.utils.rnn.pad_packed_sequence(y, total_length=ids.shape[0])
            mask = torch.arange(ids.shape[0])[:, None] < lengths[None, :]
            y = y.masked_fill(~mask[..., None], float("-inf"))
            return self.head(y.max(dim=0).values)

    model = Model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids, lengths, y = batch(N, T)
    ids, lengths, y = torch.from_numpy(ids), torch.from_numpy(lengths), torch.from_numpy(y)

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids, lengths), y).backward()
        opt.step()

    return step


def worker(backend, cell, N, T, calls):
    step = (ours_step if backend == "ours" else torch_step)(cell, N, T)
    print(json.dumps({"min_ms": min_step_ms(step, calls)}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--write-results", action="store_true")
    p.add_argument(
        "--worker", nargs=4, metavar=("BACKEND", "CELL", "N", "T"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    if args.worker:
        backend, cell, N, T = args.worker
        return worker(backend, cell, int(N), int(T), args.calls)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "2"}
    t_start = time.time()
    best = best_of_interleaved(__file__, CASES, ("ours", "torch"), args.rounds, args.calls, env)
    info = machine_info()
    title = (
        f"### bench/classify.py: the classifier's training step against PyTorch "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})"
    )
    lines = [
        f"`python bench/classify.py --rounds {args.rounds}`: embedding {V} x {E}, "
        f"bidirectional {H}-unit cell over exact lengths (torch: pack_padded_sequence), max "
        "pooling, linear head, cross-entropy, backward, Adam; lengths uniform in [T/2, T]; 2 "
        "threads each, each backend in its own process, rounds interleaved, minimum of "
        f"{args.calls} steps a round; {time.time() - t_start:.0f} s in all.",
        "",
        f"- CPU: {info['cpu_model']} ({info['cpu_family_model']}), {info['cpus']} CPUs",
        "",
        "| cell | N | T | rnnfast ms | torch ms | torch / rnnfast |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for cell, N, T in CASES:
        o, t = best[((cell, N, T), "ours")], best[((cell, N, T), "torch")]
        lines.append(f"| {cell} | {N} | {T} | {o:.2f} | {t:.2f} | {t / o:.2f}x |")
    print("\n".join([title, "", *lines]))
    if args.write_results:
        write_marked_block(RESULTS_MD, BEGIN, END, title, lines)


if __name__ == "__main__":
    main()
