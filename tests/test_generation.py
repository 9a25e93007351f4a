import pytest
import torch
from torch._dynamo.utils import counters

from tmt_pyg.layers import slot_attention as fused
from tmt_pyg.models.generation import TMTCache, decode_layer, extend, sample_next, static_extend
from test_model import CONFIGS, make_model

DECODING = {**CONFIGS,
            # the vanilla attention (fused SDPA over the cache) until a token exits, dense slots after
            "vanilla-exits": {**CONFIGS["vanilla"], "use_exit": True, "exit_threshold": 0.6},
            "all-exit": dict(exit_threshold=1e-6)}  # every token exits after layer 0: later layers only fill caches


@pytest.mark.parametrize("name", ["full", "exits-firing", "no-anchors-learned-pos", "dense-decay-anchors", "vanilla", "window",
                                  "attention-mesh", "vanilla-exits", "all-exit", "routed", "one-head-search", "window-only"])
def test_incremental_equals_full(name, device):
    model = make_model(**DECODING[name]).to(device)
    ids = torch.randint(0, 50, (2, 30)).to(device)
    out = model(ids)
    full = out.logits
    assert name not in ("exits-firing", "vanilla-exits", "all-exit") or float(out.exit_rate) > 0  # the exit path runs
    cache = TMTCache(model, ids[:, :10])
    torch.testing.assert_close(cache.last_logits, full[:, 9], atol=1e-5, rtol=1e-5)
    steps = torch.cat([extend(model, cache, ids[:, t:t + 1]) for t in range(10, 25)], 1)
    torch.testing.assert_close(steps, full[:, 10:25], atol=1e-4, rtol=1e-4)
    chunk = extend(model, cache, ids[:, 25:30])  # several tokens at once
    torch.testing.assert_close(chunk, full[:, 25:30], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["full", "exits-firing", "vanilla", "attention-mesh", "vanilla-exits", "routed",
                                  "one-head-search"])
def test_prompts_of_different_lengths_decode_together(name, device):
    """Rows of a batch decode together from prompts of different lengths, one token and then two at a
    time; each row's logits equal a full forward over that row alone."""
    model = make_model(**DECODING[name]).to(device)
    rows = [torch.randint(0, 50, (n,)).to(device) for n in (7, 12, 3)]
    cache = TMTCache(model, rows)
    new = torch.randint(0, 50, (3, 6)).to(device)
    logits = torch.cat([extend(model, cache, new[:, t:t + 1]) for t in range(4)] + [extend(model, cache, new[:, 4:])], 1)
    assert cache.host_lengths == [13, 18, 9] == cache.lengths.tolist()
    for row, prompt in enumerate(rows):
        full = model(torch.cat([prompt, new[row]]).unsqueeze(0)).logits[0]
        torch.testing.assert_close(logits[row], full[-6:], atol=1e-4, rtol=1e-4)
    out = model.generate(rows, 5, temperature=0)
    assert [o.numel() for o in out] == [12, 17, 8] and all(torch.equal(o[:p.numel()], p) for o, p in zip(out, rows))
    assert out[1][12] == model(rows[1].unsqueeze(0)).logits[0, -1].argmax()


@pytest.mark.parametrize("name", ["full", "dense-decay-anchors", "vanilla-exits", "no-anchors-learned-pos"])
@pytest.mark.parametrize("n", [1, 3])
def test_layer_step_on_all_tokens_equals_selected_rows(name, n):
    """A decoding layer that runs on every new token (no exit yet: no row selection; vanilla: fused
    attention) equals the same layer with every row selected, as after an exit, for the kept
    states, the caches it writes and the gate."""
    model = make_model(**DECODING[name])
    cache = TMTCache(model, [torch.randint(0, 50, (k,)) for k in (9, 4)])
    step = cache.step(model, n)
    h = torch.randn(2 * n, model.config.d_model)
    with torch.no_grad():
        for block, layer in zip(model.blocks, cache.layers):
            out, fired = decode_layer(model, block, layer, h, step, None)
            written = [t.clone() for t in (layer.state, layer.key, layer.value)]
            selected, fired_selected = decode_layer(model, block, layer, h, step, torch.arange(2 * n))
            torch.testing.assert_close(out, selected, atol=1e-5, rtol=1e-5)
            assert all(torch.equal(a, b) for a, b in zip(written, (layer.state, layer.key, layer.value)))
            assert (fired is None) == (fired_selected is None) and (fired is None or torch.equal(fired, fired_selected))
            h = out


@pytest.mark.parametrize("name", ["full", "exits-firing", "all-exit", "vanilla", "vanilla-exits", "routed", "window",
                                  "no-anchors-learned-pos", "dense-decay-anchors", "window-only"])
def test_static_step_equals_the_selecting_step(name):
    """The compilable step (the whole capacity under masks, exited tokens frozen by keeping their
    state) gives the logits and caches of :func:`extend`, on rows of different lengths, one and then
    three new tokens at a time."""
    model = make_model(**DECODING[name])
    rows = [torch.randint(0, 50, (n,)) for n in (7, 12, 3)]
    selecting, static = TMTCache(model, rows, capacity=24), TMTCache(model, rows, capacity=24)
    new = torch.randint(0, 50, (3, 6))
    for chunk in (slice(0, 1), slice(1, 2), slice(2, 5), slice(5, 6)):
        expected = extend(model, selecting, new[:, chunk])
        with torch.no_grad():
            got = static_extend(model, static, new[:, chunk])
        static.lengths = static.lengths + got.size(1)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(selecting.layers, static.layers):
        for x, y in ((a.state, b.state), (a.key, b.key), (a.value, b.value)):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_compiled_generation_gives_the_same_tokens():
    """``generate(compiled=True)`` (each step one compiled graph) continues every prompt with the
    tokens of the eager decoder, with exits firing and rows of different lengths."""
    model = make_model(**DECODING["exits-firing"])
    rows = [torch.randint(0, 50, (n,)) for n in (7, 12)]
    eager = model.generate(rows, 6, temperature=0)
    fused.set_compile(True)  # the suite runs eagerly (conftest)
    try:
        graphs = counters["stats"]["unique_graphs"]
        compiled = model.generate(rows, 6, temperature=0, compiled=True)
        assert counters["stats"]["unique_graphs"] > graphs  # it did compile
    finally:
        fused.set_compile(False)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


def test_lengths_kept_on_the_host_follow_a_reorder():
    """Beam search reorders the cache's rows by assigning ``lengths``: the host copy follows."""
    cache = TMTCache(make_model(), [torch.randint(0, 50, (k,)) for k in (5, 2, 7)])
    cache.lengths = cache.lengths[torch.tensor([2, 2, 0])]
    assert cache.host_lengths == [7, 7, 5]


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
