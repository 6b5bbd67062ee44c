"""How fast the explorer reacts: one slider move (and, for reference, a query switch) at N_train = 10,000, tau = 16.

A synthetic InfluenceResult stands in for a real one (the explorer only reads scores). The slider is moved
programmatically (``explorer.step.value = t``), which runs the same handler a browser drag triggers; the time
is that of the handler (re-rendering the k-row table, the answer strip and one blitted matplotlib frame).
It excludes the trip to the browser, which the kernel does not control.

    OMP_NUM_THREADS=1 python benchmarks/explorer_latency.py [--n-train 10000] [--steps 16] [--queries 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def synthetic_result(n_train: int, n_query: int, n_steps: int, n_ckpt: int, seed: int = 0):
    from sdi import InfluenceResult

    gen = torch.Generator().manual_seed(seed)
    per_ckpt = torch.randn(n_ckpt, n_train, n_query, n_steps, generator=gen)
    sdi = per_ckpt.sum(0)
    return InfluenceResult(sdi=sdi, train_sdi=sdi.clone(), tracin=sdi.sum(-1), etas=torch.ones(n_ckpt),
                           train_losses=torch.zeros(n_ckpt, n_train), query_losses=torch.rand(n_ckpt, n_query),
                           checkpoint_sdi=per_ckpt if n_ckpt > 1 else None)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        out.append(1000 * (time.perf_counter() - start))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=16, help="tau: iterations on the slider")
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--moves", type=int, default=64, help="slider moves to time")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from sdi_widgets import InfluenceExplorer
    from sdi_widgets.static import render_html

    N, Q, T = args.n_train, args.queries, args.steps
    res = synthetic_result(N, Q, T, args.checkpoints)
    train_texts = [f"{i:014b}=" for i in range(N)]
    query_texts = [f"{(7919 * j) % 2**14:014b}=" for j in range(Q)]
    answers = [[str((j + t) % 2) for t in range(T)] for j in range(Q)]

    start = time.perf_counter()
    ex = InfluenceExplorer(res, train_texts=train_texts, query_texts=query_texts, k=args.k,
                           query_answers=answers, query_truth=["1"] * Q)
    build_ms = 1000 * (time.perf_counter() - start)

    def move(i):  # forward and back across every iteration, like a scrubbing hand
        cycle = list(range(1, T + 1)) + list(range(T - 1, 1, -1))
        ex.step.value = cycle[(i + 1) % len(cycle)]

    def switch_query(i):  # 1, 2, ..., 8: queries never shown before
        ex.query.value = i + 1

    def revisit_query(i):  # back through the same 8: their backgrounds are cached
        ex.query.value = 8 - i

    def switch_sign(i):
        ex.sign.value = "opponents" if ex.sign.value == "proponents" else "proponents"

    move(-1)
    slider = timed(move, args.moves)
    first_visits = timed(switch_query, 8)
    revisits = timed(revisit_query, 8)
    signs = timed(switch_sign, 8)
    start = time.perf_counter()
    page = render_html(ex.data)
    export_ms = 1000 * (time.perf_counter() - start)

    print(f"explorer latency: N_train={N:,}, tau={T}, queries={Q}, checkpoints={args.checkpoints}, k={args.k}, "
          f"torch threads={torch.get_num_threads()}")
    print(f"{'action':<34}{'n':>5}{'median ms':>12}{'p90 ms':>10}{'max ms':>10}")
    for name, xs in (("slider move (explorer.step.value)", slider), ("query switch, first visit", first_visits),
                     ("query switch, revisit (cached)", revisits), ("sign switch (2 new, 6 cached)", signs)):
        p90 = sorted(xs)[int(0.9 * (len(xs) - 1))]
        print(f"{name:<34}{len(xs):>5}{statistics.median(xs):>12.1f}{p90:>10.1f}{max(xs):>10.1f}")
    print(f"{'build (validate + precompute)':<34}{1:>5}{build_ms:>12.1f}")
    print(f"{'static export (render_html)':<34}{1:>5}{export_ms:>12.1f}   {len(page) / 1e6:.2f} MB")
    print("target: slider move < 100 ms")


if __name__ == "__main__":
    main()
