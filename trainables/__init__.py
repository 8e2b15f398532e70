"""HOW one trial runs: data, models, losses and metrics, pruning, the stage loops, the Ray entry."""
