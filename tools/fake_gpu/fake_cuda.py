"""Presents a fake GPU to torch, inductor and Triton on a machine without a GPU or a driver.

Needs the CUDA build of the torch the Dockerfile pins, its Triton, and the two stub libraries (stubs/)
preloaded: libcudart_shim.so answers the CUDA runtime calls of C++ device guards, and libcuda.so.1
the driver's primary-context query. Each patch below fixed one failure on the way; they hold for the
pinned torch (2.11) and are checked by the tool's end-to-end run, not by the CPU unit tests.

After install(gpu), code compiled by torch.compile for "cuda" runs on FakeTensors: allocations in the
generated wrappers create FakeTensors, Triton kernel launches are recorded and skipped, and extern
calls (cuBLAS) run their fake implementations, custom ops their Python code. Nothing executes on a device.
"""

import types

import torch
import torch._subclasses.fake_tensor

from .gpus import GPU

TRITON_KERNELS: dict[str, str] = {}  # kernel name -> Triton source, as inductor generated it
LAUNCHES: dict[str, int] = {}  # kernel name -> launches while the fake ran the generated code
UNPADDED_MATMULS: list[str] = []  # matmuls whose padding inductor would decide by benchmarking on the GPU


class _RecordedKernel:
    """Stands for a compiled Triton kernel in the generated wrapper: counts launches, runs nothing."""

    def __init__(self, name: str):
        self.name = name

    def run(self, *args, **kwargs):
        LAUNCHES[self.name] = LAUNCHES.get(self.name, 0) + 1

    def __getattr__(self, attribute):
        return lambda *args, **kwargs: None


def _device_properties(gpu: GPU):
    return types.SimpleNamespace(
        name=gpu.name, major=gpu.major, minor=gpu.minor, multi_processor_count=gpu.multi_processor_count,
        total_memory=gpu.total_memory, max_threads_per_multi_processor=gpu.max_threads_per_multi_processor,
        regs_per_multiprocessor=gpu.regs_per_multiprocessor, max_threads_per_block=gpu.max_threads_per_block,
        warp_size=gpu.warp_size, shared_memory_per_block_optin=gpu.shared_memory_per_block_optin,
        shared_memory_per_block=gpu.shared_memory_per_block,
        shared_memory_per_multiprocessor=gpu.shared_memory_per_multiprocessor, L2_cache_size=gpu.l2_cache_size,
        gcnArchName="", is_integrated=False, uuid="fake-gpu", pci_bus_id=0, pci_device_id=0, pci_domain_id=0)


def _fake_torch_cuda(gpu: GPU, props):
    tc = torch.cuda
    tc.is_available = lambda: True
    tc.device_count = lambda: 1
    tc.current_device = lambda: 0
    tc.set_device = lambda device: None
    tc._lazy_init = lambda: None
    tc._initialized = True
    tc.get_device_capability = lambda device=None: (gpu.major, gpu.minor)
    tc.get_device_properties = lambda device=None: props
    tc.get_device_name = lambda device=None: gpu.name
    tc.is_bf16_supported = lambda *args, **kwargs: True
    tc.synchronize = lambda *args, **kwargs: None
    tc._exchange_device = lambda device: 0
    tc._maybe_exchange_device = lambda device: 0
    tc.get_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    tc.set_rng_state = lambda *args, **kwargs: None
    tc.manual_seed = tc.manual_seed_all = lambda seed: None
    tc.mem_get_info = lambda device=None: (gpu.total_memory, gpu.total_memory)
    tc.is_current_stream_capturing = lambda: False  # optimizers ask before stepping
    torch.cuda.graphs.is_current_stream_capturing = tc.is_current_stream_capturing
    import torch.cuda.random as cuda_random
    cuda_random.current_device = lambda: 0
    torch._C._cuda_getCurrentRawStream = lambda device: 0
    torch._C._cuda_getDevice = lambda: 0
    torch._C._cuda_getDeviceCount = lambda: 1
    # torch.accelerator would track real streams: report none, inductor asks torch.cuda directly.
    torch.accelerator.is_available = lambda: False
    torch.accelerator.current_device_index = lambda: 0

    from torch._dynamo import device_interface
    interface = device_interface.CudaInterface
    interface.current_device = staticmethod(lambda: 0)
    interface.device_count = staticmethod(lambda: 1)
    interface.get_device_properties = staticmethod(lambda device=None: props)
    interface.is_available = staticmethod(lambda: True)
    interface.get_compute_capability = staticmethod(lambda device=None: gpu.arch)
    interface.synchronize = staticmethod(lambda *args: None)
    interface.get_raw_stream = staticmethod(lambda device: 0)
    interface.exchange_device = staticmethod(lambda device: 0)
    interface.maybe_exchange_device = staticmethod(lambda device: 0)

    import torch._subclasses.fake_tensor as fake_tensor
    fake_tensor.init_gpu_context = lambda device: None


def _fake_triton_driver(gpu: GPU):
    import triton
    from triton.backends.compiler import GPUTarget

    class FakeDriver:
        backend = "cuda"

        class utils:
            @staticmethod
            def get_device_properties(device):
                return {"max_shared_mem": gpu.shared_memory_per_block_optin,
                        "multiprocessor_count": gpu.multi_processor_count,
                        "max_num_regs": gpu.regs_per_multiprocessor, "warpSize": gpu.warp_size,
                        "sm_clock_rate": gpu.sm_clock_khz, "mem_clock_rate": gpu.mem_clock_khz,
                        "mem_bus_width": gpu.mem_bus_width}

        def get_current_target(self):
            return GPUTarget("cuda", gpu.arch, gpu.warp_size)

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_device_interface(self):
            return torch.cuda

        def get_benchmarker(self):
            raise RuntimeError("no benchmarking without a GPU")

        def get_empty_cache_for_benchmark(self):
            raise RuntimeError("no benchmarking without a GPU")

        @staticmethod
        def is_active():
            return True

    triton.runtime.driver.set_active(FakeDriver())
    import torch._inductor.runtime.triton_helpers as triton_helpers
    triton_helpers.set_driver_to_gpu = lambda: None  # would reinstall the real driver


def _record_kernels_instead_of_loading():
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor import async_compile

    inductor_config.compile_threads = 1
    inductor_config.joint_graph_constant_folding = False  # would execute aten.full on the device
    inductor_config.use_static_triton_launcher = False
    inductor_config.fx_graph_cache = False  # codegen must run (and be recorded) on every check
    inductor_config.fx_graph_remote_cache = False
    functorch_config.enable_autograd_cache = False
    functorch_config.force_non_lazy_backward_lowering = True  # generate the backward with the forward

    def record_triton(self, kernel_name, source_code, device_str="cuda"):
        TRITON_KERNELS[kernel_name] = source_code
        return _RecordedKernel(kernel_name)

    async_compile.AsyncCompile.triton = record_triton
    async_compile.AsyncCompile.wait = lambda self, scope: None

    # A compute-bound matmul with unaligned sizes (record 89's) is padded or not by timing both on the GPU:
    # without one, it is not padded (inductor's answer when padding does not pay), and the check notes it.
    import torch._inductor.fx_passes.pad_mm as pad_mm_pass
    cached_should_pad = pad_mm_pass.get_cached_should_pad

    def should_pad_without_benchmark(key):
        cached = cached_should_pad(key)
        if cached is None:
            UNPADDED_MATMULS.append(str(key))
            return False
        return cached

    pad_mm_pass.get_cached_should_pad = should_pad_without_benchmark

    # Pattern-matcher initialisation builds example tensors on the input's device: build them on CPU.
    import torch._inductor.fx_passes.fuse_attention as fuse_attention
    import torch._inductor.fx_passes.misc_patterns as misc_patterns
    import torch._inductor.fx_passes.pad_mm as pad_mm
    for module, name in ((fuse_attention, "_sfdp_init"), (misc_patterns, "_misc_patterns_init"),
                         (pad_mm, "_pad_mm_init")):
        original = getattr(module, name)
        setattr(module, name, (lambda init: (lambda device=None: init(torch.device("cpu"))))(original))


def _run_generated_code_on_fake_tensors():
    """The generated wrappers allocate with C++ helpers that bypass the dispatcher (and would need a
    device): route them through ordinary torch calls, which the active FakeTensorMode answers."""
    guards = torch._C._dynamo.guards
    guards._empty_strided_cuda = lambda size, stride, dtype: torch.empty_strided(
        size, stride, dtype=dtype, device="cuda")
    guards._reinterpret_tensor = lambda tensor, size, stride, offset=0: torch.as_strided(
        tensor, size, stride, tensor.storage_offset() + offset)


def _host_data_through_the_dispatcher():
    """Pinned host memory needs the driver; for fake copies ordinary memory behaves the same. And
    torch.tensor(data, device="cuda") / t.new_tensor(data) build the tensor on the host and copy it
    in C++, which in autograd's device thread bypasses FakeTensorMode: build on the host and copy with
    .to() instead, the same host-to-device copy, made visible to the dispatch modes."""
    # `with torch.device(...)` (record 89's build_model) sets the device of the factories it lists, by identity,
    # in a set made at its first use: make it now, with torch's own factories, which the wrappers below call.
    import torch.utils._device
    torch.utils._device._device_constructors()
    make_tensor = torch.tensor

    def tensor(data, *, dtype=None, device=None, requires_grad=False, pin_memory=False):
        host = make_tensor(data, dtype=dtype)
        on_device = host if device is None or torch.device(device).type == "cpu" else host.to(device)
        return on_device.requires_grad_(requires_grad) if requires_grad else on_device

    def new_tensor(self, data, *, dtype=None, device=None, requires_grad=False, layout=None, pin_memory=False):
        return tensor(data, dtype=dtype or self.dtype, device=device or self.device, requires_grad=requires_grad)

    torch.tensor = tensor
    torch.Tensor.new_tensor = new_tensor
    for name in ("empty", "zeros", "ones"):
        factory = getattr(torch, name)
        setattr(torch, name, (lambda make: lambda *args, pin_memory=False, **kwargs: make(*args, **kwargs))(factory))
    torch.Tensor.pin_memory = lambda self, device=None: self
    torch.Tensor.is_pinned = lambda self, device=None: self.device.type == "cpu"


class FakeGPUMode(torch._subclasses.fake_tensor.FakeTensorMode):
    """FakeTensorMode that never evaluates a small constant on the (absent) device: FakeTensorMode
    would run `torch.tensor(3).to("cuda")` for real because torch.cuda.is_available() says True.

    With run_custom_ops, a custom op (torch.library.custom_op) called at run time runs its Python code,
    as on a GPU, instead of its fake kernel: torch.compile'd functions inside it (train_gpt's FP8 bodies)
    then compile here, and the step's memory and kernels include theirs."""

    def __init__(self, *args, run_custom_ops: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_custom_ops = run_custom_ops

    @property
    def avoid_device_init(self) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        implementation = custom_op_function(func) if self.run_custom_ops else None
        if implementation is not None:
            with self:
                return implementation(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


def custom_op_function(func):
    """The Python implementation of a torch.library.custom_op, or None for other ops."""
    from torch._library.custom_ops import _maybe_get_opdef
    if not isinstance(func, torch._ops.OpOverload) or func.namespace in ("aten", "prim", "prims"):
        return None
    opdef = _maybe_get_opdef(func)
    return None if opdef is None else opdef._init_fn


_ATEN_META = torch.library.Library("aten", "IMPL")  # kept alive: the registration lasts as long as it does


def _scaled_mm_out_on_fake_tensors():
    """Compiled code calls `_scaled_mm(..., out=buffer)`; torch registers a meta kernel only for the
    functional form. The buffer already has the result's shape, so the meta kernel just returns it."""
    def scaled_mm_out_meta(self, mat2, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None,
                           use_fast_accum=False, *, out):
        return out

    _ATEN_META.impl("_scaled_mm.out", scaled_mm_out_meta, "Meta")


def install(gpu: GPU):
    props = _device_properties(gpu)
    _fake_torch_cuda(gpu, props)
    _fake_triton_driver(gpu)
    _record_kernels_instead_of_loading()
    _run_generated_code_on_fake_tensors()
    _host_data_through_the_dispatcher()
    _scaled_mm_out_on_fake_tensors()
