import json
import subprocess
import sys

import pytest

from tmt_pyg.cli import main
from tmt_pyg.train import load_checkpoint

TINY_MODEL = ["--d-model", "32", "--n-heads", "2", "--n-layers", "2", "--graph-k", "4", "--ffn-stream-dim", "32",
              "--memory-anchors", "4", "--device", "cpu"]
TINY_TRAIN = ["--batch-size", "4", "--seq-len", "32", "--synthetic-tokens", "4096", "--eval-every", "2", "--warmup", "1",
              "--no-progress"] + TINY_MODEL


@pytest.mark.parametrize("command", ["train", "eval", "generate", "draft", "bench", "demo"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"tmt-pyg {command}" in out


def test_top_level_help_as_a_process():
    out = subprocess.run([sys.executable, "-m", "tmt_pyg.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert all(cmd in out for cmd in ("train", "eval", "generate", "bench", "demo"))


@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "many"], "invalid int value: 'many'"),
    (["train", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["train", "--d-model", "30", "--n-heads", "4", "--synthetic-tokens", "4096"], "must be divisible by n_heads"),
    (["generate"], "the following arguments are required: checkpoint"),
    (["fly"], "invalid choice: 'fly'"),
])
def test_bad_flags_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_config_file_exit_2(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("steps: 3\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(tmp_path / "run.yaml")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown option(s)" in err and "learning_rate" in err


def test_train_eval_generate(tmp_path, capsys):
    out = tmp_path / "run"
    (tmp_path / "run.yaml").write_text("train:\n  steps: 4\n  lr: 0.002\nmodel:\n  d_model: 64\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--out", str(out), *TINY_TRAIN]) == 0
    printed = capsys.readouterr().out
    assert "final validation PPL " in printed and "recall accuracy" in printed
    state = load_checkpoint(out)
    assert state["step"] == 4 and state["train_config"]["lr"] == 0.002  # from the file
    assert state["model_config"]["d_model"] == 32  # the flag wins over the file
    assert (out / "metrics.png").exists() and (out / "metrics.jsonl").exists()

    assert main(["train", "--steps", "6", "--out", str(out), "--resume", *TINY_TRAIN]) == 0
    assert "resumed from" in capsys.readouterr().out and load_checkpoint(out)["step"] == 6

    assert main(["eval", str(out), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint_step"] == 6 and result["ppl"] > 1 and 0 <= result["recall_acc"] <= 1
    assert 0 <= result["exit_rate"] <= 1 and 0 < result["work_fraction"] <= 1

    assert main(["generate", str(out), "--prompt", "k3 v9 <q> k3", "--max-new-tokens", "5", "--top-k", "5",
                 "--top-p", "0.9", "--temperature", "0.8", "--device", "cpu"]) == 0
    words = capsys.readouterr().out.split()
    assert words[:4] == ["k3", "v9", "<q>", "k3"] and len(words) == 9

    greedy = ["generate", str(out), "--prompt", "k3 v9 <q> k3", "--max-new-tokens", "6", "--temperature", "0", "--device", "cpu"]
    assert main(greedy) == 0
    plain = capsys.readouterr().out
    assert main([*greedy, "--draft-layers", "1", "--draft-tokens", "3"]) == 0
    assert capsys.readouterr().out == plain  # self-speculative greedy decoding: the same text

    with pytest.raises(SystemExit) as e:  # no drafting chosen yet: a clear error
        main([*greedy, "--draft-layers", "auto"])
    assert e.value.code == 2 and "tmt-pyg draft" in capsys.readouterr().err
    assert main(["draft", str(out), "--prompt-tokens", "8", "--new-tokens", "6", "--repeats", "1", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    chosen = load_checkpoint(out)["speculative"]
    assert "draft layers 1, draft tokens 4: acceptance" in printed and "chosen: " in printed
    assert chosen["draft_layers"] in (None, 1) and 0 <= chosen["variants"]["1,2"]["acceptance"] <= 1 and chosen["speedup"] >= 1
    assert main([*greedy, "--draft-layers", "auto"]) == 0
    assert capsys.readouterr().out == plain


def test_missing_checkpoint_is_a_clean_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 1
    assert "no checkpoint found" in capsys.readouterr().err


def test_bench(capsys):
    assert main(["bench", *TINY_MODEL, "--batch-size", "2", "--seq-len", "32", "--iters", "1", "--warmup-iters", "0",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 CPU threads" in out and "forward (eval):" in out and "train step" in out


def test_demo_tiny(tmp_path, capsys):
    assert main(["demo", "--dataset", "synthetic", "--synthetic-tokens", "4096", "--prompt", "k3 v9",
                 "--steps", "3", "--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--graph-k", "4",
                 "--mesh-window", "2", "--memory-anchors", "4", "--seq-len", "32", "--batch-size", "4", "--eval-every", "2",
                 "--eval-batches", "2", "--sample-tokens", "40", "--out", str(tmp_path), "--no-progress", "--device", "cpu",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| metric | TMT | vanilla |" in out and "| val loss |" in out and "calibrated exit threshold" in out
    result = json.loads((tmp_path / "results.json").read_text())
    rows, samples = result["rows"], result["samples"]
    assert rows["TMT"]["train_tokens"] == rows["vanilla"]["train_tokens"]
    assert abs(rows["TMT"]["parameters"] - rows["vanilla"]["parameters"]) / rows["TMT"]["parameters"] < 0.05
    assert 0 < rows["TMT"]["tau"] <= 1 and "tau" not in rows["vanilla"]
    assert all(s.startswith("k3 v9 ") and len(s.split()) == 42 for s in samples.values())  # past the 32-token context
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    assert "Self-speculative greedy decoding" in out and 0 <= rows["TMT"]["drafting"]["variants"]["1,2"]["acceptance"] <= 1
    state = load_checkpoint(tmp_path / "tmt")  # tau and the drafting kept for eval and generate
    assert state["model_config"]["exit_threshold"] == rows["TMT"]["tau"] and state["speculative"] == rows["TMT"]["drafting"]


def test_calibrate_stores_tau_that_eval_uses(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "3", "--out", str(out), "--exit-loss-weight", "0.5", "--gate-detach", *TINY_TRAIN]) == 0
    capsys.readouterr()
    assert main(["calibrate", str(out), "--tolerance", "0.05", "--max-batches", "3", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    state = load_checkpoint(out)
    tau = state["model_config"]["exit_threshold"]
    assert f"tau = {tau:.4f} stored in" in printed and state["calibration"]["threshold"] == tau
    calib = state["calibration"]
    assert calib["chosen"] is None or calib["chosen"]["loss"] <= calib["loss_limit"]
    assert main(["eval", str(out), "--json", "--max-batches", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    if calib["chosen"] is not None:  # eval runs at the stored tau: the same exits as calibration measured
        assert result["exit_rate"] == pytest.approx(calib["chosen"]["exit_rate"])


def test_calibrate_needs_exit_gates(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "1", "--out", str(out), "--no-exit", *TINY_TRAIN]) == 0
    with pytest.raises(SystemExit) as e:
        main(["calibrate", str(out)])
    assert e.value.code == 2 and "no exit gates" in capsys.readouterr().err
