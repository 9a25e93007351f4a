"""TensorBoard logging is optional: metrics land in event files when it is installed, a clear error otherwise."""
import dataclasses
import sys

import pytest

from test_cli import TINY_TRAIN
from tmt_pyg.cli import TENSORBOARD_IN_OUT, build_parser, main
from tmt_pyg.train import TrainConfig, make_tensorboard_logger


def test_missing_tensorboard_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'tmt_pyg\[tensorboard\]'"):
        make_tensorboard_logger(tmp_path)


def test_metrics_reach_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = make_tensorboard_logger(tmp_path / "tb")
    for step in (1, 2):
        logger.log(step, {"split": "train", "step": step, "loss": 3.0 / step, "tok_per_s": 100 * step, "note": "x",
                          "recall_acc": None, "finite": True})
    logger.log(2, {"split": "val", "step": 2, "ppl": 12.5})
    logger.log(3, {"lr": 1e-3})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert sorted(events.Tags()["scalars"]) == ["lr", "train/loss", "train/tok_per_s", "val/ppl"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 3.0), (2, 1.5)]
    assert [(e.step, e.value) for e in events.Scalars("val/ppl")] == [(2, 12.5)]


def test_cli_flag():
    parser = build_parser()
    assert parser.parse_args(["train"]).tensorboard_dir is None
    assert parser.parse_args(["train", "--tensorboard"]).tensorboard_dir == TENSORBOARD_IN_OUT
    assert parser.parse_args(["train", "--tensorboard", "logs/tb"]).tensorboard_dir == "logs/tb"


def test_train_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    if "tensorboard_dir" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        pytest.skip("the Trainer does not take tensorboard_dir yet")
    assert main(["train", "--steps", "2", "--out", str(tmp_path), "--tensorboard"] + TINY_TRAIN) == 0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
