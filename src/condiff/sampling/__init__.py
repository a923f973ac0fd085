"""Sampling: seeded, batch-size-invariant DDPM/DDIM generation through diffusers schedulers
(`generate`), guidance: classifier-free and classifier (`guidance`), and the noise-aware classifier the
latter follows, with its training (`noise_classifier`). Knows nothing of runs or training."""
