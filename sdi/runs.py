"""Run directories: everything the command line needs to rebuild a training run, and the pipeline steps on one.

A run directory holds ``run.json`` and ``checkpoints/``. ``run.json`` records the task name, generator arguments
and seeds, the :class:`~sdi.LoopedGPTConfig` and :class:`~sdi.TrainConfig`, and lists the checkpoints with their
learning rates, so featurizing and scoring need nothing but the directory. It is also the ledger of what the
commands wrote there (``written``: files, ``stores``: feature stores): ``--overwrite`` removes exactly those and
never a file of the user's; a folder that holds the user's files and no run is not written into without it::

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
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import tasks
from .checkpoints import Checkpoint, load_checkpoint
from .featurize import check_training_data, featurize, query_features
from .files import remove_stale_temporaries
from .influence import StepInfluence
from .model import LoopedGPT, LoopedGPTConfig
from .results import InfluenceResult, StreamTopK
from .sketch import DEFAULT_SKETCH_DIM
from .storage import write_json
from .manifest import store_files
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


def read_spec(root: Path) -> dict:
    """``run.json`` of the run directory ``root``, or a RunError saying what is wrong with it."""
    spec_path = root / RUN_FILE
    if not spec_path.is_file():
        raise RunError(f"{root} is not a run directory ({RUN_FILE} not found); make one with `sdi train --out {root}`")
    try:
        spec = json.loads(spec_path.read_bytes())
    except (OSError, ValueError) as e:
        raise RunError(f"{spec_path} is not valid JSON ({e}); retrain with `sdi train --out {root} --overwrite`"
                       ) from None
    if not isinstance(spec, dict) or spec.get("format") != RUN_FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise RunError(f"{spec_path} is not an sdi run description (format {found!r})")
    return spec


def load_run(path: str | os.PathLike) -> Run:
    """Read ``run.json`` and rebuild the model, the train and query sets and the checkpoint list."""
    root = Path(path)
    spec = read_spec(root)
    spec_path = root / RUN_FILE
    if spec.get("status") == "training":
        raise RunError(f"the training of {root} did not finish (interrupted?); rerun `sdi train --out {root}` with "
                       "the same arguments")
    try:
        model = LoopedGPT(LoopedGPTConfig(**spec["model"]), seed=spec.get("model_seed", 0))
        checkpoints = [Checkpoint(root / c["path"], int(c["step"]), float(c["eta"])) for c in spec["checkpoints"]]
        data = (make_dataset(spec["task"], spec["train_data"], spec.get("flip")),
                make_dataset(spec["task"], spec["query_data"]))
    except RunError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"field {e}" if isinstance(e, KeyError) else f"a field ({type(e).__name__}: {e})"
        raise RunError(f"{spec_path} is missing or has an invalid {what}; retrain with `sdi train --out {root} "
                       "--overwrite`") from None
    if not checkpoints:
        raise RunError(f"{spec_path} lists no checkpoints")
    for c in checkpoints:
        check_checkpoint_file(c.path, spec_path)
    return Run(root, spec, model, *data, checkpoints)


def check_checkpoint_file(path: Path, listed_in: Path) -> None:
    """A RunError naming ``path`` unless it is a readable checkpoint with finite weights."""
    if not path.is_file():
        raise RunError(f"checkpoint {path} listed in {listed_in} is missing")
    try:
        state = load_checkpoint(path)["state_dict"]
    except Exception as e:  # noqa: BLE001 - truncated, empty or foreign: torch raises many kinds
        why = (str(e).strip().splitlines() or [""])[0][:160]
        raise RunError(f"checkpoint {path} cannot be read ({type(e).__name__}: {why}); it is truncated or damaged: "
                       f"retrain with `sdi train --out {listed_in.parent} --overwrite`") from None
    for name, t in state.items():
        if not torch.is_tensor(t) or (t.is_floating_point() and not bool(torch.isfinite(t).all())):
            raise RunError(f"checkpoint {path} holds non-finite weights (NaN or inf in {name!r}); the training "
                           "diverged or the file is damaged: retrain with a lower --lr")


# ------------------------------------------------------------------------------------------ the ledger

def _relative(root: Path, path: Path) -> str | None:
    """``path`` relative to ``root`` when it lies inside it (None otherwise)."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(os.path.abspath(root)))
    except ValueError:
        return None


def record_written(root: Path, path: Path, key: str = "written") -> None:
    """Add ``path`` (a file, or with ``key="stores"`` a feature store) to the run's ledger when it lies inside."""
    rel = _relative(root, path)
    spec = read_spec(root)
    if rel is not None and rel not in spec.setdefault(key, []):
        spec[key].append(rel)
        write_json(root / RUN_FILE, spec)


def written_by_sdi(root: Path, path: Path) -> bool:
    """Whether ``path`` is a file the run's ledger says sdi wrote (False for a folder that is no run)."""
    try:
        spec = read_spec(root)
    except RunError:
        return False
    return _relative(root, path) in spec.get("written", [])


def refuse_foreign_file(root: Path, path: Path, flag: str) -> None:
    """Never replace a file the user made: RunError if ``path`` exists and the run's ledger does not list it."""
    if path.exists() and not written_by_sdi(root, path):
        raise RunError(f"{path} exists and was not written by sdi; move it or choose another {flag}")


def _prepare_out(out: Path, overwrite: bool, planned: list[str]) -> None:
    """Make ``out`` ready for a new run; removes only files its ledger lists (``--overwrite``)."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} exists and is not a directory")
    spec = read_spec(out) if (out / RUN_FILE).exists() else None
    unfinished = spec is not None and spec.get("status") == "training"  # a killed `sdi train`: its own files only
    if spec is not None and not (overwrite or unfinished):
        raise RunError(f"{out} already holds a run ({RUN_FILE}); pass --overwrite or choose another --out")
    if spec is None and out.is_dir() and any(out.iterdir()) and not overwrite:
        names = sorted(p.name for p in out.iterdir())[:3]
        raise RunError(f"--out {out} is not empty (it holds {names}) and holds no run; choose an empty or new "
                       "directory, or pass --overwrite to write the run beside these files (none is removed)")
    ours = set(spec.get("written", [])) if spec else set()
    clash = [rel for rel in planned if (out / rel).exists() and rel not in ours]
    if clash:
        raise RunError(f"{out / clash[0]} exists and was not written by sdi; move it or choose another --out")
    if spec is None:
        return
    for root in _ledger_paths(out, spec, "stores"):
        for f in store_files(root):
            f.unlink(missing_ok=True)
        for d in sorted(root.glob("ckpt_*")) + [root]:
            _rmdir_if_empty(d)
    for path in _ledger_paths(out, spec, "written"):
        if path.is_file():
            path.unlink()
    _rmdir_if_empty(out / "checkpoints")
    (out / RUN_FILE).unlink()


def _ledger_paths(out: Path, spec: dict, key: str) -> list[Path]:
    """The ledger's ``key`` entries that lie inside ``out`` (a hand-edited entry pointing outside is ignored)."""
    return [out / rel for rel in spec.get(key, []) if _relative(out, out / rel) is not None]


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty (the user's files) or absent


def train_run(out: str | os.PathLike, task: str = "parity", task_args: dict | None = None, n_train: int = 512,
              n_query: int = 16, flip_fraction: float = 0.0, data_seed: int = 0, d_model: int = 32, n_heads: int = 4,
              n_loops: int = 4, layers_per_loop: int = 1, steps: int = 500, batch_size: int = 64, lr: float = 3e-3,
              warmup: int = 50, checkpoints: int = 3, seed: int = 0, overwrite: bool = False,
              progress: bool = True) -> Run:
    """Train a LoopedGPT on a task and write the run directory ``out`` (``run.json`` + ``checkpoints/``)."""
    out = Path(out)
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
    # the names sdi.train.train gives its checkpoints: recorded before training, so a kill leaves a ledger
    planned = [f"checkpoints/ckpt_{s:06d}.pt"
               for s in sorted({round(steps * (k + 1) / checkpoints) for k in range(checkpoints)})]
    _prepare_out(out, overwrite, planned)
    base = {"format": RUN_FORMAT, "version": 1, "task": task, "train_data": train_kwargs, "query_data": query_kwargs,
            "flip": flip, "model": mcfg.to_dict(), "model_seed": seed, "train": dataclasses.asdict(tcfg)}
    write_json(out / RUN_FILE, {**base, "status": "training", "written": planned, "stores": []})
    for rel in planned:
        remove_stale_temporaries(out / rel)
    model = LoopedGPT(mcfg, seed=seed)
    result = train(model, train_data, tcfg, checkpoint_dir=out / "checkpoints", progress=progress)
    paths = [str(c.path.relative_to(out)) for c in result.checkpoints]
    spec = {**base,
            "checkpoints": [{"path": p, "step": c.step, "eta": c.lr} for p, c in zip(paths, result.checkpoints)],
            "results": {"seconds": round(result.seconds, 2), "final_loss": result.losses[-1],
                        "train_accuracy": tasks.accuracy(model, train_data),
                        "query_accuracy": tasks.accuracy(model, query_data)},
            "written": sorted(set(planned) | set(paths)), "stores": []}
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
    root = Path(store_dir) if store_dir else run.store_dir
    distributed = _init_distributed(dev)
    try:
        attr = attribution(run, sketch_dim, sketch_seed, dev)
        if int(os.environ.get("RANK", "0")) == 0 and _relative(run.path, root) is not None:
            record_written(run.path, root, "stores")  # before the first chunk: a kill leaves it in the ledger
        return featurize(root, attr, run.train_data, run.checkpoints,
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
    check_training_data(st, run.train_data)
    meta = st.manifest.get("meta") or {}
    attr = attribution(run, meta.get("sketch_dim"), meta.get("sketch_seed", 0), resolve_device(device))
    qloss = tasks.loss_fn if query_loops is None else functools.partial(tasks.loss_fn, n_loops=query_loops)
    queries = query_features(attr, run.checkpoints, run.query_data.batches(batch_size), qloss, store=st)
    out = Path(out) if out else run.path / "influence.npz"
    refuse_foreign_file(run.path, out, "--out")
    Q, Tq = len(queries[0]), queries[0].n_steps
    if top_k is None and st.result_elements(Q, Tq) <= max_elements:
        result: InfluenceResult | StreamTopK = st.influence(queries, max_elements=max_elements, progress=progress)
    else:
        result = st.top_k(queries, k=min(top_k or 10, st.n), progress=progress)
    result.meta.update({**explorer_texts(run, query_loops), "task": run.spec["task"], "run": str(run.path),
                        "query_loops": query_loops})
    remove_stale_temporaries(out)
    if _relative(run.path, out) is not None:
        record_written(run.path, out)
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
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
        raise RunError(f"{result_path} is not a readable result file (truncated or not an .npz: "
                       f"{type(e).__name__}); rerun `sdi influence` to write it again") from None
    except ValueError as e:
        if "pickle" in str(e):  # numpy's guess for a file that is no .npz at all
            raise RunError(f"{result_path} is not an .npz result file; `sdi explore` takes the file written by "
                           "`sdi influence`") from None
        raise RunError(f"{e}. `sdi explore` needs a full result (`sdi influence` without --top-k)") from None
    if not isinstance(res.meta, dict) or res.sdi.dim() != 3:
        raise RunError(f"{result_path} is not a full influence result; `sdi explore` needs the file of "
                       "`sdi influence` without --top-k")
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
    run_dir = Path(str(meta.get("run") or result_path.parent))
    if out.exists() and not (_relative(run_dir, out) is not None and written_by_sdi(run_dir, out)):
        raise RunError(f"{out} exists and was not written by sdi; move it or choose another --out")
    remove_stale_temporaries(out)
    if _relative(run_dir, out) is not None and (run_dir / RUN_FILE).is_file():
        record_written(run_dir, out)
    return Path(static.write_html(res, train_texts, query_texts, out, k=min(k, N), **extras))
