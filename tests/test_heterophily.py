"""The heterophily example runs end to end in quick mode on the three shared datasets, and a rerun
continues from its cached per-split results."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def heterophily():
    spec = importlib.util.spec_from_file_location("heterophily", ROOT / "examples" / "heterophily.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_heterophily_quick(heterophily, data_dir, tmp_path, capsys):
    if not (data_dir / "heterophilous").is_dir():
        pytest.skip(f"heterophilous datasets not found at {data_dir / 'heterophilous'}")
    argv = ["--quick", "--threads", "1", "--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out")]
    results = heterophily.main(argv)
    assert set(results) == {"minesweeper", "tolokers", "chameleon_filtered"}
    for dataset, models in results.items():
        assert set(models) == set(heterophily.MODELS), dataset
        for model, r in models.items():
            assert 0.0 <= r["test"] <= 1.0 and r["splits"] == 1 and r["epochs"] == 5, (dataset, model, r)
            assert (0 < r["mesh_share"] < 1) if model.startswith("mesh") else r["mesh_share"] == 0, (dataset, model, r)
    assert list((tmp_path / "cache").glob("heterophilous/*/processed/*.pt")), "PyG processed the copied raw files"
    table = capsys.readouterr().out
    assert "| mesh_sep |" in table and "test roc_auc" in table and "test acc" in table

    cached = tmp_path / "out" / "tolokers" / "mesh" / "split0.json"
    record = json.loads(cached.read_text())
    record["test"] = 0.123  # a rerun must read this file back, not train again
    cached.write_text(json.dumps(record))
    again = heterophily.main(argv + ["--datasets", "tolokers", "--models", "mesh"])
    assert again["tolokers"]["mesh"]["test"] == 0.123


def test_roc_auc(heterophily):
    import torch
    y = torch.tensor([0, 0, 1, 1])
    assert heterophily.roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), y) == 0.75
    assert heterophily.roc_auc(torch.zeros(4), y) == 0.5  # ties count half
