"""MeshGPSConv: PyG's GPS layer with the dense global attention replaced by mesh attention."""
import pytest
import torch
from torch_geometric.nn import GCNConv, GPSConv

from tmt_pyg import MeshGPSConv


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
