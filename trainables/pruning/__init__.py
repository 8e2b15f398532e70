"""Gradual pruning: schedules, importance scores and masks as functions; the loop owns the counters."""
