"""condiff: diffusion models that obey distribution constraints."""

from condiff.models import MLPDenoiser

__all__ = ["MLPDenoiser"]
__version__ = "0.1.0"
