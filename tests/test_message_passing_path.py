"""The PyG path of the causal model (``TMTConfig(message_passing=True)``: MeshAttentionConv.propagate over
the mesh edges) against the fused slot path: the same outputs, gradients, attention edges and exits,
and the model's invariants (causality, batch invariance) on the PyG path itself."""
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


def pair(**switches):
    """A slot-path model and the same weights on the PyG path."""
    torch.manual_seed(0)
    fused = TMTModel(TMTConfig(**BASE, **switches))
    pyg = TMTModel(TMTConfig(**BASE, **switches, message_passing=True))
    assert fused.state_dict().keys() == pyg.state_dict().keys()
    pyg.load_state_dict(fused.state_dict())
    return fused, pyg


@pytest.mark.parametrize("name", list(VARIANTS))
def test_pyg_path_equals_the_fused_slot_path(name):
    fused, pyg = pair(**VARIANTS[name])
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
    with torch.no_grad():  # eval: ragged batch, exits acting (tau 0.5), attention as PyG edges
        a, b = (model.eval()(batch, return_attention_weights=True) for model in (fused, pyg))
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
