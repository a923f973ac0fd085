"""Inception FID, comparable with published numbers: needs the optional extra `condiff[fid]`
(torch-fidelity) and a local copy of the FID Inception weights (nothing is downloaded).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from condiff.evaluation.metrics import frechet_distance
from condiff.runtime import resolve_device

# Inception FID (optional: torch-fidelity and a local weights file)

INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URLS = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
)


class InceptionFIDUnavailable(ValueError):
    """Inception FID cannot be computed here: torch-fidelity or the Inception weights are missing."""


def _weights_problem(weights_path: str | os.PathLike | None) -> str | None:
    if weights_path is None or not str(weights_path):
        where = "no weights file given"
    elif not Path(weights_path).expanduser().is_file():
        where = f"Inception weights not found at {Path(weights_path).expanduser()}"
    else:
        return None
    return (f"{where}: download the FID Inception weights ({INCEPTION_WEIGHTS_NAME}, the TensorFlow FID "
            f"network converted to PyTorch, which torch-fidelity publishes as "
            f"weights-inception-2015-12-05-6726825d.pth) from {INCEPTION_WEIGHTS_URLS[0]} and pass its path "
            f"(evaluate.inception_weights in a config)")


def check_inception_fid(weights_path: str | os.PathLike | None) -> None:
    """Raise InceptionFIDUnavailable unless torch-fidelity imports and `weights_path` is a file: cheap,
    so that a caller can fail before hours of sampling rather than after."""
    _inception_class(weights_path)


def _inception_class(weights_path: str | os.PathLike | None):
    problems = []
    weights_problem = _weights_problem(weights_path)
    if importlib.util.find_spec("torch_fidelity") is None:
        problems.append("the torch-fidelity package is not installed: pip install 'condiff[fid]' "
                        "(or pip install torch-fidelity)")
    if weights_problem:
        problems.append(weights_problem)
    if problems:
        raise InceptionFIDUnavailable("Inception FID unavailable: " + "; ".join(problems))
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as err:  # e.g. a torchvision built for another torch: RuntimeError, not ImportError
        raise InceptionFIDUnavailable(
            f"Inception FID unavailable: torch-fidelity is installed but does not import ({type(err).__name__}: "
            f"{err}); it needs a torchvision built for the installed torch {torch.__version__} (for a CPU-only "
            f"torch, the matching CPU torchvision wheel)") from err
    return FeatureExtractorInceptionV3


def _load_inception(weights_path: str | os.PathLike | None):
    """torch-fidelity's FID Inception network with the weights at `weights_path`."""
    inception_class = _inception_class(weights_path)
    weights_path = Path(weights_path).expanduser()
    try:
        network = inception_class("inception-v3-compat", ["2048"], str(weights_path))
    except Exception as err:
        raise InceptionFIDUnavailable(f"Inception FID unavailable: could not load Inception weights from "
                                      f"{weights_path} ({type(err).__name__}: {err}); expected "
                                      f"{INCEPTION_WEIGHTS_NAME}") from err
    return network.eval().requires_grad_(False)


def _to_inception_input(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, 1 or 3, H, W) as the uint8 RGB (N, 3, H, W) that the FID network takes
    (as if saved to 8-bit PNG: clipped, scaled to [0, 255] and rounded). The network resizes to 299."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"Inception FID needs images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.repeat(1, 3, 1, 1) if pixels.shape[1] == 1 else pixels


@torch.inference_mode()
def _inception_features(network, images: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    features = [network(_to_inception_input(batch).to(device))[0].double().cpu() for batch in images.split(batch_size)]
    return torch.cat(features).numpy()


def inception_fid(samples: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray,
                  weights_path: str | os.PathLike | None, *, batch_size: int = 100,
                  device: str | torch.device | None = None) -> float:
    """Frechet Inception Distance between generated `samples` and `reference` images, both in
    [-1, 1] with shape (N, 1 or 3, H, W), using torch-fidelity's port of the TensorFlow FID network
    (2048-d pool features; grayscale repeated to RGB; quantised to uint8; resized to 299 x 299 by
    the network as in the original TensorFlow code) and `frechet_distance` in float64.

    Raises InceptionFIDUnavailable (a ValueError) naming what is missing: the package (pip install
    'condiff[fid]') or the weights file at `weights_path` (nothing is downloaded). torch-fidelity
    unpickles the weights file: point it only at a trusted copy. Slow on a CPU (of the order of a
    second per image on two cores): use a GPU (`device`) for thousands of images.
    """
    samples, reference = torch.as_tensor(samples), torch.as_tensor(reference)
    for images in (samples, reference):
        _to_inception_input(images[:1])  # check shapes before the (slow) network is built
    if len(samples) < 2 or len(reference) < 2:
        raise ValueError("Inception FID needs at least two samples and two reference images")
    network = _load_inception(weights_path)
    device = resolve_device(device)
    network = network.to(device)
    return frechet_distance(_inception_features(network, samples, batch_size, device),
                            _inception_features(network, reference, batch_size, device))
