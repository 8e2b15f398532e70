"""Timing in rounds: a slow spell (a model timed right after an export) does not set the latency."""

import time

import torch
from torch import nn

from deploy.timing import TimingSetup, time_rounds


class SlowAtFirst(nn.Module):
    """Runs `slow_calls` calls at 20 ms, then 1 ms ones."""

    def __init__(self, slow_calls: int) -> None:
        super().__init__()
        self.calls, self.slow_calls = 0, slow_calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(0.02 if self.calls <= self.slow_calls else 0.001)
        return x


def test_the_fastest_round_is_kept_and_every_runner_is_timed_in_each() -> None:
    setup = TimingSetup("torch", (8, 8), 1, repeats=6, warmup=1, min_time_s=0.0, rounds=3)
    runners = {"slow start": SlowAtFirst(slow_calls=3), "steady": SlowAtFirst(slow_calls=0)}
    timed = time_rounds(runners, setup)
    # Each round: a probe after 1 warm-up run, then 2 timed runs; round 1 is all slow.
    assert runners["slow start"].calls == runners["steady"].calls == 3 * (1 + 1 + 2)
    assert timed["slow start"]["latency_ms"] < 10 and timed["steady"]["latency_ms"] < 10
    assert timed["slow start"]["timed_runs"] == 6

    one_round = TimingSetup("torch", (8, 8), 1, repeats=6, warmup=1, min_time_s=0.0, rounds=1)
    assert time_rounds({"m": SlowAtFirst(slow_calls=6)}, one_round)["m"]["latency_ms"] > 15
