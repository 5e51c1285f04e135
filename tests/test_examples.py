"""Both examples end to end on tiny settings: the charlm command line (train, resume, sample) and
the digits classifier."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from rnnfast.__main__ import main
from rnnfast.models import charlm

TINY = ["--hidden", "48", "--embed", "16", "--seq-len", "32", "--batch", "16", "--lr", "1e-2",
        "--max-chars", "30000", "--sample-length", "40", "--quiet"]  # fmt: skip


def test_charlm_trains_resumes_and_samples(tmp_path, capsys):
    ck, js = tmp_path / "lm.npz", tmp_path / "run.json"
    rc = main(["charlm", *TINY, "--steps", "40", "--eval-every", "20", "--sample-every", "20",
               "--checkpoint", str(ck), "--json", str(js)])  # fmt: skip
    assert rc == 0 and ck.exists()
    summary = json.loads(js.read_text())
    vocab = len(charlm.Vocab("".join(charlm.default_corpus(30000))))
    assert summary["steps"] == 40 and math.isfinite(summary["val_loss"])
    assert summary["val_loss"] < math.log(vocab)  # better than uniform
    assert summary["val_perplexity"] < summary["unigram_perplexity"]
    assert "validation perplexity" in capsys.readouterr().out

    # resuming continues from step 40 with the saved model and optimizer
    rc = main(["charlm", *TINY, "--steps", "50", "--eval-every", "100", "--sample-every", "0",
               "--checkpoint", str(ck), "--resume", str(ck), "--json", str(js)])  # fmt: skip
    assert rc == 0 and json.loads(js.read_text())["steps"] == 50
    model, vocab_, meta = charlm.load_model(str(ck))
    assert meta["step"] == 50 and meta["model_config"]["hidden"] == 48

    out = subprocess.run(
        [sys.executable, "-m", "rnnfast", "sample", "--checkpoint", str(ck), "--prime", "def ",
         "--temperature", "0.8", "--length", "60", "--seed", "1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,  # not the checkout
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def ") and len(out.stdout) == 4 + 60 + 1
    # the same seed gives the same text
    text = charlm.sample(model, vocab_, "def ", 30, 0.8, rng=3)
    assert text == charlm.sample(model, vocab_, "def ", 30, 0.8, rng=3)


def test_charlm_in_bfloat16(tmp_path):
    # the LSTM's and the head's products in bfloat16 (AMX tiles where the CPU has them): it
    # learns as float32 does; a CPU without AVX512_BF16 gets a clear message
    import rnnfast

    js = tmp_path / "run.json"
    args = ["charlm", *TINY, "--steps", "40", "--eval-every", "40", "--sample-every", "0",
            "--checkpoint", str(tmp_path / "lm.npz"), "--json", str(js),
            "--matmul-precision", "bfloat16"]  # fmt: skip
    if not rnnfast.bfloat16_supported():
        with pytest.raises(SystemExit, match="AVX512_BF16"):
            main(args)
        return
    assert main(args) == 0
    summary = json.loads(js.read_text())
    assert summary["val_perplexity"] < summary["unigram_perplexity"]


def test_charlm_with_recurrent_dropout_and_zoneout(tmp_path):
    ck, js = tmp_path / "lm.npz", tmp_path / "run.json"
    rc = main(["charlm", *TINY, "--steps", "30", "--eval-every", "30", "--sample-every", "0",
               "--recurrent-dropout", "0.25", "--zoneout", "0.1", "--checkpoint", str(ck),
               "--json", str(js)])  # fmt: skip
    assert rc == 0
    summary = json.loads(js.read_text())
    assert summary["val_perplexity"] < summary["unigram_perplexity"]
    model, _, meta = charlm.load_model(str(ck))
    assert meta["model_config"]["recurrent_dropout"] == 0.25
    assert model.rnn.recurrent_dropout == 0.25 and model.rnn.zoneout == 0.1
    # a checkpoint from before these options (no such keys) still loads, with both at 0
    from rnnfast import checkpoint

    state, opt_state, meta = checkpoint.read_checkpoint(str(ck))
    old = {k: v for k, v in meta["model_config"].items() if k not in ("recurrent_dropout",
                                                                      "zoneout")}  # fmt: skip
    opt = charlm.OPTIMIZERS["adam"](model.params)
    checkpoint.save_checkpoint(tmp_path / "old.npz", model, opt, **{**meta, "model_config": old})
    model, _, _ = charlm.load_model(str(tmp_path / "old.npz"))
    assert model.rnn.zoneout == 0.0
    assert not model.rnn.layer_norm
    out = _run_cli(tmp_path, "charlm", "--zoneout", "1.5", "--steps", "2")
    assert out.returncode == 2 and "must be a probability in [0, 1)" in out.stderr


def test_charlm_with_layer_norm(tmp_path):
    ck, js = tmp_path / "lm.npz", tmp_path / "run.json"
    rc = main(["charlm", *TINY, "--steps", "30", "--eval-every", "30", "--sample-every", "0",
               "--layer-norm", "--checkpoint", str(ck), "--json", str(js)])  # fmt: skip
    assert rc == 0
    summary = json.loads(js.read_text())
    assert summary["val_perplexity"] < summary["unigram_perplexity"]
    model, _, meta = charlm.load_model(str(ck))
    assert meta["model_config"]["layer_norm"] is True and model.rnn.layer_norm
    assert "rnn.ln_gamma_c_l0" in model.state_dict()
    # the trained gains moved away from 1 and are what the checkpoint holds
    assert not np.allclose(model.rnn.params["ln_gamma_hh_l0"], 1.0)


def test_charlm_time_limit_ends_the_run(tmp_path):
    js = tmp_path / "run.json"
    main(["charlm", *TINY, "--steps", "1000000", "--time-limit", "2", "--sample-every", "0",
          "--checkpoint", str(tmp_path / "t.npz"), "--json", str(js)])  # fmt: skip
    summary = json.loads(js.read_text())
    assert summary["stopped_by_time_limit"] and 0 < summary["steps"] < 1000000
    # the limit counts from the start; where setup takes longer (an emulated CPU) one step runs
    bound = max(2, summary["setup_seconds"]) + 2
    assert summary["seconds"] < bound and (tmp_path / "t.npz").exists()


def test_charlm_time_limit_spent_by_setup_still_trains_a_step(tmp_path):
    js = tmp_path / "run.json"
    main(["charlm", *TINY, "--steps", "1000", "--time-limit", "1e-6", "--sample-every", "0",
          "--checkpoint", str(tmp_path / "t.npz"), "--json", str(js)])  # fmt: skip
    summary = json.loads(js.read_text())
    assert summary["stopped_by_time_limit"] and summary["steps"] == 1


def test_charlm_command_line_errors(tmp_path):
    run = [sys.executable, "-m", "rnnfast"]
    out = subprocess.run([*run, "sample", "--checkpoint", str(tmp_path / "none.npz")],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert out.returncode != 0 and "does not exist" in out.stderr
    (tmp_path / "bad.npz").write_bytes(b"junk")
    out = subprocess.run([*run, "sample", "--checkpoint", str(tmp_path / "bad.npz")],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert out.returncode != 0 and "corrupt" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([*run, "charlm", "--steps", "0"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2 and "--steps" in out.stderr


def test_charlm_custom_corpus_and_unknown_prime(tmp_path):
    corpus = tmp_path / "abc.txt"
    corpus.write_text("abcab cabca\n" * 400)
    ck = tmp_path / "abc.npz"
    main(["charlm", "--corpus", str(corpus), *TINY, "--steps", "30", "--eval-every", "30",
          "--sample-every", "0", "--checkpoint", str(ck)])  # fmt: skip
    model, vocab, meta = charlm.load_model(str(ck))
    assert vocab.chars == "\n abc"
    assert meta["val_loss"] < math.log(5)
    with pytest.raises(ValueError, match="vocabulary"):
        charlm.sample(model, vocab, "xyz", 5)


def test_unigram_perplexity():
    ids = np.array([0, 0, 1, 1])
    assert charlm.unigram_perplexity(ids, ids, 2) == pytest.approx(2.0)


def test_digits_tiny_run():
    pytest.importorskip("sklearn")
    from rnnfast.models.digits import train_digits

    result = train_digits("lstm", hidden=24, epochs=3, batch=64, lr=1e-2, quiet=True)
    assert result["n_test"] == 450 and result["test_accuracy"] > 0.5


@pytest.mark.slow
def test_digits_reaches_95_percent(capsys):
    pytest.importorskip("sklearn")
    assert main(["digits", "--cell", "gru", "--epochs", "12", "--quiet"]) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("test accuracy ")[1].split()[0])
    assert accuracy >= 0.95, out


def _run_cli(tmp_path, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "rnnfast", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=tmp_path)  # fmt: skip


def test_charlm_batch_larger_than_the_corpus_is_a_one_line_error(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text("abcab cabca\n" * 100)
    out = _run_cli(tmp_path, "charlm", "--corpus", str(corpus), "--batch", "5000", "--steps", "2",
                   "--quiet", "--checkpoint", str(tmp_path / "c.npz"))  # fmt: skip
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "--batch 5000 is too large" in out.stderr


def _tiny_checkpoint(tmp_path):
    ck = tmp_path / "good.npz"
    main(["charlm", *TINY, "--steps", "4", "--eval-every", "4", "--sample-every", "0",
          "--checkpoint", str(ck)])  # fmt: skip
    return ck


def test_charlm_diverging_run_stops_and_keeps_the_good_checkpoint(tmp_path):
    """SGD at lr 1e30: the first step leaves huge weights, every later loss is non-finite; the
    trainer skips those steps, stops after five in a row with a one-line error, and the good
    checkpoint at the same path is never replaced."""
    ck = _tiny_checkpoint(tmp_path)
    good = ck.read_bytes()
    out = _run_cli(tmp_path, "charlm", *TINY, "--optimizer", "sgd", "--lr", "1e30", "--clip", "0",
                   "--steps", "50", "--eval-every", "10", "--sample-every", "0",
                   "--checkpoint", str(ck))  # fmt: skip
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert "5 training steps in a row had a non-finite loss or gradient" in out.stderr
    assert ck.read_bytes() == good


def test_charlm_resume_of_malformed_checkpoints_is_a_one_line_error(tmp_path):
    """Checkpoints whose metadata lies about the model (each crafted from a good one) end in
    "error: ...", never a traceback."""
    from rnnfast import checkpoint

    ck = _tiny_checkpoint(tmp_path)
    model, vocab, meta = charlm.load_model(str(ck))
    opt = charlm.OPTIMIZERS["adam"](model.params)
    checkpoint.load_checkpoint(ck, model, opt)
    variants = {
        "no_vocab": {"vocab": None},
        "vocab_number": {"vocab": 5},
        "config_missing": {"model_config": None},
        "hidden_negative": {"model_config": {**meta["model_config"], "hidden": -1}},
        "hidden_mismatch": {"model_config": {**meta["model_config"], "hidden": 49}},
        "hidden_float": {"model_config": {**meta["model_config"], "hidden": 48.5}},
        "dropout_str": {"model_config": {**meta["model_config"], "dropout": "x"}},
        "zoneout_one": {"model_config": {**meta["model_config"], "zoneout": 1.0}},
        "config_extra_key": {"model_config": {**meta["model_config"], "layer_norm": True}},
        "vocab_mismatch": {"vocab": meta["vocab"][:-1]},
        "optimizer_unknown": {"optimizer_name": "lion"},
        "step_str": {"step": "ten"},
        "step_negative": {"step": -3},
        "base_lr_str": {"base_lr": "fast"},
    }
    for name, change in variants.items():
        path = tmp_path / f"{name}.npz"
        checkpoint.save_checkpoint(path, model, opt, **{**meta, **change})
        for command in (["charlm", *TINY, "--steps", "6", "--resume", str(path),
                         "--checkpoint", str(tmp_path / "out.npz")],
                        ["sample", "--checkpoint", str(path), "--length", "5"]):  # fmt: skip
            if command[0] == "sample" and name.startswith(("optimizer", "step", "base_lr")):
                continue  # sampling reads neither
            out = _run_cli(tmp_path, *command)
            assert out.returncode != 0, (name, command[0])
            assert "Traceback" not in out.stderr and "error:" in out.stderr, (name, out.stderr)
            assert str(path) in out.stderr, (name, out.stderr)  # the file, named


def test_charlm_resume_refuses_a_conflicting_model_option(tmp_path):
    ck = tmp_path / "lm.npz"
    main(["charlm", *TINY, "--steps", "3", "--eval-every", "3", "--sample-every", "0",
          "--checkpoint", str(ck)])  # fmt: skip
    with pytest.raises(SystemExit, match=r"drop --hidden 128 \(the checkpoint has 48\)"):
        main(["charlm", "--resume", str(ck), "--hidden", "128", "--steps", "5", "--quiet",
              "--checkpoint", str(ck)])  # fmt: skip
    with pytest.raises(SystemExit, match=r"--layer-norm True \(the checkpoint has False\)"):
        main(["charlm", "--resume", str(ck), "--layer-norm", "--steps", "5", "--quiet",
              "--checkpoint", str(ck)])  # fmt: skip


def test_charlm_short_run_still_shows_a_sample(tmp_path, capsys):
    tiny = [a for a in TINY if a != "--quiet"]
    main(["charlm", *tiny, "--steps", "4", "--eval-every", "4", "--checkpoint",
          str(tmp_path / "lm.npz")])  # fmt: skip
    assert "--- sample at step 4" in capsys.readouterr().err
