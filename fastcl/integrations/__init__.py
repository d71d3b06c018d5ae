"""Drop-in replacements for the contrastive losses of other libraries, backed by fastcl's fused
engine. Each submodule imports its peer library lazily (or not at all): importing fastcl, or this
package, never requires open_clip, sentence-transformers or pytorch-metric-learning.

* :mod:`fastcl.integrations.open_clip`: ``ClipLoss``, ``DistillClipLoss``, ``SigLipLoss``
* :mod:`fastcl.integrations.sentence_transformers`: ``MultipleNegativesRankingLoss``,
  ``CachedMultipleNegativesRankingLoss``
* :mod:`fastcl.integrations.pytorch_metric_learning`: ``NTXentLoss``, ``SupConLoss``
"""
