import pytest
import torch

from tmt_pyg.layers.ffn import DualStreamFFN, dual_stream


@pytest.mark.parametrize("bias", [True, False])
def test_dual_stream_packed_equals_its_definition(bias):
    """The packed form (three products and a lerp) is the module's g * syntax(x) + (1 - g) * semantic(x),
    g = sigmoid(W_g x), in its output and in the gradients of the input and of every parameter."""
    ffn = DualStreamFFN(24, 40, bias=bias).double()
    x = torch.randn(7, 24, dtype=torch.float64, requires_grad=True)
    reference = ffn(x)
    out = dual_stream(x, *ffn.packed())
    torch.testing.assert_close(out, reference)
    inputs = [x, *ffn.parameters()]
    for a, b in zip(torch.autograd.grad(out.square().sum(), inputs), torch.autograd.grad(reference.square().sum(), inputs)):
        torch.testing.assert_close(a, b)


def test_packed_weights_are_the_modules_weights():
    """What decoding packs once reads the same weights as the forward: equal outputs, and a weight
    changed after packing is not seen (the cache's contract: do not change the model while decoding)."""
    ffn = DualStreamFFN(16, 8)
    x = torch.randn(3, 16)
    packed = ffn.packed()
    assert packed[0].shape == (16 + 2 * 8, 16) and packed[2].shape == (2, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(dual_stream(x, *packed), ffn(x), rtol=1e-6, atol=1e-6)
        ffn.lin_gate.weight.add_(1.0)
        assert not torch.allclose(dual_stream(x, *packed), ffn(x))
