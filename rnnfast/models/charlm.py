"""A character-level LSTM language model: Embedding -> LSTM stack -> Linear, trained with TBPTT.

``python -m rnnfast charlm`` trains it (see rnnfast.__main__); this module holds the model, the
vocabulary, the default corpus (the Python standard library's own source, so nothing is
downloaded), the training loop, evaluation and sampling.
"""

from __future__ import annotations

import glob
import math
import os
import sysconfig
import time
from dataclasses import asdict, dataclass

import numpy as np

from .. import checkpoint as ckpt
from .. import optim as _optim
from ..clip import NonFiniteGuard, clip_grad_norm_, grad_norm
from ..init import as_generator
from ..layers import LSTM, Embedding, Linear, Module, _layer_precision
from ..losses import perplexity, softmax, softmax_cross_entropy
from ..ops import bfloat16_supported
from ..sequences import TruncatedBPTT
from ..training import ProgressBar

__all__ = [
    "CharLM",
    "Vocab",
    "TrainConfig",
    "default_corpus",
    "load_corpus",
    "unigram_perplexity",
    "evaluate",
    "sample",
    "train",
    "load_model",
]

OPTIMIZERS = {"sgd": _optim.SGD, "adam": _optim.Adam, "adamw": _optim.AdamW,
              "rmsprop": _optim.RMSprop, "adagrad": _optim.Adagrad,
              "adadelta": _optim.Adadelta}  # fmt: skip


class Vocab:
    """Characters <-> ids; ids follow the sorted characters."""

    def __init__(self, chars):
        self.chars = "".join(sorted(set(chars)))
        if not self.chars:
            raise ValueError("the vocabulary is empty (is the corpus empty?)")
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        missing = sorted(set(text) - set(self.index))
        if missing:
            raise ValueError(
                f"characters not in the model's vocabulary: {''.join(missing)!r} "
                f"(it knows {len(self)} characters)"
            )
        return np.fromiter((self.index[c] for c in text), dtype=np.int64, count=len(text))

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in np.ravel(ids))


def _clean(text: str) -> str:
    # the standard library holds a few hundred non-ASCII characters; fold them into one symbol
    keep = {chr(c) for c in range(32, 127)} | {"\n"}
    return "".join(c if c in keep else ("    " if c == "\t" else "?") for c in text)


def default_corpus(max_chars: int | None = None) -> tuple[str, str]:
    """(train, validation) text from the running interpreter's standard library source.

    The top-level modules of ``sysconfig.get_paths()["stdlib"]`` in sorted order; every 20th file
    goes to validation, so validation is unseen code. Falls back to rnnfast's own source where the
    standard library ships without .py files.
    """
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    if sum(os.path.getsize(f) for f in files) < 200_000:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        files = sorted(glob.glob(os.path.join(here, "**", "*.py"), recursive=True))
    train, val = [], []
    for i, f in enumerate(files):
        with open(f, encoding="utf-8", errors="replace") as fh:
            (val if i % 20 == 7 else train).append(_clean(fh.read()))
    train_text, val_text = "\n".join(train), "\n".join(val)
    if max_chars is not None:
        train_text, val_text = train_text[:max_chars], val_text[: max(max_chars // 10, 1000)]
    return train_text, val_text


def load_corpus(path: str | None, max_chars: int | None = None) -> tuple[str, str]:
    """(train, validation): the default corpus, or a text file split 90/10 (validation last)."""
    if path is None:
        return default_corpus(max_chars)
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError as e:
        raise SystemExit(f"cannot read corpus {path!r}: {e.strerror}") from e
    if max_chars is not None:
        text = text[:max_chars]
    if len(text) < 1000:
        raise SystemExit(f"corpus {path!r} has {len(text)} characters; need at least 1000")
    cut = int(len(text) * 0.9)
    return text[:cut], text[cut:]


def unigram_perplexity(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int) -> float:
    """Perplexity on validation of the character frequencies of train (add-one smoothed)."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return math.exp(-logp[val_ids].mean())


class CharLM(Module):
    """Embedding(V, embed) -> LSTM(embed, hidden, layers, dropout, recurrent_dropout, zoneout,
    layer_norm) -> Linear(hidden, V)."""

    def __init__(self, vocab_size: int, embed: int = 64, hidden: int = 256, layers: int = 1,
                 dropout: float = 0.0, recurrent_dropout: float = 0.0, zoneout: float = 0.0,
                 layer_norm: bool = False, *, seed=None, dtype=np.float32):  # fmt: skip
        super().__init__()
        rng = as_generator(seed)
        self.config = {"vocab_size": int(vocab_size), "embed": int(embed), "hidden": int(hidden),
                       "layers": int(layers), "dropout": float(dropout),
                       "recurrent_dropout": float(recurrent_dropout),
                       "zoneout": float(zoneout), "layer_norm": bool(layer_norm)}  # fmt: skip
        self.add_module("embed", Embedding(vocab_size, embed, dtype=dtype, seed=rng))
        self.add_module("rnn", LSTM(embed, hidden, num_layers=layers, dropout=dropout,
                                    recurrent_dropout=recurrent_dropout, zoneout=zoneout,
                                    layer_norm=bool(layer_norm), dtype=dtype, seed=rng,
                                    init="orthogonal"))  # fmt: skip
        self.add_module("head", Linear(hidden, vocab_size, dtype=dtype, seed=rng))

    def forward(self, ids, state=None):
        """ids (T, N) -> logits (T, N, V) and the LSTM's final state."""
        y, state = self.rnn(self.embed(ids), state)
        return self.head(y), state

    def backward(self, dlogits) -> None:
        dx, _ = self.rnn.backward(self.head.backward(dlogits))
        self.embed.backward(dx)

    def set_matmul_precision(self, matmul_precision: str) -> None:
        """The LSTM's and the head's products in "float32" or "bfloat16" (float32 sums, float32
        weights and gradients; AMX tiles where the CPU has them), forward and backward."""
        for layer in (self.rnn, self.head):
            layer.matmul_precision = _layer_precision(matmul_precision, layer.dtype)


def evaluate(model: CharLM, ids: np.ndarray, batch: int = 32, seq_len: int = 256) -> float:
    """Mean cross-entropy (nats per character) over ``ids``, read as ``batch`` parallel streams."""
    was_training = model.training
    model.eval()
    try:
        batch = max(1, min(batch, len(ids) // 2))
        stream = TruncatedBPTT(ids, batch, seq_len)
        total, count = 0.0, 0
        for x, y in stream:
            logits, state = model(x, stream.state)
            stream.carry(state)
            loss, _ = softmax_cross_entropy(logits, y, reduction="sum")
            total, count = total + loss, count + y.size
        return total / count
    finally:
        model.train(was_training)


def sample(model: CharLM, vocab: Vocab, prime: str = "\n", length: int = 500,
           temperature: float = 0.8, rng=None) -> str:  # fmt: skip
    """Primes the model with ``prime`` and draws ``length`` characters at ``temperature``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not prime:
        prime = "\n"
    rng = as_generator(rng)
    was_training = model.training
    model.eval()
    try:
        ids = vocab.encode(prime)
        logits, state = model(ids[:, None])
        out = []
        for _ in range(int(length)):
            p = softmax(logits[-1, 0].astype(np.float64), temperature=temperature)
            nxt = int(rng.choice(len(p), p=p / p.sum()))
            out.append(nxt)
            logits, state = model(np.array([[nxt]]), state)
        return vocab.decode(out)
    finally:
        model.train(was_training)


# the model's shape and regularisation: a new run's defaults; a resumed run takes the checkpoint's
MODEL_DEFAULTS = {"hidden": 256, "embed": 64, "layers": 1, "dropout": 0.0,
                  "recurrent_dropout": 0.0, "zoneout": 0.0, "layer_norm": False}  # fmt: skip


@dataclass
class TrainConfig:
    """charlm's settings. The model options (MODEL_DEFAULTS' keys) left None take those defaults
    for a new model and the checkpoint's values with ``resume``; one given that differs from the
    checkpoint's is an error rather than silently ignored."""

    corpus: str | None = None
    hidden: int | None = None
    embed: int | None = None
    layers: int | None = None
    dropout: float | None = None
    recurrent_dropout: float | None = None
    zoneout: float | None = None
    layer_norm: bool | None = None
    seq_len: int = 64
    batch: int = 32
    steps: int = 2000
    lr: float = 3e-3
    optimizer: str = "adam"
    clip: float = 5.0
    seed: int = 0
    eval_every: int = 500
    sample_every: int = 500
    sample_length: int = 200
    temperature: float = 0.8
    checkpoint: str = "charlm.npz"
    resume: str | None = None
    max_chars: int | None = None
    val_chars: int | None = 200_000
    lr_decay: bool = True
    time_limit: float | None = 540.0
    threads: int | None = None
    quiet: bool = False
    distributed: bool = False
    matmul_precision: str = "float32"


def _model_from_meta(meta: dict, state: dict, path: str) -> tuple[CharLM, Vocab]:
    """The CharLM and vocabulary a checkpoint's metadata describes, checked against its arrays
    (``state``) before anything is allocated: a malformed file is a CheckpointError."""

    def bad(problem: str) -> ckpt.CheckpointError:
        return ckpt.CheckpointError(f"{path!r} is not a usable charlm checkpoint: {problem}")

    vocab, config = meta.get("vocab"), meta.get("model_config")
    if not isinstance(vocab, str) or not vocab:
        raise bad("its metadata has no vocabulary string")
    keys = {"vocab_size", "embed", "hidden", "layers", "dropout"}
    # absent in checkpoints from before them
    optional = {"recurrent_dropout", "zoneout", "layer_norm"}
    if not isinstance(config, dict) or not keys <= set(config) <= keys | optional:
        raise bad(f"its model_config is not a dict with keys {sorted(keys)} (and optionally "
                  f"{sorted(optional)})")  # fmt: skip
    for k in ("vocab_size", "embed", "hidden", "layers"):
        if isinstance(config[k], bool) or not isinstance(config[k], int) or config[k] < 1:
            raise bad(f"model_config {k} = {config[k]!r} is not a positive integer")
    if not isinstance(config.get("layer_norm", False), bool):
        raise bad(f"model_config layer_norm = {config['layer_norm']!r} is not true or false")
    for k in ("dropout", "recurrent_dropout", "zoneout"):
        p = config.get(k, 0.0)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise bad(f"model_config {k} = {p!r} is not in [0, 1)")
    vocab = Vocab(vocab)
    V, E, H, L = (config[k] for k in ("vocab_size", "embed", "hidden", "layers"))
    expected = {"embed.weight": (V, E), f"rnn.weight_hh_l{L - 1}": (4 * H, H),
                "head.weight": (V, H)}  # fmt: skip
    for name, shape in expected.items():
        if name not in state or state[name].shape != shape:
            got = state[name].shape if name in state else "no such array"
            raise bad(f"model_config says {name} has shape {shape}, the file has {got}")
    if len(vocab) != V:
        raise bad(f"its vocabulary has {len(vocab)} characters, its model_config {V}")
    return CharLM(**config), vocab


def _resume_settings(meta: dict, path: str, optimizer: str) -> tuple[str, int, float | None]:
    """(optimizer name, step, base learning rate or None) from a charlm checkpoint's metadata;
    ``optimizer`` where it names none."""
    name, step = meta.get("optimizer_name", optimizer), meta.get("step", 0)
    base_lr = meta.get("base_lr")
    if name not in OPTIMIZERS:
        raise ckpt.CheckpointError(
            f"{path!r}: optimizer_name {name!r} is not one of {sorted(OPTIMIZERS)}"
        )
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ckpt.CheckpointError(f"{path!r}: step {step!r} is not a whole number >= 0")
    if base_lr is not None and (isinstance(base_lr, bool) or not isinstance(base_lr, (int, float))
                                or not math.isfinite(base_lr) or base_lr <= 0):  # fmt: skip
        raise ckpt.CheckpointError(f"{path!r}: base_lr {base_lr!r} is not a positive number")
    return name, step, base_lr


def load_model(path: str) -> tuple[CharLM, Vocab, dict]:
    """A trained CharLM, its vocabulary and the checkpoint's metadata from ``path``."""
    state, _, meta = ckpt.read_checkpoint(path)
    model, vocab = _model_from_meta(meta, state, path)
    ckpt.load_checkpoint(path, model)
    return model, vocab, meta


class _Team:
    """The processes of a --distributed run (one process otherwise): rank, gradient averaging and
    the collective decisions every process must take alike."""

    def __init__(self, distributed: bool) -> None:
        self.rank, self.world = 0, 1
        self.reduce_seconds, self.reduces = 0.0, 0  # what the gradient averaging costs
        if not distributed:
            return
        from .. import distributed as rd

        try:
            import torch.distributed as dist
        except ImportError as e:
            raise SystemExit("--distributed needs PyTorch (pip install torch)") from e
        if not dist.is_initialized():
            if "RANK" not in os.environ:
                raise SystemExit("--distributed runs under torchrun: torchrun --nproc_per_node 2 "
                                 "-m rnnfast charlm --distributed")  # fmt: skip
            dist.init_process_group("gloo")
        self.rd, self.dist = rd, dist
        self.rank, self.world = rd.rank(), rd.world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, model) -> None:
        if self.world > 1:
            self.rd.broadcast_parameters(model)

    def average_gradients(self, model, loss: float) -> float:
        """Averages the gradients in place; returns the loss averaged alike."""
        if self.world == 1:
            return loss
        box = np.array([loss], dtype=np.float64)
        t0 = time.perf_counter()
        self.rd.all_reduce_gradients([*model.grads.values(), box])
        self.reduce_seconds += time.perf_counter() - t0
        self.reduces += 1
        return float(box[0])

    def largest(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch

        t = torch.tensor([value], dtype=torch.float64)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return float(t[0])

    def close(self) -> None:
        if self.world > 1:
            self.dist.barrier()
            self.dist.destroy_process_group()


def train(cfg: TrainConfig) -> dict:
    """Trains (or resumes) a CharLM; returns a summary dict (losses, perplexities, timings)."""
    if cfg.threads:
        from .. import set_num_threads

        set_num_threads(cfg.threads)
    if cfg.optimizer not in OPTIMIZERS:
        raise SystemExit(f"--optimizer must be one of {sorted(OPTIMIZERS)}, got {cfg.optimizer!r}")
    for name in ("hidden", "embed", "layers", "seq_len", "batch", "steps"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    out_dir = os.path.dirname(os.path.abspath(cfg.checkpoint))
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise SystemExit(f"cannot write the checkpoint {cfg.checkpoint!r}: {out_dir!r} is not a "
                         "writable directory")  # fmt: skip
    t_start = time.perf_counter()
    train_text, val_text = load_corpus(cfg.corpus, cfg.max_chars)
    if cfg.val_chars:
        val_text = val_text[: cfg.val_chars]
    # data parallel over torch.distributed (torchrun): every process trains the whole model on
    # its own streams of the text and the gradients are averaged each step; rank 0 evaluates,
    # samples, prints and writes the checkpoint
    team = _Team(cfg.distributed)
    progress = ProgressBar(cfg.steps, quiet=cfg.quiet or not team.main)
    start_step = 0
    if cfg.resume:
        state, _, meta = ckpt.read_checkpoint(cfg.resume)
        model, vocab = _model_from_meta(meta, state, cfg.resume)
        saved = {**MODEL_DEFAULTS, **{k: v for k, v in model.config.items() if k in MODEL_DEFAULTS}}
        clashes = [f"--{k.replace('_', '-')} {getattr(cfg, k)} (the checkpoint has {saved[k]})"
                   for k in MODEL_DEFAULTS
                   if getattr(cfg, k) is not None and getattr(cfg, k) != saved[k]]  # fmt: skip
        if clashes:
            raise SystemExit(f"--resume {cfg.resume} continues the checkpoint's model; drop "
                             f"{', '.join(clashes)} or start a new run")  # fmt: skip
        opt_name, start_step, base_lr = _resume_settings(meta, cfg.resume, cfg.optimizer)
        missing = set(train_text + val_text) - set(vocab.chars)
        if missing:
            raise SystemExit(f"the corpus has characters the checkpoint's vocabulary lacks: "
                             f"{''.join(sorted(missing))!r}")  # fmt: skip
        opt = OPTIMIZERS[opt_name](model.params, lr=cfg.lr)
        ckpt.load_checkpoint(cfg.resume, model, opt)
        base_lr = opt.lr if base_lr is None else float(base_lr)
        progress.print(f"resumed {cfg.resume} at step {start_step}")
        progress.set_count(start_step)
    else:
        vocab = Vocab(train_text + val_text)
        options = {k: d if getattr(cfg, k) is None else getattr(cfg, k)
                   for k, d in MODEL_DEFAULTS.items()}  # fmt: skip
        model = CharLM(len(vocab), **options, seed=cfg.seed)
        opt = OPTIMIZERS[cfg.optimizer](model.params, lr=cfg.lr)
        base_lr = cfg.lr
    if cfg.matmul_precision == "bfloat16" and not bfloat16_supported():
        raise SystemExit("--matmul-precision bfloat16 needs a CPU with AVX512_BF16, which this "
                         "one lacks")  # fmt: skip
    model.set_matmul_precision(cfg.matmul_precision)
    train_ids, val_ids = vocab.encode(train_text), vocab.encode(val_text)
    if len(train_ids) < 2 * cfg.batch:
        most = max(1, len(train_ids) // 2)
        raise SystemExit(f"--batch {cfg.batch} is too large for a training text of "
                         f"{len(train_ids):,} characters: each of the {cfg.batch} parallel "
                         f"streams needs at least 2 (use --batch {most} or less)")  # fmt: skip
    unigram = unigram_perplexity(train_ids, val_ids, len(vocab))
    progress.print(
        f"corpus: {len(train_ids):,} train / {len(val_ids):,} validation characters, vocabulary "
        f"{len(vocab)}, unigram validation perplexity {unigram:.2f}; model "
        f"{model.num_parameters():,} parameters"
    )
    team.broadcast(model)
    rng = np.random.default_rng(cfg.seed + start_step + 1000 * team.rank)
    if (
        cfg.resume and "rng_state" in meta and team.world == 1
    ):  # the chunk offsets and samples continue as they were
        try:
            rng.bit_generator.state = meta["rng_state"]
        except (TypeError, ValueError, KeyError) as e:
            raise ckpt.CheckpointError(f"{cfg.resume!r}: its rng_state is not usable: {e}") from e
    bptt = TruncatedBPTT(train_ids, cfg.batch, cfg.seq_len, random_offset=True, rng=rng)
    step, chars, t_train, history = start_step, 0, time.perf_counter(), []
    loss_avg = None
    val_loss = None
    guard = NonFiniteGuard()
    model.train()

    def save():
        ckpt.save_checkpoint(
            cfg.checkpoint, model, opt, step=step, model_config=model.config, vocab=vocab.chars,
            optimizer_name=type(opt).__name__.lower(), base_lr=base_lr, val_loss=val_loss,
            unigram_perplexity=unigram, rng_state=rng.bit_generator.state,
        )  # fmt: skip

    sampled_at = None

    def show_sample():
        nonlocal sampled_at
        if cfg.sample_length > 0:
            text = sample(model, vocab, "\n", cfg.sample_length, cfg.temperature, rng)
            progress.print(f"--- sample at step {step}, temperature {cfg.temperature} ---\n"
                           f"{text}\n---")  # fmt: skip
            sampled_at = step

    # seconds kept for the final evaluation; re-estimated at each evaluation
    reserve = min(30.0, 0.1 * cfg.time_limit) if cfg.time_limit else 0.0
    stopped_early = False

    def progress_fraction() -> float:
        # training ends at --steps or at the time limit, whichever comes first, and the learning
        # rate schedule follows whichever is further along
        frac = step / cfg.steps
        if cfg.time_limit:
            budget = max(cfg.time_limit - reserve, 1e-9)
            frac = max(frac, (time.perf_counter() - t_start) / budget)
        return frac

    while step < cfg.steps and not stopped_early:
        for x, y in bptt:
            frac = team.largest(progress_fraction())  # every process stops at the same step
            # a time limit that setup used up still leaves one step, so the checkpoint is trained
            if step >= cfg.steps or (frac >= 1 and step > start_step):
                stopped_early = step < cfg.steps
                break
            if cfg.lr_decay:  # cosine to a tenth of the initial rate
                opt.lr = base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            logits, state = model(x, bptt.state)
            bptt.carry(state)
            loss, dlogits = softmax_cross_entropy(logits, y)
            model.zero_grad()
            model.backward(dlogits)
            loss = team.average_gradients(model, loss)
            if cfg.clip > 0:
                norm = clip_grad_norm_(model.grads, cfg.clip)
            else:
                norm = grad_norm(model.grads)
            if not guard.step_ok(loss, norm):  # skipped: parameters and optimizer state unchanged
                bptt.reset()  # and no state from it carried on
                progress.print(f"step {step + 1}: non-finite loss {loss} or gradient norm {norm}; "
                               "step skipped")  # fmt: skip
                continue
            opt.step(model.grads)
            step += 1
            chars += y.size
            loss_avg = loss if loss_avg is None else 0.98 * loss_avg + 0.02 * loss
            elapsed = time.perf_counter() - t_train
            progress.update(1, f"loss {loss_avg:.3f} ppl {perplexity(loss_avg):.2f} "
                                  f"{chars / elapsed:,.0f} chars/s")  # fmt: skip
            if team.main and (step % cfg.eval_every == 0 or step == cfg.steps):
                t_eval = time.perf_counter()
                val_loss = evaluate(model, val_ids)
                reserve = 1.5 * (time.perf_counter() - t_eval) + 5.0
                history.append((step, loss_avg, val_loss))
                progress.print(f"step {step}: train loss {loss_avg:.3f}, validation perplexity "
                               f"{perplexity(val_loss):.2f} (unigram {unigram:.2f})")  # fmt: skip
                save()
            if team.main and cfg.sample_every and step % cfg.sample_every == 0:
                show_sample()
    train_seconds = max(time.perf_counter() - t_train, 1e-9)  # the final evaluation not counted
    if not team.main:
        team.close()
        return {"steps": step, "rank": team.rank}
    if stopped_early:
        progress.print(f"time limit of {cfg.time_limit:.0f} s reached after {step} of "
                       f"{cfg.steps} steps")  # fmt: skip
    if val_loss is None or not history or history[-1][0] != step:
        val_loss = evaluate(model, val_ids)
        history.append((step, loss_avg, val_loss))
        save()
    if cfg.sample_every and sampled_at != step:  # a short run still shows what it learned
        show_sample()
    team.close()
    total = time.perf_counter() - t_start
    summary = {
        "steps": step,
        "stopped_by_time_limit": stopped_early,
        "train_loss": loss_avg,
        "val_loss": val_loss,
        "val_perplexity": perplexity(val_loss),
        "unigram_perplexity": unigram,
        "seconds": total,
        "setup_seconds": t_train - t_start,  # data, model and optimizer before the first step
        "chars_per_second": chars / train_seconds,
        # every process trains on chars of its own; the all-reduce time is rank 0's
        "processes": team.world,
        "total_chars_per_second": team.world * chars / train_seconds,
        "allreduce_ms_per_step": 1e3 * team.reduce_seconds / max(team.reduces, 1),
        "history": history,
        "checkpoint": cfg.checkpoint,
        "config": asdict(cfg),
    }
    progress.close()
    progress.print(
        f"done: {step} steps in {total:.0f} s, validation perplexity "
        f"{summary['val_perplexity']:.2f} vs unigram {unigram:.2f}; checkpoint {cfg.checkpoint}"
    )
    return summary
