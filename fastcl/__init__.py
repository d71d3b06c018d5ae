"""fastcl: fused kernels for the InfoNCE family of contrastive losses.

No GPU work happens at import: backends are resolved and compiled on first use.
"""
from .losses import (ClipLoss, InfoNCELoss, NTXentLoss, SigLipLoss, SupConLoss, clip_loss, info_nce,
                     nt_xent, siglip_loss, supcon)

__version__ = "0.1.0"

__all__ = ["info_nce", "clip_loss", "siglip_loss", "nt_xent", "supcon", "InfoNCELoss", "ClipLoss",
           "SigLipLoss", "NTXentLoss", "SupConLoss", "__version__"]
