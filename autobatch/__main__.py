"""Command line: ``python -m autobatch demo`` and ``python -m autobatch plan``.

    python -m autobatch demo --epochs 8 --budget 24MiB --bn two_pass
    python -m autobatch plan --model torchvision.models:resnet50 --model-kwargs num_classes=10 \\
        --input-shape 3x224x224 --target-batch 64 --plot plan.png

Every failure is one message with what to try next, and exit status 2 (``--debug``: the traceback).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import logging
import pathlib
import sys
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from autobatch.modes import BN_MODES
from autobatch.options import UPDATE_COPIES
from autobatch.sizes import format_bytes, parse_bytes

__all__ = ["main"]


class UsageError(ValueError):
    """A command-line value that cannot be used; its message says what to give instead."""


class _Renamed(argparse.Action):
    """``--retune``, the earlier name of ``--refresh-cache``: still taken, with a warning, and out of ``--help``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        logging.getLogger("autobatch").warning("--retune is now --refresh-cache; --retune will be removed")
        setattr(namespace, self.dest, True)


#: Below this a budget holds no step of any model: a unit left out, most likely.
SMALLEST_BUDGET = 1 << 10


def _budget(text: Optional[str]):
    """As ``memory_budget`` takes it: '6GiB' a size, '0.5' a fraction of the device (a number with a point,
    in (0, 1]), '4000000000' bytes; 'none' means no cap. Anything else, or under a MiB, is refused here."""
    if text is None or text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and not text.strip().isdigit():
        if not 0 < value <= 1:
            raise UsageError(f"--budget {text}: a number with a point is a fraction of the device's memory and must "
                             "lie in (0, 1]; give bytes as a whole number or with a unit, such as 6GiB")
        return value
    try:
        size = int(text) if value is not None else parse_bytes(text)
    except ValueError:
        raise UsageError(f"--budget {text}: not a size; give one such as 6GiB or 500MB, bytes as a whole number, "
                         "a fraction of the device such as 0.5, or none") from None
    if size < SMALLEST_BUDGET:
        raise UsageError(f"--budget {text} is {format_bytes(size)}, less than any model's step needs (a unit left "
                         "out?); give a size such as 6GiB, or a fraction of the device such as 0.5")
    return size


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise UsageError(f"--device {text}: {error}; give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text}: this machine has no CUDA device (torch {torch.__version__}); use --device "
                         "cpu, or a machine with a GPU and a CUDA build of torch")
    return device


def _plot_path(text: Optional[str]) -> Optional[pathlib.Path]:
    """The picture's path, checked before anything is measured: its folder must exist."""
    if text is None:
        return None
    path = pathlib.Path(text)
    if not path.parent.is_dir():
        raise UsageError(f"--plot {text}: the folder {path.parent} does not exist; create it first, or give another "
                         "path")
    return path


def _factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise UsageError(f"--model must look like package.module:factory, got {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise UsageError(f"--model {spec}: {error}; give an importable package.module:factory") from None
    return target


def _keywords(text: Optional[str]) -> dict[str, Any]:
    """'num_classes=10,pretrained=False' as keyword arguments; values are Python literals or strings."""
    keywords: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        name, equals, value = item.partition("=")
        if not equals or not name.strip().isidentifier():
            raise UsageError(f"--model-kwargs must look like num_classes=10,dropout=0.2, got {text!r}")
        try:
            keywords[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            keywords[name.strip()] = value.strip()
    return keywords


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--input-shape must look like 3x224x224, got {text!r}") from None
    if any(size < 1 for size in shape):
        raise UsageError(f"--input-shape {text}: every size must be 1 or more, such as 3x224x224")
    return shape


def _check_shape(model: nn.Module, shape: tuple[int, ...], text: str, device: torch.device) -> None:
    """One sample of ``shape`` through the model in eval mode, before anything is measured: a shape the model
    cannot take is named as the flag that gave it."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(torch.randn(1, *shape, device=device))
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        raise UsageError(f"--input-shape {text}: the model cannot take one sample of that shape "
                         f"({str(error).splitlines()[0] if str(error).strip() else type(error).__name__}); give the "
                         "shape of one sample as the model takes it, channels first, such as 3x224x224") from None
    finally:
        for module, training in modes:
            module.training = training


def _positive(flag: str, value: int, what: str) -> int:
    if value < 1:
        raise UsageError(f"{flag} {value}: {what} must be 1 or more")
    return value


def _micro_batch(text: str) -> Any:
    if text == "auto":
        return "auto"
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"--micro-batch {text}: give a number of samples (1 or more), or auto")
    return int(text)


def demo(args: argparse.Namespace) -> int:
    from autobatch.demo import run

    epochs = _positive("--epochs", args.epochs, "the passes over the training images")
    train_size = _positive("--train-size", args.train_size, "the number of training images")
    result = run(epochs=epochs, memory_budget=_budget(args.budget), bn=args.bn, device=_device(args.device),
                 out_dir=args.out, micro_batch=_micro_batch(args.micro_batch), train_size=train_size)
    checkpointed = f", {len(result.plan.checkpointed)} modules checkpointed" if result.plan.checkpointed else ""
    print(f"validation IoU {result.validation_iou:.3f} after {args.epochs} epochs "
          f"({result.seconds:.0f} s, micro-batches {result.plan.splits}, bn={result.plan.bn}{checkpointed}: "
          f"{result.plan.gradient})")
    if result.picture is not None:
        print(f"picture (input | true mask | predicted mask): {result.picture}")
    return 0


def plan(args: argparse.Namespace) -> int:
    import autobatch

    device = _device(args.device)
    picture = _plot_path(args.plot)
    if picture is not None:
        from autobatch.plot import _matplotlib

        _matplotlib()  # matplotlib present, before anything is measured
    factory = _factory(args.model)
    try:
        model = factory(**_keywords(args.model_kwargs))
    except TypeError as error:
        raise UsageError(f"--model {args.model}: {error}; pass its arguments with --model-kwargs") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {args.model} returned a {type(model).__name__}, not a torch.nn.Module; give a "
                         "factory (a class or function) that returns the model")
    model = model.to(device)
    shapes = [_shape(text) for text in args.input_shape]
    _positive("--target-batch", args.target_batch, "the logical batch")
    for shape, text in zip(shapes, args.input_shape):
        _check_shape(model, shape, text, device)
    budget = _budget(args.budget)
    weights = 2 * sum(p.numel() * p.element_size() for p in model.parameters())  # and their gradients
    if isinstance(budget, int) and budget < weights:
        raise UsageError(f"--budget {args.budget}: the model's parameters and their gradients alone take "
                         f"{format_bytes(weights)}; give a larger budget")
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
                        bn=args.bn, memory_budget=budget, autocast_dtype=autocast, update_copies=args.update_copies,
                        cache="refresh" if args.refresh_cache else True, device=device)
    plans = [ab.tune(torch.randn(args.target_batch, *shape, device=device)) for shape in shapes]
    print(plans[0])
    if len(plans) > 1:
        print(_per_shape(shapes, plans))
    if picture is not None:
        from autobatch.plot import plot_plan

        print(f"picture of the plan: {plot_plan(plans, picture)}")
    return 0


def _per_shape(shapes: list[tuple[int, ...]], plans: list) -> str:
    """The micro-batch the memory model gives each sample shape, as a table."""
    from autobatch.plan import format_table
    from autobatch.sizes import format_bytes

    rows = [("input shape", "elements", "micro_batch", "capacity", "splits", "phase 1",
             "predicted peak (at micro_batch)")] + [
        ("x".join(map(str, shape)), str(plan.sample_size), str(plan.micro_batch), str(plan.capacity), str(plan.splits),
         "whole" if plan.phase1_chunks == 1 else f"{plan.phase1_chunks} chunks",
         format_bytes(plan.predicted_peak_bytes) if plan.predicted_peak_bytes is not None else "-")
        for shape, plan in zip(shapes, plans)]
    return format_table(rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m autobatch", description="autobatch command line")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    commands = parser.add_subparsers(dest="command", required=True)

    d = commands.add_parser("demo", parents=[common], help="train a little BatchNorm U-Net on generated shapes")
    d.add_argument("--epochs", type=int, default=8, help="passes over the training images (default 8)")
    d.add_argument("--budget", default="24MiB", help="memory budget, e.g. 24MiB, 0.5 (of the device) or none")
    d.add_argument("--bn", choices=BN_MODES, default="auto",
                   help="BatchNorm mode; exact runs the whole batch with checkpointing, auto chooses")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to train (default: cuda if present, else cpu)")
    d.add_argument("--micro-batch", default="auto", help="an int, or auto (measured under --budget)")
    d.add_argument("--train-size", type=int, default=512, help="number of generated training images")
    d.add_argument("--out", default="demo-out", help="folder for the picture")
    d.set_defaults(run=demo)

    p = commands.add_parser("plan", parents=[common], help="measure and print the plan for a model")
    p.add_argument("--model", required=True, help="package.module:factory returning the nn.Module")
    p.add_argument("--model-kwargs", default=None,
                   help="keyword arguments for the factory, e.g. num_classes=10,dropout=0.2")
    p.add_argument("--input-shape", required=True, action="append",
                   help="one sample's shape, e.g. 3x224x224; give it again for every size the samples take "
                        "(the micro-batch of each, from the memory model)")
    p.add_argument("--target-batch", type=int, required=True, help="the logical batch size of the recipe")
    p.add_argument("--budget", default=None,
                   help="memory budget: a size such as 4GiB, bytes, or a fraction of the device such as 0.5")
    p.add_argument("--bn", choices=BN_MODES, default="auto", help="BatchNorm mode to plan for")
    p.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adamw",
                   help="optimizer whose state the plan holds (default adamw)")
    p.add_argument("--update-copies", choices=UPDATE_COPIES, default="device",
                   help="where the copies that undo a failed optimizer update live: device (default), host, or none "
                        "(no undo: an update that runs out of memory half-way raises)")
    p.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none",
                   help="mixed precision of the forward passes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to plan for (default: cuda if present, else cpu)")
    p.add_argument("--refresh-cache", action="store_true", help="measure even when the cache has a plan")
    p.add_argument("--retune", action=_Renamed, nargs=0, dest="refresh_cache", help=argparse.SUPPRESS)
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="draw the measured peaks, the fitted line, the budget and the choice (needs matplotlib)")
    p.set_defaults(run=plan)
    return parser


def _joined(argv: Sequence[str]) -> list[str]:
    """``--budget -5MiB`` as ``--budget=-5MiB``: argparse takes a value that starts with '-' for an option, and
    would answer with its own error instead of one about the budget."""
    joined, parts = [], list(argv)
    while parts:
        part = parts.pop(0)
        if part == "--budget" and parts and parts[0].startswith("-") and parts[0][1:2].isdigit():
            part = f"--budget={parts.pop(0)}"
        joined.append(part)
    return joined


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(_joined(sys.argv[1:] if argv is None else argv))
    # Trials are reported as they run: that is the progress of a measurement.
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return args.run(args)
    except (UsageError, MemoryError, ValueError, TypeError, RuntimeError, ImportError) as error:
        if args.debug:
            raise
        print(f"autobatch: {error}", file=sys.stderr)
        if not isinstance(error, UsageError):
            print("(run again with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
