"""The heterophily example runs end to end in quick mode on the three shared datasets, under both recipes, a
rerun continues from its cached per-split results, and a gated mesh channel starts closed (the net is then
the plain graph net) and is opened by training. Luo et al.'s nets read the graph as a sparse matrix with the
same result as PyG's edge list, and Polynormer switches its global attention on after its local epochs."""
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
            # mesh_gps: its search runs inside MeshGPSConv, not timed apart
            uses_mesh = (model.startswith("mesh") or model.endswith("_mesh")) and model != "mesh_gps"
            assert (0 < r["mesh_share"] < 1) if uses_mesh else r["mesh_share"] == 0, (dataset, model, r)
            gated = model in ("mesh_gate", "gat_mesh", "gcn_mesh")  # (sgformer, polynormer: no mesh, no gate)
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


def test_luo_recipe_quick(heterophily, data_dir, tmp_path):
    """``--recipe luo``: Luo et al.'s nets at their Minesweeper depths, the new rows beside them, cached apart
    from the default recipe's runs and read back on a rerun."""
    if not (data_dir / "heterophilous").is_dir():
        pytest.skip(f"heterophilous datasets not found at {data_dir / 'heterophilous'}")
    models = ["gcn", "sage", "gat", "sgformer", "polynormer", "gps", "mesh_gate", "gcn_mesh"]
    argv = ["--quick", "--threads", "1", "--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out"), "--datasets", "minesweeper", "--recipe", "luo", "--models", *models]
    results = heterophily.main(argv)["minesweeper"]
    assert set(results) == set(models)
    assert all(0.0 <= r["test"] <= 1.0 and r["epochs"] == 5 for r in results.values()), results
    assert results["gcn"]["shape"] == "16 x 12" and results["sage"]["shape"] == "16 x 15" and results["gcn"]["lr"] == 0.01
    assert results["polynormer"]["shape"] == "128 x 10" and results["polynormer"]["lr"] == 1e-3  # 8 heads x 16
    # the tuned GCN with the gated mesh branch: GCN's recipe, its gates (one per layer after the first) moved
    assert results["gcn_mesh"]["shape"] == "16 x 12" and 0 < results["gcn_mesh"]["gate"] <= 5 * 0.01 + 1e-6
    assert 0 < results["gcn_mesh"]["mesh_share"] < 1
    cached, = (tmp_path / "out" / "minesweeper" / "gcn").glob("split0-*.json")
    record = json.loads(cached.read_text())
    assert record["settings"]["recipe"] == "luo" and record["settings"]["norm"] == "batch" and record["settings"]["residual"]
    record["test"] = 0.123
    cached.write_text(json.dumps(record))
    assert heterophily.main(argv[:-len(models)] + ["gcn"])["minesweeper"]["gcn"]["test"] == 0.123
    default = heterophily.main(argv[:argv.index("--recipe")] + ["--models", "gcn"])["minesweeper"]["gcn"]
    assert default["test"] != 0.123 and default["shape"] == "16 x 2", "the default recipe: runs of its own"
    assert len(list((tmp_path / "out" / "minesweeper" / "gcn").glob("split0-*.json"))) == 2


@pytest.mark.parametrize("kind", ["gcn", "sage", "gat"])
def test_luo_net_sparse_adjacency_is_the_edge_list(heterophily, kind):
    """LuoNet reads the graph as a CSR matrix (GCN, SAGE) or an edge list (GAT): the same output as each conv
    over the edge list with one self loop per node, the way Luo et al.'s code feeds them (the random graph here
    has self loops of its own)."""
    args = heterophily.argparse.Namespace(hidden=8, layers=3, heads=1, dropout=0.0, norm="layer", residual=True)
    net = heterophily.build(kind, args, 5, 3).eval()
    assert isinstance(net, heterophily.LuoNet) and len(net.convs) == 3 and len(net.skips) == 3
    x, edge_index = torch.randn(20, 5), heterophily.to_undirected(torch.randint(0, 20, (2, 50)), num_nodes=20)
    loops, _ = heterophily.add_self_loops(heterophily.remove_self_loops(edge_index)[0], num_nodes=20)
    h = x
    for conv, skip, norm in zip(net.convs, net.skips, net.norms):
        h = torch.relu(norm(conv(h, loops) + skip(h)))
    assert torch.allclose(net(x, edge_index), net.head(h), atol=1e-5)
    with pytest.raises(ValueError, match="norm must be one of"):
        heterophily.build(kind, heterophily.argparse.Namespace(**{**vars(args), "norm": "group"}), 5, 3)


def test_polynormer_turns_global_after_its_local_epochs(heterophily):
    """Polynormer trains its local attention alone for ``local_epochs``, then its global attention too (with
    several heads: PyG's class sizes that attention for one head, the example gives it heads x hidden)."""
    args = heterophily.argparse.Namespace(hidden=8, heads=2, layers=2, dropout=0.0, lr=1e-2, epochs=4, local_epochs=2,
                                          eval_every=1, patience=10, global_layers=1)
    torch.manual_seed(0)
    x, y = torch.randn(40, 5), torch.randint(0, 2, (40,))
    data = heterophily.Data(x=x, y=y, edge_index=heterophily.to_undirected(torch.randint(0, 40, (2, 120)), num_nodes=40),
                            **{f"{part}_mask": torch.rand(40, 1) < 0.5 for part in ("train", "val", "test")})
    model = heterophily.build("polynormer", args, 5, 2)
    assert not model.model._global
    r = heterophily.fit(model, data, 0, "roc_auc", args)
    assert model.model._global and r["epochs"] == 4
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.global_attn.parameters())
    bad = heterophily.argparse.Namespace(recipe="platonov", quick=False, k=8, mesh_dim=4, weight_decay=None,
                                         **{key: None for key in heterophily.BASE}, local_epochs=300)
    with pytest.raises(ValueError, match="must be below --epochs"):
        heterophily.settings_for(bad, "tolokers", "polynormer")


def test_tree_recall_of_mesh_gps(heterophily):
    """A MeshGPSConv searched by trees records its neighbour recall on the states it searched (below 1 on a
    graph above ``exact_max_nodes``); exact-search layers record nothing."""
    from torch_geometric.data import Data
    from tmt_pyg import MeshGPSConv
    torch.manual_seed(0)
    data = Data(x=torch.randn(600, 16), edge_index=torch.randint(0, 600, (2, 2000)))
    tree = MeshGPSConv(16, None, heads=2, k=8, search="tree", exact_max_nodes=100)
    tree.mesh.trees, tree.mesh.leaf_size = 1, 32  # one small-leaf tree: clearly approximate
    recall = heterophily.tree_recall(tree, data)
    assert len(recall) == 1 and 0 < recall[0] < 0.9
    assert heterophily.tree_recall(MeshGPSConv(16, None, heads=2, k=8, search="exact"), data) == []


def test_tuned_gcn_with_closed_mesh_gates_is_the_tuned_gcn(heterophily):
    """``gcn_mesh`` under the luo recipe is Luo et al.'s GCN plus gated mesh reads that start closed: with the
    same weights in the GCN part its output equals the GCN's until a gate opens."""
    from argparse import Namespace
    args = Namespace(hidden=16, heads=4, dropout=0.0, layers=3, norm="batch", residual=True, k=4, mesh_dim=4,
                     mesh_backend="auto", mesh_block=256)
    torch.manual_seed(0)
    with_mesh = heterophily.build("gcn_mesh", args, 8, 2).eval()
    plain = heterophily.build("gcn", args, 8, 2).eval()
    assert len(with_mesh.mesh_reads) == 2
    plain.load_state_dict({k: v for k, v in with_mesh.state_dict().items() if not k.startswith("mesh_reads")})
    x, edges = torch.randn(50, 8), torch.randint(0, 50, (2, 200))
    torch.testing.assert_close(with_mesh(x, edges), plain(x, edges))
    with torch.no_grad():
        with_mesh.mesh_reads[0][0].gate.fill_(1.0)
    assert not torch.allclose(with_mesh(x, edges), plain(x, edges))
