"""The GPU check's own logic (tools/gpu_check.py, tools/fake_gpu/): parsing, replay, findings and the sync
counter on CPU without the CUDA venv; the exit status of a broken case with the venv (skipped without it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402
from fake_gpu import kernels, report, wrapper_memory  # noqa: E402
from fake_gpu.gpus import GPUS  # noqa: E402
from fake_gpu.syncs import HostSyncCounter  # noqa: E402
from records.recipes import RECORD21  # noqa: E402  (the small-shape tool tests below use its flags)

CUOBJDUMP_OUTPUT = """
Resource usage:
 Common:
  GLOBAL:0
 Function triton_poi_fused_add_0:
  REG:22 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:900 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function triton_tem_fused_flex_attention_backward_7:
  REG:255 STACK:48 SHARED:1024 LOCAL:0 CONSTANT[0]:1040 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_res_usage_reads_every_function():
    usage = kernels.parse_res_usage(CUOBJDUMP_OUTPUT)
    assert usage == {
        "triton_poi_fused_add_0": kernels.Resources(registers=22, stack=0, static_shared=0, local=0),
        "triton_tem_fused_flex_attention_backward_7": kernels.Resources(registers=255, stack=48, static_shared=1024,
                                                                        local=0),
    }


def config(shared, registers=32, stack=0):
    return kernels.ConfigResult(shared=shared, registers=registers, stack=stack, num_warps=4, num_stages=2)


def test_judge_shared_memory_compile_failures_and_spills():
    limit = GPUS["rtx4090"].shared_memory_per_block_optin  # 101,376 B
    results = [
        kernels.KernelResult("fits", True, configs=[config(50_000, 64)]),
        kernels.KernelResult("one_config_too_big", True, configs=[config(200_000), config(90_000, 128, stack=16)]),
        kernels.KernelResult("too_big", True, configs=[config(166_400, 255, stack=48)]),
        kernels.KernelResult("broken", False, error="CompilationError: bad"),
    ]
    verdict = kernels.judge(results, limit)
    assert verdict["kernels"] == 4 and verdict["compiled"] == 3
    assert verdict["max_shared"] == 90_000 and verdict["max_registers"] == 128  # only configs that fit count
    assert verdict["kernels_with_stack"] == ["one_config_too_big"]
    assert len(verdict["fatal"]) == 2
    assert "too_big needs 166400 B" in verdict["fatal"][0] and "broken failed to compile" in verdict["fatal"][1]
    assert len(verdict["notes"]) == 1 and "1 of 2" in verdict["notes"][0]
    # the same kernels on an H100 (232,448 B): nothing is too big
    assert len(kernels.judge(results, GPUS["h100"].shared_memory_per_block_optin)["fatal"]) == 1


# A wrapper shaped like inductor's output; expected bytes worked out by hand:
#   buf0 (4, 8) fp32 = 128 B; buf1 (16,) bf16 = 32 B -> 160 B live (the peak); del buf0 -> 32 B;
#   buf2 takes over buf1 (reuse, no allocation); buf3 (2, 3) with strides (1, 2) int64 spans
#   1 + 1*1 + 2*2 = 6 elements = 48 B -> 80 B; buf4, a view, takes over buf3; buf2 and buf4 are returned (80 B).
WRAPPER = """
async_compile = AsyncCompile()
triton_poi_fused_0 = async_compile.triton('triton_poi_fused_0', '''source''', device_str='cuda')

def call(args):
    arg0_1, = args
    args.clear()
    with torch.cuda._DeviceGuard(0):
        buf0 = empty_strided_cuda((4, 8), (8, 1), torch.float32)
        buf1 = empty_strided_cuda((16, ), (1, ), torch.bfloat16)
        triton_poi_fused_0.run(arg0_1, buf0, buf1, 32, stream=stream0)
        extern_kernels.mm(buf0, buf0, out=buf1)
        del buf0
        buf2 = buf1; del buf1  # reuse
        buf3 = empty_strided_cuda((2, 3), (1, 2), torch.int64)
        buf4 = reinterpret_tensor(buf3, (6, ), (1, ), 0); del buf3  # reuse
        buf5 = torch.ops.speedrun.fp8_matmul.default(buf2, arg0_1, 2.0, 512.0, 524288.0)
    return (buf2, buf4, )
"""


def test_wrapper_replay_matches_hand_count():
    plan = wrapper_memory.replay(WRAPPER)
    assert plan.peak_bytes == 160
    assert plan.peak_line.startswith("buf1 = empty_strided_cuda")
    assert plan.allocations == 3
    assert plan.live_at_return_bytes == 80  # buf4 (a view of buf3) keeps buf3's bytes alive
    assert report.count_triton_kernels(WRAPPER) == 1
    assert report.count_extern_calls(WRAPPER) == {"extern_kernels.mm": 1, "torch.ops.speedrun.fp8_matmul.default": 1}


def test_findings_fatal_and_notes():
    traced = dict(errors=[], phases=dict(
        train_first_window=dict(graph_breaks=0, graphs_compiled=1),
        train_last_window=dict(graph_breaks=0, graphs_compiled=1, memory=dict(Total=90 * 2**30),
                               sync_count=3, op_counts={"aten::_scaled_mm": 3}),
        eval_last_window=dict(graph_breaks=2, break_reasons=["data-dependent branch"], graphs_compiled=0,
                              memory=dict(Total=10 * 2**30))))
    h100 = GPUS["h100"]
    fatal, notes = report.findings(traced, h100.total_memory, h100.name, h100.has_fp8)
    assert len(fatal) == 3  # one recompile, 90 GiB > 79.6 GiB, two graph breaks; the first window's graph is fine
    assert "recompile" in fatal[0] and "exceeds" in fatal[1] and "graph break" in fatal[2]
    assert notes == ["train_last_window: 3 host-device sync(s)"]  # syncs are reported, not fatal
    a100 = GPUS["a100-80gb"]
    fatal, _ = report.findings(traced, a100.total_memory, a100.name, a100.has_fp8)
    assert any("FP8" in item for item in fatal)  # sm_80 has no FP8 matmuls
    traced["phases"]["train_last_window"]["op_counts"] = {"aten::_scaled_mm.out": 3}  # from compiled code
    fatal, _ = report.findings(traced, a100.total_memory, a100.name, a100.has_fp8)
    assert any("FP8" in item for item in fatal)


def test_findings_of_record89_counted_phases():
    # record 89: the warm-up may compile; the counted steps may not, and a host sync in a training step is fatal
    traced = dict(errors=[], unpadded_matmuls=["mm key"], phases=dict(
        warm_up=dict(graph_breaks=0, graphs_compiled=9),
        train_stage0_step2=dict(graph_breaks=0, graphs_compiled=1, counted=True, syncs_fatal=True, sync_count=2,
                                memory=dict(Total=2**30)),
        eval_final=dict(graph_breaks=0, graphs_compiled=0, counted=True, sync_count=1, memory=dict(Total=2**30))))
    h100 = GPUS["h100"]
    fatal, notes = report.findings(traced, h100.total_memory, h100.name, h100.has_fp8)
    assert len(fatal) == 2 and "train_stage0_step2: 1 graph(s) compiled" in fatal[0] and "2 host-device" in fatal[1]
    assert notes[0] == "eval_final: 1 host-device sync(s)" and "unaligned" in notes[1]


def fake_cuda_tensor(mode):
    with mode:
        return torch.empty(8, 8, device="cuda")


def test_sync_counter_counts_item_and_host_copies_with_their_lines():
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    x = fake_cuda_tensor(mode)

    def no_syncs(t):
        return (t * 2).sum(dim=0) + 1.0  # python scalars are kernel arguments, not copies

    def syncs_and_copies(t):
        scale = torch.tensor(0.5).to(t.device)  # a host scalar copied to the device
        total = (t * scale).sum().item()  # the host waits for the device
        if t.sum() > 0:  # bool() of a device tensor: another wait
            total += 1
        return total

    with mode:
        counter = HostSyncCounter("cuda")
        with counter:
            no_syncs(x)
        assert counter.events == []
        with counter:
            syncs_and_copies(x)
            with counter.pause():  # e.g. data loading
                torch.zeros(4).to(x.device)
    assert counter.count("sync") == 2 and counter.count("h2d") == 1
    rows = counter.summary()
    assert [row["kind"] for row in rows] == ["h2d", "sync", "sync"]
    assert all(row["where"].startswith("test_gpu_check.py:") for row in rows)
    assert "torch.tensor(0.5)" in rows[0]["code"] and ".item()" in rows[1]["code"] and "t.sum() > 0" in rows[2]["code"]


def test_launcher_reads_pins_and_cache_location(monkeypatch, tmp_path):
    assert gpu_check.pinned_versions() == ("2.11.0", "3.6.0")  # the Dockerfile's torch and its triton
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert gpu_check.venv_dir("2.11.0", "3.6.0") == tmp_path / "speedrun-gpu-check" / "venv-torch2.11.0-triton3.6.0"
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("RUN pip install torch==9.9.0\n")
    with pytest.raises(gpu_check.EnvironmentProblem, match="TRITON_FOR_TORCH"):
        gpu_check.pinned_versions(dockerfile)
    assert not gpu_check.venv_is_valid(tmp_path / "missing", "2.11.0", "3.6.0")


def test_launcher_without_compiler_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(gpu_check.EnvironmentProblem, match="could not build|No such file"):
        try:
            gpu_check.build_stubs(tmp_path)
        except FileNotFoundError as error:
            raise gpu_check.EnvironmentProblem(str(error))
    monkeypatch.delenv("CC")
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    with pytest.raises(gpu_check.EnvironmentProblem, match="no C compiler found"):
        gpu_check.build_stubs(tmp_path)


VENV = gpu_check.venv_dir(*gpu_check.pinned_versions())


@pytest.mark.slow
@pytest.mark.skipif(not gpu_check.venv_is_valid(VENV, *gpu_check.pinned_versions()),
                    reason=f"needs the GPU check's CUDA venv ({VENV}); `python tools/gpu_check.py` creates it")
def test_check_fails_for_a_model_that_does_not_compile_for_the_gpu(tmp_path):
    # FlexAttention on CUDA needs mask blocks that its kernel tiles divide: 32-token blocks do not lower
    command = [sys.executable, str(REPO / "tools" / "gpu_check.py"), "--no-kernels", "--only=eval",
               f"--recipe={RECORD21.relative_to(REPO)}", f"--out={tmp_path}", "--preset=tiny", "--device=cuda", "--attention_backend=flex", "--num_layers=2",
               "--attention_layout=L-", "--value_embed_layout=0-", "--val_seq_len=512", "--val_tokens=512"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900,
                            env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor")))
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "block size must be divisible" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not gpu_check.venv_is_valid(VENV, *gpu_check.pinned_versions()),
                    reason=f"needs the GPU check's CUDA venv ({VENV}); `python tools/gpu_check.py` creates it")
def test_check_runs_the_fp8_op_compiled_as_a_gpu_would(tmp_path):
    # The FP8 op is a custom op whose bodies are torch.compile'd. On a GPU they run compiled; the check
    # must run them compiled too (not eagerly, nor through the op's fake kernel), or its memory figure
    # is that of the eager op (the bf16 `grad * 2^19` temporary) and the bodies' kernels go unchecked.
    command = [sys.executable, str(REPO / "tools" / "gpu_check.py"), "--no-kernels", "--only=train",
               f"--recipe={RECORD21.relative_to(REPO)}", f"--out={tmp_path}", "--preset=tiny", "--device=cuda", "--fp8_head=true", "--num_layers=2",
               "--attention_layout=L-", "--value_embed_layout=0-", "--block_size=128", "--train_seq_len=256",
               "--train_batch_tokens=512"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900,
                            env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor")))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    phases = json.loads((tmp_path / "gpu_check.json").read_text())["phases"]
    ops = phases["train_last_window"]["op_counts"]
    micro_steps = 512 // 256  # train_batch_tokens / train_seq_len on 1 rank
    assert ops.get("aten::_scaled_mm.out") == 3 * micro_steps  # forward 1 + backward 2, from generated code
    assert "aten::_scaled_mm" not in ops and "aten::mul.Tensor" not in ops  # nothing of the bodies ran eagerly
    assert phases["train_first_window"]["graphs_compiled"] >= 3  # model, FP8 forward body, FP8 backward body
    assert phases["train_last_window"]["graphs_compiled"] == 0


def test_overlap_counts_the_matmuls_queued_after_the_first_all_reduce():
    counter = HostSyncCounter("meta")
    for name in ("aten::mm.out", "<last micro-step>", "aten::mm.out", "c10d::allreduce_", "aten::_scaled_mm.out",
                 "aten::bmm", "c10d::allreduce_", "aten::add", "<gradients reduced>", "aten::mm.out"):
        counter.mark(name)
    assert counter.communication_overlap("<last micro-step>", "<gradients reduced>") == dict(
        all_reduces=2, matmuls=3, matmuls_after_first_all_reduce=2)
    x = torch.empty(8, 8, device="meta")
    counter.clear()
    with counter:  # ops are recorded as dispatched
        counter.mark("<last micro-step>")
        torch.mm(x + 1, x)
        counter.mark("<gradients reduced>")
    assert counter.order == ["<last micro-step>", "aten::mm", "<gradients reduced>"]
    assert counter.communication_overlap("<last micro-step>", "<gradients reduced>") == dict(
        all_reduces=0, matmuls=1, matmuls_after_first_all_reduce=0)


def test_peak_tracker_keeps_the_large_tensors_live_at_the_peak_with_their_lines():
    from fake_gpu.peak import LARGE_BYTES, PeakMemTracker
    mode = FakeTensorMode()
    with mode:
        tracker = PeakMemTracker()
        with tracker:
            a = torch.empty(LARGE_BYTES // 4, device="cuda")
            small = torch.empty(1024, device="cuda")
            b = a * 2  # the peak: a, b and small live
            del b
            c = a + 1  # as large again, but not above the peak
    assert tracker.largest_total == 2 * LARGE_BYTES + 4096
    rows = tracker.largest_at_peak()
    assert [(row["bytes"], row["count"]) for row in rows] == [(LARGE_BYTES, 1), (LARGE_BYTES, 1)]
    sites = sorted(row["allocated"] for row in rows)
    assert sites[0].startswith("aten::empty") and "test_gpu_check.py" in sites[0]
    assert sites[1].startswith("aten::mul.Tensor at test_gpu_check.py:") and c.shape == a.shape
