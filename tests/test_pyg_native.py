"""TMT layers behave like native PyG layers: Sequential, bipartite input, device/dtype moves,
torch.compile, reprs."""
import copy
import math

import pytest
import torch
import torch_cluster
from torch_geometric import EdgeIndex
from torch_geometric.explain import AttentionExplainer, Explainer
from torch_geometric.nn import Sequential
from torch_geometric.nn.aggr import MaxAggregation
from torch_geometric.utils import coalesce, k_hop_subgraph, to_torch_coo_tensor, to_torch_csr_tensor

from tmt_pyg import DynamicMesh, MeshAttentionConv, TMTConfig, TMTModel, tokens_to_batch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def point_classifier() -> Sequential:
    """Bidirectional mesh on 3-D points -> attention -> mesh on features -> attention -> max pool."""
    return Sequential("x, batch", [
        (DynamicMesh(6, causal=False), "x, batch -> edge_index, edge_sim"),
        (MeshAttentionConv(3, 8, heads=2, decay=False), "x, edge_index -> h"),
        torch.nn.ReLU(),
        (DynamicMesh(6, causal=False), "h, batch -> edge_index, edge_sim"),
        (MeshAttentionConv(16, 8, heads=2, decay=False), "h, edge_index -> h"),
        (MaxAggregation(), "h, batch -> out"),
    ])


def token_mixer() -> Sequential:
    """Causal mesh + rotary/decayed attention, twice, as in a TMT layer stack."""
    return Sequential("x, batch, pos", [
        (DynamicMesh(3, causal=True), "x, batch -> edge_index, edge_sim"),
        (MeshAttentionConv(16, 8, heads=2, rotary=True, max_seq_len=32, decay=True), "x, edge_index, pos -> x"),
        (DynamicMesh(3, causal=True), "x, batch -> edge_index, edge_sim"),
        (MeshAttentionConv(16, 8, heads=2, rotary=True, max_seq_len=32, decay=True), "x, edge_index, pos -> x"),
    ])


def test_sequential_bidirectional_point_clouds():
    model = point_classifier().eval()
    clouds = [torch.randn(40, 3), torch.randn(25, 3) * 2]
    x, batch = torch.cat(clouds), torch.tensor([0] * 40 + [1] * 25)
    out = model(x, batch)
    assert out.shape == (2, 16)
    for b, cloud in enumerate(clouds):  # a graph's output does not depend on the others
        torch.testing.assert_close(model(cloud, torch.zeros(len(cloud), dtype=torch.long))[0], out[b], atol=1e-5, rtol=1e-5)
    rotated = torch.linalg.qr(torch.randn(3, 3))[0]
    ei, _ = model[0](x, batch)  # kNN of unit vectors: the mesh is invariant to rotations
    ei_rot, _ = model[0](x @ rotated, batch)
    assert set(map(tuple, ei.t().tolist())) == set(map(tuple, ei_rot.t().tolist()))


def test_sequential_causal():
    model = token_mixer().eval()
    x, batch = torch.randn(30, 16), torch.tensor([0] * 18 + [1] * 12)
    pos = torch.cat([torch.arange(18), torch.arange(12)])
    out = model(x, batch, pos)
    assert out.shape == (30, 16)
    changed = x.clone()
    changed[10:18] = torch.randn(8, 16)  # later nodes of graph 0 only
    out2 = model(changed, batch, pos)
    torch.testing.assert_close(out2[:10], out[:10])
    torch.testing.assert_close(out2[18:], out[18:])
    assert not torch.allclose(out2[10:18], out[10:18])


def test_bipartite_knn_interpolation():
    """Targets (e.g. a coarser point set) attend to their k nearest sources, as in PointNet++ upsampling."""
    pos_src, pos_dst = torch.rand(50, 3), torch.rand(12, 3)
    x_src, x_dst = torch.randn(50, 16, requires_grad=True), torch.randn(12, 8, requires_grad=True)
    target, source = torch_cluster.knn(pos_src, pos_dst, 5)  # for every target its 5 nearest sources
    edge_index = torch.stack([source, target])
    conv = MeshAttentionConv((16, 8), 4, heads=3, decay=False)
    out, (_, alpha) = conv((x_src, x_dst), edge_index, return_attention_weights=True)
    assert out.shape == (12, 12) and alpha.shape == (60, 3)
    torch.testing.assert_close(torch.zeros(12, 3).index_add_(0, target, alpha), torch.ones(12, 3))
    q = conv.lin_query(x_dst).view(12, 3, 4)[target]
    k, v = conv.lin_key(x_src).view(50, 3, 4)[source], conv.lin_value(x_src).view(50, 3, 4)[source]
    score = (q * k).sum(-1).view(12, 5, 3) / math.sqrt(4)  # knn lists the 5 edges of each target together
    expected = (score.softmax(1).unsqueeze(-1) * v.view(12, 5, 3, 4)).sum(1).reshape(12, 12)
    torch.testing.assert_close(out, conv.lin_out(expected), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert x_src.grad.abs().sum() > 0 and x_dst.grad.abs().sum() > 0
    decayed = MeshAttentionConv((16, 8), 4, heads=3, max_seq_len=64, decay=True)  # with times on both sides
    assert decayed((x_src, x_dst), edge_index, (torch.arange(50), torch.arange(12) * 4)).shape == (12, 12)


def test_device_and_dtype_moves():
    torch.manual_seed(1)
    x = torch.randn(30, 16)
    ei, _ = DynamicMesh(4, causal=True)(x)
    pos = torch.arange(30)
    conv = MeshAttentionConv(16, 4, heads=2, rotary=True, max_seq_len=64, decay=True).eval()
    ref = conv(x, ei, pos)
    moved = copy.deepcopy(conv).to(DEVICE)
    out = moved(x.to(DEVICE), ei.to(DEVICE), pos.to(DEVICE))
    assert out.device.type == DEVICE.type
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)
    out64 = copy.deepcopy(conv).double()(x.double(), ei, pos)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), ref, atol=1e-5, rtol=1e-5)

    torch.manual_seed(0)
    model = TMTModel(TMTConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=2, graph_k=4, ffn_stream_dim=48,
                               memory_anchors=4, max_seq_len=64, dropout=0.0)).eval()
    ids = torch.randint(0, 50, (2, 12))
    ref = model(ids).logits
    moved = copy.deepcopy(model).to(DEVICE)
    torch.testing.assert_close(moved(ids.to(DEVICE)).logits.cpu(), ref, atol=1e-5, rtol=1e-5)
    assert moved.anchors.anchor_state.device.type == DEVICE.type  # the buffer moves with the module
    torch.testing.assert_close(copy.deepcopy(model).double()(ids).logits.float(), ref, atol=1e-4, rtol=1e-4)


def test_conv_compiles_without_graph_breaks():
    torch._dynamo.reset()
    x = torch.randn(30, 16)
    ei, _ = DynamicMesh(4, causal=True)(x)
    pos = torch.arange(30)
    conv = MeshAttentionConv(16, 4, heads=2, rotary=True, max_seq_len=64, decay=True).eval()
    explain = torch._dynamo.explain(conv)(x, ei, pos, return_attention_weights=True)
    print(f"MeshAttentionConv: {explain.graph_count} graph(s), {explain.graph_break_count} graph break(s)")
    assert explain.graph_count == 1 and explain.graph_break_count == 0
    bipartite = MeshAttentionConv((16, 8), 4, heads=2, decay=False)
    explain = torch._dynamo.explain(bipartite)((x, torch.randn(5, 8)), torch.tensor([[0, 3, 7], [0, 1, 4]]))
    assert explain.graph_break_count == 0
    torch._dynamo.reset()
    eager, (_, alpha) = conv(x, ei, pos, return_attention_weights=True)
    compiled, (_, alpha_c) = torch.compile(conv)(x, ei, pos, return_attention_weights=True)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alpha_c, alpha, atol=1e-5, rtol=1e-5)


def test_compiled_model_equals_eager():
    """Graph breaks come from input validation (.item()) and data-dependent shapes (kNN, active rows)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TMTModel(TMTConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=2, graph_k=4, ffn_stream_dim=48,
                               memory_anchors=4, max_seq_len=64, dropout=0.0)).eval()
    batch = tokens_to_batch(torch.randint(0, 50, (2, 12)))  # a Batch; (B, S) tensors: README.md#mesh-compile-decoding-huggingface
    explain = torch._dynamo.explain(model)(batch)
    print(f"TMTModel: {explain.graph_count} graphs, {explain.graph_break_count} graph breaks")
    assert explain.graph_break_count > 0
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model)(batch).logits, model(batch).logits, atol=1e-5, rtol=1e-5)


def test_reprs():
    assert str(MeshAttentionConv((16, 12), 4, heads=2, decay=False, rotary=True)) == \
        "MeshAttentionConv((16, 12), 4, heads=2, decay=False, rotary=True)"
    assert str(DynamicMesh(6, causal=False, backend="cluster")) == "DynamicMesh(k=6, causal=False, backend='cluster')"
    assert str(point_classifier()) == (
        "Sequential(\n"
        "  (0) - DynamicMesh(k=6, causal=False, backend='auto'): x, batch -> edge_index, edge_sim\n"
        "  (1) - MeshAttentionConv(3, 8, heads=2, decay=False, rotary=False): x, edge_index -> h\n"
        "  (2) - ReLU(): h -> h\n"
        "  (3) - DynamicMesh(k=6, causal=False, backend='auto'): h, batch -> edge_index, edge_sim\n"
        "  (4) - MeshAttentionConv(16, 8, heads=2, decay=False, rotary=False): h, edge_index -> h\n"
        "  (5) - MaxAggregation(): h, batch -> out\n"
        ")")


def coalesced_graph(num_nodes: int = 12, num_edges: int = 50):
    """Random coalesced edge set (sorted by source, no duplicates) with every node a target."""
    ring = torch.arange(num_nodes)
    edge_index = torch.cat([torch.randint(0, num_nodes, (2, num_edges)), torch.stack([ring.roll(1), ring])], dim=1)
    return coalesce(edge_index, num_nodes=num_nodes)


@pytest.mark.parametrize("decay", [False, True])
def test_edge_index_and_sparse_inputs_equal_plain_call(decay):
    """``torch_geometric.EdgeIndex`` (sorted by source or by target) and a ``torch.sparse`` adj_t give
    the plain edge_index result; attention weights come in the order of the edges given."""
    N = 12
    edge_index = coalesced_graph(N)
    x, pos = torch.randn(N, 16), torch.randperm(N)
    conv = MeshAttentionConv(16, 4, heads=2, decay=decay, max_seq_len=N).eval()
    ref, (_, alpha) = conv(x, edge_index, pos, return_attention_weights=True)
    by_target = (edge_index[1] * N + edge_index[0]).argsort()  # order of the edges sorted by (target, source)

    out, (_, alpha_row) = conv(x, EdgeIndex(edge_index, sparse_size=(N, N), sort_order="row"), pos,
                               return_attention_weights=True)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(alpha_row, alpha, atol=1e-6, rtol=1e-5)

    sorted_index, perm = EdgeIndex(edge_index, sparse_size=(N, N)).sort_by("col")
    assert sorted_index.is_sorted_by_col and (edge_index[1, perm].diff() >= 0).all()
    out, (returned, alpha_col) = conv(x, sorted_index, pos, return_attention_weights=True)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(torch.as_tensor(returned), edge_index[:, perm])
    torch.testing.assert_close(alpha_col, alpha[perm], atol=1e-6, rtol=1e-5)

    for adj_t in (to_torch_csr_tensor(edge_index.flip(0), size=(N, N)), to_torch_coo_tensor(edge_index.flip(0), size=(N, N))):
        out, (_, alpha_sparse) = conv(x, adj_t, pos, return_attention_weights=True)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(alpha_sparse, alpha[by_target], atol=1e-6, rtol=1e-5)  # CSR order: by target


def test_attention_explainer():
    """PyG's AttentionExplainer reads the weights of every MeshAttentionConv: its edge mask is the
    maximum over heads and layers of the attention weights, on the edges of the explained node's
    receptive field."""
    N = 12
    edge_index = coalesced_graph(N)
    model = Sequential("x, edge_index", [
        (MeshAttentionConv(16, 4, heads=2, decay=False), "x, edge_index -> h"),
        torch.nn.ReLU(),
        (MeshAttentionConv(8, 3, heads=3, decay=False, concat=False), "h, edge_index -> out"),
    ]).eval()
    x = torch.randn(N, 16)
    explainer = Explainer(model, algorithm=AttentionExplainer(), explanation_type="model", edge_mask_type="object",
                          model_config=dict(mode="multiclass_classification", task_level="node", return_type="raw"))
    explanation = explainer(x, edge_index, index=3)
    _, (_, alpha1) = model[0](x, edge_index, return_attention_weights=True)
    _, (_, alpha2) = model[2](model[1](model[0](x, edge_index)), edge_index, return_attention_weights=True)
    _, _, _, receptive = k_hop_subgraph(3, 2, edge_index, num_nodes=N)  # edges that can reach node 3 in 2 layers
    expected = torch.maximum(alpha1.max(dim=1).values, alpha2.max(dim=1).values) * receptive
    assert explanation.edge_mask.shape == (edge_index.size(1),) and 0 < receptive.sum() < edge_index.size(1)
    torch.testing.assert_close(explanation.edge_mask, expected)
    assert explanation.edge_mask.max() <= 1 and (explanation.edge_mask[receptive] > 0).all()
