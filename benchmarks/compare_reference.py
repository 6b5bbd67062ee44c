"""Speed, memory and accuracy of step-resolved influence: ours (exact, sketched) against the authors' package.

One run measures, on identical weights, data, checkpoints and batch size, each method in its own
subprocess (so peak RSS is per method):

    plain          a plain forward + backward over the same examples and checkpoints (the floor)
    ours_exact     sdi.StepInfluence(..., sketch_dim=None)
    ours_sketch    sdi.StepInfluence(..., sketch_dim=m)            m = total feature width
    ours_blocks    sdi.StepInfluence(..., sketch_dim=m, groups="tensor")   m per weight matrix (+ one block of m
                                                                          for the 1-D parameters)
    ref_exact      FullGradientTracInSDI       (step-decomposed-influence 0.1.1)
    ref_projected  ProjectedTracInSDI(projection_size=m)           m per parameter tensor

The reference also imports as ``sdi``, so its workers run with ``--ref-python`` (a separate virtual
environment); they import only ``torch``, ``bench_model`` and the reference package. Shared inputs travel as
files: token tensors, and checkpoints ``{"state_dict": ...}`` read with ``torch.load(weights_only=True)``.

    python benchmarks/compare_reference.py --quick --ref-python /work/venv-ref/bin/python
    python benchmarks/compare_reference.py --n-train 1024 --tau 6 --d-model 128 --ref-python .venv-ref/bin/python

Prints a markdown table and the target ratios, and writes benchmarks/results/compare_<config>.json.
Timings taken while other jobs share the CPU are noisy; the load average is recorded in the JSON.
"""

from __future__ import annotations

import argparse
import gc
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
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model as bm  # noqa: E402  (never imports the `sdi` package: safe in both environments)

RESULTS = Path(__file__).resolve().parent / "results"
OURS = ("plain", "ours_exact", "ours_sketch", "ours_blocks")
#: our sketched methods (accuracy and speed targets are checked for each of them)
SKETCHED = ("ours_sketch", "ours_blocks")
REF = ("ref_exact", "ref_projected")
METHODS = OURS + REF
TOP_K = 10


# ============================================================================================== worker side
# Everything below until "driver side" runs inside one subprocess per method.

def process_peak_rss_mb() -> float:
    """Peak resident set size of this process since it started, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb(field: str) -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) from /proc/self/status, in MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Restart the ``VmHWM`` peak at the current RSS (Linux >= 4.0), so the peak measured is the method's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Stopwatch:
    """Wraps a function and accumulates the wall and CPU time spent inside it (device-synchronised).

    CPU time (all threads of this process) hardly changes when other jobs compete for the cores, so it is
    the steadier number on a shared machine; wall time is what a user waits.
    """

    def __init__(self, fn: Callable, device: str) -> None:
        self.fn, self.device, self.seconds, self.cpu_seconds, self.calls = fn, device, 0.0, 0.0, 0

    def __call__(self, *args, **kwargs):
        sync(self.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            return self.fn(*args, **kwargs)
        finally:
            sync(self.device)
            self.seconds += time.perf_counter() - start
            self.cpu_seconds += time.process_time() - cpu_start
            self.calls += 1


def load_state(path: str) -> dict:
    """A checkpoint file written by the driver, read without unpickling code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def run_plain(model, train, query, ckpts, m, device) -> tuple[None, Stopwatch]:
    """Forward + backward of the summed loss over every batch at every checkpoint (timed: the passes)."""

    def passes(batches):
        for batch in batches:
            model.zero_grad(set_to_none=True)
            bm.loss_fn(model, batch).sum().backward()

    watch = Stopwatch(passes, device)
    for path, _eta in ckpts:
        model.load_state_dict(load_state(path)["state_dict"])
        model.eval()
        watch(train + query)
    return None, watch


def run_ours(model, train, query, ckpts, m, device, groups=None) -> tuple[torch.Tensor, Stopwatch]:
    """``sdi.StepInfluence(...).influence``; featurization = time inside ``sdi.influence.batch_features``."""
    import sdi
    import sdi.influence as influence_module

    if not hasattr(sdi, "StepInfluence") or Path(sdi.__file__).resolve().parent != bm.REPO / "sdi":
        raise ImportError(f"'sdi' resolved to {sdi.__file__}, which is not this repository's package")
    watch = Stopwatch(influence_module.batch_features, device)
    influence_module.batch_features = watch
    attr = sdi.StepInfluence(model, loop=model.block, loss_fn=bm.loss_fn, sketch_dim=m, seed=0, progress=False,
                             groups=groups)
    res = attr.influence(train, query, checkpoints=[(path, eta) for path, eta in ckpts])
    return res.sdi, watch


def run_ref(model, train, query, ckpts, m, device) -> tuple[torch.Tensor, Stopwatch]:
    """The reference's ``influence_across_checkpoints``; featurization = time inside ``featurize_loader``."""
    import sdi

    if not hasattr(sdi, "ProjectedTracInSDI"):
        raise ImportError(f"'sdi' resolved to {sdi.__file__}, not to step-decomposed-influence; pass the "
                          "reference environment's interpreter as --ref-python")
    if m is None:
        est = sdi.FullGradientTracInSDI(model=model, target_modules=model.block)
    else:
        est = sdi.ProjectedTracInSDI(model=model, target_modules=model.block, projection_size=m, seed=0)
    watch = Stopwatch(est.featurize_loader, device)
    est.featurize_loader = watch
    out = est.influence_across_checkpoints(
        checkpoints=[sdi.CheckpointSpec(path, eta) for path, eta in ckpts], train_loader=train,
        query_loader=query, loss_fn=bm.loss_fn, mode="sdi", load_checkpoint_fn=load_state)
    est.close()
    return out.sdi, watch


def run_ours_blocks(model, train, query, ckpts, m, device) -> tuple[torch.Tensor, Stopwatch]:
    """Ours with one block of ``m`` per weight matrix (the reference's layout): ``groups="tensor"``."""
    return run_ours(model, train, query, ckpts, m, device, groups="tensor")


RUNNERS = {"plain": run_plain, "ours_exact": run_ours, "ours_sketch": run_ours, "ours_blocks": run_ours_blocks,
           "ref_exact": run_ref, "ref_projected": run_ref}


def package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("step-decomposed-influence", "loopsdi"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return None


def worker(method: str, m: int | None, workdir: Path, tag: str) -> None:
    """Run one method on the inputs in ``workdir``; write ``result_<tag>.json`` and ``sdi_<tag>.pt``."""
    spec = json.loads((workdir / "spec.json").read_text())
    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    data = torch.load(workdir / "data.pt", weights_only=True)
    model = bm.build_model(spec["model_config"]).to(device)
    train = bm.make_batches(data["train_tokens"], data["train_targets"], spec["batch_size"], device)
    query = bm.make_batches(data["query_tokens"], data["query_targets"], spec["batch_size"], device)
    ckpts = [(p, eta) for p, eta in spec["checkpoints"]]
    if method != "plain":
        import sdi  # noqa: F401  (imported before the baseline so it counts as baseline memory)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result: dict[str, Any] = {"method": method, "m": m, "python": sys.executable, "package": package_version()}
    gc.collect()
    resettable = reset_peak_rss()
    result["base_rss_mb"] = rss_mb("VmRSS") if resettable else process_peak_rss_mb()
    try:
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        sdi_tensor, watch = RUNNERS[method](model, train, query, ckpts, m, device)
        sync(device)
        result.update(status="ok", total_s=time.perf_counter() - start, total_cpu_s=time.process_time() - cpu_start,
                      featurize_s=watch.seconds if watch.calls else None,
                      featurize_cpu_s=watch.cpu_seconds if watch.calls else None)
        if sdi_tensor is not None:
            torch.save(sdi_tensor.detach().float().cpu(), workdir / f"sdi_{tag}.pt")
    except Exception as e:  # reported in the table; the other methods still run
        result.update(status=f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
    # peak during the method (model, data and libraries included); the whole process's peak as a fallback
    result["peak_rss_mb"] = rss_mb("VmHWM") if resettable else process_peak_rss_mb()
    result["process_peak_rss_mb"] = process_peak_rss_mb()
    if device.startswith("cuda"):
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    write_json(workdir / f"result_{tag}.json", result)


# ============================================================================================== driver side

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small config that finishes in about 2 minutes")
    p.add_argument("--n-train", type=int, default=1024, help="training examples (256..8192)")
    p.add_argument("--n-query", type=int, default=16)
    p.add_argument("--tau", type=int, default=6, help="loop iterations (4..32)")
    p.add_argument("--d-model", type=int, default=128, help="64..512 (d_mlp = 4 d_model)")
    p.add_argument("--n-heads", type=int, default=None, help="attention heads (default d_model // 32)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="parity only: sequence length (n_bits = seq_len - 1; default 9)")
    p.add_argument("--k", type=int, default=3, help="checkpoints")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--task", choices=("chains", "parity", "addition"), default="chains")
    p.add_argument("--train-steps", type=int, default=100, help="AdamW steps that produce the checkpoints")
    p.add_argument("--sketch-m", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384, 32768],
                   help="ours: total sketch width m (the library default is sdi.sketch.DEFAULT_SKETCH_DIM)")
    p.add_argument("--blocks-m", type=int, nargs="*", default=[1024, 2048],
                   help="ours_blocks: sketch width per weight matrix")
    p.add_argument("--ref-m", type=int, nargs="*", default=[256, 1024],
                   help="reference: projection_size per parameter tensor (width = m x tensors)")
    p.add_argument("--methods", nargs="*", choices=METHODS, default=list(METHODS))
    p.add_argument("--ref-python", default=os.environ.get("SDI_REF_PYTHON", "/work/venv-ref/bin/python"),
                   help="interpreter of the environment with step-decomposed-influence==0.1.1")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (same for every method)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (peak CUDA memory is reported too)")
    p.add_argument("--max-exact-gb", type=float, default=6.0,
                   help="skip ref_exact when its estimated peak (3.5 x N_train x tau x P floats) exceeds this")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per method")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/compare_<config>.json)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the shared inputs and outputs here")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--m", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tag", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.tau, args.d_model, args.k, args.train_steps = 256, 4, 64, 2, 40
        args.sketch_m, args.ref_m = [1024, 4096, 16384, 32768], [256, 1024]
    for name in ("n_train", "n_query", "tau", "d_model", "k", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    args.n_heads = args.n_heads or args.d_model // 32
    if args.n_heads < 1 or args.d_model % args.n_heads:
        p.error("--d-model must be a multiple of --n-heads (default heads of width 32)")
    if args.seq_len is not None and (args.task != "parity" or args.seq_len < 3):
        p.error("--seq-len applies to --task parity and must be >= 3")
    if any(m < 2 for m in args.sketch_m + args.blocks_m + args.ref_m):
        p.error("sketch sizes must be >= 2")
    return args


def config_tag(args: argparse.Namespace) -> str:
    seq = "" if args.seq_len is None else f"_seq{args.seq_len}"
    return ("quick" if args.quick else
            f"{args.task}{seq}_n{args.n_train}_q{args.n_query}_tau{args.tau}_d{args.d_model}_k{args.k}_b{args.batch_size}")


def make_data(task: str, n: int, seed: int, seq_len: int | None = None):
    from sdi import tasks

    if task == "chains":
        return tasks.variable_chains(n, seed=seed)
    if task == "parity":
        return tasks.parity(n, n_bits=(seq_len or 9) - 1, seed=seed)
    return tasks.addition(n, seed=seed)


def prepare(args: argparse.Namespace, workdir: Path) -> dict:
    """Data, a briefly trained model and its K checkpoints, written to ``workdir``; returns the spec."""
    import sdi

    train_data = make_data(args.task, args.n_train, seed=1, seq_len=args.seq_len)
    query_data = make_data(args.task, args.n_query, seed=2, seq_len=args.seq_len)
    model_config = sdi.LoopedGPTConfig(vocab_size=train_data.tokenizer.vocab_size, block_size=train_data.seq_len,
                                       d_model=args.d_model, n_heads=args.n_heads, n_loops=args.tau).to_dict()
    model = bm.build_model(model_config).to(args.device)        # train where the methods run (the GPU script)
    config = sdi.TrainConfig(steps=args.train_steps, batch_size=64, lr=3e-3, warmup_steps=max(1, args.train_steps // 5),
                             n_checkpoints=args.k, seed=0)
    trained = sdi.train.train(model, train_data.to(args.device), config, checkpoint_dir=workdir / "checkpoints",
                              progress=False)
    tensors = {"train_tokens": train_data.tokens, "train_targets": train_data.targets,
               "query_tokens": query_data.tokens, "query_targets": query_data.targets}
    torch.save(tensors, workdir / "data.pt")
    spec = {"model_config": model_config, "batch_size": args.batch_size, "threads": args.threads,
            "device": args.device, "checkpoints": [[str(c.path), c.lr] for c in trained.checkpoints],
            "seq_len": train_data.seq_len, "final_train_loss": trained.losses[-1]}
    (workdir / "spec.json").write_text(json.dumps(spec, indent=1))
    return spec


def loop_shape(model_config: dict) -> tuple[int, int, int]:
    """(parameter tensors, parameters, blocks of ``groups="tensor"``) of the loop body ``model.block``."""
    params = [p for p in bm.build_model(model_config).block.parameters() if p.requires_grad]
    matrices = sum(p.dim() >= 2 for p in params)
    return len(params), sum(p.numel() for p in params), matrices + (matrices < len(params))


def planned_runs(args: argparse.Namespace) -> list[tuple[str, int | None]]:
    runs = []
    for method in args.methods:
        if method == "ours_sketch":
            runs += [(method, m) for m in args.sketch_m]
        elif method == "ours_blocks":
            runs += [(method, m) for m in args.blocks_m]
        elif method == "ref_projected":
            runs += [(method, m) for m in args.ref_m]
        else:
            runs.append((method, None))
    return runs


def run_worker(args, workdir: Path, method: str, m: int | None) -> dict:
    tag = method if m is None else f"{method}_{m}"
    python = args.ref_python if method in REF else sys.executable
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the reference must not see our `sdi`
    if method not in REF:  # ours: this checkout's `sdi`, not whatever an installed copy points at
        env["PYTHONPATH"] = str(bm.REPO)
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [python, str(Path(__file__).resolve()), "--worker", method, "--workdir", str(workdir), "--tag", tag]
    if m is not None:
        cmd += ["--m", str(m)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "m": m, "status": f"timeout after {args.timeout:.0f} s"}
    except FileNotFoundError:
        return {"method": method, "m": m, "status": f"error: interpreter not found: {python}"}
    path = workdir / f"result_{tag}.json"
    if not path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"method": method, "m": m, "status": f"crashed (exit {proc.returncode}): {tail[0][:200]}"}
    result = json.loads(path.read_text())
    result["sdi_file"] = str(workdir / f"sdi_{tag}.pt") if (workdir / f"sdi_{tag}.pt").exists() else None
    return result


def accuracy(estimate: torch.Tensor, exact: torch.Tensor, k: int = TOP_K) -> dict[str, float]:
    """Agreement of an (N, Q, T) SDI estimate with the exact one, by the library's one definition of each metric
    (:mod:`sdi.metrics`): relative Frobenius error over the whole tensor; Pearson, Spearman and top-k overlap of
    the k strongest proponents per (query, step) over the N training examples, averaged (and their minimum)."""
    from sdi import metrics

    k = min(k, exact.shape[0])
    pearson, spearman = metrics.pearson(estimate, exact), metrics.spearman(estimate, exact)
    overlap = metrics.top_k_overlap(estimate, exact, k)
    return {"rel_err": metrics.relative_error(estimate, exact), "pearson": float(pearson.mean()),
            "pearson_min": float(pearson.min()), "spearman": float(spearman.mean()),
            f"top{k}": float(overlap.mean()), f"top{k}_min": float(overlap.min())}


def add_accuracy(results: list[dict]) -> str | None:
    """Fill in accuracy against the exact SDI (ours_exact, else ref_exact); returns which one was used."""
    exact_run = next((r for m in ("ours_exact", "ref_exact") for r in results
                      if r["method"] == m and r.get("sdi_file")), None)
    if exact_run is None:
        return None
    exact = torch.load(exact_run["sdi_file"], weights_only=True)
    for r in results:
        if r.get("sdi_file") and r is not exact_run:
            r["accuracy"] = accuracy(torch.load(r["sdi_file"], weights_only=True), exact)
    return exact_run["method"]


def feature_width(r: dict, n_tensors: int, n_params: int, n_blocks: int) -> int | None:
    if r["method"] in ("ours_exact", "ref_exact"):
        return n_params
    if r["method"] == "ours_sketch":
        return r["m"]
    if r["method"] == "ours_blocks":
        return r["m"] * n_blocks
    if r["method"] == "ref_projected":
        return r["m"] * n_tensors
    return None


def fmt(value: Any, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return format(value, spec)


def table(results: list[dict]) -> str:
    head = ("| method | m | width | total s | total CPU s | featurize s | featurize CPU s | peak RSS MB | Δ RSS MB "
            f"| rel err | pearson | top-{TOP_K} | status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        acc = r.get("accuracy", {})
        delta = r["peak_rss_mb"] - r["base_rss_mb"] if "peak_rss_mb" in r else None
        lines.append(
            f"| {r['method']} | {fmt(r['m'], 'd')} | {fmt(r.get('width'), ',d')} | {fmt(r.get('total_s'), '.1f')} "
            f"| {fmt(r.get('total_cpu_s'), '.1f')} | {fmt(r.get('featurize_s'), '.1f')} "
            f"| {fmt(r.get('featurize_cpu_s'), '.1f')} | {fmt(r.get('peak_rss_mb'), '.0f')} | {fmt(delta, '.0f')} "
            f"| {fmt(acc.get('rel_err'), '.4f')} | {fmt(acc.get('pearson'), '.4f')} "
            f"| {fmt(acc.get(f'top{TOP_K}'), '.3f')} | {r['status']} |")
    return "\n".join(lines)


def ok(results: list[dict], method: str) -> list[dict]:
    return [r for r in results if r["method"] == method and r["status"] == "ok"]


def time_ratio(a: dict, b: dict, key: str) -> dict[str, float] | None:
    """``a / b`` for wall time (``<key>_s``) and CPU time (``<key>_cpu_s``)."""
    if a.get(f"{key}_s") is None or b.get(f"{key}_s") is None:
        return None
    return {"wall": a[f"{key}_s"] / b[f"{key}_s"], "cpu": a[f"{key}_cpu_s"] / b[f"{key}_cpu_s"]}


def label(r: dict) -> str:
    """``"ours_sketch m=16384"``: a sketched run's method and width (the keys of the per-run ratios)."""
    return f"{r['method']} m={r['m']}"


def ratios(results: list[dict]) -> dict[str, Any]:
    """The issue's targets, each as a ratio taken from this run (time ratios as wall and CPU time)."""
    out: dict[str, Any] = {}
    plain = ok(results, "plain")
    ours_exact, ref_exact = ok(results, "ours_exact"), ok(results, "ref_exact")
    sketches = [r for method in SKETCHED for r in ok(results, method)]
    projected = ok(results, "ref_projected")
    key = f"top{TOP_K}"
    # 1. at equal or lower error and equal or higher top-k overlap: time and peak memory vs the reference
    matched = []
    for ref in projected:
        ra = ref.get("accuracy")
        if ra is None:
            continue
        good = [s for s in sketches if "accuracy" in s and s["accuracy"]["rel_err"] <= ra["rel_err"]
                and s["accuracy"][key] >= ra[key]]
        entry = {"ref_m": ref["m"], "ref_rel_err": ra["rel_err"], f"ref_{key}": ra[key], "ours_m": None,
                 "ours_method": None}
        if good:
            best = min(good, key=lambda s: s["total_cpu_s"])  # CPU time: steadier than wall time when shared
            entry.update(ours_m=best["m"], ours_method=best["method"], ours_rel_err=best["accuracy"]["rel_err"],
                         **{f"ours_{key}": best["accuracy"][key]}, time_ratio=time_ratio(best, ref, "total"),
                         memory_ratio=best["peak_rss_mb"] / ref["peak_rss_mb"],
                         memory_delta_ratio=(best["peak_rss_mb"] - best["base_rss_mb"])
                         / max(1e-9, ref["peak_rss_mb"] - ref["base_rss_mb"]))
        matched.append(entry)
    out["sketch_vs_ref_projected"] = matched
    # 2. featurization and the whole computation vs the plain forward + backward floor (time and peak memory)
    if plain:
        out["sketch_featurize_over_plain"] = {label(s): time_ratio(s, plain[0], "featurize") for s in sketches}
        out["sketch_total_over_plain"] = {label(s): time_ratio(s, plain[0], "total") for s in sketches}
        out["sketch_memory_over_plain"] = {label(s): s["peak_rss_mb"] / plain[0]["peak_rss_mb"] for s in sketches}
        out["ref_total_over_plain"] = {r["m"]: time_ratio(r, plain[0], "total") for r in projected}
        out["ref_memory_over_plain"] = {r["m"]: r["peak_rss_mb"] / plain[0]["peak_rss_mb"] for r in projected}
        if ours_exact:
            out["exact_featurize_over_plain"] = time_ratio(ours_exact[0], plain[0], "featurize")
    # 3. exact path vs the reference's exact path
    if ours_exact and ref_exact:
        out["exact_time_ratio"] = time_ratio(ours_exact[0], ref_exact[0], "total")
        out["exact_memory_ratio"] = ours_exact[0]["peak_rss_mb"] / ref_exact[0]["peak_rss_mb"]
        if ours_exact[0].get("sdi_file") and ref_exact[0].get("sdi_file"):
            a = torch.load(ours_exact[0]["sdi_file"], weights_only=True)
            b = torch.load(ref_exact[0]["sdi_file"], weights_only=True)
            out["exact_agreement_rel_err"] = float((a - b).norm() / b.norm())
    return out


def fmt_ratio(r: dict[str, float] | None) -> str:
    return "–" if r is None else f"{r['wall']:.2f} wall / {r['cpu']:.2f} CPU"


def ratio_report(r: dict[str, Any]) -> str:
    lines = ["Targets (ratios from this run; wall time is noisy on a shared machine, CPU time less so):"]
    for e in r.get("sketch_vs_ref_projected", []):
        head = (f"- ref_projected m={e['ref_m']} (rel err {e['ref_rel_err']:.4f}, top-{TOP_K} "
                f"{e[f'ref_top{TOP_K}']:.3f}): ")
        if e["ours_m"] is None:
            lines.append(head + "no run of ours reached equal or lower error and equal or higher overlap")
        else:
            lines.append(head + f"cheapest of ours at <= error is {e['ours_method']} m={e['ours_m']}: total time ratio "
                         f"{fmt_ratio(e['time_ratio'])} (target <= 0.33), peak RSS ratio {e['memory_ratio']:.2f} "
                         f"(target <= 0.33; above-baseline ratio {e['memory_delta_ratio']:.2f})")
    for m, v in r.get("sketch_total_over_plain", {}).items():
        lines.append(f"- {m} whole influence / plain fwd+bwd: {fmt_ratio(v)} (target <= 1.15 at "
                     f"d >= 256, <= 1.6 at d 128); peak RSS / plain {r['sketch_memory_over_plain'][m]:.2f} "
                     "(target <= 1.25)")
    for m, v in r.get("ref_total_over_plain", {}).items():
        lines.append(f"- ref_projected m={m} whole influence / plain fwd+bwd: {fmt_ratio(v)}; peak RSS / plain "
                     f"{r['ref_memory_over_plain'][m]:.2f}")
    if "exact_featurize_over_plain" in r:
        lines.append(f"- ours_exact featurization / plain fwd+bwd: {fmt_ratio(r['exact_featurize_over_plain'])}")
    if "exact_time_ratio" in r:
        lines.append(f"- ours_exact / ref_exact total time: {fmt_ratio(r['exact_time_ratio'])} (target <= 1); "
                     f"peak RSS ratio {r['exact_memory_ratio']:.2f}")
    if "exact_agreement_rel_err" in r:
        lines.append(f"- ours_exact vs ref_exact SDI: relative error {r['exact_agreement_rel_err']:.1e} "
                     "(two independent exact implementations)")
    return "\n".join(lines)


def code_version() -> dict[str, Any]:
    """The commit the library code came from, and which of its files differed from it during the run."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=bm.REPO, capture_output=True, text=True, timeout=30).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "modified": git("status", "--porcelain", "--", "sdi", "benchmarks").splitlines()}


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.m, args.workdir, args.tag)
        return {}
    torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sdi_compare_"))
    workdir.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    print(f"preparing {config_tag(args)} in {workdir} ...", flush=True)
    spec = prepare(args, workdir)
    n_tensors, n_params, n_blocks = loop_shape(spec["model_config"])
    results = []
    for method, m in planned_runs(args):
        # measured: FullGradientTracInSDI peaks at ~3.1x one float32 copy of the train features (N, T, P)
        exact_gb = 3.5 * args.n_train * args.tau * n_params * 4 / 1e9
        if method == "ref_exact" and exact_gb > args.max_exact_gb:
            r = {"method": method, "m": m, "status": f"skipped: needs ~{exact_gb:.1f} GB (> --max-exact-gb)"}
        else:
            print(f"  {method}{'' if m is None else f' m={m}'} ...", end=" ", flush=True)
            r = run_worker(args, workdir, method, m)
            print(r["status"] if r["status"] != "ok" else f"{r['total_s']:.1f} s, {r['peak_rss_mb']:.0f} MB",
                  flush=True)
        r["width"] = feature_width(r, n_tensors, n_params, n_blocks)
        results.append(r)
    accuracy_reference = add_accuracy(results)
    rat = ratios(results)
    print(f"\nconfig: task={args.task} N_train={args.n_train} queries={args.n_query} tau={args.tau} "
          f"d_model={args.d_model} heads={args.n_heads} K={args.k} batch={args.batch_size} seq_len={spec['seq_len']} "
          f"loop tensors={n_tensors} loop params={n_params:,} threads={args.threads} device={args.device}")
    print(f"accuracy against: {accuracy_reference or 'no exact run'}; load average at start "
          f"{load_start[0]:.1f}, at end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print(table(results) + "\n")
    print(ratio_report(rat))
    payload = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("worker", "m", "tag")},
        "seq_len": spec["seq_len"], "loop_tensors": n_tensors, "loop_params": n_params,
        "checkpoint_etas": [eta for _, eta in spec["checkpoints"]],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "code": code_version(),
        "accuracy_reference": accuracy_reference,
        "results": [{k: v for k, v in r.items() if k != "sdi_file"} for r in results],
        "ratios": rat,
    }
    out = args.out or RESULTS / f"compare_{config_tag(args)}.json"
    write_json(out, payload)
    print(f"\nwrote {out}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return payload


if __name__ == "__main__":
    main()
