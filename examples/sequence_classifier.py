"""A GRU classifier of variable-length token sequences: BucketIterator batches, a Module whose
children register themselves, rnnfast.training.fit with a warm-up then cosine schedule.
The task (is a sequence's first token above the vocabulary's middle?) needs memory across the
sequence. python examples/sequence_classifier.py"""

import numpy as np

import rnnfast
from rnnfast import losses, lr_scheduler, optim, training

rng = np.random.default_rng(0)
V = 20
seqs = [rng.integers(1, V, size=rng.integers(3, 25)) for _ in range(600)]
labels = np.array([int(s[0] >= V // 2) for s in seqs])


class Classifier(rnnfast.Module):
    def __init__(self):
        super().__init__()
        self.embed = rnnfast.Embedding(V, 16, padding_idx=0, seed=0)
        self.rnn = rnnfast.GRU(16, 48, seed=1)
        self.head = rnnfast.Linear(48, 2, seed=2)

    def forward(self, ids, lengths):
        # the reverse-read sequence ends at its first token: the final state must remember it
        self.lengths = lengths  # for backward
        ids = rnnfast.sequences.reverse_padded(ids, lengths)
        _, h_n = self.rnn(self.embed(ids), lengths=lengths)
        return self.head(h_n[-1])

    def backward(self, dlogits):
        dh = self.head.backward(dlogits)
        dy, _ = self.rnn.backward(None, dh[None])
        self.embed.backward(rnnfast.sequences.reverse_padded(dy, self.lengths))


train = rnnfast.sequences.BucketIterator(seqs[:500], labels[:500], batch_size=32, rng=0)
val = rnnfast.sequences.BucketIterator(seqs[500:], labels[500:], batch_size=100, shuffle=False)
model = Classifier()
opt = optim.Adam(model.params, lr=1e-2)
epochs = 8
schedule = lr_scheduler.SequentialLR(
    opt,
    [lr_scheduler.LinearLR(opt, 0.1, total_iters=2), lr_scheduler.CosineAnnealingLR(opt, 6)],
    milestones=[2],
)


def accuracy(logits, y):
    return float((logits.argmax(-1) == y).mean())


history = training.fit(model, train, opt, losses.softmax_cross_entropy, epochs=epochs,
                       val_data=val, scheduler=schedule, clip_grad_norm=5.0,
                       metrics={"accuracy": accuracy}, progress=False)  # fmt: skip
print(f"validation accuracy by epoch: {[round(a, 3) for a in history['val_accuracy']]}")
assert history["val_accuracy"][-1] > 0.9, history["val_accuracy"]
