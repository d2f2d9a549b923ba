"""Krum, MultiKrum, Bulyan and CenteredClip aggregators (by hand, inside Bucketing, under huge Byzantine
uploads with derived bounds), the ALIE and IPM attacks, and ClientDP's adaptive clipping (statistics of
the noisy unclipped count and of the sum's noise). Written from the papers' definitions; each hand case
names the plausible wrong implementation ("mutation") it rules out."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from lightning_metafed.aggregators import (
    Bucketing,
    Bulyan,
    CenteredClip,
    Krum,
    Mean,
    MultiKrum,
)
from lightning_metafed.faults import ClientFaults, alie_z
from lightning_metafed.privacy import ClientDP

F64 = torch.float64


def _points(xy) -> dict[str, torch.Tensor]:
    """Client i's upload is w = [x_i, 0], b = [[0, 0, y_i]] (two parameters of different shapes)."""
    return {
        "w": torch.tensor([[x, 0.0] for x, _ in xy], dtype=F64),
        "b": torch.tensor([[[0.0, 0.0, y]] for _, y in xy], dtype=F64),
    }


def _point(x: float, y: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([x, 0.0], dtype=F64), "b": torch.tensor([[0.0, 0.0, y]], dtype=F64)}


def _line(ts) -> dict[str, torch.Tensor]:
    """Clients at t·(3, 4): norm 5t, so τ = 5 is one unit of t."""
    return _points([(3 * t, 4 * t) for t in ts])


def _random(m: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(m, 2, generator=gen, dtype=F64), "b": torch.randn(m, 1, 3, generator=gen, dtype=F64)}


def _flat(updates) -> np.ndarray:
    return np.concatenate([u.reshape(u.shape[0], -1).numpy() for u in updates.values()], axis=1)


def _assert_dict_close(got, want):
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


FIVE = [(-3, -3), (-2, -2), (-4, -3), (4, 2), (4, 0)]  # Krum scores with f=1 (k=2): [3, 7, 6, 56, 44]


# ------------------------------------------------------------------------- classes by hand


def test_krum_and_multi_krum_by_hand():
    updates = _points(FIVE)
    _assert_dict_close(Krum(1)(updates), _point(-3, -3))
    _assert_dict_close(Krum(num_byzantine=0)(updates), _point(-2, -2))  # k = 3: scores [61, 47, 79, 130, 102]
    # keep=None → m - f = 4 lowest scores {0, 2, 1, 4}. Catches keep = m - 2f (3 clients: (-3, -8/3)).
    _assert_dict_close(MultiKrum(1)(updates), _point((-3 - 4 - 2 + 4) / 4, (-3 - 3 - 2 + 0) / 4))
    _assert_dict_close(MultiKrum(1, keep=2)(updates, weights=None), _point(-3.5, -3.0))
    # f = 5 of m = 4: keep = max(1, m - f) = 1 → Krum's pick (1-D points 0, 1, 3, 7: scores [1, 1, 4, 16]).
    # Catches u[:m - f] slicing with a negative m - f (mean of three clients: 4/3).
    _assert_dict_close(MultiKrum(5)(_points([(0, 0), (1, 0), (3, 0), (7, 0)])), _point(0, 0))


def test_bulyan_by_hand():
    # m = 6, f = 1 (θ = 4, β = 2); the selection {4, 1, 2, 0} is worked out in
    # tests/functional/test_robust_rules.py. Catches torch.median's lower middle value (x → -4.5) and
    # skipping the re-scoring (x ∈ {-5, -4.5}).
    six = [(-4, -3), (3, 1), (0, 2), (-5, 2), (-5, -1), (4, 4)]
    _assert_dict_close(Bulyan(1)(_points(six)), _point(-2, 0))
    _assert_dict_close(Bulyan(num_byzantine=1)(_points(FIVE)), _point(-2, -2))


def test_centered_clip_starts_from_the_coordinate_median_or_zero():
    # Odd m: start at the median t = 0.5 (its own difference is 0: factor 1, no NaN); t = 0 is unclipped,
    # t = 5 is clipped to one unit: t1 = 0.5 + (-0.5 + 0 + 1)/3 = 2/3.
    _assert_dict_close(CenteredClip(tau=5.0, iterations=1)(_line([0.0, 0.5, 5.0])), _point(2.0, 8 / 3))
    # Even m: the median is the mean of the middle pair, t = 2; both differences are clipped to ±1: t1 = 2.
    # Catches torch.median's lower value (start 0 → 0.5) or the upper one (start 4 → 3.5).
    _assert_dict_close(CenteredClip(tau=5.0, iterations=1, start="median")(_line([0.0, 4.0])), _point(6.0, 8.0))
    # start="zero": differences 1 (norm exactly τ) and 4 (clipped to 1): t1 = (1 + 1)/2 = 1; the median
    # start (t = 2.5) would stay at 2.5.
    _assert_dict_close(CenteredClip(tau=5.0, iterations=1, start="zero")(_line([1.0, 4.0])), _point(3.0, 4.0))
    _assert_dict_close(CenteredClip(tau=5.0, iterations=1)(_line([1.0, 4.0])), _point(7.5, 10.0))
    updates = _random(6, seed=3)
    _assert_dict_close(CenteredClip()(updates), CenteredClip(tau=1.0, iterations=3, start="median")(updates))


def test_bucketing_centered_clip_by_hand():
    # t = 0, 1, 2, 4, 15 in buckets of 2 → bucket means 0.5, 3, 15 (the last bucket holds one client).
    # CenteredClip(τ = one unit, 2 iterations, from 0): t1 = (0.5 + 1 + 1)/3 = 5/6;
    # t2 = 5/6 + (-1/3 + 1 + 1)/3 = 25/18. Without bucketing the same rule gives t2 = 1.28.
    rule = CenteredClip(tau=5.0, iterations=2, start="zero")
    out = Bucketing(rule, 2)(_line([0.0, 1.0, 2.0, 4.0, 15.0]))
    _assert_dict_close(out, _point(3 * 25 / 18, 4 * 25 / 18))


@pytest.mark.parametrize(
    "rule",
    [Krum(1), MultiKrum(1), MultiKrum(1, keep=3), Bulyan(1), CenteredClip(0.5, 2), CenteredClip(0.5, 2, "zero")],
)
def test_every_new_rule_inside_bucketing_sees_the_bucket_means(rule):
    updates = _random(13, seed=7)  # 7 buckets of 2, the last one a single client
    means = {k: torch.stack([u[i : i + 2].mean(0) for i in range(0, 13, 2)]) for k, u in updates.items()}
    assert means["w"].shape == (7, 2)
    _assert_dict_close(Bucketing(rule, 2)(updates), rule(means))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Krum(-1), "num_byzantine"),
        (lambda: Krum(True), "num_byzantine"),
        (lambda: Krum(1.5), "num_byzantine"),
        (lambda: MultiKrum(num_byzantine=-2), "num_byzantine"),
        (lambda: MultiKrum(1.0), "num_byzantine"),
        (lambda: Bulyan(-1), "num_byzantine"),
        (lambda: Bulyan(False), "num_byzantine"),
        (lambda: Bulyan(2.0), "num_byzantine"),
        (lambda: CenteredClip(start="mean"), "start"),
        (lambda: CenteredClip(tau=0.0), "tau"),
        (lambda: CenteredClip(tau=-1.0), "tau"),
        (lambda: CenteredClip(iterations=0), "iterations"),
        (lambda: ClientDP(target_quantile=0.0), "target_quantile"),
        (lambda: ClientDP(target_quantile=1.0), "target_quantile"),
        (lambda: ClientDP(target_quantile=1.5), "target_quantile"),
        (lambda: ClientDP(target_quantile=0.5, clip_lr=-0.2), "clip_lr"),
        (lambda: ClientDP(target_quantile=0.5, clip_lr=float("nan")), "clip_lr"),
        (lambda: ClientDP(target_quantile=0.5, count_stddev=-1.0), "count_stddev"),
    ],
)
def test_bad_arguments_are_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_degenerate_reason_below_the_round_size_each_rule_needs():
    # Krum / Multi-Krum need m >= 2f + 3, Bulyan m >= 4f + 3
    cases = [(Krum(1), 5), (Krum(0), 3), (MultiKrum(2), 7), (Bulyan(1), 7), (Bulyan(0), 3), (Bulyan(2), 11)]
    for rule, smallest in cases:
        assert rule.degenerate_reason(smallest) is None, rule
        assert rule.degenerate_reason(smallest + 4) is None, rule
        reason = rule.degenerate_reason(smallest - 1)
        assert isinstance(reason, str) and reason, (rule, reason)
        if smallest > 3:  # f >= 1: fewer Byzantine clients is one fix, so the sentence names the argument
            assert "num_byzantine" in reason, (rule, reason)
    assert Bucketing(Krum(1), 2).degenerate_reason(10) is None  # 5 bucket means
    assert isinstance(Bucketing(Krum(1), 2).degenerate_reason(8), str)  # 4 bucket means


# --------------------------------------------------------------- robustness under huge uploads


def _attacked_round(m: int, bad: list[int], seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Honest clients clustered around 1 (spread 0.1); the ``bad`` ones all upload the same ×1e6 vector."""
    gen = torch.Generator().manual_seed(seed)
    updates = {
        "w": 1 + 0.1 * torch.randn(m, 2, generator=gen, dtype=F64),
        "b": 1 + 0.1 * torch.randn(m, 1, 3, generator=gen, dtype=F64),
    }
    for u in updates.values():
        u[bad] = 1e6 * torch.randn(u.shape[1:], generator=gen, dtype=F64)
    honest = torch.ones(m, dtype=torch.bool)
    honest[bad] = False
    return updates, honest


def test_krum_multi_krum_and_bulyan_stay_inside_the_honest_clients_range():
    updates, honest = _attacked_round(11, bad=[3, 7], seed=11)  # m = 11 = 4f + 3 with f = 2
    assert Mean(weighted=False)(updates)["w"].abs().max() > 1e4  # the plain mean is ruined
    krum_out = Krum(2)(updates)
    picked = [i for i in range(11) if all(torch.equal(krum_out[k], u[i]) for k, u in updates.items())]
    assert len(picked) == 1 and honest[picked[0]]
    # keep = m - f = 9: exactly the honest clients (catches keep = m - 2f, or scores with the wrong k that
    # would let a colluding Byzantine pair in)
    _assert_dict_close(MultiKrum(2)(updates), {k: u[honest].mean(0) for k, u in updates.items()})
    for rule in (Krum(2), MultiKrum(2, keep=4), Bulyan(2)):
        out = rule(updates)
        for name, u in updates.items():
            low, high = u[honest].min(0).values, u[honest].max(0).values
            assert bool(((out[name] >= low - 1e-12) & (out[name] <= high + 1e-12)).all()), (rule, name)


def test_centered_clip_moves_at_most_the_derived_bound_from_the_honest_mean():
    """Bound: with h = m - f honest clients within τ of every iterate, their terms are unclipped and sum to
    h(μ - v_t); each Byzantine term has norm <= τ. So e_t = v_t - μ obeys e_{t+1} = ρ e_t + (1/m) Σ_j c_j,
    ρ = f/m, ‖c_j‖ <= τ, hence ‖e_T‖ <= ρ^T ‖e_0‖ + (fτ/m)(1 - ρ^T)/(1 - ρ) =: B. The precondition holds
    when r + ‖e_0‖ + fτ/(m - f) <= τ (r: the honest spread). Both Byzantine clients push in one direction,
    so ‖e_T‖ >= (fτ/m)(1 - ρ^T)/(1 - ρ) - ρ^T ‖e_0‖ as well: the bound is attained, and clipping per
    parameter (a Byzantine term of norm √2·τ here) breaks it."""
    m, f, tau, iterations = 10, 2, 1.0, 3
    gen = torch.Generator().manual_seed(4)
    center = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=F64)
    rows = center + 0.01 * torch.randn(m, 5, generator=gen, dtype=F64)
    bad = [0, 5]
    rows[bad] = 1e6 * torch.tensor([1.0, 2.0, -1.0, 1.5, 0.5], dtype=F64)  # huge in both parameters
    updates = {"w": rows[:, :2].clone(), "b": rows[:, 2:].reshape(m, 1, 3).clone()}
    honest = np.delete(rows.numpy(), bad, axis=0)
    mu = honest.mean(0)
    e0 = float(np.linalg.norm(np.median(rows.numpy(), axis=0) - mu))
    spread = float(np.linalg.norm(honest - mu, axis=1).max())
    assert spread + e0 + f * tau / (m - f) <= tau  # the derivation's precondition
    rho = f / m
    drift = (f * tau / m) * (1 - rho**iterations) / (1 - rho)
    out = CenteredClip(tau=tau, iterations=iterations, start="median")(updates)
    moved = float(np.linalg.norm(np.concatenate([out["w"].numpy().ravel(), out["b"].numpy().ravel()]) - mu))
    assert moved <= rho**iterations * e0 + drift + 1e-9, (moved, drift)
    assert moved >= drift - rho**iterations * e0 - 1e-6, (moved, drift)
    assert Mean(weighted=False)(updates)["w"].abs().max() > 1e4


# ------------------------------------------------------------------------------- attacks


@pytest.mark.parametrize(
    "m, f, quantile", [(20, 4, 13 / 20), (7, 1, 4 / 7), (10, 2, 6 / 10), (5, 2, 4 / 5), (50, 12, 36 / 50)]
)
def test_alie_z_by_hand(m, f, quantile):
    # s = floor(m/2 + 1) - f; z = Φ^-1((m - s)/m). m = 7, f = 1: s = 4 - 1 = 3 (catches ceil: s = 4, 3/7);
    # catches Φ^-1(s/m) (the opposite sign).
    assert alie_z(m, f) == pytest.approx(NormalDist().inv_cdf(quantile), rel=1e-9, abs=1e-12)
    assert isinstance(alie_z(m, f), float)


def test_alie_z_of_twenty_clients_with_four_bad():
    assert alie_z(20, 4) == pytest.approx(0.38532, abs=1e-5)


def test_alie_attack_by_hand():
    # Honest rows 0, 2, 3; z = alie_z(5, 2) = Φ^-1(0.8). Per coordinate μ - zσ with σ unbiased:
    # w: (1, 2, 3) → 2 - z; (0, 4, 8) → 4 - 4z.  b: (2, 2, 2) → 2; (-1, 1, 0) → -z; (10, 20, 60) → 30 - √700·z.
    # Catches μ + zσ, the biased σ (correction 0), statistics over all rows (the bad rows hold 100s).
    w = torch.tensor([[1.0, 0.0], [100.0, -100.0], [2.0, 4.0], [3.0, 8.0], [100.0, 100.0]], dtype=F64)
    b = [[[2.0, -1.0, 10.0]], [[100.0] * 3], [[2.0, 1.0, 20.0]], [[2.0, 0.0, 60.0]], [[-100.0] * 3]]
    b = torch.tensor(b, dtype=F64)
    updates = {"w": w, "b": b}
    before = {k: v.clone() for k, v in updates.items()}
    bad = torch.tensor([False, True, False, False, True])
    out = ClientFaults(byzantine_fraction=0.3, byzantine_attack="alie").attack(updates, bad, 0)
    z = NormalDist().inv_cdf(0.8)
    evil_w = torch.tensor([2 - z, 4 - 4 * z], dtype=F64)
    evil_b = torch.tensor([[2.0, -z, 30 - math.sqrt(700) * z]], dtype=F64)
    for i in (1, 4):
        torch.testing.assert_close(out["w"][i], evil_w)
        torch.testing.assert_close(out["b"][i], evil_b)
    for k, u in updates.items():  # honest rows bit-identical; the input is not modified
        assert torch.equal(out[k][~bad], before[k][~bad]) and torch.equal(u, before[k])


def test_alie_attack_against_a_numpy_reference_and_with_nobody_bad():
    updates = _random(9, seed=21)
    bad = torch.tensor([True, False, False, True, False, False, False, True, False])
    out = ClientFaults(byzantine_fraction=0.3, byzantine_attack="alie", seed=1).attack(updates, bad, 3)
    z = NormalDist().inv_cdf((9 - (math.floor(9 / 2 + 1) - 3)) / 9)  # s = 5 - 3 = 2 → Φ^-1(7/9)
    for name, u in updates.items():
        honest = u[~bad].numpy()
        evil = honest.mean(0) - z * honest.std(0, ddof=1)
        for i in torch.nonzero(bad).flatten().tolist():
            torch.testing.assert_close(out[name][i], torch.from_numpy(evil))
        assert torch.equal(out[name][~bad], u[~bad])
    nobody = torch.zeros(9, dtype=torch.bool)
    none = ClientFaults(byzantine_fraction=0.3, byzantine_attack="alie").attack(updates, nobody, 0)
    assert all(torch.equal(none[k], updates[k]) for k in updates)


def test_alie_attack_with_a_single_row_of_statistics_copies_its_mean():
    # σ = 0 with a single row: the bad rows become that row's values (never NaN from z·0 when z = Φ^-1(1)).
    updates = _points([(1.0, 2.0), (50.0, 60.0), (70.0, -80.0)])
    bad = torch.tensor([False, True, True])  # one honest row
    out = ClientFaults(byzantine_fraction=0.5, byzantine_attack="alie").attack(updates, bad, 0)
    for k, u in updates.items():
        torch.testing.assert_close(out[k], u[0].expand_as(u))
    alone = _points([(3.0, -4.0)])  # nobody honest: the statistics of all rows (one row)
    out = ClientFaults(byzantine_fraction=0.5, byzantine_attack="alie").attack(alone, torch.tensor([True]), 0)
    _assert_dict_close({k: v[0] for k, v in out.items()}, _point(3.0, -4.0))


def test_ipm_attack_by_hand():
    # honest rows 1, 2: mean w = (2, 3), b = (0, 0, 5) → bad rows -2.5 × that. Catches the mean over all rows
    # and -scale·(own row) (sign flip).
    updates = _points([(10.0, 10.0), (1.0, 4.0), (3.0, 6.0), (-7.0, 9.0)])
    updates["w"][:, 1] = torch.tensor([-1.0, 2.0, 4.0, 8.0], dtype=F64)
    bad = torch.tensor([True, False, False, True])
    out = ClientFaults(byzantine_fraction=0.5, byzantine_attack="ipm", byzantine_scale=2.5).attack(updates, bad, 0)
    evil_w = torch.tensor([-2.5 * 2.0, -2.5 * 3.0], dtype=F64)
    evil_b = torch.tensor([[0.0, 0.0, -2.5 * 5.0]], dtype=F64)
    for i in (0, 3):
        torch.testing.assert_close(out["w"][i], evil_w)
        torch.testing.assert_close(out["b"][i], evil_b)
    for k, u in updates.items():
        assert torch.equal(out[k][~bad], u[~bad])


# ------------------------------------------------------------------- adaptive clipping


def _implied_fractions(
    dp: ClientDP, lr: float, gamma: float, clip: float, unclipped: int, sampled: int, rounds: int, seed: int = 0
) -> np.ndarray:
    """b̃ = (log C_next - log C)/(-lr) + γ for each round: the noisy unclipped fraction the update used."""
    nxt = [dp.next_clip_norm(clip, unclipped, sampled, sampled, seed=seed, round_idx=r) for r in range(rounds)]
    return (np.log(np.array(nxt)) - math.log(clip)) / (-lr) + gamma


def test_fixed_clipping_keeps_the_clip_norm_and_a_noiseless_count_gives_the_exact_update():
    assert ClientDP(clip_norm=1.0).next_clip_norm(0.7, 3, 10, 10, seed=0, round_idx=4) == 0.7
    # count_stddev 1e-9 (with no noise on the sum): C·exp(-lr·(unclipped/sampled - γ)) up to ~1e-10.
    # Catches the fraction of *clipped* clients ((10 - 3)/10) and the opposite sign.
    dp = ClientDP(clip_norm=1.0, noise_multiplier=0.0, target_quantile=0.6, clip_lr=0.3, count_stddev=1e-9)
    expected = 0.7 * math.exp(-0.3 * (3 / 10 - 0.6))
    assert dp.next_clip_norm(0.7, 3, 10, 10, seed=0, round_idx=4) == pytest.approx(expected, rel=1e-8)


def test_next_clip_norm_counts_with_default_noise_sampled_over_20():
    # σ_b = 40/20 = 2: b̃ = (30 + N(0, 4))/40 has mean 0.75 and std 0.05. With 2000 rounds the mean's
    # standard error is 0.0011 (tolerance 5 of them) and the std's relative one 1.6% (tolerance 8%).
    # Catches σ_b = sampled/10 (std 0.1), the noise added to the fraction rather than the count (std 2).
    dp = ClientDP(clip_norm=1.0, noise_multiplier=1.0, target_quantile=0.5, clip_lr=0.2, seed=0)
    fractions = _implied_fractions(dp, 0.2, 0.5, 0.7, 30, 40, rounds=2000)
    assert abs(fractions.mean() - 0.75) < 5 * 0.05 / math.sqrt(2000)
    assert fractions.std(ddof=1) == pytest.approx(0.05, rel=0.08)


def test_next_clip_norm_uses_count_stddev_and_is_a_pure_function_of_seed_and_round():
    # std 1/10 keeps b̃ = 0.4 ± 0.1 four standard deviations inside [0, 1], where it is clamped
    dp = ClientDP(clip_norm=2.0, noise_multiplier=1.0, target_quantile=0.3, clip_lr=0.5, count_stddev=1.0)
    fractions = _implied_fractions(dp, 0.5, 0.3, 1.5, 4, 10, rounds=2000, seed=9)  # mean 0.4, std 1/10
    assert abs(fractions.mean() - 0.4) < 5 * 0.1 / math.sqrt(2000)
    assert fractions.std(ddof=1) == pytest.approx(0.1, rel=0.08)
    first = dp.next_clip_norm(1.5, 4, 10, 10, seed=9, round_idx=17)
    assert dp.next_clip_norm(1.5, 4, 10, 10, seed=9, round_idx=17) == first
    assert dp.next_clip_norm(1.5, 4, 10, 10, seed=9, round_idx=18) != first
    assert dp.next_clip_norm(1.5, 4, 10, 10, seed=10, round_idx=17) != first


@pytest.mark.parametrize(
    "kwargs, sampled, clip_norm, sigma_b",
    [({"count_stddev": 1.0}, 4, 0.5, 1.0), ({"count_stddev": 1.0}, 4, None, 1.0), ({}, 40, 2.0, 2.0)],
)
def test_adaptive_aggregate_noise_uses_the_reduced_noise_multiplier(kwargs, sampled, clip_norm, sigma_b):
    # std on the sum = z_Δ·C with z_Δ = (z^-2 - (2σ_b)^-2)^(-1/2); z = 1 here: 2/√3 for σ_b = 1, 1.0328 for
    # σ_b = 40/20 = 2. 200,000 draws: the std's relative standard error is 0.16%, the tolerance 1%.
    # Catches z itself (13% and 3.2% too small) and ignoring the `clip_norm` argument (the first case: 2×).
    dp = ClientDP(clip_norm=1.0, noise_multiplier=1.0, target_quantile=0.5, **kwargs)
    zeros = {"w": torch.zeros(3, 10_000, dtype=F64), "b": torch.zeros(3, 2, 5, dtype=F64)}
    out = torch.cat([dp.aggregate(zeros, sampled, 3, r, clip_norm=clip_norm)[0]["w"] for r in range(20)])
    z_delta = (1.0 - (2 * sigma_b) ** -2) ** -0.5
    expected = z_delta * (1.0 if clip_norm is None else clip_norm) / sampled
    assert out.std().item() == pytest.approx(expected, rel=0.01)
    assert abs(out.mean().item()) < 5 * expected / math.sqrt(out.numel())


@pytest.mark.parametrize("kwargs", [{"target_quantile": 0.5, "count_stddev": 1.5}, {}])
def test_aggregate_sum_of_the_clipped_updates_equals_aggregate(kwargs):
    dp = ClientDP(clip_norm=1.0, noise_multiplier=0.8, **kwargs)
    updates = _random(5, seed=8)
    updates["w"][1] *= 10.0
    clip = 0.9 if kwargs else 1.0
    norms = torch.sqrt(sum((u.reshape(5, -1) ** 2).sum(1) for u in updates.values()))
    factor = torch.clamp(clip / norms, max=1.0)
    clipped_sum = {k: (u * factor.view(-1, *[1] * (u.dim() - 1))).sum(0) for k, u in updates.items()}
    want = dp.aggregate(updates, 6, 2, 5, clip_norm=clip)[0]
    got = dp.aggregate_sum(clipped_sum, 6, 2, 5, clip)
    got = got[0] if isinstance(got, tuple) else got
    _assert_dict_close(got, want)
    noiseless = ClientDP(clip_norm=1.0, noise_multiplier=0.0, **kwargs).aggregate_sum(clipped_sum, 6, 2, 5, clip)
    noiseless = noiseless[0] if isinstance(noiseless, tuple) else noiseless
    _assert_dict_close(noiseless, {k: v / 6 for k, v in clipped_sum.items()})
