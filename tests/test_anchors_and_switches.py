import math

import pytest
import torch
import torch.nn.functional as F

from tmt_pyg import MemoryAnchors, TMTConfig, TMTModel, count_parameters, match_parameters, tokens_to_batch
from tmt_pyg.layers.rotary import apply_rotary
from test_model import SMALL, make_model


def test_ema_math():
    anchors = MemoryAnchors(3, 2, momentum=0.9)
    anchors.anchor_state.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
    tokens = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    # anchor 0 read by both tokens, anchor 1 by token 1, anchor 2 by none
    weight = torch.tensor([[0.75, 0.0, 0.0], [0.25, 1.0, 0.0]])
    target = anchors.update(tokens, weight)
    torch.testing.assert_close(target[0], torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(anchors.anchor_state, torch.tensor([[0.15, 0.1], [0.9, 1.3], [5.0, 5.0]]))


def test_anchor_edges():
    anchors = MemoryAnchors(2, 4)
    tokens, batch = torch.tensor([0, 1, 4]), torch.tensor([0, 0, 1])
    causal = anchors.edges(tokens, batch, anchor_offset=5, causal=True)
    assert causal.tolist() == [[5, 6, 5, 6, 7, 8], [0, 0, 1, 1, 4, 4]]
    both = anchors.edges(tokens, batch, anchor_offset=5, causal=False)
    assert both.size(1) == 12 and both[:, 6:].tolist() == causal.flip(0).tolist()


def test_anchor_state_updates_in_training_only_and_is_saved():
    model = make_model()
    before = model.anchors.anchor_state.clone()
    model(torch.randint(0, 50, (2, 20)))
    assert torch.equal(model.anchors.anchor_state, before)  # eval: frozen
    model.train()(torch.randint(0, 50, (2, 20)))
    assert not torch.equal(model.anchors.anchor_state, before)
    assert "anchors.anchor_state" in model.state_dict()


def test_anchors_diverge_during_training():
    torch.manual_seed(0)
    model = TMTModel(TMTConfig(**{**SMALL, "memory_anchors": 8, "anchor_momentum": 0.9})).train()
    opt = model.configure_optimizers(0.0, 3e-3)
    for _ in range(30):
        loss = model(torch.randint(0, 50, (4, 32)), compute_loss=True).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    u = F.normalize(model.anchors.anchor_state, dim=-1)
    cos = u @ u.t()
    mean_pairwise = float(cos[~torch.eye(8, dtype=torch.bool)].mean())
    print(f"mean pairwise cosine of the anchors after 30 steps: {mean_pairwise:.3f}")
    assert mean_pairwise < 0.9


def test_bidirectional_anchors_read_tokens():
    model = make_model(causal=False)
    ids = torch.randint(0, 50, (1, 12))
    out = model(ids, output_hidden_states=True)
    anchor_rows = out.hidden_states[-1][12:]
    changed = ids.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 50
    out2 = model(changed, output_hidden_states=True)
    assert not torch.allclose(out2.hidden_states[-1][12:], anchor_rows)


SWITCHES = ["use_mesh", "use_decay", "use_exit", "use_anchors", "dual_stream", "rope"]


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_changes_the_computation(switch):
    full = make_model(exit_threshold=0.6)
    off = TMTModel(TMTConfig(**{**SMALL, "exit_threshold": 0.6, switch: False})).eval()
    off.load_state_dict(full.state_dict(), strict=False)  # share every weight both have
    ids = torch.randint(0, 50, (2, 30))
    assert not torch.allclose(full(ids).logits, off(ids).logits, atol=1e-4)


def reference_transformer(model, ids):
    """A straightforward dense causal transformer written with plain torch ops, same weights."""
    B, S = ids.shape
    h = model.wte(ids) * math.sqrt(model.config.d_model)
    H = model.config.n_heads
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    for block in model.blocks:
        x = block.ln_attn(h)
        conv = block.attn
        q, k, v = (lin(x).view(B, S, H, -1) for lin in (conv.lin_query, conv.lin_key, conv.lin_value))
        pos = torch.arange(S)
        q = torch.stack([apply_rotary(q[b], pos) for b in range(B)])
        k = torch.stack([apply_rotary(k[b], pos) for b in range(B)])
        att = torch.einsum("bihc,bjhc->bhij", q, k) / math.sqrt(q.size(-1))
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = torch.einsum("bhij,bjhc->bihc", att, v).reshape(B, S, -1)
        h = h + conv.lin_out(y)
        ffn = block.ffn
        h = h + ffn.lin_out(F.gelu(ffn.lin_in(block.ln_ffn(h))))
    return model.ln_f(h) @ model.wte.weight.t()


def test_all_off_is_a_plain_causal_transformer():
    model = TMTModel(TMTConfig.vanilla(**SMALL)).eval()
    ids = torch.randint(0, 50, (2, 24))
    torch.testing.assert_close(model(ids).logits, reference_transformer(model, ids), atol=1e-5, rtol=1e-5)
    ragged = [ids[0, :10], ids[1]]
    logits = model(tokens_to_batch(ragged)).logits  # padded path with a mask
    torch.testing.assert_close(logits[:10], reference_transformer(model, ids[:1, :10])[0], atol=1e-5, rtol=1e-5)


def test_parameter_matching():
    full = TMTConfig(**SMALL)
    vanilla = match_parameters(TMTConfig.vanilla(**SMALL), count_parameters(full))
    assert abs(count_parameters(vanilla) - count_parameters(full)) / count_parameters(full) <= 0.02
    assert count_parameters(full) == TMTModel(full).num_parameters()
    with pytest.raises(ValueError, match="cannot match"):
        match_parameters(TMTConfig.vanilla(**SMALL), 10)
