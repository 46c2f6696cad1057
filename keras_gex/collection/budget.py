"""How many members `num_members="auto"` runs: no more SGD steps than θ* trained.

The steps per member decide how far a member moves, and so what the scores
see (shorter members ranked worse, docs/design.md#step-epochs); the number of
members only averages the scores' noise (4 members ranked within 0.007 AUC of
8 on every zoo row, docs/design.md#number-of-members). So where 8 members, the
calibration's rejected probes and the member runs redone (collapsed or
diverged) would take more SGD steps than θ*'s own training did
(`model.optimizer.iterations`), the number of members gives way, down to
`MIN_MEMBERS`, and the steps per member never do. A member step on the
features of frozen layers computed once counts as the head's share of one of
θ*'s steps (`frozen.ModelSplit.step_cost`).
"""

from __future__ import annotations

import math

#: Members when θ*'s training took at least as many steps (or is unknown).
MAX_MEMBERS = 8
#: Members at the least: the fewest measured to rank like 8 on the zoo and
#: quality.py (docs/design.md#number-of-members).
MIN_MEMBERS = 4


def trained_steps(model) -> int | None:
    """The optimizer steps θ* was trained for, or None where the model does not say.

    A model compiled afresh (or never trained) has a new optimizer at step 0:
    unknown, not zero.
    """
    iterations = getattr(getattr(model, "optimizer", None), "iterations", None)
    if iterations is None:
        return None
    try:
        value = int(iterations.numpy() if hasattr(iterations, "numpy") else iterations)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def affordable_members(
    trained: int | None, steps: int, spent: int = 0, width: int = 1, step_cost: float = 1.0
) -> int:
    """Members whose steps, with `spent` steps of rejected runs, fit in `trained`.

    The rejected runs are the calibration's probes not kept (`rejected_steps`)
    and the members run again. `step_cost` is what one member step costs in
    θ*'s training steps: 1, except for members that fine-tune a head on the
    features of frozen layers computed once (`ModelSplit.step_cost`).

    A round of `width` members (one per replica) costs `steps` of time, so
    members come in whole rounds; the count stays within
    [`MIN_MEMBERS`, `MAX_MEMBERS`], and is `MAX_MEMBERS` where `trained` is
    unknown.

    >>> affordable_members(None, steps=200)
    8
    >>> affordable_members(3000, steps=200)
    8
    >>> affordable_members(1280, steps=157, spent=240)  # 6 members of 157 steps fit
    6
    >>> affordable_members(940, steps=235, spent=300)  # never fewer than 4
    4
    >>> affordable_members(1000, steps=200, width=2)  # 5 rounds of 2 replicas, capped
    8
    >>> affordable_members(960, steps=157, spent=235)  # a step through the whole model
    4
    >>> affordable_members(960, steps=157, spent=235, step_cost=0.7)  # a head's step
    7
    """
    if trained is None:
        return MAX_MEMBERS
    round_cost = max(steps, 1) * step_cost
    rounds = math.floor(max(trained - spent * step_cost, 0) / round_cost + 1e-9)
    return int(min(MAX_MEMBERS, max(MIN_MEMBERS, rounds * width)))


def rejected_steps(calibration: list) -> int:
    """SGD steps of the calibration probes not kept as members.

    >>> from keras_gex.config import Probe
    >>> kept = Probe(0.2, 0.5, 1.0, accepted=True, steps=160)
    >>> rejected_steps([Probe(0.1, 0.97, 1.0, steps=80), kept])
    80
    """
    return sum(p.steps or 0 for p in calibration if not p.accepted)
