"""Optional TensorBoard logging of training metrics (``pip install 'tmt_pyg[tensorboard]'``)."""
from numbers import Real
from pathlib import Path
from typing import Union

INSTALL_HINT = "TensorBoard logging needs the tensorboard package: pip install 'tmt_pyg[tensorboard]' (or pip install tensorboard)"


class TensorBoardLogger:
    """Writes every numeric metric of a record as a scalar ``"<split>/<name>"`` (just ``name``
    when the record has no ``split``); the ``step`` and ``split`` keys, strings and None are skipped."""

    def __init__(self, log_dir: Union[str, Path]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch.utils.tensorboard imports the tensorboard package
            raise ImportError(INSTALL_HINT) from e
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir))

    def log(self, step: int, metrics: dict) -> None:
        prefix = f"{metrics['split']}/" if isinstance(metrics.get("split"), str) else ""
        for name, value in metrics.items():
            if name in ("step", "split") or isinstance(value, bool) or not isinstance(value, Real):
                continue
            self.writer.add_scalar(prefix + name, float(value), step)

    def close(self) -> None:
        self.writer.close()


def make_tensorboard_logger(log_dir: Union[str, Path]) -> TensorBoardLogger:
    """A :class:`TensorBoardLogger` writing event files into ``log_dir``; a clear ImportError when
    tensorboard is not installed."""
    return TensorBoardLogger(log_dir)
