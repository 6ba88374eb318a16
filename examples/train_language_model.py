"""Train a small causal Transformer on padded sequences of varying length with a token-level loss.

    python examples/train_language_model.py

A language model's loss is the mean over the batch's valid tokens, not over its sequences: padding
is labelled -100 and ignored. Returning ``(loss_sum, count)`` makes autobatch accumulate exactly
that mean over the whole logical batch, however its sequences fall into micro-batches, even when a
length-grouped sampler puts the short sequences together. The task is synthetic (continue an
arithmetic progression modulo the vocabulary) so that it runs anywhere in seconds.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

import autobatch

VOCABULARY, WIDTH = 32, 64


def make_sequences(count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Arithmetic progressions modulo the vocabulary, of 8 to 64 tokens."""
    lengths = torch.randint(8, 65, (count,), generator=generator)
    starts, steps = torch.randint(0, VOCABULARY, (2, count), generator=generator)
    return [(start + step * torch.arange(length)) % VOCABULARY
            for start, step, length in zip(starts.tolist(), steps.tolist(), lengths.tolist())]


def collate(sequences: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-padded inputs and next-token labels, -100 where there is no next token."""
    longest = max(len(s) for s in sequences)
    tokens = torch.zeros(len(sequences), longest, dtype=torch.long)
    labels = torch.full((len(sequences), longest), -100)
    for row, sequence in enumerate(sequences):
        tokens[row, :len(sequence)] = sequence
        labels[row, :len(sequence) - 1] = sequence[1:]
    return {"tokens": tokens, "labels": labels}


class TinyTransformer(nn.Module):
    def __init__(self, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, WIDTH)
        self.position = nn.Embedding(64, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, nhead=4, dim_feedforward=4 * WIDTH, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(WIDTH, VOCABULARY)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(length)
        x = self.embed(tokens) + self.position(torch.arange(length))
        return self.head(self.encoder(x, mask=causal, is_causal=True))


def token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss summed over the micro-batch's valid tokens, and how many they are."""
    logits = model(batch["tokens"])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")
    return loss, (batch["labels"] != -100).sum()


def length_grouped(sequences: list[torch.Tensor], batch: int, generator: torch.Generator) -> list[list[torch.Tensor]]:
    """Batches of similar lengths (less padding), in random order: what length-grouped samplers do."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    batches = [[sequences[i] for i in order[start:start + batch]] for start in range(0, len(order), batch)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    train, test = make_sequences(1024, generator), make_sequences(128, generator)
    model = TinyTransformer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # The budget stands in for a small GPU: the planner splits each logical batch of 32 sequences.
    with autobatch.wrap(model, optimizer, target_batch=32, compute_loss=token_loss, memory_budget="6MiB",
                        cache=False) as ab:
        for epoch in range(8):
            losses = [ab.step(collate(batch)) for batch in length_grouped(train, 32, generator)]
            print(f"epoch {epoch}: mean token loss {sum(losses) / len(losses):.3f} "
                  f"(perplexity {math.exp(sum(losses) / len(losses)):.2f})")
        print(ab.plan)
    model.eval()
    with torch.no_grad():
        loss, count = token_loss(model, collate(test))
    print(f"test token loss {loss.item() / count.item():.3f}")


if __name__ == "__main__":
    main()
