"""Predicted peak memory of compiled code on FakeTensors, and what is live at that peak.

MemTracker (torch.distributed._tools) sums the bytes of live tensor storages per category (parameters,
gradients, optimizer state, activations, temporaries). PeakMemTracker lets torch.compile'd code run
compiled under it (its generated wrappers allocate through the dispatcher on a fake GPU), tolerates the
eager model being called once per micro-step, and keeps, at the largest total, every live storage of
64 MiB or more with the source line that allocated it: the user's line (train_gpt.py) and whether the
allocation came from compiled code called there.
"""

import os
import sys

import torch
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker
from torch.utils.weak import WeakIdKeyDictionary

LARGE_BYTES = 64 * 2**20
_TORCH_DIR = os.path.dirname(torch.__file__)
_TOOLS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inductor_cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    return os.path.realpath(cache_dir())


def allocation_site(inductor_cache: str) -> str:
    """'train_gpt.py:468 in fp8_matmul_backward_op' for the innermost user frame, with ' (compiled code)'
    when a generated wrapper (a file in inductor's cache) allocated it."""
    frame, compiled = sys._getframe(1), False
    while frame is not None:
        filename = os.path.realpath(frame.f_code.co_filename)
        if filename.startswith(inductor_cache):
            compiled = True
        elif not (filename.startswith(_TORCH_DIR) or filename.startswith(_TOOLS_DIR) or filename.startswith("<")
                  or "/contextlib.py" in filename or "/site-packages/" in filename):
            site = f"{os.path.basename(filename)}:{frame.f_lineno} in {frame.f_code.co_name}"
            return site + (" (compiled code)" if compiled else "")
        frame = frame.f_back
    return "unknown"


class PeakMemTracker(MemTracker):
    def __init__(self, device_type: str = "cuda"):
        super().__init__()
        self.device_type = device_type
        self._allocated_at = WeakIdKeyDictionary()  # storage -> "op at site"
        self._current = ""
        self._inductor_cache = _inductor_cache_dir()
        self.largest_total = 0
        self.live_at_peak: list[tuple[int, str, str]] = []  # (bytes, category, "op at site")

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True  # let compiled code run compiled: its runtime allocations are then tracked

    def _pre_fw_hook(self, module, inputs):
        try:
            super()._pre_fw_hook(module, inputs)
        except NotImplementedError:
            # The eager root module (the model, whose regions are compiled) runs again in the next
            # micro-step, which MemTracker takes for a new iteration and refuses. The check needs the
            # step's device totals, not per-module statistics: start the module's statistics afresh.
            del self.memory_tracking[module]
            super()._pre_fw_hook(module, inputs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._current = f"{func.name()} at {allocation_site(self._inductor_cache)}"
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _track(self, reftype, tensor):
        from torch.distributed._tools.common_utils import get_untyped_storages
        for storage in get_untyped_storages(tensor):
            if storage not in self._WINFO:
                self._allocated_at[storage] = self._current
        super()._track(reftype, tensor)

    def _update_peak_stats(self, peak_state):
        super()._update_peak_stats(peak_state)
        for device, snapshot in self._curr_mem_snap.items():
            if torch.device(device).type == self.device_type and snapshot[_TOTAL_KEY] > self.largest_total:
                self.largest_total = snapshot[_TOTAL_KEY]
                self.live_at_peak = [(winfo.mem_consumed, winfo.reftype.value, self._allocated_at.get(storage, ""))
                                     for storage, (winfo, _) in self._WINFO.items()
                                     if winfo.device == device and winfo.mem_consumed >= LARGE_BYTES]

    def largest_at_peak(self, rows: int = 10) -> list[dict]:
        """The live storages of >= 64 MiB at the peak, grouped by (size, category, allocation), largest first."""
        groups: dict[tuple[int, str, str], int] = {}
        for size, category, where in self.live_at_peak:
            groups[(size, category, where)] = groups.get((size, category, where), 0) + 1
        ordered = sorted(groups.items(), key=lambda item: -item[0][0] * item[1])
        return [dict(bytes=size, count=count, category=category, allocated=where or "-")
                for (size, category, where), count in ordered[:rows]]
