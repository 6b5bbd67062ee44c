"""The ``sdi`` command line: train, featurize, influence, verify, explore, demo.

    sdi train      --task parity --out runs/parity          a run directory: run.json + checkpoints/
    sdi featurize  runs/parity                              train features -> runs/parity/store (resumable)
    torchrun --nproc_per_node=4 -m sdi.cli featurize runs/parity      the same, sharded over 4 processes
    sdi influence  runs/parity                              queries vs the store -> runs/parity/influence.npz
    sdi verify     runs/parity                              check every chunk of the store against its CRC-32
    sdi explore    runs/parity/influence.npz                the static explorer HTML
    sdi demo                                                all of the above on parity, in minutes on a CPU

A run directory's ``run.json`` holds everything needed to rebuild the model and both datasets (task name,
generator arguments and seeds, ``LoopedGPTConfig``, ``TrainConfig``) and lists the checkpoints with their
learning rates, so ``featurize`` and ``influence`` need nothing but the run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from . import store as fstore
from . import tasks
from .influence import InfluenceResult, StepInfluence
from .model import LoopedGPT, LoopedGPTConfig
from .sketch import DEFAULT_SKETCH_DIM
from .tasks import TaskDataset
from .train import Checkpoint, TrainConfig, train

RUN_FILE = "run.json"
RUN_FORMAT = "sdi-run"
TASKS = {"parity": tasks.parity, "addition": tasks.addition, "variable_chains": tasks.variable_chains}
DEFAULT_TASK_ARGS = {"parity": {"n_bits": 6, "curriculum": True}, "addition": {"n_digits": 2},
                     "variable_chains": {"n_statements": 6, "max_hops": 3}}
TRAIN_ONLY_ARGS = {"curriculum"}  # generator arguments that shape the training distribution, not the queries
DEMO_SKETCH_DIM = 4096  # the demo model has ~12.7k loop parameters: a narrower sketch keeps its store small


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""


# ------------------------------------------------------------------------------------------ run directories

@dataclass
class Run:
    """A training run rebuilt from its directory: model (at its initial weights), data, checkpoints."""

    path: Path
    spec: dict
    model: LoopedGPT
    train_data: TaskDataset
    query_data: TaskDataset
    checkpoints: list[Checkpoint]


def make_dataset(task: str, kwargs: dict, flip: dict | None = None) -> TaskDataset:
    """Rebuild a dataset from its generator name and arguments (+ optional label flips)."""
    if task not in TASKS:
        raise CLIError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    try:
        data = TASKS[task](**kwargs)
    except TypeError as e:
        raise CLIError(f"task {task!r} does not take these arguments {kwargs}: {e}") from None
    if flip and flip.get("fraction", 0) > 0:
        data = data.flip_labels(fraction=flip["fraction"], seed=flip.get("seed", 0))
    return data


def load_run(path: str | os.PathLike) -> Run:
    """Read ``run.json`` and rebuild the model, the train and query sets and the checkpoint list."""
    root = Path(path)
    spec_path = root / RUN_FILE
    if not spec_path.is_file():
        raise CLIError(f"{root} is not a run directory ({RUN_FILE} not found); make one with `sdi train --out {root}`")
    try:
        spec = json.loads(spec_path.read_text())
    except ValueError as e:
        raise CLIError(f"{spec_path} is not valid JSON: {e}") from None
    if spec.get("format") != RUN_FORMAT:
        raise CLIError(f"{spec_path} is not an sdi run description (format {spec.get('format')!r})")
    model = LoopedGPT(LoopedGPTConfig(**spec["model"]), seed=spec.get("model_seed", 0))
    checkpoints = []
    for c in spec["checkpoints"]:
        ckpt = root / c["path"]
        if not ckpt.is_file():
            raise CLIError(f"checkpoint {ckpt} listed in {spec_path} is missing")
        checkpoints.append(Checkpoint(ckpt, c["step"], c["eta"]))
    if not checkpoints:
        raise CLIError(f"{spec_path} lists no checkpoints")
    return Run(root, spec, model, make_dataset(spec["task"], spec["train_data"], spec.get("flip")),
               make_dataset(spec["task"], spec["query_data"]), checkpoints)


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


def train_run(args: argparse.Namespace) -> Path:
    """``sdi train``: train a LoopedGPT on a task and write a run directory."""
    out = Path(args.out)
    if (out / RUN_FILE).exists() and not args.overwrite:
        raise CLIError(f"{out} already holds a run ({RUN_FILE}); pass --overwrite or choose another --out")
    task_args = {**DEFAULT_TASK_ARGS.get(args.task, {}), **_parse_task_args(args.task_arg)}
    train_kwargs = {"n_examples": args.n_train, "seed": args.data_seed, **task_args}
    query_kwargs = {"n_examples": args.n_query, "seed": args.data_seed + 1,
                    **{k: v for k, v in task_args.items() if k not in TRAIN_ONLY_ARGS}}
    flip = {"fraction": args.flip_fraction, "seed": args.data_seed}
    train_data = make_dataset(args.task, train_kwargs, flip)
    query_data = make_dataset(args.task, query_kwargs)
    try:
        mcfg = LoopedGPTConfig(vocab_size=train_data.tokenizer.vocab_size, block_size=train_data.seq_len,
                               d_model=args.d_model, n_heads=args.n_heads, n_loops=args.n_loops,
                               n_layers_per_loop=args.layers_per_loop)
        tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, n_checkpoints=args.checkpoints,
                           warmup_steps=min(args.warmup, args.steps), seed=args.seed)
    except ValueError as e:
        raise CLIError(str(e)) from None
    model = LoopedGPT(mcfg, seed=args.seed)
    if (out / "checkpoints").is_dir():  # --overwrite: no stale checkpoint of the previous run may survive
        shutil.rmtree(out / "checkpoints")
    result = train(model, train_data, tcfg, checkpoint_dir=out / "checkpoints", progress=not args.quiet)
    spec = {
        "format": RUN_FORMAT, "version": 1, "task": args.task, "train_data": train_kwargs, "query_data": query_kwargs,
        "flip": flip, "model": mcfg.to_dict(), "model_seed": args.seed, "train": dataclasses.asdict(tcfg),
        "checkpoints": [{"path": str(c.path.relative_to(out)), "step": c.step, "eta": c.lr} for c in result.checkpoints],
        "results": {"seconds": round(result.seconds, 2), "final_loss": result.losses[-1],
                    "train_accuracy": tasks.accuracy(model, train_data),
                    "query_accuracy": tasks.accuracy(model, query_data)},
    }
    fstore._write_json(out / RUN_FILE, spec)
    r = spec["results"]
    print(f"trained {args.task} in {r['seconds']:.1f} s: accuracy train {r['train_accuracy']:.3f}, "
          f"queries {r['query_accuracy']:.3f}; run directory {out}")
    return out


# ------------------------------------------------------------------------------------------ featurize / influence

def _device(choice: str) -> torch.device:
    """``auto``: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise CLIError("--device cuda was asked for but CUDA is not available")
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device(choice)


def _init_distributed(device: torch.device) -> bool:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1); NCCL on GPUs, gloo on CPUs."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def _attribution(run: Run, sketch_dim: int | None, seed: int, device: torch.device) -> StepInfluence:
    model = run.model.to(device)
    return StepInfluence(model, loop=model.block, loss_fn=tasks.loss_fn, sketch_dim=sketch_dim, seed=seed,
                         progress=False)


def featurize_run(args: argparse.Namespace) -> Path:
    """``sdi featurize``: train features of a run into a store (resumable; shardable with torchrun)."""
    run = load_run(args.run)
    store_dir = Path(args.store) if args.store else run.path / "store"
    device = _device(args.device)
    distributed = _init_distributed(device)
    sketch_dim = None if args.exact else args.sketch_dim
    try:
        attr = _attribution(run, sketch_dim, args.sketch_seed, device)
        start = time.perf_counter()
        st = fstore.featurize(store_dir, attr, run.train_data, run.checkpoints, chunk_size=args.chunk_size,
                              batch_size=args.batch_size, dtype=args.dtype, progress=not args.quiet,
                              meta={"sketch_dim": sketch_dim, "sketch_seed": args.sketch_seed})
        seconds = time.perf_counter() - start
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    if os.environ.get("RANK", "0") == "0":
        s = st.stats
        who = f" by rank 0 of {os.environ['WORLD_SIZE']}" if distributed else ""
        print(f"featurized {st.n} examples x {st.n_checkpoints} checkpoints (T={st.n_steps}, D={st.dim}, {st.dtype}) "
              f"into {store_dir} in {seconds:.1f} s: {s.computed} chunk(s) computed{who}, {s.reused} reused"
              + (f", {len(s.repaired)} repaired" if s.repaired else ""))
    return store_dir


def influence_run(args: argparse.Namespace) -> Path:
    """``sdi influence``: the run's queries against its store -> a result ``.npz``."""
    run = load_run(args.run)
    store_dir = Path(args.store) if args.store else run.path / "store"
    st = fstore.FeatureStore.open(store_dir)
    meta = st.manifest.get("meta") or {}
    attr = _attribution(run, meta.get("sketch_dim"), meta.get("sketch_seed", 0), _device(args.device))
    qloss = tasks.loss_fn if args.query_loops is None else functools.partial(tasks.loss_fn, n_loops=args.query_loops)
    queries = fstore.query_features(attr, run.checkpoints, run.query_data.batches(args.batch_size), qloss, store=st)
    out = Path(args.out) if args.out else run.path / "influence.npz"
    Q, Tq = len(queries[0]), queries[0].n_steps
    full = args.top_k is None and st.result_elements(Q, Tq) <= args.max_elements
    texts = {**explorer_inputs(run, args.query_loops), "task": run.spec["task"], "run": str(run.path),
             "query_loops": args.query_loops}
    if full:
        res = st.influence(queries, max_elements=args.max_elements, progress=not args.quiet)
        res.meta.update(texts)
        res.save(out)
        what = f"full result: sdi {tuple(res.sdi.shape)} (N, Q, T_query), conservation error {res.conservation_error():.1e}"
    else:
        top = st.top_k(queries, k=min(args.top_k or 10, st.n), progress=not args.quiet)
        top.meta.update(texts)
        top.save(out)
        what = f"streaming top-{top.sdi_indices.shape[-1]} per (query, step)"
    print(f"influence of {st.n} training examples on {Q} queries ({what}) -> {out}")
    return out


def explorer_inputs(run: Run, query_loops: int | None) -> dict[str, Any]:
    """Texts, labels and the final checkpoint's answer after every iteration, for the explorer (CPU, forward only)."""
    from sdi_widgets import explorer_inputs as inputs

    model = LoopedGPT(LoopedGPTConfig(**run.spec["model"]), seed=None)
    model.load_state_dict(run.checkpoints[-1].load_state_dict())
    return inputs(model, run.train_data, run.query_data, n_loops=query_loops)


def explore_result(args: argparse.Namespace) -> Path:
    """``sdi explore``: the self-contained explorer HTML of a full result file."""
    result_path = Path(args.result)
    if not result_path.is_file():
        raise CLIError(f"result file not found: {result_path}")
    try:
        res = InfluenceResult.load(result_path)
    except ValueError as e:
        raise CLIError(f"{e}. `sdi explore` needs a full result (`sdi influence` without --top-k)") from None
    out = Path(args.out) if args.out else result_path.with_suffix(".html")
    try:
        from sdi_widgets import static
    except ImportError as e:
        raise CLIError(f"the explorer export (sdi_widgets.static) is not available: {e}") from None
    meta = res.meta
    N, Q = res.sdi.shape[:2]
    train_texts = meta.get("train_texts") or [f"train #{i}" for i in range(N)]
    query_texts = meta.get("query_texts") or [f"query #{j}" for j in range(Q)]
    extras = {key: meta[key] for key in ("train_labels", "flipped", "query_answers", "query_truth") if meta.get(key)}
    path = static.write_html(res, train_texts, query_texts, out, k=min(args.k, N), **extras)
    print(f"explorer written to {path}")
    return Path(path)


def verify_store(args: argparse.Namespace) -> int:
    """``sdi verify``: check every chunk file of a store against the CRC-32 and size its manifest records."""
    path = Path(args.store)
    if (path / RUN_FILE).is_file():  # a run directory: its default store
        path = path / "store"
    st = fstore.FeatureStore.open(path)
    problems = st.verify(progress=not args.quiet)
    files = st.n_checkpoints * st.n_chunks
    if problems:
        listing = "\n  ".join(problems)
        raise CLIError(f"{len(problems)} of {files} chunk file(s) in {path} are damaged or missing:\n  {listing}\n"
                       "rerun `sdi featurize` with the same arguments to recompute exactly these")
    print(f"{path}: all {files} chunk file(s) intact ({st.n} examples x {st.n_checkpoints} checkpoint(s))")
    return files


def demo(args: argparse.Namespace) -> Path:
    """``sdi demo``: train, featurize, influence and explore on the default parity task."""
    start = time.perf_counter()
    out = Path(args.out)
    args.overwrite = True
    train_run(args)
    ns = argparse.Namespace(run=out, store=None, device=args.device, sketch_dim=args.sketch_dim, exact=args.exact,
                            sketch_seed=args.sketch_seed, chunk_size=args.chunk_size, batch_size=args.batch_size_features,
                            dtype=args.dtype, quiet=args.quiet, query_loops=args.query_loops, out=None, top_k=None,
                            max_elements=args.max_elements)
    if (out / "store").exists():
        shutil.rmtree(out / "store")
    featurize_run(ns)
    result = influence_run(ns)
    html = explore_result(argparse.Namespace(result=result, out=out / "explorer.html", k=10))
    print(f"demo finished in {time.perf_counter() - start:.1f} s; open {html}")
    return html


# ------------------------------------------------------------------------------------------ argparse

def _train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task and data")
    g.add_argument("--task", choices=sorted(TASKS), default="parity", help="algorithmic task (default: parity)")
    g.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="generator argument, repeatable, e.g. --task-arg n_bits=8 (defaults: "
                        + "; ".join(f"{t}: {a}" for t, a in DEFAULT_TASK_ARGS.items()) + ")")
    g.add_argument("--n-train", type=int, default=512, help="training examples (default 512)")
    g.add_argument("--n-query", type=int, default=16, help="query (test) examples (default 16)")
    g.add_argument("--flip-fraction", type=float, default=0.0, help="fraction of training labels to corrupt")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the training set; queries use seed + 1")
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=int, default=32)
    g.add_argument("--n-heads", type=int, default=4)
    g.add_argument("--n-loops", type=int, default=4, help="tau: loop iterations in training (default 4)")
    g.add_argument("--layers-per-loop", type=int, default=1)
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=500)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    g.add_argument("--checkpoints", type=int, default=3, help="checkpoints for TracIn (default 3)")
    g.add_argument("--seed", type=int, default=0, help="model initialisation and batch order")


def _featurize_options(p: argparse.ArgumentParser, batch_flag: str = "--batch-size",
                       sketch_dim: int = DEFAULT_SKETCH_DIM) -> None:
    g = p.add_argument_group("features")
    g.add_argument("--sketch-dim", type=int, default=sketch_dim,
                   help=f"TensorSketch width m per example and step (default {sketch_dim})")
    g.add_argument("--exact", action="store_true",
                   help="store exact per-example gradients (P floats per example and step) instead of sketches")
    g.add_argument("--sketch-seed", type=int, default=0, help="seed of the sketch")
    g.add_argument("--chunk-size", type=int, default=256, help="examples per chunk file (default 256)")
    g.add_argument(batch_flag, type=int, default=64, dest="batch_size" if batch_flag == "--batch-size"
                   else "batch_size_features", help="examples per forward/backward pass (default 64)")
    g.add_argument("--dtype", choices=sorted(fstore.STORAGE_DTYPES), default="float32",
                   help="storage precision (default float32)")


def _influence_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("influence")
    g.add_argument("--query-loops", type=int, default=None,
                   help="run the queries with this many iterations (test-time compute; default: as trained)")
    g.add_argument("--max-elements", type=int, default=2 * 10**8,
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
    p.set_defaults(func=train_run)

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
    p.set_defaults(func=featurize_run)

    p = sub.add_parser("influence", parents=[common, device], help="queries against a store -> result .npz",
                       description="Influence of every stored training example on the run's queries. Writes a full "
                       "InfluenceResult .npz (sdi, train_sdi, tracin, ...) when it fits --max-elements, otherwise "
                       "(or with --top-k) a streaming top-k .npz.")
    p.add_argument("run", help="run directory")
    p.add_argument("--store", default=None, help="store directory (default RUN/store)")
    p.add_argument("--out", default=None, help="result file (default RUN/influence.npz)")
    p.add_argument("--top-k", type=int, default=None, help="write only the top-k per (query, step) (streaming)")
    p.add_argument("--batch-size", type=int, default=64, help="queries per forward/backward pass")
    _influence_options(p)
    p.set_defaults(func=influence_run)

    p = sub.add_parser("verify", parents=[common], help="check a store's chunk files against their checksums",
                       description="Read every chunk file of a feature store and check it against the CRC-32 and "
                       "size in its manifest. Exit code 1 lists what is damaged or missing (`sdi featurize` "
                       "recomputes exactly those).")
    p.add_argument("store", help="store directory, or a run directory (then RUN/store)")
    p.set_defaults(func=verify_store)

    p = sub.add_parser("explore", help="write the static explorer HTML of a result file",
                       description="Write a self-contained HTML explorer (no network) for a full result .npz.")
    p.add_argument("result", help="result .npz from `sdi influence`")
    p.add_argument("--out", default=None, help="HTML file (default: next to the result)")
    p.add_argument("--k", type=int, default=10, help="training examples per ranking (default 10)")
    p.set_defaults(func=explore_result)

    p = sub.add_parser("demo", parents=[common, device], help="train + featurize + influence + explore on parity",
                       description="The whole pipeline on the default parity task, in a few minutes on a CPU.")
    p.add_argument("--out", default="sdi-demo", help="run directory (default ./sdi-demo; replaced)")
    _train_options(p)
    _featurize_options(p, batch_flag="--feature-batch-size", sketch_dim=DEMO_SKETCH_DIM)
    _influence_options(p)
    p.set_defaults(func=demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sdi`` command; returns the exit code (0 success, 1 failure, 2 usage error)."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CLIError, fstore.StoreError, FileNotFoundError, NotImplementedError, ValueError) as e:
        print(f"sdi {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
