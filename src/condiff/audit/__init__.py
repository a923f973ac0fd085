"""Audit: which training examples guided a run's generations (`condiff attribute RUN`). What it is asked and
answers (`results`), each target's journey over its sampling steps (`journey`), the training set, models and
targets of every kind of run (`inputs`), the figures and report (`report`), and the command (`attribute`)."""
