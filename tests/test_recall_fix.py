"""Issue 23: the memory anchors a token reads together carry one neighbour's prior weight (logits - log M)
on every attention path (slots, MessagePassing edges, dense), so that they do not take half of every read;
and the MQAR arms of the default model (benchmarks/recall.py --variants) run."""
import json
import math

import pytest
import torch

from benchmarks import recall
from tmt_pyg import DynamicMesh, MeshAttentionConv, TMTConfig, TMTModel
from tmt_pyg.layers.dense_attention import dense_causal_attention

from reference import random_batch


def flat_conv(decay: bool) -> MeshAttentionConv:
    """A conv whose queries are 0: every logit is 0, so the weights are the priors alone."""
    conv = MeshAttentionConv(16, 4, heads=2, decay=decay, max_seq_len=32).eval()
    with torch.no_grad():
        conv.lin_query.weight.zero_()
        conv.lin_query.bias.zero_()
    return conv


@pytest.mark.parametrize("decay", [False, True])
def test_anchors_together_start_with_one_neighbours_weight(decay):
    x, batch = random_batch([20], dim=16, seed=3, dtype=torch.float32)
    pos = torch.arange(20)
    slots = DynamicMesh(4, window=2, causal=True).slots(x, batch)
    conv = flat_conv(decay)
    M = 6
    key, value = conv.project_key_value(x, pos)
    memory = conv.project_key_value(torch.randn(M, 16), pos.new_full((M,), -1))
    _, alpha = conv.attend_slots(conv.project_query(x, pos), key, value, slots.index, slots.valid, (pos, pos), memory)
    S = slots.index.size(1)
    anchor_mass = alpha[:, S:].sum(1)  # (N, H): timeless, no decay
    expected = 1.0 / (slots.valid.sum(1, keepdim=True).float() + 1)  # valid slots plus one for the whole memory
    torch.testing.assert_close(anchor_mass, expected.expand_as(anchor_mass))
    if not decay:
        torch.testing.assert_close(alpha[:, :S].sum(1), 1 - expected.expand_as(anchor_mass))
    # the MessagePassing form of the same graph (anchors as timeless nodes) gives the same weights
    N = x.size(0)
    edges, _ = slots.edges()
    anchor_edges = torch.stack([torch.arange(N, N + M).repeat(N), torch.arange(N).repeat_interleave(M)])
    nodes = torch.cat([x, torch.randn(M, 16)])
    node_pos = torch.cat([pos, pos.new_full((M,), -1)])
    _, (ei, weights) = conv((nodes, x), torch.cat([edges, anchor_edges], 1), (node_pos, pos), return_attention_weights=True)
    per_target = torch.zeros(N, 2).index_add_(0, ei[1], torch.where((ei[0] >= N).unsqueeze(-1), weights, 0.0))
    torch.testing.assert_close(per_target, expected.expand_as(per_target))


@pytest.mark.parametrize("decay", [False, True])
def test_dense_path_equals_slot_path_with_anchors(decay):
    """Slots holding every earlier token (window >= S) make the mesh dense: the dense causal path with
    the anchors as memory rows must give the same output."""
    torch.manual_seed(4)
    lengths = [12, 7]
    x, batch = random_batch(lengths, dim=16, seed=4, dtype=torch.float32)
    pos = torch.cat([torch.arange(n) for n in lengths])
    conv = MeshAttentionConv(16, 4, heads=2, decay=decay, max_seq_len=16, rotary=True).eval()
    with torch.no_grad():
        conv.decay is not None and conv.decay.omega.copy_(torch.tensor([0.5, 3.0]))
    slots = DynamicMesh(1, window=12, causal=True).slots(x, batch)
    key, value = conv.project_key_value(x, pos)
    query = conv.project_query(x, pos)
    memory = conv.project_key_value(torch.randn(5, 16), pos.new_full((5,), -1))
    fast, _ = conv.attend_slots(query, key, value, slots.index, slots.valid, (pos, pos), memory)
    dense = dense_causal_attention(conv, query, key, value, pos, batch, len(lengths), torch.arange(x.size(0)), memory=memory)
    torch.testing.assert_close(fast, dense, atol=1e-5, rtol=1e-5)


def test_default_model_anchor_share_at_initialisation():
    """The regression of issue 23: 16 anchors against 17 slots took ~half of every read at step 0."""
    torch.manual_seed(0)
    size = dict(vocab_size=64, d_model=32, n_heads=2, n_layers=2, graph_k=8, dropout=0.0, max_seq_len=32)
    model = TMTModel(TMTConfig(**size))
    ids, answer = recall.mqar_batch(4, 32, 4, 64, torch.Generator().manual_seed(0))
    probe = recall.attention_probe(model, ids, answer)
    assert all(share < 0.15 for share in probe["anchor_mass"]), probe["anchor_mass"]
    assert all(math.isfinite(r) for rates in probe["decay_rates"] for r in rates)


def test_recall_variants_quick(tmp_path):
    result = recall.main(["--quick", "--threads", "1", "--out", str(tmp_path), "--variants", "vanilla", "default",
                          "--seeds", "0", "1", "--probes", "2", "--label", "test"])
    written = json.loads((tmp_path / "recall_default.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert (tmp_path / "recall_default.md").read_text().startswith("## recall_default")
    assert "python -m benchmarks.recall " in written["command"]
    rows = {r["variant"]: r for r in written["rows"]}
    assert set(rows) == {"vanilla", "default"} and all(r["seeds"] == [0, 1] for r in rows.values())
    assert rows["default"]["anchor_mass_answer"] is not None and rows["vanilla"]["anchor_mass_answer"] is None
    assert all(0 <= a <= 1 for r in rows.values() for a in r["accuracy"])
