"""The Hugging Face Trainer with autobatch: a tiny GPT-2 from a config (nothing downloaded) on padded sequences.

    python examples/train_hf_trainer.py

The Trainer's recipe says 32 sequences per step. AutoBatchTrainer takes the same arguments plus
``autobatch={...}``: each batch of 32 is split into micro-batches that fit the memory budget, and the
step is the one the stock Trainer would take with all 32 at once (the model's token loss made exact over
the padding). Clipping, the schedule, logging and checkpoints are the Trainer's. The task is synthetic
(continue an arithmetic progression modulo the vocabulary) so that it runs anywhere in seconds.
"""
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from autobatch.integrations.transformers import AutoBatchTrainer

VOCABULARY = 32


class Progressions(torch.utils.data.Dataset):
    """Arithmetic progressions modulo the vocabulary, 8 to 48 tokens, right-padded; labels -100 on padding."""

    def __init__(self, count: int, generator: torch.Generator, longest: int = 48):
        self.rows = []
        for _ in range(count):
            length, start, step = (int(v) for v in (torch.randint(8, longest + 1, (1,), generator=generator),
                                                    *torch.randint(0, VOCABULARY, (2,), generator=generator)))
            ids = torch.zeros(longest, dtype=torch.long)
            ids[:length] = (start + step * torch.arange(length)) % VOCABULARY
            mask = (torch.arange(longest) < length).long()
            self.rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def main() -> None:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCABULARY, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=32, num_train_epochs=6,
                                 learning_rate=3e-3, warmup_steps=5, max_grad_norm=1.0, logging_steps=10,
                                 report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available())
        trainer = AutoBatchTrainer(model=model, args=args, train_dataset=Progressions(640, torch.Generator().manual_seed(0)),
                                   autobatch={"memory_budget": "24MiB"})
        trainer.train()
    print(trainer.autobatch.plan)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"logged loss: first {losses[0]:.3f}, last {losses[-1]:.3f}")


if __name__ == "__main__":
    main()
