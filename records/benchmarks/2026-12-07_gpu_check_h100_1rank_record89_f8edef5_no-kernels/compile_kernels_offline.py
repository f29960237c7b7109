"""Compiles, for sm_90, every distinct (name, source) Triton kernel of a GPU check's wrappers, FlexAttention
templates first, until a deadline; writes results incrementally."""
import json, os, re, sys, time, collections
sys.path.insert(0, "/work/wt-gpucheck/tools")
from fake_gpu import fake_cuda, kernels
from fake_gpu.gpus import GPUS
gpu = GPUS["h100"]
fake_cuda.install(gpu)
import triton
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
d = json.load(open(sys.argv[1])); out = sys.argv[2]; deadline = time.time() + float(sys.argv[3])
pat = re.compile(r"async_compile\.triton\('(\w+)', '''(.*?)'''", re.S)
seen, pairs = set(), []
for g in d["graphs"]:
    for name, src in pat.findall(open(g["wrapper"]).read()):
        if (name, src) not in seen:
            seen.add((name, src)); pairs.append((name, src))
order = {"tem": 0, "red": 1, "per": 1, "poi": 2}
pairs.sort(key=lambda p: order.get(p[0].split("_")[1], 3))
results, started = [], time.time()
for i, (name, src) in enumerate(pairs):
    if time.time() > deadline:
        break
    results.append(kernels.compile_kernel(name, src, cuobjdump))
    verdict = kernels.judge(results, gpu.shared_memory_per_block_optin)
    json.dump(dict(distinct_kernels=len(pairs), attempted=len(results), seconds=round(time.time() - started, 1),
                   verdict=verdict, details=[r.to_json() for r in results]), open(out, "w"), indent=1)
    print(f"{i + 1}/{len(pairs)} {name} {results[-1].ok if hasattr(results[-1], 'ok') else ''}", flush=True)
