"""Shared numerical kernels: the clamped Gaussians equal the plain formula where it matters."""

import math

import torch

from xanesdiff.numerics import MIN_GAUSSIAN_EXPONENT, gaussians


def plain_gaussians(x, centres, width):
    return torch.exp(-0.5 * ((x.unsqueeze(-1) - centres) / width) ** 2)


def test_gaussians_equal_the_plain_formula_and_its_gradient_down_to_the_clamp():
    x = torch.linspace(0.5, 6.0, 301, dtype=torch.float64).reshape(7, 43).requires_grad_(True)
    centres = torch.linspace(0.9, 5.0, 42, dtype=torch.float64)
    width = 0.1
    ours, plain = gaussians(x, centres, width), plain_gaussians(x, centres, width)
    assert ours.shape == (7, 43, 42)
    exponent = -0.5 * ((x.detach().unsqueeze(-1) - centres) / width) ** 2
    kept = exponent > MIN_GAUSSIAN_EXPONENT
    assert kept.any() and (~kept).any()  # both regimes are exercised
    torch.testing.assert_close(ours[kept], plain[kept], rtol=1e-12, atol=0)
    assert (ours[~kept] - plain[~kept]).abs().max() <= math.exp(MIN_GAUSSIAN_EXPONENT)
    weights = torch.randn_like(ours)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), x)
    (grad_plain,) = torch.autograd.grad((plain * weights).sum(), x)
    torch.testing.assert_close(grad_ours, grad_plain, rtol=1e-9, atol=1e-18)


def test_gaussians_never_underflow_in_float32():
    """Far bins stay at exp(MIN_GAUSSIAN_EXPONENT), a normal float32, never 0 or subnormal."""
    far = gaussians(torch.tensor([0.0, 100.0]), torch.tensor([50.0]), 0.1)
    assert far.dtype == torch.float32
    assert (far >= torch.finfo(torch.float32).tiny).all()
