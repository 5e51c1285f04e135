"""The main job's training step (python -m rnnfast charlm's recipe) against the same model in
PyTorch: embedding 64, one 256-unit LSTM over T = 64 steps of N = 32 streams carrying their state
(truncated BPTT), linear head over the vocabulary, cross-entropy, backward, gradient clipping at
norm 5, Adam. float32 in both; and (unless --no-bf16) rnnfast's matmul_precision="bfloat16" (the
LSTM's and the head's products) against torch.autocast("cpu", dtype=torch.bfloat16). Each backend
runs in its own process with 2 threads, rounds interleaved; the table reports minimum times per
step.

    python bench/charlm.py                     # 3 rounds, float32 and bfloat16
    python bench/charlm.py --write-results     # ... and update bench/RESULTS.md
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
BEGIN, END = "<!-- bench/charlm.py: begin -->", "<!-- bench/charlm.py: end -->"
V, E, H, T, N, CLIP = 96, 64, 256, 64, 32, 5.0


def batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(T + 1, N))
    return ids[:-1], ids[1:]


def ours_step(precision):
    import rnnfast
    from rnnfast.clip import clip_grad_norm_
    from rnnfast.losses import softmax_cross_entropy
    from rnnfast.models.charlm import CharLM

    rnnfast.set_num_threads(2)
    model = CharLM(V, E, H, seed=0)
    model.set_matmul_precision(precision)
    opt = rnnfast.optim.Adam(model.params, lr=2e-3)
    x, y = batch()
    state = [None]

    def step():
        logits, s = model(x, state[0])
        state[0] = tuple(a.copy() for a in s)  # carried, as the trainer's truncated BPTT
        loss, d = softmax_cross_entropy(logits, y)
        model.zero_grad()
        model.backward(d)
        clip_grad_norm_(model.grads, CLIP)
        opt.step(model.grads)

    return step


def torch_step(precision):
    import contextlib

    import torch
    from torch import nn

    torch.set_num_threads(2)
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, E)
            self.rnn = nn.LSTM(E, H)
            self.head = nn.Linear(H, V)

        def forward(self, ids, state):
            y, state = self.rnn(self.embed(ids), state)
            return self.head(y), state

    model = Model()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = (torch.from_numpy(a) for a in batch())
    state = [None]
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if precision == "bfloat16"
        else contextlib.nullcontext
    )

    def step():
        opt.zero_grad()
        with autocast():
            logits, s = model(x, state[0])
            loss = nn.functional.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1))
        state[0] = tuple(a.detach().float() for a in s)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()

    return step


def worker(backend, precision, calls):
    step = (ours_step if backend == "ours" else torch_step)(precision)
    print(json.dumps({"min_ms": min_step_ms(step, calls)}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--write-results", action="store_true")
    p.add_argument("--worker", nargs=2, metavar=("BACKEND", "PRECISION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(*args.worker, args.calls)
    import rnnfast

    precisions = ["float32"]
    if args.bf16 and rnnfast.bfloat16_supported():
        precisions.append("bfloat16")
    cases = [(precision,) for precision in precisions]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "2"}
    t_start = time.time()
    best = best_of_interleaved(__file__, cases, ("ours", "torch"), args.rounds, args.calls, env)
    info = machine_info()
    title = (
        f"### bench/charlm.py: the main job's training step against PyTorch "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})"
    )
    lines = [
        f"`python bench/charlm.py --rounds {args.rounds}`: charlm's recipe, embedding {E}, LSTM "
        f"{H}, T = {T}, N = {N} with the state carried, head over V = {V}, cross-entropy, "
        f"backward, clip at norm {CLIP:g}, Adam; bfloat16: rnnfast's "
        'matmul_precision="bfloat16" against torch.autocast("cpu", dtype=torch.bfloat16); 2 '
        "threads each, each backend in its own process, rounds interleaved, minimum of "
        f"{args.calls} steps a round; {time.time() - t_start:.0f} s in all.",
        "",
        f"- CPU: {info['cpu_model']} ({info['cpu_family_model']}), {info['cpus']} CPUs; "
        f"rnnfast {rnnfast.build_info()['recurrent_kernel']}",
        "",
        "| precision | rnnfast ms | torch ms | torch / rnnfast |",
        "|---|---:|---:|---:|",
    ]
    for case in cases:
        o, t = best[(case, "ours")], best[(case, "torch")]
        lines.append(f"| {case[0]} | {o:.2f} | {t:.2f} | {t / o:.2f}x |")
    print("\n".join([title, "", *lines]))
    if args.write_results:
        write_marked_block(RESULTS_MD, BEGIN, END, title, lines)


if __name__ == "__main__":
    main()
