"""The compiled slot attention against its eager reference: outputs, weights and gradients, ragged
shapes without a compile per batch, and the model's invariants with the fused op on."""
import pytest
import torch
from torch._dynamo.utils import counters

from tmt_pyg import TMTConfig, TMTModel
from tmt_pyg.data import tokens_to_batch
from tmt_pyg.layers import slot_attention as fused
from tmt_pyg.layers.slot_attention import fused_slot_attention, slot_attention


@pytest.fixture
def compiled():
    """The compiled op on for one test (the suite runs eagerly, see conftest)."""
    fused.set_compile(True)
    yield
    fused.set_compile(False)


def inputs(A: int, N: int, S: int = 7, H: int = 2, C: int = 8, M: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    leaf = lambda *shape: torch.randn(*shape, generator=g).requires_grad_()
    index = torch.randint(0, N, (A, S), generator=g)
    valid = torch.rand(A, S, generator=g) > 0.2
    valid[:, -1] = True  # the self slot
    pos = torch.arange(N)
    return (leaf(A, H, C), leaf(N, H, C), leaf(N, H, C), index, valid, leaf(M, H, C), leaf(M, H, C),
            torch.rand(H, generator=g).add(0.5).requires_grad_(), pos[-A:], pos, 64)


def run(fn, args):
    """Output, weights and the gradients of every input of ``fn(*args)``."""
    out, alpha = fn(*args)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad((out.square().sum() + (alpha * torch.linspace(0, 1, alpha.size(1)).view(1, -1, 1)).sum()), leaves)
    return out, alpha, grads


@pytest.mark.parametrize("memory_slots,relative", [(0, False), (2, False), (0, True)])
def test_compiled_equals_eager_with_gradients(compiled, memory_slots, relative):
    args = inputs(A=40, N=50) + (memory_slots,)  # memory_slots: the last 2 slots a row's own memory
    if relative:  # a per-slot term on keys and values (encoded relative coordinates)
        args = args + (0.0, False, torch.randn(40, 7, 2, 8).requires_grad_())
    ref, got = run(slot_attention, args), run(fused_slot_attention, args)
    assert {"forward", "backward"} <= set(fused._Fused.fns) and fused.compile_enabled()  # it did compile
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    names = ["query", "key", "value", "memory_key", "memory_value", "decay_rate"] + ["relative"] * relative
    assert len(got[2]) == len(names)
    for name, a, b in zip(names, got[2], ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_ragged_row_counts_do_not_compile_per_batch(compiled):
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        for A, N in [(30, 40), (31, 45), (17, 33), (40, 64), (23, 29)]:
            args = inputs(A, N)
            torch.testing.assert_close(fused_slot_attention(*args)[0], slot_attention(*args)[0], rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])  # static first, then dynamic rows


def test_model_with_the_fused_op_equals_eager(compiled, device):
    """Training loss and gradients of the default causal model (decay, anchors, window, exits), on a
    (B, S) batch and on a ragged Batch; eval with acting exits; the fused path's output is causal."""
    torch.manual_seed(0)
    model = TMTModel(TMTConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=2, graph_k=3, max_seq_len=32, dropout=0.0,
                               memory_anchors=3, ffn_stream_dim=16, exit_threshold=0.5)).to(device)
    ids = torch.randint(0, 50, (2, 24)).to(device)
    ragged = tokens_to_batch([ids[0, :24], ids[1, :13]])
    results, start = {}, {k: v.clone() for k, v in model.state_dict().items()}
    for on in (False, True):
        fused.set_compile(on)
        model.load_state_dict(start)  # the anchor EMA moves in every training forward
        torch.manual_seed(1)  # the gate loss samples its tokens
        model.train()
        loss = model(ids, compute_loss=True).loss + model(ragged, compute_loss=True).loss
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        model.eval()
        with torch.no_grad():
            out = model(ragged)
            prefix = model(tokens_to_batch([ids[0, :10]]))
        results[on] = loss, grads, out, prefix
    (loss0, grads0, out0, _), (loss1, grads1, out1, prefix1) = results[False], results[True]
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), grads1, grads0):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(out1.logits, out0.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(out1.exit_masks, out0.exit_masks)
    torch.testing.assert_close(prefix1.logits, out1.logits[:10], rtol=1e-5, atol=1e-5)  # later tokens change nothing
