"""A PyTorch model's training step with torch.nn's recurrent layers against the same model after
rnnfast.torch.convert: embedding, 2-layer LSTM or GRU, linear head over every step,
cross-entropy, backward, Adam; 2 threads each (torch.set_num_threads and
rnnfast.set_num_threads), each backend in its own process, rounds interleaved, minimum times.
Also the adapter's own overhead: the converted model's step less the same work through rnnfast's
NumPy layers directly.

    python bench/torch_adapter.py [--rounds 3] [--write-results]
"""

from __future__ import annotations

import argparse
import json
import math
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
BEGIN, END = "<!-- bench/torch_adapter.py: begin -->", "<!-- bench/torch_adapter.py: end -->"
V, E = 1000, 64
# (N, T, H) of the CPU benchmark's grid that a 2-layer model trains in well under a second
SHAPES = ((1, 100, 256), (4, 200, 256), (16, 50, 512), (64, 25, 128), (64, 50, 256))


def worker(backend, cell, N, T, H, calls):
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    rnn = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(E, H, num_layers=2)
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(V, E), "rnn": rnn,
                                 "head": torch.nn.Linear(H, V)})  # fmt: skip
    if backend == "rnnfast":
        import rnnfast
        import rnnfast.torch

        rnnfast.set_num_threads(2)
        rnnfast.torch.convert(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(0, V, size=(T, N)))
    target = torch.from_numpy(rng.integers(0, V, size=(T, N)))

    def step():
        opt.zero_grad()
        y, _ = model["rnn"](model["embed"](ids))
        loss = torch.nn.functional.cross_entropy(
            model["head"](y).reshape(-1, V), target.reshape(-1)
        )
        loss.backward()
        opt.step()

    print(json.dumps({"min_ms": min_step_ms(step, calls)}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--write-results", action="store_true")
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        backend, cell, N, T, H = args.worker
        return worker(backend, cell, int(N), int(T), int(H), args.calls)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    cases = [(cell, *shape) for cell in ("lstm", "gru") for shape in SHAPES]
    t_start = time.time()
    best = best_of_interleaved(__file__, cases, ("rnnfast", "torch"), args.rounds, args.calls, env)
    info = machine_info()
    title = (
        f"### bench/torch_adapter.py: torch.nn against rnnfast.torch in a PyTorch model "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})"
    )
    lines = [
        f"`python bench/torch_adapter.py --rounds {args.rounds}`: embedding {V} x {E}, 2-layer "
        f"cell of H units, linear head to {V} classes at every step, cross-entropy, backward, "
        "Adam, all in PyTorch; the recurrent layers torch.nn's or rnnfast.torch's (convert); 2 "
        f"threads, own processes, rounds interleaved; {time.time() - t_start:.0f} s in all.",
        "",
        f"- CPU: {info['cpu_model']} ({info['cpu_family_model']}), {info['cpus']} CPUs",
        "",
        "| cell | (N, T, H) | torch.nn ms | rnnfast.torch ms | speed-up |",
        "|---|---|---:|---:|---:|",
    ]
    ratios = []
    for case in cases:
        t, o = best[(case, "torch")], best[(case, "rnnfast")]
        ratios.append(t / o)
        lines.append(f"| {case[0]} | {tuple(case[1:])} | {t:.2f} | {o:.2f} | {t / o:.2f}x |")
    geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
    lines += ["", f"Geometric mean {geo:.2f}x, lowest {min(ratios):.2f}x (issue 16's target: >= "
              "1.5x geometric mean, never below 1x)."]  # fmt: skip
    print("\n".join([title, "", *lines]))
    if args.write_results:
        write_marked_block(RESULTS_MD, BEGIN, END, title, lines)


if __name__ == "__main__":
    main()
