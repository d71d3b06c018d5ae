"""fastcl: fused kernels for the InfoNCE family of contrastive losses.

No GPU work happens at import: backends are resolved and compiled on first use.
"""
from .losses import (AlignmentLoss, ClipLoss, CWCLLoss, DCLLoss, DistillLoss, HCLLoss,
                     InfoNCELoss, MVDHELLoss, MVInfoNCELoss, NTXentLoss, SigLipLoss, SoftClipLoss,
                     SoftInfoNCELoss, SupConLoss, UniformityLoss, alignment_loss, clip_loss, cwcl,
                     dcl, distill, hcl, info_nce, mv_dhel, mv_infonce, nt_xent, siglip_loss,
                     soft_info_nce, softclip, supcon, uniformity_loss)

from . import metrics  # noqa: E402  (retrieval metrics from the sweep)

__version__ = "0.1.0"

__all__ = ["info_nce", "clip_loss", "siglip_loss", "nt_xent", "supcon", "dcl", "soft_info_nce",
           "uniformity_loss", "alignment_loss", "distill", "softclip", "cwcl", "hcl", "mv_infonce",
           "mv_dhel", "InfoNCELoss", "ClipLoss", "SigLipLoss", "NTXentLoss", "SupConLoss",
           "DCLLoss", "SoftInfoNCELoss", "DistillLoss", "SoftClipLoss", "CWCLLoss", "HCLLoss",
           "MVInfoNCELoss", "MVDHELLoss", "UniformityLoss", "AlignmentLoss", "metrics",
           "__version__"]
