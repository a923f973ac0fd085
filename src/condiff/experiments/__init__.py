"""Experiments: from a config to a run directory and back. Build data, model and constraints
(`build`), train a run, sample it (`sampling`), evaluate it (`evaluation`), attribute it (`attribution`,
with `attribution_inputs`, `attribution_journey`, `attribution_report`), validate attribution by retraining
(`counterfactual`: models and measurements; `lds_methods`: methods and held-out choices; `lds_validation`;
`removal`; `attribution_reproduce` and its report), and the paper's experiments end to end (`demo`,
`reproduce`)."""
