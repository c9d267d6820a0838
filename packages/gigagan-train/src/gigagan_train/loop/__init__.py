"""The training loop and the small units it calls.

``trainer``   :class:`Trainer`: the loop, top to bottom (``fit``), and one step (``train_step``)
``phases``    the D, lazy-regulariser and G phases (StyleGAN2-ADA's accumulate_gradients)
``replicas``  DDP replicas of G, D and the D-side losses, and which of them sync when
``guard``     the NaN guard: skip an update with a non-finite term or gradient, agreed by all
``ema``       the moving average of G's weights
``health``    counting unreadable data across processes
``logs``      metrics.jsonl, TensorBoard, the progress bar
``samples``   the sample grids from G-EMA
"""

from gigagan_train.checkpoint import TrainerState
from gigagan_train.loop.logs import StepResult
from gigagan_train.loop.trainer import Trainer

__all__ = ["StepResult", "Trainer", "TrainerState"]
