"""Speed of sketched featurization against a plain forward + backward and against exact featurization.

Same model, data and batches for every row. Each row featurizes every batch (outputs are dropped, so the exact
path's per-example gradients never pile up) and reports the best of ``--repeats`` runs, in CPU seconds of this
process (steadier than wall time on a shared machine) and wall seconds:

    plain            loss.sum().backward() over the batches (the floor)
    sketch m=...     sdi.features.batch_features with SketchFeaturizer (hooks, kernels, completeness check on
                     the first batch, as StepInfluence does)
      kernels        of which SketchFeaturizer.featurize alone
    exact            the same with ExactFeaturizer (per-example gradients, P floats per example and step)

    python benchmarks/sketch_speed.py                          # N 256, tau 8, d_model 128, chains
    python benchmarks/sketch_speed.py --d-model 64 --m 4096 32768
    python benchmarks/sketch_speed.py --seq-len 64 --d-model 512 --n-heads 8 --m 8192 --thread-scaling 1 2
    python benchmarks/sketch_speed.py --seq-len 64 --d-model 512 --n-heads 8 --m 1024 --groups tensor --thread-scaling 1 2

``--thread-scaling 1 2`` measures, instead, the wall seconds of the sketch kernels alone (and of the plain pass)
with one and with two torch threads, and prints the speedup.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import sdi
from sdi.features import batch_features
from sdi.featurizers import ExactFeaturizer, SketchFeaturizer
from sdi.files import atomic_write
from sdi.sketch import DEFAULT_SKETCH_DIM
from sdi.tasks import loss_fn, parity, variable_chains

RESULTS = Path(__file__).resolve().parent / "results"


def best_of(fn: Callable[[], None], repeats: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds), each the minimum over ``repeats`` runs after one warm-up."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return min(cpu), min(wall)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--tau", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--m", nargs="+", type=int, default=[1024, 4096, 16384, DEFAULT_SKETCH_DIM])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-exact", action="store_true")
    ap.add_argument("--seq-len", type=int, default=None, help="parity of seq_len - 1 bits instead of the chains")
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--groups", choices=("tensor", "module"), default=None,
                    help="sketch layout: one m-vector (default), or m per weight matrix / per module kind")
    ap.add_argument("--thread-scaling", nargs="+", type=int, default=None, metavar="THREADS",
                    help="wall time of the kernels alone at each thread count (e.g. 1 2)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = (variable_chains(args.n, n_statements=6, max_hops=3, seed=0) if args.seq_len is None else
            parity(args.n, n_bits=args.seq_len - 1, seed=0))
    cfg = sdi.LoopedGPTConfig(vocab_size=len(data.tokenizer.symbols), block_size=data.seq_len,
                              d_model=args.d_model, n_heads=args.n_heads, n_loops=args.tau)
    model = sdi.LoopedGPT(cfg, seed=0).eval()
    batches = data.batches(args.batch_size)
    attr = sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=None, progress=False)

    def plain() -> None:
        for b in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, b).sum().backward()
        model.zero_grad(set_to_none=True)

    def featurize_all(featurizer) -> Callable[[], None]:
        def run() -> None:
            for i, b in enumerate(batches):  # as StepInfluence does: completeness check on the first batch
                batch_features(model, attr.loop_modules, attr.leaves, featurizer, loss_fn, b, check=i == 0)
        return run

    def kernels_only(featurizer) -> Callable[[], None]:
        """The featurizer's kernels alone, on calls captured beforehand (hooks and autograd excluded)."""
        from sdi.capture import StepCapture
        captured = []
        for b in batches:
            with StepCapture(model, attr.loop_modules, attr.leaves) as cap:
                losses = loss_fn(model, b)
            cap.backward(losses)
            captured.append((cap, b["tokens"].shape[0]))

        def run() -> None:
            with torch.no_grad():
                for cap, B in captured:
                    target = featurizer.target(torch.zeros(B, cap.n_steps, *featurizer.feature_shape))
                    for rec in cap.calls.values():
                        for call in range(len(rec)):
                            featurizer.add(cap, rec, call, target)
                    featurizer.finish(target)
        return run

    if args.thread_scaling:
        return thread_scaling(args, plain, kernels_only, attr)
    rows = []
    cpu0, wall0 = best_of(plain, args.repeats)
    rows.append({"method": "plain forward+backward", "cpu_s": cpu0, "wall_s": wall0})
    print(f"plain: {cpu0:.2f} s CPU", flush=True)
    for m in args.m:
        fz = SketchFeaturizer(attr.slots, m, leaves=attr.leaves, groups=args.groups)
        cpu, wall = best_of(featurize_all(fz), args.repeats)
        kcpu, kwall = best_of(kernels_only(fz), args.repeats)
        rows.append({"method": f"sketch m={m}", "m": m, "cpu_s": cpu, "wall_s": wall, "kernel_cpu_s": kcpu})
        print(f"sketch m={m}: {cpu:.2f} s CPU (kernels {kcpu:.2f})", flush=True)
    if not args.no_exact:
        cpu, wall = best_of(featurize_all(ExactFeaturizer(attr.slots)), max(1, args.repeats - 1))
        rows.append({"method": "exact", "cpu_s": cpu, "wall_s": wall})
        print(f"exact: {cpu:.2f} s CPU", flush=True)

    print(f"\nN {args.n}, tau {args.tau}, d_model {args.d_model}, batch {args.batch_size}, "
          f"{attr.n_params} loop parameters, {args.threads} thread(s); load average {os.getloadavg()[0]:.1f}\n")
    print("| method | CPU s | x plain | kernels CPU s | wall s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        kern = f"{r['kernel_cpu_s']:.2f}" if "kernel_cpu_s" in r else ""
        print(f"| {r['method']} | {r['cpu_s']:.2f} | {r['cpu_s'] / cpu0:.2f} | {kern} | {r['wall_s']:.2f} |")

    payload = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "n_params": attr.n_params, "rows": rows,
               "machine": {"platform": platform.platform(), "torch": torch.__version__,
                           "load_average": os.getloadavg()}}
    out = args.out or RESULTS / f"sketch_speed_n{args.n}_tau{args.tau}_d{args.d_model}.json"
    atomic_write(out, lambda f: f.write(json.dumps(payload, indent=1).encode()))
    return payload


def thread_scaling(args, plain, kernels_only, attr) -> dict:
    """Wall seconds of the plain pass and of the sketch kernels alone at each thread count; speedups vs the first.

    The thread counts take turns (1, 2, 1, 2, ...) and each keeps its best run, so a burst of load on the shared
    machine does not land on one thread count only.
    """
    rows = []
    for m in args.m:
        kernels = kernels_only(SketchFeaturizer(attr.slots, m, leaves=attr.leaves, groups=args.groups))
        best = {t: {"m": m, "threads": t, "plain_wall_s": float("inf"), "kernel_wall_s": float("inf")}
                for t in args.thread_scaling}
        for _ in range(args.repeats):
            for threads in args.thread_scaling:
                torch.set_num_threads(threads)
                row = best[threads]
                row["plain_wall_s"] = min(row["plain_wall_s"], best_of(plain, 1)[1])
                row["kernel_wall_s"] = min(row["kernel_wall_s"], best_of(kernels, 1)[1])
        rows.extend(best.values())
    torch.set_num_threads(args.threads)
    print(f"\nN {args.n}, tau {args.tau}, d_model {args.d_model}, seq {args.seq_len or 'chains'}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| m | threads | plain wall s | speedup | kernels wall s | speedup |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        base = next(b for b in rows if b["m"] == r["m"])
        print(f"| {r['m']} | {r['threads']} | {r['plain_wall_s']:.2f} | {base['plain_wall_s'] / r['plain_wall_s']:.2f} "
              f"| {r['kernel_wall_s']:.2f} | {base['kernel_wall_s'] / r['kernel_wall_s']:.2f} |")
    payload = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows,
               "machine": {"platform": platform.platform(), "torch": torch.__version__,
                           "load_average": os.getloadavg()}}
    layout = f"_{args.groups}" if args.groups else ""
    out = args.out or RESULTS / f"sketch_threads_d{args.d_model}_seq{args.seq_len or 'chains'}{layout}.json"
    atomic_write(out, lambda f: f.write(json.dumps(payload, indent=1).encode()))
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
