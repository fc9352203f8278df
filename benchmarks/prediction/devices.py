"""Named devices for the profiler (`rsscale profile --device NAME`): the public datasheet numbers
of each accelerator, and the uncalibrated model's two efficiency constants that turn them into
`analytic.Hardware` (whose rates benchmarks/prediction/timemodel.py `datasheet_calibration` gives the time model).

Per device: dense (no sparsity) peak TFLOP/s per precision, memory (GB as the datasheet states it,
used as GiB like --memory-gb), memory bandwidth, the per-direction GPU-to-GPU bandwidth inside a
node (NVLink, or PCIe where a card has no NVLink switch) and the network bandwidth per GPU between
nodes (one NIC per GPU in the vendor's reference system). fp32 means plain FP32 (the trainer turns
TF32 off: scaling/parallel/state.py `exact_fp32_math`); tf32 and fp8 are listed for reference.

Uncalibrated constants (stated, overridable on the command line; a calibration stored by
`rsscale calibrate` on the same device is used instead of them):
  MATMUL_EFFICIENCY 0.5   fraction of peak a large matmul reaches (--efficiency)
  COMM_EFFICIENCY   2/3   fraction of the link bandwidth a ring collective reaches (--comm-efficiency);
                          H100 SXM: 450 GB/s NVLink per direction -> 300 GB/s, the profiler's default
Elementwise passes run at the datasheet memory bandwidth as it stands (no efficiency constant).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rsscale.benchmarks.prediction import analytic

MATMUL_EFFICIENCY = analytic.Hardware.efficiency  # 0.5
COMM_EFFICIENCY = 2 / 3


@dataclass(frozen=True)
class Device:
    name: str
    label: str
    tflops: dict  # precision -> dense peak TFLOP/s per device
    memory_gb: float
    hbm_gbs: float  # memory bandwidth, GB/s
    intra_gbs: float  # GPU-to-GPU inside a node, GB/s per direction
    inter_gbs: float  # network per GPU between nodes, GB/s per direction
    source: str


DEVICES = {d.name: d for d in [
    # NVIDIA Tesla V100 datasheet (SXM2): FP32 15.7, Tensor (FP16) 125 TFLOP/s; no BF16, no TF32;
    # 32GB HBM2 900 GB/s; NVLink 300 GB/s (both directions). DGX-1: 4 x 100 Gb/s EDR InfiniBand per 8 GPUs.
    # https://www.nvidia.com/en-us/data-center/v100/
    Device("v100", "V100 SXM2 32GB", {"fp32": 15.7, "fp16": 125}, 32, 900, 150, 6.25,
           "NVIDIA V100 datasheet; DGX-1 (4 x EDR 100 Gb/s per 8 GPUs)"),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4): FP32 19.5, TF32 156, BF16/FP16 312 TFLOP/s dense;
    # 40GB HBM2 1,555 GB/s, 80GB HBM2e 2,039 GB/s; NVLink 600 GB/s (both directions).
    # DGX A100: one 200 Gb/s HDR InfiniBand port per GPU.
    # https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
    Device("a100-40", "A100 SXM4 40GB", {"fp32": 19.5, "tf32": 156, "bf16": 312, "fp16": 312}, 40, 1555, 300, 25,
           "NVIDIA A100 datasheet; DGX A100 (HDR 200 Gb/s per GPU)"),
    Device("a100-80", "A100 SXM4 80GB", {"fp32": 19.5, "tf32": 156, "bf16": 312, "fp16": 312}, 80, 2039, 300, 25,
           "NVIDIA A100 datasheet; DGX A100 (HDR 200 Gb/s per GPU)"),
    # NVIDIA H100 Tensor Core GPU datasheet: SXM FP32 67, TF32 494.7, BF16/FP16 989.4, FP8 1,978.9 TFLOP/s
    # dense; 80GB HBM3 3.35 TB/s; NVLink 900 GB/s. PCIe: FP32 51, TF32 378, BF16/FP16 756.5, FP8 1,513;
    # 80GB HBM2e 2 TB/s; PCIe Gen5 128 GB/s (both directions). DGX H100: one 400 Gb/s NDR port per GPU.
    # https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
    Device("h100-sxm", "H100 SXM5 80GB", {"fp32": 67, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}, 80, 3350, 450, 50,
           "NVIDIA H100 datasheet; DGX H100 (NDR 400 Gb/s per GPU)"),
    Device("h100-pcie", "H100 PCIe 80GB", {"fp32": 51, "tf32": 378, "bf16": 756.5, "fp16": 756.5, "fp8": 1513}, 80, 2000, 64, 50,
           "NVIDIA H100 datasheet (PCIe Gen5 x16 between cards; NDR 400 Gb/s per GPU)"),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): compute as H100 SXM; 141GB HBM3e 4.8 TB/s; NVLink 900 GB/s.
    # https://www.nvidia.com/en-us/data-center/h200/
    Device("h200", "H200 SXM 141GB", {"fp32": 67, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}, 141, 4800, 450, 50,
           "NVIDIA H200 datasheet; HGX H200 (NDR 400 Gb/s per GPU)"),
    # NVIDIA HGX B200 (per GPU, 1,000 W): FP32 80, TF32 1,100, BF16/FP16 2,250, FP8 4,500 TFLOP/s dense;
    # 180GB HBM3e about 7.7 TB/s (1.44 TB and 62 TB/s per 8-GPU board); NVLink 5 1.8 TB/s (both directions).
    # DGX B200: one 400 Gb/s ConnectX-7 port per GPU. https://www.nvidia.com/en-us/data-center/hgx/
    Device("b200", "B200 (HGX) 180GB", {"fp32": 80, "tf32": 1100, "bf16": 2250, "fp16": 2250, "fp8": 4500}, 180, 7700, 900, 50,
           "NVIDIA HGX B200 specifications; DGX B200 (400 Gb/s per GPU)"),
]}
NAMES = tuple(DEVICES) + ("cpu",)


def matmul_peak_tflops(device, precision: str) -> float:
    """Dense matmul TFLOP/s of this device in the training dtype, measured (a stand-in for the datasheet)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    n = 8192 if device.type == "cuda" else 512
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def cpu_device() -> Device:
    """This machine's CPU: the fp32 matmul peak measured here (all precisions alike), its RAM, and
    a nominal 10 GB/s for its memory and for gloo collectives in shared memory (no datasheet:
    calibrate for better)."""
    import os

    import torch

    peak = matmul_peak_tflops(torch.device("cpu"), "fp32")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return Device("cpu", "this CPU", {p: peak for p in ("fp32", "tf32", "bf16", "fp16")}, round(memory, 1), 10, 10, 10,
                  "matmul measured here; RAM from the OS")


def get_device(name: str) -> Device:
    if name == "cpu":
        return cpu_device()
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of: {', '.join(NAMES)}")
    return DEVICES[name]


def hardware(device: Device, precision: str, gpus_per_node: int = 0) -> analytic.Hardware:
    """The uncalibrated model's view of `device`, with the stated constants; with `gpus_per_node`
    collectives spanning more ranks than a node run at the inter-node bandwidth."""
    return analytic.Hardware(peak_flops=peak_tflops(device, precision) * 1e12, efficiency=MATMUL_EFFICIENCY,
                             bandwidth=device.intra_gbs * COMM_EFFICIENCY * 1e9, gpus_per_node=gpus_per_node,
                             inter_bandwidth=device.inter_gbs * COMM_EFFICIENCY * 1e9 if gpus_per_node else 0.0,
                             hbm_bytes_per_s=device.hbm_gbs * 1e9)


def peak_tflops(device: Device, precision: str) -> float:
    if precision not in device.tflops:
        raise ValueError(f"{device.label} has no {precision} peak in its datasheet table ({', '.join(device.tflops)})")
    return device.tflops[precision]


def is_this_machine(device: Device, machine: str) -> bool:
    """Whether this machine's device name (torch's, e.g. "NVIDIA H100 80GB HBM3") is `device`: only
    then does a calibration stored here describe it."""
    if device.name == "cpu":
        return not machine.upper().startswith("NVIDIA")
    m = machine.upper()
    family = device.label.split()[0].upper()  # A100, H100, H200, B200
    pcie = "PCIE" in m
    return family in m and (pcie == ("PCIe" in device.label)) and (device.name != "a100-40" or "40GB" in m) \
        and (device.name != "a100-80" or "80GB" in m)
