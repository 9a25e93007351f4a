"""benchmarks/layerskip.py runs (--quick): an acceptance rate in [0, 1] for every draft depth and
draft length, every speculative output checked against plain greedy decoding, a rerun reads the
cached runs, and a speculative output that differs from plain greedy stops the study."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds `benchmarks`

from benchmarks import layerskip  # noqa: E402
from tmt_pyg import TMTConfig, TMTModel  # noqa: E402
from tmt_pyg.models.speculative import speculative_generate  # noqa: E402


def test_layerskip_quick(tmp_path):
    argv = ["--quick", "--threads", "1", "--out", str(tmp_path)]
    result = layerskip.main(argv)
    assert json.loads((tmp_path / "layerskip.json").read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "layerskip.png").stat().st_size > 0
    assert (tmp_path / "layerskip.md").read_text().startswith("## layerskip")
    rows = result["rows"]
    assert list(rows) == ["4L", "4L-ld"]
    assert rows["4L"]["layer_dropout"] == 0 and rows["4L-ld"]["layer_dropout"] == layerskip.LAYER_DROPOUT
    for row in rows.values():
        L = row["n_layers"]
        assert {(v["E"], v["d"]) for v in row["draft"].values()} == {(E, d) for E in range(1, L) for d in layerskip.DRAFT_TOKENS}
        assert all(0 <= v["acceptance"] <= 1 and v["tokens_per_round"] >= 1 for v in row["draft"].values())
        assert row["greedy_checks"] == 2 * len(layerskip.DRAFT_TOKENS) * (L - 1)  # prompts x d x E, all equal
        assert math.isfinite(row["val_loss"]) and row["val_loss"] > 0
        assert set(row["head_agreement"]) == {str(E) for E in range(1, L)} and set(row["head_loss"]) == {str(E) for E in range(1, L + 1)}
        assert all(0 <= a <= 1 for a in row["head_agreement"].values()) and 0 < row["distinct_8grams"] <= 1
    for run in result["runs"]:
        assert (tmp_path / "runs" / f"{run['row']}_seed{run['seed']}" / "checkpoints").is_dir()
    again = layerskip.main(argv)  # the cache: nothing trained again, the same runs back
    assert again["runs"] == result["runs"]


def test_acceptance_stops_on_an_output_that_differs_from_plain_greedy(monkeypatch):
    model = TMTModel(TMTConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=3, graph_k=4, memory_anchors=4,
                               max_seq_len=32, dropout=0.0, use_exit=False)).eval()
    prompts = [torch.randint(0, 50, (6,), generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    measured = layerskip.acceptance(model, prompts, 6)
    assert measured["greedy_checks"] == 2 * len(layerskip.DRAFT_TOKENS) * 2

    def off_by_one(*args, **kwargs):
        tokens, stats = speculative_generate(*args, **kwargs)
        tokens[:, -1] = (tokens[:, -1] + 1) % 50
        return tokens, stats

    monkeypatch.setattr(layerskip, "speculative_generate", off_by_one)
    with pytest.raises(RuntimeError, match="differs from plain greedy"):
        layerskip.acceptance(model, prompts, 6)
