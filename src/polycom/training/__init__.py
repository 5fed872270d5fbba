"""Training: AdamW + warm-up/cosine, evaluation, metrics, atomic checkpoints, resume, divergence guard."""

from .checkpoint import load_checkpoint, save_checkpoint
from .optim import LRSchedule, build_optimizer, parameter_groups
from .trainer import evaluate, git_commit, read_metrics, train

__all__ = ["train", "evaluate", "read_metrics", "git_commit", "build_optimizer", "parameter_groups", "LRSchedule", "save_checkpoint", "load_checkpoint"]
