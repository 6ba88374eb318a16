"""Hugging Face Transformers models through autobatch: their own loss, made exact over micro-batches.

    ab = autobatch.wrap(model, optimizer, target_batch=32, compute_loss=count_weighted_loss)
    loss = ab.step(batch)            # batch: the collator's dict, with "labels" (-100: ignored)

A model's loss is a mean over the labels that are not -100; a micro-batch's mean weighted by its
samples is then not the logical batch's mean. :func:`count_weighted_loss` returns the pair
``(loss_sum, count)`` (autobatch.loss), so that the step's gradient is the logical batch's.
"""
from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn

from autobatch.loss import IGNORE_INDEX

__all__ = ["count_weighted_loss", "label_count"]


def _shifts_labels(model: nn.Module) -> bool:
    """Whether the model's loss predicts label t+1 from position t (a decoder-only causal language model,
    whose loss drops each sequence's first label); encoder-decoders and masked or token-classification
    models compare each label with its own position."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    return getattr(getattr(model, "loss_function", None), "__name__", "") == "ForCausalLMLoss"


def label_count(model: nn.Module, labels: Tensor) -> Tensor:
    """The number of labels ``model``'s own loss averages over: those that are not -100, after the shift
    of a causal language model."""
    if _shifts_labels(model):
        labels = labels[..., 1:]
    return (labels != IGNORE_INDEX).sum()


def _accepts_items(model: nn.Module) -> bool:
    parameters = inspect.signature(model.forward).parameters.values()
    return any(p.name == "num_items_in_batch" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def count_weighted_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """``(loss_sum, count)`` of a Hugging Face model's own loss on ``batch`` (which holds ``labels``):
    the loss summed over the labels it counts, and their number. Models that take ``num_items_in_batch``
    (as the Trainer passes it) are given the count, so that their loss is the sum over it exactly.

    Example::

        ab = autobatch.wrap(model, optimizer, 32, compute_loss=count_weighted_loss)
    """
    if "labels" not in batch:
        raise KeyError("count_weighted_loss needs the batch's 'labels' (-100 where ignored), as Hugging Face's "
                       "collators give them")
    # DistributedDataParallel wraps the model: ask the module for its configuration and signature.
    inner = getattr(model, "module", model)
    count = label_count(inner, batch["labels"])
    if not _accepts_items(inner):
        return model(**batch).loss * count, count
    # The model's loss is then its sum over the labels divided by this number: one for a micro-batch
    # without counted labels, whose sum is 0 (a mean over none would be NaN, and its gradient too).
    items = count.clamp(min=1)
    return model(**batch, num_items_in_batch=items).loss * items, count
