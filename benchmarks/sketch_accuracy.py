"""Accuracy of sketched SDI against the exact SDI, as a function of the sketch width ``m``.

For each task (parity, variable chains) it trains a small default-style LoopedGPT (or reuses the checkpoints of
an earlier run in ``--workdir``), computes the exact SDI over all checkpoints once, then the sketched SDI for
every ``m`` and sketch seed, and prints

    rel_fro   ||SDI_sketch - SDI_exact||_F / ||SDI_exact||_F      over (N_train, N_query, T_query)
    pearson   correlation over the training examples per (query, step), averaged (spearman likewise)
    top10     |top-10 proponents (sketch) & top-10 (exact)| / 10, averaged over (query, step)
    tracin    relative Frobenius error of TracIn
    conserv   max |sum_t SDI_t - TracIn| / max |TracIn| of the sketched result (0 up to rounding)

averaged over the seeds (min and max of rel_fro and top10 in brackets). Results also go to
benchmarks/results/sketch_accuracy.json.

    python benchmarks/sketch_accuracy.py                      # m = 256 .. 16384, 3 seeds
    python benchmarks/sketch_accuracy.py --quick              # a fast smoke run
    python benchmarks/sketch_accuracy.py --groups tensor --m 1024 2048 4096   # m per weight matrix
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import sdi
from sdi import metrics
from sdi.files import atomic_write
from sdi.sketch import DEFAULT_SKETCH_DIM
from sdi.tasks import accuracy, loss_fn, parity, variable_chains

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def make_task(task: str, n_train_pool: int) -> tuple[sdi.tasks.TaskDataset, sdi.tasks.TaskDataset, int]:
    """Training pool, held-out queries, and the training ``tau`` of a default-style model."""
    if task == "parity":
        return parity(n_train_pool, n_bits=8, seed=0, curriculum=True), parity(256, n_bits=8, seed=99), 6
    if task == "chains":
        return (variable_chains(n_train_pool, n_statements=6, max_hops=3, seed=0),
                variable_chains(256, n_statements=6, max_hops=3, seed=99), 8)
    raise ValueError(f"unknown task {task!r}")


def preset_setup(task: str):
    """``sdi.presets.<task>_setup()`` when the presets module provides one, else None."""
    try:
        from sdi import presets
    except ImportError:
        return None
    for name in (f"{task}_setup", f"variable_{task}_setup"):
        if hasattr(presets, name):
            return getattr(presets, name)()
    return None


def trained_model(task: str, workdir: Path, steps: int, use_preset: bool = False) -> tuple:
    """A trained LoopedGPT and its 3 checkpoints, cached in ``workdir``.

    Default: d_model 64, 4 heads, one layer per loop, ``steps`` AdamW steps. With ``use_preset`` the model, data
    and training settings of ``sdi.presets`` (3 checkpoints, ``steps`` ignored).
    Returns (model, [(state_dict, eta), ...], training pool, held-out set, description).
    """
    setup = preset_setup(task) if use_preset else None
    if use_preset and setup is None:
        raise SystemExit(f"sdi.presets has no setup for task {task!r}")
    if setup is not None:
        pool, test, cfg = setup.train, setup.test, setup.model_config
        config = replace(setup.train_config, n_checkpoints=3)
        tag = f"preset_{task}_{config.steps}"
    else:
        pool, test, tau = make_task(task, 2048)
        cfg = sdi.LoopedGPTConfig(vocab_size=len(pool.tokenizer.symbols), block_size=pool.seq_len, d_model=64,
                                  n_heads=4, n_loops=tau)
        config = sdi.TrainConfig(steps=steps, batch_size=64, lr=3e-3, warmup_steps=min(50, steps // 4),
                                 n_checkpoints=3)
        tag = f"{task}_d64_tau{tau}_steps{steps}"
    model = sdi.LoopedGPT(cfg, seed=0)
    ckpt_dir = workdir / tag
    paths = sorted(ckpt_dir.glob("ckpt_*.pt"))
    if len(paths) != 3:
        sdi.train.train(model, pool, config, checkpoint_dir=ckpt_dir, progress=False)
        paths = sorted(ckpt_dir.glob("ckpt_*.pt"))
    checkpoints = []
    for p in paths:
        payload = sdi.load_checkpoint(p)
        checkpoints.append((payload["state_dict"], float(payload["lr"])))
    model.load_state_dict(checkpoints[-1][0])
    model.eval()
    info = {"task": task, "model": tag, "tau": cfg.n_loops, "d_model": cfg.d_model, "train_steps": config.steps,
            "test_accuracy": accuracy(model, test),
            "n_params_loop": sum(p.numel() for p in model.block.parameters())}
    return model, checkpoints, pool, test, info


def compare(sketch: sdi.InfluenceResult, exact: sdi.InfluenceResult) -> dict[str, float]:
    """The library's metrics (:mod:`sdi.metrics`): correlations and top-10 overlap per (query, step), averaged."""
    return {
        "rel_fro": metrics.relative_error(sketch.sdi, exact.sdi),
        "pearson": float(metrics.pearson(sketch.sdi, exact.sdi).mean()),
        "spearman": float(metrics.spearman(sketch.sdi, exact.sdi).mean()),
        "top10": float(metrics.top_k_overlap(sketch.sdi, exact.sdi, 10).mean()),
        "tracin_rel": metrics.relative_error(sketch.tracin, exact.tracin),
        "conservation": sketch.conservation_error(),
    }


def run_task(task: str, ms: list[int], seeds: list[int], n_train: int, n_query: int, steps: int,
             workdir: Path, batch_size: int, use_preset: bool = False, groups: str | None = None) -> dict:
    model, checkpoints, pool, test, info = trained_model(task, workdir, steps, use_preset)
    train_b = pool.subset(range(n_train)).batches(batch_size)
    query_b = test.subset(range(n_query)).batches(batch_size)
    t0 = time.perf_counter()
    exact = sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=None, progress=False) \
        .influence(train_b, query_b, checkpoints)
    info["exact_seconds"] = time.perf_counter() - t0
    info["n_train"], info["n_query"], info["n_checkpoints"] = n_train, n_query, len(checkpoints)
    rows = []
    for m in ms:
        per_seed = []
        for seed in seeds:
            t0 = time.perf_counter()
            res = sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=m, seed=seed, progress=False,
                                    groups=groups) \
                .influence(train_b, query_b, checkpoints)
            metrics = compare(res, exact)
            metrics["seconds"] = time.perf_counter() - t0
            per_seed.append(metrics)
        mean = {k: sum(r[k] for r in per_seed) / len(per_seed) for k in per_seed[0]}
        rows.append({"m": m, "mean": mean, "per_seed": per_seed})
        print(f"  {task:7s} m={m:6d} " + "  ".join(f"{k} {v:.4g}" for k, v in mean.items()), flush=True)
    return {"info": info, "rows": rows}


def print_table(results: dict) -> None:
    print("\n| task | m | rel_fro (min-max) | pearson | top-10 overlap (min-max) | TracIn rel | conservation |")
    print("|---|---:|---|---:|---|---:|---:|")
    for task, res in results["tasks"].items():
        for row in res["rows"]:
            mean, seeds = row["mean"], row["per_seed"]
            fro = [r["rel_fro"] for r in seeds]
            top = [r["top10"] for r in seeds]
            mark = " (default)" if row["m"] == DEFAULT_SKETCH_DIM else ""
            print(f"| {task} | {row['m']}{mark} | {mean['rel_fro']:.4f} ({min(fro):.4f}-{max(fro):.4f}) | "
                  f"{mean['pearson']:.5f} | {mean['top10']:.3f} ({min(top):.2f}-{max(top):.2f}) | "
                  f"{mean['tracin_rel']:.4f} | {mean['conservation']:.1e} |")
    for task, res in results["tasks"].items():
        i = res["info"]
        print(f"\n{task} ({i['model']}): LoopedGPT d_model {i['d_model']}, tau {i['tau']}, "
              f"{i['n_params_loop']} loop parameters, "
              f"{i['train_steps']} training steps (test accuracy {i['test_accuracy']:.2f}), N_train {i['n_train']}, "
              f"{i['n_query']} queries, {i['n_checkpoints']} checkpoints")


def write_json(path: Path, payload: dict) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=1).encode()))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["parity", "chains"])
    ap.add_argument("--m", nargs="+", type=int, default=[256, 1024, 4096, 8192, 16384, 32768])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-query", type=int, default=16)
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "sketch_accuracy",
                    help="where trained checkpoints are cached between runs")
    ap.add_argument("--out", type=Path, default=RESULTS / "sketch_accuracy.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--groups", choices=("tensor", "module"), default=None,
                    help="sketch layout: one m-vector (default), or m per weight matrix / per module kind")
    ap.add_argument("--presets", action="store_true",
                    help="use the models and data of sdi.presets for every task (parity always uses its preset)")
    ap.add_argument("--quick", action="store_true", help="64 train examples, 4 queries, 100 steps, m 1024 and 4096")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.n_query, args.train_steps, args.m, args.seeds = 64, 4, 100, [1024, 4096], [0]
        args.out = args.out.with_name("sketch_accuracy_quick.json")
    if args.presets:
        args.out = args.out.with_name(args.out.stem + "_presets.json")
    if args.groups:
        args.out = args.out.with_name(f"{args.out.stem}_{args.groups}.json")
    torch.set_num_threads(args.threads)
    results = {"tasks": {}, "default_sketch_dim": DEFAULT_SKETCH_DIM, "seeds": args.seeds, "groups": args.groups,
               "machine": {"platform": platform.platform(), "torch": torch.__version__,
                           "load_average": os.getloadavg()}}
    for task in args.tasks:
        # parity: the preset (a model that learns parity, 1.00 on all 64 strings); the default-style d_model 64
        # model below stays at chance on 8-bit parity, which says little about attribution on a trained model
        results["tasks"][task] = run_task(task, args.m, args.seeds, args.n_train, args.n_query, args.train_steps,
                                          args.workdir, args.batch_size, args.presets or task == "parity", args.groups)
    print_table(results)
    write_json(args.out, results)
    print(f"\nwrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
