"""Closed-form learning coefficients: published test vectors, an independent cross-check, input validation."""
from fractions import Fraction

import numpy as np
import pytest
from helpers import dln_at, jacobian_rank_half

from slt_tools.theory import (
    dln_jacobian_rank_llc,
    dln_learning_coefficient,
    monomial_learning_coefficient,
    regular_learning_coefficient,
    rrr_learning_coefficient,
)


@pytest.mark.parametrize("widths, rank, expected", [
    ((5, 3, 5), 0, Fraction(13, 2)), ((10, 3, 10), 1, Fraction(18)), ((10, 3, 10), 3, Fraction(51, 2)),
    ((1, 1, 1, 1), 0, Fraction(1, 2)), ((4, 3, 8), 0, Fraction(6)), ((6, 5, 4, 7), 2, Fraction(14)),
    ((9, 4, 6), 1, Fraction(29, 2)),
    *[((10, 4, 4, 4, 10), r, v) for r, v in enumerate([6, 13, Fraction(39, 2), 26, 32])],
])
def test_dln_test_vectors(widths, rank, expected):
    lam, m = dln_learning_coefficient(widths, rank)
    assert lam == expected and isinstance(lam, Fraction) and m >= 1


@pytest.mark.parametrize("h0, h1", [(1, 1), (3, 7), (10, 4)])
def test_single_layer_is_regular(h0, h1):
    for r in range(min(h0, h1) + 1):
        assert dln_learning_coefficient((h0, h1), r) == (Fraction(h0 * h1, 2), 1)


def test_rrr_formula_equals_two_layer_dln():
    """Aoyagi & Watanabe's 2005 case analysis and Aoyagi's 2024 DLN formula are independent; they must agree."""
    for M in range(1, 8):
        for H in range(1, 8):
            for N in range(1, 8):
                for r in range(min(M, H, N) + 1):
                    assert rrr_learning_coefficient(M, H, N, r) == dln_learning_coefficient((M, H, N), r)


def test_dln_never_exceeds_regular_bound():
    rng = np.random.default_rng(0)
    for _ in range(200):
        widths = tuple(int(w) for w in rng.integers(1, 9, size=rng.integers(3, 6)))
        r = int(rng.integers(0, min(widths) + 1))
        lam, _ = dln_learning_coefficient(widths, r)
        d = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
        assert 0 < lam <= Fraction(d, 2) or (lam == 0 and d == 0)


def test_regular_and_monomials():
    assert regular_learning_coefficient(7) == (Fraction(7, 2), 1)
    assert monomial_learning_coefficient([1]) == (Fraction(1, 2), 1)
    assert monomial_learning_coefficient([2, 1]) == (Fraction(1, 4), 1)
    assert monomial_learning_coefficient([1, 1, 3]) == (Fraction(1, 6), 1)
    assert monomial_learning_coefficient([2, 2, 1]) == (Fraction(1, 4), 2)  # tie -> multiplicity 2
    assert monomial_learning_coefficient([1, 2], h=[1, 0]) == (Fraction(1, 4), 1)
    assert monomial_learning_coefficient([1, 0]) == (Fraction(1, 2), 1)  # k = 0 coordinates do not constrain


def test_jacobian_rank_matches_autograd_and_notes():
    for cut, truth in [((1,), Fraction(29, 2)), ((0,), Fraction(19)), ((0, 1), Fraction(7))]:
        model = dln_at((9, 4, 6), 1, cut)
        ws = [layer.weight.detach().double().numpy() for layer in model.layers]
        assert dln_jacobian_rank_llc(ws, rtol=1e-5) == truth
        assert jacobian_rank_half(model) == float(truth)


def test_jacobian_block_convention_against_finite_differences():
    rng = np.random.default_rng(1)
    ws = [rng.standard_normal((3, 4)), rng.standard_normal((2, 3)), rng.standard_normal((5, 2))]
    for i, w in enumerate(ws):
        eps = 1e-6
        dw = rng.standard_normal(w.shape)
        plus = [x.copy() for x in ws]
        plus[i] = plus[i] + eps * dw
        fd = (plus[2] @ plus[1] @ plus[0] - ws[2] @ ws[1] @ ws[0]) / eps
        left = np.eye(5)
        for x in ws[i + 1:][::-1]:
            left = left @ x
        right = np.eye(4)
        for x in ws[:i]:
            right = x @ right
        lin = np.kron(right.T, left) @ dw.reshape(-1, order="F")
        np.testing.assert_allclose(lin, fd.reshape(-1, order="F"), rtol=1e-4, atol=1e-5)


def test_bad_input():
    with pytest.raises(ValueError):
        dln_learning_coefficient((5,), 0)
    with pytest.raises(ValueError):
        dln_learning_coefficient((5, 0, 5), 0)
    with pytest.raises(ValueError):
        dln_learning_coefficient((5, 3, 5), 4)
    with pytest.raises(ValueError):
        rrr_learning_coefficient(3, 2, 3, 3)
    with pytest.raises(ValueError):
        monomial_learning_coefficient([0, 0])
    with pytest.raises(ValueError):
        monomial_learning_coefficient([1, 2], h=[0])
    with pytest.raises(ValueError):
        dln_jacobian_rank_llc([np.zeros((3, 4)), np.zeros((2, 2))])
