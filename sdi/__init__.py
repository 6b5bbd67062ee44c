"""Step-resolved training-data attribution (SDI) for looped transformers.

    Example::

        import sdi
        attr = sdi.StepInfluence(model, loop=model.block, loss_fn=sdi.tasks.loss_fn)
        res = attr.influence(train_batches, query_batches, checkpoints=[(path, eta), ...])
        res.sdi          # (N_train, N_query, T_query); res.sdi.sum(-1) == res.tracin
        res.top_k(query=0, step=2, k=5)      # step: 0-based iteration index

The modules, in the order data flows through them::

    tasks, presets        algorithmic tasks and ready-made setups
    model, train          LoopedGPT, training with checkpoints that carry eta_k
    checkpoints           checkpoint files (every layout: checkpoint_formats), the user's list, the walk
    loops, plan, losses   find_loops (what to pass as loop), which kind each parameter gets, HF-style losses
    capture               hooks that see every call of every loop layer, tagged with its iteration
    leaves                one class per module kind: per-example gradients from one recorded call
    sketch, featurizers   CountSketch / TensorSketch kernels; exact and sketched featurizers
    features              features of one batch (StepFeatures)
    scoring               features -> TracIn / SDI / train-side SDI / step x step (the one place)
    results               InfluenceResult, StreamTopK, the top-k rule
    influence             StepInfluence: the API
    store, storage, featurize   the on-disk feature store, its files, and writing one (torchrun-able)
    metrics               relative error, correlations, top-k overlap, precision@k, AUC
    runs, cli             run directories and the `sdi` command
"""

from . import metrics, presets, tasks
from . import train  # the module: sdi.train.train(model, data, config)
from .capture import CaptureError
from .checkpoints import Checkpoint, CheckpointWalk, load_checkpoint, save_checkpoint
from .features import StepFeatures
from .influence import StepInfluence
from .loops import LoopCandidate, find_loops
from . import losses
from .model import LoopedGPT, LoopedGPTConfig, LoopedOutput
from .results import InfluenceResult, StreamTopK, TopK
from .train import TrainConfig, TrainResult

__version__ = "0.1.0"

__all__ = [
    "CaptureError", "Checkpoint", "CheckpointWalk", "InfluenceResult", "LoopedGPT", "LoopedGPTConfig",
    "LoopedOutput", "StepFeatures", "StepInfluence", "StreamTopK", "TopK", "TrainConfig", "TrainResult",
    "load_checkpoint", "save_checkpoint", "metrics", "presets", "tasks", "train", "find_loops", "LoopCandidate",
    "losses",
]
