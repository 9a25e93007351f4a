"""What the mesh search learns from: exploration slots and the dense warm-up (training-only paths; inference
reads the mesh alone)."""
import copy
import dataclasses

import pytest
import torch

from tmt_pyg import TMTConfig, TMTModel
from tmt_pyg.layers import DynamicMesh

from test_model import SMALL, make_model
from test_trainer import make_trainer


def test_exploration_slots_are_new_earlier_tokens_in_training_only():
    torch.manual_seed(0)
    x, batch = torch.randn(30, 8), torch.tensor([0] * 12 + [1] * 18)
    mesh = DynamicMesh(2, causal=True, window=2, explore=5).train()
    slots = mesh.slots(x, batch)
    assert slots.index.shape == (30, 2 + 2 + 1 + 5)
    start = torch.tensor([0] * 12 + [12] * 18)
    explore, explore_valid = slots.index[:, 5:], slots.valid[:, 5:]
    assert bool(((explore >= start[:, None]) & (explore < torch.arange(30)[:, None]))[explore_valid].all()), "earlier, same sequence"
    assert not explore_valid[[0, 12]].any(), "a sequence's first token has nothing earlier"
    for row in range(30):  # no key twice in a row's table
        ids = slots.index[row][slots.valid[row]]
        assert ids.unique().numel() == ids.numel()
    assert explore_valid[20:].float().mean() > 0.3, "later tokens get exploration slots"
    plain = DynamicMesh(2, causal=True, window=2).eval()
    for a, b in zip(mesh.eval().slots(x, batch), plain.slots(x, batch)):
        assert (a is b is None) or torch.equal(a, b), "evaluation reads the mesh alone"
    with pytest.raises(ValueError, match="explore"):
        DynamicMesh(2, causal=False, explore=1)
    with pytest.raises(ValueError, match="mesh_explore"):
        TMTConfig(mesh_explore=-1)


@pytest.mark.parametrize("overrides", [dict(), dict(mesh_similarity="attention", mesh_window=2), dict(message_passing=True)],
                         ids=["default", "attention-mesh", "message-passing"])
def test_training_with_exploration_stays_causal(overrides):
    """With the same random draws, a training forward's outputs before position i do not depend on the tokens
    after it (the exploration slots are earlier tokens), and the exploration changes the training forward."""
    model = make_model(mesh_explore=4, **overrides).train()
    plain = make_model(**overrides).train()
    ids = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(1))

    start = {m: copy.deepcopy(m.state_dict()) for m in (model, plain)}

    def logits(m, tokens):  # from the same anchor state (a training forward moves the anchors' EMA) and draws
        m.load_state_dict(start[m])
        torch.manual_seed(5)
        return m(tokens).logits
    base = logits(model, ids)
    assert not torch.allclose(base, logits(plain, ids), atol=1e-4), "the exploration slots are read"
    for i in (0, 9, 30):
        changed = ids.clone()
        changed[:, i + 1:] = (changed[:, i + 1:] + 1) % 50
        torch.testing.assert_close(logits(model, changed)[:, :i + 1], base[:, :i + 1], atol=1e-5, rtol=1e-5)
    model.eval(), plain.eval()
    torch.testing.assert_close(logits(model, ids), logits(plain, ids))


def test_exploration_gives_unpicked_keys_a_gradient():
    """A key outside every token's mesh gets no gradient from the plain mesh attention, and one with exploration."""
    torch.manual_seed(0)
    cfg = TMTConfig(**{**SMALL, "n_layers": 1, "graph_k": 1, "mesh_window": 1, "use_anchors": False, "use_exit": False})
    ids = torch.randint(0, 50, (1, 40))

    def embedding_grad(explore):
        torch.manual_seed(0)
        model = TMTModel(dataclasses.replace(cfg, mesh_explore=explore)).train()
        h = model.wte(ids).detach().requires_grad_()
        model.wte.forward = lambda _ids: h  # read the embedding rows through a leaf tensor
        out = model(ids)
        out.logits[0, -1].sum().backward()
        return h.grad[0].norm(dim=-1), out.mesh
    grad, mesh = embedding_grad(0)
    read = set(mesh.index[mesh.target == 39][mesh.valid[mesh.target == 39]].tolist())
    unread = [j for j in range(39) if j not in read]
    assert unread and bool((grad[unread] == 0).all()), "the last token's gradient reaches only its slots"
    grad_explore, _ = embedding_grad(16)
    assert bool((grad_explore[unread] > 0).any())


def test_dense_warmup_attends_densely_with_the_same_weights():
    """model.dense_warmup: a training forward equals the dense model (use_mesh=False) with the same weights;
    evaluation still reads the mesh."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (3, 24))
    model, dense = make_model(mesh_dense_warmup=5, use_exit=False), make_model(use_mesh=False, use_exit=False)
    dense.load_state_dict(model.state_dict())
    mesh_eval = model(ids).logits
    model.dense_warmup = True
    torch.testing.assert_close(model(ids).logits, mesh_eval, msg="evaluation reads the mesh")
    model.train(), dense.train()
    torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
    model.dense_warmup = False
    assert not torch.allclose(model(ids).logits, dense(ids).logits, atol=1e-4)
    with pytest.raises(ValueError, match="mesh_dense_warmup"):
        TMTConfig(mesh_dense_warmup=-2)


def test_trainer_runs_the_first_steps_densely(tmp_path):
    trainer = make_trainer(tmp_path, steps=4, model_overrides={"mesh_dense_warmup": 2})
    seen = []
    trainer.model.register_forward_pre_hook(lambda m, args: seen.append(m.dense_warmup) if m.training else None)
    trainer.fit()
    assert seen == [True] * 4 + [False] * 4, "two micro-batches per step: steps 0 and 1 dense"
