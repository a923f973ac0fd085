"""Runs: from a config to a run directory and back. Build what a config describes (data, model, constraints:
`build`), train it into a run directory (`training`), sample it (`sampling`) and evaluate its samples against
the data the run keeps (`evaluation`). `condiff.run.Run` puts these behind one object."""
