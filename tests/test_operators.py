# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Measurement operators: exact adjoints, known matrices, noise level, and refusals."""

import pytest
import torch

from diffsamplers.pipelines.operators import (
    BlurOperator,
    BoxInpainting,
    GaussianBlur,
    InpaintingOperator,
    MeasurementOperator,
    RandomInpainting,
    SuperResolution,
)

SHAPE = (3, 16, 16)


def motion_kernel() -> torch.Tensor:
    # an asymmetric kernel: a symmetric one would hide a flipped adjoint
    k = torch.zeros(5, 5)
    k[2, :4] = torch.tensor([0.1, 0.2, 0.3, 0.25])
    k[1, 3] = 0.15
    return k


OPERATORS = {
    "box": lambda: BoxInpainting(16, (6, 5), top_left=(2, 3)),
    "random": lambda: RandomInpainting(16, 0.6, seed=1),
    "sr2": lambda: SuperResolution(2),
    "sr4": lambda: SuperResolution(4),
    "gaussian-blur": lambda: GaussianBlur(7, 1.5),
    "motion-blur": lambda: BlurOperator(motion_kernel()),
}


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_adjoint_identity(name):
    op = OPERATORS[name]()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, *SHAPE, generator=gen, dtype=torch.float64)
    y = torch.randn(4, *op.measurement_shape(SHAPE), generator=gen, dtype=torch.float64)
    lhs = (y * op(x)).flatten(1).sum(1)
    rhs = (op.adjoint(y) * x).flatten(1).sum(1)
    assert torch.allclose(lhs, rhs, rtol=0, atol=1e-5 * lhs.abs().max().item())
    # float32 too (the solvers run in float32)
    lhs32 = (y.float() * op(x.float())).flatten(1).sum(1)
    rhs32 = (op.adjoint(y.float()) * x.float()).flatten(1).sum(1)
    assert torch.allclose(lhs32.double(), rhs32.double(), atol=1e-4)


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_matrix_transpose(name):
    # the adjoint's matrix is the exact transpose of the forward matrix, built column by column
    op = {"box": BoxInpainting(8, 3), "random": RandomInpainting(8, 0.5, seed=2)}.get(name) or OPERATORS[name]()
    shape = (1, 8, 8)
    basis = torch.eye(64, dtype=torch.float64).view(64, *shape)
    a = op(basis).flatten(1).T  # (m, 64)
    m = a.shape[0]
    at = op.adjoint(torch.eye(m, dtype=torch.float64).view(m, *op.measurement_shape(shape))).flatten(1)  # (m, 64)
    assert torch.allclose(at, a, atol=1e-12)


def test_known_values():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(SuperResolution(2)(x), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    box = BoxInpainting(4, 2)
    assert box.mask.sum() == 12 and box.mask[0, 1:3, 1:3].sum() == 0
    rand = RandomInpainting(10, 0.3, seed=0)
    assert int((rand.mask == 0).sum()) == 30
    g = GaussianBlur(5, 1.0)
    assert torch.isclose(g.kernel.sum(), torch.tensor(1.0)) and torch.equal(g.kernel, g.kernel.T)
    # a constant image keeps its value away from the (zero-padded) border
    assert torch.allclose(g(torch.ones(1, 1, 9, 9))[..., 2:-2, 2:-2], torch.ones(1, 1, 5, 5))


def test_project_replaces_observed_pixels():
    # PSLD's gluing target with a mask: x with the observed pixels replaced by y
    op = RandomInpainting(8, 0.5, seed=3)
    x, y = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8) * op.mask
    expected = torch.where(op.mask.bool(), y, x)
    assert torch.allclose(op.project(x, y), expected)


def test_measurement_noise_level():
    op = SuperResolution(2, noise_sigma=0.1)
    x = torch.zeros(64, 1, 16, 16)
    y = op.measure(x, torch.Generator().manual_seed(0))
    assert abs(y.std().item() - 0.1) < 0.005
    assert torch.equal(y, op.measure(x, torch.Generator().manual_seed(0)))
    box = BoxInpainting(16, 8, noise_sigma=0.05)
    yb = box.measure(torch.zeros(8, 1, 16, 16), torch.Generator().manual_seed(0))
    assert torch.all(yb[:, :, 4:12, 4:12] == 0)  # hidden pixels carry no noise: y is in the range of A


def test_shape_errors():
    op = SuperResolution(4)
    with pytest.raises(ValueError, match="multiple of the super-resolution factor"):
        op.measurement_shape((1, 10, 10))
    with pytest.raises(ValueError, match="measurement"):
        op.check_measurement(torch.zeros(1, 1, 8, 8), (1, 16, 16))
    with pytest.raises(TypeError, match="measurement"):
        op.check_measurement([[0.0]], (1, 16, 16))
    with pytest.raises(ValueError, match="mask"):
        BoxInpainting(8, 3).measurement_shape((1, 16, 16))
    with pytest.raises(ValueError, match="x"):
        op.measure(torch.zeros(16, 16))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: SuperResolution(0), "factor"),
        (lambda: SuperResolution(2, noise_sigma=-0.1), "noise_sigma"),
        (lambda: GaussianBlur(4, 1.0), "kernel_size"),
        (lambda: GaussianBlur(5, 0.0), "sigma"),
        (lambda: BlurOperator(torch.ones(4, 4)), "kernel"),
        (lambda: BoxInpainting(8, 9), "box_size"),
        (lambda: BoxInpainting(8, 2, top_left=(7, 0)), "top_left"),
        (lambda: RandomInpainting(8, 1.0), "fraction"),
        (lambda: InpaintingOperator(torch.full((4, 4), 0.5)), "mask"),
    ],
)
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_base_class_is_abstract():
    with pytest.raises(TypeError):
        MeasurementOperator()
