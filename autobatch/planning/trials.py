"""The planner's trials: real training steps of a given size, measured for peak memory and time.

    trials = Trials(micro, strategy)                  # at micro.share samples, this rank's logical batch
    peak = trials.peak(trials.micro_step(batch, 8), "micro-batch of 8", batch)    # None: out of memory
    seconds = timed(trials.whole_batch_step(batch, policy), device)

Each trial runs the code that trains (``MicroStep`` and the strategy), on the module itself: trials
wait on no other rank's collectives. The caller restores the model afterwards (``trial_transaction``).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import torch

from autobatch.batchnorm.exact import running_statistics_kept
from autobatch.batchnorm.strategy import BatchNormStrategy
from autobatch.checkpointing import Checkpointing
from autobatch.microstep import MicroStep
from autobatch.oom import is_out_of_memory, release_memory
from autobatch.planning.measure import stage_peaks
from autobatch.sizes import format_bytes

__all__ = ["Trials", "timed"]

log = logging.getLogger(__name__)

Work = Callable[[], None]


def timed(work: Work, device: torch.device, trials: Optional["Trials"] = None) -> float:
    """Seconds ``work`` takes, the device synchronized before and after (counted as a trial of ``trials``)."""
    if trials is not None:
        trials.steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class Trials:
    """Real steps on ``micro``'s model under ``strategy``, at this rank's share of a logical batch."""

    def __init__(self, micro: MicroStep, strategy: BatchNormStrategy):
        self.micro = micro
        self.strategy = strategy
        self.share = micro.share
        #: Trial steps run so far, measured or timed.
        self.steps = 0
        #: The budget a trial on the host stops at, out of memory (the planner's, once measured): a trial
        #: never passes it (#39: efficientnet_b0's first trials had peaked at 1.33x memory_budget).
        self.limit_bytes: Optional[int] = None

    def peak(self, work: Work, what: str, batch: Any) -> Optional[int]:
        """The measured peak bytes of ``work``; None if it ran out of memory (logged either way)."""
        peaks = self.peaks([work], what, batch)
        return None if peaks is None else peaks[0]

    def peaks(self, stages: list[Work], what: str, batch: Any) -> Optional[list[int]]:
        """The measured peak bytes of each of ``stages``, run in turn; None if any ran out of memory."""
        micro = self.micro
        self.steps += 1
        try:
            peaks: Optional[list[int]] = self._measured(stages, batch)
        except BaseException as error:
            if not is_out_of_memory(error):
                raise
            peaks = None
        if peaks is None:
            release_memory(micro.device)
        if micro.collective:
            # A fully_shard model's trials gather shards from every rank: every rank decides alike, from the
            # largest peaks (None if any ran out of memory), so that their trials stay in step.
            table = micro.ranks.gather([-1.0] * len(stages) if peaks is None else peaks)
            peaks = None if (table < 0).any() else [int(column.max()) for column in table.T]
        log.info("autobatch trial, %s: %s", what, "out of memory" if peaks is None else
                 "peak " + " then ".join(format_bytes(p) for p in peaks))
        return peaks

    def _measured(self, stages: list[Work], batch: Any) -> list[int]:
        micro = self.micro
        measure = lambda: stage_peaks(stages, micro.device, micro.model, micro.optimizer,  # noqa: E731
                                      micro.batches.tensors(batch), micro.memory_stop(self.limit_bytes))
        try:
            return measure()
        except ValueError as error:
            if "more than 1 value per channel" not in str(error):
                raise
        # One sample through a BatchNorm1d without positions: PyTorch refuses batch statistics of one value,
        # though two_pass's micro-batches use the whole batch's. The trial measures it with running statistics.
        layers = [layer for layer in self.strategy.layers if layer.training]
        for layer in layers:
            layer.eval()
        try:
            return measure()
        finally:
            for layer in layers:
                layer.train()

    def micro_step_peak(self, batch: Any, n: int) -> Optional[int]:
        """The measured peak of one real training micro-step of ``n`` samples; None if out of memory."""
        peaks = self.micro_step_peaks(batch, n)
        return None if peaks is None else max(peaks)

    def micro_step_peaks(self, batch: Any, n: int) -> Optional[tuple[int, int]]:
        """The measured peaks of one real micro-step of ``n`` samples: its forward and backward's, then its
        update's (which activations no longer share); None if out of memory."""
        forward_backward, update = self.micro_step_stages(batch, n)
        peaks = self.peaks([forward_backward, update], f"micro-batch of {n}", batch)
        return None if peaks is None else (peaks[0], peaks[1])

    def micro_step(self, batch: Any, n: int) -> Work:
        """One real training micro-step of ``n`` samples and the update (its undo copies included)."""
        forward_backward, update = self.micro_step_stages(batch, n)

        def work() -> None:
            forward_backward()
            update()

        return work

    def micro_step_stages(self, batch: Any, n: int) -> tuple[Work, Work]:
        """A real training micro-step of ``n`` samples in two stages: its forward and backward, then the update
        (its undo copies included), with what the first leaves (gradients) alive in the second."""
        micro, batches = self.micro, self.micro.batches
        whole_batch_resident = self.strategy.needs_phase1() and n < self.share
        # With two_pass the whole logical batch's inputs stay on the device during phase 2 and the update.
        held: dict[str, Any] = {}

        def forward_backward() -> None:
            whole = batches.to(batches.take(batch, self.share), micro.device) if whole_batch_resident else None
            held["whole"] = whole
            part = batches.take(whole, n) if whole is not None else batches.to(batches.take(batch, n), micro.device)
            micro.backward(micro.loss(part, 0, micro.module).value)

        def update() -> None:
            micro.trial_update()
            for p in micro.parameters():
                p.grad = None
            held.clear()

        return forward_backward, update

    def phase1(self, batch: Any, chunks: int) -> Work:
        """Phase 1 of the whole share in ``chunks`` pieces (two_pass)."""
        batches = self.micro.batches

        def work() -> None:
            self.strategy.trial_phase1(batches.to(batches.take(batch, self.share), self.micro.device), chunks)

        return work

    def whole_batch_step(self, batch: Any, policy: Checkpointing) -> Work:
        """A real step of the whole share in one forward and one backward, ``policy``'s modules checkpointed."""
        micro, batches = self.micro, self.micro.batches

        def work() -> None:
            whole = batches.to(batches.take(batch, self.share), micro.device)
            with policy.applied(micro.module):
                loss = micro.loss(whole, 0, micro.module).value
                with running_statistics_kept(self.strategy.layers):
                    micro.backward(loss)
            micro.trial_update()
            for p in micro.parameters():
                p.grad = None

        return work
