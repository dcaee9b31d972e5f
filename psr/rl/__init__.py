"""Online RL and preference tuning for the flow-matching model.

The numerical core:
    sde.py         Flow-GRPO's ODE→SDE step with log-probs, SDE rollouts, closed-form KL
    advantages.py  group-relative advantages
    losses.py      GRPO / GSPO policy losses (OBJECTIVES), Diffusion-DPO loss
    focus.py       FocusDPO's spatial token weights (structure map, detail map)
    pairs.py       ToyWorld disrupted-instance preference pairs

The `psr rl` command (psr/workflows/rl.py drives these):
    config.py      the recipe (RlRecipe) and its sections
    sources.py     prompts and references from a dataset or a bench; the resumable order
    policy.py      the model's velocity as policy or reference (adapters disabled); `init`
    grpo.py        rollouts, rewards, advantages, the GRPO / GSPO update
    dpo.py         FocusDPO pairs (disrupted, self-ranked), focus weights, the pair loss
    evaluation.py  held-out ODE samples scored by the reward mix

docs/rl.md gives the formulas and the choices psr makes where the papers leave them open.
"""

