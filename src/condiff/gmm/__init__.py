"""Gaussian mixtures with exact ground truth: posteriors, scores and the exact noise predictor
(`mixture`), and exact guided scores, samplers and entropies (`guidance`), against which learned
models, constrained optima and guidance claims are checked."""
