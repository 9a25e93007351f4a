import pytest
import torch

from tmt_pyg.models.generation import TMTCache, extend, sample_next
from test_model import CONFIGS, make_model


@pytest.mark.parametrize("name", ["full", "exits-firing", "no-anchors-learned-pos", "dense-decay-anchors", "vanilla"])
def test_incremental_equals_full(name):
    model = make_model(**CONFIGS[name])
    ids = torch.randint(0, 50, (30,))
    full = model(ids.unsqueeze(0)).logits[0]
    cache = TMTCache(model, ids[:10])
    torch.testing.assert_close(cache.last_logits, full[9], atol=1e-5, rtol=1e-5)
    steps = [extend(model, cache, ids[t:t + 1])[0] for t in range(10, 25)]
    torch.testing.assert_close(torch.stack(steps), full[10:25], atol=1e-4, rtol=1e-4)
    chunk = extend(model, cache, ids[25:30])  # several tokens at once
    torch.testing.assert_close(chunk, full[25:30], atol=1e-4, rtol=1e-4)


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


def test_generation_rejects_overlong_and_bidirectional():
    model = make_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="causal"):
        TMTCache(make_model(causal=False), torch.tensor([1, 2]))
