"""Data: the labelled datasets condiff trains and evaluates on, their per-class splits and samplers,
and latent encoding through an AutoencoderKL. Loading a dataset is the only place that reads data
files; everything above gets tensors."""
