"""Evaluation of generated samples: condiff's feature classifier, class frequencies with Wilson
intervals, TV, Frechet distance, precision and recall, and Inception FID when its weights are given.
Works on tensors; sampling a run for evaluation lives in condiff.experiments."""
