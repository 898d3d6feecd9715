"""Importance scores for structured pruning: heads, KV groups, MLP neurons, whole layers.

Every function takes a model (any family known to :func:`course_lib.pruned_modeling.adapter_for`)
and calibration data (a LongTensor ``[N, T]`` of token ids, or a list of dicts of tensors) and
returns plain tensors; none of them changes the model (parameters, hooks, ``requires_grad``,
``.grad``, train/eval mode are all as before). Higher scores mean more important, except the layer
distances (``block_influence``, ``span_distance``), where a low value marks a removable block.

* :func:`head_scores` ``[L, H_max]`` and :func:`kv_group_scores` ``[L, G_max]``
* :func:`neuron_scores` (one tensor per layer)
* :func:`block_influence`, :func:`block_influence_stored`, :func:`span_distance`, :func:`best_span`
* :func:`layer_removal_oracle` (ground truth) and :func:`rank_correlation` (Spearman)
"""

from ._calibration import causal_lm_loss, labels_loss, make_batches
from .heads import HEAD_METHODS, head_scores, kv_group_scores
from .layers import (
    best_span,
    block_influence,
    block_influence_stored,
    layer_removal_oracle,
    rank_correlation,
    span_distance,
)
from .neurons import DEFAULT_EPS, NEURON_METHODS, neuron_scores

__all__ = [
    "DEFAULT_EPS",
    "HEAD_METHODS",
    "NEURON_METHODS",
    "best_span",
    "block_influence",
    "block_influence_stored",
    "causal_lm_loss",
    "head_scores",
    "kv_group_scores",
    "labels_loss",
    "layer_removal_oracle",
    "make_batches",
    "neuron_scores",
    "rank_correlation",
    "span_distance",
]
