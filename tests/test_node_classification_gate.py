"""The gated mesh channel of the node-classification example starts closed: a GATMesh computes what the
GAT it extends computes, the loss has a gradient on the gate, and the gated nets run in quick mode."""
import json

import pytest
import torch

from conftest import load_example


@pytest.fixture
def example():
    return load_example("node_classification")


def test_closed_gate_is_the_gat(example):
    torch.manual_seed(0)
    x, y = torch.randn(40, 12), torch.randint(0, 3, (40,))
    edge_index = torch.randint(0, 40, (2, 120))
    torch.manual_seed(1)
    gat = example.GAT(12, 16, 3, heads=4).eval()
    torch.manual_seed(1)
    gat_mesh = example.GATMesh(12, 16, 3, heads=4, k=4).eval()  # the GAT part built first: the same weights
    out = gat_mesh(x, edge_index)
    assert torch.equal(out, gat(x, edge_index))
    torch.nn.functional.cross_entropy(out, y).backward()
    assert gat_mesh.mesh.gate.grad.abs() > 0


def test_gated_nets_quick(example, data_dir, tmp_path):
    results = example.main(["--quick", "--data-dir", str(data_dir), "--cache-dir", str(tmp_path),
                            "--models", "mesh_gate", "gat_mesh", "gat", "--json", str(tmp_path / "cora.json")])
    assert len(results) == 3 and json.loads((tmp_path / "cora.json").read_text())["results"] == results
    for label, r in results.items():
        assert 0.0 <= r["test_acc"] <= 1.0, (label, r)
        if "gated" in label:  # 10 Adam steps (lr 0.005) from 0
            assert 0 < abs(r["gate"]) <= 10 * 0.005 + 1e-6 and 0 < r["mesh_share"] < 1, (label, r)
        else:
            assert r["gate"] is None and r["mesh_share"] == 0, (label, r)
