"""Compiles the recorded Triton kernels offline for the fake GPU's architecture and reads their resources.

Triton's bundled ptxas turns each kernel (every autotuning config of it) into a cubin for sm_XY; its
bundled cuobjdump reports registers, stack (> 0: registers spilled) and static shared memory, and
Triton's metadata the dynamic shared memory. A kernel is fatal when it does not compile, or when none
of its configs fits the GPU's shared memory per block (a config that does not fit is dropped at load
time, as long as another one fits). Parsing is standard library only, so it is unit-tested on any machine.
"""

import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field

FUNCTION = re.compile(r"^\s*Function (\S+?):?\s*$")
RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclass(frozen=True)
class Resources:
    registers: int
    stack: int  # bytes of stack frame per thread; > 0 means spilled registers
    static_shared: int  # bytes
    local: int


def parse_res_usage(text: str) -> dict[str, Resources]:
    """cuobjdump -res-usage output -> {function name: resources}."""
    found, function = {}, None
    for line in text.splitlines():
        header = FUNCTION.match(line)
        if header:
            function = header.group(1)
            continue
        usage = RESOURCES.search(line)
        if usage and function is not None:
            found[function] = Resources(*(int(value) for value in usage.groups()))
            function = None
    return found


@dataclass
class ConfigResult:
    shared: int  # dynamic (Triton) + static shared memory, bytes
    registers: int
    stack: int
    num_warps: int
    num_stages: int


@dataclass
class KernelResult:
    name: str
    ok: bool
    error: str = ""
    configs: list[ConfigResult] = field(default_factory=list)

    def fitting(self, shared_limit: int) -> list[ConfigResult]:
        return [config for config in self.configs if config.shared <= shared_limit]

    def to_json(self) -> dict:
        return asdict(self)


def judge(results: list[KernelResult], shared_limit: int) -> dict:
    """Summary and fatal findings for a list of compiled kernels."""
    fatal, notes = [], []
    for result in results:
        if not result.ok:
            fatal.append(f"kernel {result.name} failed to compile: {result.error}")
        elif not result.fitting(shared_limit):
            needed = min(config.shared for config in result.configs)
            fatal.append(f"kernel {result.name} needs {needed} B of shared memory per block; the GPU has {shared_limit} B")
        elif len(result.fitting(shared_limit)) < len(result.configs):
            notes.append(f"kernel {result.name}: {len(result.configs) - len(result.fitting(shared_limit))} of "
                         f"{len(result.configs)} autotuning configs exceed shared memory and would be dropped")
    usable = [config for result in results if result.ok for config in result.fitting(shared_limit)]
    spills = sorted({result.name for result in results if result.ok
                     for config in result.fitting(shared_limit) if config.stack > 0})
    return dict(
        kernels=len(results), compiled=sum(result.ok for result in results),
        max_shared=max((config.shared for config in usable), default=0),
        max_registers=max((config.registers for config in usable), default=0),
        kernels_with_stack=spills, fatal=fatal, notes=notes)


def compile_kernel(name: str, source: str, cuobjdump: str) -> KernelResult:
    """Needs the CUDA torch build and the fake driver installed (fake_cuda.install)."""
    from torch._inductor.async_compile import _load_triton_kernel_from_source
    try:
        kernel = _load_triton_kernel_from_source(name, source)
        kernel.precompile(warm_cache_only=True)
        configs = []
        for compiled in kernel.compile_results:
            binary = compiled.kernel
            with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
                file.write(binary.asm["cubin"])
            try:
                usage = subprocess.run([cuobjdump, "-res-usage", file.name], capture_output=True, text=True,
                                       check=True).stdout
            finally:
                os.unlink(file.name)
            resources = parse_res_usage(usage)
            if not resources:
                raise RuntimeError(f"cuobjdump reported no function for {name}")
            own = resources.get(binary.metadata.name) or next(iter(resources.values()))
            configs.append(ConfigResult(binary.metadata.shared + own.static_shared, own.registers, own.stack,
                                        binary.metadata.num_warps, binary.metadata.num_stages))
        return KernelResult(name, True, configs=configs)
    except Exception as error:  # any failure of ptxas/Triton for this kernel is a finding, not a crash
        message = " ".join(str(error).split())[:300]
        return KernelResult(name, False, error=f"{type(error).__name__}: {message}")
