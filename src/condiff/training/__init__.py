"""Constrained training: loss terms (`terms`), Lagrangian estimators (`estimators`), dual rules,
their state and the closed forms of Theorems 1 and 2 (`dual`), the primal-dual loop (`loop`), and
atomic, exactly resumable checkpoints (`checkpoint`)."""
