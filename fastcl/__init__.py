"""fastcl: fused kernels for the InfoNCE family of contrastive losses.

No GPU work happens at import: backends are resolved and compiled on first use.
"""
from .losses import ClipLoss, InfoNCELoss, clip_loss, info_nce

__version__ = "0.1.0"

__all__ = ["info_nce", "clip_loss", "InfoNCELoss", "ClipLoss", "__version__"]
