"""The numerical core of `psr rl`: SDE step, advantages, policy and DPO losses, FocusDPO
weights and disrupted-instance pairs, against independent computations and hand-worked tables."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation

from psr import toyworld as tw
from psr.core.sampler import euler_sample, euler_step, flux_schedule
from psr.rl.advantages import group_advantages
from psr.rl.focus import detail_map, focus_weights, structure_map
from psr.rl.losses import OBJECTIVES, diffusion_dpo_loss, grpo_loss, gspo_log_prob_weights, gspo_loss
from psr.rl.pairs import disrupted_pair
from psr.rl.sde import closed_form_kl, sde_sample, sde_step, step_kl

# FLUX.1's scheduler settings (dynamic shift), so schedules here look like real ones.
FLUX_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                  "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def _toy_velocity(x, t):
    """A smooth, time-dependent field: enough to tell the samplers apart if they differed."""
    return 0.7 * x - torch.sin(3 * x) + t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


# ----------------------------------------------------------------------------- SDE step

def _reference_step(x, v, sigma, sigma_next, a):
    """REFERENCE §4 written out again, in float64, with the σ = 1 rule."""
    x, v = x.double(), v.double()
    dt = sigma_next - sigma
    std_dev_t = math.sqrt(sigma / (1 - (sigma_next if sigma == 1 else sigma))) * a
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_dev_t * math.sqrt(-dt)


@pytest.mark.parametrize("sigma, sigma_next, a",
                         [(1.0, 0.93, 0.7), (0.8, 0.6, 0.7), (0.3, 0.0, 1.0), (0.05, 0.01, 0.3)])
def test_log_prob_is_the_gaussian_density_averaged_over_dims(sigma, sigma_next, a):
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 16, 8, generator=g), torch.randn(3, 16, 8, generator=g)
    step = sde_step(x, v, sigma, sigma_next, a, generator=torch.Generator().manual_seed(1))
    mean, std = _reference_step(x, v, sigma, sigma_next, a)
    expected = torch.distributions.Normal(mean, std).log_prob(step.prev_sample.double()).mean(dim=(1, 2))
    torch.testing.assert_close(step.mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(step.std, torch.full((3,), std, dtype=torch.float32))
    torch.testing.assert_close(step.log_prob.double(), expected, rtol=1e-5, atol=1e-5)
    # Scoring the stored sample (the policy update's path) gives the very same number.
    again = sde_step(x, v, sigma, sigma_next, a, prev_sample=step.prev_sample)
    assert torch.equal(again.log_prob, step.log_prob)


# Hand-worked: at σ=1 the factor uses 1 − σ' = 0.1, so std_dev_t² = 10·0.49 = 4.9 and the
# transition std is sqrt(4.9·0.1) = 0.7 exactly.
#   σ     σ'    a     mean coef of x          mean coef of v                 std
#   1.0   0.9   0.7   1 − 4.9/2·0.1 = 0.755    (1 + 0)·(−0.1) = −0.1          0.7
#   0.5   0.4   0.7   1 − 0.49·0.1 = 0.951     (1 + 0.49·0.5)·(−0.1) = −0.1245  0.7·sqrt(0.1)
#   0.5   0.4   0     1                        −0.1                           0
@pytest.mark.parametrize("sigma, sigma_next, a, c_x, c_v, std", [
    (1.0, 0.9, 0.7, 0.755, -0.1, 0.7),
    (0.5, 0.4, 0.7, 0.951, -0.1245, 0.7 * math.sqrt(0.1)),
    (0.5, 0.4, 0.0, 1.0, -0.1, 0.0),
])
def test_step_coefficients_known_answers_including_the_sigma_one_rule(sigma, sigma_next, a, c_x, c_v, std):
    x, v = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]])
    step = sde_step(x, v, sigma, sigma_next, a, prev_sample=torch.zeros(2, 1))
    torch.testing.assert_close(step.mean, torch.tensor([[c_x], [c_v]]))
    torch.testing.assert_close(step.std, torch.tensor([std, std]))
    assert torch.isfinite(step.log_prob).all()


def test_sampled_noise_has_the_transition_std():
    x = torch.zeros(2, 200_000)
    step = sde_step(x, torch.zeros_like(x), 0.6, 0.5, 0.7, generator=torch.Generator().manual_seed(0))
    residual = step.prev_sample - step.mean
    torch.testing.assert_close(residual.std(dim=1), step.std, rtol=0.01, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_level_zero_is_the_euler_step(dtype):
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 5, 4, generator=g).to(dtype), torch.randn(2, 5, 4, generator=g).to(dtype)
    for sigma, sigma_next in [(1.0, 0.87), (0.41, 0.2), (0.2, 0.0)]:
        step = sde_step(x, v, sigma, sigma_next, 0.0)
        assert torch.equal(step.prev_sample, euler_step(x, v, sigma, sigma_next))
        assert step.prev_sample.dtype == dtype and step.mean.dtype == torch.float32
        assert torch.equal(step.log_prob, torch.zeros(2)) and torch.equal(step.std, torch.zeros(2))


def test_low_precision_latents_are_stepped_and_scored_in_float32():
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    low = sde_step(x.bfloat16(), v.bfloat16(), 0.7, 0.5, 0.7, generator=torch.Generator().manual_seed(4))
    assert low.prev_sample.dtype == torch.bfloat16
    assert low.mean.dtype == low.log_prob.dtype == low.std.dtype == torch.float32
    full = sde_step(x.bfloat16().float(), v.bfloat16().float(), 0.7, 0.5, 0.7, prev_sample=low.prev_sample.float())
    assert torch.equal(low.log_prob, full.log_prob)


def test_per_item_sigmas_equal_separate_steps():
    g = torch.Generator().manual_seed(5)
    x, v = torch.randn(2, 7, generator=g), torch.randn(2, 7, generator=g)
    prev = torch.randn(2, 7, generator=g)
    both = sde_step(x, v, torch.tensor([1.0, 0.4]), torch.tensor([0.8, 0.1]), 0.7, prev_sample=prev)
    first = sde_step(x[:1], v[:1], 1.0, 0.8, 0.7, prev_sample=prev[:1])
    second = sde_step(x[1:], v[1:], 0.4, 0.1, 0.7, prev_sample=prev[1:])
    torch.testing.assert_close(both.log_prob, torch.cat([first.log_prob, second.log_prob]))
    torch.testing.assert_close(both.mean, torch.cat([first.mean, second.mean]))


def test_log_prob_gradient_flows_through_the_velocity_only():
    x = torch.randn(2, 5)
    v = torch.randn(2, 5, requires_grad=True)
    prev = torch.randn(2, 5, requires_grad=True)
    step = sde_step(x, v, 0.6, 0.4, 0.7, prev_sample=prev)
    step.log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert prev.grad is None  # the stored sample is data, not a function of the policy


@pytest.mark.parametrize("kwargs, message", [
    ({"sigma": 0.5, "sigma_next": 0.5}, "sigma_next"),
    ({"sigma": 0.5, "sigma_next": 0.6}, "sigma_next"),
    ({"sigma": 0.0, "sigma_next": 0.0}, "sigma must"),
    ({"sigma": 1.2, "sigma_next": 0.5}, "sigma must"),
    ({"noise_level": -0.1}, "noise_level"),
    ({"noise_level": float("nan")}, "noise_level"),
    ({"generator": [torch.Generator()]}, "generators"),
    ({"sigma": torch.tensor([0.5, 0.4, 0.3])}, r"\[2\] tensor"),
])
def test_step_rejects_bad_input(kwargs, message):
    args = {"sigma": 0.5, "sigma_next": 0.4, "noise_level": 0.7}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sde_step(torch.zeros(2, 3), torch.zeros(2, 3), **args)


# ----------------------------------------------------------------------------- SDE rollouts

def test_sde_sample_without_noise_is_euler_sample():
    schedule = flux_schedule(FLUX_SCHEDULER, 6, 256)
    latents = torch.randn(3, 16, 4, generator=torch.Generator().manual_seed(0))
    trajectory = sde_sample(_toy_velocity, latents, schedule, 0.0)
    assert torch.equal(trajectory.final, euler_sample(_toy_velocity, latents, schedule))
    assert torch.equal(trajectory.latents[:, 0], latents)
    assert torch.equal(trajectory.log_probs, torch.zeros(3, 6))


def test_rollout_records_what_the_update_recomputes():
    schedule = flux_schedule(FLUX_SCHEDULER, 5, 64)
    latents = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
    trajectory = sde_sample(_toy_velocity, latents, schedule, 0.7, gens)
    assert trajectory.latents.shape == (2, 6, 8, 4) and trajectory.means.shape == (2, 5, 8, 4)
    assert trajectory.log_probs.shape == trajectory.stds.shape == (2, 5)
    assert bool(trajectory.mask.all()) and torch.equal(trajectory.sigmas, schedule.sigmas)
    for j in range(5):
        x = trajectory.latents[:, j]
        t = trajectory.timesteps[j].expand(2)
        step = sde_step(x, _toy_velocity(x, t), trajectory.sigmas[j].item(), trajectory.sigmas[j + 1].item(), 0.7,
                        prev_sample=trajectory.latents[:, j + 1])
        assert torch.equal(step.log_prob, trajectory.log_probs[:, j])  # PPO ratio exactly 1 at the start
        assert torch.equal(step.mean, trajectory.means[:, j])


def test_each_items_noise_is_its_own_generators():
    schedule = flux_schedule(FLUX_SCHEDULER, 4, 64)
    latents = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0))
    pair = sde_sample(_toy_velocity, latents, schedule, 0.7, [torch.Generator().manual_seed(s) for s in (1, 2)])
    alone = sde_sample(_toy_velocity, latents[1:], schedule, 0.7, [torch.Generator().manual_seed(2)])
    assert torch.equal(pair.latents[1:], alone.latents)
    assert not torch.equal(pair.latents[0, -1], pair.latents[1, -1])


def test_steps_outside_train_steps_run_as_ode():
    schedule = flux_schedule(FLUX_SCHEDULER, 6, 64)
    latents = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0))
    one = sde_sample(_toy_velocity, latents, schedule, 0.7, torch.Generator().manual_seed(1), train_steps=[2, 3])
    two = sde_sample(_toy_velocity, latents, schedule, 0.7, torch.Generator().manual_seed(2), train_steps=[2, 3])
    assert one.trained.tolist() == [False, False, True, True, False, False]
    assert torch.equal(one.mask, one.trained.expand(2, 6))
    assert torch.equal(one.latents[:, :3], two.latents[:, :3])  # deterministic up to the branch
    assert not torch.equal(one.latents[:, 3], two.latents[:, 3])
    assert torch.equal(one.log_probs[:, [0, 1, 4, 5]], torch.zeros(2, 4))
    assert (one.log_probs[:, 2:4] != 0).all() and (one.stds[:, 2:4] > 0).all()
    # After the window the rollout is the Euler step of its own latents.
    x = one.latents[:, 4]
    t = schedule.timesteps[4].expand(2)
    assert torch.equal(one.latents[:, 5], euler_step(x, _toy_velocity(x, t), *schedule.sigmas[4:6].tolist()))


def test_numpy_step_indices_are_accepted():
    schedule = flux_schedule(FLUX_SCHEDULER, 4, 64)
    trajectory = sde_sample(_toy_velocity, torch.zeros(1, 4, 4), schedule, 0.7, train_steps=np.array([0, 1]))
    assert trajectory.trained.tolist() == [True, True, False, False]


@pytest.mark.parametrize("steps", [[6], [-1], [], [1.0], [True]])
def test_bad_train_steps_are_rejected(steps):
    schedule = flux_schedule(FLUX_SCHEDULER, 6, 64)
    with pytest.raises(ValueError, match="train_steps"):
        sde_sample(_toy_velocity, torch.zeros(1, 4, 4), schedule, 0.7, train_steps=steps)


# ----------------------------------------------------------------------------- KL

def test_closed_form_kl_known_answers():
    mean = torch.randn(2, 6, 3)
    assert torch.equal(closed_form_kl(mean, mean.clone(), 0.3), torch.zeros(2))
    # Δ = 0.2 everywhere, std = 0.1: 0.04 / (2 · 0.01) = 2 per dim; std 0.2 gives 0.5.
    kl = closed_form_kl(mean + 0.2, mean, torch.tensor([0.1, 0.2]))
    torch.testing.assert_close(kl, torch.tensor([2.0, 0.5]))
    # It is the exact Gaussian KL per dimension, averaged over the dims.
    other = mean + torch.randn(2, 6, 3)
    normal = torch.distributions.Normal
    exact = torch.distributions.kl_divergence(normal(other, 0.4), normal(mean, 0.4))
    torch.testing.assert_close(closed_form_kl(other, mean, 0.4), exact.mean(dim=(1, 2)))
    assert torch.equal(closed_form_kl(other, mean, torch.tensor([0.0, 0.4]))[0], torch.tensor(0.0))


# σ = 0.5 → σ' = 0.25, a = 0.7: std_dev_t = sqrt(0.5/0.5)·0.7 = 0.7, dt = −0.25, so the
# transition std is 0.7·sqrt(0.25) = 0.35. The two means differ by 0.1 in every dim (0.2 in
# item 1's), so ‖Δ‖² averaged over dims is 0.01 (0.04):
#   exact      0.01 / (2·0.35²) = 0.0408163   0.04 / (2·0.35²) = 0.1632653
#   flow_grpo  0.01 / (2·0.7²)  = 0.0102041   0.04 / (2·0.7²)  = 0.0408163   (= exact·|dt|)
# At σ = 1 → σ' = 0.9 (the σ = 1 rule): std_dev_t² = 1/(1 − 0.9)·0.49 = 4.9, transition std² =
# 4.9·0.1 = 0.49; Δ = 0.1: exact 0.01/0.98 = 0.0102041, flow_grpo 0.01/9.8 = 0.00102041.
@pytest.mark.parametrize("sigma, sigma_next, exact, flow_grpo", [
    (0.5, 0.25, [0.01 / 0.245, 0.04 / 0.245], [0.01 / 0.98, 0.04 / 0.98]),
    (1.0, 0.9, [0.01 / 0.98, 0.04 / 0.98], [0.01 / 9.8, 0.04 / 9.8]),
])
def test_step_kl_known_answers_in_both_conventions(sigma, sigma_next, exact, flow_grpo):
    x, v = torch.zeros(2, 4, 2), torch.zeros(2, 4, 2)
    step = sde_step(x, v, sigma, sigma_next, 0.7, prev_sample=torch.zeros(2, 4, 2))
    ref_mean = step.mean - torch.tensor([0.1, 0.2]).view(2, 1, 1)
    torch.testing.assert_close(step_kl(step, ref_mean, "exact"), torch.tensor(exact))
    torch.testing.assert_close(step_kl(step, ref_mean, "flow_grpo"), torch.tensor(flow_grpo))
    torch.testing.assert_close(step_kl(step, ref_mean), torch.tensor(flow_grpo))  # the default
    # Flow-GRPO's line: ((mean − mean_ref)²).mean(dims) / (2·std_dev_t²), std_dev_t without sqrt(−dt).
    std_dev_t = math.sqrt(sigma / (1 - (sigma_next if sigma == 1 else sigma))) * 0.7
    theirs = ((step.mean - ref_mean) ** 2).mean(dim=(1, 2)) / (2 * std_dev_t**2)
    torch.testing.assert_close(step_kl(step, ref_mean, "flow_grpo"), theirs)
    torch.testing.assert_close(step_kl(step, ref_mean, "flow_grpo"),
                               step_kl(step, ref_mean, "exact") * (sigma - sigma_next))
    with pytest.raises(ValueError, match="convention"):
        step_kl(step, ref_mean, "sum")


# ----------------------------------------------------------------------------- advantages

# rewards [1, 2, 3 | 5, 5, 5], groups of 3:
#   group scope: group 0 mean 2, std sqrt(2/3) = 0.816497 → ±1.224745; group 1 constant → 0
#   batch scope: the 6 rewards' std = sqrt(15.5/6) = 1.607275 → ±0.622171
@pytest.mark.parametrize("scope, expected", [
    ("group", [-1.224745, 0.0, 1.224745, 0.0, 0.0, 0.0]),
    ("batch", [-0.622171, 0.0, 0.622171, 0.0, 0.0, 0.0]),
])
def test_group_advantages_known_answers(scope, expected):
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3, scope=scope)
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=0, atol=1e-5)
    assert torch.equal(adv[3:], torch.zeros(3))


@pytest.mark.parametrize("scope", ["group", "batch"])
def test_equal_rewards_give_exactly_zero_never_nan(scope):
    rewards = torch.tensor([0.1] * 3 + [0.7] * 3)  # 3·0.1/3 != 0.1 in floating point
    assert torch.equal(group_advantages(rewards, 3, scope=scope), torch.zeros(6))
    assert torch.equal(group_advantages(torch.full((4,), 0.3), 2, scope=scope), torch.zeros(4))


def test_advantages_are_clipped():
    # One success in 30: (29/30) / sqrt(29/900) = 5.385 > 5.
    rewards = torch.zeros(30)
    rewards[7] = 1.0
    adv = group_advantages(rewards, 30)
    assert adv[7] == 5.0 and adv.max() == 5.0
    assert group_advantages(rewards, 30, clip=None)[7] == pytest.approx(math.sqrt(29), rel=1e-5)


@pytest.mark.parametrize("args, message", [
    ((torch.zeros(6), 1), "group_size"),
    ((torch.zeros(5), 2), "whole number"),
    ((torch.zeros(2, 2), 2), r"\[B\]"),
    ((torch.tensor([1.0, float("nan")]), 2), "finite"),
])
def test_advantages_reject_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(*args)
    with pytest.raises(ValueError, match="scope"):
        group_advantages(torch.zeros(4), 2, scope="global")


# ----------------------------------------------------------------------------- GRPO / GSPO

# Two trajectories, two steps, advantages A = [1, −2]; ratios r = exp(new − old):
#
#   (b, j)  A    r     GRPO ε=0.2: clip(r)  max(−A·r, −A·clip r)   outside?
#   (0, 0)  1    1.1   1.1                   −1.1                   no
#   (0, 1)  1    1.5   1.2                   −1.2                   yes
#   (1, 0)  −2   0.7   0.8                    1.6                   yes
#   (1, 1)  −2   1.0   1.0                    2.0                   no
#
# GRPO, all steps: loss = (−1.1 − 1.2 + 1.6 + 2.0)/4 = 0.325, clip fraction 2/4, ratio mean 4.3/4.
# GRPO, mask [[1, 0], [1, 1]]: loss = (−1.1 + 1.6 + 2.0)/3 = 5/6, clip fraction 1/3.
RATIOS = torch.tensor([[1.1, 1.5], [0.7, 1.0]])
ADVANTAGES = torch.tensor([1.0, -2.0])
OLD = torch.tensor([[-3.0, -2.5], [-1.0, 0.5]])


def _new(ratios=RATIOS):
    return (OLD + ratios.log()).requires_grad_(True)


@pytest.mark.parametrize("mask, loss, clip_fraction, ratio_mean", [
    (None, 0.325, 0.5, 1.075),
    (torch.tensor([[True, False], [True, True]]), 5 / 6, 1 / 3, 2.8 / 3),
])
def test_grpo_known_answers(mask, loss, clip_fraction, ratio_mean):
    new = _new()
    value, stats = grpo_loss(new, OLD, ADVANTAGES, clip_range=0.2, mask=mask)
    assert value.item() == pytest.approx(loss, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(clip_fraction)
    assert stats["ratio_mean"] == pytest.approx(ratio_mean, abs=1e-6)
    log_r = RATIOS.log() if mask is None else RATIOS.log()[mask]
    assert stats["approx_kl"] == pytest.approx(0.5 * (log_r**2).mean().item(), abs=1e-7)


def test_grpo_gradient_is_zero_on_clipped_steps():
    new = _new()
    grpo_loss(new, OLD, ADVANTAGES, clip_range=0.2)[0].backward()
    # d/d log r of −A·r/4 is −A·r/4 where the unclipped term is taken: (0,0) −1.1/4, (1,1) 2·1/4.
    torch.testing.assert_close(new.grad, torch.tensor([[-1.1 / 4, 0.0], [0.0, 0.5]]))


# GSPO, same numbers, clip [1 − 0.2, 1 + 0.25]: s_b = exp(mean over trained steps of log r),
# loss = −mean_b min(s_b·A_b, clip(s_b)·A_b):
#
#   mask              s_0                    s_1                   terms −min(...)    loss      outside
#   all               sqrt(1.65) = 1.284523  sqrt(0.7) = 0.836660  −1.25, +1.673320   0.211660  1/2
#   [[1, 0], [1, 1]]  1.1                    0.836660              −1.1,  +1.673320   0.286660  0/2
#   [[1, 1], [1, 0]]  1.284523 (→ 1.25)      0.7 (→ 0.8)           −1.25, +1.6        0.175     2/2
@pytest.mark.parametrize("mask, loss, clip_fraction, ratio_mean", [
    (None, 0.211660, 0.5, (math.sqrt(1.65) + math.sqrt(0.7)) / 2),
    (torch.tensor([[True, False], [True, True]]), 0.286660, 0.0, (1.1 + math.sqrt(0.7)) / 2),
    (torch.tensor([[True, True], [True, False]]), 0.175, 1.0, (math.sqrt(1.65) + 0.7) / 2),
])
def test_gspo_known_answers(mask, loss, clip_fraction, ratio_mean):
    value, stats = gspo_loss(_new(), OLD, ADVANTAGES, clip_low=0.2, clip_high=0.25, mask=mask)
    assert value.item() == pytest.approx(loss, abs=1e-6)
    assert stats["clip_fraction"] == clip_fraction
    assert stats["ratio_mean"] == pytest.approx(ratio_mean, abs=1e-6)


def test_gspo_with_one_step_and_symmetric_clip_is_grpo():
    new, old = torch.randn(6, 1) * 0.1, torch.randn(6, 1) * 0.1
    adv = torch.randn(6)
    g = grpo_loss(new, old, adv, clip_range=0.05)
    s = gspo_loss(new, old, adv, clip_low=0.05, clip_high=0.05)
    torch.testing.assert_close(g[0], s[0])
    assert g[1]["clip_fraction"] == s[1]["clip_fraction"]


# Four trajectories, clip [1 − 0.2, 1 + 0.25], ratios s = 1.3, 0.7, 1.1, 0.7:
#   b  A    s    clip(s)  s·A     clip(s)·A  min takes   gradient
#   0  1    1.3  1.25     1.3     1.25       clipped     0
#   1  1    0.7  0.8      0.7     0.8        s·A         yes (the pessimistic side)
#   2  −1   1.1  1.1      −1.1    −1.1       tie         yes (inside the range)
#   3  −1   0.7  0.8      −0.7    −0.8       clipped     0
SEQ_RATIOS, SEQ_ADV = torch.tensor([1.3, 0.7, 1.1, 0.7], dtype=torch.float64), torch.tensor([1.0, 1.0, -1.0, -1.0])


def test_gspo_log_prob_weights_are_autograds_gradient():
    old = torch.randn(4, 3, dtype=torch.float64)
    new = old + SEQ_RATIOS.log()[:, None] + torch.tensor([0.01, -0.02, 0.01], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, False, True], [True, True, True], [False, True, True]])
    for m in (None, mask):
        leaf = new.clone().requires_grad_(True)
        gspo_loss(leaf, old, SEQ_ADV, clip_low=0.2, clip_high=0.25, mask=m)[0].backward()
        weights = gspo_log_prob_weights(new, old, SEQ_ADV, clip_low=0.2, clip_high=0.25, mask=m)
        torch.testing.assert_close(weights, leaf.grad, rtol=1e-12, atol=1e-15)
        assert torch.equal(weights[[0, 3]], torch.zeros(2, 3)) and bool((weights[1:3].abs().sum(dim=1) > 0).all())
    # Hand-worked, all steps trained: w_bj = −A_b·s_b/(T·B) = −A_b·s_b/12 on the active rows.
    s = (new - old).mean(dim=1).exp()
    weights = gspo_log_prob_weights(new, old, SEQ_ADV, clip_low=0.2, clip_high=0.25)
    torch.testing.assert_close(weights[1], (-s[1] / 12).expand(3))
    torch.testing.assert_close(weights[2], (s[2] / 12).expand(3))


def _toy_log_probs(theta, x, x_next, steps):
    """log-probs [B, len(steps)] of stored transitions under a policy whose velocity is
    tanh(x·θ_j): each step its own little network, so the steps' gradients differ."""
    sigmas = [1.0, 0.8, 0.55, 0.3, 0.0]
    out = []
    for j in steps:
        v = torch.tanh(x[:, j] @ theta[j])
        mean, std = _reference_step(x[:, j], v, sigmas[j], sigmas[j + 1], 0.7)
        out.append(torch.distributions.Normal(mean, std).log_prob(x_next[:, j]).mean(dim=(1, 2)))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("off_policy", [False, True])
def test_gspo_step_by_step_backward_is_the_whole_graphs_gradient_float64(off_policy):
    # GSPO's update backpropagates one denoising step at a time with Σ_b w_bj·log π_j and
    # weights from a no-grad pass; the summed gradients must be autograd's over all steps.
    g = torch.Generator().manual_seed(0)
    steps = [0, 1, 3]
    x = torch.randn(4, 4, 5, 3, generator=g, dtype=torch.float64)
    x_next = x + 0.3 * torch.randn(4, 4, 5, 3, generator=g, dtype=torch.float64)
    theta_old = 0.5 * torch.randn(4, 3, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        old = _toy_log_probs(theta_old, x, x_next, steps)
    theta = theta_old + (0.02 * torch.randn(4, 3, 3, generator=g, dtype=torch.float64) if off_policy else 0)
    with torch.no_grad():
        current = _toy_log_probs(theta, x, x_next, steps)
    s = (current - old).mean(dim=1).exp()
    if off_policy:
        # Rows 0, 1 clipped (the min takes the constant), rows 2, 3 on the pessimistic side.
        bound = float((s - 1).abs().min()) / 2
        adv = torch.sign(s - 1) * torch.tensor([1.0, 2.0, -1.0, -0.5], dtype=torch.float64)
    else:
        assert torch.equal(s, torch.ones(4, dtype=torch.float64))
        bound, adv = 1e-4, torch.tensor([1.0, -2.0, 0.5, -0.5], dtype=torch.float64)

    whole = theta.clone().requires_grad_(True)
    gspo_loss(_toy_log_probs(whole, x, x_next, steps), old, adv, clip_low=bound, clip_high=bound)[0].backward()

    stepwise = theta.clone().requires_grad_(True)
    weights = gspo_log_prob_weights(current, old, adv, clip_low=bound, clip_high=bound)
    for n, j in enumerate(steps):  # one step's graph at a time
        (weights[:, n] * _toy_log_probs(stepwise, x, x_next, [j])[:, 0]).sum().backward()
    torch.testing.assert_close(stepwise.grad, whole.grad, rtol=1e-12, atol=1e-15)
    assert whole.grad[steps].abs().min(dim=-1).values.min() > 0 and whole.grad[2].abs().max() == 0
    if off_policy:
        assert torch.equal(weights[:2], torch.zeros(2, 3)) and bool((weights[2:] != 0).all())


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_on_policy_loss_is_minus_the_mean_advantage(name):
    logp = torch.randn(4, 3)
    adv = torch.tensor([1.0, -0.5, 2.0, 0.0])
    loss, stats = OBJECTIVES[name](logp.clone().requires_grad_(True), logp, adv)
    assert loss.item() == pytest.approx(-0.625)
    assert stats["clip_fraction"] == 0.0 and stats["approx_kl"] == 0.0 and stats["ratio_mean"] == 1.0


def test_policy_losses_reject_bad_input():
    logp, adv = torch.zeros(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match="no step"):
        grpo_loss(logp, logp, adv, mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"trajectories \[1\]"):
        gspo_loss(logp, logp, adv, mask=torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, logp, torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        gspo_loss(logp, torch.zeros(2, 4), adv)
    with pytest.raises(ValueError, match="clip_low"):
        gspo_loss(logp, logp, adv, clip_low=1.0)


# ----------------------------------------------------------------------------- Diffusion-DPO

def test_dpo_loss_is_log_two_when_policy_and_reference_agree():
    err_w, err_l = torch.rand(3, 10), torch.rand(3, 10)
    loss, stats = diffusion_dpo_loss(err_w, err_w.clone(), err_l, err_l.clone(), beta=2000.0)
    assert loss.item() == pytest.approx(math.log(2))
    assert stats["implicit_accuracy"] == 0.5 and stats["reward_margin"] == 0.0


def test_dpo_loss_known_answer():
    # Winner error down 0.1 vs the reference, loser up 0.1, β·T = 5:
    # margin = −5·(−0.1 − 0.1) = 1, loss = −log σ(1) = log(1 + e^−1) = 0.313262.
    ref_w, ref_l = torch.full((2, 4), 0.5), torch.full((2, 4), 0.5)
    loss, stats = diffusion_dpo_loss(ref_w - 0.1, ref_w, ref_l + 0.1, ref_l, beta=0.5, timestep_scale=10.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    assert stats["implicit_accuracy"] == 1.0
    assert stats["reward_margin"] == pytest.approx(1.0, abs=1e-6)
    assert stats["reward_winner"] == pytest.approx(0.5, abs=1e-6)
    assert stats["reward_loser"] == pytest.approx(-0.5, abs=1e-6)


def test_dpo_weights_are_a_normalised_weighted_sum():
    g = torch.Generator().manual_seed(0)
    errs = [torch.rand(2, 6, generator=g) for _ in range(4)]
    only_first = torch.zeros(6)
    only_first[0] = 3.0  # the scale of the weights does not matter
    weighted = diffusion_dpo_loss(*errs, beta=4.0, weights_w=only_first, weights_l=only_first)[0]
    sliced = diffusion_dpo_loss(*[e[:, :1] for e in errs], beta=4.0)[0]
    torch.testing.assert_close(weighted, sliced)
    uniform = diffusion_dpo_loss(*errs, beta=4.0, weights_w=torch.ones(2, 6), weights_l=torch.ones(6))[0]
    torch.testing.assert_close(uniform, diffusion_dpo_loss(*errs, beta=4.0)[0])


def test_dpo_gradient_reaches_the_policy_only():
    err_w, err_l = torch.rand(2, 5, requires_grad=True), torch.rand(2, 5, requires_grad=True)
    ref_w, ref_l = torch.rand(2, 5, requires_grad=True), torch.rand(2, 5, requires_grad=True)
    diffusion_dpo_loss(err_w, ref_w, err_l, ref_l, beta=1.0)[0].backward()
    assert (err_w.grad > 0).all() and (err_l.grad < 0).all()  # lower winner error, higher loser error
    assert ref_w.grad is None and ref_l.grad is None


def test_dpo_rejects_bad_input():
    e = torch.rand(2, 4)
    with pytest.raises(ValueError, match="shape"):
        diffusion_dpo_loss(e, e, e, torch.rand(2, 5), beta=1.0)
    with pytest.raises(ValueError, match="weights_w"):
        diffusion_dpo_loss(e, e, e, e, beta=1.0, weights_w=torch.zeros(4))
    with pytest.raises(ValueError, match="weights_l"):
        diffusion_dpo_loss(e, e, e, e, beta=1.0, weights_l=-torch.ones(4))
    with pytest.raises(ValueError, match="beta"):
        diffusion_dpo_loss(e, e, e, e, beta=0.0)


# ----------------------------------------------------------------------------- FocusDPO weights

def test_structure_map_peaks_where_target_matches_the_masked_reference():
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(12, 32, generator=g)
    mask = torch.zeros(12, dtype=torch.bool)
    mask[[2, 3]] = True
    target = torch.randn(16, 32, generator=g)
    target[5] = 4.0 * reference[2]  # same direction, other scale: cosine 1
    target[9] = reference[7]  # matches a token outside the subject mask: ignored
    smap = structure_map(target, [reference], [mask], top_k=1)
    assert smap.shape == (16,) and smap.argmax() == 5 and smap[5] == 1.0 and smap.min() == 0.0
    assert smap[9] < 0.5


def test_structure_map_combines_references_by_max():
    g = torch.Generator().manual_seed(1)
    refs = [torch.randn(6, 16, generator=g) for _ in range(2)]
    masks = [torch.ones(6, dtype=torch.bool), torch.tensor([True, True, False, False, False, False])]
    target = torch.randn(10, 16, generator=g)
    target[1], target[8] = refs[0][4], refs[1][0]
    both = structure_map(target, refs, masks, top_k=2)
    each = [structure_map(target, [r], [m], top_k=2) for r, m in zip(refs, masks)]
    torch.testing.assert_close(both, torch.maximum(*each))
    with pytest.raises(ValueError, match="reference 1: the subject mask"):
        structure_map(target, refs, [masks[0], torch.zeros(6, dtype=torch.bool)])


def test_detail_map_is_high_on_texture_and_zero_on_flat():
    rng = np.random.default_rng(0)
    image = np.full((3, 32, 64), 0.5)
    image[:, :, 32:] = rng.random((1, 32, 32))  # right half: grey noise
    dmap = detail_map(torch.from_numpy(image), token_stride=16, sigma=1.0)
    assert dmap.shape == (8,) and dmap.max() == 1.0
    grid = dmap.view(2, 4)
    assert (grid[:, 2:] > 0.5).all() and (grid[:, :1] == 0).all()
    assert torch.equal(detail_map(np.full((3, 32, 32), 0.2), token_stride=16), torch.zeros(4))
    with pytest.raises(ValueError, match="whole grid"):
        detail_map(np.zeros((3, 30, 32)), token_stride=16)


def test_focus_weights_have_mean_one_and_switch_detail_on_at_low_noise():
    structure = torch.tensor([0.0, 1.0, 0.5, 0.0])
    detail = torch.tensor([1.0, 0.0, 0.0, 0.0])
    high = focus_weights(structure, detail, sigma_t=0.9, detail_on_below=0.5, floor=0.1)
    low = focus_weights(structure, detail, sigma_t=0.2, detail_on_below=0.5, floor=0.1)
    # High noise: floor + structure = [0.1, 1.1, 0.6, 0.1], mean 0.475.
    torch.testing.assert_close(high, torch.tensor([0.1, 1.1, 0.6, 0.1]) / 0.475)
    # Low noise: + detail = [1.1, 1.1, 0.6, 0.1], mean 0.725.
    torch.testing.assert_close(low, torch.tensor([1.1, 1.1, 0.6, 0.1]) / 0.725)
    assert high.mean().item() == pytest.approx(1.0) and low.mean().item() == pytest.approx(1.0)
    flat = focus_weights(torch.zeros(5), torch.zeros(5), sigma_t=0.1)
    assert torch.equal(flat, torch.ones(5))
    with pytest.raises(ValueError, match="floor"):
        focus_weights(structure, detail, 0.1, floor=0.0)


# ----------------------------------------------------------------------------- disrupted pairs

@pytest.mark.parametrize("example_seed, subjects", [(0, 2), (1, 3), (2, 4), (3, 1)])
def test_disrupted_pair_changes_only_the_disrupted_instance(example_seed, subjects):
    example = tw.sample_example(example_seed, subjects, tw.DEFAULT_ID_RANGES["train"])
    winner, loser, k = disrupted_pair(example, seed=example_seed, size=64)
    assert winner.image.tobytes() == tw.render(example.target, 64).image.tobytes()
    old, new = example.target.subjects[k], loser.spec.subjects[k]
    assert tw.Identity.from_id(new.identity).category == tw.Identity.from_id(old.identity).category
    assert tw.Identity.from_id(new.identity).colour != tw.Identity.from_id(old.identity).colour
    assert tw.DEFAULT_ID_RANGES["train"][0] <= new.identity < tw.DEFAULT_ID_RANGES["train"][1]
    # Everything but that subject's identity is the same spec.
    assert [s for i, s in enumerate(loser.spec.subjects) if i != k] == \
        [s for i, s in enumerate(example.target.subjects) if i != k]
    assert (loser.spec.scene, loser.spec.scene_seed, loser.spec.relation) == \
        (example.target.scene, example.target.scene_seed, example.target.relation)
    assert (new.x, new.y, new.size, new.pose, new.attributes) == (old.x, old.y, old.size, old.pose, old.attributes)
    changed = (winner.image != loser.image).any(axis=2)
    near = binary_dilation((winner.alpha[k] > 0) | (loser.alpha[k] > 0), iterations=1)
    assert changed.any() and not (changed & ~near).any()
    assert changed[winner.masks[k]].mean() > 0.5  # a visible disruption, not a few pixels


def test_disrupted_pair_is_a_function_of_the_seed():
    example = tw.sample_example(5, 3, tw.DEFAULT_ID_RANGES["train"])
    a, b = disrupted_pair(example, 7), disrupted_pair(example, 7)
    assert a.subject == b.subject and a.loser.spec == b.loser.spec
    pairs = [disrupted_pair(example, s) for s in range(6)]
    picks = {(p.subject, p.loser.spec.subjects[p.subject].identity) for p in pairs}
    assert len(picks) > 1
    with pytest.raises(ValueError, match="no other-coloured"):
        disrupted_pair(example, 0, id_range=(0, 1))
