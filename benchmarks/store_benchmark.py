"""Feature-store benchmark: write throughput, streaming query throughput, peak RSS vs store size, fp16/bf16 error.

    python benchmarks/store_benchmark.py                         # N = 200,000, m = 1024, T = 4, 64 queries
    python benchmarks/store_benchmark.py --n 20000 --real-n 512  # a quick look

Two parts, each phase in a fresh process so that its peak RSS is its own:

1. **Scale (synthetic features).** ``N`` sketched train examples of the right shape ``(T, m)`` are *synthesized*
   (seeded Gaussian numbers, not computed from a model) and written chunk by chunk through the store's own writer
   (``init_store`` / ``write_chunk`` / ``finalize_store``: atomic files, CRC-32, manifest). Then 64 queries are
   streamed against it (``FeatureStore.top_k``: CRC check + chunked products + streaming top-k per (query, step),
   proponents and opponents, and by TracIn). Reported: write MB/s, query throughput in train examples x queries
   per second, and peak RSS of the query process next to the store's size. The store was just written, so it is
   mostly in the page cache: query throughput is that of a warm cache, not of a cold disk.
2. **Real features on a small model.** A LoopedGPT trained briefly on parity; its train features (TensorSketch,
   width ``m``) featurized into a float32 store (timed: real featurization + write throughput), then the very same
   features stored as float16 and bfloat16; SDI error of each against float32 on 64 queries: relative Frobenius
   error, max relative error, and top-10 overlap per (query, step).

Prints a markdown table and writes ``benchmarks/results/store_benchmark.json``. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "store_benchmark.json"
SYNTHETIC_FP = {"kind": "synthetic-benchmark", "note": "random features of a sketched shape"}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------ phases (child processes)

def phase_baseline(args) -> dict:
    """RSS of an interpreter that imported torch and sdi and did nothing: the floor of every phase."""
    import sdi.store  # noqa: F401

    return {"peak_rss_mb": peak_rss_mb()}


def phase_write(args) -> dict:
    """Synthesize N x (T, m) features chunk by chunk and write them through the store's writer."""
    from sdi import store as S

    n, T, m, C = args.n, args.steps, args.sketch_dim, args.chunk_size
    header = S.store_header({"sha256": "synthetic"}, [{"name": "synthetic", "step": 0, "eta": 1.0, "sha256": "w"}],
                            SYNTHETIC_FP, n, C, args.dtype)
    root = S.init_store(args.store, header)
    gen = torch.Generator().manual_seed(0)
    gen_s = write_s = 0.0
    for i in range(header["n_chunks"]):
        a, b = S.chunk_rows(n, C, i)
        t0 = time.perf_counter()
        feats = torch.randn(b - a, T, m, generator=gen)
        t1 = time.perf_counter()
        S.write_chunk(root, 0, i, (a, b), feats, torch.zeros(b - a), args.dtype, "synthetic")
        gen_s, write_s = gen_s + t1 - t0, write_s + time.perf_counter() - t1
    t0 = time.perf_counter()
    st = S.finalize_store(root)
    write_s += time.perf_counter() - t0
    return {"write_s": write_s, "generate_s": gen_s, "store_bytes": dir_bytes(root), "feature_bytes": st.nbytes,
            "n_files": sum(1 for _ in root.rglob("*")), "peak_rss_mb": peak_rss_mb()}


def phase_query(args) -> dict:
    """64 queries against the store: streaming top-k per (query, step), both signs, and by TracIn."""
    import sdi
    from sdi import store as S

    st = S.FeatureStore.open(args.store)
    gen = torch.Generator().manual_seed(1)
    q = sdi.StepFeatures(torch.randn(args.queries, args.steps, st.dim, generator=gen), torch.zeros(args.queries),
                         st.fingerprint)
    t0, c0 = time.perf_counter(), time.process_time()
    top = st.top_k([q], k=10, progress=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert top.sdi_indices.shape == (args.queries, args.steps, 10)
    t0 = time.perf_counter()
    for i in range(st.n_chunks):  # what reading alone costs: the same bytes, CRC-checked, no products
        st.read_chunk(0, i, copy=False)
    read_s = time.perf_counter() - t0
    return {"query_s": seconds, "query_cpu_s": cpu, "read_only_s": read_s, "peak_rss_mb": peak_rss_mb()}


def phase_real(args) -> dict:
    """Train a small model briefly, featurize its train set (timed), compare fp16/bf16 storage with fp32 on SDI."""
    import sdi
    from sdi import metrics
    from sdi import store as S
    from sdi.featurize import featurize, query_features
    from sdi.tasks import loss_fn, parity

    train = parity(args.real_n, n_bits=8, seed=0, curriculum=True)
    query = parity(args.queries, n_bits=8, seed=1)
    model = sdi.LoopedGPT(sdi.LoopedGPTConfig(vocab_size=3, block_size=train.seq_len, d_model=64, n_heads=4,
                                              n_loops=args.steps))
    t0 = time.perf_counter()
    run = sdi.train.train(model, train, sdi.TrainConfig(steps=args.real_train_steps, n_checkpoints=2, warmup_steps=20),
                          progress=False)
    train_s = time.perf_counter() - t0
    attr = sdi.StepInfluence(model, loop=model.block, loss_fn=loss_fn, sketch_dim=args.sketch_dim, progress=False)
    root = Path(args.store)
    t0 = time.perf_counter()
    f32 = featurize(root / "float32", attr, train, run.checkpoints, chunk_size=args.real_chunk_size,
                      batch_size=64, progress=False)
    featurize_s = time.perf_counter() - t0
    # the store's own cost (read + CRC check + convert + CRC + write + fsync), without featurization: rewrite the
    # same features as float16 and bfloat16 (this is also exactly what featurize(dtype=...) would have stored)
    t0 = time.perf_counter()
    stores = {"float32": f32}
    for dtype in ("float16", "bfloat16"):
        mf = f32.manifest
        out = S.init_store(root / dtype, S.store_header(mf["model"], mf["checkpoints"], mf["featurizer"], mf["n"],
                                                        mf["chunk_size"], dtype))
        for k in range(f32.n_checkpoints):
            losses = f32.losses(k)
            for i in range(f32.n_chunks):
                a, b = f32.rows(i)
                S.write_chunk(out, k, i, (a, b), f32.read_chunk(k, i), losses[a:b], dtype, "copied")
        stores[dtype] = S.finalize_store(out)
    rewrite_s = (time.perf_counter() - t0) / 2
    queries = query_features(attr, run.checkpoints, query.batches(64), store=f32)
    ref = f32.influence(queries, progress=False)
    errors = {}
    for dtype in ("float16", "bfloat16"):
        res = stores[dtype].influence(queries, progress=False)
        rel = metrics.relative_error(res.sdi, ref.sdi)
        max_rel = float((res.sdi - ref.sdi).abs().max() / ref.sdi.abs().max())
        overlap = metrics.top_k_overlap(res.sdi, ref.sdi, 10)                     # (Q, T)
        errors[dtype] = {"sdi_rel_frobenius": rel, "sdi_max_abs_over_max": max_rel,
                         "top10_overlap_mean": float(overlap.mean()), "top10_overlap_min": float(overlap.min()),
                         "store_bytes": stores[dtype].nbytes}
    return {"n": args.real_n, "d_model": 64, "n_params": attr.n_params, "checkpoints": f32.n_checkpoints,
            "train_s": train_s, "featurize_s": featurize_s, "store_rewrite_s": rewrite_s,
            "float32_bytes": f32.nbytes, "errors": errors, "peak_rss_mb": peak_rss_mb()}


PHASES = {"baseline": phase_baseline, "write": phase_write, "query": phase_query, "real": phase_real}


def child(phase: str, args, store: Path, **overrides) -> dict:
    values = {**vars(args), **overrides}
    cmd = [sys.executable, __file__, "--phase", phase, "--store", str(store)] + [
        f"--{k.replace('_', '-')}={v}" for k, v in values.items() if k not in ("phase", "store", "keep", "out", "dir")]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"phase {phase} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ report

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200_000, help="train examples of the synthetic store")
    p.add_argument("--steps", type=int, default=4, help="T: loop iterations (train and query)")
    p.add_argument("--sketch-dim", type=int, default=1024, help="m: sketch width per example and step")
    p.add_argument("--chunk-size", type=int, default=4096, help="rows per chunk of the synthetic store")
    p.add_argument("--dtypes", default="float32,float16", help="storage dtypes of the synthetic store, in turn")
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--real-n", type=int, default=2048, help="train examples featurized from a real model")
    p.add_argument("--real-chunk-size", type=int, default=256)
    p.add_argument("--real-train-steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads per process")
    p.add_argument("--dir", default=None, help="where to put the stores (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the stores")
    p.add_argument("--out", default=str(RESULTS), help="JSON results file")
    p.add_argument("--phase", choices=sorted(PHASES), default=None, help=argparse.SUPPRESS)
    p.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return

    work = Path(args.dir or tempfile.mkdtemp(prefix="sdi-store-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    scale = {}
    try:
        base = child("baseline", args, work / "none")
        for dtype in args.dtypes.split(","):
            store = work / f"synthetic-{dtype}"
            write = child("write", args, store, dtype=dtype)
            print(f"{dtype}: write {write['write_s']:.1f} s", file=sys.stderr)
            query = child("query", args, store, dtype=dtype)
            print(f"{dtype}: query {query['query_s']:.1f} s", file=sys.stderr)
            scale[dtype] = summarize(args, base, write, query)
            if not args.keep:
                shutil.rmtree(store)
        real = child("real", args, work / "real")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    config = {k: v for k, v in vars(args).items() if k not in ("phase", "store", "keep", "out", "dir", "dtype")}
    result = {
        "config": config,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "platform": platform.platform(), "note": "shared machine: timings are noisy"},
        "synthetic_note": "features synthesized (seeded Gaussian) in the right shape; written through the store's "
                          "writer; queried through FeatureStore.top_k",
        "synthetic": scale,
        "real": real,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(report(result))


def summarize(args, base: dict, write: dict, query: dict) -> dict:
    size_mb = write["store_bytes"] / 2**20
    pairs = args.n * args.queries
    return {
        "store_mb": size_mb, "files": write["n_files"],
        "write_s": write["write_s"], "write_mb_per_s": size_mb / write["write_s"],
        "write_examples_per_s": args.n / write["write_s"],
        "query_s": query["query_s"], "query_cpu_s": query["query_cpu_s"],
        "read_only_s": query["read_only_s"], "read_only_mb_per_s": size_mb / query["read_only_s"],
        "query_pairs_per_s": pairs / query["query_s"], "query_pairs_per_cpu_s": pairs / query["query_cpu_s"],
        "query_gflops_per_cpu_s": 2e-9 * pairs * args.sketch_dim * (args.steps + 1) / query["query_cpu_s"],
        "query_peak_rss_mb": query["peak_rss_mb"], "write_peak_rss_mb": write["peak_rss_mb"],
        "baseline_rss_mb": base["peak_rss_mb"],
    }


def report(r: dict) -> str:
    c, scale, real = r["config"], r["synthetic"], r["real"]
    T, m = c["steps"], c["sketch_dim"]
    dtypes = list(scale)

    def row(label: str, fmt) -> str:
        return f"| {label} | " + " | ".join(fmt(scale[d]) for d in dtypes) + " |"

    lines = [
        f"Feature store, {c['threads']} thread(s) per process, {r['machine']['cpus']} CPUs (shared machine: noisy)",
        "",
        f"| N = {c['n']:,} synthesized sketched train examples (T = {T}, m = {m}) x {c['queries']} queries | "
        + " | ".join(dtypes) + " |",
        "|---|" + "---|" * len(dtypes),
        row("store size on disk", lambda s: f"{s['store_mb']:,.0f} MB ({s['files']} files)"),
        row("write throughput (convert + CRC + fsync + rename)",
            lambda s: f"{s['write_mb_per_s']:,.0f} MB/s = {s['write_examples_per_s']:,.0f} examples/s"),
        row("streaming top-10 per (query, step), both signs + TracIn: wall / CPU",
            lambda s: f"{s['query_s']:.1f} s / {s['query_cpu_s']:.1f} s"),
        row("query throughput, wall (train examples x queries / s)", lambda s: f"{s['query_pairs_per_s']:,.0f}"),
        row("query throughput, per CPU second", lambda s: f"{s['query_pairs_per_cpu_s']:,.0f} "
            f"({s['query_gflops_per_cpu_s']:.1f} GFLOP/s)"),
        row("a read + CRC pass alone (disk / page cache)",
            lambda s: f"{s['read_only_s']:.1f} s = {s['read_only_mb_per_s']:,.0f} MB/s"),
        row("peak RSS of the query process vs store size",
            lambda s: f"{s['query_peak_rss_mb']:,.0f} MB = {s['query_peak_rss_mb'] / s['store_mb']:.1%}"),
        row("peak RSS of the writer process", lambda s: f"{s['write_peak_rss_mb']:,.0f} MB"),
        f"| (an interpreter with torch + sdi imported, idle) | "
        + " | ".join(f"{scale[d]['baseline_rss_mb']:,.0f} MB" for d in dtypes) + " |",
        "",
        f"| real: LoopedGPT d_model 64, parity, N = {real['n']:,}, {real['checkpoints']} checkpoints, m = {m} | value |",
        "|---|---|",
        f"| featurize (TensorSketch + write, float32) | {real['featurize_s']:.1f} s = "
        f"{real['n'] * real['checkpoints'] / real['featurize_s']:,.0f} examples x checkpoints / s |",
        f"| rewriting the same features without featurizing (read + CRC + convert + write) | "
        f"{real['store_rewrite_s']:.2f} s |",
        "",
        "| storage dtype | size | SDI rel. Frobenius error vs float32 | max abs error / max abs SDI | "
        "top-10 overlap (mean / min) |",
        "|---|---|---|---|---|",
        f"| float32 | {real['float32_bytes'] / 2**20:.1f} MB | 0 | 0 | 1 / 1 |",
    ]
    for dtype, e in real["errors"].items():
        lines.append(f"| {dtype} | {e['store_bytes'] / 2**20:.1f} MB | {e['sdi_rel_frobenius']:.1e} | "
                     f"{e['sdi_max_abs_over_max']:.1e} | {e['top10_overlap_mean']:.3f} / {e['top10_overlap_min']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
