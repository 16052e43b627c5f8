"""The search: the Optuna study, the objective, pruning and fold racing, workers, progress."""
