"""Gradient fidelity of every bn mode on stock architectures (timm, torchvision), against the unsplit step.

    python -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm -e .
    /tmp/tv/bin/python bench/fidelity_models.py                  # ~15 min on 2 CPU cores: bench/results/fidelity_models.md
    /tmp/tv/bin/python bench/fidelity_models.py --table cost     # ~10 min: bench/results/fidelity_models_cost.md
    /tmp/tv/bin/python bench/fidelity_models.py --models "timm resnet18" --micro 4      # a few rows, printed
    /tmp/tv/bin/python bench/fidelity_models.py --table default  # ~25 min: bench/results/fidelity_default.md
    /tmp/tv/bin/python bench/fidelity_models.py --table wide     # ~15 min: bench/results/fidelity_wide.md

``--table default``: the default (``wrap`` with no ``bn``, micro-batches of 4) beside the projected two_pass
on every model here, timm, torchvision and transformers, with the gradient the plan says it computes.

Needs torchvision and timm, which need the full torch build they were made for, so it stays out of
CI. Models with random weights (weights=None), small random images; float64, so that rounding does not
blur what the modes compute. The generator is seeded alike before the unsplit step and before
autobatch's, whose phase 1 then draws the same dropout masks in the same order.

Per model, mode and micro-batch: the cosine and relative error of the first step's accumulated
gradient to the unsplit step's, and after 3 steps of SGD (lr 0.01, momentum 0.9, three batches) the
distance of the parameters from the unsplit run's, relative to how far that run moved them. Then, in
float32: one step's peak memory (autobatch's own tracker of live tensors) and time, each mode beside
the others in one run, time as a ratio to plain accumulation (bn="micro").
"""
from __future__ import annotations

import argparse
import copy
import logging
import pathlib
import sys
import time

import timm
import torch
import torch.nn.functional as F
import torchvision
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autobatch  # noqa: E402
from autobatch.planning.measure import peak_bytes  # noqa: E402
from autobatch.reference import cosine, flat_grad, relative_error  # noqa: E402
from autobatch.sizes import format_bytes  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "fidelity_models.md"
SEED = 5


def segmentation(factory):
    return lambda: factory(weights=None, weights_backbone=None, num_classes=5)


#: name: (factory, logical batch, image size, task)
MODELS = {
    "timm resnet18": (lambda: timm.create_model("resnet18", num_classes=10), 16, 64, "classify"),
    "timm efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=10), 16, 64, "classify"),
    "torchvision deeplabv3_mobilenet_v3_large": (
        segmentation(torchvision.models.segmentation.deeplabv3_mobilenet_v3_large), 8, 64, "segment"),
    "torchvision fcn_resnet50": (segmentation(torchvision.models.segmentation.fcn_resnet50), 8, 64, "segment"),
}
#: The default's table adds these: every architecture family the issue on exact by default measured.
MORE_MODELS = {
    "timm mobilenetv3_large_100": (lambda: timm.create_model("mobilenetv3_large_100", num_classes=10), 16, 32,
                                   "classify"),
    "timm tf_efficientnet_lite0": (lambda: timm.create_model("tf_efficientnet_lite0", num_classes=10), 16, 32,
                                   "classify"),
    "timm dla34": (lambda: timm.create_model("dla34", num_classes=10), 16, 32, "classify"),
    "timm cspresnet50": (lambda: timm.create_model("cspresnet50", num_classes=10), 16, 32, "classify"),
    "torchvision mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), 16, 32, "classify"),
    "torchvision resnet50": (lambda: torchvision.models.resnet50(num_classes=10), 16, 32, "classify"),
    "torchvision shufflenet_v2_x1_0": (lambda: torchvision.models.shufflenet_v2_x1_0(num_classes=10), 16, 32,
                                       "classify"),
    "torchvision mnasnet1_0": (lambda: torchvision.models.mnasnet1_0(num_classes=10), 16, 32, "classify"),
    "torchvision densenet121": (lambda: torchvision.models.densenet121(num_classes=10), 16, 32, "classify"),
    "torchvision googlenet": (lambda: torchvision.models.googlenet(num_classes=10, aux_logits=False,
                                                                   init_weights=True), 16, 32, "classify"),
    "torchvision efficientnet_v2_s": (lambda: torchvision.models.efficientnet_v2_s(num_classes=10), 16, 32,
                                      "classify"),
    # Families the default failed on or fell back on until stop 33: a BatchNorm over tokens flattened into the first
    # dimension, a product of sizes read groups later, a tensor's device handed to torch.autocast, nn.Dropout(0.0)
    # between stochastic-depth draws.
    "timm levit_128s": (lambda: timm.create_model("levit_128s", num_classes=10, img_size=64), 8, 64, "classify"),
    "timm lambda_resnet26t": (lambda: timm.create_model("lambda_resnet26t", num_classes=10, img_size=64), 8, 64,
                              "classify"),
    "timm efficientvit_b0": (lambda: timm.create_model("efficientvit_b0", num_classes=10), 8, 64, "classify"),
    "torchvision maxvit_t": (lambda: torchvision.models.maxvit_t(num_classes=10), 8, 224, "classify"),
    "transformers ResNetForImageClassification": (
        lambda: transformers.ResNetForImageClassification(transformers.ResNetConfig(
            num_labels=10, depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 128, 256], embedding_size=32)), 16, 32,
        "hf classify"),
    "transformers ResNetForImageClassification, loss inside forward": (
        lambda: transformers.ResNetForImageClassification(transformers.ResNetConfig(
            num_labels=10, depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 128, 256], embedding_size=32)), 16, 32,
        "hf classify, labels"),
    "transformers MobileNetV2ForImageClassification, loss inside forward": (
        lambda: transformers.MobileNetV2ForImageClassification(transformers.MobileNetV2Config(
            num_labels=10, depth_multiplier=0.35, image_size=32)), 16, 32, "hf classify, labels"),
    "transformers RegNetForImageClassification": (
        lambda: transformers.RegNetForImageClassification(transformers.RegNetConfig(
            num_labels=10, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128], embedding_size=16, groups_width=8)),
        16, 32, "hf classify"),
    "transformers EfficientNetForImageClassification, loss inside forward": (
        lambda: transformers.EfficientNetForImageClassification(transformers.EfficientNetConfig(
            num_labels=10, width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280, image_size=32)), 16, 32,
        "hf classify, labels"),
}


def _timm(name, size, batch=8, **options):
    return (lambda: timm.create_model(name, num_classes=10, **options)), batch, size, "classify"


#: ``--table wide``: more families, the default beside the projected two_pass as in ``--table default`` (logical
#: batches of 8): attention hybrids, re-parameterizable blocks, multi-branch and dual-path nets, 3-D video nets.
WIDE_MODELS = {
    **{f"timm {name}{', with dropout and drop path' if options.get('drop_rate') else ''}": _timm(name, size, **options)
       for name, size, options in [
        ("levit_conv_128s", 64, {"img_size": 64}), ("mobilevit_xxs", 64, {}), ("mobilevitv2_050", 64, {}),
        ("efficientformer_l1", 224, {}), ("efficientformerv2_s0", 224, {}), ("tiny_vit_5m_224", 224, {}),
        ("maxvit_nano_rw_256", 64, {"img_size": 64}), ("coatnet_nano_rw_224", 64, {"img_size": 64}),
        ("botnet26t_256", 64, {"img_size": 64}), ("halonet26t", 256, {}), ("nextvit_small", 64, {}),
        ("fastvit_t8", 64, {}), ("repvit_m1", 64, {}), ("repvgg_a0", 32, {}), ("mobileone_s0", 32, {}),
        ("repghostnet_050", 32, {}), ("ghostnet_100", 32, {}), ("hrnet_w18_small", 64, {}), ("dpn68", 32, {}),
        ("res2net50_14w_8s", 32, {}), ("resnest14d", 32, {}), ("skresnet18", 32, {}), ("selecsls42b", 32, {}),
        ("seresnext26d_32x4d", 32, {}), ("gcresnet33ts", 32, {}), ("resnetrs50", 32, {}), ("tresnet_m", 64, {}),
        ("xception41", 64, {}), ("inception_v4", 80, {}), ("inception_next_tiny", 64, {}), ("cspdarknet53", 32, {}),
        ("ese_vovnet19b_dw", 32, {}), ("hgnetv2_b0", 64, {}), ("gernet_s", 32, {}), ("regnety_002", 32, {}),
        ("regnetz_b16", 64, {}), ("rexnet_100", 32, {}), ("mixnet_s", 32, {"drop_rate": 0.2, "drop_path_rate": 0.1}),
        ("efficientnet_b0", 32, {"drop_rate": 0.2, "drop_path_rate": 0.2}),
        ("resnet18d", 32, {"drop_rate": 0.2, "drop_path_rate": 0.1}), ("tinynet_a", 32, {}), ("spnasnet_100", 32, {}),
        ("fbnetv3_b", 32, {}), ("hardcorenas_a", 32, {}), ("lcnet_050", 32, {}), ("mobilenetv4_conv_small", 32, {}),
        ("starnet_s1", 64, {})]},
    "torchvision inception_v3": (lambda: torchvision.models.inception_v3(num_classes=10, aux_logits=False,
                                                                         init_weights=True), 8, 80, "classify"),
    "torchvision regnet_y_400mf": (lambda: torchvision.models.regnet_y_400mf(num_classes=10), 8, 32, "classify"),
    "torchvision mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 8, 32,
                                       "classify"),
    "torchvision resnext50_32x4d": (lambda: torchvision.models.resnext50_32x4d(num_classes=10), 8, 32, "classify"),
    "torchvision r3d_18": (lambda: torchvision.models.video.r3d_18(num_classes=10), 8, 32, "video"),
    "torchvision mc3_18": (lambda: torchvision.models.video.mc3_18(num_classes=10), 8, 32, "video"),
    "torchvision r2plus1d_18": (lambda: torchvision.models.video.r2plus1d_18(num_classes=10), 8, 32, "video"),
}
MODES = {
    "two_pass": autobatch.TwoPass(phase1_memory_format=torch.preserve_format),
    "two_pass precise": autobatch.TwoPass(precise=True, phase1_memory_format=torch.preserve_format),
    "micro": autobatch.Micro(),
    "exact": autobatch.Exact(),
}


def loss_for(task):
    if task in ("classify", "video"):
        return lambda model, batch: F.cross_entropy(model(batch[0]), batch[1])
    if task == "hf classify":
        return lambda model, batch: F.cross_entropy(model(pixel_values=batch[0]).logits, batch[1])
    if task == "hf classify, labels":  # the model's own loss, computed inside its forward (as the Trainer calls it)
        return lambda model, batch: model(pixel_values=batch[0], labels=batch[1]).loss
    return lambda model, batch: F.cross_entropy(model(batch[0])["out"], batch[1])


def batches(task, n, size, dtype, count):
    generator = torch.Generator().manual_seed(1)
    for _ in range(count):
        frames = (4,) if task == "video" else ()  # clips of 4 frames
        x = torch.randn(n, 3, *frames, size, size, dtype=dtype, generator=generator)
        segment = task == "segment"
        y = torch.randint(0, 5 if segment else 10, (n, size, size) if segment else (n,), generator=generator)
        yield x, y


def wrapped(model, optimizer, n, loss, mode, micro_batch, **options):
    if mode == "default":  # the README's first example: no bn
        return autobatch.wrap(model, optimizer, n, compute_loss=loss, micro_batch=micro_batch, cache=False, **options)
    if mode == "exact":  # the whole batch; micro_batch does not apply
        return autobatch.wrap(model, optimizer, n, compute_loss=loss, bn=MODES[mode], cache=False,
                              **{"memory_budget": 10**12, **options})
    return autobatch.wrap(model, optimizer, n, compute_loss=loss, micro_batch=micro_batch, bn=MODES[mode],
                          cache=False, **options)


def reference(base, loss, data):
    """The unsplit step's first gradient and the parameters after 3 steps."""
    model = copy.deepcopy(base)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    first = None
    for x, y in data:
        optimizer.zero_grad()
        torch.manual_seed(SEED)
        loss(model, (x, y)).backward()
        first = flat_grad(model) if first is None else first
        optimizer.step()
    return first, torch.cat([p.detach().flatten() for p in model.parameters()])


def autobatch_run(base, n, loss, data, mode, micro_batch):
    """The first step's accumulated gradient, the parameters after every step, and the plan."""
    model = copy.deepcopy(base)
    grads = []
    ab = wrapped(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), n, loss, mode, micro_batch,
                 before_step=lambda ab: grads.append(flat_grad(ab.model)))
    for x, y in data:
        torch.manual_seed(SEED)
        ab.step((x, y))
    return grads[0], torch.cat([p.detach().flatten() for p in model.parameters()]), ab.plan


def unsplit_run(name):
    """Model ``name`` (random weights, float64), its logical batch and image size, its loss, 3 batches, and the
    unsplit run: its first gradient, the parameters after it, and how far it moved them."""
    factory, n, size, task = {**WIDE_MODELS, **MODELS, **MORE_MODELS}[name]
    torch.manual_seed(0)
    base = factory().double().train()
    loss, data = loss_for(task), list(batches(task, n, size, torch.float64, 3))
    start = torch.cat([p.detach().flatten() for p in base.parameters()])
    expected, after = reference(base, loss, data)
    return base, n, size, loss, data, expected, after, (after - start).norm()


def default_rows(name, micro_batch=4):
    """The default beside the projected two_pass: cosine, relative error, distance after 3 steps, and the gradient
    the plan names (precise, or the projected backward and why)."""
    base, n, size, loss, data, expected, after, moved = unsplit_run(name)
    cells = []
    for mode in ("two_pass", "default"):
        first, params, plan = autobatch_run(base, n, loss, data, mode, micro_batch)
        cells.append(f"{cosine(first, expected):.4f} | {relative_error(first, expected):.1e} | "
                     f"{((params - after).norm() / moved).item():.1e}")
    row = f"| {name} | {size} | {micro_batch} of {n} | {cells[0]} | {cells[1]} | {plan.gradient} |"
    print(row, flush=True)
    yield row


def fidelity_rows(name, micro_batches):
    base, n, _, loss, data, expected, after, moved = unsplit_run(name)
    for mode in MODES:
        for micro_batch in ([n] if mode == "exact" else [m for m in micro_batches if m < n]):
            first, params, _ = autobatch_run(base, n, loss, data, mode, micro_batch)
            row = (f"| {name} | {mode} | {'whole batch' if mode == 'exact' else micro_batch} | "
                   f"{cosine(first, expected):.6f} | {relative_error(first, expected):.1e} | "
                   f"{((params - after).norm() / moved).item():.1e} |")
            print(row, flush=True)
            yield row


#: The memory and time table's batch and image size per task: where activations, not parameters, dominate.
COST_SETTINGS = {"classify": (32, 128), "segment": (8, 128)}


def cost_rows(name, micro_batch):
    """float32: one step's peak memory and time per mode, side by side; exact planned under a budget of
    3/4 of the unsplit step's peak (checkpointing chosen by its planner, or does not fit)."""
    factory, _, _, task = MODELS[name]
    n, size = COST_SETTINGS[task]
    torch.manual_seed(0)
    base = factory().train()
    loss = loss_for(task)
    x, y = next(batches(task, n, size, torch.float32, 1))
    results = {}
    budget = None
    for mode in ("unsplit", *MODES):
        model = copy.deepcopy(base)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        options = {"memory_budget": int(budget / 0.9)} if mode == "exact" else {}
        ab = wrapped(model, optimizer, n, loss, "two_pass" if mode == "unsplit" else mode,
                     n if mode == "unsplit" else micro_batch, update_copies="none", **options)
        try:
            ab.step((x, y))  # the first step plans and traces
        except MemoryError as error:
            results[mode] = (str(error).split(";")[0], None)
            continue
        peak = peak_bytes(lambda: ab.step((x, y)), torch.device("cpu"), model, optimizer, (x, y))
        budget = budget or int(0.75 * peak)
        seconds = []
        for _ in range(3):
            started = time.perf_counter()
            ab.step((x, y))
            seconds.append(time.perf_counter() - started)
        label = n if mode == "unsplit" else (f"{n}, checkpointed: {ab.plan.checkpointing.label}" if mode == "exact" else micro_batch)
        results[mode] = (label, peak, min(seconds))
    plain = results["micro"][2]
    for mode, result in results.items():
        if result[1] is None:
            row = f"| {name} | {mode} | - | does not fit: {result[0]} | - |"
        else:
            label, peak, seconds = result
            row = f"| {name} | {mode} | {label} | {format_bytes(peak)} | {seconds / plain:.2f}x |"
        print(row, flush=True)
        yield row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=[*MODELS, *MORE_MODELS, *WIDE_MODELS],
                        metavar="MODEL")
    parser.add_argument("--micro", nargs="*", type=int, default=[2, 4, 8], help="micro-batch sizes")
    parser.add_argument("--table", choices=("fidelity", "cost", "default", "wide"), default="fidelity")
    args = parser.parse_args()
    logging.getLogger("autobatch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    started = time.perf_counter()
    if args.table in ("default", "wide"):
        names = args.models + [name for name in MORE_MODELS if args.models == list(MODELS)]
        if args.table == "wide":
            names = list(WIDE_MODELS) if args.models == list(MODELS) else args.models
        rows = [row for name in names for row in default_rows(name)]
    elif args.table == "fidelity":
        rows = [row for name in args.models for row in fidelity_rows(name, args.micro)]
    else:
        rows = [row for name in args.models for row in cost_rows(name, 4)]
    minutes = (time.perf_counter() - started) / 60
    run = (f"`python bench/fidelity_models.py{' --table cost' if args.table == 'cost' else ''}` (CPU, 2 cores, "
           f"torch {torch.__version__.split('+')[0]}, timm {timm.__version__}, torchvision "
           f"{torchvision.__version__.split('+')[0]}; {minutes:.0f} min). Random weights.")
    if args.table in ("default", "wide"):
        title = "stock architectures" if args.table == "default" else "more architectures (logical batches of 8)"
        lines = [
            f"# The default's gradient on {title}", "", run.replace("fidelity_models.py", "fidelity_models.py "
                                                                      f"--table {args.table}"),
            f"transformers {transformers.__version__}. Classifiers at the image size given, 10 classes; segmentation: "
            "the `out` head's per-pixel loss. float64; micro-batches of 4; the generator seeded alike before the "
            "unsplit step and before autobatch's. Per mode: the gradient's cosine to the unsplit step's, its relative "
            "error, and the parameters' distance from the unsplit run after 3 SGD steps (lr 0.01, momentum 0.9), "
            "relative to how far that run moved them. The default is `wrap(...)` with no `bn` (bn=\"auto\": at a given "
            "micro-batch, two_pass with its precise backward where it can run); its last column is what "
            "`ab.plan.gradient` says.", "",
            "| model | image | micro-batch | two_pass cosine | two_pass error | two_pass distance | default cosine | "
            "default error | default distance | the default's plan says |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows, ""]
        path = RESULTS.with_name(f"fidelity_{args.table}.md")
    elif args.table == "fidelity":
        lines = [
            "# Gradient fidelity on stock architectures", "", run,
            "Classifiers: batches of 16 images of 64x64, 10 classes; segmentation: batches of 8 images of 64x64, "
            "5 classes, the `out` head's per-pixel loss. float64; the generator seeded alike before the unsplit step "
            "and before autobatch's (the same dropout masks).", "",
            "Cosine and relative error: the first step's accumulated gradient against the unsplit step's. Distance "
            "after 3 steps: |w - w_unsplit| / |w_unsplit - w_0| after 3 SGD steps (lr 0.01, momentum 0.9).", "",
            "| model | bn | micro-batch | gradient cosine | relative error | distance after 3 steps |",
            "| --- | --- | --- | --- | --- | --- |", *rows, ""]
        path = RESULTS
    else:
        lines = [
            "# Memory and time of one step on stock architectures (float32, micro-batches of 4)", "", run,
            "Classifiers: batches of 32 images of 128x128; segmentation: 8 of 128x128. Peak: live tensors during a "
            "step (parameters, gradients and inputs included), as autobatch's host tracker counts them; time: the "
            "fastest of 3 steps, as a ratio to plain accumulation (bn=\"micro\") in the same run. exact: the whole "
            "batch, planned under a memory budget of 3/4 of the unsplit step's peak (its checkpointed modules "
            "named).", "",
            "| model | bn | micro-batch | peak | time |", "| --- | --- | --- | --- | --- |", *rows, ""]
        path = RESULTS.with_name("fidelity_models_cost.md")
    if args.models == list(MODELS) and (args.micro == [2, 4, 8] or args.table == "default"):
        path.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
