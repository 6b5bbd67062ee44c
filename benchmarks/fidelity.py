"""Fidelity of sketched SDI in the paper's format: 10 sketch draws, mean +- std of the relative Frobenius error.

Kaissis et al. (arXiv 2602.10097) report, for a 135M-parameter looped GPT (tau = 32, sequence length 128) with a
TensorSketch of 2,048 per parameter tensor, ``||SDI_sketch - SDI_exact||_F / ||SDI_exact||_F = 0.0388 +- 0.0030``
and ``0.0220 +- 0.0052`` for TracIn over 10 independent sketch draws. This script measures the same quantities
(:func:`sdi.metrics.relative_error`) with this library on a looped GPT trained briefly on a copy task
(the second half of each sequence repeats the first; the loss counts the second half), at a size too big for
the book's two-minute chapters, and the time per checkpoint against a plain forward + backward pass over the
same examples::

    python benchmarks/fidelity.py                                   # d_model 256, tau 8, seq 128, N 64, Q 8
    python benchmarks/fidelity.py --d-model 128 --n-loops 4 --seq 64 --draws 3   # quick
    python benchmarks/fidelity.py --device cuda --d-model 768 --n-loops 32       # on a GPU

"2,048 per tensor" is ``StepInfluence(sketch_dim=2048, groups=lambda name: name)``: every parameter tensor of the
loop body gets its own sketch, and the scores sum over tensors. The exact reference is
``sketch_dim=None`` (full per-example, per-step gradients), so its cost grows with P; that, not the sketch, is
what limits the size here. Results also go to benchmarks/results/fidelity_<size>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import string
import sys
import time
from pathlib import Path

import torch

import sdi
from sdi.files import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"
PAPER = {"model": "paper: 135M looped GPT, tau 32, seq 128", "sdi": (0.0388, 0.0030), "tracin": (0.0220, 0.0052)}
SYMBOLS = string.ascii_letters + string.digits + "+-"  # 64 single-character symbols


def copy_task(n: int, seq: int, seed: int) -> sdi.tasks.TaskDataset:
    """``n`` sequences of length ``seq``: ``seq // 2`` random symbols, then the same symbols again (the answer)."""
    rng = random.Random(seed)
    half = seq // 2
    examples = []
    for _ in range(n):
        s = "".join(rng.choice(SYMBOLS) for _ in range(half))
        examples.append(sdi.tasks.Example(s, s))
    return sdi.tasks.TaskDataset.from_examples("copy", sdi.tasks.Tokenizer(SYMBOLS), examples)


def plain_step_seconds(model: torch.nn.Module, batches: list, repeats: int = 1) -> float:
    """Seconds of one forward + backward pass (mean loss) over ``batches``: what training costs per example set."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for b in batches:
            model.zero_grad(set_to_none=True)
            sdi.tasks.loss_fn(model, b).mean().backward()
        _sync()
        best = min(best, time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return best


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fidelity(model: torch.nn.Module, train_batches: list, query_batches: list, checkpoints: list,
             sketch_dim: int = 2048, draws: int = 10) -> dict:
    """Relative Frobenius errors of sketched SDI (N, Q, T) and TracIn (N, Q) over ``draws`` sketch seeds.

    Returns ``sdi`` and ``tracin`` (lists, one error per draw) and seconds per checkpoint: ``exact`` and
    ``sketch`` (mean over draws) influence, ``plain`` forward + backward over the same train and query batches.
    """
    K = len(checkpoints)
    start = time.perf_counter()
    exact = sdi.StepInfluence(model, loop=model.loop_modules, loss_fn=sdi.tasks.loss_fn, sketch_dim=None,
                              progress=False).influence(train_batches, query_batches, checkpoints)
    _sync()
    exact_s = (time.perf_counter() - start) / K
    errors = {"sdi": [], "tracin": []}
    sketch_s = []
    for seed in range(draws):
        start = time.perf_counter()
        res = sdi.StepInfluence(model, loop=model.loop_modules, loss_fn=sdi.tasks.loss_fn, sketch_dim=sketch_dim,
                                seed=seed, groups=lambda name: name, progress=False).influence(
            train_batches, query_batches, checkpoints)
        _sync()
        sketch_s.append((time.perf_counter() - start) / K)
        errors["sdi"].append(sdi.metrics.relative_error(res.sdi, exact.sdi))
        errors["tracin"].append(sdi.metrics.relative_error(res.tracin, exact.tracin))
    plain = plain_step_seconds(model, train_batches + query_batches, repeats=2)
    n_params = sum(p.numel() for m in model.loop_modules for p in m.parameters())
    n_tensors = sum(1 for m in model.loop_modules for _ in m.parameters())
    return {**errors, "exact_s": exact_s, "sketch_s": sum(sketch_s) / len(sketch_s), "plain_s": plain,
            "n_params": n_params, "n_tensors": n_tensors, "T": int(exact.sdi.shape[-1]),
            "N": int(exact.sdi.shape[0]), "Q": int(exact.sdi.shape[1])}


def mean_std(values: list[float]) -> str:
    """``mean +- std`` (sample standard deviation over the draws), four decimals as in the paper."""
    t = torch.tensor(values, dtype=torch.float64)
    std = float(t.std()) if len(t) > 1 else 0.0
    return f"{float(t.mean()):.4f} ± {std:.4f}"


def table(rows: list[tuple[str, dict]], sketch_dim: int, draws: int) -> str:
    """A Markdown table: one row per model, then the paper's row."""
    lines = [f"| model | attributed P (tensors) | T | N x Q | SDI rel. error | TracIn rel. error "
             f"| sketch s / ckpt | exact s / ckpt | fwd+bwd s | sketch / fwd+bwd |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['n_params']:,} ({r['n_tensors']}) | {r['T']} | {r['N']} x {r['Q']} "
                     f"| {mean_std(r['sdi'])} | {mean_std(r['tracin'])} | {r['sketch_s']:.2f} | {r['exact_s']:.2f} "
                     f"| {r['plain_s']:.3f} | {r['sketch_s'] / r['plain_s']:.0f}x |")
    lines.append(f"| {PAPER['model']} | ~135M | 32 | | {PAPER['sdi'][0]:.4f} ± {PAPER['sdi'][1]:.4f} "
                 f"| {PAPER['tracin'][0]:.4f} ± {PAPER['tracin'][1]:.4f} | | | | |")
    return f"m = {sketch_dim} per tensor, {draws} sketch draws (mean ± sample std)\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--layers-per-loop", type=int, default=1)
    p.add_argument("--n-loops", type=int, default=8)
    p.add_argument("--seq", type=int, default=128, help="sequence length (even)")
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--n-query", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--checkpoints", type=int, default=2)
    p.add_argument("--sketch-dim", type=int, default=2048)
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.seq < 4 or args.seq % 2:
        print(f"error: --seq must be an even number >= 4, got {args.seq}", file=sys.stderr)
        return 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available; use --device cpu", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    data = copy_task(args.n_train + args.n_query, args.seq + 1, seed=0).to(args.device)
    train, queries = data.subset(range(args.n_train)), data.subset(range(args.n_train, len(data)))
    config = sdi.LoopedGPTConfig(vocab_size=len(SYMBOLS), block_size=data.seq_len, d_model=args.d_model,
                                 n_heads=args.n_heads, n_layers_per_loop=args.layers_per_loop, n_loops=args.n_loops)
    model = sdi.LoopedGPT(config).to(args.device)
    run = sdi.train.train(model, train, sdi.TrainConfig(steps=args.train_steps, batch_size=args.batch_size,
                                                        warmup_steps=10, n_checkpoints=args.checkpoints),
                          progress=False)
    r = fidelity(model, train.batches(args.batch_size), queries.batches(args.batch_size), run.tracin_checkpoints,
                 args.sketch_dim, args.draws)
    name = (f"looped GPT d{args.d_model} x{args.layers_per_loop}, tau {args.n_loops}, seq {args.seq}, "
            f"{args.device}")
    print(table([(name, r)], args.sketch_dim, args.draws))
    print(f"\n{args.checkpoints} checkpoints; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads; the fwd+bwd column is one pass over the N + Q examples in batches of "
          f"{args.batch_size}.")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"fidelity_d{args.d_model}_tau{args.n_loops}_seq{args.seq}_{args.device.split(':')[0]}.json"
    payload = json.dumps({"args": vars(args), "result": r, "paper": PAPER}, indent=1).encode()
    atomic_write(out, lambda f: f.write(payload))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
