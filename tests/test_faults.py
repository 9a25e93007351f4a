"""Faults: signals, non-finite steps, failed or corrupted checkpoints, mismatched configs, bad flags."""
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_cli import TINY_TRAIN
from test_trainer import make_trainer
from tmt_pyg.cli import main
from tmt_pyg.train import TrainConfig, list_checkpoints, load_checkpoint, read_metrics, save_checkpoint


def poison(trainer, step: int, what: str) -> None:
    """Make training step ``step`` non-finite: its loss, or the anchor buffer after its forward (with
    grad_accum=1: a later forward would reject the NaN states with a ValueError)."""
    forward = trainer.model.forward

    def poisoned(batch, compute_loss=False):
        out = forward(batch, compute_loss=compute_loss)
        if trainer.model.training and trainer.step + 1 == step:
            if what == "loss":
                out.loss = out.loss * float("nan")
            else:
                trainer.model.anchors.anchor_state.fill_(float("nan"))
        return out

    trainer.model.forward = poisoned


def snapshots(trainer) -> dict:
    """Model state (weights and buffers) after every training step, filled in as the trainer logs."""
    states, log = {}, trainer.log

    def record(rec: dict) -> None:
        if rec["split"] == "train":
            states[rec["step"]] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        log(rec)

    trainer.log = record
    return states


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_the_step_and_resume_continues(signum, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), *TINY_TRAIN, "--eval-every", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "tmt_pyg.cli", *args, "--steps", "10000", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "metrics.jsonl").exists() or (out / "metrics.jsonl").read_text().count("\n") < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
            time.sleep(0.1)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:  # a training of 10,000 steps must not outlive a failed test
        proc.kill()
        proc.wait()
    step = load_checkpoint(out)["step"]
    assert proc.returncode == 128 + signum, err
    assert f"{signal.Signals(signum).name}: stopped after step {step}" in err and "--resume" in err
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, step + 1))

    assert main([*args, "--steps", str(step + 2), "--resume"]) == 0
    assert f"at step {step}" in capsys.readouterr().out and load_checkpoint(out)["step"] == step + 2


@pytest.mark.parametrize("what", ["loss", "anchors"])
def test_nonfinite_stop_keeps_the_last_good_checkpoint(what, tmp_path):
    trainer = make_trainer(tmp_path, ckpt_every=2, grad_accum=1)
    poison(trainer, 4, what)
    with pytest.raises(FloatingPointError, match=r"non-finite loss or gradients at step 4 .*stopped before the update"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002.pt"]
    state = load_checkpoint(tmp_path)
    assert state["step"] == 2 and all(t.isfinite().all() for t in state["model"].values())


@pytest.mark.parametrize("what", ["loss", "anchors"])
def test_nonfinite_skip_drops_the_update_and_counts_it(what, tmp_path):
    trainer = make_trainer(tmp_path, on_nonfinite="skip", grad_accum=1)
    poison(trainer, 3, what)
    states = snapshots(trainer)
    trainer.fit()
    for name, before in states[2].items():  # weights and the anchor EMA of step 3 are undone
        assert torch.equal(states[3][name], before), name
    assert not torch.equal(states[4]["ln_f.weight"], states[3]["ln_f.weight"])
    train = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert [r["skipped"] for r in train] == [0, 0, 1, 1, 1, 1]
    assert math.isnan(train[2]["loss"]) == (what == "loss") and math.isfinite(train[3]["loss"])
    assert trainer.optimizer.state[trainer.model.ln_f.weight]["step"] == 5
    state = load_checkpoint(tmp_path)
    assert state["skipped"] == 1 and all(t.isfinite().all() for t in state["model"].values())


def test_save_refuses_nonfinite_weights(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.model.ln_f.weight.data[0] = float("inf")
    with pytest.raises(FloatingPointError, match="no checkpoint written at step 0: non-finite values in ln_f.weight"):
        trainer.save()
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    save_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path, 1)

    def half_then_fail(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left on device"):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, tmp_path, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001.pt"]  # no step 2, no temp file
    assert load_checkpoint(tmp_path)["step"] == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupted_checkpoint_is_a_clear_error(damage, tmp_path, capsys):
    trainer = make_trainer(tmp_path)
    trainer.fit(stop_at=1)
    [file] = list_checkpoints(tmp_path / "checkpoints")
    data = file.read_bytes()
    file.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"not a checkpoint", "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"checkpoint .*step_00000001\.pt is corrupted or truncated"):
        load_checkpoint(file)
    with pytest.raises(ValueError, match="corrupted or truncated"):
        make_trainer(tmp_path).resume()
    assert main(["eval", str(tmp_path), "--device", "cpu"]) == 1
    assert "step_00000001.pt is corrupted or truncated" in capsys.readouterr().err


def test_resume_needs_a_training_checkpoint_of_the_same_model(tmp_path, capsys):
    trainer = make_trainer(tmp_path)
    trainer.fit(stop_at=1)
    other = make_trainer(tmp_path, model_overrides={"graph_k": 6, "dropout": 0.0})
    with pytest.raises(ValueError, match=r"from another model config: dropout=0\.1 there, 0\.0 here; graph_k=4 there, 6 here"):
        other.resume()
    save_checkpoint({"step": 9, "w": torch.ones(1)}, tmp_path / "plain", 9)
    with pytest.raises(ValueError, match=r"step_00000009\.pt is not a training checkpoint \(no loader, model, model_config"):
        trainer.resume(tmp_path / "plain")

    out = str(tmp_path / "cli")
    assert main(["train", "--out", out, "--steps", "1", *TINY_TRAIN]) == 0
    assert main(["train", "--out", out, "--steps", "2", "--resume", *TINY_TRAIN, "--graph-k", "6"]) == 1
    assert "graph_k=4 there, 6 here" in capsys.readouterr().err


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="on_nonfinite must be 'stop' or 'skip', got 'ignore'"):
        TrainConfig(on_nonfinite="ignore")
    with pytest.raises(ValueError, match="steps, batch_size, grad_accum, keep_last must be >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="rank 2 out of range for world_size 2"):
        TrainConfig(rank=2, world_size=2)


@pytest.mark.parametrize("argv, config, message", [
    (["--dataset", "imagenet"], None, "argument --dataset: invalid choice: 'imagenet'"),
    (["--steps", "-3"], None, "argument --steps: must be >= 1, got -3"),
    (["--batch-size", "0"], None, "argument --batch-size: must be >= 1, got 0"),
    (["--seq-len", "1"], None, "argument --seq-len: must be >= 2, got 1"),
    (["--lr", "0"], None, "argument --lr: must be > 0, got 0"),
    (["--on-nonfinite", "ignore"], None, "argument --on-nonfinite: invalid choice: 'ignore'"),
    (["--data-dir", "/no/such/dir"], None, "argument --data-dir: no such directory: /no/such/dir"),
    (["--config", "/no/such/run.yaml"], None, "cannot read --config /no/such/run.yaml: .*No such file"),
    (["--config", "{}/run.yaml"], "steps: [1, 2\n", "cannot read --config .*run.yaml: invalid YAML"),
    (["--config", "{}/run.json"], '{"steps": 3,', "cannot read --config .*run.json: Expecting"),
    (["--config", "{}/run.yaml"], "train:\n  steps: -3\n", r"steps=-3 in .*run.yaml: must be >= 1, got -3"),
    (["--config", "{}/run.yaml"], "data_dir: /no/such/dir\n", "data_dir='/no/such/dir' in .*run.yaml: no such directory"),
])
def test_bad_train_flags_exit_2(argv, config, message, tmp_path, capsys):
    argv = [a.format(tmp_path) for a in argv]
    if config is not None:
        (tmp_path / os.path.basename(argv[-1])).write_text(config)
    with pytest.raises(SystemExit) as e:
        main(["train", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(message, err), err


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one process, so that collectives mark themselves as waits."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def stop_signals(grace_s: float):
    """StopSignals whose way out is recorded instead of taken: (signals, exits)."""
    from tmt_pyg.train.signals import StopSignals
    exits = []
    return StopSignals(grace_s=grace_s, exit=exits.append), exits


def wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_one_signal_outside_a_collective_only_asks_to_stop(capsys):
    signals, exits = stop_signals(grace_s=0.2)
    with signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: signals.signum == signal.SIGTERM)
        time.sleep(0.5)
    assert exits == [] and "exiting now" not in capsys.readouterr().err


def test_a_second_signal_exits_at_once(capsys):
    signals, exits = stop_signals(grace_s=60)
    with signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: signals.signum == signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert wait_for(lambda: exits == [128 + signal.SIGINT])
    assert "SIGINT (second signal): exiting now" in capsys.readouterr().err


def test_a_signal_during_a_stuck_collective_exits_after_the_grace(one_process_group, capsys):
    from tmt_pyg.train.distributed import collective
    signals, exits = stop_signals(grace_s=0.3)
    with signals:
        with collective("the all-reduce that agrees on stopping"):  # a peer that never comes: the block just waits
            os.kill(os.getpid(), signal.SIGTERM)
            assert wait_for(lambda: exits == [128 + signal.SIGTERM], seconds=3)
    assert "SIGTERM while waiting 0.3 s in the all-reduce that agrees on stopping" in capsys.readouterr().err


def test_a_signal_during_a_collective_that_completes_only_asks_to_stop(one_process_group):
    from tmt_pyg.train.distributed import collective
    signals, exits = stop_signals(grace_s=0.5)
    with signals:
        with collective("the validation sums"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the peers arrive within the grace
        time.sleep(0.8)
    assert exits == [] and signals.signum == signal.SIGTERM


def test_a_collective_error_names_the_collective_and_the_rank(one_process_group):
    from tmt_pyg.train.distributed import CollectiveError, collective
    with pytest.raises(CollectiveError, match=r"rank 0 of 1: the final barrier did not complete: .*Connection closed"):
        with collective("the final barrier"):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:21143")
    with pytest.raises(ValueError):  # computation inside a compute block keeps its own errors
        with collective("a training step", with_compute=True):
            raise ValueError("shape mismatch")
    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        with collective("a training step", with_compute=True):
            raise RuntimeError("shape mismatch")
