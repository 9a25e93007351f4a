import pytest
import torch
import torch.nn.functional as F

from tmt_pyg import TMTModel, tokens_to_batch
from tmt_pyg.layers.exit_gate import consistency_loss, decisiveness_loss
from test_model import CONFIGS, make_model


def run(model, lengths=(40, 25)):
    seqs = [torch.randint(0, 50, (n,)) for n in lengths]
    return model(tokens_to_batch(seqs), output_hidden_states=True)


@pytest.mark.parametrize("name", ["exits-firing", "routed", "window-only"])
def test_exited_state_is_frozen_bit_for_bit(name):
    model = make_model(n_layers=4, **CONFIGS[name])
    out = run(model)
    masks, hidden = out.exit_masks, out.hidden_states
    assert bool(masks[1:].any()), "the test needs exits"
    N = masks.size(1)
    for layer in range(1, 4):
        frozen = masks[layer]
        for later in range(layer, 5):  # input of every later layer and the final state
            assert torch.equal(hidden[later][:N][frozen], hidden[layer][:N][frozen])


def test_masks_are_monotone_and_match_confidences():
    model = make_model(n_layers=4, **CONFIGS["exits-firing"])
    out = run(model)
    masks, conf = out.exit_masks, out.confidences
    assert not bool(masks[0].any())
    assert bool((masks[1:] >= masks[:-1]).all())
    for layer in range(3):
        newly = masks[layer + 1] & ~masks[layer]
        assert torch.equal(newly, ~masks[layer] & (conf[layer] > model.config.exit_threshold))
        assert bool(conf[layer][masks[layer]].isnan().all())  # no gate work on exited tokens


def test_exited_tokens_do_no_work():
    model = make_model(n_layers=4, **CONFIGS["exits-firing"])
    rows = {"ffn": [], "query": [], "gate": []}
    for block in model.blocks:
        block.ffn.register_forward_hook(lambda m, i, o: rows["ffn"].append(i[0].size(0)))
        block.attn.lin_query.register_forward_hook(lambda m, i, o: rows["query"].append(i[0].size(0)))
        if block.exit_gate is not None:
            block.exit_gate.register_forward_hook(lambda m, i, o: rows["gate"].append(i[0].size(0)))
    out = run(model)
    active = (~out.exit_masks).sum(1)  # tokens processed per layer
    anchors = model.config.memory_anchors  # one set of anchor rows, shared by the batch (causal)
    assert rows["ffn"] == (active + anchors).tolist()
    assert rows["query"] == active.tolist()  # an anchor row reads only itself: no query
    assert rows["gate"] == active[:-1].tolist()
    assert out.rows_processed.tolist() == active.tolist()
    assert float(out.work_fraction) == pytest.approx(float(active.sum()) / (4 * active[0]))
    assert float(out.work_fraction) < 1


def test_every_token_exited():
    model = make_model(n_layers=3, exit_threshold=1e-6)
    out = run(model)
    assert bool(out.exit_masks[1].all()) and out.rows_processed.tolist()[1:] == [0, 0]
    assert torch.isfinite(out.logits).all()
    no_anchor = make_model(n_layers=3, exit_threshold=1e-6, use_anchors=False)
    assert torch.isfinite(run(no_anchor).logits).all()


def test_counted_flops_fall_with_exits():
    model = make_model(n_layers=4)
    full = run(model)
    model.config.exit_threshold = 0.6
    fewer = run(model)
    assert fewer.flops < full.flops


def test_exits_off_in_training_unless_asked():
    model = make_model(**CONFIGS["exits-firing"]).train()
    assert float(model(torch.randint(0, 50, (2, 20))).work_fraction) == 1.0
    model.config.exit_in_training = True
    assert float(model(torch.randint(0, 50, (2, 20))).work_fraction) < 1.0


def test_gate_objectives():
    c = torch.tensor([0.1, 0.5, 0.9])
    assert float(decisiveness_loss(c)) == pytest.approx(-(0.4 + 0.0 + 0.4) / 3)
    same, other = torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3])
    low = consistency_loss(torch.tensor([0.9, 0.1, 0.9]), same, other)
    high = consistency_loss(torch.tensor([0.1, 0.9, 0.1]), same, other)
    assert float(low) < float(high)


@pytest.mark.parametrize("gate_loss", ["consistency", "decisiveness"])
def test_gate_detach_keeps_the_gate_objective_out_of_the_trunk(gate_loss):
    """gate_detach: the gate objective's gradient reaches the gates and nothing else."""
    for detach in (False, True):
        model = make_model(gate_loss=gate_loss, gate_detach=detach)
        model(torch.randint(0, 50, (2, 24)), compute_loss=True).gate_loss.backward()
        reached = {name for name, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
        assert reached, "the gate objective must train something"
        in_trunk = {name for name in reached if "exit_gate" not in name}
        assert (not in_trunk) if detach else in_trunk, sorted(in_trunk)


def test_early_exit_loss_is_the_depth_weighted_loss_of_the_earlier_layers():
    model = make_model(exit_loss_weight=0.5)
    ids = torch.randint(0, 50, (2, 24))
    out = model(ids, compute_loss=True, output_hidden_states=True)
    target = ids[:, 1:].reshape(-1)
    layer_losses = [F.cross_entropy(model.lm_head(h[:48]).view(2, 24, -1)[:, :-1].reshape(-1, 50), target)
                    for h in out.hidden_states[1:-1]]  # after layers 1 .. L-1 (the last one is the LM loss)
    expected = sum((i + 1) * loss for i, loss in enumerate(layer_losses)) / sum(range(1, len(layer_losses) + 1))
    torch.testing.assert_close(out.exit_loss, expected)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.exit_loss + model.config.gate_loss_weight * out.gate_loss)
    out.exit_loss.backward()  # it trains the first layer, which the final loss reaches only through later ones
    assert model.blocks[0].ffn.lin_gate.weight.grad.abs().sum() > 0 and model.blocks[-1].ffn.lin_gate.weight.grad is None
    assert float(make_model()(ids, compute_loss=True).exit_loss) == 0  # off by default


@pytest.mark.parametrize("sampling", [dict(exit_loss_sample=8), dict(exit_loss_layers=1),
                                      dict(exit_loss_layers=2, exit_loss_sample=8)])
def test_sampled_early_exit_loss_is_unbiased(sampling):
    """exit_loss_sample=n scores n random tokens per batch, exit_loss_layers=k k early layers drawn in proportion
    to their weight; over many draws its mean, and its gradient's mean, equal the early-exit loss over every token
    and layer (and its gradient). The LM and gate losses are unchanged."""
    full, sampled = make_model(exit_loss_weight=0.5, use_exit=False), make_model(exit_loss_weight=0.5, use_exit=False, **sampling)
    sampled.load_state_dict(full.state_dict())
    ids = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(3))
    whole = full(ids, compute_loss=True)
    whole.exit_loss.backward()
    grad = full.blocks[0].ffn.lin_gate.weight.grad
    losses, grads = [], []
    draws = 200
    for draw in range(draws):
        torch.manual_seed(draw)
        out = sampled(ids, compute_loss=True)
        out.exit_loss.backward()
        losses.append(float(out.exit_loss.detach()))
        grads.append(sampled.blocks[0].ffn.lin_gate.weight.grad.clone())
        sampled.zero_grad()
    torch.testing.assert_close(out.lm_loss, whole.lm_loss)
    losses, grads = torch.tensor(losses), torch.stack(grads)
    assert float((grads - grads[0]).abs().amax()) > 0, "the draws differ"
    assert abs(float(losses.mean() - whole.exit_loss.detach())) <= 3 * float(losses.std()) / draws ** 0.5 + 1e-6, "unbiased (3 standard errors)"
    # the mean gradient's distance from the full one, against the distance its spread alone explains
    spread = (grads - grad).pow(2).sum(dim=(1, 2)).mean() / draws
    assert (grads.mean(0) - grad).pow(2).sum() <= 9 * spread, "gradient unbiased (3 standard errors)"
    for name in sampling:
        with pytest.raises(ValueError, match=name):
            make_model(**{name: -1})


def test_detached_gates_clipped_apart_leave_the_trunk_bit_identical(tmp_path):
    """Gates start from their own generator and, detached and clipped apart, never touch the trunk:
    with exits off the trained model is the same-seed vanilla model, bit for bit."""
    from tmt_pyg.models import TMTConfig
    from tmt_pyg.train import Trainer, TrainConfig
    from tmt_pyg.data import SequenceLoader

    stream = torch.randint(0, 50, (4000,))
    trunks = []
    for gates in (False, True):
        torch.manual_seed(0)
        model = TMTModel(TMTConfig.vanilla(vocab_size=50, d_model=32, n_heads=2, n_layers=3, mlp_dim=64, max_seq_len=32,
                                           dropout=0.0, use_exit=gates, gate_detach=True))
        cfg = TrainConfig(steps=4, batch_size=4, seq_len=32, lr=3e-3, warmup=1, eval_every=0, out_dir=str(tmp_path / str(gates)),
                          device="cpu", progress=False)
        Trainer(model, SequenceLoader(stream, 32, 4, seed=0), cfg=cfg).fit()
        trunks.append({n: p for n, p in model.state_dict().items() if "exit_gate" not in n})
    assert trunks[0].keys() == trunks[1].keys() and all(torch.equal(trunks[0][n], trunks[1][n]) for n in trunks[0])
