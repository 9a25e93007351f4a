"""The PyG path (``TMTConfig(message_passing=True)``: MeshAttentionConv.propagate over
the mesh edges) against the fused slot path, causal and bidirectional: the same outputs, gradients,
attention edges and exits; the model's invariants (causality, batch invariance) on the PyG path itself,
and batch invariance on the bidirectional slot path."""
import pytest
import torch

from tmt_pyg import TMTConfig, TMTModel
from tmt_pyg.data import tokens_to_batch

BASE = dict(vocab_size=50, d_model=32, n_heads=4, n_layers=3, graph_k=4, memory_anchors=4, max_seq_len=64,
            ffn_stream_dim=32, exit_threshold=0.5, dropout=0.0)
VARIANTS = {
    "default": {},
    "no anchors": dict(use_anchors=False),
    "no decay": dict(use_decay=False),
    "state mesh": dict(mesh_similarity="state", mesh_window=0),
    "one-head search": dict(search_heads=1),
    "routed search": dict(mesh_search="routed", route_block=8, route_top=2),
    "torch-cluster search": dict(mesh_backend="cluster"),
}
BIDIRECTIONAL = {
    "default": {},
    "no anchors": dict(use_anchors=False),
    "no decay": dict(use_decay=False),
    "torch-cluster search": dict(mesh_backend="cluster"),
}


def acting_threshold(model, batch) -> float:
    """A threshold at which about half the tokens exit after layer 1 (the untrained gates' confidences
    are far below the default)."""
    model.config.exit_threshold = 2.0
    with torch.no_grad():
        confidence = model.eval()(batch).confidences[0]
    return float(confidence.median())


def pair(**switches):
    """A slot-path model and the same weights on the PyG path."""
    torch.manual_seed(0)
    fused = TMTModel(TMTConfig(**BASE, **switches))
    pyg = TMTModel(TMTConfig(**BASE, **switches, message_passing=True))
    assert fused.state_dict().keys() == pyg.state_dict().keys()
    pyg.load_state_dict(fused.state_dict())
    return fused, pyg


@pytest.mark.parametrize("causal, name", [(True, n) for n in VARIANTS] + [(False, n) for n in BIDIRECTIONAL])
def test_pyg_path_equals_the_fused_slot_path(causal, name):
    """Causal: tokens over their slots with the anchors as the op's shared memory block. Bidirectional:
    tokens over their slots and their graph's anchors, anchors by message passing. Against message
    passing over every edge."""
    fused, pyg = pair(causal=causal, **(VARIANTS if causal else BIDIRECTIONAL)[name])
    ids = torch.randint(0, 50, (3, 40), generator=torch.Generator().manual_seed(1))
    outs = []
    for model in (fused, pyg):
        torch.manual_seed(2)  # the gate objective samples tokens
        out = model.train()(ids, compute_loss=True)
        out.loss.backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1].loss, outs[0].loss, atol=1e-6, rtol=1e-6)
    for (key, p), q in zip(fused.named_parameters(), pyg.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=f"gradient of {key}")
    batch = tokens_to_batch([torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(n)) for n in (30, 17, 41)])
    fused.config.exit_threshold = pyg.config.exit_threshold = acting_threshold(fused, batch)
    with torch.no_grad():  # eval: ragged batch, exits acting, attention as PyG edges
        a, b = (model.eval()(batch, return_attention_weights=True) for model in (fused, pyg))
    assert a.rows_processed[1] < batch.num_nodes  # exits acted
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.exit_masks, b.exit_masks) and a.rows_processed.tolist() == b.rows_processed.tolist()
    for (edges_a, alpha_a), (edges_b, alpha_b) in zip(a.attentions, b.attentions):
        assert torch.equal(edges_a, edges_b)
        torch.testing.assert_close(alpha_b, alpha_a, atol=1e-6, rtol=1e-5)


def test_pyg_path_is_causal_and_batch_invariant():
    _, pyg = pair()
    pyg.eval()
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 50, (n,), generator=g) for n in (25, 12, 33)]
    with torch.no_grad():
        together = pyg(tokens_to_batch(seqs)).logits
        alone = torch.cat([pyg(tokens_to_batch([s])).logits for s in seqs])
        changed = seqs[0].clone()
        changed[20:] = (changed[20:] + 1) % 50  # later tokens changed: earlier outputs stay
        prefix = pyg(tokens_to_batch([changed])).logits[:20]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prefix, alone[:20], atol=1e-5, rtol=1e-5)


def test_bidirectional_slot_path_is_batch_invariant_and_graph_order_equivariant():
    fused, _ = pair(causal=False)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 50, (n,), generator=g) for n in (25, 12, 33)]
    fused.config.exit_threshold = acting_threshold(fused, tokens_to_batch(seqs))
    with torch.no_grad():
        together = fused(tokens_to_batch(seqs)).logits
        alone = [fused(tokens_to_batch([s])).logits for s in seqs]
        reordered = fused(tokens_to_batch(seqs[::-1])).logits
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reordered, torch.cat(alone[::-1]), atol=1e-5, rtol=1e-5)
