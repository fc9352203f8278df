"""Published multi-GPU ViT training throughputs beside the uncalibrated named-device prediction.

    python -m rsscale.benchmarks.published [--out reports/published_vs_predicted.md]

Each point is a training throughput a publication states with its model shape, precision, global
batch and hardware (the quoted lines are in the table's source column and in docs/PROFILER.md).
The prediction is the time model (benchmarks/prediction/timemodel.py) at the device's datasheet rates with the
stated constants (benchmarks/prediction/devices.py: matmuls at 0.5 of peak, collectives at 2/3 of the links,
elementwise passes at the memory bandwidth; nothing here is fitted to these points): the published layout where one is stated (data parallel, the stated
per-GPU micro-batch), else the layout `--layout auto` would choose, and the table says which.
Supervised models are the model-file shapes with no decoder (scaling/model/mae.py); what the
publications add on top (augmentation, EMA, evaluation, data loading) is not modelled, so a
wall-clock-derived rate is an average over the whole run and a lower bound on the step rate.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

from rsscale.benchmarks import autolayout
from rsscale.benchmarks.prediction import analytic, devices
from rsscale.scaling.spec.config import ViTConfig
from rsscale.scaling.spec.layout import Layout


def _vit(name: str, width: int, depth: int, heads: int, mlp: int, patch: int, classes: int = 1000) -> ViTConfig:
    """A supervised ViT at 224 px (no decoder, every patch, a `classes`-way head)."""
    return ViTConfig(name=name, width=width, heads=heads, mlp=mlp, depth=depth, patch_size=patch, dec_depth=0, mask_ratio=0.0,
                     num_classes=classes)


VIT_B16 = _vit("ViT-B/16", 768, 12, 12, 3072, 16)
VIT_L16_21K = _vit("ViT-L/16 (21k classes)", 1024, 24, 16, 4096, 16, classes=21841)
VIT_G14 = _vit("ViT-g/14", 1408, 40, 16, 6144, 14)
MAE_VIT_L16 = ViTConfig(name="MAE ViT-L/16", width=1024, heads=16, mlp=4096, depth=24)  # MAE's decoder: 512 wide, 8 deep; mask 0.75

JAX = ("NVIDIA JAX-Toolbox, rosetta/projects/vit/README.md, 'Pre-training Performance Results' "
       "(https://github.com/NVIDIA/JAX-Toolbox/blob/main/rosetta/rosetta/projects/vit/README.md)")
NEMO = ("NVIDIA NeMo Framework user guide, Vision Transformer > Performance "
        "(https://docs.nvidia.com/nemo-framework/user-guide/latest/MultimodalModels/VisionLanguageFoundation/Vit/Perf.html)")
PLSC = ("PaddlePaddle PLSC, task/classification/vit/README.md and its configs "
        "(https://github.com/PaddlePaddle/PLSC/tree/master/task/classification/vit)")
MAE = ("facebookresearch/mae PRETRAIN.md: 'Training time is ~42h in 64 V100 GPUs (800 epochs)', batch 64 per GPU x 64 "
       "(https://github.com/facebookresearch/mae/blob/main/PRETRAIN.md)")
MMPRE = ("OpenMMLab mmpretrain issue 1741 and config vit-base-p16_32xb128-mae_in1k.py "
         "(https://github.com/open-mmlab/mmpretrain/issues/1741)")


@dataclass(frozen=True)
class Point:
    cfg: ViTConfig
    device: str  # benchmarks/prediction/devices.py name
    gpus: int
    gpus_per_node: int
    precision: str
    global_batch: int
    micro_batch: int | None  # per GPU; None: the publication leaves the layout open
    published: float  # images/s of the whole job
    how: str  # measured, or derived from a stated wall-clock time
    source: str
    note: str = ""


POINTS = [
    Point(VIT_B16, "a100-80", 8, 8, "bf16", 4096, 512, 7200.38, "measured (table)", JAX, "pure data parallel, 512 per GPU"),
    Point(VIT_B16, "h100-sxm", 8, 8, "bf16", 4096, 512, 11669.52, "measured (table)", JAX,
          "the H100 variant is not stated; SXM assumed (DGX/HGX)"),
    Point(VIT_G14, "a100-80", 8, 8, "bf16", 4096, None, 693, "measured (table)", NEMO,
          "DGX A100; precision and batch from NeMo's ViT g/14 config (BF16 O2, 64 per GPU, global 4096), not the perf page; "
          "NeMo's 8 class tokens modelled as 1"),
    Point(VIT_G14, "a100-80", 128, 8, "bf16", 4096, None, 10644, "measured (table)", NEMO, "16 DGX A100 nodes; as above"),
    Point(VIT_G14, "h100-sxm", 8, 8, "bf16", 4096, None, 1428, "measured (table)", NEMO, "DGX H100; as above"),
    Point(VIT_G14, "h100-sxm", 128, 8, "bf16", 4096, None, 21561, "measured (table)", NEMO, "16 DGX H100 nodes; as above"),
    Point(VIT_B16, "a100-80", 8, 8, "fp16", 4096, 256, 3583, "measured (README)", PLSC,
          "fp16 O2, data parallel, 512 per GPU in 2 accumulation steps; A100 memory size not stated (80 GB assumed)"),
    Point(VIT_L16_21K, "a100-80", 32, 8, "fp16", 4096, 128, 5256, "measured (README)", PLSC,
          "ImageNet-21k head; 4 nodes; A100 memory size not stated (80 GB assumed)"),
    Point(MAE_VIT_L16, "v100", 64, 8, "fp16", 4096, 64, 6779, "derived: 800 epochs x 1,281,167 images / 42 h", MAE,
          "MAE pretraining, mask 0.75, 512x8 decoder; fp16 autocast (the repo's default); 8 nodes whose network is not stated "
          "(DGX-1's assumed); the 42 h include data loading and checkpoints"),
    Point(VIT_B16, "a100-80", 32, 8, "fp32", 4096, 128, 5931, "derived: 300 epochs x 1,281,167 images / 18 h", MMPRE,
          "no AMP; whether TF32 was on is not stated (predicted in strict fp32); the 18 h include validation"),
]


def predict(p: Point) -> tuple[float, str]:
    """(predicted images/s, the layout and how it was chosen)."""
    dev = devices.get_device(p.device)
    nodes = p.gpus // p.gpus_per_node
    if p.micro_batch is not None:  # the stated layout: data parallel, the stated micro-batch
        plan = analytic.Plan(Layout(tp=1, pp=1, dp=p.gpus, micro_batch=p.micro_batch, global_batch=p.global_batch), precision=p.precision)
        hw = devices.hardware(dev, p.precision, p.gpus_per_node if nodes > 1 else 0)
        how = "published"
    else:
        view = autolayout.device_view(p.precision, p.gpus, p.device, nodes=nodes, gpus_per_node=p.gpus_per_node)
        plan, _ = autolayout.choose(p.cfg, p.gpus, p.global_batch, p.precision, view)
        hw, how = view.hw, "--layout auto"
    est = analytic.estimate(p.cfg, plan, hw)
    return p.global_batch / est.step_time_s, f"{plan.layout} {plan.recompute} ({how})"


def table(points=POINTS) -> str:
    rows, errors = [], []
    for p in points:
        predicted, layout = predict(p)
        err = predicted / p.published - 1
        errors.append(err)
        rows.append(f"| {p.cfg.name} | {p.gpus} x {devices.DEVICES[p.device].label} | {p.precision} | {p.global_batch} | {layout} | "
                    f"{p.published:,.0f} ({p.how}) | {predicted:,.0f} | {100 * err:+.0f} % | {p.note} | {p.source} |")
    head = ["| model | GPUs | precision | global batch | layout predicted | published img/s | predicted img/s | error | note | source |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    absolute = sorted(abs(e) for e in errors)
    summary = (f"\n{len(errors)} points; error = predicted / published - 1: median {100 * statistics.median(errors):+.0f} %, "
               f"median absolute {100 * statistics.median(absolute):.0f} %, largest absolute {100 * absolute[-1]:.0f} %.\n")
    return "\n".join(head + rows) + "\n" + summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the table (Markdown) here")
    args = parser.parse_args(argv)
    text = table()
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Published ViT training throughputs vs the uncalibrated prediction\n\n"
                    "Written by `python -m rsscale.benchmarks.published --out reports/published_vs_predicted.md` "
                    "(benchmarks/published.py: the points, their sources and what each assumes). Predictions: the time model "
                    "at each device's datasheet rates with the stated constants (matmuls at 0.5 of peak, collectives at 2/3 of the "
                    "links, elementwise passes at the memory bandwidth); nothing is fitted to this table.\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
