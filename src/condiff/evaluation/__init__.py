"""Evaluation of generated samples: condiff's feature classifier, class frequencies with Wilson
intervals, TV, Frechet distance, precision and recall, Inception FID when its weights are given, and the
file a run keeps the data evaluation compares with in (`evaluation_data`).
Works on tensors; sampling a run for evaluation lives in condiff.lifecycle."""
