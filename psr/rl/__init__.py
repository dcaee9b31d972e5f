"""Online RL and preference tuning for the flow-matching model: the numerical core.

    sde.py         Flow-GRPO's ODE→SDE step with log-probs, SDE rollouts, closed-form KL
    advantages.py  group-relative advantages
    losses.py      GRPO / GSPO policy losses (OBJECTIVES), Diffusion-DPO loss
    focus.py       FocusDPO's spatial token weights (structure map, detail map)
    pairs.py       ToyWorld disrupted-instance preference pairs

docs/rl.md gives the formulas and the choices psr makes where the papers leave them open.
"""
