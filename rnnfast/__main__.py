"""The command line: ``python -m rnnfast charlm|sample|classify|seq2seq|translate|digits ...``
(also installed as ``rnnfast``).

python -m rnnfast charlm [--corpus FILE] [--hidden 256] [--layers 1] [--seq-len 64]
                         [--batch 32] [--steps N] [--lr 3e-3] [--optimizer adam] [--clip 5]
                         [--resume CK] [--seed 0] [--checkpoint charlm.npz]
python -m rnnfast sample --checkpoint charlm.npz --prime "def " --temperature 0.8 --length 500
python -m rnnfast classify --data train.tsv [--valid dev.tsv] [--cell lstm] [--pool max]
python -m rnnfast seq2seq [--data pairs.tsv] [--tokens char] [--input-feeding] [--beam 5]
                          [--checkpoint seq2seq.npz] [--plot-attention attention.png]
python -m rnnfast translate --checkpoint seq2seq.npz "12 march 1999" [more texts, or stdin]
python -m rnnfast digits [--cell gru] [--hidden 64] [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from e
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _probability(text):
    value = _nonneg_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1), got {text}")
    return value


def _nonneg_float(text):
    try:
        value = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from e
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    from .models.charlm import OPTIMIZERS, TrainConfig

    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m rnnfast", description="Train and sample rnnfast's example models."
    )
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("charlm", help="train a character-level LSTM language model",
                       description="Train a character-level LSTM language model with truncated "
                       "BPTT. Without --corpus it reads the running interpreter's standard library "
                       "source (nothing is downloaded).")  # fmt: skip
    c.add_argument(
        "--corpus", default=None, help="a UTF-8 text file (default: Python stdlib source)"
    )
    c.add_argument("--hidden", type=_positive(int), default=None, help="LSTM hidden size")
    c.add_argument("--embed", type=_positive(int), default=None, help="embedding size")
    c.add_argument("--layers", type=_positive(int), default=None, help="LSTM layers")
    c.add_argument("--dropout", type=_probability, default=None, help="between layers")
    c.add_argument(
        "--recurrent-dropout",
        type=_probability,
        default=None,
        help="on the LSTM's candidate, a fresh mask each step (Semeniuta et al.)",
    )
    c.add_argument(
        "--zoneout",
        type=_probability,
        default=None,
        help="probability that a unit of h keeps its value each step",
    )
    c.add_argument("--layer-norm", action="store_true", default=None,
                   help="normalise the LSTM's products and c inside the fused kernels "
                   "(Ba et al. 2016)")  # fmt: skip
    c.add_argument("--matmul-precision", choices=("float32", "bfloat16"),
                   default=d.matmul_precision,
                   help="the LSTM's and the head's products: bfloat16 with float32 sums (on AMX "
                   "tiles where the CPU has them), float32 weights and gradients")  # fmt: skip
    c.add_argument("--seq-len", type=_positive(int), default=d.seq_len, help="TBPTT chunk length")
    c.add_argument("--batch", type=_positive(int), default=d.batch, help="parallel streams")
    c.add_argument("--steps", type=_positive(int), default=d.steps, help="optimizer steps in all")
    c.add_argument("--lr", type=_positive(float), default=d.lr, help="initial learning rate")
    c.add_argument("--no-lr-decay", action="store_true", help="keep the learning rate constant "
                   "(default: cosine decay to a tenth)")  # fmt: skip
    c.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=d.optimizer)
    c.add_argument("--clip", type=_nonneg_float, default=d.clip,
                   help="global gradient-norm clip (0: off)")  # fmt: skip
    c.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint up to --steps")  # fmt: skip
    c.add_argument("--seed", type=int, default=d.seed)
    c.add_argument("--checkpoint", default=d.checkpoint, help="where to save (atomically)")
    c.add_argument("--eval-every", type=_positive(int), default=d.eval_every,
                   help="validate and save every N steps")  # fmt: skip
    c.add_argument("--sample-every", type=int, default=d.sample_every, help="0: never")
    c.add_argument("--sample-length", type=int, default=d.sample_length)
    c.add_argument("--temperature", type=_positive(float), default=d.temperature)
    c.add_argument("--max-chars", type=_positive(int), default=None, help="cut the corpus")
    c.add_argument("--time-limit", type=_nonneg_float, default=d.time_limit, metavar="SECONDS",
                   help="stop training early to end within this time (0: none)")  # fmt: skip
    c.add_argument("--threads", type=_positive(int), default=None, help="kernel threads")
    c.add_argument("--json", default=None, metavar="FILE", help="write the run's summary here")
    c.add_argument("--quiet", action="store_true", help="no progress output")
    c.add_argument("--distributed", action="store_true",
                   help="data parallel under torchrun (torch.distributed, gloo): each "
                   "process trains on its own streams, gradients averaged each step, rank 0 "
                   "writes")  # fmt: skip

    s = sub.add_parser("sample", help="generate text from a charlm checkpoint")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--prime", default="\n", help="text to start from")
    s.add_argument("--temperature", type=_positive(float), default=0.8)
    s.add_argument("--length", type=_positive(int), default=500)
    s.add_argument("--seed", type=int, default=None)

    k = sub.add_parser("classify", help="train a text classifier (sentiment, topics...)",
                       description="Train a many-to-one text classifier: word tokens, an "
                       "embedding, a bidirectional LSTM or GRU over the exact lengths, pooling, a "
                       "linear head. --data is a TSV/CSV file with a header (GLUE SST-2's "
                       "sentence<TAB>label as it is) or an IMDB-style folder (train/<label>/*.txt, "
                       "test/<label>/*.txt).")  # fmt: skip
    from .models.classify import ClassifyConfig

    e = ClassifyConfig(data="")
    k.add_argument("--data", required=True, help="TSV or CSV file with a header, or a folder")
    k.add_argument("--valid", default=None, help="a separate held-out file (same columns)")
    k.add_argument("--text-column", default=None, help="default: sentence, text, review...")
    k.add_argument("--label-column", default=None, help="default: label, sentiment, class...")
    k.add_argument("--cell", choices=["lstm", "gru"], default=e.cell)
    k.add_argument("--embed", type=_positive(int), default=e.embed, help="embedding size")
    k.add_argument("--hidden", type=_positive(int), default=e.hidden)
    k.add_argument("--layers", type=_positive(int), default=e.layers)
    k.add_argument("--unidirectional", action="store_true", help="one direction only")
    k.add_argument("--pool", choices=["last", "mean", "max"], default=e.pool,
                   help="over the valid steps")  # fmt: skip
    k.add_argument("--dropout", type=_probability, default=e.dropout)
    k.add_argument("--epochs", type=_positive(int), default=e.epochs)
    k.add_argument("--batch", type=_positive(int), default=e.batch)
    k.add_argument("--lr", type=_positive(float), default=e.lr)
    k.add_argument("--clip", type=_nonneg_float, default=e.clip, help="0: no clipping")
    k.add_argument("--min-freq", type=_positive(int), default=e.min_freq)
    k.add_argument("--max-vocab", type=int, default=e.max_vocab, help="0: no cut")
    k.add_argument("--max-len", type=int, default=e.max_len, help="cut texts to this many "
                   "tokens (0: no cut)")  # fmt: skip
    k.add_argument("--embeddings", default=None, help="GloVe-format word vectors (text)")
    k.add_argument("--val-fraction", type=_probability, default=e.val_fraction,
                   help="held out of --data when there is no --valid or test folder")  # fmt: skip
    k.add_argument("--seed", type=int, default=e.seed)
    k.add_argument("--time-limit", type=_nonneg_float, default=e.time_limit, metavar="SECONDS")
    k.add_argument("--json", default=None, metavar="FILE", help="write the run's summary here")
    k.add_argument("--quiet", action="store_true")

    q = sub.add_parser("seq2seq", help="train an encoder-decoder with attention",
                       description="Train a sequence-to-sequence model with attention. --data is "
                       "a source<TAB>target file (Tatoeba/Anki's layout); without it, the task is "
                       "dates as people write them to ISO 8601, made here.")  # fmt: skip
    from .models.seq2seq import Seq2SeqConfig

    z = Seq2SeqConfig()
    q.add_argument("--data", default=None, help="source<TAB>target per line")
    q.add_argument("--tokens", choices=["char", "word"], default=z.tokens)
    q.add_argument("--cell", choices=["lstm", "gru"], default=z.cell)
    q.add_argument(
        "--score",
        choices=["additive", "bilinear"],
        default=z.score,
        help="the attention's score (the dot scores need equal query and key sizes)",
    )
    q.add_argument("--input-feeding", action="store_true",
                   help="Luong's input feeding: h~ of each step goes into the next decoder input "
                   "(trains step by step)")  # fmt: skip
    q.add_argument("--embed", type=_positive(int), default=z.embed)
    q.add_argument("--hidden", type=_positive(int), default=z.hidden)
    q.add_argument("--layers", type=_positive(int), default=z.layers, help="encoder layers")
    q.add_argument("--epochs", type=_positive(int), default=z.epochs)
    q.add_argument("--batch", type=_positive(int), default=z.batch)
    q.add_argument("--lr", type=_positive(float), default=z.lr)
    q.add_argument("--clip", type=_nonneg_float, default=z.clip)
    q.add_argument("--pairs", type=_positive(int), default=z.pairs, help="dates task: pairs made")
    _decoding_arguments(q, z.beam, z.alpha)
    q.add_argument("--seed", type=int, default=z.seed)
    q.add_argument("--time-limit", type=_nonneg_float, default=z.time_limit, metavar="SECONDS")
    q.add_argument("--checkpoint", default=z.checkpoint, help="where to save the trained model")
    q.add_argument("--plot-attention", default=None, metavar="PNG",
                   help="draw the attention of 4 test examples (needs matplotlib)")  # fmt: skip
    q.add_argument("--json", default=None, metavar="FILE")
    q.add_argument("--quiet", action="store_true")

    r = sub.add_parser("translate", help="decode texts with a seq2seq checkpoint",
                       description="Decode each TEXT (or each line of stdin) with a model that "
                       "python -m rnnfast seq2seq saved; one output line per input.")  # fmt: skip
    r.add_argument("--checkpoint", required=True)
    r.add_argument("texts", nargs="*", metavar="TEXT")
    _decoding_arguments(r, z.beam, z.alpha)
    r.add_argument("--max-length", type=_positive(int), default=None,
                   help="most tokens to output (default: the checkpoint's)")  # fmt: skip
    r.add_argument("--plot-attention", default=None, metavar="PNG",
                   help="draw the attention of the first 4 texts (needs matplotlib)")  # fmt: skip

    g = sub.add_parser("digits", help="classify scikit-learn's digits as 8 rows of 8 pixels")
    g.add_argument("--cell", choices=["gru", "lstm"], default="gru")
    g.add_argument("--hidden", type=_positive(int), default=64)
    g.add_argument("--epochs", type=_positive(int), default=30)
    g.add_argument("--batch", type=_positive(int), default=32)
    g.add_argument("--lr", type=_positive(float), default=5e-3)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", default=None, metavar="FILE", help="write the result here")
    g.add_argument("--quiet", action="store_true")
    return p


def _decoding_arguments(parser, beam: int, alpha: float) -> None:
    parser.add_argument("--beam", type=_positive(int), default=beam,
                        help="beam size (1: greedy)")  # fmt: skip
    penalty = "GNMT length penalty ((5 + length) / 6) ** alpha; 0: none"
    parser.add_argument("--alpha", type=_nonneg_float, default=alpha, help=penalty)


def _write_json(path, data) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2, default=str)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .clip import NonFiniteError

    try:
        if args.command == "charlm":
            from .models.charlm import TrainConfig, train

            fields = set(TrainConfig.__dataclass_fields__)
            cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
            cfg.lr_decay = not args.no_lr_decay
            summary = train(cfg)
            if "rank" in summary:  # a --distributed worker: rank 0 reports
                return 0
            _write_json(args.json, summary)
            print(f"validation perplexity {summary['val_perplexity']:.3f} (unigram baseline "
                  f"{summary['unigram_perplexity']:.3f}) after {summary['steps']} steps in "
                  f"{summary['seconds']:.1f} s")  # fmt: skip
        elif args.command == "classify":
            from .models.classify import ClassifyConfig, DataError, train_classifier

            fields = set(ClassifyConfig.__dataclass_fields__)
            cfg = ClassifyConfig(**{k: v for k, v in vars(args).items() if k in fields})
            cfg.bidirectional = not args.unidirectional
            cfg.time_limit = args.time_limit or None
            try:
                result = train_classifier(cfg)
            except DataError as e:
                raise SystemExit(f"error: {e}") from e
            _write_json(args.json, result)
            print(result["report"])
            print(f"held-out accuracy {result['accuracy']:.4f} on {result['n_heldout']} texts "
                  f"(majority class {result['chance']:.4f}) after {result['epochs_run']} epochs "
                  f"in {result['seconds']:.1f} s")  # fmt: skip
        elif args.command == "seq2seq":
            from .models.seq2seq import DataError as PairsError
            from .models.seq2seq import Seq2SeqConfig, train_seq2seq

            fields = set(Seq2SeqConfig.__dataclass_fields__)
            cfg = Seq2SeqConfig(**{k: v for k, v in vars(args).items() if k in fields})
            cfg.time_limit = args.time_limit or None
            try:
                result = train_seq2seq(cfg)
            except PairsError as e:
                raise SystemExit(f"error: {e}") from e
            _write_json(args.json, result)
            for src, hyp, refs in result["examples"]:
                print(f"{src!r} -> {hyp!r} (reference{'s' * (len(refs) > 1)} "
                      f"{' | '.join(map(repr, refs))})")  # fmt: skip
            bleu = "BLEU n/a (pip install sacrebleu)" if result["bleu"] is None else (
                f"BLEU {result['bleu']:.2f}")  # fmt: skip
            print(f"test exact match {result['exact_match']:.4f} ({result['decoding']}; greedy "
                  f"{result['exact_match_greedy']:.4f}), {bleu}, token accuracy "
                  f"{result['token_accuracy']:.4f} on {result['n_test']} test sources after "
                  f"{result['epochs_run']} epochs in {result['seconds']:.1f} s")  # fmt: skip
            if cfg.checkpoint:
                print(f"saved {cfg.checkpoint}; decode with: python -m rnnfast translate "
                      f"--checkpoint {cfg.checkpoint} TEXT")  # fmt: skip
        elif args.command == "translate":
            from .models import seq2seq as s2s

            model, src_vocab, tgt_vocab, meta = s2s.load_model(args.checkpoint)
            if args.plot_attention:
                try:
                    s2s._pyplot()  # said before decoding, not after
                except s2s.DataError as e:
                    raise SystemExit(f"error: {e}") from e
            texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
            if not texts:
                raise SystemExit("error: no text to translate (give TEXT arguments or stdin lines)")
            try:
                outputs = s2s.translate(
                    model,
                    src_vocab,
                    tgt_vocab,
                    texts,
                    args.max_length or meta["max_len"],
                    args.beam,
                    args.alpha,
                )
            except ValueError as e:
                raise SystemExit(f"error: {e}") from e
            for ids in outputs:
                print(tgt_vocab.decode(ids))
            if args.plot_attention:
                s2s.plot_attention(args.plot_attention, model, src_vocab, tgt_vocab, texts[:4],
                                   outputs[:4])  # fmt: skip
        elif args.command == "sample":
            from .models.charlm import load_model, sample

            model, vocab, _ = load_model(args.checkpoint)
            try:
                text = sample(model, vocab, args.prime, args.length, args.temperature, args.seed)
            except ValueError as e:
                raise SystemExit(f"error: {e}") from e
            sys.stdout.write(args.prime + text + "\n")
        else:
            from .models.digits import train_digits

            result = train_digits(args.cell, args.hidden, args.epochs, args.batch, args.lr,
                                  args.seed, args.quiet)  # fmt: skip
            _write_json(args.json, result)
            print(f"{args.cell.upper()} digits: test accuracy {result['test_accuracy']:.4f} "
                  f"({result['n_test']} images), {result['seconds']:.1f} s")  # fmt: skip
    except (CheckpointError, NonFiniteError) as e:
        raise SystemExit(f"error: {e}") from e
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


def _reexec_with_quiet_threads() -> None:
    # NumPy's own OpenBLAS (for the head's matmuls) keeps worker threads that spin after each
    # call; on 2 cores they fought the kernels' OpenMP team and a training step took 3 to 10
    # times longer. It reads its thread count only when it loads (with the package, before this
    # module runs), so the command restarts itself once with a serial NumPy BLAS. The kernels'
    # own OpenBLAS is serial anyway (they parallelise with OpenMP, whose idle spin rnnfast keeps
    # short). A value set in the environment is respected.
    if os.name != "posix" or "OPENBLAS_NUM_THREADS" in os.environ:
        return
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    os.execve(sys.executable, [sys.executable, "-m", "rnnfast", *sys.argv[1:]], env)


if __name__ == "__main__":
    _reexec_with_quiet_threads()
    sys.exit(main())
