"""The GPUs the check can fake: one table of device properties per GPU (standard library only).

Sources of the figures, for every row:
  - compute capability, SM count, shared memory per block (opt-in) and per SM, registers and threads
    per SM: NVIDIA's CUDA C++ Programming Guide, "Compute Capabilities" table (sm_80: 163 KB per block /
    164 KB per SM; sm_89: 99 / 100 KB; sm_90: 227 / 228 KB), and each GPU's datasheet or architecture
    whitepaper for the SM count;
  - total memory: `nvidia-smi --query-gpu=memory.total` as reported for that board (MiB). The CUDA
    context (~0.5 GiB) and allocator fragmentation come on top and are not modelled;
  - L2 size, boost clock, memory clock and bus width: the datasheets (used only by inductor's heuristics).
FP8 (float8 `torch._scaled_mm`) needs compute capability 8.9 or newer.
"""

from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True)
class GPU:
    key: str  # the --gpu name
    name: str  # what torch.cuda.get_device_name() answers
    major: int
    minor: int
    multi_processor_count: int
    total_memory: int  # bytes
    shared_memory_per_block_optin: int  # bytes a kernel may request (the limit a Triton kernel must fit)
    shared_memory_per_multiprocessor: int  # bytes
    max_threads_per_multi_processor: int
    l2_cache_size: int  # bytes
    sm_clock_khz: int  # boost clock
    mem_clock_khz: int
    mem_bus_width: int  # bits
    regs_per_multiprocessor: int = 65536
    max_threads_per_block: int = 1024
    shared_memory_per_block: int = 48 * 1024  # without opt-in
    warp_size: int = 32

    @property
    def arch(self) -> int:
        """Triton's target number, e.g. 90 for sm_90."""
        return 10 * self.major + self.minor

    @property
    def has_fp8(self) -> bool:
        return (self.major, self.minor) >= (8, 9)


GPUS = {gpu.key: gpu for gpu in [
    # H100 SXM5 80GB HBM3: 132 SMs, 50 MB L2, 1980 MHz boost, HBM3 5120-bit at 2619 MHz; nvidia-smi 81559 MiB.
    GPU("h100", "NVIDIA H100 80GB HBM3", 9, 0, 132, 81559 * MIB, 232448, 233472, 2048,
        50 * MIB, 1980000, 2619000, 5120),
    # H200 SXM 141GB HBM3e: same GH100 die (132 SMs, 50 MB L2), 6144-bit HBM3e at 3201 MHz; nvidia-smi 143771 MiB.
    GPU("h200", "NVIDIA H200", 9, 0, 132, 143771 * MIB, 232448, 233472, 2048,
        50 * MIB, 1980000, 3201000, 6144),
    # A100 SXM4 80GB: 108 SMs, 40 MB L2, 1410 MHz boost, HBM2e 5120-bit at 1593 MHz; nvidia-smi 81920 MiB.
    GPU("a100-80gb", "NVIDIA A100-SXM4-80GB", 8, 0, 108, 81920 * MIB, 166912, 167936, 2048,
        40 * MIB, 1410000, 1593000, 5120),
    # A100 SXM4 40GB: as above with HBM2 at 1215 MHz; nvidia-smi 40960 MiB.
    GPU("a100-40gb", "NVIDIA A100-SXM4-40GB", 8, 0, 108, 40960 * MIB, 166912, 167936, 2048,
        40 * MIB, 1410000, 1215000, 5120),
    # L40S: AD102, 142 SMs, 96 MB L2, 2520 MHz boost, GDDR6 384-bit at 9001 MHz; 48 GB, nvidia-smi 46068 MiB.
    GPU("l40s", "NVIDIA L40S", 8, 9, 142, 46068 * MIB, 101376, 102400, 1536,
        96 * MIB, 2520000, 9001000, 384),
    # GeForce RTX 4090: AD102, 128 SMs, 72 MB L2, 2520 MHz boost, GDDR6X 384-bit at 10501 MHz; nvidia-smi 24564 MiB.
    GPU("rtx4090", "NVIDIA GeForce RTX 4090", 8, 9, 128, 24564 * MIB, 101376, 102400, 1536,
        72 * MIB, 2520000, 10501000, 384),
]}
DEFAULT_GPU = "h100"
