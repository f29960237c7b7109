"""Newton-Schulz against an SVD, the FP8 head op against fp32, and the LR/momentum schedules."""
import pytest
import torch

from records.recipes import record21

T = record21()  # these tests cover the record-21 recipe kept under records/


def quintic(s: torch.Tensor, steps: int) -> torch.Tensor:
    """What Newton-Schulz does to each singular value (NS maps U S V^T to U p(S) V^T)."""
    a, b, c = T.NEWTON_SCHULZ_COEFFS
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


def matrix_with_singular_values(shape, singular_values, generator):
    rows, cols = shape[-2:]
    u, _ = torch.linalg.qr(torch.randn(*shape[:-2], rows, rows, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(*shape[:-2], cols, cols, generator=generator, dtype=torch.float64))
    k = min(rows, cols)
    return u[..., :k] @ torch.diag_embed(singular_values) @ v[..., :k].mT


SHAPES = [(64, 64), (96, 32), (32, 96), (3, 48, 48)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.06)])
def test_newton_schulz_is_polar_factor_with_quintic_singular_values(shape, dtype, tolerance):
    generator = torch.Generator().manual_seed(sum(shape))
    k = min(shape[-2:])
    singular_values = torch.logspace(-1.3, 1.0, k, dtype=torch.float64).expand(*shape[:-2], k)  # 0.05 .. 10
    grad = matrix_with_singular_values(shape, singular_values, generator).float()
    result = T.newton_schulz_orthogonalize(grad, steps=5, dtype=dtype).double()
    assert result.shape == grad.shape

    u, s, vh = torch.linalg.svd(grad.double(), full_matrices=False)
    polar = u @ vh
    cosine = (result * polar).sum(dim=(-2, -1)) / (result.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cosine > 0.97).all(), f"direction differs from U V^T: cosine {cosine}"
    # In U, V coordinates the result is diagonal, with the quintic applied to s / ||G||_F.
    in_basis = u.mT @ result @ vh.mT
    diagonal = torch.diagonal(in_basis, dim1=-2, dim2=-1)
    off_diagonal = in_basis - torch.diag_embed(diagonal)
    assert off_diagonal.abs().max() < tolerance * 10, "result has components off the singular directions"
    expected = quintic(s / grad.double().norm(dim=(-2, -1), keepdim=True), steps=5)
    assert (diagonal - expected).abs().max() < tolerance * 10, "singular values differ from the quintic's"
    well_conditioned = s / s.amax(-1, keepdim=True) > 0.05  # small ones need more than 5 steps
    assert ((diagonal > 0.65) & (diagonal < 1.2))[well_conditioned].all(), "singular values outside [0.65, 1.2]"


def test_newton_schulz_band_of_the_quintic():
    # the known property of these coefficients: after 5 steps, values from ~0.05 to 1 land near 0.7..1.15
    after = quintic(torch.linspace(0.05, 1.0, 1000, dtype=torch.float64), steps=5)
    assert after.min() > 0.65 and after.max() < 1.2


def fp8_inputs(generator):
    x = torch.randn(256, 64, generator=generator)  # rms-normed activations
    w = torch.randn(128, 64, generator=generator) * 0.05  # head weights
    grad = torch.randn(256, 128, generator=generator) * 1e-4  # d(mean loss)/d(logits) scale
    return x, w, grad


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("compiled", [False, True])
def test_fp8_matmul_forward_and_gradients_match_fp32_within_fp8_precision(compiled):
    x, w, grad = fp8_inputs(torch.Generator().manual_seed(0))
    x.requires_grad_()
    w.requires_grad_()
    matmul = torch.compile(T.fp8_matmul) if compiled else T.fp8_matmul
    out = matmul(x, w)
    grad_x, grad_w = torch.autograd.grad(out, (x, w), grad)
    assert out.dtype == x.dtype and grad_w.dtype == torch.float32 and grad_x.shape == x.shape
    reference = x.detach() @ w.detach().T
    # e4m3 keeps 3 mantissa bits (<= 6.25% rounding per element), e5m2 2 bits (<= 12.5%)
    assert 1e-4 < relative_error(out, reference) < 0.06, "forward is not an FP8-precision matmul"
    assert 1e-4 < relative_error(grad_x, grad @ w.detach()) < 0.12, "input gradient wrong"
    assert 1e-4 < relative_error(grad_w, grad.T @ x.detach()) < 0.12, "weight gradient wrong"


def test_fp8_matmul_rejects_layouts_cuda_cannot_run():
    with pytest.raises(ValueError, match="divisible by 16"):
        T.fp8_matmul(torch.randn(20, 64), torch.randn(128, 64))
    with pytest.raises(ValueError, match="contiguous"):
        T.fp8_matmul(torch.randn(64, 32).T, torch.randn(128, 64))


def test_lr_schedule_and_momentum_warmup():
    s = T.Settings()
    assert T.lr_factor(0, s) == 1.0
    assert T.lr_factor(int(0.6 * s.num_iterations) - 1, s) == 1.0
    assert T.lr_factor(s.num_iterations, s) == pytest.approx(0.1)
    middle = round(0.8 * s.num_iterations)
    assert T.lr_factor(middle, s) == pytest.approx(0.1 + 0.9 * (1 - middle / s.num_iterations) / 0.4)
    assert T.muon_momentum(0, s) == pytest.approx(0.85)
    assert T.muon_momentum(150, s) == pytest.approx(0.90)
    assert T.muon_momentum(300, s) == pytest.approx(0.95) == T.muon_momentum(1000, s)
