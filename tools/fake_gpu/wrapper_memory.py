"""The allocation plan of one inductor-generated wrapper, replayed from its source (standard library only).

Inside `def call(args)`: `bufN = empty_strided_cuda((sizes), (strides), torch.dtype)` allocates,
`del bufN` frees, `bufM = bufN; del bufN  # reuse` (or a reinterpret_tensor view of bufN, then
`del bufN`) hands the buffer on without allocating, and other views allocate nothing. The peak is that of the buffers the wrapper itself
allocates; tensors that extern kernels (cuBLAS, custom ops) return are not in these lines, and the
inputs (parameters, saved activations) are not counted. The whole-step figure of the check comes
from running the code on FakeTensors under MemTracker; this per-graph replay explains it.
"""

import re
from dataclasses import dataclass

ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "int64": 8, "int32": 4, "int16": 2,
            "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "complex64": 8}
ALLOCATION = re.compile(r"^\s*(\w+) = empty_strided_cuda\(\(([^)]*)\), \(([^)]*)\), torch\.(\w+)\)")
ALIAS = re.compile(r"^\s*(\w+) = (?:reinterpret_tensor\()?(\w+)\b[^;]*; del \2\b")  # reuse, or a view of the last name
DELETE = re.compile(r"\bdel ([\w, ]+)")


@dataclass
class AllocationPlan:
    peak_bytes: int
    peak_line: str  # the allocation that reached the peak
    live_at_return_bytes: int  # allocated here and still alive when call() returns (outputs)
    allocations: int
    symbolic_allocations: int = 0  # allocations with symbolic sizes, left out of the figures


def buffer_bytes(sizes: list[int], strides: list[int], dtype: str) -> int:
    if any(size == 0 for size in sizes):
        return 0
    span = 1 + sum((size - 1) * stride for size, stride in zip(sizes, strides))
    return span * ITEMSIZE[dtype]


def _ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def replay(source: str) -> AllocationPlan:
    start = source.find("def call(")
    if start < 0:
        raise ValueError("not an inductor wrapper: no `def call(` in the source")
    live: dict[str, int] = {}
    current = peak = allocations = symbolic = 0
    peak_line = ""
    for line in source[start:].splitlines():
        allocation = ALLOCATION.match(line)
        if allocation:
            name, sizes, strides, dtype = allocation.groups()
            try:
                size = buffer_bytes(_ints(sizes), _ints(strides), dtype)
            except ValueError:  # a symbolic size (a graph compiled with dynamic shapes): not replayable
                symbolic += 1
                continue
            current += size - live.pop(name, 0)
            live[name] = size
            allocations += 1
            if current > peak:
                peak, peak_line = current, line.strip()
            continue
        alias = ALIAS.match(line)
        if alias:
            new, old = alias.groups()
            if old in live:
                live[new] = live.pop(old)
            continue
        for names in DELETE.findall(line.split("#")[0]):
            for name in names.split(","):
                current -= live.pop(name.strip(), 0)
        if line.lstrip().startswith("return "):
            break
    return AllocationPlan(peak, peak_line, current, allocations, symbolic)
