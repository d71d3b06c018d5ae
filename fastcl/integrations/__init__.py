"""Drop-in replacements for the contrastive losses of other libraries, backed by fastcl's fused
engine. Each submodule imports its peer library lazily (or not at all): importing fastcl, or this
package, never requires open_clip, sentence-transformers, pytorch-metric-learning, lightly or
info-nce-pytorch.

* :mod:`fastcl.integrations.open_clip`: ``ClipLoss``, ``CoCaLoss``, ``DistillClipLoss``,
  ``SigLipLoss``
* :mod:`fastcl.integrations.sentence_transformers`: ``MultipleNegativesRankingLoss``,
  ``CachedMultipleNegativesRankingLoss``, ``MultipleNegativesSymmetricRankingLoss``,
  ``CachedMultipleNegativesSymmetricRankingLoss``, ``GISTEmbedLoss``, ``CachedGISTEmbedLoss``
* :mod:`fastcl.integrations.pytorch_metric_learning`: ``NTXentLoss``, ``SupConLoss``,
  ``SelfSupervisedLoss``, ``CrossBatchMemory``
* :mod:`fastcl.integrations.lightly`: ``NTXentLoss`` (with its memory bank), ``DirectCLRLoss``,
  ``DCLLoss``, ``DCLWLoss``, ``MACLLoss``, ``HypersphereLoss``
* :mod:`fastcl.integrations.info_nce_pytorch`: ``InfoNCE``, ``info_nce``
"""
