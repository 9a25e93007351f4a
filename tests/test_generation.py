import pytest
import torch

from tmt_pyg.models.generation import TMTCache, extend, sample_next
from test_model import CONFIGS, make_model


@pytest.mark.parametrize("name", ["full", "exits-firing", "no-anchors-learned-pos", "dense-decay-anchors", "vanilla", "window", "attention-mesh"])
def test_incremental_equals_full(name):
    model = make_model(**CONFIGS[name])
    ids = torch.randint(0, 50, (2, 30))
    full = model(ids).logits
    cache = TMTCache(model, ids[:, :10])
    torch.testing.assert_close(cache.last_logits, full[:, 9], atol=1e-5, rtol=1e-5)
    steps = torch.cat([extend(model, cache, ids[:, t:t + 1]) for t in range(10, 25)], 1)
    torch.testing.assert_close(steps, full[:, 10:25], atol=1e-4, rtol=1e-4)
    chunk = extend(model, cache, ids[:, 25:30])  # several tokens at once
    torch.testing.assert_close(chunk, full[:, 25:30], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["full", "exits-firing", "vanilla", "attention-mesh"])
def test_prompts_of_different_lengths_decode_together(name):
    """Rows of a batch decode together from prompts of different lengths; each row's logits equal a
    full forward over that row alone."""
    model = make_model(**CONFIGS[name])
    rows = [torch.randint(0, 50, (n,)) for n in (7, 12, 3)]
    cache = TMTCache(model, rows)
    new = torch.randint(0, 50, (3, 4))
    logits = torch.cat([extend(model, cache, new[:, t:t + 1]) for t in range(4)], 1)
    for row, prompt in enumerate(rows):
        full = model(torch.cat([prompt, new[row]]).unsqueeze(0)).logits[0]
        torch.testing.assert_close(logits[row], full[-4:], atol=1e-4, rtol=1e-4)
    out = model.generate(rows, 5, temperature=0)
    assert [o.numel() for o in out] == [12, 17, 8] and all(torch.equal(o[:p.numel()], p) for o, p in zip(out, rows))
    assert out[1][12] == model(rows[1].unsqueeze(0)).logits[0, -1].argmax()


def test_generate_shapes_and_determinism():
    model = make_model()
    idx = torch.randint(0, 50, (2, 5))
    a = model.generate(idx, 7, top_k=10, generator=torch.Generator().manual_seed(0))
    b = model.generate(idx, 7, top_k=10, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 12) and torch.equal(a, b) and torch.equal(a[:, :5], idx)
    greedy = model.generate(idx[:1], 3, temperature=0)
    assert greedy[0, 5] == model(idx[:1]).logits[0, -1].argmax()


def test_sampling_filters():
    logits = torch.tensor([0.0, 5.0, 4.0, -3.0])
    g = torch.Generator().manual_seed(0)
    assert {int(sample_next(logits, top_k=1, generator=g)) for _ in range(20)} == {1}
    picks = {int(sample_next(logits, top_p=0.9, generator=g)) for _ in range(200)}
    assert picks == {1, 2}
    rows = sample_next(torch.stack([logits, logits.flip(0)]), top_k=1, generator=g)  # one id per row
    assert rows.tolist() == [[1], [2]]


def test_generation_rejects_overlong_and_bidirectional():
    model = make_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="causal"):
        TMTCache(make_model(causal=False), torch.tensor([[1, 2]]))
