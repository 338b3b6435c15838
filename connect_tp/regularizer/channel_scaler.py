"""Learnable per-channel scaling factors ``delta`` (section 3.3.2 of the paper).

Structured CoNNect puts a :class:`ChannelScaler` after convolutions / linear layers; the
connectivity pass normalizes its factors like a layer's weights, so the regularizer drives the
factors of uninformative channels to zero. The module itself lives in :mod:`connect_tp.edges`
(the engine needs it too, and the engine must not import the regularizer); this module keeps its
import path (placing scalers in a model is :mod:`.channels`, pruning them with Torch-Pruning is
:mod:`.pruner`).
"""
from ..edges import ChannelScaler, channel_scalers

__all__ = ["ChannelScaler", "channel_scalers"]
