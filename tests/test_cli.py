import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tmt_pyg import commands
from tmt_pyg.cli import build_parser, main
from tmt_pyg.demo import QUICK
from tmt_pyg.train import load_checkpoint

TINY_MODEL = ["--d-model", "32", "--n-heads", "2", "--n-layers", "2", "--graph-k", "4", "--ffn-stream-dim", "32",
              "--memory-anchors", "4", "--device", "cpu"]
TINY_TRAIN = ["--batch-size", "4", "--seq-len", "32", "--synthetic-tokens", "4096", "--eval-every", "2", "--warmup", "1",
              "--no-progress"] + TINY_MODEL


@pytest.mark.parametrize("command", ["train", "eval", "calibrate", "generate", "draft", "export", "bench", "demo"])
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
    assert main(["eval", str(out), "--max-batches", "1"]) == 0
    assert "exit threshold tau 0.8500 (the training config's" in capsys.readouterr().out
    assert main(["calibrate", str(out), "--tolerance", "0.05", "--max-batches", "3", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    state = load_checkpoint(out)
    tau = state["model_config"]["exit_threshold"]
    assert f"tau = {tau:.4f} stored in" in printed and state["calibration"]["threshold"] == tau
    calib = state["calibration"]
    assert calib["chosen"] is None or calib["chosen"]["loss"] <= calib["loss_limit"]
    assert main(["eval", str(out), "--json", "--max-batches", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["exit_threshold"] == tau and result["exit_threshold_source"] == "calibrate"
    if calib["chosen"] is not None:  # eval runs at the stored tau: the same exits as calibration measured
        assert result["exit_rate"] == pytest.approx(calib["chosen"]["exit_rate"])
    assert main(["eval", str(out), "--max-batches", "3"]) == 0
    assert f"exit threshold tau {tau:.4f} (stored by calibrate: within +5.0% loss on its validation split)" in capsys.readouterr().out
    assert main(["eval", str(out), "--json", "--max-batches", "3", "--exit-threshold", "1.0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["exit_threshold_source"] == "flag" and result["exit_rate"] == 0


def test_calibrate_needs_exit_gates(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "1", "--out", str(out), "--no-exit", *TINY_TRAIN]) == 0
    with pytest.raises(SystemExit) as e:
        main(["calibrate", str(out)])
    assert e.value.code == 2 and "no exit gates" in capsys.readouterr().err


def write_text_corpus(root, unseen: str = "") -> str:
    """A tiny train.txt / valid.txt / test.txt folder; ``unseen`` characters appear in valid.txt and test.txt only."""
    root.mkdir()
    line = "the quick brown fox jumps over the lazy dog"
    (root / "train.txt").write_text("\n".join(f"{line} {i}" for i in range(40)) + "\n")
    (root / "valid.txt").write_text("\n".join(f"{line} {unseen}{i}" for i in range(8)) + "\n")
    (root / "test.txt").write_text("\n".join(f"{unseen}{line}" for i in range(8)) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A char-level run on a folder of its own text, trained with a relative --data-dir; valid.txt and test.txt
    hold characters train.txt lacks."""
    root = tmp_path_factory.mktemp("text")
    data = write_text_corpus(root / "mytext", unseen="éΩ")
    out = root / "run"
    assert main(["train", "--dataset", "text", "--data-dir", os.path.relpath(data), "--tokenizer", "char",
                 "--steps", "2", "--out", str(out), *TINY_TRAIN, "--eval-every", "0"]) == 0
    return out, Path(data)


def test_char_tokenizer_covers_every_split(text_run, capsys):
    out, _ = text_run
    chars = load_checkpoint(out)["extra"]["tokenizer"]["itos"]
    assert "é" in chars and "Ω" in chars  # from valid.txt / test.txt: no KeyError on encoding them
    assert main(["eval", str(out), "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["targets"] > 0


def test_run_keeps_an_absolute_data_dir(text_run, tmp_path, monkeypatch, capsys):
    out, data = text_run
    assert load_checkpoint(out)["extra"]["data"]["data_dir"] == str(data.resolve())
    monkeypatch.chdir(tmp_path)  # another folder: the stored path still holds
    assert main(["eval", str(out), "--max-batches", "1"]) == 0
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    data.rename(data.with_name("gone"))
    try:
        assert main(["eval", str(out)]) == 1
        assert "does not exist (here); pass --data-dir" in capsys.readouterr().err
        assert main(["eval", str(out), "--max-batches", "1", "--data-dir", "moved"]) == 0
        assert main(["calibrate", str(out), "--max-batches", "1", "--data-dir", "moved"]) == 0
        assert main(["draft", str(out), "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1", "--draft-tokens", "2",
                     "--data-dir", "moved"]) == 0
    finally:
        data.with_name("gone").rename(data)


def test_generate_fits_the_context(text_run, capsys):
    out, _ = text_run  # trained with --seq-len 32: max_seq_len 32
    assert main(["generate", str(out), "--prompt", "the", "--temperature", "0"]) == 0  # default length fits
    assert len(capsys.readouterr().out) == 3 + 30 + 1  # min(50, 32 + 1 - 3) new characters and print's newline
    prompt = "the quick brown fox jumps over the lazy dog"  # 43 characters
    assert main(["generate", str(out), "--prompt", prompt, "--max-new-tokens", "5", "--temperature", "0"]) == 0
    printed = capsys.readouterr()
    assert "kept the prompt's last 28 tokens" in printed.err and len(printed.err.strip().splitlines()) == 1
    assert printed.out.startswith(prompt[-28:]) and len(printed.out) == 28 + 5 + 1
    with pytest.raises(SystemExit) as e:
        main(["generate", str(out), "--max-new-tokens", "33"])
    assert e.value.code == 2 and "exceeds the model's max_seq_len=32" in capsys.readouterr().err


def test_default_warmup_fits_short_runs(tmp_path, capsys):
    at = TINY_TRAIN.index("--warmup")
    short = ["--steps", "20", *TINY_TRAIN[:at], *TINY_TRAIN[at + 2:], "--eval-every", "0", "--eval-batches", "1"]
    assert main(["train", "--out", str(tmp_path / "a"), *short]) == 0
    assert "warmup 2 steps (10% of --steps 20) instead of the default 100" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "a")["train_config"]["warmup"] == 2
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
           if '"split": "train"' in line]
    assert lrs[2] == pytest.approx(3e-4)  # the peak learning rate after 2 warmup steps
    assert main(["train", "--out", str(tmp_path / "b"), *short, "--warmup", "5", "--steps", "6"]) == 0
    assert "warmup" not in capsys.readouterr().err and load_checkpoint(tmp_path / "b")["train_config"]["warmup"] == 5


def test_help_shows_the_config_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: -1)" in help_text.split("--mesh-window")[1].split("--")[0]
    assert "(default: auto)" in help_text.split("--mesh-similarity")[1].split("--memory-anchors")[0]
    assert "attention" not in help_text.split("--dropout DROPOUT")[1].split("--attn-dropout")[0]


def test_attn_dropout_flag(tmp_path):
    assert main(["train", "--steps", "1", "--out", str(tmp_path), "--attn-dropout", "0.2", *TINY_TRAIN,
                 "--eval-batches", "1"]) == 0
    assert load_checkpoint(tmp_path)["model_config"]["attn_dropout"] == 0.2


def test_training_md_names_every_command():
    page = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    listed = set(re.findall(r"^\| `([a-z]+)` \|", page, flags=re.M))
    assert listed == commands
    words = {6: "six", 7: "seven", 8: "eight", 9: "nine"}
    assert f"has {words[len(commands)]} commands" in page


def test_demo_quick_presets(monkeypatch):
    seen = {}
    monkeypatch.setattr(commands, "run_demo", lambda args: seen.update(vars(args)))
    assert main(["demo", "--quick", "--steps", "7"]) == 0
    assert seen["steps"] == 7  # a flag given with --quick wins
    assert all(seen[k] == v for k, v in QUICK.items() if k != "steps") and seen["out_dir"] == "runs/demo-quick"


def test_demo_quick_tiny(tmp_path, capsys):
    """--quick's own paths (no drafting, final evaluations on a few batches), on a tiny synthetic corpus."""
    assert main(["demo", "--quick", "--dataset", "synthetic", "--synthetic-tokens", "4096", "--prompt", "k3", "--steps", "2",
                 "--d-model", "32", "--n-heads", "2", "--seq-len", "32", "--batch-size", "4", "--eval-batches", "1",
                 "--final-eval-batches", "2", "--sample-tokens", "4", "--out", str(tmp_path), "--no-progress",
                 "--device", "cpu", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| val loss, 2 batches |" in out and "Self-speculative" not in out
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows["TMT"]["targets"] == rows["vanilla"]["targets"] == 2 * 4 * 31 and "drafting" not in rows["TMT"]
    state = load_checkpoint(tmp_path / "tmt")
    assert state["calibration"]["threshold"] == rows["TMT"]["tau"] and "speculative" not in state
