"""Experiments: from a config to a run directory and back. Build data, model and constraints
(`build`), train a run, sample it (`sampling`), evaluate it (`evaluation`), and the paper's
experiments end to end (`demo`, `reproduce`)."""
