import pytest
import torch

from tmt_pyg.hf import TMTForCausalLM, TMTHFConfig
from tmt_pyg.models.generation import TMTCache, extend, filtered_probs
from tmt_pyg.models.speculative import speculative_generate
from test_model import CONFIGS, make_model


def sharp_model(name, **overrides):
    """A 4-layer test model whose later layers change the prediction (so drafts get rejected)."""
    model = make_model(**{**CONFIGS[name], "n_layers": 4, **overrides})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.blocks.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("name", ["full", "exits-firing", "routed", "no-anchors-learned-pos", "vanilla"])
def test_greedy_speculative_output_is_plain_greedy(name):
    model = sharp_model(name)
    prompts = [torch.randint(0, 50, (n,)) for n in (7, 12, 3)]
    plain = model.generate(prompts, 20, temperature=0)
    for layers, tokens in ((1, 3), (2, 5)):
        fast, stats = speculative_generate(model, prompts, 20, layers, tokens, temperature=0)
        assert all(torch.equal(a, b) for a, b in zip(plain, fast))
        assert 0 < stats.acceptance < 1  # drafts were both kept and rejected
        # the compilable steps (run eagerly here: the suite does not compile, see conftest)
        static, static_stats = speculative_generate(model, prompts, 20, layers, tokens, temperature=0, compiled=True)
        assert all(torch.equal(a, b) for a, b in zip(plain, static)) and static_stats == stats
    ids = torch.stack([p[:3] for p in prompts])
    assert torch.equal(model.generate(ids, 9, temperature=0, draft_layers=2), model.generate(ids, 9, temperature=0))


def test_draft_extension_runs_the_first_layers_only():
    model = sharp_model("full")
    ids = torch.randint(0, 50, (2, 12))
    cache = TMTCache(model, ids[:, :8])
    draft = extend(model, cache, ids[:, 8:9], num_layers=2)
    out = model(ids[:, :9], output_hidden_states=True)
    torch.testing.assert_close(draft[:, 0], model.lm_head(out.hidden_states[2][:18]).view(2, 9, -1)[:, -1], atol=1e-4, rtol=1e-4)


def test_speculative_sampling_keeps_the_full_models_distribution():
    """Sampled tokens 1-3 of 3000 rows: the empirical distribution of speculative sampling matches
    plain sampling within 0.05 total variation per position, while the draft alone is farther."""
    model = sharp_model("full", vocab_size=50)
    with torch.no_grad():
        model.wte.weight.mul_(6)  # sharper next-token distributions
    rows = torch.randint(0, 50, (1, 6)).expand(3000, -1)
    plain = model.generate(rows, 3, temperature=1.0, top_k=6, generator=torch.Generator().manual_seed(0))[:, 6:]
    spec, stats = speculative_generate(model, rows, 3, 1, 2, temperature=1.0, top_k=6, generator=torch.Generator().manual_seed(1))
    spec = spec[:, 6:]
    assert 0 < stats.acceptance < 1

    def tv(a, b):
        return 0.5 * (torch.bincount(a, minlength=50) - torch.bincount(b, minlength=50)).abs().sum().item() / a.numel()

    for t in range(3):
        assert tv(plain[:, t], spec[:, t]) < 0.05
    cache = TMTCache(model, rows[:1])
    draft = filtered_probs(extend(model, cache, rows[:1, -1:], num_layers=1)[0, -1], 1.0, 6)  # not the model's token 1
    full = filtered_probs(model(rows[:1]).logits[0, -1], 1.0, 6)
    assert 0.5 * (draft - full).abs().sum() > 0.05  # the draft alone would be told apart


def test_speculative_errors():
    model = make_model(n_layers=3)
    ids = torch.randint(0, 50, (1, 4))
    for bad in (0, 3, 1.5):
        with pytest.raises(ValueError, match="draft_layers"):
            model.generate(ids, 4, draft_layers=bad)
    with pytest.raises(ValueError, match="draft_tokens"):
        model.generate(ids, 4, draft_layers=1, draft_tokens=0)
    hf = TMTForCausalLM(TMTHFConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=3, max_seq_len=64)).eval()
    with pytest.raises(ValueError, match="draft_layers=1"):
        hf.generate(ids, max_new_tokens=4, assistant_early_exit=1)
