"""The fused CPU kernels as PyTorch modules: ``rnnfast.torch.LSTM``, ``GRU`` and ``RNN`` take
torch.nn.LSTM/GRU/RNN's constructor, forward signature, return types and state_dict, and are
differentiable through torch's autograd; ``convert(model)`` swaps them in for the torch.nn ones
inside a model, keeping the same Parameter objects (an optimizer built before still works).

    import rnnfast.torch
    model = rnnfast.torch.convert(model)      # every nn.LSTM/GRU/RNN inside now runs on rnnfast

The parameters are torch Parameters whose memory the rnnfast layer reads directly (NumPy views
of the CPU tensors, no copies); gradients come from rnnfast's BPTT. Inputs: a padded tensor
(time-major, or batch_first) or a PackedSequence (returned packed, as torch does), unbatched
input, and h0 (with c0 for the LSTM). CPU float32 and float64 tensors only: a CUDA tensor raises
(rnnfast's CUDA kernels are not wired to torch yet) rather than being copied. The kernels use
rnnfast's own thread count (rnnfast.set_num_threads), not torch.set_num_threads.

Needs torch (optional for rnnfast itself): ``import rnnfast.torch`` raises ImportError without it.
"""

from __future__ import annotations

import numpy as np

try:
    import torch as _torch
    from torch import nn as _nn
except ImportError as e:  # pragma: no cover - torch is an optional dependency
    raise ImportError("rnnfast.torch needs PyTorch: pip install torch") from e

from . import layers as _layers

__all__ = ["LSTM", "GRU", "RNN", "convert"]


def _numpy(t: _torch.Tensor) -> np.ndarray | None:
    return None if t is None else t.detach().numpy()


class _Apply(_torch.autograd.Function):
    """One forward of the rnnfast layer; backward runs its BPTT. The layer's reserve travels in
    the autograd context, so several forwards may be pending at once."""

    @staticmethod
    def forward(ctx, module, differentiable, x, h0, c0, lengths, *params):
        layer = module._layer
        layer.train(differentiable)  # eval mode (or no_grad) keeps no reserve
        state = None
        if h0 is not None:
            state = (_numpy(h0), None if c0 is None else _numpy(c0)) if layer.spec.has_c else (
                _numpy(h0))  # fmt: skip
        y, s = layer(_numpy(x), state, lengths)
        ctx.module, ctx.cache = module, layer._cache
        ctx.has_h0, ctx.has_c0 = h0 is not None, c0 is not None
        h_n, c_n = s if layer.spec.has_c else (s, None)
        outs = [_torch.from_numpy(np.ascontiguousarray(y)), _torch.from_numpy(h_n)]
        if c_n is not None:
            outs.append(_torch.from_numpy(c_n))
        return tuple(outs)

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n=None):
        layer = ctx.module._layer
        if ctx.cache is None:
            raise RuntimeError("rnnfast.torch: this forward ran in eval mode and keeps nothing "
                               "for backward; call module.train()")  # fmt: skip
        layer._cache = ctx.cache  # kept in ctx too: backward(retain_graph=True) may come again
        layer.zero_grad()
        dstate = (_numpy(dh_n), _numpy(dc_n)) if layer.spec.has_c else _numpy(dh_n)
        dx, dstate0 = layer.backward(_numpy(dy), dstate)
        dh0, dc0 = dstate0 if layer.spec.has_c else (dstate0, None)
        grads = [_torch.from_numpy(layer.grads[name].copy()) for name in ctx.module._names]
        return (None, None, _torch.from_numpy(np.ascontiguousarray(dx)),
                _torch.from_numpy(dh0) if ctx.has_h0 else None,
                _torch.from_numpy(dc0) if ctx.has_c0 else None, None, *grads)  # fmt: skip


class _Recurrent(_nn.Module):
    _torch_class: type = _nn.RNNBase
    _rnnfast_class: type = _layers._Recurrent

    def __init__(self, input_size, hidden_size, num_layers=1, *args, device=None, dtype=None,
                 **kwargs):  # fmt: skip
        super().__init__()
        if device is not None and _torch.device(device).type != "cpu":
            raise ValueError("rnnfast.torch runs on the CPU: device must be 'cpu'")
        ref = self._torch_class(input_size, hidden_size, num_layers, *args, dtype=dtype, **kwargs)
        self._adopt(ref)

    def _adopt(self, ref: _nn.RNNBase) -> None:
        """Takes ref's configuration and its Parameter objects."""
        self.mode, self.input_size, self.hidden_size = ref.mode, ref.input_size, ref.hidden_size
        self.num_layers, self.bias, self.batch_first = ref.num_layers, ref.bias, ref.batch_first
        self.dropout, self.bidirectional = ref.dropout, ref.bidirectional
        self.proj_size = getattr(ref, "proj_size", 0)
        self.nonlinearity = getattr(ref, "nonlinearity", "tanh")
        self._names = [n for n, _ in ref.named_parameters()]
        for n, p in ref.named_parameters():
            if p.device.type != "cpu":
                raise ValueError(f"rnnfast.torch runs on the CPU; {n} is on {p.device}")
            self.register_parameter(n, p)
        self._rebuild()

    def _rebuild(self) -> None:
        """The rnnfast layer, its parameters NumPy views of this module's tensors."""
        p0 = getattr(self, self._names[0])
        dtype = {_torch.float32: np.float32, _torch.float64: np.float64}.get(p0.dtype)
        if dtype is None:
            raise TypeError(f"rnnfast.torch takes float32 or float64 parameters, got {p0.dtype}")
        options = {"num_layers": self.num_layers, "bias": self.bias, "dropout": self.dropout,
                   "bidirectional": self.bidirectional, "dtype": dtype}  # fmt: skip
        if self.mode == "LSTM":
            layer = _layers.LSTM(self.input_size, self.hidden_size, proj_size=self.proj_size,
                                 **options)  # fmt: skip
        elif self.mode == "GRU":
            layer = _layers.GRU(self.input_size, self.hidden_size, **options)
        else:
            layer = _layers.RNN(self.input_size, self.hidden_size,
                                nonlinearity=self.nonlinearity, **options)  # fmt: skip
        for n in self._names:
            view = getattr(self, n).detach().numpy()  # shares the tensor's memory
            del layer._params[n], layer._grads[n]
            layer.register_parameter(n, view)
        object.__setattr__(self, "_layer", layer)  # not a torch submodule

    def _apply(self, fn, *args, **kwargs):  # .to(), .double(), ...: new tensors, new views
        out = super()._apply(fn, *args, **kwargs)
        self._rebuild()
        return out

    def forward(self, input, hx=None):
        packed = isinstance(input, _nn.utils.rnn.PackedSequence)
        lengths = None
        if packed:
            x, lengths = _nn.utils.rnn.pad_packed_sequence(input, batch_first=False)
            lengths = lengths.numpy()
        else:
            x = input
            if x.device.type != "cpu":
                raise ValueError("rnnfast.torch runs on the CPU; move the input with .cpu() "
                                 "(a silent copy would hide the cost)")  # fmt: skip
            if self.batch_first and x.dim() == 3:
                x = x.transpose(0, 1)
        unbatched = x.dim() == 2
        if unbatched:
            x = x[:, None]
        h0 = c0 = None
        if hx is not None:
            h0, c0 = hx if self.mode == "LSTM" else (hx, None)
            if unbatched:
                h0 = h0[:, None]
                c0 = None if c0 is None else c0[:, None]
        self._layer.batch_first = False
        params = [getattr(self, n) for n in self._names]
        needs_grad = x.requires_grad or any(p.requires_grad for p in params) or any(
            s is not None and s.requires_grad for s in (h0, c0))  # fmt: skip
        differentiable = self.training and _torch.is_grad_enabled() and needs_grad
        outs = _Apply.apply(self, differentiable, x.contiguous(), h0, c0, lengths, *params)
        y, h_n = outs[0], outs[1]
        c_n = outs[2] if len(outs) > 2 else None
        if packed:
            y = _nn.utils.rnn.pack_padded_sequence(y, _torch.from_numpy(lengths),
                                                   enforce_sorted=False)  # fmt: skip
        elif unbatched:
            y, h_n = y[:, 0], h_n[:, 0]
            c_n = None if c_n is None else c_n[:, 0]
        elif self.batch_first:
            y = y.transpose(0, 1)
        return y, ((h_n, c_n) if self.mode == "LSTM" else h_n)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers} (rnnfast)"


class LSTM(_Recurrent):
    """torch.nn.LSTM's interface over rnnfast's fused kernels."""

    _torch_class = _nn.LSTM


class GRU(_Recurrent):
    """torch.nn.GRU's interface over rnnfast's fused kernels."""

    _torch_class = _nn.GRU


class RNN(_Recurrent):
    """torch.nn.RNN's interface over rnnfast's fused kernels."""

    _torch_class = _nn.RNN


_OURS = {_nn.LSTM: LSTM, _nn.GRU: GRU, _nn.RNN: RNN}


def _from_torch(m: _nn.RNNBase) -> _Recurrent:
    cls = _OURS[type(m)]
    ours = cls.__new__(cls)
    _nn.Module.__init__(ours)
    ours._adopt(m)
    ours.train(m.training)
    return ours


def _to_torch(m: _Recurrent) -> _nn.RNNBase:
    kwargs = {"num_layers": m.num_layers, "bias": m.bias, "batch_first": m.batch_first,
              "dropout": m.dropout, "bidirectional": m.bidirectional,
              "dtype": getattr(m, m._names[0]).dtype}  # fmt: skip
    if m.mode == "LSTM":
        kwargs["proj_size"] = m.proj_size
    if m.mode.startswith("RNN"):
        kwargs["nonlinearity"] = m.nonlinearity
    ref = m._torch_class(m.input_size, m.hidden_size, **kwargs)
    for n in m._names:
        setattr(ref, n, getattr(m, n))  # the same Parameter objects
    ref._flat_weights = [getattr(ref, n) for n in ref._flat_weights_names]
    ref.train(m.training)
    return ref


def convert(model: _nn.Module, back: bool = False) -> _nn.Module:
    """Replaces every torch.nn.LSTM/GRU/RNN in ``model`` (itself included) with the rnnfast module
    holding the same Parameter objects, or with ``back=True`` the reverse; returns the model."""
    swap = (lambda m: isinstance(m, _Recurrent)) if back else (lambda m: type(m) in _OURS)
    make = _to_torch if back else _from_torch
    if swap(model):
        return make(model)
    for name, child in list(model.named_children()):
        if swap(child):
            setattr(model, name, make(child))
        else:
            convert(child, back)
    return model
