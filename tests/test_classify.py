"""python -m rnnfast classify and its parts: readers for TSV, CSV and IMDB-style folders, the
vocabulary, GloVe vectors, the classifier's backward for every pooling against finite
differences, a run that must learn a task the test writes, and clear errors for bad data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_grad_matches_differences

from rnnfast.__main__ import main
from rnnfast.losses import softmax_cross_entropy
from rnnfast.models import classify as cl

POS = ["great", "wonderful", "superb", "lovely", "moving", "brilliant"]
NEG = ["awful", "dull", "boring", "terrible", "bland", "tedious"]
FILLER = ["the", "film", "was", "a", "story", "with", "acting", "and", "plot", "it"]


def _texts(n, seed=0):
    """Sentences whose label is carried by one or two sentiment words among filler."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(0, 2))
        words = list(rng.choice(FILLER, size=rng.integers(3, 15)))
        for _ in range(rng.integers(1, 3)):
            words.insert(int(rng.integers(0, len(words) + 1)), rng.choice(POS if label else NEG))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def _write_tsv(path, texts, labels, header="sentence\tlabel"):
    path.write_text(header + "\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels,
                                                                         strict=True)))  # fmt: skip


@pytest.mark.parametrize("pool", ["last", "mean", "max"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_classifier_backward_matches_finite_differences(pool, cell):
    model = cl.TextClassifier(12, 3, embed=5, hidden=4, cell=cell, pool=pool, dropout=0.0,
                              seed=1, dtype=np.float64)  # fmt: skip
    rng = np.random.default_rng(2)
    lengths = np.array([5, 1, 3])
    ids = rng.integers(1, 12, size=(5, 3))
    ids[lengths[None, :] <= np.arange(5)[:, None]] = 0
    y = np.array([0, 2, 1])

    def loss():
        return softmax_cross_entropy(model(ids, lengths), y)[0]

    _, d = softmax_cross_entropy(model(ids, lengths), y)
    model.zero_grad()
    model.backward(d)
    for name in ("rnn.weight_hh_l0_reverse", "rnn.weight_ih_l0", "embed.weight", "head.weight"):
        assert_grad_matches_differences(loss, model.params[name], model.grads[name], name)


def test_readers_tsv_csv_and_folder(tmp_path):
    _write_tsv(tmp_path / "a.tsv", ['say "hi', "ok"], [1, 0])  # an unbalanced quote, as SST-2
    assert cl.read_table(str(tmp_path / "a.tsv")) == (['say "hi', "ok"], ["1", "0"])
    (tmp_path / "b.csv").write_text('id,review,sentiment\n1,"good, really",pos\n2,bad,neg\n')
    assert cl.read_table(str(tmp_path / "b.csv")) == (["good, really", "bad"], ["pos", "neg"])
    for split, label, text in [("train", "pos", "fine"), ("train", "neg", "poor"),
                               ("test", "pos", "nice<br />film")]:  # fmt: skip
        d = tmp_path / "imdb" / split / label
        d.mkdir(parents=True, exist_ok=True)
        (d / "0_7.txt").write_text(text)
    splits = cl.read_folder(str(tmp_path / "imdb"))
    assert splits["train"] == (["poor", "fine"], ["neg", "pos"])
    assert splits["test"] == (["nice film"], ["pos"])


def test_vocabulary_and_embeddings(tmp_path):
    v = cl.Vocabulary([["a", "b", "a"], ["c", "a", "b"]], min_freq=2)
    assert v.words == ["<pad>", "<unk>", "a", "b"] and list(v.encode(["a", "z"])) == [2, 1]
    assert len(cl.Vocabulary([["a", "b", "c"]], max_size=3)) == 3
    (tmp_path / "g.txt").write_text("a 1 2\nzz 3 4\nb 5 6\n")
    table, found = cl.load_embeddings(str(tmp_path / "g.txt"), v, rng=0)
    assert found == 2 and table.shape == (4, 2)
    assert list(table[2]) == [1, 2] and list(table[0]) == [0, 0]
    (tmp_path / "bad.txt").write_text("a 1 2\nb 5\n")
    with pytest.raises(cl.DataError, match="line 2: 1 values, line 1 has 2"):
        cl.load_embeddings(str(tmp_path / "bad.txt"), v, rng=0)


def test_classify_command_learns(tmp_path, capsys):
    texts, labels = _texts(1200)
    _write_tsv(tmp_path / "train.tsv", texts, labels)
    vt, vl = _texts(200, seed=1)
    _write_tsv(tmp_path / "dev.tsv", vt, vl)
    (tmp_path / "glove.txt").write_text("".join(
        f"{w} " + " ".join(["0.5"] * 16) + "\n" for w in POS))  # fmt: skip
    for pool in ("max", "last"):
        js = tmp_path / f"{pool}.json"
        rc = main(["classify", "--data", str(tmp_path / "train.tsv"), "--valid",
                   str(tmp_path / "dev.tsv"), "--embed", "16", "--hidden", "24", "--epochs", "4",
                   "--pool", pool, "--min-freq", "1", "--embeddings", str(tmp_path / "glove.txt"),
                   "--quiet", "--json", str(js)])  # fmt: skip
        assert rc == 0
        result = json.loads(js.read_text())
        assert result["accuracy"] > 0.9, (pool, result["accuracy"])
        assert result["n_heldout"] == 200 and result["embeddings_found"] == len(POS)
        assert set(result["per_class"]) == {"0", "1"} and len(result["confusion"]) == 2
    out = capsys.readouterr().out
    assert "precision" in out and "held-out accuracy" in out


def test_classify_bad_data_gets_clear_errors(tmp_path):
    def run(*args):
        with pytest.raises(SystemExit) as e:
            main(["classify", *args, "--quiet", "--epochs", "1"])
        return str(e.value)

    (tmp_path / "empty.tsv").write_text("")
    assert "is empty" in run("--data", str(tmp_path / "empty.tsv"))
    _write_tsv(tmp_path / "nocol.tsv", ["a b"], [1], header="words\tlabel")
    assert "no text column" in run("--data", str(tmp_path / "nocol.tsv"))
    texts, labels = _texts(50)
    _write_tsv(tmp_path / "t.tsv", texts, labels)
    _write_tsv(tmp_path / "v.tsv", ["great film"], [7])
    assert "labels the training data lacks: ['7']" in run(
        "--data", str(tmp_path / "t.tsv"), "--valid", str(tmp_path / "v.tsv")
    )
    (tmp_path / "short.tsv").write_text("sentence\tlabel\nno label here\n")
    assert "line 2: 1 fields" in run("--data", str(tmp_path / "short.tsv"))
    _write_tsv(tmp_path / "one.tsv", texts, [1] * len(texts))
    assert "need two or more" in run("--data", str(tmp_path / "one.tsv"))
    assert "not a file" in run("--data", str(tmp_path / "missing.tsv"))
