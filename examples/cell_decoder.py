"""A decoder loop over LSTMCell, one fused step at a time, trained by backpropagating through the
loop step by step (what teacher forcing and sampling need); it learns to count up from a start
token, then generates greedily. python examples/cell_decoder.py"""

import numpy as np

import rnnfast
from rnnfast import losses, optim

V, E, H, T, N = 12, 16, 32, 6, 32


class Decoder(rnnfast.Module):
    def __init__(self):
        super().__init__()
        self.embed = rnnfast.Embedding(V, E, seed=0)
        self.cell = rnnfast.LSTMCell(E, H, seed=1)
        self.head = rnnfast.Linear(H, V, seed=2)


model = Decoder()
opt = optim.Adam(model.params, lr=1e-2)
rng = np.random.default_rng(0)
for _ in range(150):
    start = rng.integers(0, V - T, size=N)
    tokens = start[None] + np.arange(T + 1)[:, None]  # (T + 1, N): start, start + 1, ...
    x = model.embed(tokens[:T])  # teacher forcing: the true previous token at every step
    state, hs = None, []
    for t in range(T):
        state = model.cell(x[t], state)
        hs.append(state[0])
    loss, dlogits = losses.softmax_cross_entropy(model.head(np.stack(hs)), tokens[1:])
    model.zero_grad()
    dh = model.head.backward(dlogits)  # (T, N, H)
    dx, dnext = [None] * T, (None, None)
    for t in reversed(range(T)):  # through the loop, the last step first
        dh_t = dh[t] if dnext[0] is None else dh[t] + dnext[0]
        dx[t], dnext = model.cell.backward((dh_t, dnext[1]))
    model.embed.backward(np.stack(dx))
    opt.step(model.grads)

model.eval()  # generation: one step at a time, no reserve kept
token, state, out = np.array([2]), None, [2]
for _ in range(T):
    state = model.cell(model.embed(token), state)  # a batch of one
    token = model.head(state[0]).argmax(-1)
    out.append(int(token[0]))
print(f"final loss {loss:.3f}; from 2 the decoder writes {out}")
assert out == list(range(2, 2 + T + 1)), out
