"""Step-resolved training-data attribution (SDI) for looped transformers.

    Example::

        import sdi
        attr = sdi.StepInfluence(model, loop=model.block, loss_fn=sdi.tasks.loss_fn)
        res = attr.influence(train_batches, query_batches, checkpoints=[(path, eta), ...])
        res.sdi          # (N_train, N_query, T_query); res.sdi.sum(-1) == res.tracin
"""

from . import presets, tasks
from .capture import CaptureError
from .features import StepFeatures
from .influence import InfluenceResult, StepInfluence, TopK
from .model import LoopedGPT, LoopedGPTConfig, LoopedOutput
from . import train  # the module: sdi.train.train(model, data, config)
from .train import Checkpoint, TrainConfig, TrainResult, load_checkpoint, save_checkpoint

__version__ = "0.1.0"

__all__ = [
    "CaptureError", "Checkpoint", "InfluenceResult", "LoopedGPT", "LoopedGPTConfig", "LoopedOutput",
    "StepFeatures", "StepInfluence", "TopK", "TrainConfig", "TrainResult", "load_checkpoint", "save_checkpoint",
    "presets", "tasks", "train",
]
