import pytest
import torch

from tmt_pyg import TMTConfig, TMTModel, tokens_to_batch

SMALL = dict(vocab_size=50, d_model=32, n_heads=4, n_layers=3, graph_k=4, ffn_stream_dim=48, mlp_dim=64,
             memory_anchors=4, max_seq_len=64, dropout=0.0)
CONFIGS = {
    "full": dict(),
    "exits-firing": dict(exit_threshold=0.6),
    "no-anchors-learned-pos": dict(use_anchors=False, rope=False),
    "dense-decay-anchors": dict(use_mesh=False),
    "vanilla": dict(use_mesh=False, use_decay=False, use_exit=False, use_anchors=False, dual_stream=False),
    "cluster-backend": dict(mesh_backend="cluster"),
    "window": dict(mesh_window=3),
    "attention-mesh": dict(mesh_similarity="attention", mesh_window=2, exit_threshold=0.6),
    "routed": dict(mesh_search="routed", route_block=4, route_top=2, mesh_window=2, exit_threshold=0.6),
    "one-head-search": dict(search_heads=1, exit_threshold=0.6),
    "window-only": dict(graph_k=0, mesh_window=3, exit_threshold=0.6),  # the recall study's control: no content search
}


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = TMTModel(TMTConfig(**{**SMALL, **overrides})).eval()
    for block in model.blocks:  # spread the gate confidences so a low threshold really fires
        if block.exit_gate is not None:
            torch.nn.init.normal_(block.exit_gate.lin.weight, std=1.0)
            torch.nn.init.zeros_(block.exit_gate.lin.bias)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_causality(name):
    model = make_model(**CONFIGS[name])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (2, 40), generator=g)
    base = model(ids).logits
    for i in (0, 7, 23, 38):
        changed = ids.clone()
        changed[:, i + 1:] = torch.randint(0, 50, changed[:, i + 1:].shape, generator=g)
        out = model(changed).logits
        torch.testing.assert_close(out[:, :i + 1], base[:, :i + 1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[:, i + 1:], base[:, i + 1:])


def test_exits_actually_fire_in_the_causality_config():
    model = make_model(**CONFIGS["exits-firing"])
    out = model(torch.randint(0, 50, (2, 40)))
    assert 0 < float(out.exit_rate) < 1


@pytest.mark.parametrize("name", ["full", "exits-firing", "dense-decay-anchors", "vanilla", "routed", "one-head-search"])
def test_batch_invariance(name):
    model = make_model(**CONFIGS[name])
    seqs = [torch.randint(0, 50, (n,)) for n in (17, 40, 5, 29)]
    together = model(tokens_to_batch(seqs)).logits
    start = 0
    for s in seqs:
        alone = model(tokens_to_batch([s])).logits
        torch.testing.assert_close(together[start:start + s.numel()], alone, atol=1e-5, rtol=1e-5)
        start += s.numel()


def test_tensor_and_batch_inputs_agree():
    model = make_model()
    ids = torch.randint(0, 50, (3, 12))
    out = model(ids).logits
    assert out.shape == (3, 12, 50)
    torch.testing.assert_close(out.reshape(36, 50), model(tokens_to_batch(list(ids))).logits)


def test_loss_has_no_target_across_sequences():
    model = make_model()
    a, b = torch.randint(0, 50, (6,)), torch.randint(0, 50, (9,))
    out = model(tokens_to_batch([a, b]), compute_loss=True)
    logits = out.logits
    expected = torch.nn.functional.cross_entropy(torch.cat([logits[:5], logits[6:14]]), torch.cat([a[1:], b[1:]]))
    torch.testing.assert_close(out.lm_loss, expected)


@pytest.mark.parametrize("gate_loss", ["consistency", "decisiveness"])
def test_gradients_reach_every_parameter(gate_loss):
    model = make_model(gate_loss=gate_loss, rope=False).train()
    out = model(torch.randint(0, 50, (2, 30)), compute_loss=True)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), f"no gradient reaches {name}"


def test_output_fields():
    model = make_model()
    out = model(torch.randint(0, 50, (2, 10)), return_attention_weights=True)
    N = 20
    assert out.exit_masks.shape == (3, N) and out.confidences.shape == (2, N)
    assert out.decay_scalars.shape == (3, 4) and out.memory_state.shape == (4, 32)
    edge_index, sim = out.graph_edges
    assert edge_index.size(1) == sim.numel() and int(edge_index.max()) < N
    assert len(out.attentions) == 3 and out.attentions[0][1].shape == (out.attentions[0][0].size(1), 4)
    assert float(out.work_fraction) == 1.0 and out.flops > 0


def test_search_heads_picks_the_heads_the_mesh_compares():
    """search_heads=H is the full-width search; fewer heads build a different mesh from the first heads
    only (the other heads' keys can change without moving it); bad values fail early."""
    ids = torch.randint(0, 50, (2, 40))
    full, all_heads = make_model(), make_model(search_heads=SMALL["n_heads"])
    out = all_heads(ids)
    assert torch.equal(out.mesh.index, full(ids).mesh.index)
    one = make_model(search_heads=1)
    assert not torch.equal(one(ids).mesh.index, out.mesh.index)
    mesh = one(ids).mesh.index
    C = SMALL["d_model"] // SMALL["n_heads"]
    with torch.no_grad():  # the last layer's mesh reads only head 0's query/key rows
        one.blocks[-1].attn.lin_key.weight[C:] += torch.randn_like(one.blocks[-1].attn.lin_key.weight[C:])
        one.blocks[-1].attn.lin_query.weight[C:] += 1.0
    assert torch.equal(one(ids).mesh.index, mesh)
    assert one(ids).flops < out.flops
    with pytest.raises(ValueError, match="search_heads"):
        TMTConfig(n_heads=4, d_model=32, search_heads=5)
    with pytest.raises(ValueError, match="search_heads"):
        TMTConfig(mesh_similarity="state", search_heads=1)


def test_layer_dropout_skips_whole_sequences_in_training_only():
    """With layer dropout a training forward lets some sequences pass a layer unchanged (never layer 0),
    scales the others' update by 1 / (1 - p); evaluation is the model without it."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (64, 12))
    plain, dropped = make_model(use_exit=False), make_model(use_exit=False, layer_dropout=0.9)
    dropped.load_state_dict(plain.state_dict())
    torch.testing.assert_close(dropped(ids).logits, plain(ids).logits)
    dropped.train()
    out = dropped(ids, output_hidden_states=True)
    N = ids.numel()
    for layer, (h_in, h_out) in enumerate(zip(out.hidden_states[:-1], out.hidden_states[1:])):
        same = (h_in[:N] == h_out[:N]).all(1).view(64, 12)
        assert torch.equal(same.all(1), same.any(1))  # a sequence skips as a whole
        skipped = same.all(1).float().mean()
        p = 0.9 * layer / (SMALL["n_layers"] - 1)
        assert (skipped == 0) if layer == 0 else abs(skipped - p) < 0.2, (layer, skipped)
    with pytest.raises(ValueError, match="layer_dropout"):
        TMTConfig(layer_dropout=1.0)
