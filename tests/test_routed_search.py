import pytest
import torch
import torch.nn.functional as F

from tmt_pyg import TMTConfig, TMTModel
from tmt_pyg.layers.mesh import DynamicMesh
from tmt_pyg.layers.routed_search import as_blocks, block_summaries, neighbour_recall, routed_knn


def reference(u, uq, k, block, top, window):
    """The routing rule query by query in plain Python: positions (S, k) of one sequence, -1 = none."""
    S = u.size(0)
    out = torch.full((S, k), -1)
    for i in range(S):
        own = i // block
        scores = [(float(uq[i] @ u[b * block:(b + 1) * block].mean(0)), b) for b in range(own)]
        routed = [b for _, b in sorted(scores, reverse=True)[:top]]  # ties: the later block
        cand = [j for b in routed for j in range(b * block, (b + 1) * block)] + list(range(own * block, i - window))
        cand = [j for j in cand if j < i - window]
        best = sorted(cand, key=lambda j: (float(uq[i] @ u[j]), j), reverse=True)[:k]
        out[i, :len(best)] = torch.tensor(sorted(best), dtype=torch.long)
    return out


@pytest.mark.parametrize("S,block,top,window", [(37, 4, 2, 0), (64, 8, 3, 2), (50, 16, 1, 5), (20, 64, 4, 0)])
def test_routed_search_follows_its_rule(S, block, top, window):
    g = torch.Generator().manual_seed(S + block)
    u = F.normalize(torch.randn(2, S, 8, generator=g), dim=-1)
    uq = F.normalize(torch.randn(2, S, 8, generator=g), dim=-1)
    row, pos = torch.arange(2).repeat_interleave(S), torch.arange(S).repeat(2)
    found, valid = routed_knn(as_blocks(u, block), uq[row, pos], row, pos, 3, top, window)
    for r in range(2):
        got = torch.where(valid, found, -1)[row == r].sort(1).values
        want = reference(u[r], uq[r], 3, block, top, window).sort(1).values
        assert torch.equal(got, want)


@pytest.mark.parametrize("window", [0, 3])
def test_routing_to_every_earlier_block_is_the_exact_search(window):
    torch.manual_seed(0)
    exact = DynamicMesh(4, window=window, backend="dense", causal=True)
    every = DynamicMesh(4, window=window, search="routed", route_block=8, route_top=100, causal=True)
    batch = torch.tensor([0] * 70 + [1] * 33 + [2] * 5)
    x = torch.randn(batch.numel(), 12)
    for args in ((torch.randn(140, 12), None, None, 70), (x, batch, None, None), (x, batch, torch.arange(0, 108, 3), None)):
        a, b = exact.slots(*args), every.slots(*args)
        assert torch.equal(a.index, b.index) and torch.equal(a.valid, b.valid)


def test_routed_mesh_is_causal_and_batch_invariant():
    torch.manual_seed(1)
    mesh = DynamicMesh(3, window=2, search="routed", route_block=4, route_top=2, causal=True)
    x = torch.randn(3, 50, 16)
    alone = mesh.slots(x[1], seq_len=50)
    together = mesh.slots(x.flatten(0, 1), seq_len=50)
    assert torch.equal(together.index[50:100] - 50, alone.index)
    changed = x[1].clone()
    changed[30:] = torch.randn(20, 16)
    future = mesh.slots(changed, seq_len=50)
    assert torch.equal(future.index[:30], alone.index[:30])
    ragged = mesh.slots(torch.cat([x[0, :20], x[1], x[2, :7]]), torch.tensor([0] * 20 + [1] * 50 + [2] * 7))
    assert torch.equal(ragged.index[20:70] - 20, alone.index)


def test_neighbour_recall_counts_the_exact_slots_found():
    exact, valid = torch.tensor([[1, 2], [3, 0]]), torch.tensor([[True, True], [True, False]])
    assert neighbour_recall(exact, valid, exact, valid) == 1.0
    assert neighbour_recall(torch.tensor([[2, 5], [4, 0]]), valid, exact, valid) == pytest.approx(1 / 3)


def test_block_summaries_pad_the_last_block():
    u = torch.ones(1, 10, 2)
    s = block_summaries(u, 4)
    assert s.shape == (1, 3, 2) and torch.equal(s[0, :2], torch.ones(2, 2)) and torch.allclose(s[0, 2], torch.full((2,), 0.5))


def test_routed_search_needs_a_causal_mesh():
    with pytest.raises(ValueError, match="causal"):
        DynamicMesh(4, causal=False, search="routed")
    with pytest.raises(ValueError, match="mesh_search"):
        TMTConfig(mesh_search="nearest")
    with pytest.raises(ValueError, match="route_top"):
        DynamicMesh(4, search="routed", route_top=0, causal=True)


def test_routed_training_forward_compiles_as_one_graph():
    torch.manual_seed(0)
    cfg = TMTConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=2, graph_k=4, ffn_stream_dim=32, memory_anchors=4,
                    max_seq_len=64, dropout=0.0, mesh_search="routed", route_block=8, route_top=2)
    model = TMTModel(cfg)
    ids = torch.randint(0, 50, (2, 48))
    anchors = model.anchors.anchor_state.clone()
    torch.manual_seed(1)  # the gate objective samples tokens
    eager = model(ids, compute_loss=True)
    model.anchors.anchor_state.copy_(anchors)  # the EMA step ran in training mode
    torch.manual_seed(1)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, compute_loss=True)
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-5, rtol=1e-5)
    compiled.loss.backward()
