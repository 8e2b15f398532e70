"""Optuna's multi-objective TPE for the budget search, told which proposals met the budget."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

CONSTRAINT = "constraints:latency_over_budget_ms"  # the key Trial.set_constraint writes


class BudgetSampler(optuna.samplers.TPESampler):
    """Multi-objective TPE (validation mIoU, latency) with latency minus budget as each finished
    trial's constraint: TPE models feasible and infeasible proposals apart, so it proposes more
    of what met the budget while the rest of the front is still explored.

    Ray Tune reports results through `Study.tell`, with no `Trial` to call `set_constraint` on,
    so the constraint is stored here, as `set_constraint` stores it, once the values are known."""

    def __init__(self, budget_ms: float, **kwargs: Any) -> None:
        self.budget_ms = budget_ms
        super().__init__(**kwargs)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: list[float] | None,
    ) -> None:
        if state == TrialState.COMPLETE and values is not None and len(values) == 2:
            over = float(values[1]) - self.budget_ms
            study._storage.set_trial_system_attr(trial._trial_id, CONSTRAINT, over)
        super().after_trial(study, trial, state, values)
