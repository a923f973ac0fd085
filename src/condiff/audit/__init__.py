"""Audit: which training examples guided a run's generations (`condiff attribute RUN`). The settings and
results (`results`), the training set, models and targets of every kind of run (`inputs`), each target's
journey over its sampling steps (`journey`), the figures and report (`report`), and the command (`attribute`)."""
