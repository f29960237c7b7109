"""Counts host-device synchronisations and host-to-device copies with a TorchDispatchMode.

Works on any tensors whose device type is `device_type` (FakeTensors on a fake "cuda" in the check,
"meta" or fake tensors in the unit tests), so nothing needs a GPU:
  - sync: `aten._local_scalar_dense` (`.item()`, `float(t)`, `if t:`), data-dependent ops such as
    `nonzero`, and blocking device-to-host copies: the host waits for the device's queue to drain;
  - h2d: a copy from host memory to the device (`new_tensor(0.5)`, `torch.tensor(x, device=...)`,
    `.to(device)`): a small transfer launched by the host, which waits unless the source is pinned.
Each event keeps the source line that caused it: the innermost frame outside torch and this tool.
Custom ops (torch.library.custom_op) are run through their Python implementation, so the syncs and
copies inside them are seen too (FakeTensorMode would otherwise answer them with their fake kernel).
"""

import contextlib
import linecache
import os
import sys
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .fake_cuda import custom_op_function

aten = torch.ops.aten
SCALAR_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default}
COPIES = {aten._to_copy.default, aten.copy_.default}
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm"}  # eager calls and compiled code's .out
ALL_REDUCE = "c10d::allreduce"
_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Event:
    kind: str  # "sync" or "h2d"
    op: str  # e.g. "aten::_local_scalar_dense"
    where: str  # "file.py:123 in function"
    code: str  # that source line


def _caller() -> tuple[str, str]:
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not (filename.startswith(_TORCH_DIR) or filename.startswith(_THIS_DIR) or filename.startswith("<")
                or "/contextlib.py" in filename):
            line = linecache.getline(filename, frame.f_lineno).strip()
            return f"{os.path.basename(filename)}:{frame.f_lineno} in {frame.f_code.co_name}", line
        frame = frame.f_back
    return "unknown", ""


def _placeholder_scalar(tensor: torch.Tensor):
    if tensor.dtype.is_floating_point:
        return 0.0
    return False if tensor.dtype == torch.bool else 0


class HostSyncCounter(TorchDispatchMode):
    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True  # torch.compile'd code then runs compiled, and this mode sees what its runtime dispatches

    def __init__(self, device_type: str = "cuda"):
        super().__init__()
        self.device_type = device_type
        self.events: list[Event] = []
        self.op_counts: dict[str, int] = {}  # every op seen, e.g. "aten::mm" -> 12 (paused or not)
        self.order: list[str] = []  # matmuls, all-reduces and marks, in the order the host issued them
        self.paused = False

    def mark(self, label: str):
        self.order.append(label)

    def communication_overlap(self, last_micro_step: str, backward_done: str) -> dict:
        """Between the marks: gradient all-reduces launched, and the matmuls the host queued after the first
        of them. Launches are asynchronous, so those matmuls can run while the all-reduce is in flight; with
        the model as one compiled graph, every all-reduce is launched after the last backward matmul."""
        if last_micro_step not in self.order or backward_done not in self.order:
            return {}
        window = self.order[self.order.index(last_micro_step) + 1:self.order.index(backward_done)]
        reductions = [i for i, name in enumerate(window) if name.startswith(ALL_REDUCE)]
        matmuls = [i for i, name in enumerate(window) if name.split(".")[0] in MATMULS]
        return dict(all_reduces=len(reductions), matmuls=len(matmuls),
                    matmuls_after_first_all_reduce=sum(i > reductions[0] for i in matmuls) if reductions else 0)

    @contextlib.contextmanager
    def pause(self):
        """Stops counting inside the block (used around data loading)."""
        previous, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = previous

    def _on_device(self, value) -> bool:
        return isinstance(value, torch.Tensor) and value.device.type == self.device_type

    def _record(self, kind: str, func):
        if not self.paused:
            where, code = _caller()
            self.events.append(Event(kind, func.name(), where, code))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "aten" and func._can_decompose():
            # e.g. aten.to.dtype_layout, seen when a custom op's Python code runs under this mode:
            # decompose, so that copies arrive as aten._to_copy (which FakeTensorMode keeps off the device)
            with self:
                return func.decompose(*args, **kwargs)
        self.op_counts[func.name()] = self.op_counts.get(func.name(), 0) + 1
        if func.name().split(".")[0] in MATMULS or func.name().startswith(ALL_REDUCE):
            self.order.append(func.name())
        if func in SCALAR_READS and self._on_device(args[0]):
            self._record("sync", func)
            # FakeTensors have no value to read: answer a placeholder so the traced code goes on.
            return True if func is not aten._local_scalar_dense.default else _placeholder_scalar(args[0])
        if func in DATA_DEPENDENT and self._on_device(args[0]):
            self._record("sync", func)
        elif func in COPIES:
            source = args[1] if func is aten.copy_.default else args[0]
            target_device = args[0].device if func is aten.copy_.default else kwargs.get("device", source.device)
            target_type = torch.device(target_device).type
            if source.device.type == "cpu" and target_type == self.device_type:
                self._record("h2d", func)
            elif source.device.type == self.device_type and target_type == "cpu" and not kwargs.get("non_blocking"):
                self._record("sync", func)
        if func is aten.lift_fresh.default:  # torch.tensor / new_tensor data on the host
            tensor = func(*args, **kwargs)
            if getattr(tensor, "constant", None) is not None:
                tensor.constant = None  # so FakeTensorMode never replays its copy on the (absent) device
            return tensor
        implementation = custom_op_function(func)
        if implementation is not None:
            with self:  # see the ops inside the custom op's own code
                return implementation(*args, **kwargs)
        return func(*args, **kwargs)

    def summary(self) -> list[dict]:
        """One row per (kind, op, source line) with its count, in order of first occurrence."""
        rows: dict[Event, int] = {}
        for event in self.events:
            rows[event] = rows.get(event, 0) + 1
        return [dict(kind=e.kind, op=e.op, where=e.where, code=e.code, count=n) for e, n in rows.items()]

    def clear(self):
        self.events.clear()
        self.op_counts.clear()
        self.order.clear()

    def count(self, kind: str) -> int:
        return sum(event.kind == kind for event in self.events)
