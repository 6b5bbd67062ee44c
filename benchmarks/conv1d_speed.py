"""Sketched featurization of a looped GPT-2 built from transformers' Conv1D vs its nn.Linear twin (CPU seconds).

    PYTHONPATH=$PWD:tests python benchmarks/conv1d_speed.py

Both models compute the same function (every Conv1D replaced by the equivalent nn.Linear); the ratio should be
about 1 (the Conv1D kind is the Linear kernels with the factors swapped). Prints a table; asserts nothing.
"""

import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import sdi  # noqa: E402
from models import LoopedGPT2, lm_batch  # noqa: E402

torch.set_num_threads(1)
warnings.simplefilter("ignore")


def featurize_seconds(model, batches, repeats):
    attr = sdi.StepInfluence(model, loop=model.backbone, loss_fn=sdi.losses.causal_lm_loss, sketch_dim=4096,
                             progress=False)
    list(attr.stream_features(batches[:1]))                        # warm up (hashes, first-call costs)
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        list(attr.stream_features(batches))
        best = min(best, time.process_time() - t)
    return best, attr


if __name__ == "__main__":
    batches = [lm_batch(16, length=12, seed=s) for s in range(4)]
    rows = []
    for rnd in range(3):                                           # interleaved: shared-machine noise hits both
        conv, a_conv = featurize_seconds(LoopedGPT2(n_loops=4, seed=0), batches, 2)
        lin, a_lin = featurize_seconds(LoopedGPT2(n_loops=4, seed=0, linear=True), batches, 2)
        rows.append((conv, lin))
    conv, lin = min(r[0] for r in rows), min(r[1] for r in rows)
    kinds = {e.kind for e in a_conv.plan()}
    print(f"kinds (Conv1D model): {sorted(kinds)}")
    print(f"{'model':<22}{'CPU s (best)':>14}")
    print(f"{'Conv1D GPT-2':<22}{conv:>14.3f}")
    print(f"{'nn.Linear twin':<22}{lin:>14.3f}")
    print(f"ratio Conv1D / Linear: {conv / lin:.2f}")
