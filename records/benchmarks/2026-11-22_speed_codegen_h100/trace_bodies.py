# Generate the CUDA code of the FP8 op's compiled bodies and of compiled Newton-Schulz at the record's
# shapes on a faked H100 (the method of ../shared/gpu_codegen_prototype), recording the Triton kernels;
# inductor's generated wrappers land in $WORK_DIR/inductor_cache_fake_h100. One body per process (the
# first real CUDA call after code generation fails, as intended). See README.md here for the commands.
import os, json, time
PROTOTYPE = os.environ.get("PROTOTYPE_DIR", "../shared/gpu_codegen_prototype")
exec(open(os.path.join(PROTOTYPE, "fake_h100.py")).read())
import train_gpt as T
from torch._subclasses.fake_tensor import FakeTensorMode
import torch._subclasses.fake_tensor as _ft
_ft.init_gpu_context = lambda d: None
fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
cuda0 = torch.device("cuda", 0)
WHAT = os.environ.get("WHAT", "fp8")
results = {}
def run(name, fn):
    before = set(KERNELS)
    t0 = time.time()
    err = None
    try:
        fn()
    except Exception as e:
        err = f"{type(e).__name__}: {str(e)[:200]}"
    new = sorted(set(KERNELS) - before)
    results[name] = dict(seconds=round(time.time() - t0, 1), triton_kernels=new, error_after_codegen=err)
    print(name, len(new), "kernels;", err, flush=True)
with fake_mode:
    if WHAT == "fp8":
        x = torch.empty(49152, 768, dtype=torch.bfloat16, device=cuda0)
        w = torch.empty(50304, 768, dtype=torch.float32, device=cuda0)
        grad = torch.empty(49152, 50304, dtype=torch.bfloat16, device=cuda0)
        x_f8 = torch.empty(49152, 768, dtype=torch.float8_e4m3fn, device=cuda0)
        w_f8 = torch.empty(50304, 768, dtype=torch.float8_e4m3fn, device=cuda0)
        run("fp8_forward", lambda: T.fp8_forward_compiled(x, w))
    elif WHAT == "fp8bwd":
        grad = torch.empty(49152, 50304, dtype=torch.bfloat16, device=cuda0)
        x_f8 = torch.empty(49152, 768, dtype=torch.float8_e4m3fn, device=cuda0)
        w_f8 = torch.empty(50304, 768, dtype=torch.float8_e4m3fn, device=cuda0)
        run("fp8_backward", lambda: T.fp8_backward_compiled(grad, x_f8, w_f8))
    else:
        for shape in [tuple(int(d) for d in os.environ["NS_SHAPE"].split("x"))]:
            g = torch.empty(shape, dtype=torch.float32, device=cuda0)
            run(f"newton_schulz_{shape}", lambda: T.newton_schulz_compiled(g, 5, torch.bfloat16))
out = os.path.join(os.environ["WORK_DIR"], f"bodies_{WHAT}{os.environ.get('NS_SHAPE', '')}.json")
json.dump(dict(results=results, kernels={k: KERNELS[k] for r in results.values() for k in r["triton_kernels"]}), open(out, "w"), indent=1)
print("saved", out)
