"""A Hugging Face GPT-2 through autobatch against the whole batch: the README's `model(**batch).loss`
taken as a mean, and as `(loss_sum, count)`, on padded, length-grouped batches, float64.

A causal language model's loss is the mean over the batch's valid tokens (labels that are not -100,
shifted by one), so a micro-batch's mean weighted by its samples is the wrong weight whenever the
micro-batches hold different numbers of tokens, as a length-grouped sampler makes them.

    python bench/hf_language_model.py      # needs transformers (outside CI)
"""
from __future__ import annotations

import copy
import pathlib
import sys

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autobatch  # noqa: E402
from autobatch.reference import cosine, flat_grad, relative_error  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "hf_language_model.md"
VOCAB, PAD = 96, 0


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).double()


def padded_batch(lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Right-padded sequences; padding is masked out of attention and labelled -100."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(1, VOCAB, (length,), generator=generator)
        attention_mask[row, :length] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def mean_loss(model, batch):
    return model(**batch).loss


def counted_loss(model, batch):
    count = (batch["labels"][..., 1:] != -100).sum()
    return model(**batch).loss * count, count


def compare(lengths: list[int], micro_batch: int, compute_loss, seed: int) -> tuple[float, float]:
    """(cosine, relative error) of autobatch's gradient against the whole batch's."""
    base, batch = tiny_gpt2(seed), padded_batch(lengths, seed)
    reference = copy.deepcopy(base)
    reference(**batch).loss.backward()
    expected = flat_grad(reference)
    captured = {}
    model = copy.deepcopy(base)
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.0), len(lengths),
                        compute_loss=compute_loss, micro_batch=micro_batch, cache=False,
                        before_step=lambda ab: captured.setdefault("grad", flat_grad(ab.model).clone()))
    ab.step(batch)
    return cosine(captured["grad"], expected), relative_error(captured["grad"], expected)


def main() -> None:
    cases = [("length-grouped: 4 short, then 4 long", [4, 5, 5, 6, 40, 44, 48, 48], 4),
             ("length-grouped, 4 micro-batches", [3, 4, 8, 9, 20, 22, 46, 48], 2),
             ("mixed lengths", [40, 4, 44, 5, 48, 5, 48, 6], 4)]
    rows = []
    for name, lengths, micro_batch in cases:
        for label, loss in (("`model(**batch).loss` (mean)", mean_loss), ("`(loss * count, count)`", counted_loss)):
            results = [compare(lengths, micro_batch, loss, seed) for seed in range(3)]
            lowest, highest = min(c for c, _ in results), max(e for _, e in results)
            rows.append(f"| {name} | {micro_batch} | {label} | {lowest:.4f} | {highest:.2e} |")
            print(rows[-1], flush=True)
    RESULTS.write_text(
        "# Hugging Face GPT-2: token-mean loss through micro-batches\n\n"
        f"`python bench/hf_language_model.py` (transformers {transformers.__version__}, torch {torch.__version__}, float64, CPU). A 2-layer "
        "GPT2LMHeadModel (vocabulary 96, width 32), logical batch of 8 right-padded sequences (padding labelled "
        "-100, masked out of attention), gradient of one autobatch step against the whole batch's "
        "`model(**batch).loss.backward()`; worst of 3 seeds. transformers computes the causal loss on logits cast to "
        "float32 (`logits.float()` in its ForCausalLMLoss), so a gradient taken at another loss scale agrees to "
        "float32 rounding, not float64's: the unsplit step with `(loss * count, count)` differs by the same 4e-8.\n\n"
        "| batch | micro_batch | compute_loss returns | gradient cosine (lowest) | relative error (highest) |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
