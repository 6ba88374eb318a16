"""Train a small BatchNorm CNN with a logical batch of 16, in micro-batches that fit a memory budget.

    python examples/train_classifier.py

The task is synthetic (which quadrant of a noisy image holds a bright square) so that it runs
anywhere in seconds; replace the model, data and loss with your own.
"""
import torch
from torch import nn

import autobatch


def make_data(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(count, 3, 16, 16, generator=generator) * 0.5
    labels = torch.randint(0, 4, (count,), generator=generator)
    for image, label in zip(images, labels):
        row, col = divmod(label.item(), 2)
        image[:, row * 8 + 2: row * 8 + 6, col * 8 + 2: col * 8 + 6] += 2.0
    return images, labels


def make_model() -> nn.Module:
    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
    return nn.Sequential(block(3, 16), nn.MaxPool2d(2), block(16, 32), nn.MaxPool2d(2), block(32, 32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    train_x, train_y = make_data(512, generator)
    test_x, test_y = make_data(256, generator)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # micro_batch="auto" measures real steps at the first batch; the budget here stands in for a small GPU.
    with autobatch.wrap(model, optimizer, target_batch=16, loss_fn=nn.CrossEntropyLoss(),
                        memory_budget="1MiB", cache=False) as ab:
        for epoch in range(3):
            order = torch.randperm(len(train_x), generator=generator)
            losses = [ab.step(train_x[idx], train_y[idx]) for idx in order.split(16)]
            print(f"epoch {epoch}: mean training loss {sum(losses) / len(losses):.4f}")
        print(ab.plan)
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    print(f"test accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
