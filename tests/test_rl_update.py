"""The GRPO / GSPO update on the tiny transformer: mini-batches, micro-batches, and GSPO's
step-by-step backward against autograd over the whole graph."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from psr.rl import grpo
from psr.rl.config import PolicyConfig
from psr.rl.losses import gspo_loss
from psr.rl.sde import sde_step

G, STEPS, CHOSEN, NOISE_LEVEL = 3, 3, [0, 2], 0.7


@pytest.fixture(scope="module")
def setup(tiny_components, one_thread):
    """A LoRA'd copy of the tiny model and two groups of three rollouts (on-policy)."""
    from psr.core.adapters import AdapterConfig, apply_adapter
    from psr.core.model import MultiRefFlux
    from psr.rl.policy import Policy, condition
    from psr.rl.sde import sde_sample

    model = MultiRefFlux(copy.deepcopy(tiny_components), reference_size=32, max_sequence_length=16)
    named = apply_adapter(model.transformer, AdapterConfig(kind="lora", rank=4))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at 0; a nonzero adapter gives the reference something to differ from
        for name, param in named:
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=gen)
    policy = Policy(model, model.transformer)
    groups = []
    for k in range(2):
        refs = [Image.fromarray(np.random.default_rng(k).integers(0, 256, (32, 32, 3), dtype=np.uint8))]
        cond = condition(model, f"prompt {k}", refs, 32, G, 1.0)
        latents = model.noise([10 * k + i for i in range(G)], 32, 32).to(policy.dtype)
        trajectory = sde_sample(lambda x, t: policy.velocity(x, t, cond), latents,
                                grpo.schedule_for(model, STEPS, cond.grid), NOISE_LEVEL,
                                [torch.Generator().manual_seed(100 + 10 * k + i) for i in range(G)])
        groups.append(grpo.Group(None, refs, cond, trajectory, []))
    rollout_weights = {n: p.detach().clone() for n, p in named}
    return policy, named, groups, rollout_weights


@pytest.fixture()
def state(setup):
    """The setup with the adapter back at the rollout's weights (on-policy)."""
    policy, named, groups, rollout_weights = setup
    with torch.no_grad():
        for name, param in named:
            param.copy_(rollout_weights[name])
    return policy, named, groups


def _drift(named, scale=0.05, seed=1):
    """Move the adapter away from the rollout's weights (as earlier optimizer steps do)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in named:
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=gen) * scale)


def _grads(policy, named, groups, advantages, objective, cfg, **kwargs):
    for _, param in named:
        param.grad = None
    stats = grpo.update(policy, groups, advantages, CHOSEN, objective, cfg, NOISE_LEVEL,
                        backward=lambda loss: loss.backward(), **kwargs)
    return torch.cat([p.grad.flatten() for _, p in named]), stats


def _log_probs(policy, groups, rows, grad):
    """[len(rows), |CHOSEN|] log-probs of the stored transitions, written out with sde_step."""
    out = []
    for r in rows:
        group, i = groups[r // G], r % G
        traj = group.trajectory
        sigmas = traj.sigmas.tolist()
        per_step = []
        with policy.token_mask(group.cond):
            for j in CHOSEN:
                x = traj.latents[i:i + 1, j]
                v = policy.velocity(x, traj.timesteps[j].expand(1), group.cond.take(1), grad=grad)
                per_step.append(sde_step(x, v, sigmas[j], sigmas[j + 1], NOISE_LEVEL,
                                         prev_sample=traj.latents[i:i + 1, j + 1]).log_prob)
        out.append(torch.cat(per_step))
    return torch.stack(out)


def _old(groups, rows):
    return torch.stack([groups[r // G].trajectory.log_probs[r % G, CHOSEN] for r in rows])


def _close(a, b, rtol=1e-4):
    scale = max(a.abs().max().item(), b.abs().max().item())
    assert scale > 0
    assert (a - b).abs().max().item() <= rtol * scale, ((a - b).abs().max().item(), scale)


def test_mini_batches_cut_a_fixed_shuffle_per_seed_step_and_epoch():
    parts = grpo.mini_batches(12, 3, 0, 5, 0, 1)
    assert sorted(r for p in parts for r in p) == list(range(12)) and [len(p) for p in parts] == [4, 4, 4]
    assert all(p == sorted(p) for p in parts)
    assert parts == grpo.mini_batches(12, 3, 0, 5, 0, 1)                       # a resume cuts the same
    others = [grpo.mini_batches(12, 3, *args) for args in [(1, 5, 0, 1), (0, 6, 0, 1), (0, 5, 1, 1), (0, 5, 0, 2)]]
    assert all(o != parts for o in others)
    assert grpo.mini_batches(12, 1, 0, 5, 0, 1) == [list(range(12))]         # one part: the batch as it is
    with pytest.raises(ValueError, match="equal mini-batches"):
        grpo.mini_batches(12, 5, 0, 0, 0, 0)


def test_conditioning_take_serves_a_subset_of_a_group(setup):
    cond = setup[2][0].cond
    two = cond.take(2)
    assert two.batch == 2 and torch.equal(two.text.embeds, cond.text.embeds[:2]) and two.refs is cond.refs
    assert cond.take(G) is cond
    with pytest.raises(ValueError):
        cond.take(G + 1)


@pytest.mark.parametrize("off_policy", [False, True])
def test_gspo_step_by_step_gradient_is_autograds_over_the_whole_graph(state, off_policy):
    policy, named, groups = state
    rows = [0, 2, 3, 4]  # a mini-batch that takes part of each group
    if off_policy:
        _drift(named)
    with torch.no_grad():
        seq = (_log_probs(policy, groups, rows, grad=False) - _old(groups, rows)).mean(dim=1).exp()
    if off_policy:
        # Every ratio outside the range; the advantage's sign decides which side of the min:
        # rows 0, 2 are clipped (no gradient), rows 3, 4 take the unclipped (pessimistic) term.
        bound = float((seq - 1).abs().min()) / 2
        sign = torch.sign(seq - 1)
        adv_rows = torch.stack([sign[0], 2 * sign[1], -sign[2], -0.5 * sign[3]])
    else:
        # The rollout's own policy: ratios 1 up to the rounding of a batch of 1 against G.
        torch.testing.assert_close(seq, torch.ones(4), rtol=0, atol=1e-5)
        bound, adv_rows = 1e-4, torch.tensor([1.0, -2.0, 0.5, -0.5])
    advantages = torch.zeros(2 * G)
    advantages[rows] = adv_rows
    cfg = PolicyConfig(clip_low=bound, clip_high=bound)

    for _, param in named:
        param.grad = None
    loss, stats = gspo_loss(_log_probs(policy, groups, rows, grad=True), _old(groups, rows), adv_rows,
                            clip_low=bound, clip_high=bound)
    loss.backward()
    whole = torch.cat([p.grad.flatten() for _, p in named])
    stepwise, logged = _grads(policy, named, groups, advantages, "gspo", cfg, rows=rows, micro_batch=1)
    _close(stepwise, whole)
    assert logged["clip_fraction"] == stats["clip_fraction"] == (1.0 if off_policy else 0.0)
    assert logged["policy_loss"] == pytest.approx(loss.item(), rel=1e-5)
    if off_policy:  # the clipped rows really give nothing: the unclipped rows alone give it all
        for _, param in named:
            param.grad = None
        loss, _ = gspo_loss(_log_probs(policy, groups, rows[2:], grad=True), _old(groups, rows[2:]), adv_rows[2:],
                            clip_low=bound, clip_high=bound)
        (loss / 2).backward()  # the mean over the 4 rows weighs each row 1/4
        _close(torch.cat([p.grad.flatten() for _, p in named]), whole)


@pytest.mark.parametrize("objective", ["grpo", "gspo"])
def test_micro_batches_give_the_whole_groups_gradient(state, objective):
    policy, named, groups = state
    _drift(named)
    advantages = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.9, -1.2])
    cfg = PolicyConfig(kl_beta=0.1, clip_range=1.0, clip_low=0.5, clip_high=0.5)
    whole, a = _grads(policy, named, groups, advantages, objective, cfg)
    single, b = _grads(policy, named, groups, advantages, objective, cfg, micro_batch=1)
    pair, _ = _grads(policy, named, groups, advantages, objective, cfg, micro_batch=2)  # 3 = 2 + 1
    _close(single, whole)
    _close(pair, whole)
    # Losses near 0 are sums of cancelling terms: compare them on the advantages' scale.
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-7) for k in a)
    # The same parameter delta from one optimizer step (SGD: −lr · gradient).
    deltas = [-0.1 * g for g in (whole, single)]
    _close(deltas[0], deltas[1])


def test_gspo_equals_grpo_on_policy_and_differs_off_policy(state):
    policy, named, groups = state
    advantages = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.9, -1.2])
    wide = PolicyConfig(clip_range=1.0, clip_low=0.5, clip_high=0.5)  # no clipping: only the ratios differ
    _close(_grads(policy, named, groups, advantages, "gspo", wide)[0],
           _grads(policy, named, groups, advantages, "grpo", wide)[0], rtol=1e-5)
    _drift(named, scale=0.5)
    gspo, grpo_ = (_grads(policy, named, groups, advantages, name, wide)[0] for name in ("gspo", "grpo"))
    # Off-policy GRPO weighs each step's gradient by its own ratio, GSPO all of a
    # trajectory's steps by the sequence ratio.
    assert (gspo - grpo_).abs().max() > 1e-3 * grpo_.abs().max()


@pytest.mark.parametrize("rows", [[1, 2, 5], [3, 5]])  # the second leaves group 0 out
def test_update_statistics_are_means_over_the_mini_batch(state, rows):
    policy, named, groups = state
    _drift(named)
    advantages = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.9, -1.2])
    cfg = PolicyConfig(clip_range=1e-12)
    grads, stats = _grads(policy, named, groups, advantages, "grpo", cfg, rows=rows, micro_batch=1)
    with torch.no_grad():
        ratio = (_log_probs(policy, groups, rows, grad=False) - _old(groups, rows)).exp()
    assert stats["ratio_mean"] == pytest.approx(ratio.mean().item(), rel=1e-6)
    assert stats["clip_fraction"] == pytest.approx(((ratio - 1).abs() > 1e-12).float().mean().item())
    assert bool(torch.isfinite(grads).all())


def _flat(*overrides):
    from psr.cli.recipes import load_recipe
    from psr.rl.config import OPERATIONAL
    from psr.train.config import _flat as flat
    from psr.train.config import _hashed, training_hash

    recipe = load_recipe("rl", overrides=list(overrides))
    return flat(_hashed(recipe), operational=OPERATIONAL), training_hash(recipe, OPERATIONAL)


def test_new_keys_move_the_hash_only_of_runs_they_change():
    new_keys = {"policy.mini_batches", "policy.kl_convention", "train.micro_batch"}
    # At the behaviour from before the keys existed they are not hashed: those runs still resume.
    for overrides in ([], ["objective='grpo'", "policy.kl_beta=0.1", "policy.kl_convention='exact'"],
                      ["objective='focusdpo'"], ["train.micro_batch=1"]):
        assert not new_keys & set(_flat(*overrides)[0]), overrides
    # Without a KL term the convention computes nothing (the default is flow_grpo).
    assert _flat("policy.kl_beta=0")[1] == _flat("policy.kl_beta=0", "policy.kl_convention='exact'")[1]
    assert _flat("policy.kl_beta=0.1")[0]["policy.kl_convention"] == "flow_grpo"
    assert _flat("policy.mini_batches=2")[0]["policy.mini_batches"] == 2
    # GSPO's bounds count for gspo only; grpo and focusdpo runs hash them as before the rescale.
    assert _flat("objective='grpo'")[0]["policy.clip_low"] == 3e-4
    assert _flat("objective='grpo'")[1] == _flat("objective='grpo'", "policy.clip_low=0.1")[1]
    assert _flat("objective='gspo'")[0]["policy.clip_low"] == 7.5e-5
    assert _flat("objective='gspo'")[1] != _flat("objective='gspo'", "policy.clip_low=0.1")[1]


@pytest.mark.parametrize("overrides, message", [
    (["policy.mini_batches=3"], "policy.mini_batches: 3 does not divide the 16 trajectories"),
    (["policy.mini_batches=0"], "policy.mini_batches: must be >= 1"),
    (["train.micro_batch=-1"], "train.micro_batch: must be >= 0"),
    (["policy.kl_convention='sum'"], "policy.kl_convention"),
])
def test_recipe_rejects_bad_update_settings(overrides, message):
    from psr.cli.recipes import load_recipe
    from psr.errors import RecipeError

    with pytest.raises(RecipeError) as err:
        load_recipe("rl", overrides=["rewards=[{name='psr'}]", *overrides])
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1
