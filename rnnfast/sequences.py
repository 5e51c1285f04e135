"""Variable-length sequences: padding, masks, length-bucketed batches and truncated BPTT.

Time-major by default (T, N, ...), as the layers; ``batch_first=True`` gives (N, T, ...).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from .init import as_generator

__all__ = [
    "pad_sequences",
    "lengths_to_mask",
    "unpad",
    "reverse_padded",
    "BucketIterator",
    "TruncatedBPTT",
    "detach",
]


def pad_sequences(
    sequences: Sequence,
    batch_first: bool = False,
    padding_value=0,
    dtype=None,
    max_len: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pads a list of sequences to one array; returns ``(padded, lengths)``.

    Each sequence is a (T_i, *features) array or a list of tokens (T_i,). ``padded`` has shape
    (T, N, *features) (or (N, T, *features) with batch_first), T = max T_i (or ``max_len``, which
    must be at least that); ``lengths`` is int64 (N,). The dtype is ``dtype`` or the common dtype
    of the sequences.
    """
    if isinstance(sequences, np.ndarray) or not isinstance(sequences, Sequence):
        raise TypeError("pad_sequences takes a list of sequences (arrays or token lists)")
    if len(sequences) == 0:
        raise ValueError("pad_sequences got an empty list; need at least one sequence")
    arrays = [np.asarray(s) for s in sequences]
    feat = arrays[0].shape[1:]
    for i, a in enumerate(arrays):
        if a.ndim == 0:
            raise ValueError(f"sequence {i} is a scalar; each sequence needs a time dimension")
        if a.shape[1:] != feat:
            raise ValueError(
                f"sequence {i} has feature shape {a.shape[1:]}, sequence 0 has {feat}; "
                "all sequences must agree past the time dimension"
            )
    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    T = int(lengths.max())
    if max_len is not None:
        if max_len < T:
            raise ValueError(f"max_len={max_len} is shorter than the longest sequence ({T})")
        T = int(max_len)
    if dtype is None:
        # an empty list (np.asarray([]) is float64) says nothing about the tokens' type
        filled = [a for a in arrays if a.size]
        dtype = np.result_type(*filled) if filled else arrays[0].dtype
    out = np.full((len(arrays), T, *feat), padding_value, dtype=dtype)
    for n, a in enumerate(arrays):
        out[n, : a.shape[0]] = a
    if not batch_first:
        out = np.ascontiguousarray(out.swapaxes(0, 1))
    return out, lengths


def _check_lengths(lengths, T=None) -> np.ndarray:
    lengths = np.asarray(lengths)
    if (
        lengths.ndim != 1
        or lengths.dtype == np.bool_
        or not np.issubdtype(lengths.dtype, np.integer)
    ):
        raise TypeError(f"lengths must be a 1-D integer array, got {lengths.dtype} {lengths.shape}")
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"lengths must be >= 0, got {int(lengths.min())}")
    if T is not None and lengths.size and lengths.max() > T:
        raise ValueError(f"lengths must be <= T = {T}, got {int(lengths.max())}")
    return lengths


def lengths_to_mask(lengths, max_len: int | None = None, batch_first: bool = False) -> np.ndarray:
    """Boolean mask, True at valid steps: (T, N) (or (N, T)), T = ``max_len`` or max(lengths)."""
    lengths = _check_lengths(lengths, max_len)
    T = int(lengths.max(initial=0)) if max_len is None else int(max_len)
    mask = np.arange(T)[:, None] < lengths[None, :]
    return np.ascontiguousarray(mask.T) if batch_first else mask


def unpad(padded: np.ndarray, lengths, batch_first: bool = False) -> list[np.ndarray]:
    """The inverse of pad_sequences: a list of the N sequences (copies), each cut to its length."""
    padded = np.asarray(padded)
    if padded.ndim < 2:
        raise ValueError(f"padded must be at least 2-D (T, N, ...), got shape {padded.shape}")
    if not batch_first:
        padded = padded.swapaxes(0, 1)
    lengths = _check_lengths(lengths, padded.shape[1])
    if lengths.shape[0] != padded.shape[0]:
        raise ValueError(f"{lengths.shape[0]} lengths for a batch of {padded.shape[0]} sequences")
    return [np.array(padded[n, : int(k)]) for n, k in enumerate(lengths)]


def reverse_padded(x: np.ndarray, lengths=None) -> np.ndarray:
    """Reverses each sequence of a time-major (T, N, ...) array within its own length.

    Step t < lengths[n] of sequence n takes step lengths[n] - 1 - t; padded steps stay where they
    are. The map is its own inverse. Without lengths it is ``x[::-1]`` (a copy).
    """
    x = np.asarray(x)
    if lengths is None:
        return np.ascontiguousarray(x[::-1])
    T, N = x.shape[:2]
    lengths = _check_lengths(lengths, T)
    idx = reverse_index(lengths, T)
    return x[idx, np.arange(N)[None, :]]


def reverse_index(lengths: np.ndarray, T: int) -> np.ndarray:
    """The (T, N) time index that reverse_padded gathers with."""
    t = np.arange(T)[:, None]
    lengths = np.asarray(lengths)[None, :]
    return np.where(t < lengths, lengths - 1 - t, t)


class BucketIterator:
    """Mini-batches of sequences of similar length, to waste little compute on padding.

    Each epoch (one ``for`` over the iterator) shuffles the sequences, cuts the shuffled order into
    pools of ``batch_size * bucket_size`` sequences, sorts each pool by length, cuts it into
    batches and shuffles the batches. Yields ``(x, lengths, targets, index)``: x padded as
    pad_sequences pads it, targets the matching entries of ``targets`` (stacked to an array when
    they are scalars or equal-shape arrays, else padded like x) or None, and index the positions
    of the batch's sequences in the input list.
    """

    def __init__(self, sequences: Sequence, targets: Sequence | None = None, batch_size: int = 32,
                 *, shuffle: bool = True, bucket_size: int = 100, drop_last: bool = False,
                 batch_first: bool = False, padding_value=0, target_padding_value=0,
                 rng=None):  # fmt: skip
        if len(sequences) == 0:
            raise ValueError("BucketIterator got no sequences")
        if targets is not None and len(targets) != len(sequences):
            raise ValueError(f"{len(targets)} targets for {len(sequences)} sequences")
        if int(batch_size) < 1 or int(bucket_size) < 1:
            raise ValueError(
                f"batch_size and bucket_size must be >= 1, got {batch_size}, {bucket_size}"
            )
        self.sequences, self.targets = sequences, targets
        self.batch_size, self.bucket_size = int(batch_size), int(bucket_size)
        self.shuffle, self.drop_last, self.batch_first = shuffle, drop_last, batch_first
        self.padding_value, self.target_padding_value = padding_value, target_padding_value
        self.rng = as_generator(rng)
        self._lengths = np.array([len(s) for s in sequences])

    def __len__(self) -> int:
        n, b = len(self.sequences), self.batch_size
        pool = b * self.bucket_size
        full, rest = divmod(n, pool)
        per_full = self.bucket_size
        last = rest // b if self.drop_last else -(-rest // b)
        return full * per_full + last

    def _batches(self) -> list[np.ndarray]:
        order = (
            self.rng.permutation(len(self.sequences))
            if self.shuffle
            else np.arange(len(self.sequences))
        )
        pool = self.batch_size * self.bucket_size
        batches = []
        for s in range(0, len(order), pool):
            chunk = order[s : s + pool]
            chunk = chunk[np.argsort(self._lengths[chunk], kind="stable")]
            for b in range(0, len(chunk), self.batch_size):
                batch = chunk[b : b + self.batch_size]
                if len(batch) < self.batch_size and self.drop_last:
                    continue
                batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in self.rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator:
        for idx in self._batches():
            x, lengths = pad_sequences([self.sequences[i] for i in idx], self.batch_first,
                                       self.padding_value)  # fmt: skip
            y = None
            if self.targets is not None:
                ts = [np.asarray(self.targets[i]) for i in idx]
                if all(t.shape == ts[0].shape for t in ts):
                    y = np.stack(ts)
                else:
                    y, _ = pad_sequences(ts, self.batch_first, self.target_padding_value)
            yield x, lengths, y, idx


def detach(state):
    """A copy of a recurrent state (an array, a tuple of arrays or None) that owns its memory.

    NumPy arrays carry no graph; "detaching" means the next chunk starts from these values and
    backward through it stops there (pass no gradient into the previous chunk's final state).
    """
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(detach(s) for s in state)
    return np.array(state, copy=True)


class TruncatedBPTT:
    """Cuts one long token stream into N parallel streams and walks them K steps at a time.

    The stream of ``len(tokens)`` ids is split into ``batch_size`` contiguous rows; chunk j holds
    inputs ``x = stream[:, j*K : j*K + K]`` and next-token targets ``y`` shifted by one, both
    time-major (K, N) int64 (the last chunk may be shorter). ``state`` carries the recurrent state
    from chunk to chunk: read it for the next forward, and hand the new state to ``carry`` (which
    detaches it). Each new ``for`` loop starts a new epoch with ``state = None``; ``random_offset``
    shifts the cut points by a random amount each epoch so that chunks do not always start at the
    same characters.

        bptt = TruncatedBPTT(tokens, batch_size=32, seq_len=64)
        for x, y in bptt:
            out, state = rnn(embed(x), bptt.state)
            bptt.carry(state)
            ...
    """

    def __init__(self, tokens, batch_size: int, seq_len: int, *, random_offset: bool = False,
                 rng=None):  # fmt: skip
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(
                f"tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}"
            )
        if int(batch_size) < 1 or int(seq_len) < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if len(tokens) < int(batch_size) * 2:
            raise ValueError(
                f"a stream of {len(tokens)} tokens is too short for {batch_size} rows of at least "
                "2 tokens each"
            )
        self.tokens = tokens.astype(np.int64, copy=False)
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        self.random_offset = random_offset
        self.rng = as_generator(rng)
        self.state = None

    def _max_offset(self) -> int:
        if not self.random_offset:
            return 0
        return max(0, min(self.seq_len, len(self.tokens) // self.batch_size - 1) - 1)

    def _row_length(self) -> int:
        # the same for every offset, so that every epoch has len(self) chunks
        return (len(self.tokens) - self._max_offset()) // self.batch_size

    def _rows(self, offset: int) -> np.ndarray:
        usable = self._row_length() * self.batch_size
        return self.tokens[offset : offset + usable].reshape(self.batch_size, -1).T  # (L, N)

    def __len__(self) -> int:
        return -(-(self._row_length() - 1) // self.seq_len)

    def carry(self, state) -> None:
        """Keeps a detached copy of ``state`` for the next chunk."""
        self.state = detach(state)

    def reset(self) -> None:
        self.state = None

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        self.state = None
        offset = 0
        if self.random_offset:
            offset = int(self.rng.integers(0, self._max_offset() + 1))
        rows = self._rows(offset)
        L = rows.shape[0]
        for s in range(0, L - 1, self.seq_len):
            k = min(self.seq_len, L - 1 - s)
            yield (
                np.ascontiguousarray(rows[s : s + k]),
                np.ascontiguousarray(rows[s + 1 : s + 1 + k]),
            )
