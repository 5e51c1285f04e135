"""Layers with state: stacked, bidirectional RNN/LSTM/GRU over the fused kernels, Embedding, Linear.

Parameters live in ``layer.params`` and gradients in ``layer.grads``: dicts of ndarrays named
exactly as torch's state_dict names them, so a torch state_dict converted to NumPy loads as it is.
``y, state = layer(x)`` runs forward; ``dx = layer.backward(dy)`` (``dx, dstate0`` for the
recurrent layers) backpropagates through the last training forward and *adds* into
``layer.grads`` (call ``zero_grad()`` between steps, as in torch). Parameters and gradients are
updated in place only (optimizers, zero_grad, load_state_dict), so any dict that holds the same
arrays, such as a model's merged ``params``, stays valid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import numpy as np

from . import _C, ops
from . import init as _init
from ._validate import check_lengths, check_matmul_precision, check_noise
from .cells import cell_spec, family_cell, rnn_cell
from .sequences import reverse_index

__all__ = [
    "Attention",
    "AttentionKeys",
    "Module",
    "Parameter",
    "Sequential",
    "RNN",
    "LSTM",
    "GRU",
    "RNNCell",
    "LSTMCell",
    "GRUCell",
    "Embedding",
    "Linear",
    "IncompatibleKeys",
]


class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class Parameter:
    """Marks an array as a parameter of the Module it is assigned to: ``self.w = Parameter(a)``.

    The assignment registers ``a`` (a float32 or float64 ndarray, kept as it is) under the
    attribute's name, with a zero gradient in ``grads``; the attribute then holds the plain array.
    """

    __slots__ = ("data",)

    def __init__(self, data) -> None:
        if not isinstance(data, np.ndarray) or data.dtype not in (np.float32, np.float64):
            raise TypeError(
                "Parameter takes a float32 or float64 ndarray, got "
                f"{getattr(data, 'dtype', type(data).__name__)}"
            )
        self.data = data


class _Tree(Mapping):
    """A live, read-only view of a module's arrays and its descendants' under dotted names.

    ``model.params["rnn.weight_ih_l0"]`` is the child's own array; a module added later (at any
    depth) shows up at once, as in torch's state_dict.
    """

    __slots__ = ("_module", "_kind")

    def __init__(self, module: Module, kind: str) -> None:
        self._module, self._kind = module, kind

    def _own(self, module: Module) -> dict[str, np.ndarray]:
        return module.__dict__[self._kind]

    def _walk(self, module: Module, prefix: str):
        yield from ((prefix + k, v) for k, v in self._own(module).items())
        for name, child in module.__dict__["_children"].items():
            yield from self._walk(child, f"{prefix}{name}.")

    def __getitem__(self, key: str) -> np.ndarray:
        module, rest = self._module, key
        while True:
            own = self._own(module)
            if rest in own:
                return own[rest]
            head, dot, rest = rest.partition(".")
            module = module.__dict__["_children"].get(head) if dot else None
            if module is None:
                raise KeyError(key)

    def __setitem__(self, key: str, value) -> None:
        # `grads[k] += g` adds in place and then stores the same array back: allow only that
        if self[key] is not value:
            raise TypeError(
                f"{key!r}: a module's params and grads are views of its arrays; update the array "
                "in place (params[k][...] = v) or register a new one with register_parameter"
            )

    def __iter__(self):
        return (k for k, _ in self._walk(self._module, ""))

    def __len__(self) -> int:
        return sum(1 for _ in self._walk(self._module, ""))

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k!r}: {v.dtype}{list(v.shape)}" for k, v in self.items())
        return f"{{{shapes}}}"


class Module:
    """Base of every layer and model: params, grads, children, train/eval, state_dict.

    As in torch.nn.Module, assigning a Module to an attribute (``self.rnn = LSTM(...)``) registers
    it as a child, and assigning a ``Parameter`` registers an array; ``add_module`` and
    ``register_parameter`` do the same by name. ``params`` and ``grads`` are live read-only views
    of the module's arrays and all its descendants' (the same objects) under ``child.param`` keys,
    as a torch.nn.Module's state_dict names them. Subclasses call ``super().__init__()`` before
    assigning children or parameters, and define ``forward`` (and ``backward``).
    """

    def __init__(self) -> None:
        object.__setattr__(self, "_params", {})
        object.__setattr__(self, "_grads", {})
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_views", (_Tree(self, "_params"), _Tree(self, "_grads")))
        self.training = True

    @property
    def params(self) -> Mapping[str, np.ndarray]:
        """Every parameter of this module and its descendants, by dotted name (a live view)."""
        return self._views[0]

    @property
    def grads(self) -> Mapping[str, np.ndarray]:
        """The gradient arrays, named as ``params`` (a live view)."""
        return self._views[1]

    def _check_initialised(self, what: str) -> None:
        if "_children" not in self.__dict__:
            raise AttributeError(
                f"cannot register {what} before Module.__init__(): call super().__init__() first "
                f"in {type(self).__name__}.__init__"
            )

    @staticmethod
    def _check_name(name, what: str) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"{what} name must be a non-empty str without '.', got {name!r}")

    def add_module(self, name: str, module: Module | None) -> Module | None:
        """Registers ``module`` as the child ``name`` (also the attribute); None removes it."""
        self._check_initialised("a module")
        self._check_name(name, "module")
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"add_module needs a Module, got {type(module).__name__}")
        if name in self._params:
            raise KeyError(f"{name!r} is already a parameter of {type(self).__name__}")
        if module is None:
            self._children.pop(name, None)
        else:
            self._children[name] = module
        self.__dict__.pop(name, None)
        return module

    def register_parameter(self, name: str, value: np.ndarray) -> None:
        """Registers ``value`` (kept as it is) as the parameter ``name``, with a zero gradient."""
        self._check_initialised("a parameter")
        self._check_name(name, "parameter")
        if name in self._children:
            raise KeyError(f"{name!r} is already a child module of {type(self).__name__}")
        value = Parameter(value).data
        self._params[name] = value
        self._grads[name] = np.zeros_like(value)
        self.__dict__.pop(name, None)

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, Module):
            self.add_module(name, value)
        elif isinstance(value, Parameter):
            self.register_parameter(name, value.data)
        elif name in self.__dict__.get("_params", ()):
            raise TypeError(
                f"{type(self).__name__}.{name} is a parameter: update it in place "
                f"(self.{name}[...] = value) or assign a Parameter to replace it"
            )
        else:
            if name in self.__dict__.get("_children", ()):
                del self._children[name]  # as torch: a plain value replaces the child
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str):
        # called only when normal lookup fails: children and parameters by name, as torch
        d = self.__dict__
        if name in d.get("_children", ()):
            return d["_children"][name]
        if name in d.get("_params", ()):
            return d["_params"][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        if name in self._children:
            del self._children[name]
        elif name in self._params:
            del self._params[name], self._grads[name]
        else:
            object.__delattr__(self, name)

    def children(self) -> Iterator[Module]:
        return iter(list(self._children.values()))

    def named_children(self) -> Iterator[tuple[str, Module]]:
        return iter(list(self._children.items()))

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """This module (named ``prefix``) and every descendant, depth first, by dotted name."""
        yield prefix, self
        for name, child in self._children.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        return (m for _, m in self.named_modules())

    def named_parameters(self) -> Iterator[tuple[str, np.ndarray]]:
        return iter(self.params.items())

    def parameters(self) -> Iterator[np.ndarray]:
        return iter(self.params.values())

    def train(self, mode: bool = True) -> Module:
        """Training mode (dropout on, forward keeps what backward needs); returns self."""
        self.training = bool(mode)
        for m in self._children.values():
            m.train(mode)
        return self

    def eval(self) -> Module:
        """Inference mode: no dropout, and forward keeps nothing for backward; returns self."""
        return self.train(False)

    def zero_grad(self) -> None:
        """Sets every gradient to zero, in place."""
        for g in self.grads.values():
            g[...] = 0

    def num_parameters(self) -> int:
        return sum(p.size for p in self.params.values())

    def generators(self) -> dict[str, np.random.Generator]:
        """The random generators of this module and its descendants (dropout masks, noise seeds),
        by dotted attribute name: what a checkpoint saves so that a resumed run draws the same."""
        return {
            f"{prefix}.{k}" if prefix else k: v
            for prefix, m in self.named_modules()
            for k, v in vars(m).items()
            if isinstance(v, np.random.Generator)
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of every parameter, keyed as in ``params`` (and as torch's state_dict)."""
        return {k: v.copy() for k, v in self.params.items()}

    def load_state_dict(self, state_dict: Mapping, strict: bool = True) -> IncompatibleKeys:
        """Copies arrays into the parameters in place (casting to their dtype).

        Accepts a torch state_dict converted to NumPy (``{k: v.numpy() for k, v in ...}``). With
        ``strict`` any missing or unexpected key is an error; shapes must always match. Nothing
        changes unless every check passes. Returns the missing and unexpected keys, as torch.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = sorted(set(self.params) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(self.params))
        if strict and (missing or unexpected):
            raise KeyError(
                f"state_dict does not fit {type(self).__name__}: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        values = {}
        for k in set(self.params) & set(state_dict):
            v = state_dict[k]
            v = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
            if v.shape != self.params[k].shape:
                raise ValueError(
                    f"state_dict[{k!r}] has shape {v.shape}, the parameter has shape "
                    f"{self.params[k].shape}"
                )
            if v.dtype.kind not in "fiu":
                raise TypeError(f"state_dict[{k!r}] has non-numeric dtype {v.dtype}")
            values[k] = v
        for k, v in values.items():
            self.params[k][...] = v
        return IncompatibleKeys(missing, unexpected)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__} has no forward(); a model subclasses Module and defines "
            "forward (and backward), or chains its layers in a Sequential"
        )


def _layer_precision(matmul_precision, dtype) -> str:
    """A layer's matmul_precision, checked: bfloat16 products take float32 layers."""
    check_matmul_precision(matmul_precision)
    if matmul_precision == "bfloat16" and dtype != np.float32:
        raise TypeError(f'matmul_precision="bfloat16" needs dtype float32, got {dtype}')
    return matmul_precision


def _float_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def _check_input(name: str, x, dtype: np.dtype) -> np.ndarray:
    if hasattr(x, "batch_sizes") and hasattr(x, "data"):  # torch's PackedSequence
        raise TypeError(
            f"{name} is a torch PackedSequence; rnnfast takes padded arrays and lengths: "
            "x, lengths = torch.nn.utils.rnn.pad_packed_sequence(packed), then "
            "layer(x.numpy(), lengths=lengths.numpy())"
        )
    if isinstance(x, (list, tuple)) and any(np.ndim(s) > 0 for s in x):
        shapes = {np.shape(s) for s in x}
        if len(shapes) > 1:
            raise TypeError(
                f"{name} is a list of sequences of different shapes {sorted(shapes)[:3]}...; pad "
                "them first: x, lengths = rnnfast.sequences.pad_sequences(seqs), then "
                "layer(x, lengths=lengths)"
            )
    x = np.asarray(x)
    if x.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the layer's parameters are {dtype}; cast the input "
            f"(x.astype(np.{dtype.name})) or build the layer with dtype=np.{x.dtype.name}"
        )
    return x


# ---- the recurrent layers --------------------------------------------------------------------


def _init_torch(name: str, w: np.ndarray, rng: np.random.Generator, H: int, G: int) -> None:
    k = 1.0 / np.sqrt(H)
    _init.uniform_(w, -k, k, rng)


def _init_orthogonal(name: str, w: np.ndarray, rng: np.random.Generator, H: int, G: int) -> None:
    if name.startswith("weight_ih"):
        _init.xavier_uniform_(w, rng=rng, gates=G)
    elif name.startswith("weight_hh"):
        _init.orthogonal_(w, rng=rng, gates=G)
    elif name.startswith("weight_hr"):  # the projection: semi-orthogonal, P < H rows
        _init.orthogonal_(w, rng=rng)
    else:
        _init.zeros_(w)
        if G == 4 and name.startswith("bias_ih"):
            _init.forget_gate_bias_(w, 1.0)


_INITS = {"uniform": _init_torch, "orthogonal": _init_orthogonal}


class _Recurrent(Module):
    """Stacked, optionally bidirectional recurrent layer over one row of the cell table."""

    _default_options: tuple = ()  # (name, default) of a subclass's cell options, for repr

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, *, dtype=np.float32, seed=None,
                 init: str | Callable = "uniform", learn_initial_state: bool = False,
                 matmul_precision: str = "float32", peephole: bool = False,
                 proj_size: int = 0, recurrent_dropout: float = 0.0,
                 recurrent_dropout_mode: str | None = None, zoneout: float = 0.0,
                 layer_norm: bool = False):  # fmt: skip
        super().__init__()
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size),
                        ("num_layers", num_layers)):  # fmt: skip
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        self.spec = cell_spec(cell)  # the row of the cell table
        self.mode = self.spec.name  # as torch.nn.RNNBase.mode
        if not isinstance(peephole, bool):
            raise TypeError(f"peephole must be True or False, got {peephole!r}")
        if peephole and not self.spec.peephole:
            raise ValueError(f"peephole=True is for LSTM layers, not {self.spec.name}")
        self.peephole = peephole
        if isinstance(proj_size, bool) or not isinstance(proj_size, (int, np.integer)):
            raise TypeError(f"proj_size must be an integer, got {proj_size!r}")
        if proj_size and not self.spec.projection:
            raise ValueError(f"proj_size is for LSTM layers, not {self.spec.name}")
        if not 0 <= proj_size < hidden_size:
            raise ValueError(f"proj_size must be in [0, hidden_size = {hidden_size}), got "
                             f"{proj_size}")  # fmt: skip
        self.proj_size = int(proj_size)
        if not isinstance(layer_norm, bool):
            raise TypeError(f"layer_norm must be True or False, got {layer_norm!r}")
        if layer_norm and not self.spec.layer_norm:
            raise ValueError(f"layer_norm=True is for LSTM layers and GRU layers with "
                             f"reset_after=True, not {self.spec.name}")  # fmt: skip
        if layer_norm and proj_size:
            raise ValueError("layer_norm=True is not supported with proj_size")
        self.layer_norm = layer_norm
        if recurrent_dropout_mode is None:  # the candidate where the cell has one (as Keras)
            recurrent_dropout_mode = "semeniuta" if self.spec.gates > 1 else "variational"
        # checked here, with a placeholder seed; each training forward draws its own
        check_noise(self.spec.name, recurrent_dropout, recurrent_dropout_mode, zoneout, 0,
                    projection=bool(proj_size))  # fmt: skip
        self.recurrent_dropout, self.zoneout = float(recurrent_dropout), float(zoneout)
        self.recurrent_dropout_mode = recurrent_dropout_mode
        self.input_size, self.hidden_size = int(input_size), int(hidden_size)
        self.num_layers, self.bias, self.batch_first = int(num_layers), bool(bias), batch_first
        self.dropout, self.bidirectional = float(dropout), bool(bidirectional)
        self.num_directions = 2 if bidirectional else 1
        self.learn_initial_state = bool(learn_initial_state)
        self.dtype = _float_dtype(dtype)
        self.matmul_precision = _layer_precision(matmul_precision, self.dtype)
        self.rng = _init.as_generator(seed)
        if isinstance(init, str):
            if init not in _INITS:
                raise ValueError(
                    f"init must be one of {sorted(_INITS)} or a callable, got {init!r}"
                )
            init = _INITS[init]
        elif not callable(init):
            raise TypeError(f"init must be a scheme name or a callable, got {init!r}")
        G, H, R = self.spec.gates, self.hidden_size, self.state_size
        for layer in range(self.num_layers):
            C = self.input_size if layer == 0 else R * self.num_directions
            for suffix in self._suffixes(layer):
                shapes = {"weight_ih": (G * H, C), "weight_hh": (G * H, R)}
                if self.bias:
                    shapes.update(bias_ih=(G * H,), bias_hh=(G * H,))
                if self.proj_size:  # as torch's
                    shapes.update(weight_hr=(R, H))
                if self.peephole:  # rows i, f, o (f unused with coupled gates)
                    shapes.update(weight_peephole=(3, H))
                for kind, shape in shapes.items():
                    w = np.zeros(shape, dtype=self.dtype)
                    init(kind + suffix, w, self.rng, H, G)
                    self.register_parameter(kind + suffix, w)
                # layer norm's gains start at 1 and c's bias at 0 (as Haste and torch's LayerNorm)
                for kind in self.spec.layer_norm_names if self.layer_norm else ():
                    size = H if kind in ("ln_gamma_c", "ln_beta_c") else G * H
                    start = 0 if kind == "ln_beta_c" else 1
                    self.register_parameter(kind + suffix, np.full(size, start, dtype=self.dtype))
        if self.learn_initial_state:
            LD = self.num_layers * self.num_directions
            self.register_parameter("h0", np.zeros((LD, 1, R), dtype=self.dtype))
            if self.spec.has_c:
                self.register_parameter("c0", np.zeros((LD, 1, H), dtype=self.dtype))
        self._cache = None

    @property
    def _layer_norm_names(self) -> tuple[str, ...]:
        """Layer norm's parameters per layer and direction (none without it)."""
        return self.spec.layer_norm_names if self.layer_norm else ()

    @property
    def state_size(self) -> int:
        """The size of h and of each direction's output: proj_size, or hidden_size without one."""
        return self.proj_size or self.hidden_size

    def _suffixes(self, layer: int) -> list[str]:
        s = f"_l{layer}"
        return [s, s + "_reverse"] if self.bidirectional else [s]

    def __repr__(self) -> str:
        extra = "".join(
            f", {k}={getattr(self, k)!r}"
            for k, default in (
                ("num_layers", 1),
                ("bias", True),
                ("batch_first", False),
                ("dropout", 0.0),
                ("bidirectional", False),
                ("learn_initial_state", False),
                ("matmul_precision", "float32"),
                ("peephole", False),
                ("proj_size", 0),
                ("recurrent_dropout", 0.0),
                ("zoneout", 0.0),
                ("layer_norm", False),
                *((k, v) for k, v in self._default_options),
            )  # fmt: skip
            if getattr(self, k) != default
        )
        return f"{type(self).__name__}({self.input_size}, {self.hidden_size}{extra})"

    # -- forward --

    def _state_in(self, name, s, N, unbatched):
        """h0, dh_n (proj_size wide with a projection) or c0, dc_n (hidden_size) checked."""
        LD = self.num_layers * self.num_directions
        is_c = name in ("c0", "dc_n")
        H, size = (self.hidden_size, "hidden_size") if is_c or not self.proj_size else (
            self.proj_size, "proj_size")  # fmt: skip
        s = _check_input(name, s, self.dtype)
        shape = (LD, H) if unbatched else (LD, N, H)
        if s.shape != shape:
            raise ValueError(
                f"{name} must have shape {shape} (num_layers * num_directions, "
                f"{'' if unbatched else 'batch, '}{size}), got {s.shape}"
            )
        return s[:, None] if unbatched else s

    def _split_state(self, state, N, unbatched):
        if state is None:
            if not self.learn_initial_state:
                return None, None
            LD = self.params["h0"].shape[0]
            h0 = np.broadcast_to(self.params["h0"], (LD, N, self.state_size))
            c0 = None
            if self.spec.has_c:
                c0 = np.broadcast_to(self.params["c0"], (LD, N, self.hidden_size))
            return h0, c0
        if self.spec.has_c:
            if not isinstance(state, tuple) or len(state) != 2:
                raise TypeError(f"{type(self).__name__} state must be a tuple (h0, c0)")
            h0, c0 = state
            h0 = None if h0 is None else self._state_in("h0", h0, N, unbatched)
            c0 = None if c0 is None else self._state_in("c0", c0, N, unbatched)
            return h0, c0
        if isinstance(state, tuple):
            raise TypeError(f"{type(self).__name__} state is one array h0, not a tuple")
        return self._state_in("h0", state, N, unbatched), None

    def forward(self, x, state=None, lengths=None):
        """Runs the stack. Returns ``(y, state)``, shapes as torch.nn.

        x: (T, N, C) (or (N, T, C) with batch_first, or (T, C) unbatched); state: h0, or (h0, c0)
        for LSTM, each (num_layers * num_directions, N, H), None for zeros (or the learned initial
        state). lengths: (N,) ints in [0, T]: sequence n runs lengths[n] steps; y is zero past its
        end, its final state is its state after its own last step, and the reverse direction starts
        at its last valid step (as torch's packed sequences). y has D*H features, directions
        concatenated (forward first); the returned state is stacked as the input state.
        """
        x = _check_input("x", x, self.dtype)
        if x.ndim not in (2, 3):
            raise ValueError(
                f"x must be 3-D ({'N, T' if self.batch_first else 'T, N'}, C) or 2-D (T, C) for "
                f"one unbatched sequence, got shape {x.shape}"
            )
        unbatched = x.ndim == 2
        if unbatched:
            x = x[:, None]
            if lengths is not None:
                lengths = np.asarray(lengths).reshape(-1)
        elif self.batch_first:
            x = x.swapaxes(0, 1)
        T, N, C = x.shape
        if C != self.input_size:
            raise ValueError(f"x has {C} features but the layer's input_size is {self.input_size}")
        lengths = check_lengths(lengths, T, N)
        h0, c0 = self._split_state(state, N, unbatched)
        learned = state is None and self.learn_initial_state
        D, H, L, R = self.num_directions, self.hidden_size, self.num_layers, self.state_size
        rev = None
        if D == 2:
            rev = (
                (reverse_index(lengths, T), np.arange(N)[None, :]) if lengths is not None else None
            )
        training = self.training
        precision = self.matmul_precision
        # recurrent dropout and zoneout: one seed a forward from the layer's generator, one noise
        # stream per layer and direction (eval mode applies no dropout, zoneout's expectation)
        noisy = self.recurrent_dropout > 0 or self.zoneout > 0
        seed = int(self.rng.integers(2**63)) if noisy and training else None
        noise = {"recurrent_dropout": self.recurrent_dropout,
                 "recurrent_dropout_mode": self.recurrent_dropout_mode, "zoneout": self.zoneout,
                 "seed": 0 if seed is None else seed}  # fmt: skip
        ctxs, masks = [], []
        h_n = np.empty((L * D, N, R), dtype=self.dtype)
        c_n = np.empty((L * D, N, H), dtype=self.dtype) if self.spec.has_c else None
        inp = x
        for layer in range(L):
            outs, layer_ctxs = [], []
            for d, suffix in enumerate(self._suffixes(layer)):
                p, k = self.params, layer * D + d
                xin = inp if d == 0 else (inp[::-1] if rev is None else inp[rev])
                y, h, c, ctx = ops.forward(
                    self.mode, xin, p["weight_ih" + suffix], p["weight_hh" + suffix],
                    p.get("bias_ih" + suffix), p.get("bias_hh" + suffix),
                    None if h0 is None else h0[k], None if c0 is None else c0[k],
                    lengths=lengths, training=training, matmul_precision=precision,
                    w_peephole=p.get("weight_peephole" + suffix), w_hr=p.get("weight_hr" + suffix),
                    noise_stream=k, **noise,
                    **{kind: p[kind + suffix] for kind in self._layer_norm_names},
                )  # fmt: skip
                if d == 1:
                    y = y[::-1] if rev is None else y[rev]
                outs.append(y)
                layer_ctxs.append(ctx)
                h_n[k] = h
                if c_n is not None:
                    c_n[k] = c
            inp = outs[0] if D == 1 else np.concatenate(outs, axis=2)
            mask = None
            if training and self.dropout > 0 and layer < L - 1:
                keep = 1.0 - self.dropout
                mask = (self.rng.random(inp.shape) < keep).astype(self.dtype) / self.dtype.type(
                    keep
                )
                inp = inp * mask
            ctxs.append(layer_ctxs)
            masks.append(mask)
        if not inp.flags.writeable:  # a view of the reserve, which backward reads
            y = ops._scratch_array(inp.shape, inp.dtype)
            np.copyto(y, inp)
        else:
            y = inp
        self._cache = None
        if training:
            self._cache = {"ctxs": ctxs, "masks": masks, "rev": rev, "shape": (T, N, C),
                           "unbatched": unbatched, "learned": learned}  # fmt: skip
        if unbatched:
            y, h_n = y[:, 0], h_n[:, 0]
            c_n = None if c_n is None else c_n[:, 0]
        elif self.batch_first:
            y = y.swapaxes(0, 1)
        return y, ((h_n, c_n) if self.spec.has_c else h_n)

    # -- backward --

    def backward(self, dy, dstate=None):
        """Backpropagates through the last training forward; returns ``(dx, dstate0)``.

        dy: the gradient of y (same shape as y, None for zero); dstate: that of the final state
        (an array, or (dh_n, dc_n) for LSTM, any part None for zero). Adds the parameter gradients
        into ``self.grads`` (into h0/c0 too when the learned initial state was used) and returns
        the gradients of x and of the initial state, shaped as they were given. Each forward can
        be differentiated once.
        """
        cache = self._cache
        if cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward needs a forward in training mode first (after "
                "eval() the forward keeps nothing for backward; call train(), with dropout=0 for "
                "deterministic outputs), and each forward can be differentiated only once"
            )
        T, N, C = cache["shape"]
        unbatched = cache["unbatched"]
        D, H, L, R = self.num_directions, self.hidden_size, self.num_layers, self.state_size
        LD = L * D
        if dy is None:
            dy = np.zeros((T, N, D * R), dtype=self.dtype)
        else:
            dy = _check_input("dy", dy, self.dtype)
            want = (
                (T, D * R) if unbatched else ((N, T, D * R) if self.batch_first else (T, N, D * R))
            )
            if dy.shape != want:
                raise ValueError(f"dy must have the shape of y, {want}, got {dy.shape}")
            dy = dy[:, None] if unbatched else (dy.swapaxes(0, 1) if self.batch_first else dy)
        dh_n = dc_n = None
        if dstate is not None:
            if self.spec.has_c:
                if not isinstance(dstate, tuple) or len(dstate) != 2:
                    raise TypeError("LSTM dstate must be a tuple (dh_n, dc_n) (either may be None)")
                dh_n, dc_n = dstate
            elif isinstance(dstate, tuple):
                raise TypeError(f"{type(self).__name__} dstate is one array dh_n, not a tuple")
            else:
                dh_n = dstate
            dh_n = None if dh_n is None else self._state_in("dh_n", dh_n, N, unbatched)
            dc_n = None if dc_n is None else self._state_in("dc_n", dc_n, N, unbatched)
        self._cache = None
        rev = cache["rev"]
        dh0 = np.zeros((LD, N, R), dtype=self.dtype)
        dc0 = np.zeros((LD, N, H), dtype=self.dtype) if self.spec.has_c else None
        dcur = dy
        for layer in reversed(range(L)):
            dx = None
            for d, suffix in enumerate(self._suffixes(layer)):
                k = layer * D + d
                dyd = dcur[..., d * R : (d + 1) * R]
                if d == 1:
                    dyd = dyd[::-1] if rev is None else dyd[rev]
                g = ops.backward(
                    cache["ctxs"][layer][d], dyd,
                    None if dh_n is None else dh_n[k], None if dc_n is None else dc_n[k],
                )  # fmt: skip
                dxd = g["dx"]
                if d == 1:
                    dxd = dxd[::-1] if rev is None else dxd[rev]
                dx = dxd if dx is None else dx + dxd
                self.grads["weight_ih" + suffix] += g["dw_ih"]
                self.grads["weight_hh" + suffix] += g["dw_hh"]
                if self.bias:
                    self.grads["bias_ih" + suffix] += g["db_ih"]
                    self.grads["bias_hh" + suffix] += g["db_hh"]
                if self.peephole:
                    self.grads["weight_peephole" + suffix] += g["dw_peephole"]
                if self.proj_size:
                    self.grads["weight_hr" + suffix] += g["dw_hr"]
                for kind in self._layer_norm_names:
                    self.grads[kind + suffix] += g["d" + kind]
                dh0[k] = g["dh0"]
                if dc0 is not None:
                    dc0[k] = g["dc0"]
            mask = cache["masks"][layer - 1] if layer > 0 else None
            dcur = dx * mask if mask is not None else dx
        if cache["learned"]:
            self.grads["h0"] += dh0.sum(axis=1, keepdims=True)
            if dc0 is not None:
                self.grads["c0"] += dc0.sum(axis=1, keepdims=True)
        if unbatched:
            dcur, dh0 = dcur[:, 0], dh0[:, 0]
            dc0 = None if dc0 is None else dc0[:, 0]
        elif self.batch_first:
            dcur = dcur.swapaxes(0, 1)
        return dcur, ((dh0, dc0) if self.spec.has_c else dh0)


class RNN(_Recurrent):
    """Elman RNN, h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh), as torch.nn.RNN.

    ``RNN(input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, *, dtype=np.float32, seed=None,
    init="uniform", learn_initial_state=False)``: nonlinearity "tanh" or "relu"; dropout applies
    to the outputs of every layer but the last, in training mode only; init "uniform" (torch's
    U(-1/sqrt(H), 1/sqrt(H))), "orthogonal" (Xavier-uniform w_ih, orthogonal w_hh per gate, zero
    biases, LSTM forget-gate bias 1) or a callable ``f(name, array, rng, H, G)`` that fills array
    in place; learn_initial_state adds parameters h0 (and c0) of shape (num_layers *
    num_directions, 1, H), used when forward gets no state; matmul_precision "bfloat16" (float32
    layers on a CPU with AVX512_BF16) multiplies in bfloat16, forward and backward, for speed at
    up to about 1e-2 relative error (see rnnfast.ops; AMX tiles where the CPU has them).

    ``recurrent_dropout=p`` (LSTM and GRU, ``recurrent_dropout_mode="semeniuta"``, their default)
    drops units of the candidate inside the fused kernels, a fresh mask each step; ``zoneout=p``
    keeps each unit of h at its previous value with probability p each step. Each training
    forward draws one seed from the layer's generator (so training is reproducible from ``seed``),
    each layer and direction its own masks; eval mode applies no dropout and zoneout's
    expectation, h = p h_{t-1} + (1-p) h_new (rnnfast.ops.forward has the details).

    ``layer_norm=True`` (LSTM, and GRU with reset_after=True; not with proj_size) normalises both
    products of every step inside the fused kernels, and the LSTM's c before its tanh (Ba et al.
    2016, as Haste's LayerNormLSTM and LayerNormGRU): parameters ``ln_gamma_ih_l{k}`` and
    ``ln_gamma_hh_l{k}`` (G*H,) starting at 1, and for the LSTM ``ln_gamma_c_l{k}`` (H,) at 1 and
    ``ln_beta_c_l{k}`` (H,) at 0, per layer and direction (rnnfast.ops.forward has the equations).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, **kwargs):  # fmt: skip
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__("rnn_" + nonlinearity, input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, **kwargs)  # fmt: skip


class LSTM(_Recurrent):
    """LSTM (gates i, f, g, o), as torch.nn.LSTM; state is the tuple (h, c). See RNN for options.

    ``proj_size=P`` (0 < P < hidden_size) projects h as torch.nn.LSTM(proj_size=P) does (LSTMP,
    Sak et al. 2014): ``weight_hr_l{k}`` (P, H), ``weight_hh`` (4H, P), h and each direction's
    output P wide, c still H; a torch state_dict with proj_size loads as it is.
    ``peephole=True`` adds ``weight_peephole_l{k}`` (3, H) per layer and direction (rows i, f, o:
    i and f see c_{t-1}, o sees c_t; Gers & Schmidhuber 2000). ``coupled_input_forget=True``
    ties f = 1 - i (CIFG, Greff et al. 2017): the weights and biases hold three gate blocks i, g,
    o ((3H, C), (3H, H), (3H,)), and a peephole's row f is unused (its gradient stays zero).
    """

    _default_options = (("coupled_input_forget", False),)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 *, coupled_input_forget: bool = False, **kwargs):  # fmt: skip
        cell = family_cell("lstm", coupled_input_forget=coupled_input_forget)
        self.coupled_input_forget = coupled_input_forget
        super().__init__(cell, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, **kwargs)  # fmt: skip


class GRU(_Recurrent):
    """GRU (gates r, z, n; reset applied after the recurrent product), as torch.nn.GRU.

    ``reset_after=False`` applies r to h before the candidate's product instead (Cho et al. 2014;
    Keras's ``GRU(reset_after=False)``, ONNX's ``linear_before_reset=0``): n = tanh(x W_in^T +
    b_in + (r * h) W_hn^T + b_hn). The parameters keep their shapes and names.
    """

    _default_options = (("reset_after", True),)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 *, reset_after: bool = True, **kwargs):  # fmt: skip
        cell = family_cell("gru", reset_after=reset_after)
        self.reset_after = reset_after
        super().__init__(cell, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, **kwargs)  # fmt: skip


# ---- Embedding and Linear --------------------------------------------------------------------


class Embedding(Module):
    """A lookup table, as torch.nn.Embedding: ids (any shape) -> vectors (*, embedding_dim).

    weight is N(0, 1) initially, as torch; the row ``padding_idx`` (if given) starts at zero and
    gets no gradient.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 *, dtype=np.float32, seed=None):  # fmt: skip
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(
                f"num_embeddings and embedding_dim must be >= 1, got {num_embeddings}, "
                f"{embedding_dim}"
            )
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx {padding_idx} out of range [0, {num_embeddings})")
            padding_idx %= num_embeddings
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.padding_idx, self.dtype = padding_idx, _float_dtype(dtype)
        w = _init.normal_(np.empty((num_embeddings, embedding_dim), dtype=self.dtype), rng=seed)
        if padding_idx is not None:
            w[padding_idx] = 0
        self.register_parameter("weight", w)
        self._ids = None

    def __repr__(self) -> str:
        return f"Embedding({self.num_embeddings}, {self.embedding_dim})"

    def forward(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"Embedding takes integer ids, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_embeddings):
            bad = ids.min() if ids.min() < 0 else ids.max()
            raise IndexError(f"id {int(bad)} is out of range for {self.num_embeddings} embeddings")
        self._ids = ids.copy() if self.training else None
        return self.params["weight"][ids]

    def backward(self, dy) -> None:
        """Adds dy (shape ids.shape + (embedding_dim,)) into the rows it came from; returns None."""
        if self._ids is None:
            raise RuntimeError("Embedding.backward needs a forward in training mode first")
        ids, self._ids = self._ids, None
        dy = _check_input("dy", dy, self.dtype)
        if dy.shape != ids.shape + (self.embedding_dim,):
            raise ValueError(
                f"dy must have shape {ids.shape + (self.embedding_dim,)}, got {dy.shape}"
            )
        # one pass in the kernels' scatter-add, the rows added in order (NumPy's sort and
        # reduceat, or np.add.at, took several passes: bench/RESULTS.md, session 14)
        _C.embedding_backward(
            np.ascontiguousarray(ids.reshape(-1), dtype=np.int64),
            np.ascontiguousarray(dy.reshape(-1, self.embedding_dim)),
            self.grads["weight"],
            -1 if self.padding_idx is None else self.padding_idx,
        )


class Linear(Module):
    """y = x W^T + b over the last axis, as torch.nn.Linear (same init: U(+-1/sqrt(in))).
    matmul_precision "bfloat16" (float32 layers, a CPU with AVX512_BF16) runs the forward's and
    the backward's products in bfloat16 with float32 sums, as the recurrent layers' option."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype=np.float32, seed=None, matmul_precision: str = "float32"):  # fmt: skip
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features and out_features must be >= 1, got {in_features}, {out_features}"
            )
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.dtype = _float_dtype(dtype)
        self.matmul_precision = _layer_precision(matmul_precision, self.dtype)
        rng = _init.as_generator(seed)
        k = 1.0 / np.sqrt(in_features)
        weight = np.empty((out_features, in_features), self.dtype)
        self.register_parameter("weight", _init.uniform_(weight, -k, k, rng))
        if bias:
            bias_ = np.empty(out_features, self.dtype)
            self.register_parameter("bias", _init.uniform_(bias_, -k, k, rng))
        self._x = None

    def __repr__(self) -> str:
        precision = (
            ""
            if self.matmul_precision == "float32"
            else f", matmul_precision={self.matmul_precision!r}"
        )
        return (
            f"Linear({self.in_features}, {self.out_features}, bias={'bias' in self.params}"
            f"{precision})"
        )

    def forward(self, x) -> np.ndarray:
        x = _check_input("x", x, self.dtype)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} features last, got shape {x.shape}")
        self._x = x if self.training else None
        # the product on the kernels' threads (ops.gemm), not NumPy's serial BLAS
        y = ops.gemm(x.reshape(-1, self.in_features), self.params["weight"], trans_b=True,
                     matmul_precision=self.matmul_precision)  # fmt: skip
        if "bias" in self.params:
            y += self.params["bias"]
        return y.reshape(*x.shape[:-1], self.out_features)

    def backward(self, dy) -> np.ndarray:
        """Adds into grads and returns dx (the shape of x)."""
        if self._x is None:
            raise RuntimeError("Linear.backward needs a forward in training mode first")
        x, self._x = self._x, None
        dy = _check_input("dy", dy, self.dtype)
        if dy.shape != x.shape[:-1] + (self.out_features,):
            raise ValueError(
                f"dy must have shape {x.shape[:-1] + (self.out_features,)}, got {dy.shape}"
            )
        x2, dy2 = x.reshape(-1, self.in_features), dy.reshape(-1, self.out_features)
        if self.matmul_precision == "float32":
            ops.gemm(dy2, x2, trans_a=True, out=self.grads["weight"], accumulate=True)
        else:  # the bfloat16 products overwrite: summed into the gradient after
            self.grads["weight"] += ops.gemm(dy2, x2, trans_a=True,
                                             matmul_precision=self.matmul_precision)  # fmt: skip
        if "bias" in self.params:
            self.grads["bias"] += dy2.sum(axis=0)
        dx = ops.gemm(dy2, self.params["weight"], matmul_precision=self.matmul_precision)
        return dx.reshape(x.shape)


# ---- single steps and chains -------------------------------------------------------------------


class _Cell(Module):
    """One step of a fused cell, as torch.nn.LSTMCell, GRUCell and RNNCell.

    ``h = cell(x, h)`` (``h, c = cell(x, (h, c))`` for LSTMCell): x (N, C) or (C,) unbatched, the
    state (N, H) or (H,), None for zeros. Parameters ``weight_ih`` (G*H, C), ``weight_hh`` (G*H,
    H), ``bias_ih``, ``bias_hh`` (G*H,), torch's names and init U(-1/sqrt(H), 1/sqrt(H)).

    Each training-mode call keeps its step's reserve on a stack; ``backward(dstate)`` pops the
    latest step, adds into ``grads`` and returns ``(dx, dstate_prev)``, so a loop of T calls is
    differentiated by T backward calls in reverse order, each given the gradient of that step's
    output state (its loss's gradient plus the dstate_prev of the step after it). Eval mode keeps
    nothing; ``clear()`` drops the stack without backpropagating.
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, bias: bool = True, *,
                 dtype=np.float32, seed=None):  # fmt: skip
        super().__init__()
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.spec = cell_spec(cell)
        self.input_size, self.hidden_size, self.bias = int(input_size), int(hidden_size), bias
        self.dtype = _float_dtype(dtype)
        rng = _init.as_generator(seed)
        G, H = self.spec.gates, self.hidden_size
        shapes = {"weight_ih": (G * H, self.input_size), "weight_hh": (G * H, H)}
        if bias:
            shapes.update(bias_ih=(G * H,), bias_hh=(G * H,))
        for name, shape in shapes.items():
            w = np.zeros(shape, dtype=self.dtype)
            _init_torch(name, w, rng, H, G)
            self.register_parameter(name, w)
        self._steps: list = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.input_size}, {self.hidden_size}, bias={self.bias})"

    def clear(self) -> None:
        """Drops the reserves of the training steps not yet backpropagated."""
        self._steps.clear()

    def _state(self, name: str, s, N: int, unbatched: bool):
        if s is None:
            return None
        s = _check_input(name, s, self.dtype)
        want = (self.hidden_size,) if unbatched else (N, self.hidden_size)
        if s.shape != want:
            raise ValueError(f"{name} must have shape {want}, got {s.shape}")
        return s[None] if unbatched else s

    def _split(self, what: str, state, N: int, unbatched: bool):
        """(h, c) checked from a state argument (c None for a cell without one)."""
        if self.spec.has_c:
            if state is None:
                return None, None
            if not isinstance(state, tuple) or len(state) != 2:
                raise TypeError(f"{type(self).__name__}'s {what} must be a tuple (h, c)")
            return (self._state(f"{what}[0]", state[0], N, unbatched),
                    self._state(f"{what}[1]", state[1], N, unbatched))  # fmt: skip
        if isinstance(state, tuple):
            raise TypeError(f"{type(self).__name__}'s {what} is one array h, not a tuple")
        return self._state(what, state, N, unbatched), None

    def _join(self, h, c, unbatched: bool):
        if unbatched:
            h, c = h[0], None if c is None else c[0]
        return (h, c) if self.spec.has_c else h

    def forward(self, x, state=None):
        x = _check_input("x", x, self.dtype)
        if x.ndim not in (1, 2) or x.shape[-1] != self.input_size:
            raise ValueError(
                f"x must be (N, {self.input_size}) or ({self.input_size},) unbatched, got shape "
                f"{x.shape}"
            )
        unbatched = x.ndim == 1
        x = x[None] if unbatched else x
        h0, c0 = self._split("state", state, x.shape[0], unbatched)
        p = self.params
        _, h, c, ctx = ops.forward(
            self.spec.name, x[None], p["weight_ih"], p["weight_hh"], p.get("bias_ih"),
            p.get("bias_hh"), h0, c0, training=self.training,
        )  # fmt: skip
        if self.training:
            self._steps.append((ctx, unbatched, x.shape[0]))
        return self._join(h, c, unbatched)

    def backward(self, dstate):
        """Backpropagates the latest training step not yet differentiated: dstate is the
        gradient of its output state (h, or (dh, dc) for LSTMCell; any part None for zero).
        Returns ``(dx, dstate_prev)``, the gradients of its x and its input state."""
        if not self._steps:
            raise RuntimeError(
                f"{type(self).__name__}.backward needs a training-mode forward not yet "
                "backpropagated (eval() keeps nothing; each step is differentiated once)"
            )
        ctx, unbatched, N = self._steps[-1]
        dh, dc = (None, None) if dstate is None else self._split("dstate", dstate, N, unbatched)
        self._steps.pop()
        g = ops.backward(ctx, None, dh, dc)
        self.grads["weight_ih"] += g["dw_ih"]
        self.grads["weight_hh"] += g["dw_hh"]
        if self.bias:
            self.grads["bias_ih"] += g["db_ih"]
            self.grads["bias_hh"] += g["db_hh"]
        dx = g["dx"][0]
        return (dx[0] if unbatched else dx), self._join(g["dh0"], g.get("dc0"), unbatched)


class RNNCell(_Cell):
    """One Elman step, h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh), as torch.nn.RNNCell."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", **kwargs):  # fmt: skip
        self.nonlinearity = nonlinearity
        super().__init__(rnn_cell(nonlinearity), input_size, hidden_size, bias, **kwargs)


class LSTMCell(_Cell):
    """One LSTM step (gates i, f, g, o), as torch.nn.LSTMCell: ``h, c = cell(x, (h, c))``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, **kwargs):
        super().__init__("lstm", input_size, hidden_size, bias, **kwargs)


class GRUCell(_Cell):
    """One GRU step (gates r, z, n), as torch.nn.GRUCell; ``reset_after=False`` applies r before
    the candidate's product (Cho et al. 2014), as the GRU layer's option."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *,
                 reset_after: bool = True, **kwargs):  # fmt: skip
        self.reset_after = reset_after
        super().__init__(family_cell("gru", reset_after=reset_after), input_size, hidden_size,
                         bias, **kwargs)  # fmt: skip


class Sequential(Module):
    """Modules applied in order, as torch.nn.Sequential: ``Sequential(a, b, c)(x)`` is c(b(a(x)))
    and ``backward(dy)`` runs their backward passes in reverse, returning the first one's dx.

    Children are named "0", "1", ... (state_dict keys "0.weight" ...). A recurrent layer inside
    passes on its output y (its final state is dropped) and takes ``lengths`` when forward gets
    them; an Embedding may only come first (its backward returns no dx).
    """

    def __init__(self, *modules: Module) -> None:
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> Sequential:
        self.add_module(str(len(self._children)), module)
        return self

    def __len__(self) -> int:
        return len(self._children)

    def __getitem__(self, index: int) -> Module:
        return list(self._children.values())[index]

    def __iter__(self) -> Iterator[Module]:
        return self.children()

    def __repr__(self) -> str:
        inner = "".join(f"\n  ({k}): {m!r}" for k, m in self._children.items())
        return f"Sequential({inner}\n)" if inner else "Sequential()"

    def forward(self, x, lengths=None):
        if not self._children:
            raise RuntimeError("Sequential() has no modules to run")
        recurrent = [m for m in self._children.values() if isinstance(m, _Recurrent)]
        if lengths is not None and not recurrent:
            raise ValueError("Sequential got lengths but has no recurrent layer to give them to")
        for m in self._children.values():
            if isinstance(m, _Recurrent):
                x, _ = m(x, lengths=lengths)
            else:
                x = m(x)
        return x

    def backward(self, dy):
        modules = list(self._children.items())
        for name, m in reversed(modules):
            if dy is None:
                raise TypeError(
                    f"Sequential's module {name} ({type(m).__name__}) got no gradient: the module "
                    "after it returns no dx (an Embedding can only come first)"
                )
            dy = m.backward(dy)
            if isinstance(m, _Recurrent):
                dy = dy[0]
        return dy


# ---- attention ---------------------------------------------------------------------------------


def _outer_sum(a, b):
    """a^T b per batch row: (N, S, T), (N, S, K) -> (N, T, K). With one query (S = 1) this is an
    outer product, which NumPy's matmul runs ten times slower than a broadcast product."""
    # the result (N x T x K, a step's whole key gradient) from the scratch cache: a decoder
    # stepping through its targets makes one per step, fresh pages each time from NumPy
    out = ops._scratch_array((a.shape[0], a.shape[2], b.shape[2]), np.result_type(a, b))
    if a.shape[1] == 1:
        return np.multiply(a[:, 0, :, None], b[:, 0, None, :], out=out)
    return np.matmul(a.transpose(0, 2, 1), b, out=out)


class AttentionKeys(NamedTuple):
    """Encoder outputs made ready for attention once (``Attention.prepare``), for a decoder that
    attends step by step: batch-major keys (N, T, K), zero at padded positions, and the valid
    positions (N, T) (None without lengths)."""

    keys: np.ndarray
    valid: np.ndarray | None


class Attention(Module):
    """Attention of decoder queries over encoder outputs, with the course's four scores:

    - ``"additive"`` (Bahdanau et al. 2015): e = v^T tanh(W [q; k]), parameters ``weight``
      (attn_size, query_size + key_size) and ``v`` (attn_size,);
    - ``"bilinear"`` (Luong et al. 2015, "general"): e = q^T W k, ``weight`` (query_size, key_size);
    - ``"dot"``: e = q^T k; ``"scaled_dot"``: e = q^T k / sqrt(key_size) (no parameters; the
      query and key sizes must agree).

    ``context, weights = attn(query, keys, lengths)``: keys (T, N, K) time-major encoder outputs;
    query (N, Q) for one decoder step, or (S, N, Q) for S steps at once (teacher forcing);
    lengths (N,) ints in [1, T] or None. The weights are a softmax over each row's valid positions
    only: a padded position gets exactly zero weight and no gradient, and its keys are never read
    (NaN there changes nothing). Returns context (N, K) or
    (S, N, K) and weights (N, T) or (S, N, T). ``backward(dcontext, dweights=None)`` adds into
    ``grads`` and returns ``(dquery, dkeys)``.

    A decoder that attends once per step passes ``attn.prepare(keys, lengths)`` in place of keys
    and lengths, so that the keys are checked and masked once, not at every step.

    As the single-step cells, each training-mode call keeps what its backward needs on a stack
    and ``backward`` differentiates the latest call not yet differentiated, so a decoder that
    attends once per step (Luong's input feeding) backpropagates its steps in reverse order.
    ``clear()`` drops the stack; eval mode keeps nothing.
    """

    SCORES = ("additive", "bilinear", "dot", "scaled_dot")

    def __init__(self, query_size: int, key_size: int, score: str = "additive",
                 attn_size: int | None = None, *, dtype=np.float32, seed=None) -> None:  # fmt: skip
        super().__init__()
        if score not in self.SCORES:
            raise ValueError(f"score must be one of {list(self.SCORES)}, got {score!r}")
        for name, v in (("query_size", query_size), ("key_size", key_size)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if score in ("dot", "scaled_dot") and query_size != key_size:
            raise ValueError(f"the {score} score needs query_size == key_size, got {query_size} "
                             f"and {key_size} (use 'bilinear' or 'additive')")  # fmt: skip
        self.score, self.query_size, self.key_size = score, int(query_size), int(key_size)
        self.dtype = _float_dtype(dtype)
        rng = _init.as_generator(seed)
        if score == "additive":
            A = int(attn_size or key_size)
            k = 1.0 / np.sqrt(query_size + key_size)
            w = np.empty((A, query_size + key_size), self.dtype)
            self.register_parameter("weight", _init.uniform_(w, -k, k, rng))
            self.register_parameter("v", _init.uniform_(np.empty(A, self.dtype), -1 / np.sqrt(A),
                                                        1 / np.sqrt(A), rng))  # fmt: skip
        elif score == "bilinear":
            k = 1.0 / np.sqrt(key_size)
            w = np.empty((query_size, key_size), self.dtype)
            self.register_parameter("weight", _init.uniform_(w, -k, k, rng))
        self._steps: list = []

    def clear(self) -> None:
        """Drops what the training calls not yet backpropagated kept."""
        self._steps.clear()

    def __repr__(self) -> str:
        return f"Attention({self.query_size}, {self.key_size}, score={self.score!r})"

    def prepare(self, keys, lengths=None) -> AttentionKeys:
        """keys (T, N, K) and lengths (N,) checked, batch-major and masked, for forward."""
        k = _check_input("keys", keys, self.dtype)
        if k.ndim != 3 or k.shape[2] != self.key_size:
            raise ValueError(f"keys must be (T, N, {self.key_size}), got shape {k.shape}")
        T, N, _ = k.shape
        if T == 0:
            raise ValueError("keys have no positions (T = 0) to attend to")
        kb = k.transpose(1, 0, 2)  # (N, T, K)
        if lengths is None:
            return AttentionKeys(kb, None)
        lengths = check_lengths(lengths, T, N)
        if lengths.min() < 1:
            raise ValueError("each row needs at least one position to attend to (lengths >= 1)")
        valid = np.arange(T)[None, :] < lengths[:, None]  # (N, T)
        # padding is never read: NaN there is harmless
        return AttentionKeys(np.where(valid[:, :, None], kb, 0), valid)

    def forward(self, query, keys, lengths=None):
        if isinstance(keys, AttentionKeys):
            if lengths is not None:
                raise ValueError("prepared keys carry their lengths: pass lengths to prepare()")
            if keys.keys.dtype != self.dtype or keys.keys.shape[2] != self.key_size:
                raise ValueError(f"these keys were prepared for {keys.keys.dtype} keys of size "
                                 f"{keys.keys.shape[2]}; this layer takes {self.dtype} keys of "
                                 f"size {self.key_size}")  # fmt: skip
            kb, valid = keys
        else:
            kb, valid = self.prepare(keys, lengths)
        N, T, K = kb.shape
        q = _check_input("query", query, self.dtype)
        single = q.ndim == 2
        if q.shape[-2:] != (N, self.query_size) or q.ndim not in (2, 3):
            raise ValueError(f"query must be (N, Q) = ({N}, {self.query_size}) or (S, {N}, "
                             f"{self.query_size}), got shape {q.shape}")  # fmt: skip
        qb = (q[None] if single else q).transpose(1, 0, 2)  # (N, S, Q)
        cache = {}
        if self.score in ("dot", "scaled_dot"):
            e = qb @ kb.transpose(0, 2, 1)
            if self.score == "scaled_dot":
                e = e / self.dtype.type(np.sqrt(K))
        elif self.score == "bilinear":
            qw = ops.gemm(qb.reshape(-1, self.query_size), self.params["weight"]).reshape(
                *qb.shape[:2], self.key_size
            )  # (N, S, K)
            e = qw @ kb.transpose(0, 2, 1)
            cache["qw"] = qw
        else:
            W = self.params["weight"]
            hq = qb @ W[:, : self.query_size].T  # (N, S, A)
            hk = kb @ W[:, self.query_size :].T  # (N, T, A)
            z = np.tanh(hq[:, :, None, :] + hk[:, None, :, :])  # (N, S, T, A)
            e = z @ self.params["v"]
            cache["z"] = z
        if valid is not None:
            e = np.where(valid[:, None, :], e, -np.inf)
        e = e - e.max(axis=-1, keepdims=True)
        a = np.exp(e)
        a /= a.sum(axis=-1, keepdims=True)  # padded positions: exp(-inf) = 0 exactly
        context = a @ kb  # (N, S, K)
        if self.training:
            self._steps.append((qb, kb, a, cache, single))
        context, a_out = context.transpose(1, 0, 2), a.transpose(1, 0, 2)
        return (context[0], a_out[0]) if single else (context, a_out)

    def backward(self, dcontext, dweights=None):
        if not self._steps:
            raise RuntimeError(
                "Attention.backward needs a training-mode forward not yet backpropagated (eval() "
                "keeps nothing; each call is differentiated once)"
            )
        qb, kb, a, cache, single = self._steps[-1]
        S, N = qb.shape[1], qb.shape[0]
        want = (N, self.key_size) if single else (S, N, self.key_size)
        dc = _check_input("dcontext", dcontext, self.dtype)
        if dc.shape != want:
            raise ValueError(f"dcontext must have shape {want}, got {dc.shape}")
        dcb = (dc[None] if single else dc).transpose(1, 0, 2)  # (N, S, K)
        da = dcb @ kb.transpose(0, 2, 1)  # (N, S, T)
        if dweights is not None:
            dw = _check_input("dweights", dweights, self.dtype)
            if dw.shape != (want[:-1] + (kb.shape[1],)):
                raise ValueError(f"dweights must have shape {want[:-1] + (kb.shape[1],)}, got "
                                 f"{dw.shape}")  # fmt: skip
            da = da + (dw[None] if single else dw).transpose(1, 0, 2)
        self._steps.pop()  # only once the arguments are known good
        dkb = _outer_sum(a, dcb)  # (N, T, K)
        de = a * (da - (a * da).sum(axis=-1, keepdims=True))  # zero where a is zero
        if self.score in ("dot", "scaled_dot"):
            if self.score == "scaled_dot":
                de = de / self.dtype.type(np.sqrt(self.key_size))
            dqb = de @ kb
            dkb += _outer_sum(de, qb)
        elif self.score == "bilinear":
            W, qw = self.params["weight"], cache["qw"]
            dqw = de @ kb  # (N, S, K)
            dqb = ops.gemm(dqw.reshape(-1, self.key_size), W, trans_b=True).reshape(qb.shape)
            ops.gemm(qb.reshape(-1, self.query_size), dqw.reshape(-1, self.key_size),
                     trans_a=True, out=self.grads["weight"], accumulate=True)  # fmt: skip
            dkb += _outer_sum(de, qw)
        else:
            W, v, z = self.params["weight"], self.params["v"], cache["z"]
            Q = self.query_size
            self.grads["v"] += de.reshape(-1) @ z.reshape(-1, z.shape[-1])
            dpre = de[..., None] * v * (1 - z * z)  # (N, S, T, A)
            dhq, dhk = dpre.sum(axis=2), dpre.sum(axis=1)  # (N, S, A), (N, T, A)
            dqb = dhq @ W[:, :Q]
            dkb += dhk @ W[:, Q:]
            A = dhq.shape[-1]
            self.grads["weight"][:, :Q] += ops.gemm(dhq.reshape(-1, A), qb.reshape(-1, Q),
                                                    trans_a=True)  # fmt: skip
            self.grads["weight"][:, Q:] += ops.gemm(
                dhk.reshape(-1, A), kb.reshape(-1, self.key_size), trans_a=True
            )
        dq = dqb.transpose(1, 0, 2)
        return (dq[0] if single else dq), dkb.transpose(1, 0, 2)
