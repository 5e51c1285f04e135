"""charlm's training throughput on one process and on two data-parallel processes of this machine
(torchrun, gloo over loopback), and what the gradient all-reduce costs per step.

Both run the same global batch: one process with 2 kernel threads and --batch 2B, or two processes
with 1 thread each and --batch B (each its own streams). On a 2-core machine the two-process
figure mostly shows the all-reduce's cost, not a speed-up: the cores are the same ones. Each run
is its own process (tree), rounds interleaved; the table reports the best round.

    python bench/distributed.py                    # 3 rounds
    python bench/distributed.py --write-results    # ... and update bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine_info, write_marked_block  # noqa: E402

RESULTS_MD = HERE / "RESULTS.md"
BEGIN, END = "<!-- bench/distributed.py: begin -->", "<!-- bench/distributed.py: end -->"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, batch: int, steps: int, hidden: int, tmp: str) -> dict:
    js = os.path.join(tmp, f"run{processes}.json")
    args = ["charlm", "--steps", str(steps), "--hidden", str(hidden), "--eval-every", "100000",
            "--sample-every", "0", "--no-lr-decay", "--checkpoint", os.path.join(tmp, "lm.npz"),
            "--json", js, "--quiet", "--batch", str(batch // processes),
            "--threads", str(2 // processes)]  # fmt: skip
    if processes == 1:
        cmd = [sys.executable, "-m", "rnnfast", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(_port()), "-m", "rnnfast", *args, "--distributed"]  # fmt: skip
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=tmp)
    with open(js) as f:
        return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=64, help="global batch (streams)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    best: dict[int, dict] = {}
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for processes in (1, 2) if r % 2 == 0 else (2, 1):
                s = run(processes, args.batch, args.steps, args.hidden, tmp)
                if (processes not in best or s["total_chars_per_second"]
                        > best[processes]["total_chars_per_second"]):  # fmt: skip
                    best[processes] = s
    info = machine_info()
    title = ("### bench/distributed.py: charlm on one and two processes "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")  # fmt: skip
    one, two = best[1], best[2]
    lines = [
        f"`python bench/distributed.py --rounds {args.rounds}`: charlm's LSTM (hidden "
        f"{args.hidden}, seq-len 64, Adam), {args.steps} steps at a global batch of {args.batch} "
        "streams; one process with 2 threads, or two torchrun processes (gloo, loopback) with "
        f"1 thread and {args.batch // 2} streams each; best of the rounds; "
        f"{time.time() - t_start:.0f} s in all.",
        "",
        f"- CPU: {info['cpu_model']} ({info['cpu_family_model']}), {info['cpus']} CPUs",
        "",
        "| processes | threads each | chars/s, all processes | all-reduce ms/step | share of step"
        " |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n, s in ((1, one), (2, two)):
        step_ms = 1e3 * args.batch * 64 / s["total_chars_per_second"]
        share = s["allreduce_ms_per_step"] / step_ms if n > 1 else 0.0
        reduce = f"{s['allreduce_ms_per_step']:.2f}" if n > 1 else "-"
        lines.append(f"| {n} | {2 // n} | {s['total_chars_per_second']:,.0f} | {reduce} | "
                     f"{100 * share:.0f}% |")  # fmt: skip
    ratio = two["total_chars_per_second"] / one["total_chars_per_second"]
    lines += ["", f"Two processes give {ratio:.2f}x the one-process throughput on these "
              f"{info['cpus']} cores; the all-reduce time includes waiting for the slower "
              "process."]  # fmt: skip
    print("\n".join([title, "", *lines]))
    if args.write_results:
        write_marked_block(RESULTS_MD, BEGIN, END, title, lines)


if __name__ == "__main__":
    sys.exit(main())
