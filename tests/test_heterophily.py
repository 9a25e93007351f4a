"""The heterophily example runs end to end in quick mode on the three shared datasets, a rerun continues
from its cached per-split results, and a gated mesh channel starts closed (the net is then the plain graph
net) and is opened by training."""
import json

import pytest
import torch

from conftest import load_example


@pytest.fixture
def heterophily():
    return load_example("heterophily")


def test_heterophily_quick(heterophily, data_dir, tmp_path, capsys):
    if not (data_dir / "heterophilous").is_dir():
        pytest.skip(f"heterophilous datasets not found at {data_dir / 'heterophilous'}")
    argv = ["--quick", "--threads", "1", "--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out"), "--models", *heterophily.MODELS]
    results = heterophily.main(argv)
    assert set(results) == {"minesweeper", "tolokers", "chameleon_filtered"}
    for dataset, models in results.items():
        assert set(models) == set(heterophily.MODELS), dataset
        for model, r in models.items():
            assert 0.0 <= r["test"] <= 1.0 and r["splits"] == 1 and r["epochs"] == 5, (dataset, model, r)
            uses_mesh = model.startswith("mesh") or model.endswith("_mesh")
            assert (0 < r["mesh_share"] < 1) if uses_mesh else r["mesh_share"] == 0, (dataset, model, r)
            gated = model in ("mesh_gate", "gat_mesh")
            # 5 Adam steps move a gate that starts at 0 by at most 5 lr
            assert (0 < r["gate"] <= 5 * 1e-3 + 1e-6) if gated else r["gate"] is None, (dataset, model, r)
    assert list((tmp_path / "cache").glob("heterophilous/*/processed/*.pt")), "PyG processed the copied raw files"
    table = capsys.readouterr().out
    assert "| mesh_gate |" in table and "test roc_auc" in table and "test acc" in table

    cached, = (tmp_path / "out" / "tolokers" / "mesh").glob("split0-*.json")
    record = json.loads(cached.read_text())
    record["test"] = 0.123  # a rerun must read this file back, not train again
    cached.write_text(json.dumps(record))
    again = heterophily.main(argv[:-len(heterophily.MODELS) - 1] + ["--datasets", "tolokers", "--models", "mesh"])
    assert again["tolokers"]["mesh"]["test"] == 0.123
    other = heterophily.main(argv[:-len(heterophily.MODELS) - 1] + ["--datasets", "tolokers", "--models", "mesh", "--k", "4"])
    assert other["tolokers"]["mesh"]["test"] != 0.123, "other settings: a run of their own, beside the cached one"
    assert len(list((tmp_path / "out" / "tolokers" / "mesh").glob("split0-*.json"))) == 2


def test_closed_gate_is_the_graph_net(heterophily):
    """With the gate at 0, ``mesh_gate`` computes what ``attn`` computes with the same weights (the mesh
    channel only feeds zeros into FFN columns), and the loss has a gradient on the gate."""
    args = heterophily.argparse.Namespace(hidden=16, heads=4, dropout=0.0, k=3, mesh_dim=4, layers=2,
                                          mesh_backend="auto", mesh_block=256)
    torch.manual_seed(0)
    x, y = torch.randn(30, 5), torch.randint(0, 2, (30,))
    edge_index = torch.randint(0, 30, (2, 80))
    gated = heterophily.build("mesh_gate", args, 5, 2).eval()
    plain = heterophily.build("attn", args, 5, 2).eval()
    with torch.no_grad():
        plain.encoder.load_state_dict(gated.encoder.state_dict())
        plain.norm.load_state_dict(gated.norm.state_dict())
        plain.head.load_state_dict(gated.head.state_dict())
        for p_block, g_block in zip(plain.blocks, gated.blocks):
            p_block.norm.load_state_dict(g_block.norm.state_dict())
            p_block.reads[0].load_state_dict(g_block.reads[0].state_dict())
            first = g_block.ffn[0]
            p_block.ffn[0].weight.copy_(first.weight[:, :2 * args.hidden])  # [h || graph read] columns
            p_block.ffn[0].bias.copy_(first.bias)
            p_block.ffn[3].load_state_dict(g_block.ffn[3].state_dict())
    out = gated(x, edge_index)
    assert torch.allclose(out, plain(x, edge_index), atol=1e-6)
    torch.nn.functional.cross_entropy(out, y).backward()
    assert all(b.reads[1].gate.grad.abs() > 0 for b in gated.blocks)


def test_roc_auc(heterophily):
    y = torch.tensor([0, 0, 1, 1])
    assert heterophily.roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), y) == 0.75
    assert heterophily.roc_auc(torch.zeros(4), y) == 0.5  # ties count half
