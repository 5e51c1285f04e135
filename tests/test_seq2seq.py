"""The encoder-decoder with attention: its backward against central finite differences
(float64, LSTM and GRU, with source padding), the dates task learned to high exact match, a
pairs file end to end, and clear errors for bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_grad_matches_differences

from rnnfast.__main__ import main
from rnnfast.models import seq2seq as s2s


@pytest.mark.parametrize(("cell", "score"), [("lstm", "bilinear"), ("gru", "additive")])
def test_backward_matches_finite_differences(cell, score):
    model = s2s.Seq2Seq(9, 7, embed=4, hidden=3, layers=2, cell=cell, score=score, seed=0,
                        dtype=np.float64)  # fmt: skip
    rng = np.random.default_rng(1)
    src = rng.integers(4, 9, size=(5, 3))
    src_len = np.array([5, 2, 4])
    src[src_len[None, :] <= np.arange(5)[:, None]] = s2s.PAD
    tin = rng.integers(4, 7, size=(4, 3))
    tout = rng.integers(4, 7, size=(4, 3))

    def loss():
        return s2s._masked_loss(model(src, src_len, tin), tout)[0]

    _, d = s2s._masked_loss(model(src, src_len, tin), tout)
    model.zero_grad()
    model.backward(d)
    for name in ("encoder.weight_hh_l0_reverse", "encoder.weight_ih_l1", "bridge.weight",
                 "decoder.weight_hh_l0", "attention.weight", "combine.bias", "src_embed.weight",
                 "tgt_embed.weight"):  # fmt: skip
        assert_grad_matches_differences(loss, model.params[name], model.grads[name], name,
                                        samples=10)  # fmt: skip


def test_a_score_without_weights_is_refused():
    # the decoder's queries are H wide, the bidirectional encoder's keys 2H
    with pytest.raises(ValueError, match="query_size == key_size"):
        s2s.Seq2Seq(9, 7, hidden=3, score="dot")


def test_dates_task_is_learned(tmp_path):
    js = tmp_path / "run.json"
    rc = main(["seq2seq", "--pairs", "3000", "--epochs", "4", "--quiet", "--json", str(js)])
    assert rc == 0
    result = json.loads(js.read_text())
    assert result["exact_match"] > 0.9 and result["token_accuracy"] > 0.97, result["exact_match"]


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
               "--epochs", "8", "--hidden", "48", "--quiet", "--json", str(js)])  # fmt: skip
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


def test_dates_are_real_dates_in_english():
    pairs = s2s.date_pairs(200, seed=3)
    import datetime as dt

    for text, iso in pairs:
        d = dt.date.fromisoformat(iso)
        assert str(d.year) in text
