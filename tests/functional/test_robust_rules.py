"""Krum, Multi-Krum, Bulyan, CenteredClip and the adaptive-clipping formulas of
``lightning_metafed.functional.aggregate``, written from their papers' definitions: hand-computed
small cases (2-D points spread over two parameters, so distances must be taken over all parameters
of a client together) and plain-Python/NumPy references. Each hand case names the plausible wrong
implementation ("mutation") it rules out."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_metafed.functional.aggregate import (
    adaptive_clip_update,
    adaptive_noise_multiplier,
    bulyan,
    centered_clip,
    krum,
    krum_scores,
    multi_krum,
)

F64 = torch.float64
# Five 2-D points (x, y), hand-checked below; f = 1 gives k = m - f - 2 = 2 neighbours.
FIVE = [(-3, -3), (-2, -2), (-4, -3), (4, 2), (4, 0)]
# Squared distances: d01=2 d02=1 d03=74 d04=58 d12=5 d13=52 d14=40 d23=89 d24=73 d34=4.
FIVE_SCORES_K2 = [1 + 2, 2 + 5, 1 + 5, 4 + 52, 4 + 40]  # [3, 7, 6, 56, 44]
FIVE_SCORES_K3 = [1 + 2 + 58, 2 + 5 + 40, 1 + 5 + 73, 4 + 52 + 74, 4 + 40 + 58]  # [61, 47, 79, 130, 102]


def _points(xy) -> dict[str, torch.Tensor]:
    """Client i's upload is w = [x_i, 0], b = [[0, 0, y_i]]: its squared distances are those of the
    2-D points only when both parameters are counted."""
    w = torch.tensor([[x, 0.0] for x, _ in xy], dtype=F64)
    b = torch.tensor([[[0.0, 0.0, y]] for _, y in xy], dtype=F64)
    return {"w": w, "b": b}


def _point(x: float, y: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([x, 0.0], dtype=F64), "b": torch.tensor([[0.0, 0.0, y]], dtype=F64)}


def _random(m: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(m, 2, generator=gen, dtype=F64), "b": torch.randn(m, 1, 3, generator=gen, dtype=F64)}


def _flat(updates) -> np.ndarray:
    """``[m, 5]``: each client's parameters concatenated in the dict's order."""
    return np.concatenate([u.reshape(u.shape[0], -1).numpy() for u in updates.values()], axis=1)


def _unflat(vector, like) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, u in like.items():
        n = math.prod(u.shape[1:])
        out[name] = torch.tensor(np.asarray(vector[start : start + n]), dtype=F64).reshape(u.shape[1:])
        start += n
    return out


def _assert_dict_close(got, want):
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


# ------------------------------------------------------------------- plain-Python references


def ref_krum_scores(rows, f: int) -> list[float]:
    """Blanchard et al. (2017): sum of squared distances to the k = m - f - 2 (in [1, m - 1]) nearest others."""
    m = len(rows)
    if m == 1:
        return [0.0]
    k = min(max(m - f - 2, 1), m - 1)
    scores = []
    for i in range(m):
        d = sorted(sum((a - b) ** 2 for a, b in zip(rows[i], rows[j])) for j in range(m) if j != i)
        scores.append(sum(d[:k]))
    return scores


def ref_bulyan(rows, f: int) -> list[float]:
    """El Mhamdi et al. (2018): θ = max(1, m-2f) clients by repeated Krum on the remaining set, then per
    coordinate the mean of the β = max(1, θ-2f) selected values closest to their median."""
    remaining, selected = list(range(len(rows))), []
    theta = max(1, len(rows) - 2 * f)
    for _ in range(theta):
        s = ref_krum_scores([rows[i] for i in remaining], f)
        selected.append(remaining.pop(min(range(len(remaining)), key=lambda t: (s[t], t))))
    beta = max(1, theta - 2 * f)
    out = []
    for c in range(len(rows[0])):
        v = sorted(rows[i][c] for i in selected)
        median = (v[(theta - 1) // 2] + v[theta // 2]) / 2
        out.append(sum(sorted(v, key=lambda x: abs(x - median))[:beta]) / beta)
    return out


def ref_centered_clip(rows: np.ndarray, tau: float, iterations: int, center: np.ndarray) -> np.ndarray:
    v = center.copy()
    for _ in range(iterations):
        diff = rows - v
        norms = np.linalg.norm(diff, axis=1)
        factor = np.where(norms > 0, np.minimum(1.0, tau / np.where(norms > 0, norms, 1.0)), 1.0)
        v = v + (diff * factor[:, None]).mean(0)
    return v


# ---------------------------------------------------------------------------------- Krum


def test_krum_scores_by_hand_use_m_minus_f_minus_2_neighbours_over_all_parameters():
    # Catches: k = m - f - 1 (scores FIVE_SCORES_K3, and Krum would pick client 1 instead of 0); the
    # distance of the first parameter only (x alone: scores [2, 5, 5, 36, 36]); plain (unsquared) distances;
    # counting the client itself as a neighbour.
    updates = _points(FIVE)
    scores = krum_scores(updates, 1)
    assert scores.dtype == F64 and scores.shape == (5,)
    torch.testing.assert_close(scores, torch.tensor(FIVE_SCORES_K2, dtype=F64))
    assert ref_krum_scores(FIVE, 1) == FIVE_SCORES_K2
    _assert_dict_close(krum(updates, 1), _point(-3, -3))  # argmin of [3, 7, 6, 56, 44]
    # f = 0 gives k = 3 = m - 0 - 2 on the same points
    torch.testing.assert_close(krum_scores(updates, 0), torch.tensor(FIVE_SCORES_K3, dtype=F64))
    _assert_dict_close(krum(updates, 0), _point(-2, -2))


def test_krum_clamps_k_to_one_and_breaks_ties_by_lowest_index():
    # m = 3, f = 1: k = 3 - 1 - 2 = 0 is clamped to 1. 1-D points 0, 1, 3 → scores [1, 1, 4]: a tie.
    updates = _points([(0, 0), (1, 0), (3, 0)])
    torch.testing.assert_close(krum_scores(updates, 1), torch.tensor([1.0, 1.0, 4.0], dtype=F64))
    _assert_dict_close(krum(updates, 1), _point(0, 0))  # catches: last index on ties
    # f larger than the round: still one neighbour
    torch.testing.assert_close(krum_scores(updates, 5), torch.tensor([1.0, 1.0, 4.0], dtype=F64))
    # swapping the tied clients moves the winner with them (lowest index, not lowest value)
    _assert_dict_close(krum(_points([(1, 0), (0, 0), (3, 0)]), 1), _point(1, 0))


def test_krum_of_a_single_client_and_float32_scores_are_float64():
    one = _points([(2, 5)])
    torch.testing.assert_close(krum_scores(one, 1), torch.tensor([0.0], dtype=F64))
    _assert_dict_close(krum(one, 1), _point(2, 5))
    _assert_dict_close(multi_krum(one, 1, 3), _point(2, 5))
    _assert_dict_close(bulyan(one, 1), _point(2, 5))
    as32 = {k: v.float() for k, v in _points(FIVE).items()}
    scores = krum_scores(as32, 1)
    assert scores.dtype == F64
    torch.testing.assert_close(scores, torch.tensor(FIVE_SCORES_K2, dtype=F64))


@pytest.mark.parametrize("m, f", [(4, 0), (7, 1), (9, 2), (6, 3), (12, 4)])
def test_krum_scores_and_krum_against_the_reference(m, f):
    updates = _random(m, seed=100 + m)
    rows = _flat(updates).tolist()
    expected = ref_krum_scores(rows, f)
    torch.testing.assert_close(krum_scores(updates, f), torch.tensor(expected, dtype=F64))
    best = min(range(m), key=lambda i: (expected[i], i))
    _assert_dict_close(krum(updates, f), {k: u[best] for k, u in updates.items()})
    # Krum returns an upload as it is (bit-identical), and is equivariant to the clients' order
    assert all(torch.equal(krum(updates, f)[k], u[best]) for k, u in updates.items())
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(m))
    _assert_dict_close(krum({k: u[perm] for k, u in updates.items()}, f), krum(updates, f))


# ----------------------------------------------------------------------------- Multi-Krum


def test_multi_krum_by_hand_scores_once_over_all_clients():
    updates = _points(FIVE)  # scores [3, 7, 6, 56, 44]: order 0, 2, 1, 4, 3
    _assert_dict_close(multi_krum(updates, 1, 1), _point(-3, -3))
    _assert_dict_close(multi_krum(updates, 1, 2), _point((-3 - 4) / 2, (-3 - 3) / 2))
    # Catches re-scoring on the remaining clients (that would take {0, 3, 1}: x = -1/3)
    _assert_dict_close(multi_krum(updates, 1, 3), _point((-3 - 4 - 2) / 3, (-3 - 3 - 2) / 3))
    _assert_dict_close(multi_krum(updates, 1, 4), _point((-3 - 4 - 2 + 4) / 4, (-3 - 3 - 2 + 0) / 4))
    everyone = _point((-3 - 2 - 4 + 4 + 4) / 5, (-3 - 2 - 3 + 2 + 0) / 5)
    _assert_dict_close(multi_krum(updates, 1, 5), everyone)
    _assert_dict_close(multi_krum(updates, 1, 50), everyone)  # keep > m: all m


def test_multi_krum_breaks_ties_by_lower_index():
    # 1-D points 0, 1, 2, 3, 5 with f = 1 (k = 2): scores [5, 2, 2, 5, 13]; keep 3 = clients 1, 2 and
    # (tie at 5 between clients 0 and 3) client 0 → mean 1. Catches: higher index first (mean 2).
    updates = _points([(0, 0), (1, 0), (2, 0), (3, 0), (5, 0)])
    torch.testing.assert_close(krum_scores(updates, 1), torch.tensor([5.0, 2.0, 2.0, 5.0, 13.0], dtype=F64))
    _assert_dict_close(multi_krum(updates, 1, 3), _point(1, 0))
    _assert_dict_close(multi_krum(updates, 1, 1), _point(1, 0))


# --------------------------------------------------------------------------------- Bulyan


def test_bulyan_by_hand_rescores_the_remaining_clients():
    # m = 5, f = 1: θ = 3, β = 1. Round 1 (k=2) scores [3, 7, 6, 56, 44] → client 0. Round 2 on {1, 2, 3, 4}
    # (k=1): [5, 5, 4, 4] → client 3 (tie, lowest index). Round 3 on {1, 2, 4} (k=1): [5, 5, 40] → client 1.
    # Selected x {-3, 4, -2}, y {-3, 2, -2} → coordinate medians (-2, -2).
    # Catches Bulyan without re-scoring (top-3 of the first scores = {0, 2, 1} → (-3, -3)).
    assert ref_bulyan(FIVE, 1) == [-2.0, -2.0]
    _assert_dict_close(bulyan(_points(FIVE), 1), _point(-2, -2))


def test_bulyan_by_hand_with_an_even_selection_averages_the_values_nearest_the_mean_of_the_middle_pair():
    # m = 6, f = 1: θ = 4, β = 2. Scores (k=3) [72, 85, 55, 60, 48, 115] → client 4; then on {0,1,2,3,5}
    # (k=2) [67, 20, 30, 51, 30] → client 1; on {0,2,3,5} (k=1) [26, 20, 25, 20] → client 2; on {0,3,5}
    # (k=1) [26, 26, 85] → client 0. Selected x {-5, 3, 0, -4}: median (-4+0)/2 = -2, nearest two -4, 0 → -2;
    # y {-1, 1, 2, -3}: median 0, nearest two -1, 1 → 0.
    # Catches: the lower middle value as median (torch.median: x → (-4 + -5)/2 = -4.5); no re-scoring
    # (selection {4, 2, 3, 0}: x ∈ {-5, -4.5}, whatever the ties); the mean of all θ (x = -1.5).
    six = [(-4, -3), (3, 1), (0, 2), (-5, 2), (-5, -1), (4, 4)]
    assert ref_krum_scores(six, 1) == [72, 85, 55, 60, 48, 115]
    assert ref_bulyan(six, 1) == [-2.0, 0.0]
    _assert_dict_close(bulyan(_points(six), 1), _point(-2, 0))


@pytest.mark.parametrize("m, f", [(6, 1), (9, 2), (10, 1), (11, 2), (2, 1), (4, 3)])
def test_bulyan_against_the_reference(m, f):
    updates = _random(m, seed=200 + 10 * m + f)
    expected = ref_bulyan(_flat(updates).tolist(), f)
    _assert_dict_close(bulyan(updates, f), _unflat(expected, updates))


def test_bulyan_without_byzantine_clients_is_the_mean_and_stays_in_the_selected_range():
    updates = _random(7, seed=5)
    _assert_dict_close(bulyan(updates, 0), {k: u.mean(0) for k, u in updates.items()})  # θ = β = m
    out = bulyan(updates, 2)  # θ = 3, β = 1: each coordinate is one of the clients' values
    for name, u in updates.items():
        assert torch.isclose(u, out[name].unsqueeze(0)).any(0).all(), name


# -------------------------------------------------------------------------- CenteredClip


def test_centered_clip_by_hand_clips_each_client_over_all_parameters_together():
    # Clients at t·(3, 4) (norm 5t) for t = 5 and t = 0.5; τ = 5 is one unit of t. From t = 0:
    # t1 = 0 + (1 + 0.5)/2 = 0.75; t2 = 0.75 + (1 - 0.25)/2 = 1.125; t3 = 1.125 + (1 - 0.625)/2 = 1.3125.
    # Catches clipping per parameter (iteration 1 would give w[0] = (5 + 1.5)/2 = 3.25, not 2.25); a
    # sum instead of the mean over clients; an off-by-one in the number of iterations.
    updates = _points([(15, 20), (1.5, 2)])
    zero = _point(0, 0)
    for iterations, t in [(1, 0.75), (2, 1.125), (3, 1.3125)]:
        _assert_dict_close(centered_clip(updates, tau=5.0, iterations=iterations, center=zero), _point(3 * t, 4 * t))


def test_centered_clip_starts_from_the_center_and_a_zero_difference_counts_fully():
    # From the second client (t = 0.5): its difference is 0 (factor 1, no NaN), the first is clipped to 1:
    # t1 = 0.5 + (1 + 0)/2 = 1.0. Catches: ignoring `center` (starting from 0 gives 0.75).
    updates = _points([(15, 20), (1.5, 2)])
    out = centered_clip(updates, tau=5.0, iterations=1, center=_point(1.5, 2))
    _assert_dict_close(out, _point(3.0, 4.0))
    # a huge τ clips nothing: one iteration from any center is the plain mean
    center = {k: torch.full(u.shape[1:], 7.0, dtype=F64) for k, u in updates.items()}
    mean = {k: u.mean(0) for k, u in updates.items()}
    _assert_dict_close(centered_clip(updates, tau=1e12, iterations=1, center=center), mean)


@pytest.mark.parametrize("tau, iterations", [(0.3, 1), (1.0, 4), (2.5, 10)])
def test_centered_clip_against_the_reference(tau, iterations):
    updates = _random(7, seed=int(10 * tau) + iterations)
    updates["w"][2] *= 50.0  # one far client
    center = {"w": torch.tensor([0.5, -1.0], dtype=F64), "b": torch.tensor([[0.2, 0.0, -0.3]], dtype=F64)}
    expected = ref_centered_clip(_flat(updates), tau, iterations, _flat({k: v[None] for k, v in center.items()})[0])
    out = centered_clip(updates, tau=tau, iterations=iterations, center=center)
    _assert_dict_close(out, _unflat(expected, updates))


@pytest.mark.parametrize(
    "tau, iterations, match", [(0.0, 3, "tau"), (-1.0, 3, "tau"), (1.0, 0, "iterations"), (1.0, -2, "iterations")]
)
def test_centered_clip_rejects_bad_arguments(tau, iterations, match):
    updates = _random(3, seed=0)
    center = {k: torch.zeros(u.shape[1:], dtype=F64) for k, u in updates.items()}
    with pytest.raises(ValueError, match=match):
        centered_clip(updates, tau=tau, iterations=iterations, center=center)


# -------------------------------------------------------------------- adaptive clipping


def test_adaptive_noise_multiplier_by_hand_and_privacy_is_conserved():
    # z_Δ = (z^-2 - (2σ_b)^-2)^(-1/2): z = 1, σ_b = 1 → (1 - 1/4)^(-1/2) = 2/√3.
    # Catches using σ_b instead of 2σ_b (that would leave no noise: division by zero / ValueError).
    assert adaptive_noise_multiplier(1.0, 1.0) == pytest.approx(2 / math.sqrt(3), rel=1e-12)
    assert adaptive_noise_multiplier(0.5, 0.5) == pytest.approx(1 / math.sqrt(3), rel=1e-12)  # (4 - 1)^(-1/2)
    assert adaptive_noise_multiplier(1.0, 2.0) == pytest.approx((1 - 1 / 16) ** -0.5, rel=1e-12)
    for z, sigma_b in [(0.7, 3.0), (1.3, 0.9), (4.0, 50.0)]:
        z_delta = adaptive_noise_multiplier(z, sigma_b)
        assert z_delta > z  # the count's noise spends part of the budget
        assert z_delta**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2, rel=1e-12)
    assert adaptive_noise_multiplier(0.0, 1.0) == 0.0


@pytest.mark.parametrize("z, sigma_b", [(1.0, 0.5), (2.0, 0.9), (1.0, 0.0)])
def test_adaptive_noise_multiplier_rejects_a_count_noise_that_leaves_none_for_the_sum(z, sigma_b):
    with pytest.raises(ValueError, match="count_stddev"):
        adaptive_noise_multiplier(z, sigma_b)


def test_adaptive_clip_update_by_hand():
    # C·exp(-lr·(b̃ - γ)). Catches the sign (more unclipped clients than γ must shrink C) and a linear
    # (C - lr·(b̃ - γ)) update.
    assert adaptive_clip_update(2.0, 0.8, 0.5, 0.2) == pytest.approx(2.0 * math.exp(-0.06), rel=1e-12)
    assert adaptive_clip_update(0.5, 0.1, 0.6, 1.0) == pytest.approx(0.5 * math.exp(0.5), rel=1e-12)
    assert adaptive_clip_update(3.0, 0.5, 0.5, 0.7) == pytest.approx(3.0, rel=1e-12)
    assert adaptive_clip_update(1.0, 1.3, 0.5, 0.2) < 1.0 < adaptive_clip_update(1.0, -0.2, 0.5, 0.2)  # noisy b̃
