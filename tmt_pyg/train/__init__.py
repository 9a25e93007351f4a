from .calibrate import calibrate_threshold, calibration_record, evaluate_at_threshold
from .checkpoint import find_checkpoint, list_checkpoints, load_checkpoint, load_run, save_checkpoint, write_atomic
from .distributed import distributed, main_process_first
from .plots import plot_metrics, read_metrics
from .tensorboard import TensorBoardLogger, make_tensorboard_logger
from .trainer import (Trainer, TrainConfig, TrainingInterrupted, autocast, evaluate, lr_at, resolve_device,
                      seed_everything)

__all__ = [
    "Trainer", "TrainConfig", "calibrate_threshold", "calibration_record", "evaluate_at_threshold", "TrainingInterrupted", "evaluate", "lr_at", "seed_everything", "resolve_device", "autocast",
    "distributed", "main_process_first",
    "save_checkpoint", "load_checkpoint", "find_checkpoint", "list_checkpoints", "load_run", "write_atomic",
    "plot_metrics", "read_metrics", "TensorBoardLogger", "make_tensorboard_logger",
]
