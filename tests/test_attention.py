import pytest
import torch
from torch_geometric.nn import Sequential

from tmt_pyg import DynamicMesh, MeshAttentionConv, TemporalDecay

from reference import dense_reference


@pytest.mark.parametrize("decay,rotary", [(True, False), (False, False), (True, True)])
def test_conv_equals_dense_reference(decay, rotary):
    torch.manual_seed(1)
    x = torch.randn(40, 32)
    batch = torch.tensor([0] * 25 + [1] * 15)
    pos = torch.cat([torch.arange(25), torch.arange(15)])
    pos[-2:] = -1  # two timeless nodes (anchors)
    edge_index, _ = DynamicMesh(5, causal=True)(x, batch)
    conv = MeshAttentionConv(32, 8, heads=4, decay=decay, rotary=rotary, max_seq_len=16).eval()
    with torch.no_grad():
        conv.decay is not None and conv.decay.omega.copy_(torch.tensor([0.5, 1.0, 2.0, 4.0]))
    out = conv(x, edge_index, pos)
    torch.testing.assert_close(out, dense_reference(conv, x, edge_index, pos), atol=1e-5, rtol=1e-5)


def test_attention_weights_shape_and_range():
    x = torch.randn(12, 16)
    edge_index, _ = DynamicMesh(3, causal=True)(x)
    conv = MeshAttentionConv(16, 4, heads=2, decay=True)
    out, (ei, alpha) = conv(x, edge_index, torch.arange(12), return_attention_weights=True)
    assert out.shape == (12, 8)
    assert torch.equal(ei, edge_index)
    assert alpha.shape == (edge_index.size(1), 2)
    assert bool(((alpha >= 0) & (alpha <= 1)).all())
    sums = torch.zeros(12, 2).index_add_(0, edge_index[1], alpha)
    assert bool((sums <= 1 + 1e-6).all())  # softmax sums to 1, decay only lowers it


def test_repr():
    conv = MeshAttentionConv(16, 4, heads=2, decay=True)
    assert str(conv) == "MeshAttentionConv(16, 4, heads=2, decay=True, rotary=False)"
    assert str(DynamicMesh(8, causal=True)) == "DynamicMesh(k=8, causal=True, backend='auto')"
    assert str(TemporalDecay(2, 1.5, 64)) == "TemporalDecay(heads=2, decay_rate=1.5, max_seq_len=64)"


def test_decay_is_one_at_zero_and_decreasing():
    decay = TemporalDecay(heads=3, decay_rate=2.0, max_seq_len=100)
    t_j = torch.zeros(50, dtype=torch.long)
    gamma = decay(torch.arange(50), t_j)
    torch.testing.assert_close(gamma[0], torch.ones(3))
    assert bool((gamma[1:] < gamma[:-1]).all())
    torch.testing.assert_close(decay.decay_scalars, torch.full((3,), 2.0))
    assert bool((decay(torch.tensor([30]), torch.tensor([-1])) == 1).all())  # timeless source


def test_empty_edge_set_and_bipartite():
    conv = MeshAttentionConv((16, 12), 4, heads=2, decay=False)
    x_src, x_dst = torch.randn(7, 16), torch.randn(3, 12)
    empty = torch.empty(2, 0, dtype=torch.long)
    out = conv((x_src, x_dst), empty)
    assert out.shape == (3, 8)
    torch.testing.assert_close(out, conv.lin_out.bias.expand(3, 8))
    edge_index = torch.tensor([[0, 6, 2], [0, 0, 2]])
    out, (_, alpha) = conv((x_src, x_dst), edge_index, return_attention_weights=True)
    assert out.shape == (3, 8) and alpha.shape == (3, 2)
    torch.testing.assert_close(alpha[2], torch.ones(2))


def test_gradients_reach_every_parameter():
    x = torch.randn(20, 16, requires_grad=True)
    conv = MeshAttentionConv(16, 4, heads=2, rotary=True, decay=True)
    edge_index, _ = DynamicMesh(4, causal=True)(x)
    conv(x, edge_index, torch.arange(20)).square().sum().backward()
    for name, p in conv.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_inside_pyg_sequential():
    model = Sequential("x, batch, pos", [
        (DynamicMesh(3, causal=True), "x, batch -> edge_index, edge_sim"),
        (MeshAttentionConv(16, 8, heads=2, decay=True), "x, edge_index, pos -> x"),
        (torch.nn.ReLU(), "x -> x"),
    ])
    out = model(torch.randn(10, 16), torch.zeros(10, dtype=torch.long), torch.arange(10))
    assert out.shape == (10, 16)


def test_compiled_equals_eager():
    torch._dynamo.reset()
    conv = MeshAttentionConv(16, 4, heads=2, decay=True).eval()
    x = torch.randn(30, 16)
    edge_index, _ = DynamicMesh(4, causal=True)(x)
    pos = torch.arange(30)
    eager = conv(x, edge_index, pos)
    compiled = torch.compile(conv)(x, edge_index, pos)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_relative_coordinates_on_both_paths():
    """``coord_channels``: the edge path equals a brute-force reference (the MLP of c_j - c_i added to
    keys and values), and the slot path (eager and compiled) equals the edge path, gradients included."""
    from tmt_pyg.layers import slot_attention as fused
    torch.manual_seed(0)
    x, coord = torch.randn(30, 16), torch.randn(30, 3)
    batch = torch.tensor([0] * 18 + [1] * 12)
    mesh = DynamicMesh(4, causal=False)
    edge_index, _ = mesh(x, batch)
    conv = MeshAttentionConv(16, 8, heads=2, coord_channels=3)
    assert str(conv).endswith("coord_channels=3)")
    plain = MeshAttentionConv(16, 8, heads=2)
    plain.load_state_dict({k: v for k, v in conv.state_dict().items() if not k.startswith("coord_nn")})
    torch.testing.assert_close(conv(x, edge_index, coord=coord), plain(x, edge_index))  # the encoding starts at zero
    with torch.no_grad():
        torch.nn.init.normal_(conv.coord_nn.lins[-1].weight)  # a learned encoding, for the comparisons below
    edge_out = conv(x, edge_index, coord=coord)
    edge_grads = torch.autograd.grad(edge_out.square().sum(), list(conv.parameters()))
    with torch.no_grad():  # reference: per target, softmax over in-edges of q_i . (k_j + r_ij), messages v_j + r_ij
        q, k, v = (lin(x).view(30, 2, 8) for lin in (conv.lin_query, conv.lin_key, conv.lin_value))
        ref = torch.zeros(30, 2, 8)
        for i in range(30):
            src = edge_index[0, edge_index[1] == i]
            rel = conv.coord_nn(coord[src] - coord[i]).view(-1, 2, 8)
            w = ((k[src] + rel) * q[i]).sum(-1).div(8 ** 0.5).softmax(0)  # (E_i, H)
            ref[i] = (w.unsqueeze(-1) * (v[src] + rel)).sum(0)
        torch.testing.assert_close(edge_out, conv.lin_out(ref.view(30, 16)), atol=1e-5, rtol=1e-5)
    table = mesh.slots(x, batch)
    assert torch.equal(table.target, torch.arange(30))
    for compiled in (False, True):
        fused.set_compile(compiled)
        try:
            key, value = conv.project_key_value(x, None)
            out, _ = conv.attend_slots(conv.project_query(x, None), key, value, table.index, table.valid, (None, None),
                                       coord=(coord, coord))
            grads = torch.autograd.grad(out.square().sum(), list(conv.parameters()))
        finally:
            fused.set_compile(False)
        torch.testing.assert_close(out, edge_out, atol=1e-5, rtol=1e-5)
        for a, b in zip(grads, edge_grads):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
