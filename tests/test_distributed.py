"""rnnfast.distributed on two CPU processes (gloo, loopback): after k data-parallel steps on
half batches the parameters equal one process's on the whole batches (to float32 rounding)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

STEPS = 4
SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch.distributed as dist
    import rnnfast
    from rnnfast import distributed as rd, losses, optim
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    model = rnnfast.Sequential(rnnfast.Embedding(11, 6, seed=rank),  # unequal until broadcast
                               rnnfast.GRU(6, 8, seed=rank + 10), rnnfast.Linear(8, 11, seed=3))
    if world > 1:
        rd.broadcast_parameters(model)
    opt = optim.Adam(model.params, lr=1e-2)
    rng = np.random.default_rng(0)
    for step in range(STEPS):
        ids = rng.integers(0, 11, size=(5, 8))
        mine = rd.shard(ids.T, rank, world).T if world > 1 else ids  # columns: sequences
        logits = model(mine)
        loss, d = losses.softmax_cross_entropy(logits, (mine + 1) % 11)
        model.zero_grad()
        model.backward(d)
        if world > 1:
            rd.all_reduce_gradients(model, bucket_mb=0.001)  # several buckets
        opt.step(model.grads)
    if rd.is_main_process():
        np.savez(out, **{k.replace(".", "_"): v for k, v in model.params.items()})
    if world > 1:
        dist.destroy_process_group()
""").replace("STEPS", str(STEPS))


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_and_two_processes(tmp_path, text: str, ext: str):
    """Runs the script ``text`` (argv: rank, world, port, output) as one process and as two
    gloo processes; returns the paths rank 0 wrote in each."""
    script = tmp_path / "train.py"
    script.write_text(text)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / f"one.{ext}", tmp_path / f"two.{ext}"
    subprocess.run([sys.executable, str(script), "0", "1", "0", str(one)], check=True, env=env,
                   timeout=120, cwd=tmp_path)  # fmt: skip
    port = str(_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", port, str(two)],
                              env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
             for r in range(2)]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    return one, two


def test_two_processes_equal_one_on_the_whole_batch(tmp_path):
    one, two = _one_and_two_processes(tmp_path, SCRIPT, "npz")
    a, b = np.load(one), np.load(two)
    assert a.files == b.files
    for k in a.files:
        np.testing.assert_allclose(b[k], a[k], rtol=2e-5, atol=2e-6, err_msg=k)


def test_shard_and_errors():
    from rnnfast import distributed as rd

    assert rd.shard(list(range(7)), 1, 3) == [1, 4]
    with pytest.raises(ValueError, match="outside"):
        rd.shard([1], 2, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        rd.all_reduce_gradients({"a": np.zeros(2)})
    assert rd.is_main_process() and rd.world_size() == 1


DDP_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch, torch.distributed as dist
    import rnnfast.torch as rt
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.manual_seed(0)
    net = torch.nn.ModuleDict({"rnn": rt.LSTM(4, 6, num_layers=2, bidirectional=True),
                               "head": torch.nn.Linear(12, 3)})
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
        def forward(self, x):
            h, _ = self.inner["rnn"](x)
            return self.inner["head"](h)

    runner = Wrapped(net)
    if world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(runner)
    for _ in range(3):
        x = torch.randn(5, 8, 4, generator=gen)
        y = torch.randint(0, 3, (5, 8), generator=gen)
        if world > 1:
            x, y = x[:, rank::world], y[:, rank::world]
        loss = torch.nn.functional.cross_entropy(runner(x).reshape(-1, 3), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, out)
    if world > 1:
        dist.destroy_process_group()
""")


def test_rnnfast_torch_under_distributed_data_parallel(tmp_path):
    one, two = _one_and_two_processes(tmp_path, DDP_SCRIPT, "pt")
    a, b = torch.load(one), torch.load(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=2e-5, atol=2e-6, msg=k)


def test_charlm_distributed_under_torchrun(tmp_path):
    """torchrun --nproc_per_node 2 -m rnnfast charlm --distributed: two processes train one
    model; rank 0 alone writes the checkpoint and the summary."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    ck, js = tmp_path / "lm.npz", tmp_path / "run.json"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_port()), "-m", "rnnfast", "charlm", "--distributed",
         "--hidden", "48", "--embed", "16", "--seq-len", "32", "--batch", "8", "--steps", "30",
         "--eval-every", "30", "--max-chars", "30000", "--sample-every", "0", "--threads", "1",
         "--lr", "1e-2", "--checkpoint", str(ck), "--json", str(js), "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    summary = json.loads(js.read_text())
    assert summary["steps"] == 30 and summary["val_perplexity"] < summary["unigram_perplexity"]
    assert summary["processes"] == 2 and summary["allreduce_ms_per_step"] > 0
    assert summary["total_chars_per_second"] == pytest.approx(2 * summary["chars_per_second"])
    assert r.stdout.count("validation perplexity") == 1  # rank 0 reports, once
    from rnnfast.models import charlm

    model, _, meta = charlm.load_model(str(ck))
    assert meta["step"] == 30


def test_charlm_distributed_outside_torchrun_says_how():
    from rnnfast.__main__ import main

    env_rank = os.environ.pop("RANK", None)
    try:
        with pytest.raises(SystemExit, match="torchrun --nproc_per_node 2"):
            main(["charlm", "--distributed", "--steps", "1", "--quiet"])
    finally:
        if env_rank is not None:
            os.environ["RANK"] = env_rank
