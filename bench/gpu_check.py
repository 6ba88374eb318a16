"""Everything the documentation lists as not yet measured on a GPU, in one command, one report.

    python bench/gpu_check.py            # about 8 minutes on one GPU; writes bench/results/gpu_check.md

Parts, each in its own process with a time limit (a part that fails or runs out of time is reported
as such, and the others still run):

1. the NVML probe against ``torch.cuda.mem_get_info`` (free and total memory of the same GPU);
2. the planner against a real allocator cap (``torch.cuda.set_per_process_memory_fraction``): its
   micro-batch against the largest that runs without running out of memory (bench/planner.py), and
   batches whose samples change size, plan once against the memory model (bench/variable_shapes.py), and
   beside the batch-size searches of Accelerate, the Hugging Face Trainer and Lightning (bench/peers.py);
3. the cost of two_pass and micro against plain accumulation on a ResNet-50 at 224x224, in
   NCHW and in channels_last (bench/cost.py), and of bn="exact" (bench/exact.py);
4. bf16 and fp16 autocast (with a GradScaler) through two_pass and exact: finite, and fp16's scaler
   stepping as often as the full batch's;
5. the precise backward at ResNet-50 224x224 keeping every boundary on the device, the grouped ones, and every
   one in pinned host memory (``Boundaries.HOST``): peak device memory and time against plain accumulation.

Without a GPU it says so and exits with status 2.
"""
from __future__ import annotations

import copy
import datetime
import pathlib
import subprocess
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gpu_check.md"
PART_SECONDS = 150


def probe_against_torch() -> str:
    sys.path.insert(0, str(ROOT))
    from autobatch.planning.memory import probe
    from autobatch.sizes import format_bytes

    device = torch.device("cuda", torch.cuda.current_device())
    memory = probe(device)
    free, total = torch.cuda.mem_get_info(device)
    return "\n".join([
        "| source | free | total |", "| --- | --- | --- |",
        f"| autobatch's probe ({memory.source}) | {format_bytes(memory.free_bytes)} | {format_bytes(memory.total_bytes)} |",
        f"| torch.cuda.mem_get_info | {format_bytes(free)} | {format_bytes(total)} |",
        "", f"Difference in free memory: {abs(memory.free_bytes - free) / 2**20:.1f} MiB "
            f"({memory.name}; NVML counts every process on the GPU, as mem_get_info does)."])


def amp_check() -> str:
    sys.path.insert(0, str(ROOT))
    import autobatch
    from bench.resnet import resnet50

    device = torch.device("cuda")
    rows = ["| autocast | bn | loss (two steps) | finite | scaler scale after |", "| --- | --- | --- | --- | --- |"]
    for dtype, scaled in ((torch.bfloat16, False), (torch.float16, True)):
        for bn in ("two_pass", "exact"):
            torch.manual_seed(0)
            model = resnet50(num_classes=100).to(device)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            scaler = torch.amp.GradScaler("cuda") if scaled else None
            options = dict(micro_batch=8) if bn == "two_pass" else dict(memory_budget=0.5)
            ab = autobatch.wrap(model, optimizer, 32, torch.nn.CrossEntropyLoss(), bn=bn, autocast_dtype=dtype,
                                scaler=scaler, cache=False, **options)
            x, y = torch.randn(32, 3, 224, 224, device=device), torch.randint(0, 100, (32,), device=device)
            losses = [ab.step(x, y) for _ in range(2)]
            finite = all(torch.isfinite(p).all() for p in model.parameters())
            rows.append(f"| {dtype} | {bn} | {', '.join(f'{v:.3f}' for v in losses)} | {finite} | "
                        f"{scaler.get_scale() if scaler else '-'} |")
    return "\n".join(rows)


def precise_boundaries(device: str = "cuda", size: int = 224, target_batch: int = 32, micro_batch: int = 8,
                       steps: int = 3) -> str:
    """Precise's three places for its boundaries, each in its own model from the same weights: the device's peak
    (allocated) in a step and the median step time, as a ratio to plain accumulation; the parameters after the
    steps against those of the first (every boundary on the device): the same arithmetic."""
    sys.path.insert(0, str(ROOT))
    import statistics

    import autobatch
    from autobatch.modes import Boundaries
    from autobatch.split import balanced_splits
    from bench.cost import plain_step, sync
    from bench.resnet import resnet50

    device = torch.device(device)
    torch.manual_seed(0)
    base = resnet50(num_classes=100).to(device)
    x = torch.randn(target_batch, 3, size, size, device=device)
    y = torch.randint(0, 100, (target_batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def timed(step) -> tuple[float, int]:
        step()  # warm
        seconds = []
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            seconds.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        return statistics.median(seconds), peak

    plain = copy.deepcopy(base)
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.01)
    reference, _ = timed(plain_step(plain, optimizer, x, y, loss_fn, balanced_splits(target_batch, micro_batch)))
    rows = ["| precise keeps | peak (allocated) | time / plain accumulation | parameters vs every boundary |",
            "| --- | --- | --- | --- |"]
    first = None
    for boundaries in (Boundaries.EVERY, Boundaries.GROUPED, Boundaries.HOST):
        model = copy.deepcopy(base)
        ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.01), target_batch, loss_fn,
                            micro_batch=micro_batch, cache=False)
        ab.step(x, y)  # the first, measured step
        ab._planner.state.plan = ab.plan.replace(boundaries=boundaries, boundary_bytes=0)
        seconds, peak = timed(lambda: ab.step(x, y))
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        first = flat if first is None else first
        apart = float((flat - first).abs().max() / first.abs().max())
        rows.append(f"| {boundaries.value} | {peak / 2**20:.0f} MiB | {seconds / reference:.2f}x | {apart:.1e} |")
    return "\n".join(rows)


def run_part(title: str, command: list[str]) -> str:
    start = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True,
                                timeout=PART_SECONDS)
        status = "ok" if result.returncode == 0 else f"failed (exit {result.returncode})"
        output = result.stdout.strip() if result.returncode == 0 else (result.stdout + result.stderr)[-3000:]
    except subprocess.TimeoutExpired as timeout:
        status, output = f"stopped after {PART_SECONDS} s", (timeout.stdout or b"")[-3000:]
        output = output.decode(errors="replace") if isinstance(output, bytes) else output
    seconds = time.perf_counter() - start
    return f"## {title}\n\n`python {' '.join(command)}`: {status}, {seconds:.0f} s\n\n{output}\n"


def in_process(title: str, function) -> str:
    start = time.perf_counter()
    try:
        body, status = function(), "ok"
    except Exception as error:  # noqa: BLE001 - reported, and the other parts still run
        body, status = repr(error), "failed"
    return f"## {title}\n\n{status}, {time.perf_counter() - start:.0f} s\n\n{body}\n"


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; this check measures autobatch on a GPU and has nothing to do "
              "without one", file=sys.stderr)
        return 2
    started = time.perf_counter()
    parts = [
        in_process("NVML probe against torch.cuda.mem_get_info", probe_against_torch),
        run_part("The planner against real out-of-memory", ["bench/planner.py", "--device", "cuda",
                                                            "--out", "/dev/null"]),
        run_part("Samples of changing size under a real allocator cap",
                 ["bench/variable_shapes.py", "--device", "cuda", "--out", "/dev/null"]),
        run_part("Beside Accelerate's, the Trainer's and Lightning's batch-size search, a real allocator cap",
                 ["bench/peers.py", "--device", "cuda", "--out", "bench/results/peers_cuda.md"]),
        run_part("Cost at ResNet-50 224x224, NCHW", ["bench/cost.py", "--model", "resnet50", "--size", "224",
                                                     "--target-batch", "32", "--micro-batch", "8", "--rounds", "7",
                                                     "--device", "cuda"]),
        run_part("Cost at ResNet-50 224x224, channels_last",
                 ["bench/cost.py", "--model", "resnet50", "--size", "224", "--target-batch", "32", "--micro-batch",
                  "8", "--rounds", "7", "--device", "cuda", "--channels-last"]),
        run_part("Exact mode at ResNet-50 224x224", ["bench/exact.py", "--model", "resnet50", "--size", "224",
                                                     "--base-batch", "32", "--largest", "2", "--device", "cuda"]),
        in_process("bf16 and fp16 autocast, ResNet-50 224x224", amp_check),
        in_process("The precise backward's boundaries at ResNet-50 224x224: device, grouped, pinned host memory",
                   precise_boundaries),
    ]
    name = torch.cuda.get_device_name()
    report = (f"# autobatch on {name}\n\n`python bench/gpu_check.py`, {datetime.date.today()}, torch "
              f"{torch.__version__}, {time.perf_counter() - started:.0f} s in all.\n\n" + "\n".join(parts))
    RESULTS.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
