"""The paper's configuration on one GPU: seconds per checkpoint, ours against a plain forward + backward and the
reference.

Looped GPT, d_model 768, 12 heads, tau 32, sequence length 128 (parity of 127 bits: the task only sets the length),
N 1,024 training examples + 16 queries, 1 checkpoint, batch 32. Runs ``compare_reference.py`` with ``--device cuda``
and the methods ``plain``, ``ours_sketch`` (``--m``) and ``ref_projected`` (1,024 per tensor); exact SDI does not
fit (7M loop parameters x 32 steps per example), so no accuracy column: accuracy is measured by
``width_sweep.py`` and ``sketch_accuracy.py``. The reference environment needs a CUDA build of torch 2.13.0 on a GPU
machine (``pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128`` in that venv).

    python benchmarks/gpu_paper_config.py --ref-python /path/to/refvenv/bin/python

Prints the table of compare_reference.py and one line per method: seconds per checkpoint and the ratio to the
floor; writes benchmarks/results/gpu_paper_config.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_reference as cr  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", nargs="+", type=int, default=[16384], help="our total sketch widths")
    ap.add_argument("--n-train", type=int, default=1024)
    ap.add_argument("--ref-python", default=os.environ.get("SDI_REF_PYTHON", "/work/refvenv/bin/python"))
    ap.add_argument("--methods", nargs="+", default=["plain", "ours_sketch", "ref_projected"])
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_paper_config.json")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_paper_config.py needs a CUDA device (torch.cuda.is_available() is False)")
    payload = cr.main(["--task", "parity", "--seq-len", "128", "--d-model", "768", "--n-heads", "12", "--tau", "32",
                       "--n-train", str(args.n_train), "--n-query", "16", "--k", "1", "--batch-size", "32",
                       "--train-steps", "20", "--methods", *args.methods, "--sketch-m", *map(str, args.m),
                       "--ref-m", "1024", "--device", "cuda", "--ref-python", args.ref_python, "--out", str(args.out)])
    ok = [r for r in payload["results"] if r["status"] == "ok"]
    plain = next((r for r in ok if r["method"] == "plain"), None)
    print(f"\n{torch.cuda.get_device_name()}: seconds per checkpoint (1 checkpoint, N {args.n_train}+16)")
    for r in ok:
        floor = f", {r['total_s'] / plain['total_s']:.2f}x the plain forward + backward" if plain else ""
        label = r["method"] + ("" if r.get("m") is None else f" m={r['m']}")
        print(f"  {label:24s} {r['total_s']:.2f} s{floor}; peak CUDA memory {r.get('peak_cuda_mb', float('nan')):.0f} MB")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
