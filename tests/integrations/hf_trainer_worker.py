"""Run by ``accelerate launch`` from tests/integrations/test_transformers.py: the stock Trainer and
AutoBatchTrainer on 2 CPU processes, 3 steps each from the same model; each process saves both results."""
import sys

import torch
from transformers import Trainer, TrainingArguments

from autobatch.integrations.transformers import AutoBatchTrainer
from tests.integrations.test_transformers import _Sequences, causal


def train(out: str, trainer_class: type, **extra) -> dict:
    torch.manual_seed(0)
    model = causal().double()
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                             logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="no",
                             lr_scheduler_type="linear", max_grad_norm=0.5, dataloader_drop_last=True)
    trainer = trainer_class(model=model, args=args, train_dataset=_Sequences(), **extra)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    trainer.train()
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "world": trainer.accelerator.num_processes,
            "splits": trainer.autobatch.plan.splits if isinstance(trainer, AutoBatchTrainer) else None}


def main() -> None:
    out = sys.argv[1]
    stock = train(f"{out}/stock", Trainer)
    split = train(f"{out}/split", AutoBatchTrainer, autobatch={"micro_batch": 2, "cache": False})
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.save({"stock": stock, "split": split}, f"{out}/hf-{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
