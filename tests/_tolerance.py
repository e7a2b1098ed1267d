"""The project's accuracy rule, shared by the kernel tests: a kernel's error against a float64 reference is
at most twice PyTorch's own error at the same precision, plus a small floor relative to the magnitude."""
import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64; 0 for an absent or empty ``a``."""
    if a is None or a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def magnitude(t: torch.Tensor) -> float:
    """max(1, max |t|): the scale a relative floor is taken against."""
    return max(1.0, t.double().abs().max().item()) if t is not None and t.numel() else 1.0


def assert_2x_torch(name, got, ref64, ref_lowp, rel_floor, terms=1):
    """|got - ref64| <= 2 |ref_lowp - ref64| + rel_floor * magnitude(ref64) * sqrt(terms); ``terms``: a scalar
    that sums that many products (dscale, dbias) gets a floor growing like sqrt(terms)."""
    e_got, e_torch = max_err(got, ref64), max_err(ref_lowp, ref64)
    bound = 2 * e_torch + rel_floor * magnitude(ref64) * max(1.0, terms ** 0.5)
    assert e_got <= bound, f"{name}: kernel error {e_got:.3g} > 2 x torch error {e_torch:.3g} + floor = {bound:.3g}"
