"""The encoder-decoder with attention: its backward against central finite differences and against
the same model in torch (float64, LSTM and GRU, with and without input feeding, with source and
target padding), beam search against exhaustive search and greedy decoding, the dates task learned
to high exact match and BLEU, saved, translated and plotted, a pairs file end to end, and clear
errors for bad files and checkpoints."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from conftest import assert_grad_matches_differences

from rnnfast.__main__ import main
from rnnfast.models import seq2seq as s2s

CONFIGS = [("lstm", "bilinear", False), ("gru", "additive", False), ("lstm", "additive", True),
           ("gru", "bilinear", True)]  # fmt: skip


def _toy_batch():
    rng = np.random.default_rng(1)
    src = rng.integers(4, 9, size=(5, 3))
    src_len = np.array([5, 2, 4])
    src[src_len[None, :] <= np.arange(5)[:, None]] = s2s.PAD
    tin = rng.integers(4, 7, size=(4, 3))
    tout = rng.integers(4, 7, size=(4, 3))
    tout[3, 1] = s2s.PAD  # a padded target position
    return src, src_len, tin, tout


@pytest.mark.parametrize(("cell", "score", "feed"), CONFIGS)
def test_backward_matches_finite_differences(cell, score, feed):
    model = s2s.Seq2Seq(9, 7, embed=4, hidden=3, layers=2, cell=cell, score=score,
                        input_feeding=feed, seed=0, dtype=np.float64)  # fmt: skip
    src, src_len, tin, tout = _toy_batch()

    def loss():
        return s2s._masked_loss(model(src, src_len, tin), tout)[0]

    _, d = s2s._masked_loss(model(src, src_len, tin), tout)
    model.zero_grad()
    model.backward(d)
    dec = "decoder.weight_hh" if feed else "decoder.weight_hh_l0"
    for name in ("encoder.weight_hh_l0_reverse", "encoder.weight_ih_l1", "bridge.weight", dec,
                 "attention.weight", "combine.bias", "src_embed.weight",
                 "tgt_embed.weight"):  # fmt: skip
        assert_grad_matches_differences(loss, model.params[name], model.grads[name], name,
                                        samples=10)  # fmt: skip


def _bench_module():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "seq2seq.py"
    spec = importlib.util.spec_from_file_location("bench_seq2seq", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("cell", "score", "feed"), CONFIGS)
def test_matches_the_same_model_in_torch(cell, score, feed):
    # bench/seq2seq.py times this torch model: here it must compute what rnnfast's computes
    torch = pytest.importorskip("torch")
    model = s2s.Seq2Seq(9, 7, embed=4, hidden=3, layers=2, cell=cell, score=score,
                        input_feeding=feed, seed=0, dtype=np.float64)  # fmt: skip
    twin = _bench_module().torch_seq2seq_class()(9, 7, 4, 3, 2, cell, score, feed).double()
    missing = twin.load_state_dict({k: torch.from_numpy(v.copy())
                                    for k, v in model.state_dict().items()})  # fmt: skip
    assert not missing.missing_keys and not missing.unexpected_keys
    src, src_len, tin, tout = _toy_batch()
    logits = model(src, src_len, tin)
    loss, d = s2s._masked_loss(logits, tout)
    model.zero_grad()
    model.backward(d)
    t_logits = twin(torch.from_numpy(src), torch.from_numpy(src_len), torch.from_numpy(tin))
    t_loss = torch.nn.functional.cross_entropy(t_logits.reshape(-1, 7),
                                               torch.from_numpy(tout).reshape(-1),
                                               ignore_index=s2s.PAD)  # fmt: skip
    t_loss.backward()
    np.testing.assert_allclose(logits, t_logits.detach().numpy(), rtol=0, atol=1e-12)
    assert abs(loss - t_loss.item()) < 1e-12
    for name, p in twin.named_parameters():
        np.testing.assert_allclose(model.grads[name], p.grad.numpy(), rtol=0, atol=1e-12,
                                   err_msg=name)  # fmt: skip


def _score(model, src, src_len, hyp, alpha):
    """The length-normalised log probability beam search ranks hypothesis ``hyp`` by."""
    was = model.training
    model.eval()
    tin = np.array([[s2s.BOS, *hyp[:-1]]]).T
    logp = s2s._log_softmax(model(src, src_len, tin)[:, 0, :])
    model.train(was)
    return logp[np.arange(len(hyp)), hyp].sum() / s2s.length_penalty(len(hyp), alpha)


@pytest.mark.parametrize("feed", [False, True])
def test_beam_search_finds_the_best_hypothesis_when_it_can_keep_them_all(feed):
    import itertools

    # 4 tokens can be output (</s>, <unk> and two words); at most 4 steps: a beam of 27 keeps
    # every live prefix, so it must find the best of all 121 hypotheses, as exhaustive search
    model = s2s.Seq2Seq(9, 6, embed=4, hidden=5, cell="lstm", input_feeding=feed, seed=3,
                        dtype=np.float64)  # fmt: skip
    src, src_len = np.array([[5], [7], [4]]), np.array([3])
    words = [s2s.EOS, s2s.UNK, 4, 5]
    hyps = [[*p, s2s.EOS] for n in range(4) for p in itertools.product(words[1:], repeat=n)]
    hyps += [list(p) for p in itertools.product(words[1:], repeat=4)]  # cut at max_len
    for alpha in (0.0, 0.6, 2.0):
        best = max(hyps, key=lambda h: _score(model, src, src_len, h, alpha))
        assert model.beam_search(src, src_len, 4, beam=27, alpha=alpha) == [best]


def test_beam_of_one_is_greedy_and_a_batch_decodes_as_its_rows():
    model = s2s.Seq2Seq(9, 7, embed=4, hidden=6, layers=1, cell="gru", seed=5)
    rng = np.random.default_rng(2)
    src = rng.integers(4, 9, size=(6, 5))
    src_len = np.array([6, 3, 1, 5, 2])
    src[src_len[None, :] <= np.arange(6)[:, None]] = s2s.PAD
    greedy = model.greedy(src, src_len, 8)
    beam1 = model.beam_search(src, src_len, 8, beam=1, alpha=0.0)
    for n in range(5):
        row = greedy[:, n].tolist()
        assert beam1[n] == (row[: row.index(s2s.EOS) + 1] if s2s.EOS in row else row)
    batched = model.beam_search(src, src_len, 8, beam=4)
    for n in range(5):
        one = model.beam_search(src[: src_len[n], n : n + 1], src_len[n : n + 1], 8, beam=4)
        assert one == [batched[n]]
    with pytest.raises(ValueError, match="beam must be a positive integer"):
        model.beam_search(src, src_len, 8, beam=0)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        model.beam_search(src, src_len, 8, alpha=-1)


def test_a_score_without_weights_is_refused():
    # the decoder's queries are H wide, the bidirectional encoder's keys 2H
    with pytest.raises(ValueError, match="query_size == key_size"):
        s2s.Seq2Seq(9, 7, hidden=3, score="dot")


def test_dates_task_is_learned_saved_translated_and_plotted(tmp_path, capsys):
    js, ck, png = tmp_path / "run.json", tmp_path / "s2s.npz", tmp_path / "attention.png"
    # the plot where matplotlib is installed (an optional extra; the emulated aarch64 run has none)
    plots = importlib.util.find_spec("matplotlib") is not None
    plot = ["--plot-attention", str(png)] if plots else []
    rc = main(["seq2seq", "--pairs", "3000", "--epochs", "4", "--quiet", "--json", str(js),
               "--checkpoint", str(ck), *plot])  # fmt: skip
    assert rc == 0
    result = json.loads(js.read_text())
    assert result["exact_match"] > 0.9 and result["token_accuracy"] > 0.97, result["exact_match"]
    assert result["exact_match_greedy"] > 0.9 and result["decoding"] == "beam 5, alpha 0.6"
    hyps = [h for _, h, _ in result["examples"]]
    refs = [r[0] for _, _, r in result["examples"]]
    if importlib.util.find_spec("sacrebleu"):  # BLEU is sacrebleu's (an optional extra)
        import sacrebleu

        assert result["bleu"] > 90
        assert s2s.bleu(hyps, [[r] for r in refs]) == sacrebleu.corpus_bleu(hyps, [refs]).score
    else:
        assert result["bleu"] is None and s2s.bleu(hyps, [[r] for r in refs]) is None
    assert not plots or png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    sources = [s for s, _, _ in result["examples"]]
    assert main(["translate", "--checkpoint", str(ck), *sources]) == 0
    assert capsys.readouterr().out.splitlines() == hyps  # the saved model decodes as the trained
    model, src_vocab, tgt_vocab, meta = s2s.load_model(str(ck))
    assert meta["max_len"] >= 11 and model.config["input_feeding"] is False
    with pytest.raises(SystemExit, match="holds no tokens"):
        main(["translate", "--checkpoint", str(ck), "   "])
    with pytest.raises(SystemExit, match="no such file|not found|does not exist|No such"):
        main(["translate", "--checkpoint", str(tmp_path / "none.npz"), "1 May 2000"])


def test_input_feeding_learns(tmp_path):
    js = tmp_path / "run.json"
    rc = main(["seq2seq", "--pairs", "3000", "--epochs", "4", "--input-feeding", "--quiet",
               "--beam", "3", "--json", str(js), "--checkpoint", ""])  # fmt: skip
    assert rc == 0
    result = json.loads(js.read_text())
    if result["stopped_by_time_limit"]:  # an emulated CPU: 4 epochs take longer than the limit
        pytest.skip(f"the time limit ended training after {result['epochs_run']} of 4 epochs")
    assert result["exact_match"] > 0.9, result["exact_match"]


def test_a_time_limit_is_reported(tmp_path):
    js = tmp_path / "run.json"
    rc = main(["seq2seq", "--pairs", "300", "--epochs", "3", "--quiet", "--time-limit", "1e-6",
               "--json", str(js), "--checkpoint", ""])  # fmt: skip
    assert rc == 0
    result = json.loads(js.read_text())
    assert result["stopped_by_time_limit"] and result["epochs_run"] == 1


def test_a_charlm_checkpoint_is_not_a_seq2seq_one(tmp_path):
    import rnnfast

    path = tmp_path / "other.npz"
    rnnfast.save_checkpoint(path, rnnfast.LSTM(3, 4), step=1)
    with pytest.raises(SystemExit, match="not a seq2seq checkpoint"):
        main(["translate", "--checkpoint", str(path), "x"])


def test_pairs_file_and_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "sun", "tree", "sky", "sea"]
    lines = []
    for _ in range(300):  # a toy translation: the words reversed, with an attribution column
        src = list(rng.choice(words, size=rng.integers(1, 5)))
        lines.append(f"{' '.join(src)}\t{' '.join(reversed(src))}\tCC-BY x")
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    js = tmp_path / "run.json"
    rc = main(["seq2seq", "--data", str(tmp_path / "pairs.tsv"), "--tokens", "word",
               "--epochs", "8", "--hidden", "48", "--quiet", "--json", str(js),
               "--checkpoint", str(tmp_path / "s2s.npz")])  # fmt: skip
    assert rc == 0 and json.loads(js.read_text())["token_accuracy"] > 0.8
    (tmp_path / "bad.tsv").write_text("only one column\n")
    with pytest.raises(SystemExit, match="line 1: expected source<TAB>target"):
        main(["seq2seq", "--data", str(tmp_path / "bad.tsv"), "--quiet"])
    (tmp_path / "empty.tsv").write_text("\n")
    with pytest.raises(SystemExit, match="holds no pairs"):
        main(["seq2seq", "--data", str(tmp_path / "empty.tsv"), "--quiet"])
    (tmp_path / "few.tsv").write_text("a\tb\nc\td\n")
    with pytest.raises(SystemExit, match="too few"):
        main(["seq2seq", "--data", str(tmp_path / "few.tsv"), "--quiet"])


def test_every_translation_of_a_source_is_a_reference(tmp_path):
    pytest.importorskip("sacrebleu")
    # one reference of the two matches: BLEU 100 (sacrebleu's own multi-reference BLEU)
    hyp = "the cat sat on the mat"
    assert s2s.bleu([hyp], [["a dog sat on a rug", hyp]]) == pytest.approx(100)
    assert s2s.bleu([hyp], [["a dog sat on a rug"]]) < 20
    assert s2s.bleu([hyp, "e f g h"], [[hyp], ["x", "e f g h"]]) == pytest.approx(100)
    # a file whose sources come twice, with two translations each: the split keeps them together
    lines = [f"w{i}\ta{i}\nw{i}\tb{i}" for i in range(60)]
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    js = tmp_path / "run.json"
    main(["seq2seq", "--data", str(tmp_path / "pairs.tsv"), "--epochs", "1", "--quiet",
          "--checkpoint", "", "--json", str(js)])  # fmt: skip
    result = json.loads(js.read_text())
    assert result["n_test"] == 6 and result["n_test_pairs"] == 12 and result["n_train"] == 96
    for src, _, refs in result["examples"]:
        assert refs == [f"a{src[1:]}", f"b{src[1:]}"]


def test_dates_are_real_dates_in_english():
    pairs = s2s.date_pairs(200, seed=3)
    import datetime as dt

    for text, iso in pairs:
        d = dt.date.fromisoformat(iso)
        assert str(d.year) in text
