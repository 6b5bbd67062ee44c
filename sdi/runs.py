"""Run directories: everything the command line needs to rebuild a training run, and the pipeline steps on one.

A run directory holds ``run.json`` and ``checkpoints/``. ``run.json`` records the task name, generator arguments
and seeds, the :class:`~sdi.LoopedGPTConfig` and :class:`~sdi.TrainConfig`, and lists the checkpoints with their
learning rates, so featurizing and scoring need nothing but the directory::

    run = sdi.runs.train_run("runs/parity", task="parity", steps=500)
    store = sdi.runs.featurize_run(run, sketch_dim=4096)
    path, result = sdi.runs.influence_run(run)

The ``sdi`` command (:mod:`sdi.cli`) is argparse and printing around these functions.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import tasks
from .checkpoints import Checkpoint
from .featurize import featurize, query_features
from .influence import StepInfluence
from .model import LoopedGPT, LoopedGPTConfig
from .results import InfluenceResult, StreamTopK
from .sketch import DEFAULT_SKETCH_DIM
from .storage import write_json
from .store import FeatureStore
from .tasks import TaskDataset
from .train import TrainConfig, train

RUN_FILE = "run.json"
RUN_FORMAT = "sdi-run"
TASKS = {"parity": tasks.parity, "addition": tasks.addition, "variable_chains": tasks.variable_chains}
DEFAULT_TASK_ARGS = {"parity": {"n_bits": 6, "curriculum": True}, "addition": {"n_digits": 2},
                     "variable_chains": {"n_statements": 6, "max_hops": 3}}
TRAIN_ONLY_ARGS = {"curriculum"}  # generator arguments that shape the training distribution, not the queries


class RunError(ValueError):
    """A run directory or an argument for one cannot be used (the message says how to fix it)."""


@dataclass
class Run:
    """A training run rebuilt from its directory: model (at its initial weights), data, checkpoints."""

    path: Path
    spec: dict
    model: LoopedGPT
    train_data: TaskDataset
    query_data: TaskDataset
    checkpoints: list[Checkpoint]

    @property
    def store_dir(self) -> Path:
        """The run's default feature store."""
        return self.path / "store"


def make_dataset(task: str, kwargs: dict, flip: dict | None = None) -> TaskDataset:
    """Rebuild a dataset from its generator name and arguments (+ optional label flips)."""
    if task not in TASKS:
        raise RunError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    try:
        data = TASKS[task](**kwargs)
    except TypeError as e:
        raise RunError(f"task {task!r} does not take these arguments {kwargs}: {e}") from None
    if flip and flip.get("fraction", 0) > 0:
        data = data.flip_labels(fraction=flip["fraction"], seed=flip.get("seed", 0))
    return data


def load_run(path: str | os.PathLike) -> Run:
    """Read ``run.json`` and rebuild the model, the train and query sets and the checkpoint list."""
    root = Path(path)
    spec_path = root / RUN_FILE
    if not spec_path.is_file():
        raise RunError(f"{root} is not a run directory ({RUN_FILE} not found); make one with `sdi train --out {root}`")
    try:
        spec = json.loads(spec_path.read_text())
    except ValueError as e:
        raise RunError(f"{spec_path} is not valid JSON: {e}") from None
    if spec.get("format") != RUN_FORMAT:
        raise RunError(f"{spec_path} is not an sdi run description (format {spec.get('format')!r})")
    model = LoopedGPT(LoopedGPTConfig(**spec["model"]), seed=spec.get("model_seed", 0))
    checkpoints = []
    for c in spec["checkpoints"]:
        ckpt = root / c["path"]
        if not ckpt.is_file():
            raise RunError(f"checkpoint {ckpt} listed in {spec_path} is missing")
        checkpoints.append(Checkpoint(ckpt, c["step"], c["eta"]))
    if not checkpoints:
        raise RunError(f"{spec_path} lists no checkpoints")
    return Run(root, spec, model, make_dataset(spec["task"], spec["train_data"], spec.get("flip")),
               make_dataset(spec["task"], spec["query_data"]), checkpoints)


def train_run(out: str | os.PathLike, task: str = "parity", task_args: dict | None = None, n_train: int = 512,
              n_query: int = 16, flip_fraction: float = 0.0, data_seed: int = 0, d_model: int = 32, n_heads: int = 4,
              n_loops: int = 4, layers_per_loop: int = 1, steps: int = 500, batch_size: int = 64, lr: float = 3e-3,
              warmup: int = 50, checkpoints: int = 3, seed: int = 0, overwrite: bool = False,
              progress: bool = True) -> Run:
    """Train a LoopedGPT on a task and write the run directory ``out`` (``run.json`` + ``checkpoints/``)."""
    out = Path(out)
    if (out / RUN_FILE).exists() and not overwrite:
        raise RunError(f"{out} already holds a run ({RUN_FILE}); pass --overwrite or choose another --out")
    task_args = {**DEFAULT_TASK_ARGS.get(task, {}), **(task_args or {})}
    train_kwargs = {"n_examples": n_train, "seed": data_seed, **task_args}
    query_kwargs = {"n_examples": n_query, "seed": data_seed + 1,
                    **{k: v for k, v in task_args.items() if k not in TRAIN_ONLY_ARGS}}
    flip = {"fraction": flip_fraction, "seed": data_seed}
    train_data = make_dataset(task, train_kwargs, flip)
    query_data = make_dataset(task, query_kwargs)
    try:
        mcfg = LoopedGPTConfig(vocab_size=train_data.tokenizer.vocab_size, block_size=train_data.seq_len,
                               d_model=d_model, n_heads=n_heads, n_loops=n_loops, n_layers_per_loop=layers_per_loop)
        tcfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, n_checkpoints=checkpoints,
                           warmup_steps=min(warmup, steps), seed=seed)
    except ValueError as e:
        raise RunError(str(e)) from None
    model = LoopedGPT(mcfg, seed=seed)
    if (out / "checkpoints").is_dir():  # overwrite: no stale checkpoint of the previous run may survive
        shutil.rmtree(out / "checkpoints")
    result = train(model, train_data, tcfg, checkpoint_dir=out / "checkpoints", progress=progress)
    spec = {
        "format": RUN_FORMAT, "version": 1, "task": task, "train_data": train_kwargs, "query_data": query_kwargs,
        "flip": flip, "model": mcfg.to_dict(), "model_seed": seed, "train": dataclasses.asdict(tcfg),
        "checkpoints": [{"path": str(c.path.relative_to(out)), "step": c.step, "eta": c.lr} for c in result.checkpoints],
        "results": {"seconds": round(result.seconds, 2), "final_loss": result.losses[-1],
                    "train_accuracy": tasks.accuracy(model, train_data),
                    "query_accuracy": tasks.accuracy(model, query_data)},
    }
    write_json(out / RUN_FILE, spec)
    return load_run(out)


def resolve_device(choice: str) -> torch.device:
    """``auto``: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise RunError("--device cuda was asked for but CUDA is not available")
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    try:
        return torch.device(choice)
    except RuntimeError:
        raise RunError(f"--device must be auto, cpu, cuda or a torch device name, got {choice!r}") from None


def attribution(run: Run, sketch_dim: int | None, seed: int = 0, device: str | torch.device = "cpu") -> StepInfluence:
    """The run's :class:`~sdi.StepInfluence` (loop = ``model.block``, the task's answer loss)."""
    model = run.model.to(device)
    return StepInfluence(model, loop=model.block, loss_fn=tasks.loss_fn, sketch_dim=sketch_dim, seed=seed,
                         progress=False)


def featurize_run(run: Run, store_dir: str | os.PathLike | None = None, sketch_dim: int | None = DEFAULT_SKETCH_DIM,
                  sketch_seed: int = 0, chunk_size: int = 256, batch_size: int = 64, dtype: str = "float32",
                  device: str = "auto", progress: bool = True) -> FeatureStore:
    """The run's train features at every checkpoint into a store (resumable; joins torchrun's process group)."""
    dev = resolve_device(device)
    distributed = _init_distributed(dev)
    try:
        attr = attribution(run, sketch_dim, sketch_seed, dev)
        return featurize(Path(store_dir) if store_dir else run.store_dir, attr, run.train_data, run.checkpoints,
                         chunk_size=chunk_size, batch_size=batch_size, dtype=dtype, progress=progress,
                         meta={"sketch_dim": sketch_dim, "sketch_seed": sketch_seed})
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()


def _init_distributed(device: torch.device) -> bool:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1); NCCL on GPUs, gloo on CPUs."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def influence_run(run: Run, store_dir: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                  top_k: int | None = None, batch_size: int = 64, query_loops: int | None = None,
                  max_elements: int = 2 * 10**8, device: str = "auto",
                  progress: bool = True) -> tuple[Path, InfluenceResult | StreamTopK]:
    """The run's queries against its store -> a result ``.npz`` (full when it fits ``max_elements``, else top-k)."""
    st = FeatureStore.open(Path(store_dir) if store_dir else run.store_dir)
    meta = st.manifest.get("meta") or {}
    attr = attribution(run, meta.get("sketch_dim"), meta.get("sketch_seed", 0), resolve_device(device))
    qloss = tasks.loss_fn if query_loops is None else functools.partial(tasks.loss_fn, n_loops=query_loops)
    queries = query_features(attr, run.checkpoints, run.query_data.batches(batch_size), qloss, store=st)
    out = Path(out) if out else run.path / "influence.npz"
    Q, Tq = len(queries[0]), queries[0].n_steps
    if top_k is None and st.result_elements(Q, Tq) <= max_elements:
        result: InfluenceResult | StreamTopK = st.influence(queries, max_elements=max_elements, progress=progress)
    else:
        result = st.top_k(queries, k=min(top_k or 10, st.n), progress=progress)
    result.meta.update({**explorer_texts(run, query_loops), "task": run.spec["task"], "run": str(run.path),
                        "query_loops": query_loops})
    result.save(out)
    return out, result


def explorer_texts(run: Run, query_loops: int | None) -> dict[str, Any]:
    """Texts, labels and the final checkpoint's answer after every iteration (CPU, forward only)."""
    model = LoopedGPT(LoopedGPTConfig(**run.spec["model"]), seed=None)
    model.load_state_dict(run.checkpoints[-1].load_state_dict())
    return tasks.explorer_inputs(model, run.train_data, run.query_data, n_loops=query_loops)


def explore_result(result_path: str | os.PathLike, out: str | os.PathLike | None = None, k: int = 10) -> Path:
    """The self-contained explorer HTML of a full result file (needs the ``sdi_widgets`` package of this project)."""
    result_path = Path(result_path)
    if not result_path.is_file():
        raise RunError(f"result file not found: {result_path}")
    try:
        res = InfluenceResult.load(result_path)
    except ValueError as e:
        raise RunError(f"{e}. `sdi explore` needs a full result (`sdi influence` without --top-k)") from None
    try:
        from sdi_widgets import static  # optional: the explorer ships beside the library, not inside it
    except ImportError as e:
        raise RunError(f"the explorer export (sdi_widgets.static) is not available: {e}") from None
    meta = res.meta
    N, Q = res.sdi.shape[:2]
    train_texts = meta.get("train_texts") or [f"train #{i}" for i in range(N)]
    query_texts = meta.get("query_texts") or [f"query #{j}" for j in range(Q)]
    extras = {key: meta[key] for key in ("train_labels", "flipped", "query_answers", "query_truth") if meta.get(key)}
    out = Path(out) if out else result_path.with_suffix(".html")
    return Path(static.write_html(res, train_texts, query_texts, out, k=min(k, N), **extras))
