"""rnnfast.sequences: padding, masks, bucketing, truncated BPTT (and its use with a layer)."""

from __future__ import annotations

import numpy as np
import pytest

from rnnfast import LSTM, sequences


def test_pad_and_unpad_round_trip():
    rng = np.random.default_rng(0)
    seqs = [rng.standard_normal((k, 3)) for k in (4, 1, 6, 0)]
    for batch_first in (False, True):
        padded, lengths = sequences.pad_sequences(seqs, batch_first=batch_first, padding_value=-1)
        assert padded.shape == ((4, 6, 3) if batch_first else (6, 4, 3))
        np.testing.assert_array_equal(lengths, [4, 1, 6, 0])
        back = sequences.unpad(padded, lengths, batch_first=batch_first)
        for a, b in zip(seqs, back, strict=True):
            np.testing.assert_array_equal(a, b)
        tm = padded if not batch_first else padded.swapaxes(0, 1)
        assert (tm[1:, 1] == -1).all()


def test_pad_token_lists_matches_torch():
    torch = pytest.importorskip("torch")
    tokens = [[1, 2, 3], [4], [5, 6]]
    padded, lengths = sequences.pad_sequences(tokens, padding_value=9)
    expected = torch.nn.utils.rnn.pad_sequence([torch.tensor(t) for t in tokens], padding_value=9)
    np.testing.assert_array_equal(padded, expected.numpy())
    assert padded.dtype.kind == "i"
    padded, _ = sequences.pad_sequences(tokens, batch_first=True, max_len=5)
    assert padded.shape == (3, 5)


def test_pad_errors():
    with pytest.raises(ValueError, match="feature shape"):
        sequences.pad_sequences([np.zeros((2, 3)), np.zeros((2, 4))])
    with pytest.raises(ValueError, match="empty"):
        sequences.pad_sequences([])
    with pytest.raises(ValueError, match="max_len"):
        sequences.pad_sequences([[1, 2, 3]], max_len=2)


def test_lengths_to_mask_and_reverse():
    mask = sequences.lengths_to_mask([2, 0, 3])
    np.testing.assert_array_equal(mask.T, [[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    assert sequences.lengths_to_mask([2, 1], max_len=4, batch_first=True).shape == (2, 4)
    x = np.arange(4)[:, None] * 10 + np.arange(3)[None, :]  # x[t, n] = 10 t + n
    r = sequences.reverse_padded(x, np.array([4, 2, 0]))
    np.testing.assert_array_equal(r[:, 0], [30, 20, 10, 0])
    np.testing.assert_array_equal(r[:, 1], [11, 1, 21, 31])
    np.testing.assert_array_equal(r[:, 2], x[:, 2])
    np.testing.assert_array_equal(sequences.reverse_padded(r, np.array([4, 2, 0])), x)
    with pytest.raises(ValueError, match="<= T"):
        sequences.lengths_to_mask([5], max_len=4)


def test_bucket_iterator_covers_everything_once_with_little_padding():
    rng = np.random.default_rng(1)
    seqs = [rng.standard_normal((int(k), 2)) for k in rng.integers(1, 50, 203)]
    labels = np.arange(203)
    it = sequences.BucketIterator(seqs, labels, batch_size=16, bucket_size=4, rng=0)
    seen, padded_steps, real_steps, batches = [], 0, 0, 0
    for x, lengths, y, idx in it:
        batches += 1
        assert x.shape[1] == len(idx) and x.shape[0] == lengths.max()
        np.testing.assert_array_equal(y, labels[idx])
        np.testing.assert_array_equal(lengths, [len(seqs[i]) for i in idx])
        seen.extend(idx.tolist())
        padded_steps += x.shape[0] * x.shape[1]
        real_steps += lengths.sum()
    assert sorted(seen) == list(range(203)) and batches == len(it)
    assert real_steps / padded_steps > 0.75  # sorted pools: little padding (random: ~0.5)
    it = sequences.BucketIterator(seqs, batch_size=16, drop_last=True, shuffle=False)
    assert all(len(b[3]) == 16 for b in it) and len(list(it)) == len(it) == 12


def test_truncated_bptt_chunks_and_carries_state():
    tokens = np.arange(103)
    bptt = sequences.TruncatedBPTT(tokens, batch_size=4, seq_len=7)
    rows = tokens[:100].reshape(4, 25).T
    xs, ys = zip(*bptt, strict=True)
    assert len(xs) == len(bptt) == 4  # 24 input steps in chunks of 7: 7 7 7 3
    np.testing.assert_array_equal(np.concatenate(xs), rows[:-1])
    np.testing.assert_array_equal(np.concatenate(ys), rows[1:])
    assert xs[-1].shape == (3, 4)

    # carrying the state through chunks gives the same outputs as one long forward
    layer = LSTM(1, 5, dtype=np.float64, seed=0).eval()
    whole, _ = layer(rows[:-1, :, None].astype(np.float64))
    outs = []
    for x, _ in bptt:
        y, state = layer(x[:, :, None].astype(np.float64), bptt.state)
        bptt.carry(state)
        assert bptt.state[0] is not state[0]  # detached copy
        outs.append(y)
    np.testing.assert_allclose(np.concatenate(outs), whole, rtol=1e-12, atol=1e-14)
    next(iter(bptt))
    assert bptt.state is None  # a new epoch starts from zero state


def test_truncated_bptt_errors_and_offsets():
    with pytest.raises(ValueError, match="too short"):
        sequences.TruncatedBPTT(np.arange(5), batch_size=4, seq_len=2)
    with pytest.raises(TypeError, match="integer"):
        sequences.TruncatedBPTT(np.zeros(50), batch_size=2, seq_len=2)
    bptt = sequences.TruncatedBPTT(np.arange(1000), 4, 10, random_offset=True, rng=0)
    starts = {int(next(iter(bptt))[0][0, 0]) for _ in range(10)}
    assert len(starts) > 1


def test_pad_sequences_infers_the_dtype_from_non_empty_sequences():
    padded, lengths = sequences.pad_sequences([[1, 2, 3], []])
    assert padded.dtype == np.int64 and lengths.tolist() == [3, 0]
    padded, _ = sequences.pad_sequences([np.zeros((0, 2), np.float32), np.ones((2, 2), np.float32)])
    assert padded.dtype == np.float32


@pytest.mark.parametrize("n, batch, seq_len", [(100, 3, 7), (1000, 32, 64), (257, 7, 5),
                                               (64 * 33 + 5, 64, 33), (40, 4, 64)])  # fmt: skip
def test_truncated_bptt_len_is_every_epochs_chunk_count(n, batch, seq_len):
    """With random offsets too: len() was wrong for some offsets (42 of 180 epochs)."""
    bptt = sequences.TruncatedBPTT(np.arange(n), batch, seq_len, random_offset=True, rng=0)
    offsets = set()
    for _ in range(60):
        chunks = list(bptt)
        assert len(chunks) == len(bptt)
        offsets.add(int(chunks[0][0][0, 0]))
        for x, y in chunks:  # targets are the next tokens of the same stream
            np.testing.assert_array_equal(y, x + 1)
    assert len(offsets) > 1  # the offsets do vary
