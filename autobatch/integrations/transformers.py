"""Hugging Face Transformers through autobatch: the Trainer, and models' own loss made exact over micro-batches.

    trainer = AutoBatchTrainer(model=model, args=args, train_dataset=dataset, autobatch={"memory_budget": "6GiB"})
    trainer.train()                  # the Trainer's loop; each batch split into micro-batches that fit

    ab = autobatch.wrap(model, optimizer, target_batch=32, compute_loss=count_weighted_loss)
    loss = ab.step(batch)            # a loop of one's own; batch: the collator's dict, "labels" -100 where ignored

A model's loss is a mean over the labels that are not -100; a micro-batch's mean weighted by its
samples is then not the logical batch's mean. `count_weighted_loss` returns the pair
``(loss_sum, count)`` (autobatch.loss), so that the step's gradient is the logical batch's.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers import Trainer

from autobatch.integrations import gradient_apart
from autobatch.loss import IGNORE_INDEX
from autobatch.step import AutoBatch, wrap
from autobatch.transaction import add_gradients

__all__ = ["AutoBatchTrainer", "count_weighted_loss", "label_count"]


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
    # The class's forward: while autobatch runs a traced graph in its place, the instance's takes anything.
    parameters = inspect.signature(type(model).forward).parameters.values()
    return any(p.name == "num_items_in_batch" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def count_weighted_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """``(loss_sum, count)`` of a Hugging Face model's own loss on ``batch`` (which holds ``labels``):
    the loss summed over the labels it counts, and their number. Models that take ``num_items_in_batch``
    (as the Trainer passes it) are given the count, so that their loss is the sum over it exactly.

    Example:
        ```python
        ab = autobatch.wrap(model, optimizer, 32, compute_loss=count_weighted_loss)
        ```
    """
    if "labels" not in batch:
        raise KeyError("count_weighted_loss needs the batch's 'labels' (-100 where ignored), as Hugging Face's "
                       "collators give them")
    # DistributedDataParallel wraps the model: ask the module for its configuration and signature.
    inner = getattr(model, "module", model)
    count = label_count(inner, batch["labels"])
    if not _accepts_items(inner):
        return _loss_of(model(**batch)) * count, count
    # The model's loss is then its sum over the labels divided by this number: one for a micro-batch
    # without counted labels, whose sum is 0 (a mean over none would be NaN, and its gradient too).
    items = count.clamp(min=1)
    return _loss_of(model(**batch, num_items_in_batch=items)) * items, count


def _loss_of(output: Any) -> Tensor:
    """The loss of a model's output: a ModelOutput or dict's "loss", else a tuple's first element (as the
    Trainer reads it)."""
    return output["loss"] if isinstance(output, Mapping) else output[0]


class AutoBatchTrainer(Trainer):
    """``transformers.Trainer`` whose every training batch is split into micro-batches that fit.

    The same arguments, plus ``autobatch={...}``: `autobatch.wrap`'s keywords (``micro_batch``,
    ``memory_budget``, ``bn``, ``cache``...).

    The recipe's batch (``per_device_train_batch_size`` x ``gradient_accumulation_steps`` x processes) is
    what it says: each batch the Trainer hands to ``training_step`` is split into what fits, and the
    gradient it leaves is the one the Trainer's own ``training_step`` would leave for the whole batch:
    with ``labels``, the model's own loss made exact over padding and ignored labels
    (`count_weighted_loss`), normalized by the ``num_items_in_batch`` the Trainer counts over the
    accumulated batches. Everything else is the Trainer's: clipping, optimizer, scheduler, logging,
    evaluation, checkpoints. ``auto_find_batch_size`` is refused: it shrinks the batch (Accelerate's
    ``find_executable_batch_size``, 0.9x after each out-of-memory error), which changes the recipe;
    autobatch keeps the batch and splits it instead.

    Example:
        ```python
        args = TrainingArguments(per_device_train_batch_size=64, ...)
        trainer = AutoBatchTrainer(model=model, args=args, train_dataset=dataset,
                                   data_collator=collator,
                                   autobatch={"memory_budget": "6GiB"})
        trainer.train()
        ```
    """

    def __init__(self, *args: Any, autobatch: Optional[dict[str, Any]] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.args.auto_find_batch_size:
            raise ValueError("auto_find_batch_size shrinks per_device_train_batch_size (Accelerate's "
                             "find_executable_batch_size: 0.9x after each out-of-memory error), which changes the "
                             "recipe's batch; AutoBatchTrainer keeps the batch and "
                             "splits each one into micro-batches that fit. Set auto_find_batch_size=False")
        #: wrap's keywords for the AutoBatch made at the first training step.
        self.autobatch_options = dict(autobatch or {})
        self.autobatch: Optional[AutoBatch] = None

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> Tensor:
        model.train()
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        ab = self._autobatch_for(model)
        factor = self._factor(model, inputs, num_items_in_batch)
        mean, gradient = gradient_apart(ab, [p for p in model.parameters() if p.requires_grad], inputs)
        with torch.no_grad():
            for _, grad in gradient:
                if grad is not None:
                    grad.mul_(factor)
        add_gradients(gradient)  # to those of the batches accumulated before it
        return torch.tensor(mean * factor, device=self.args.device)

    def _factor(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> float:
        """What turns the batch's mean (over its counted labels, or its samples) into the part of the
        accumulated batches' loss the Trainer gives it."""
        if "labels" not in inputs or num_items_in_batch is None:
            return 1.0 / self.current_gradient_accumulation_steps
        count = label_count(self.accelerator.unwrap_model(model), inputs["labels"]).to(self.args.device)
        total = self.accelerator.gather(count.reshape(1)).sum() if self.args.average_tokens_across_devices \
            else count
        return float(total) / float(num_items_in_batch)

    def _autobatch_for(self, model: nn.Module) -> AutoBatch:
        if self.autobatch is None:
            options = dict(self.autobatch_options)
            options.setdefault("device", self.args.device)
            world = self.accelerator.num_processes
            target = self.args.per_device_train_batch_size * world
            optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # Accelerate's wrapper holds it
            self.autobatch = wrap(model, optimizer, target, compute_loss=self._micro_loss, **options)
        return self.autobatch

    def _micro_loss(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        """A micro-batch's loss: the model's own, count-weighted, where the batch has labels; else the
        Trainer's ``compute_loss`` (a mean over the micro-batch's samples)."""
        if "labels" in batch and self.label_smoother is None and self.compute_loss_func is None:
            return count_weighted_loss(model, batch)
        return self.compute_loss(model, dict(batch))  # a copy: compute_loss pops "labels" from what it is given

