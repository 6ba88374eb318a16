"""Command line: ``python -m autobatch demo`` and ``python -m autobatch plan``.

    python -m autobatch demo --epochs 8 --budget 24MiB --bn two_pass
    python -m autobatch plan --model torchvision.models:resnet50 --input-shape 3x224x224 --target-batch 64
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

import torch
from torch import nn

from autobatch.batchnorm import BN_MODES

__all__ = ["main"]


def _budget(text: Optional[str]):
    """'6GiB' stays a string, '0.5' becomes a fraction of the device, 'none' means no cap."""
    if text is None or text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return value if value <= 1 else int(value)


def _factory(spec: str):
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise SystemExit(f"--model must look like package.module:factory, got {spec!r}")
    target = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--input-shape must look like 3x224x224, got {text!r}") from None


def demo(args: argparse.Namespace) -> int:
    from autobatch.demo import run

    result = run(epochs=args.epochs, memory_budget=_budget(args.budget), bn=args.bn, device=args.device,
                 out_dir=args.out, micro_batch=int(args.micro_batch) if args.micro_batch != "auto" else "auto",
                 train_size=args.train_size)
    checkpointed = f", {len(result.plan.checkpointed)} modules checkpointed" if result.plan.checkpointed else ""
    print(f"validation IoU {result.validation_iou:.3f} after {args.epochs} epochs "
          f"({result.seconds:.0f} s, micro-batches {result.plan.splits}, bn={result.plan.bn}{checkpointed})")
    if result.picture is not None:
        print(f"picture (input | true mask | predicted mask): {result.picture}")
    return 0


def plan(args: argparse.Namespace) -> int:
    import autobatch

    device = torch.device(args.device)
    model = _factory(args.model)().to(device)
    shape = _shape(args.input_shape)
    inputs = torch.randn(args.target_batch, *shape)
    optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
                 "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)}[args.optimizer](
        model.parameters())

    def compute_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        # Any scalar that depends on every output trains the same memory as the real loss would.
        output = model(batch)
        output = output if isinstance(output, torch.Tensor) else next(iter(output.values()))
        return output.float().square().mean()

    autocast = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    ab = autobatch.wrap(model, optimizer, target_batch=args.target_batch, compute_loss=compute_loss,
                        bn=args.bn, memory_budget=_budget(args.budget), autocast_dtype=autocast,
                        retune=args.retune, device=device)
    print(ab.tune(inputs))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autobatch", description="autobatch command line")
    commands = parser.add_subparsers(dest="command", required=True)

    d = commands.add_parser("demo", help="train a little BatchNorm U-Net on generated shapes")
    d.add_argument("--epochs", type=int, default=8)
    d.add_argument("--budget", default="24MiB", help="memory budget, e.g. 24MiB, 0.5 (of the device) or none")
    d.add_argument("--bn", choices=BN_MODES, default="two_pass",
                   help="BatchNorm mode; exact runs the whole batch with checkpointing, auto chooses")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--micro-batch", default="auto", help="an int, or auto (measured under --budget)")
    d.add_argument("--train-size", type=int, default=512)
    d.add_argument("--out", default="demo-out", help="folder for the picture")
    d.set_defaults(run=demo)

    p = commands.add_parser("plan", help="measure and print the plan for a model")
    p.add_argument("--model", required=True, help="package.module:factory returning the nn.Module")
    p.add_argument("--input-shape", required=True, help="one sample's shape, e.g. 3x224x224")
    p.add_argument("--target-batch", type=int, required=True)
    p.add_argument("--budget", default=None, help="e.g. 4GiB, or 0.5 for half the device")
    p.add_argument("--bn", choices=BN_MODES, default="two_pass")
    p.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adamw")
    p.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--retune", action="store_true", help="measure even when the cache has a plan")
    p.set_defaults(run=plan)

    args = parser.parse_args(argv)
    # Trials are reported as they run: that is the progress of a measurement.
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
