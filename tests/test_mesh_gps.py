"""MeshGPSConv: PyG's GPS layer with the dense global attention replaced by mesh attention."""
import pytest
import torch
from torch_geometric.nn import GCNConv, GPSConv

from tmt_pyg import DynamicMesh, MeshGPSConv
from tmt_pyg.layers import slot_attention as fused


def graph_batch():
    """Two graphs (7 and 5 nodes), each an undirected ring (its edges listed together), 8 channels."""
    sizes = [7, 5]
    edges, start = [], 0
    for n in sizes:
        ring = torch.arange(n) + start
        ring = torch.stack([ring, ring.roll(1)])
        edges.append(torch.cat([ring, ring.flip(0)], dim=1))
        start += n
    edge_index = torch.cat(edges, dim=1)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return torch.randn(sum(sizes), 8), edge_index, batch


def copy_into_gps(layer: MeshGPSConv, gps: GPSConv) -> None:
    """Give PyG's GPSConv the mesh layer's weights: its attention is MultiheadAttention with the
    query/key/value projections stacked and ``lin_out`` as output projection."""
    attn = layer.attn
    gps.attn.in_proj_weight.data = torch.cat([attn.lin_query.weight, attn.lin_key.weight, attn.lin_value.weight]).detach().clone()
    gps.attn.in_proj_bias.data = torch.cat([attn.lin_query.bias, attn.lin_key.bias, attn.lin_value.bias]).detach().clone()
    gps.attn.out_proj.load_state_dict(attn.lin_out.state_dict())
    gps.mlp.load_state_dict(layer.mlp.state_dict())


@pytest.mark.parametrize("with_conv", [True, False])
def test_complete_mesh_equals_pyg_gpsconv(with_conv):
    """With k >= largest graph - 1 every node attends to its whole graph: the layer is PyG's GPSConv."""
    x, edge_index, batch = graph_batch()
    conv = GCNConv(8, 8) if with_conv else None
    layer = MeshGPSConv(8, conv, heads=2, k=6, norm=None).eval()
    gps = GPSConv(8, conv, heads=2, norm=None).eval()
    copy_into_gps(layer, gps)
    torch.testing.assert_close(layer(x, edge_index, batch), gps(x, edge_index, batch), atol=1e-5, rtol=1e-5)
    sparse = MeshGPSConv(8, conv, heads=2, k=2, norm=None).eval()  # a real mesh is a different (sparser) attention
    sparse.load_state_dict(layer.state_dict())
    assert not torch.allclose(sparse(x, edge_index, batch), layer(x, edge_index, batch), atol=1e-3)


@pytest.mark.parametrize("norm", ["batch_norm", "layer_norm", "graph_norm"])
def test_shapes_gradients_and_batch_invariance(norm):
    x, edge_index, batch = graph_batch()
    layer = MeshGPSConv(8, GCNConv(8, 8), heads=4, k=3, dropout=0.1, attn_dropout=0.1, norm=norm)
    x.requires_grad_()
    out = layer(x, edge_index, batch)
    assert out.shape == (12, 8)
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)
    if norm == "batch_norm":
        return  # batch statistics mix graphs in training; eval mode is checked below
    layer.eval()
    out = layer(x, edge_index, batch)
    first = batch == 0
    alone = layer(x[first], edge_index[:, :14], torch.zeros(7, dtype=torch.long))  # the first graph's 14 edges
    torch.testing.assert_close(alone, out[first], atol=1e-5, rtol=1e-5)


def test_repr_and_errors():
    assert str(MeshGPSConv(16, None, heads=4, k=8)) == "MeshGPSConv(16, conv=None, heads=4, k=8)"
    assert str(MeshGPSConv(16, GCNConv(16, 16), heads=2)) == "MeshGPSConv(16, conv=GCNConv(16, 16), heads=2, k=16)"
    with pytest.raises(ValueError, match="heads \\(3\\) must divide channels \\(16\\)"):
        MeshGPSConv(16, None, heads=3)


def clustered_graphs(sizes, channels=8, seed=0):
    """Graphs of the given sizes with clustered node features (a mesh with clear neighbours) and ring edges."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, channels, generator=g)
    x = centres[torch.randint(0, 6, (sum(sizes),), generator=g)] + 0.3 * torch.randn(sum(sizes), channels, generator=g)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    start = torch.cumsum(torch.tensor([0] + sizes[:-1]), 0)[batch]
    rank = torch.arange(sum(sizes)) - start
    ring = torch.stack([torch.arange(sum(sizes)), start + (rank + 1) % torch.tensor(sizes)[batch]])
    return x, torch.cat([ring, ring.flip(0)], 1), batch


@pytest.fixture
def compile_mode(request):
    """The slot attention compiled for one test where it asks (the suite runs eagerly, see conftest)."""
    fused.set_compile(request.param)
    yield request.param
    fused.set_compile(False)


@pytest.mark.parametrize("search,compile_mode", [("exact", False), ("tree", False), ("exact", True)],
                         indirect=["compile_mode"], ids=["exact", "tree", "exact-compiled"])
def test_slot_path_equals_edge_path(search, compile_mode):
    """The fused slot attention over the mesh table = MeshAttentionConv.propagate over the mesh's edges:
    outputs, attention weights and every gradient (a 3-node graph leaves slots invalid)."""
    x, _, batch = clustered_graphs([90, 3, 40])
    layer = MeshGPSConv(8, None, heads=2, k=5, search=search)
    layer.mesh = DynamicMesh(5, causal=False, search=search, exact_max_nodes=50, leaf_size=16)  # trees of several leaves
    x.requires_grad_()
    mesh = layer.mesh.checked_slots(x, batch)
    assert not bool(mesh.valid.all())
    edge_index, _ = mesh.edges()
    attn = layer.attn
    fast, alpha = attn.attend_slots(attn.project_query(x, None), *attn.project_key_value(x, None), mesh.index, mesh.valid,
                                    (None, None))
    slow, (_, slow_alpha) = attn(x, edge_index, return_attention_weights=True)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alpha[mesh.valid], slow_alpha, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(fast)
    params = [x] + list(attn.parameters())
    fast_grads = torch.autograd.grad((fast * weights).sum(), params)
    slow_grads = torch.autograd.grad((slow * weights).sum(), params)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if compile_mode:
        assert "backward" in fused._Fused.fns and fused.compile_enabled()  # it did compile
    _, (layer_edges, layer_alpha) = layer.eval()(x, None, batch, return_attention_weights=True)
    assert torch.equal(layer_edges, edge_index) and layer_alpha.shape == (edge_index.size(1), 2)
    torch.testing.assert_close(layer_alpha, slow_alpha, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("search", ["exact", "tree"])
def test_permutation_equivariance_and_batch_invariance(search):
    """Nodes permuted within their graphs: outputs permuted alike; a graph alone = the same graph in a batch."""
    sizes = [70, 9, 50]
    x, edge_index, batch = clustered_graphs(sizes)
    layer = MeshGPSConv(8, GCNConv(8, 8), heads=2, k=4, norm="layer_norm", search=search).eval()
    layer.mesh = DynamicMesh(4, causal=False, search=search, exact_max_nodes=40, leaf_size=12)  # trees of several leaves
    out = layer(x, edge_index, batch)
    perm = torch.cat([torch.randperm(n) + s for n, s in zip(sizes, [0, 70, 79])])  # new node i is old node perm[i]
    inverse = perm.argsort()
    torch.testing.assert_close(layer(x[perm], inverse[edge_index], batch), out[perm], atol=1e-5, rtol=1e-5)
    first = batch == 0
    keep = first[edge_index[0]]
    torch.testing.assert_close(layer(x[first], edge_index[:, keep], batch[first]), out[first], atol=1e-5, rtol=1e-5)
    last = batch == 2
    keep = last[edge_index[0]]
    torch.testing.assert_close(layer(x[last], edge_index[:, keep] - 79, batch[last] - 2), out[last], atol=1e-5, rtol=1e-5)


def test_coordinates_on_the_mesh_edges():
    """coord_channels=3: the relative encoding of `coord` on the fused slot path equals MeshAttentionConv's
    edge path over the same mesh; a fresh layer equals the one without coordinates; bad coord is refused."""
    x, edge_index, batch = graph_batch()
    pos = torch.randn(x.size(0), 3)
    plain = MeshGPSConv(8, None, heads=2, k=3, norm=None).eval()
    layer = MeshGPSConv(8, None, heads=2, k=3, norm=None, coord_channels=3).eval()
    layer.load_state_dict(plain.state_dict(), strict=False)
    torch.testing.assert_close(layer(x, edge_index, batch, coord=pos), plain(x, edge_index, batch))
    for lin in layer.attn.coord_nn.lins:  # a trained encoding: no longer zero
        torch.nn.init.normal_(lin.weight)
    out = layer(x, edge_index, batch, coord=pos)
    mesh_edges = layer.mesh.checked_slots(x, batch).edges()[0]
    h = layer.attn(x, mesh_edges, coord=pos) + x
    torch.testing.assert_close(out, h + layer.mlp(h), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, plain(x, edge_index, batch), atol=1e-3)
    layer.train()
    layer(x, edge_index, batch, coord=pos).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.attn.coord_nn.parameters())
    with pytest.raises(ValueError, match=r"^MeshGPSConv\(coord_channels=3\) needs node coordinates"):
        layer(x, edge_index, batch)
    with pytest.raises(ValueError, match="coord_channels=D"):
        plain(x, edge_index, batch, coord=pos)
    with pytest.raises(ValueError, match="NaN"):
        layer(x, edge_index, batch, coord=torch.full_like(pos, float("nan")))
