"""The ``sdi`` command line: train, featurize, influence, verify, explore, demo.

    sdi train      --task parity --out runs/parity          a run directory: run.json + checkpoints/
    sdi featurize  runs/parity                              train features -> runs/parity/store (resumable)
    torchrun --nproc_per_node=4 -m sdi.cli featurize runs/parity      the same, sharded over 4 processes
    sdi influence  runs/parity                              queries vs the store -> runs/parity/influence.npz
    sdi verify     runs/parity                              check every chunk of the store against its CRC-32
    sdi explore    runs/parity/influence.npz                the static explorer HTML
    sdi demo                                                all of the above on parity, in about 20 s on a CPU

This module is argparse and printing only; the run-directory format and the steps are :mod:`sdi.runs`.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

from . import runs
from .runs import DEFAULT_TASK_ARGS, TASKS, load_run
from .influence import MAX_SKETCH_DIM
from .sketch import DEFAULT_SKETCH_DIM
from .storage import STORAGE_DTYPES, StoreError
from .store import FeatureStore

DEMO_SKETCH_DIM = 4096  # the demo model has ~12.7k loop parameters: a narrower sketch keeps its store small


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""


def _int_at_least(low: int, high: int | None = None):
    """An argparse type: an int in ``[low, high]`` (argparse names the flag in its error, exit code 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}" + (f" and <= {high}" if high else "")
                                             + f", got {value}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


positive = _int_at_least(1)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


OS_ERRORS = {  # errno -> (what happened, what to do)
    errno.ENOSPC: ("no space left on the device", "free some space"),
    errno.EDQUOT: ("disk quota exceeded", "free some space"),
    errno.EROFS: ("read-only file system", "choose a writable location (--out / --store)"),
    errno.EFBIG: ("file too large for the file system or `ulimit -f`", "raise the limit or use a smaller "
                  "--chunk-size"),
    errno.EACCES: ("permission denied", "choose a location you may write to"),
    errno.EPERM: ("operation not permitted", "choose a location you may write to"),
}


def os_error_line(e: OSError) -> str:
    """One line for an operating-system failure: what, which file, and the remedy (nothing written is lost)."""
    if e.errno not in OS_ERRORS:
        return str(e) if e.errno is None else f"{e.strerror or e}: {e.filename or '(no file name)'}"
    what, remedy = OS_ERRORS[e.errno]
    return f"{what} writing {e.filename or '(no file name)'}; {remedy}, then rerun the same command to resume"


def _parse_task_args(items: Sequence[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--task-arg expects KEY=VALUE (e.g. n_bits=8), got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _train_kwargs(args: argparse.Namespace) -> dict:
    return dict(task=args.task, task_args=_parse_task_args(args.task_arg), n_train=args.n_train, n_query=args.n_query,
                flip_fraction=args.flip_fraction, data_seed=args.data_seed, d_model=args.d_model, n_heads=args.n_heads,
                n_loops=args.n_loops, layers_per_loop=args.layers_per_loop, steps=args.steps,
                batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, checkpoints=args.checkpoints,
                seed=args.seed, progress=not args.quiet)


def train_command(args: argparse.Namespace, overwrite: bool | None = None) -> runs.Run:
    """``sdi train``."""
    run = runs.train_run(args.out, overwrite=args.overwrite if overwrite is None else overwrite, **_train_kwargs(args))
    r = run.spec["results"]
    print(f"trained {run.spec['task']} in {r['seconds']:.1f} s: accuracy train {r['train_accuracy']:.3f}, "
          f"queries {r['query_accuracy']:.3f}; run directory {run.path}")
    return run


def featurize_command(args: argparse.Namespace) -> FeatureStore:
    """``sdi featurize``."""
    run = load_run(args.run)
    start = time.perf_counter()
    st = runs.featurize_run(run, args.store, sketch_dim=None if args.exact else args.sketch_dim,
                            sketch_seed=args.sketch_seed, chunk_size=args.chunk_size, batch_size=args.batch_size,
                            dtype=args.dtype, device=args.device, progress=not args.quiet)
    seconds = time.perf_counter() - start
    if os.environ.get("RANK", "0") == "0":
        s = st.stats
        world = int(os.environ.get("WORLD_SIZE", "1"))
        who = f" by rank 0 of {world}" if world > 1 else ""
        print(f"featurized {st.n} examples x {st.n_checkpoints} checkpoints (T={st.n_steps}, D={st.dim}, {st.dtype}) "
              f"into {st.root} in {seconds:.1f} s: {s.computed} chunk(s) computed{who}, {s.reused} reused"
              + (f", {len(s.repaired)} repaired" if s.repaired else ""))
    return st


def influence_command(args: argparse.Namespace) -> Path:
    """``sdi influence``."""
    run = load_run(args.run)
    out, result = runs.influence_run(run, args.store, args.out, top_k=args.top_k, batch_size=args.batch_size,
                                     query_loops=args.query_loops, max_elements=args.max_elements,
                                     device=args.device, progress=not args.quiet)
    if hasattr(result, "sdi"):
        what = (f"full result: sdi {tuple(result.sdi.shape)} (N, Q, T_query), conservation error "
                f"{result.conservation_error():.1e}")
    else:
        what = f"streaming top-{result.k} per (query, step)"
    if "predicted_relative_error" in result.meta:
        what += (f"; predicted relative error of the top-10 TracIn scores "
                 f"{result.meta['predicted_relative_error']:.3f}")
    print(f"influence of {len(result.meta['train_texts'])} training examples on "
          f"{len(result.meta['query_texts'])} queries ({what}) -> {out}")
    return out


def explore_command(args: argparse.Namespace) -> Path:
    """``sdi explore``."""
    path = runs.explore_result(args.result, args.out, k=args.k)
    print(f"explorer written to {path}")
    return path


def verify_command(args: argparse.Namespace) -> int:
    """``sdi verify``: check every chunk file of a store against the CRC-32 and size its manifest records."""
    path = Path(args.store)
    if (path / runs.RUN_FILE).is_file():  # a run directory: its default store
        path = path / "store"
    st = FeatureStore.open(path)
    problems = st.verify(progress=not args.quiet)
    files = st.n_checkpoints * st.n_chunks
    if problems:
        listing = "\n  ".join(problems)
        raise CLIError(f"{len(problems)} of {files} chunk file(s) in {path} are damaged or missing:\n  {listing}\n"
                       "rerun `sdi featurize` with the same arguments to recompute exactly these")
    print(f"{path}: all {files} chunk file(s) intact ({st.n} examples x {st.n_checkpoints} checkpoint(s))")
    return files


def demo_command(args: argparse.Namespace) -> Path:
    """``sdi demo``: train, featurize, influence and explore on the default parity task."""
    start = time.perf_counter()
    run = train_command(args, overwrite=True)
    args.run, args.store, args.batch_size, args.out, args.top_k = run.path, None, args.batch_size_features, None, None
    featurize_command(args)
    influence_command(args)
    html = runs.explore_result(run.path / "influence.npz", run.path / "explorer.html", k=10)
    print(f"demo finished in {time.perf_counter() - start:.1f} s; open {html}")
    return html


# ------------------------------------------------------------------------------------------ argparse

def _train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task and data")
    g.add_argument("--task", choices=sorted(TASKS), default="parity", help="algorithmic task (default: parity)")
    g.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="generator argument, repeatable, e.g. --task-arg n_bits=8 (defaults: "
                        + "; ".join(f"{t}: {a}" for t, a in DEFAULT_TASK_ARGS.items()) + ")")
    g.add_argument("--n-train", type=positive, default=512, help="training examples (default 512)")
    g.add_argument("--n-query", type=positive, default=16, help="query (test) examples (default 16)")
    g.add_argument("--flip-fraction", type=_fraction, default=0.0, help="fraction of training labels to corrupt")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the training set; queries use seed + 1")
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=positive, default=32)
    g.add_argument("--n-heads", type=positive, default=4)
    g.add_argument("--n-loops", type=positive, default=4, help="tau: loop iterations in training (default 4)")
    g.add_argument("--layers-per-loop", type=positive, default=1)
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=positive, default=500)
    g.add_argument("--batch-size", type=positive, default=64)
    g.add_argument("--lr", type=_positive_float, default=3e-3)
    g.add_argument("--warmup", type=_int_at_least(0), default=50, help="warm-up steps")
    g.add_argument("--checkpoints", type=positive, default=3, help="checkpoints for TracIn (default 3)")
    g.add_argument("--seed", type=int, default=0, help="model initialisation and batch order")


def _featurize_options(p: argparse.ArgumentParser, batch_flag: str = "--batch-size",
                       sketch_dim: int = DEFAULT_SKETCH_DIM) -> None:
    g = p.add_argument_group("features")
    g.add_argument("--sketch-dim", type=_int_at_least(2, MAX_SKETCH_DIM), default=sketch_dim,
                   help=f"TensorSketch width m per example and step (default {sketch_dim})")
    g.add_argument("--exact", action="store_true",
                   help="store exact per-example gradients (P floats per example and step) instead of sketches")
    g.add_argument("--sketch-seed", type=int, default=0, help="seed of the sketch")
    g.add_argument("--chunk-size", type=positive, default=256, help="examples per chunk file (default 256)")
    g.add_argument(batch_flag, type=positive, default=64, dest="batch_size" if batch_flag == "--batch-size"
                   else "batch_size_features", help="examples per forward/backward pass (default 64)")
    g.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), default="float32",
                   help="storage precision (default float32)")


def _influence_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("influence")
    g.add_argument("--query-loops", type=positive, default=None,
                   help="run the queries with this many iterations (test-time compute; default: as trained)")
    g.add_argument("--max-elements", type=positive, default=2 * 10**8,
                   help="largest full result (floats) before falling back to streaming top-k")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdi", description="Step-resolved training-data attribution for looped "
                                     "transformers.", epilog="Run `sdi COMMAND --help` for the options of a command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("train", parents=[common], help="train a looped transformer, write a run directory",
                       description="Train a LoopedGPT on an algorithmic task; write RUN/run.json and RUN/checkpoints/.")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    _train_options(p)
    p.set_defaults(func=train_command)

    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if CUDA is available, else cpu), "
                        "cpu, cuda")

    p = sub.add_parser("featurize", parents=[common, device], help="train features into an on-disk store",
                       description="Compute the run's train features at every checkpoint into a chunked store. "
                       "Resumable: rerun the same command after a crash. Shard it over processes or machines with "
                       "`torchrun --nproc_per_node=G [--nnodes=M ...] -m sdi.cli featurize RUN`.")
    p.add_argument("run", help="run directory (from `sdi train`)")
    p.add_argument("--store", default=None, help="store directory (default RUN/store)")
    _featurize_options(p)
    p.set_defaults(func=featurize_command)

    p = sub.add_parser("influence", parents=[common, device], help="queries against a store -> result .npz",
                       description="Influence of every stored training example on the run's queries. Writes a full "
                       "InfluenceResult .npz (sdi, train_sdi, tracin, ...) when it fits --max-elements, otherwise "
                       "(or with --top-k) a streaming top-k .npz.")
    p.add_argument("run", help="run directory")
    p.add_argument("--store", default=None, help="store directory (default RUN/store)")
    p.add_argument("--out", default=None, help="result file (default RUN/influence.npz)")
    p.add_argument("--top-k", type=positive, default=None, help="write only the top-k per (query, step) (streaming)")
    p.add_argument("--batch-size", type=positive, default=64, help="queries per forward/backward pass")
    _influence_options(p)
    p.set_defaults(func=influence_command)

    p = sub.add_parser("verify", parents=[common], help="check a store's chunk files against their checksums",
                       description="Read every chunk file of a feature store and check it against the CRC-32 and "
                       "size in its manifest. Exit code 1 lists what is damaged or missing (`sdi featurize` "
                       "recomputes exactly those).")
    p.add_argument("store", help="store directory, or a run directory (then RUN/store)")
    p.set_defaults(func=verify_command)

    p = sub.add_parser("explore", help="write the static explorer HTML of a result file",
                       description="Write a self-contained HTML explorer (no network) for a full result .npz.")
    p.add_argument("result", help="result .npz from `sdi influence`")
    p.add_argument("--out", default=None, help="HTML file (default: next to the result)")
    p.add_argument("--k", type=positive, default=10, help="training examples per ranking (default 10)")
    p.set_defaults(func=explore_command)

    p = sub.add_parser("demo", parents=[common, device], help="train + featurize + influence + explore on parity",
                       description="The whole pipeline on the default parity task, in about 20 s on a 2-core CPU.")
    p.add_argument("--out", default="sdi-demo", help="run directory (default ./sdi-demo; replaced)")
    _train_options(p)
    _featurize_options(p, batch_flag="--feature-batch-size", sketch_dim=DEMO_SKETCH_DIM)
    _influence_options(p)
    p.set_defaults(func=demo_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sdi`` command; returns the exit code (0 success, 1 failure, 2 usage error)."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():             # a warning is one line, like an error, not a source excerpt
            warnings.showwarning = lambda message, *_, **__: print(
                f"sdi {args.command}: warning: {str(message).removeprefix('sdi: ')}", file=sys.stderr)
            args.func(args)
    except KeyboardInterrupt:
        print(f"sdi {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 1
    except (CLIError, StoreError, NotImplementedError, ValueError) as e:
        print(f"sdi {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # FileNotFoundError of a missing input included
        print(f"sdi {args.command}: error: {os_error_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
