"""The budget search's search algorithm: Optuna's multi-objective TPE told which proposals met the
budget (`BudgetSampler`), and a Tune searcher that ends the search once its fine-tuning epochs are
spent (`EpochBudget`)."""

from __future__ import annotations

import copy
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune.search.searcher import Searcher
from ray.tune.search.util import _set_search_properties_backwards_compatible

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


class EpochBudget(Searcher):
    """Proposals from `searcher` until the search has spent `limit` fine-tuning epochs: a
    configuration over the latency budget stops before fine-tuning and spends none, so the
    epochs it saves go to further configurations.

    A proposal is made only while the epochs finished configurations spent (their last result's
    `finetune_epochs`), plus those running ones may still spend (`planned[arch]` each), leave
    room for one more at the most any architecture plans: the search never spends more than
    `limit`. With no room while configurations run, it waits (one may stop over budget and give
    its epochs back); with none running, the search is finished. An errored configuration counts
    as having spent its planned epochs."""

    def __init__(self, searcher: Searcher, limit: int, planned: dict[str, int]) -> None:
        self.searcher = searcher
        self.limit = int(limit)
        self.planned = dict(planned)
        self.live: dict[str, int] = {}  # trial id -> fine-tuning epochs it may still spend
        self.spent = 0
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    @property
    def committed(self) -> int:
        return self.spent + sum(self.live.values())

    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict, **spec: Any
    ) -> bool:
        return _set_search_properties_backwards_compatible(
            self.searcher.set_search_properties, metric, mode, config, **spec
        )

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.committed + max(self.planned.values()) > self.limit:
            return None if self.live else Searcher.FINISHED
        suggestion = self.searcher.suggest(trial_id)
        if isinstance(suggestion, dict):
            self.live[trial_id] = self.planned[suggestion["arch"]]
        return suggestion

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        planned = self.live.pop(trial_id, 0)
        done = (result or {}).get("finetune_epochs")
        counted = isinstance(done, int | float) and not isinstance(done, bool) and not error
        self.spent += int(done) if counted else planned
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def on_pause(self, trial_id: str) -> None:
        self.searcher.on_pause(trial_id)

    def on_unpause(self, trial_id: str) -> None:
        self.searcher.on_unpause(trial_id)

    # Tune saves a wrapper's own state with get_state and its innermost searcher on its own.
    def get_state(self) -> dict:
        return copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "searcher"})

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
