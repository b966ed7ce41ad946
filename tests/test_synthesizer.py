"""Tests of the gradient and input synthesizers."""

import pytest
import torch

from zdni.synthesizer import GradientSynthesizer, InputSynthesizer


@pytest.mark.parametrize("shape", [(256,), (32, 8, 8)])
@pytest.mark.parametrize("conditioned", [False, True])
@pytest.mark.parametrize("hidden", [0, 2])
def test_gradient_synthesizer_starts_at_zero(shape: tuple[int, ...], conditioned: bool,
                                             hidden: int) -> None:
    """M predicts exactly zero before training, with the shape of its input."""
    m = GradientSynthesizer(shape, hidden=hidden, width=64, conditioned=conditioned)
    h = torch.randn(5, *shape)
    y = torch.randint(0, 10, (5,))
    out = m(h, y)
    assert out.shape == h.shape
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize(("x_shape", "target"), [((1, 28, 28), (256,)), ((3, 32, 32), (128, 16, 16)),
                                                 ((3, 32, 32), (512,))])
@pytest.mark.parametrize("conditioned", [False, True])
def test_input_synthesizer_starts_at_zero(x_shape: tuple[int, ...], target: tuple[int, ...],
                                          conditioned: bool) -> None:
    """I predicts exactly zero before training, with the stage input's shape."""
    i = InputSynthesizer(x_shape, target, hidden=1, width=32, conditioned=conditioned)
    out = i(torch.randn(3, *x_shape), torch.randint(0, 10, (3,)))
    assert out.shape == (3, *target)
    assert torch.count_nonzero(out) == 0


def test_conditioning_uses_the_label() -> None:
    """Once trained away from zero, a conditioned M answers differently for different labels."""
    m = GradientSynthesizer((8,), hidden=0, width=8, conditioned=True)
    torch.nn.init.normal_(m.net[-1].weight)
    h = torch.zeros(2, 8)
    out = m(h, torch.tensor([1, 2]))
    assert not torch.equal(out[0], out[1])
    unconditioned = GradientSynthesizer((8,), hidden=0, width=8, conditioned=False)
    torch.nn.init.normal_(unconditioned.net[-1].weight)
    out = unconditioned(h, torch.tensor([1, 2]))
    assert torch.equal(out[0], out[1])
