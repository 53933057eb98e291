"""Closed-form learning coefficients (real log canonical thresholds) — the ground truth for tests and benchmarks.

Exact arithmetic with :class:`fractions.Fraction`; no torch. Every function returns ``(λ, m)``: the learning
coefficient and its multiplicity (the order of the pole of the zeta function), so that the Bayes free energy is
F_n = n·L_n(w0) + λ·log n − (m − 1)·log log n + O_p(1) (Watanabe 2009).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from fractions import Fraction
from math import ceil

import numpy as np


def _check_widths(widths: Sequence[int]) -> list[int]:
    ws = [int(w) for w in widths]
    if len(ws) < 2:
        raise ValueError(f"a deep linear network needs at least two widths (input, output), got {list(widths)}")
    if min(ws) < 1:
        raise ValueError(f"widths must be positive integers, got {list(widths)}")
    return ws


def regular_learning_coefficient(d: int) -> tuple[Fraction, int]:
    """Regular (identifiable, non-degenerate Fisher information) model with d parameters: λ = d/2, m = 1."""
    if int(d) < 0:
        raise ValueError(f"the number of parameters must be non-negative, got {d}")
    return Fraction(int(d), 2), 1


def monomial_learning_coefficient(k: Sequence[int], h: Sequence[int] | None = None) -> tuple[Fraction, int]:
    """Normal crossing K(w) = Π_j w_j^{2k_j} with prior density ∝ Π_j |w_j|^{h_j} near 0.

    λ = min over j with k_j > 0 of (h_j + 1)/(2k_j);  m = number of j attaining the minimum (Watanabe 2009, ch. 2).
    """
    ks = [int(x) for x in k]
    hs = [0] * len(ks) if h is None else [int(x) for x in h]
    if len(hs) != len(ks):
        raise ValueError(f"k and h must have the same length, got {len(ks)} and {len(hs)}")
    if any(x < 0 for x in ks) or any(x < 0 for x in hs):
        raise ValueError("exponents k_j and h_j must be non-negative integers")
    ratios = [Fraction(hj + 1, 2 * kj) for kj, hj in zip(ks, hs) if kj > 0]
    if not ratios:
        raise ValueError("K(w) = 1 everywhere (all k_j = 0): no zero set, no learning coefficient")
    lam = min(ratios)
    return lam, sum(r == lam for r in ratios)


def dln_learning_coefficient(widths: Sequence[int], rank: int) -> tuple[Fraction, int]:
    """Aoyagi (2024), "Consideration on the learning efficiency of multiple-layered neural networks with linear units",
    Neural Networks 172:106132: the learning coefficient of a deep linear network f(x) = W_L⋯W_1 x with widths
    H_0 (input), …, H_L (output) at a true end-to-end matrix of rank r.

    With M_j = H_j − r, sort ascending and take the smallest subset Σ (the ℓ+1 smallest M's, ℓ ≥ 1) such that
    max_Σ M < min_{¬Σ} M,  Σ_Σ M ≥ ℓ·max_Σ M  and  Σ_Σ M < ℓ·min_{¬Σ} M  (conditions on ¬Σ vacuous when Σ is all).
    With S = Σ_Σ M, M̄ = ⌈S/ℓ⌉, a = S − (M̄ − 1)ℓ:
        λ = [−r² + r(H_0 + H_L)]/2 + a(ℓ − a)/(4ℓ) − ℓ(ℓ − 1)/4·(S/ℓ)² + ½·Σ_{i<j∈Σ} M_i M_j,   m = a(ℓ − a) + 1.
    One layer (L = 1) is a regular model: λ = H_0·H_1/2, m = 1.
    """
    ws = _check_widths(widths)
    r = int(rank)
    if r < 0 or r > min(ws):
        raise ValueError(f"rank must be between 0 and the smallest width {min(ws)}, got {rank}")
    if len(ws) == 2:
        return Fraction(ws[0] * ws[1], 2), 1
    ms = sorted(w - r for w in ws)
    for size in range(2, len(ms) + 1):
        sigma, rest = ms[:size], ms[size:]
        ell, s = size - 1, sum(sigma)
        if rest and not max(sigma) < min(rest):
            continue
        if s < ell * max(sigma):
            continue
        if rest and not s < ell * min(rest):
            continue
        break
    else:  # pragma: no cover - Aoyagi shows a subset always exists
        raise RuntimeError(f"no admissible subset for widths {ws}, rank {r}")
    m_bar = ceil(Fraction(s, ell))
    a = s - (m_bar - 1) * ell
    pair_sum = sum(sigma[i] * sigma[j] for i in range(len(sigma)) for j in range(i + 1, len(sigma)))
    lam = (Fraction(-r * r + r * (ws[0] + ws[-1]), 2) + Fraction(a * (ell - a), 4 * ell)
           - Fraction(ell * (ell - 1), 4) * Fraction(s, ell) ** 2 + Fraction(pair_sum, 2))
    return lam, a * (ell - a) + 1


def rrr_learning_coefficient(M: int, H: int, N: int, r: int) -> tuple[Fraction, int]:
    """Reduced-rank regression y = B A x (A: H×M, B: N×H) at a true matrix of rank r — Aoyagi & Watanabe (2005),
    "Stochastic complexities of reduced rank regression in Bayesian estimation", Neural Networks 18(7):924–933.

    Cases (M input, N output, H hidden, r true rank):
      1. N + r ≤ M + H, M + r ≤ N + H, H + r ≤ M + N:
         if M + H + N + r is even: λ = [2(H+r)(M+N) − (M−N)² − (H+r)²]/8, m = 1;
         if odd:                   λ = [2(H+r)(M+N) − (M−N)² − (H+r)² + 1]/8, m = 2.
      2. M + H < N + r:  λ = [HM − Hr + Nr]/2, m = 1.
      3. N + H < M + r:  λ = [HN − Hr + Mr]/2, m = 1.
      4. M + N < H + r:  λ = MN/2, m = 1.
    """
    M, H, N, r = (int(v) for v in (M, H, N, r))
    if min(M, H, N) < 1 or r < 0 or r > min(M, H, N):
        raise ValueError(f"need M, H, N ≥ 1 and 0 ≤ r ≤ min(M, H, N), got M={M}, H={H}, N={N}, r={r}")
    if M + H < N + r:
        return Fraction(H * M - H * r + N * r, 2), 1
    if N + H < M + r:
        return Fraction(H * N - H * r + M * r, 2), 1
    if M + N < H + r:
        return Fraction(M * N, 2), 1
    base = 2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2
    if (M + H + N + r) % 2 == 0:
        return Fraction(base, 8), 1
    return Fraction(base + 1, 8), 2


class NotMorseBottWarning(RuntimeWarning):
    """rank(J)/2 < Aoyagi's global λ: the point is not Morse–Bott, so rank(J)/2 is not its LLC."""


def _as_float_matrix(w: object) -> tuple[np.ndarray, float]:
    """(float64 copy, machine epsilon of the input's own dtype): ranks of float32 weights need float32 tolerances."""
    if hasattr(w, "detach"):  # a torch tensor
        w = w.detach().cpu().numpy()  # type: ignore[union-attr]
    arr = np.asarray(w)
    eps = float(np.finfo(arr.dtype).eps) if np.issubdtype(arr.dtype, np.floating) else float(np.finfo(float).eps)
    return arr.astype(float), eps


def numerical_rank(a: np.ndarray, eps: float, rtol: float | None = None) -> int:
    """Number of singular values above ``rtol``·σ_max, with ``rtol`` = max(shape)·eps by default (numpy's rule,
    but with the epsilon of the data's own precision)."""
    sv = np.linalg.svd(np.atleast_2d(a), compute_uv=False)
    if not sv.size or sv.max() == 0:
        return 0
    tol = max(a.shape) * eps if rtol is None else rtol
    return int((sv > tol * sv.max()).sum())


def dln_jacobian_rank_llc(weights: Sequence[np.ndarray], rtol: float | None = None) -> Fraction:
    """Local learning coefficient rank(J)/2 at a Morse–Bott point of a deep linear network.

    J is the Jacobian of (W_1, …, W_L) ↦ W_L⋯W_1 (``weights[i]`` has shape (H_{i+1}, H_i), as ``nn.Linear``). From
    d(W_L⋯W_1) = Σ_i A_i·dW_i·B_i with A_i = W_L⋯W_{i+1}, B_i = W_{i−1}⋯W_1, the block of J for W_i is
    B_iᵀ ⊗ A_i (column-major vec). Ranks count singular values above ``rtol``·σ_max, by default max(shape)·ε with ε
    the machine epsilon of the weights' own dtype (float32 weights keep "zero" singular values near 1e-7·σ_max).

    The LLC at a true parameter is at least Aoyagi's global λ (its minimum over the true parameters), so a value
    rank(J)/2 below :func:`dln_learning_coefficient` proves the point is not Morse–Bott: then rank(J)/2 is not its
    LLC, and a :class:`NotMorseBottWarning` says so.
    """
    pairs = [_as_float_matrix(w) for w in weights]
    if not pairs:
        raise ValueError("need at least one weight matrix")
    ws, eps = [w for w, _ in pairs], max(e for _, e in pairs)
    for a, b in zip(ws[:-1], ws[1:]):
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"weight shapes do not chain: {a.shape} then {b.shape}")
    blocks = []
    for i in range(len(ws)):
        left = np.eye(ws[-1].shape[0])
        for w in ws[i + 1:][::-1]:
            left = left @ w
        right = np.eye(ws[0].shape[1])
        for w in ws[:i]:
            right = w @ right
        blocks.append(np.kron(right.T, left))
    jac = np.concatenate(blocks, axis=1)
    value = Fraction(numerical_rank(jac, eps, rtol), 2)
    product = ws[0]
    for w in ws[1:]:
        product = w @ product
    widths = [ws[0].shape[1], *(w.shape[0] for w in ws)]
    global_lambda, _ = dln_learning_coefficient(widths, numerical_rank(product, eps, rtol))
    if value < global_lambda:
        warnings.warn(f"rank(J)/2 = {value} is below Aoyagi's global λ = {global_lambda} for widths {widths}: this "
                      "point is not Morse–Bott, so rank(J)/2 is not its local learning coefficient (which is ≥ the "
                      "global λ)", NotMorseBottWarning, stacklevel=2)
    return value


def finite_nbeta_monomial_llc(k: Sequence[int], nbeta: float, localization: float, form: str = "product") -> float:
    """Exact finite-nβ target of the LLC estimator for a steep potential, by numerical quadrature.

    Returns nβ·(E_p[L(w)] − L(0)) under p(w) ∝ exp(−nβ·L(w) − (γ/2)‖w‖²) (w* = 0, L(0) = 0), with
    ``form="product"``: L(w) = Π_j w_j^{2k_j} (normal crossing, at most 2 variables), or
    ``form="sum"``: L(w) = Σ_j w_j^{2k_j} (the posterior factorises, so the target is a sum of 1-D targets).
    This is what SGLD/MALA estimate at a finite nβ and γ > 0; as nβ → ∞ (γ fixed) it tends to the learning
    coefficient: 1/(2k) for L = w^{2k} (so 1/4 for w⁴, 1/6 for w⁶), min_j 1/(2k_j) for a product (slowly, with
    O(1/log nβ) corrections when the multiplicity m > 1; Watanabe 2009, ch. 2), Σ_j 1/(2k_j) for a sum.

    Numerics: w_j = s_j·v_j with s_j = nβ^{−1/(2k_j)} (1-D; product: the same per-coordinate scaling) turns the
    integrand into exp(−v^{2k} − γ s² v²/2), O(1) in v; adaptive Gauss–Kronrod (scipy.integrate.quad) on [0, R],
    using evenness in each w_j.
    """
    from scipy.integrate import quad

    ks = [int(x) for x in k]
    if not ks or min(ks) < 1:
        raise ValueError(f"exponents k_j must be positive integers, got {list(k)}")
    if not (nbeta > 0 and localization >= 0):
        raise ValueError(f"need nβ > 0 and γ ≥ 0, got nβ = {nbeta}, γ = {localization}")
    if form == "sum":
        return float(sum(finite_nbeta_monomial_llc([kj], nbeta, localization) for kj in ks))
    if form != "product":
        raise ValueError(f"form must be 'product' or 'sum', got {form!r}")
    if len(ks) == 1:
        s = nbeta ** (-1.0 / (2 * ks[0]))
        reach = 10.0  # e^{−v^{2k}} < e^{−100} beyond: the Gaussian factor only shrinks the tail further
        base = [lambda v, p=p: v ** (2 * ks[0] * p) * math.exp(-v ** (2 * ks[0]) - 0.5 * localization * (s * v) ** 2)
                for p in (0, 1)]
        z, num = (quad(f, 0, reach, limit=400, epsabs=1e-14, epsrel=1e-11)[0] for f in base)
        return num / z
    if len(ks) != 2:
        raise ValueError("form='product' handles one or two variables")
    if localization <= 0:
        raise ValueError("a product potential has non-compact zero set: it needs γ > 0")
    reach = 10.0 / math.sqrt(localization)

    def weight(w1: float, w2: float, p: int) -> float:
        kv = nbeta * w1 ** (2 * ks[0]) * w2 ** (2 * ks[1])
        return kv ** p * math.exp(-kv - 0.5 * localization * (w1 * w1 + w2 * w2))

    def outer(p: int) -> float:
        return quad(lambda w2: quad(lambda w1: weight(w1, w2, p), 0, reach, limit=200, epsabs=1e-13)[0],
                    0, reach, limit=200)[0]

    return outer(1) / outer(0)

