"""The paper's configuration on one GPU: seconds per checkpoint for ours, a plain forward + backward and the reference.

Kaissis et al. time step-decomposed influence on a looped GPT with d_model 768, 12 heads, tau 32 loop iterations
and sequences of 128 tokens (their figure: about +2.55 s per checkpoint over training, on one GPU). This script
builds that model (``benchmarks/bench_model.py``: the library's ``LoopedGPT``, d_mlp = 4 d_model), trains it
briefly on the parity task with 127 bits (128 tokens), saves one checkpoint and runs, each in its own process
through ``compare_reference.py`` (same weights, data, batches of 32 and loss):

    plain          forward + backward of the summed loss over the N_train + 16 examples (the floor)
    ours_sketch    sdi.StepInfluence(sketch_dim=m) for every --m
    ref_projected  step-decomposed-influence 0.1.1, ProjectedTracInSDI(projection_size=1024 per tensor)

It prints seconds per checkpoint, each method over the floor, and peak GPU memory, and writes
``benchmarks/results/gpu_paper_config.json``. There is no exact run at this size (its features would take
N x tau x 7.1M floats), so it measures speed and memory only; ``width_sweep.py`` measures accuracy against exact
SDI at widths up to 512.

    python benchmarks/gpu_paper_config.py --ref-python .venv-ref/bin/python          # on a CUDA machine
    python benchmarks/gpu_paper_config.py --smoke --device cpu --methods plain ours_sketch
                                                                                     # the same path, tiny, on a CPU
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_reference as cr  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PAPER = {"d_model": 768, "n_heads": 12, "tau": 32, "seq_len": 128, "n_train": 1024}
SMOKE = {"d_model": 64, "n_heads": 2, "tau": 4, "seq_len": 16, "n_train": 64}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the point of this script) or cpu (with --smoke)")
    p.add_argument("--smoke", action="store_true", help=f"a tiny model {SMOKE} that checks the script runs")
    p.add_argument("--m", nargs="+", type=int, default=[16384, 32768], help="our total sketch widths")
    p.add_argument("--ref-m", type=int, default=1024, help="reference: projection size per tensor")
    p.add_argument("--methods", nargs="+", choices=("plain", "ours_sketch", "ref_projected"),
                   default=["plain", "ours_sketch", "ref_projected"])
    p.add_argument("--train-steps", type=int, default=60, help="AdamW steps before the checkpoint")
    p.add_argument("--ref-python", default=os.environ.get("SDI_REF_PYTHON", "/work/refvenv/bin/python"),
                   help="interpreter of the environment with step-decomposed-influence==0.1.1")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/gpu_paper_config.json, or *_smoke.json)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is visible here (use --smoke --device cpu to check the script)")
    return args


def per_checkpoint_table(payload: dict) -> str:
    """Seconds per checkpoint (one checkpoint: the total), over the floor, and peak memory, one row per method."""
    results = payload["results"]
    plain = next((r for r in results if r["method"] == "plain" and r["status"] == "ok"), None)
    lines = ["| method | m | s / checkpoint | featurization s | over plain | peak GPU MB | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r.get('m') or '–'} | {r['status']} | | | | |")
            continue
        over = "1.00" if r is plain else (f"{r['total_s'] / plain['total_s']:.2f}" if plain else "–")
        feat = "–" if r.get("featurize_s") is None else f"{r['featurize_s']:.2f}"
        lines.append(f"| {r['method']} | {r.get('m') or '–'} | {r['total_s']:.2f} | {feat} | {over} | "
                     f"{cr.fmt(r.get('peak_cuda_mb'), '.0f')} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    shape = SMOKE if args.smoke else PAPER
    out = args.out or RESULTS / ("gpu_paper_config_smoke.json" if args.smoke else "gpu_paper_config.json")
    argv = ["--task", "parity", "--seq-len", str(shape["seq_len"]), "--d-model", str(shape["d_model"]),
            "--n-heads", str(shape["n_heads"]), "--tau", str(shape["tau"]), "--n-train", str(shape["n_train"]),
            "--n-query", "16", "--k", "1", "--batch-size", "32", "--train-steps", str(args.train_steps),
            "--methods", *args.methods, "--sketch-m", *map(str, args.m), "--ref-m", str(args.ref_m),
            "--ref-python", args.ref_python, "--device", args.device, "--out", str(out)]
    payload = cr.main(argv)
    print(f"\nseconds per checkpoint ({shape}, device {args.device}):\n")
    print(per_checkpoint_table(payload))
    return payload


if __name__ == "__main__":
    main()
