"""benchmarks/loss_vs_time.py (--quick): both rows' curves are complete and monotone in seconds and FLOPs,
and a rerun with more steps continues from the checkpoints and the curve so far."""
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds `benchmarks`

from benchmarks import loss_vs_time  # noqa: E402


def test_loss_vs_time_resumes(tmp_path, data_dir, capsys):  # data_dir: skipped where the shared corpora are missing
    def run(*extra):
        return loss_vs_time.main(["--quick", "--threads", "1", "--out", str(tmp_path / "out"),
                                  "--runs", str(tmp_path / "runs"), "--data-dir", str(data_dir), *extra])

    first = run()
    written = json.loads((tmp_path / "out" / "loss_vs_time_256.json").read_text())
    assert written == json.loads(json.dumps(first))
    assert written["command"].startswith("python -m benchmarks.loss_vs_time ")
    assert (tmp_path / "out" / "loss_vs_time_256.png").stat().st_size > 0
    assert set(written["rows"]) == {"vanilla", "full"}
    for row in written["rows"].values():
        points = row["points"]
        assert [p["step"] for p in points] == [2, 4, 6]
        for key in ("seconds", "flops"):
            values = [p[key] for p in points]
            assert values[0] > 0 and all(a < b for a, b in zip(values, values[1:])), f"{key} not strictly increasing"
        assert all(math.isfinite(p["ppl"]) and math.isfinite(p["subword_ppl"]) for p in points)
    assert written["equal_time"] and {c["better"] for c in written["equal_time"]} <= {"vanilla", "full"}

    second = run("--steps", "8")
    assert "resuming" in capsys.readouterr().out
    for name, row in second["rows"].items():
        assert [p["step"] for p in row["points"]] == [2, 4, 6, 8]
        assert row["points"][:3] == written["rows"][name]["points"], "the rerun continues the first run's curve"
        assert row["points"][3]["seconds"] > row["points"][2]["seconds"]


def test_head_flops_counted_per_call():
    """Every LM head call adds 2 * d * V a row: 3x when it builds a graph, 1x under no_grad."""
    from dataclasses import replace
    import torch
    from tmt_pyg import TMTConfig, TMTModel
    cfg = TMTConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=2, max_seq_len=16, exit_loss_weight=0.5,
                    exit_loss_sample=5)
    model, tally = TMTModel(cfg), []
    loss_vs_time.count_head_flops(model, tally)
    ids = torch.randint(0, 50, (2, 8))
    model(ids, compute_loss=True)
    per_row = 2.0 * 16 * 50  # final logits on the 16 rows, the early-exit loss on 5 rows of layer 0 (graph built),
    # the gate objective's early prediction on its 16 sampled rows of layer 0 (no_grad)
    assert sorted(tally) == sorted([3 * per_row * 16, 3 * per_row * 5 * (cfg.n_layers - 1), per_row * 16])
    tally.clear()
    with torch.no_grad():
        model(ids)
    assert tally == [per_row * 16]
    drawn, tally = TMTModel(replace(cfg, n_layers=3, exit_loss_layers=1)), []  # one of the two early layers a step
    loss_vs_time.count_head_flops(drawn, tally)
    drawn(ids, compute_loss=True)
    assert sorted(tally) == sorted([3 * per_row * 16, 3 * per_row * 5, per_row * 16, per_row * 16])
