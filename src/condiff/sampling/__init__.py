"""Sampling: seeded, batch-size-invariant DDPM/DDIM generation through diffusers schedulers
(`generate`), and guidance: classifier-free, classifier, and the noise-aware classifier it uses
(`guidance`). Knows nothing of runs or training."""
