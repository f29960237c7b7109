"""Section 6 (NorMuon with Polar Express and mantissa sidecars, Adam with the per-parameter table) and the
one-process side of section 8 (gradient communication) of train_gpt.py, each against a reference
written here (float64, explicit loops, direct formulas). A stand-in module has the contract's parameter
names and shapes at the tiny preset's sizes (section 4b's GPT is written separately). The multi-rank
checks are in test_r89_optim_distributed.py and reuse the stand-in and run_steps from here."""
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as T  # noqa: E402

CPU = torch.device("cpu")
COEFFS = [(8.1566, -22.4833, 15.8788), (4.0429, -2.8089, 0.5000), (3.8917, -2.7725, 0.5061),
          (3.2858, -2.3681, 0.4645), (2.3465, -1.7098, 0.4232)]  # fact sheet 2.8, step 3
STANDIN_VOCAB = 64
STANDIN_BIGRAM_ROWS = 37


def tiny_settings(**overrides) -> T.Settings:
    return T.Settings(**{**T.PRESETS["tiny"], **overrides})


def runtime(rank: int = 0, world_size: int = 1) -> T.Runtime:
    return T.Runtime(rank, world_size, CPU, "explicit", fp8=False)


def plan(step: int) -> SimpleNamespace:
    """What section 3's StepPlan gives the optimizers; values that change every step."""
    return SimpleNamespace(step=step, lr_factor=1.0 - 0.1 * step, muon_momentum=0.85 + 0.02 * step,
                           adam_updates=step % 2 == 1)


# ----------------------------------------------------------------------------------------------------
# The stand-in model

class Gate(nn.Module):
    def __init__(self, dim: int, hidden: int, outputs: int, scale: bool, generator: torch.Generator):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(hidden, dim, generator=generator) / dim**0.5)
        self.w2 = nn.Parameter(torch.randn(outputs, hidden, generator=generator) * 0.1)
        self.b2 = nn.Parameter(torch.randn(outputs, generator=generator) * 0.1)
        if scale:
            self.scale = nn.Parameter(torch.tensor(0.1))

    def forward(self, x):
        out = F.gelu(x @ self.w1.T) @ self.w2.T + self.b2
        return out * self.scale if hasattr(self, "scale") else out * 0.1


class StandIn(nn.Module):
    """Every parameter name and (scaled-down) shape of section 4b's GPT, in a small differentiable forward
    that gives each of them a gradient; the embedding is read from lm_head^T while tied."""

    def __init__(self, s: T.Settings, seed: int = 0, matrix_dtype: torch.dtype = torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d, v, h = s.model_dim, STANDIN_VOCAB, s.gate_hidden

        def param(*shape, std=1.0):
            return nn.Parameter(torch.randn(*shape, generator=g) * std)

        self.lm_head = param(d, v, std=0.5)
        self.embed = param(v, d)
        self.register_buffer("tied", torch.tensor(True))
        self.bigram_embed = param(STANDIN_BIGRAM_ROWS, d, std=0.1)
        self.value_embeds = param(5 * v, d, std=0.1)
        self.smear_gate = param(1, 12, std=0.1)
        self.scalars = param(24, std=0.1)
        self.resid_lambdas = nn.Parameter(1 + torch.randn(11, 2, generator=g) * 0.1)
        self.post_lambdas = nn.Parameter(1 + torch.randn(11, 2, generator=g) * 0.1)
        self.ve_gate_bank = param(5, 6, 12, std=0.1)
        self.pre_gate = Gate(d, h, 26, True, g)
        self.post_gate = Gate(d, h, 41, True, g)
        self.mudd0 = Gate(d, h, 14, False, g)
        self.mudd1 = Gate(d, h, 5, False, g)
        self.blocks = nn.ModuleList()
        for i in range(11):
            block = nn.Module()
            if i != 6:
                block.attn = nn.Module()
                block.attn.qkvo = param(4, d, d, std=d**-0.5)
            block.mlp = nn.Module()
            block.mlp.fc = param(s.mlp_hidden, d, std=d**-0.5)
            block.mlp.proj = param(s.mlp_hidden, d, std=s.mlp_hidden**-0.5)
            self.blocks.append(block.to(matrix_dtype))

    def untie(self):
        with torch.no_grad():
            self.embed.copy_(self.lm_head.T)
        self.tied.fill_(False)

    def forward(self, tokens, targets):
        d = self.lm_head.size(0)
        table = self.lm_head.T if self.tied else self.embed
        x = table[tokens] + self.bigram_embed[tokens % STANDIN_BIGRAM_ROWS]
        x = x + self.value_embeds[tokens + STANDIN_VOCAB * (tokens % 5)]
        x = x * (1 + torch.tanh(x[:, :12] @ self.smear_gate.T)) + self.pre_gate(x)[:, :1]
        ve_gates = (x[:, :12] @ self.ve_gate_bank.view(30, 12).T).tanh().mean(-1, keepdim=True)
        for i, block in enumerate(self.blocks):
            if hasattr(block, "attn"):
                q, k, v, o = block.attn.qkvo.float()
                a = F.rms_norm(x, (d,))
                mixed = torch.tanh(a @ q.T) * (a @ k.T) @ v.T @ o.T
                x = self.resid_lambdas[i, 0] * x + self.post_lambdas[i, 0] * self.scalars[2 * i] * mixed
            m = F.rms_norm(x, (d,))
            mlp = F.relu(m @ block.mlp.fc.float().T).square() @ block.mlp.proj.float()
            x = self.resid_lambdas[i, 1] * x + self.post_lambdas[i, 1] * self.scalars[2 * i + 1] * mlp
            if i == 4:
                x = x + self.post_gate(x)[:, :1] * x + ve_gates
        x = x + self.mudd0(x)[:, :1] * x + self.mudd1(x)[:, 1:2] * self.scalars[22] + self.scalars[23]
        return F.cross_entropy(F.rms_norm(x, (d,)) @ self.lm_head, targets, reduction="sum")


def batch(step: int, slot: int, tokens: int = 16):
    g = torch.Generator().manual_seed(1000 * step + slot)
    data = torch.randint(0, STANDIN_VOCAB, (tokens + 1,), generator=g)
    return data[:-1], data[1:]


def run_steps(model, optimizers, communicator, s, rt, steps, untie_at: int | None = None):
    """The training-step protocol of the lead's section 9: each rank's slots, the communicator armed on the
    last micro-step, then step_optimizers (and the untie after step untie_at's update)."""
    slots = list(rt.slots(s))
    for step in steps:
        step_plan = plan(step)
        for micro, slot in enumerate(slots):
            if micro == len(slots) - 1:
                communicator.start_last_micro_step(step_plan)
            model(*batch(step, slot)).backward()
        communicator.finish()
        T.step_optimizers(optimizers, step_plan)
        if step == untie_at:
            model.untie()
            T.untie_optimizer_state(optimizers)


# ----------------------------------------------------------------------------------------------------
# Polar Express

def polar_reference(x: torch.Tensor) -> torch.Tensor:
    """The iteration in float64 on the wide orientation (X^T for tall X: the same polynomial)."""
    x = x.double()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / (1.02 * torch.linalg.matrix_norm(x) + 1e-6)
    for a, b, c in COEFFS:
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def scalar_polynomial(sigma: torch.Tensor) -> torch.Tensor:
    for a, b, c in COEFFS:
        sigma = a * sigma + b * sigma**3 + c * sigma**5
    return sigma


@pytest.mark.parametrize("shape", [(256, 768), (768, 768), (3072, 768)])
def test_polar_express_matches_float64_iteration_on_record_shapes(shape):
    """The record's unit shapes (Q/K head pair, V/O, MLP: tall). The iteration amplifies rounding (the
    composed polynomial's slope at small singular values is ~1000), hence the fp32 bound."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    reference = polar_reference(x)

    def error(dtype):
        out = T.polar_express(x, dtype)
        assert out.dtype == dtype and out.shape == x.shape
        return out, ((out.double() - reference).norm() / reference.norm()).item()

    assert error(torch.float64)[1] < 1e-12, "not the same iteration as the float64 reference"
    assert error(torch.float32)[1] < 5e-4
    if shape[0] <= 768:  # bf16 on CPU is slow: the two attention shapes
        out16, error16 = error(torch.bfloat16)
        # a few bf16 roundoffs (2^-8 = 3.9e-3), and not fp32 in disguise
        assert 1e-4 < error16 < 3e-2, f"bf16 Polar Express differs from float64 by {error16:.2e}"
        sigma = torch.linalg.svdvals(x.double()) / (1.02 * torch.linalg.matrix_norm(x.double()))
        band = scalar_polynomial(torch.linspace(sigma.min().item(), 1.0, 10001, dtype=torch.float64))
        singular = torch.linalg.svdvals(out16.double())
        assert band.min() - 0.05 < singular.min() and singular.max() < band.max() + 0.05


def test_polar_express_singular_values_follow_the_scalar_polynomial():
    """svd(out) = p(svd(x) / (1.02 |x|_F)) for the composed odd polynomial p; p maps [1e-3, 1] into
    [0.858, 1.142], so every singular value of the input above 1e-3 (relative) ends in that band."""
    band = scalar_polynomial(torch.linspace(1e-3, 1.0, 100001, dtype=torch.float64))
    assert 0.85 < band.min() and band.max() < 1.15, "the record's coefficients lost their band"
    g = torch.Generator().manual_seed(5)
    for shape in [(64, 96), (96, 96), (192, 48)]:
        x = torch.randn(3, *shape, generator=g, dtype=torch.float64)
        out = T.polar_express(x, torch.float64)
        for matrix, result in zip(x, out):
            sigma = torch.linalg.svdvals(matrix) / (1.02 * torch.linalg.matrix_norm(matrix) + 1e-6)
            expected, order = scalar_polynomial(sigma).sort()
            actual = torch.linalg.svdvals(result).sort().values
            assert torch.allclose(actual, expected, rtol=1e-9, atol=1e-12)
            in_range = sigma[order] >= 1e-3
            assert in_range.sum() >= min(shape) - 2
            assert actual[in_range].min() >= band.min() - 1e-9 and actual[in_range].max() <= band.max() + 1e-9


@pytest.mark.slow
def test_polar_express_compiles_as_one_graph():
    """What CUDA runs (polar_express_compiled): one graph per unit shape, the eager numbers."""
    compiled = torch.compile(T.polar_express, dynamic=False, fullgraph=True)
    for shape in [(3, 16, 48), (2, 48, 48), (4, 192, 48)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1]))
        assert torch.allclose(compiled(x, torch.float32), T.polar_express(x, torch.float32), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# NorMuon pieces

def test_variance_step_matches_direct_formula():
    g = torch.Generator().manual_seed(1)
    for rows, cols in [(6, 4), (4, 6), (5, 5)]:
        v = torch.randn(3, rows, cols, generator=g, dtype=torch.float64)
        previous = torch.rand(3, max(rows, cols), generator=g, dtype=torch.float64)
        previous[0, 0] = 0.0  # with mean 0 below: the 1e-10 floor
        v[0, 0 if rows >= cols else slice(None), 0 if rows < cols else slice(None)] = 0.0
        second = previous.clone()
        out = T.normuon_variance_step(v, second, beta2=0.9)
        for unit in range(3):
            expected = torch.empty(rows, cols, dtype=torch.float64)
            for index in range(max(rows, cols)):
                line = v[unit, index, :] if rows >= cols else v[unit, :, index]
                s_new = 0.9 * previous[unit, index] + 0.1 * sum(value**2 for value in line) / len(line)
                assert abs(second[unit, index] - s_new) < 1e-12
                scaled = line / math.sqrt(max(s_new, 1e-10))
                if rows >= cols:
                    expected[index, :] = scaled
                else:
                    expected[:, index] = scaled
            expected *= math.sqrt((v[unit] ** 2).sum()) / math.sqrt((expected**2).sum())
            assert torch.allclose(out[unit], expected, rtol=1e-12, atol=1e-12)
    zero = T.normuon_variance_step(torch.zeros(1, 3, 2), torch.zeros(1, 3), 0.9)
    assert torch.equal(zero, torch.zeros(1, 3, 2)), "an all-zero unit must stay zero (no 0/0)"


def test_cautious_weight_decay_with_hand_made_signs():
    p = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 0.0, 3.0], dtype=torch.float64)
    u = torch.tensor([0.5, -0.5, -1.0, 1.0, 0.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    lr, decay = 0.1, 0.01
    # update and weight agree in sign (>= 0): entries 0, 1, 4, 5, 6, 7; strictly (> 0): 0, 1, 7
    loose = torch.tensor([1, 1, 0, 0, 1, 1, 1, 1], dtype=torch.float64)
    strict = torch.tensor([1, 1, 0, 0, 0, 0, 0, 1], dtype=torch.float64)
    for is_strict, mask in ((False, loose), (True, strict)):
        expected = [p[i] - lr * u[i] - decay * p[i] * mask[i] for i in range(len(p))]
        out = T.cautious_decay_update(p, u, lr, decay, strict=is_strict)
        assert torch.allclose(out, torch.stack(expected), rtol=0, atol=1e-15)


def test_mantissa_sidecar_round_trips_the_fp32_master():
    master = torch.randn(7, 33, generator=torch.Generator().manual_seed(2)) * 10.0 ** torch.arange(-3, 4).view(7, 1)
    master[0, :4] = torch.tensor([0.0, -0.0, float("inf"), 1e-40])  # zero, signed zero, inf, subnormal
    weight, mantissa = T.split_master(master)
    assert weight.dtype == torch.bfloat16 and mantissa.dtype == torch.int16 and weight.shape == master.shape
    bits = master.view(torch.int32)
    truncated = (bits & -65536).view(torch.float32)  # the high 16 bits, low ones zero: truncation toward zero
    assert torch.equal(weight.float().view(torch.int32), truncated.view(torch.int32))
    assert torch.equal(mantissa.to(torch.int32) & 0xFFFF, bits & 0xFFFF)
    assert torch.equal(T.join_master(weight, mantissa).view(torch.int32), bits)


def muon_reference_step(master, grad, buf, second, mu, lr, wd, kind_lr):
    """One NorMuon step of one unit in float64, from the fact sheet's list."""
    buf = mu * buf + (1 - mu) * grad
    u = (1 - mu) * grad + mu * buf
    v = polar_reference(u)
    rows, cols = v.shape
    mean = (v**2).mean(dim=1) if rows >= cols else (v**2).mean(dim=0)
    second = 0.9 * second + 0.1 * mean
    w = v / second.clamp_min(1e-10).sqrt().view(-1, 1) if rows >= cols else v / second.clamp_min(1e-10).sqrt()
    w = w * v.norm() / w.norm()
    effective = kind_lr * lr
    p = master - effective * w - effective * (wd * lr) * master * (w * master >= 0)
    return p, buf, second


def unit_rows(s):
    """(kind, rows of the (4d, d) view, lr) of every NorMuon unit of one layer's qkvo: heads (2j, 2j+1)."""
    d, hd = s.model_dim, s.head_dim
    units = []
    for kind, offset in (("q", 0), ("k", d)):
        for j in range(s.num_heads // 2):
            units.append((kind, range(offset + 2 * j * hd, offset + (2 * j + 2) * hd)))
    return units + [("v", range(2 * d, 3 * d)), ("o", range(3 * d, 4 * d))]


def test_normuon_steps_match_reference_per_unit():
    """Three NorMuon steps on one attention layer and one MLP (fp32 weights, fp32 Polar Express) against
    the float64 reference applied to each unit: adjacent head pairs for Q and K, lr 0.023 / 0.046 / 0.092."""
    s = tiny_settings()
    d, hidden = s.model_dim, s.mlp_hidden
    g = torch.Generator().manual_seed(3)
    named = [("blocks.0.attn.qkvo", nn.Parameter(torch.randn(4, d, d, generator=g) * 0.1)),
             ("blocks.0.mlp.fc", nn.Parameter(torch.randn(hidden, d, generator=g) * 0.1)),
             ("blocks.0.mlp.proj", nn.Parameter(torch.randn(hidden, d, generator=g) * 0.1))]
    muon = T.NorMuon(named, s, runtime())
    assert sorted(len(group.units) for group in muon.groups) == [2, 2, 6]
    units = [("blocks.0.attn.qkvo", kind, rows, 0.023) for kind, rows in unit_rows(s)]
    units += [("blocks.0.mlp.fc", "fc", range(hidden), 0.046), ("blocks.0.mlp.proj", "proj", range(hidden), 0.092)]
    state = {}
    for name, kind, rows, _ in units:
        master = dict(named)[name].detach().double().reshape(-1, d)[rows.start:rows.stop]
        second_moment = torch.zeros(max(master.shape), dtype=torch.float64)
        state[name, rows.start] = (master, torch.zeros_like(master), second_moment)
    for step in range(3):
        grads = {name: torch.randn(p.shape, generator=g) for name, p in named}
        for name, p in named:
            p.grad = grads[name].clone()
        step_plan = plan(step)
        T.step_optimizers([muon], step_plan)
        assert all(p.grad is None for _, p in named), "NorMuon must clear the gradients it used"
        for name, kind, rows, kind_lr in units:
            master, buf, second = state[name, rows.start]
            grad = grads[name].double().reshape(-1, d)[rows.start:rows.stop]
            state[name, rows.start] = muon_reference_step(
                master, grad, buf, second, step_plan.muon_momentum, s.muon_lr * step_plan.lr_factor, s.muon_wd,
                kind_lr / s.muon_lr)
    for name, kind, rows, _ in units:
        actual = dict(named)[name].detach().double().reshape(-1, d)[rows.start:rows.stop]
        expected = state[name, rows.start][0]
        assert (actual - expected).abs().max() < 1e-5, f"{name} {kind} rows {rows.start}.. differ from the reference"


def test_record_sized_units_shard_like_the_record():
    """At the record's shapes on 8 ranks (meta tensors): 60 Q/K, 20 V/O and 22 MLP units, padded to 64 / 24 /
    24, 8 / 3 / 3 per rank (fact sheet 2.8's banks), bf16 with sidecars, effective lrs 0.023 / 0.046 / 0.092."""
    s = T.Settings()
    named = []
    for i in range(11):
        shapes = [("attn.qkvo", (4, 768, 768))] if i != 6 else []
        shapes += [("mlp.fc", (3072, 768)), ("mlp.proj", (3072, 768))]
        named += [(f"blocks.{i}.{name}", nn.Parameter(torch.empty(shape, device="meta", dtype=torch.bfloat16)))
                  for name, shape in shapes]
    muon = T.NorMuon(named, s, T.Runtime(7, 8, torch.device("meta"), "flex", fp8=True))
    layout = [(len(g.units), g.padded, g.per_rank, g.rows, g.cols, g.sidecar) for g in muon.groups]
    assert sorted(layout) == [(20, 24, 3, 768, 768, True), (22, 24, 3, 3072, 768, True), (60, 64, 8, 256, 768, True)]
    lrs = {u.kind: s.muon_lr * T.MUON_KIND_LR_MUL[u.kind] * max(1, (u.stop - u.start) / 768) ** 0.5
           for g in muon.groups for u in g.units}
    assert {kind: round(lr, 6) for kind, lr in lrs.items()} == dict(q=0.023, k=0.023, v=0.023, o=0.023, fc=0.046,
                                                                   proj=0.092)
    mlp = next(g for g in muon.groups if g.rows == 3072)
    assert [u.kind if u else None for u in mlp.owned_units] == ["proj", None, None]  # rank 7: unit 21, 2 pads


def test_normuon_decays_a_matrix_without_gradient():
    """A zero update counts as agreeing in sign ([v * p >= 0]): the record's unused pad matrix shrinks by
    lr_eff * wd * lr each step (fact sheet 2.8, mlp_bank pad), here an fc without gradient (lr_eff 0.046 f)."""
    s = tiny_settings()
    weight = torch.randn(s.mlp_hidden, s.model_dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    param = nn.Parameter(weight.float())
    muon = T.NorMuon([("blocks.0.mlp.fc", param)], s, runtime())
    step_plan = plan(2)
    T.step_optimizers([muon], step_plan)
    lr = s.muon_lr * step_plan.lr_factor
    expected = weight.float().double() * (1 - 2 * lr * s.muon_wd * lr)
    assert torch.allclose(param.detach().double(), expected, rtol=1e-6, atol=0)


def test_bf16_weights_with_sidecar_follow_the_fp32_master_exactly():
    """NorMuon on bf16 weights (with the sidecar) and on fp32 weights, same gradients: the joined master
    equals the fp32 weights bit for bit, and the bf16 weight is its truncation."""
    s = tiny_settings()
    g = torch.Generator().manual_seed(4)
    start = torch.randn(s.mlp_hidden, s.model_dim, generator=g) * 0.05
    start = start.bfloat16().float()  # a master that bf16 holds exactly (mantissa 0 at the start)
    fp32 = nn.Parameter(start.clone())
    bf16 = nn.Parameter(start.bfloat16())
    muon32 = T.NorMuon([("blocks.0.mlp.fc", fp32)], s, runtime())
    muon16 = T.NorMuon([("blocks.0.mlp.fc", bf16)], s, runtime())
    for step in range(3):
        grad = torch.randn(start.shape, generator=g).bfloat16()  # the same gradient values in both
        fp32.grad, bf16.grad = grad.float(), grad.clone()
        T.step_optimizers([muon32], plan(step))
        T.step_optimizers([muon16], plan(step))
    mantissa = muon16.groups[0].mantissa[0]
    assert mantissa.count_nonzero() > 0
    assert torch.equal(T.join_master(bf16.data, mantissa).view(torch.int32), fp32.data.view(torch.int32))
    truncated = (fp32.data.view(torch.int32) & -65536).view(torch.float32)
    assert torch.equal(bf16.data.float(), truncated)
    assert not torch.equal(fp32.data, start)


# ----------------------------------------------------------------------------------------------------
# Adam

def adam_reference(p, grad, lr, betas, wd_mul, t=1, m=None, v=None, wd=0.005, eps=1e-10):
    """One Adam update in float64, fact sheet 2.8."""
    beta1, beta2 = betas
    m = (1 - beta1) * grad if m is None else beta1 * m + (1 - beta1) * grad
    v = (1 - beta2) * grad**2 if v is None else beta2 * v + (1 - beta2) * grad**2
    upd = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t) * m / (v.sqrt() + eps)
    return p - upd - lr**2 * wd * wd_mul * p * (upd * p > 0)


def test_adam_table_covers_the_stand_in_and_splits_parameters():
    s = tiny_settings()
    model = StandIn(s)
    muon, adam = T.build_optimizers(model, s, runtime())
    muon_names = {name for name, p in model.named_parameters() if any(p is q for q in muon.params)}
    assert muon_names == {n for n, _ in model.named_parameters() if n.startswith("blocks.")}
    assert len(muon.params) == 10 + 22
    assert {n for n, _ in adam.named_params} == {n for n, _ in model.named_parameters()} - muon_names
    with pytest.raises(ValueError, match="unknown_table"):
        T.Adam([("unknown_table", nn.Parameter(torch.zeros(2)))], s)


def test_adam_updates_every_other_step_on_the_summed_gradients():
    s = tiny_settings(slots_per_step=1, muon_lr=0.0)  # the matrices stay put: step 1's gradients are reproducible
    model = StandIn(s)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizers = T.build_optimizers(model, s, runtime())
    communicator = T.GradientCommunicator(optimizers, s, runtime())
    _, adam = optimizers
    summed = {}
    for step in (0, 1):
        communicator.start_last_micro_step(plan(step))
        model(*batch(step, 0)).backward()
        communicator.finish()
        for name, p in adam.named_params:
            if p.grad is not None:
                summed[name] = p.grad.detach().double().clone()
        T.step_optimizers(optimizers, plan(step))
        if step == 0:
            for name, p in adam.named_params:
                assert torch.equal(p.detach(), start[name]), f"{name} moved on an even step"
                assert name == "embed" or p.grad is not None, f"{name}'s gradient was cleared before Adam used it"
    assert "embed" not in summed, "the embedding is read from lm_head^T while tied: no gradient of its own"
    for name, p in adam.named_params:
        row = T.ADAM_TABLE[name]
        if name == "embed":
            assert torch.equal(p.detach(), start[name])
            continue
        expected = adam_reference(start[name].double(), summed[name], 0.008 * row.lr_mul * plan(1).lr_factor,
                                  row.betas, row.wd_mul)
        assert torch.allclose(p.detach().double(), expected, rtol=1e-6, atol=1e-7), name
        assert p.grad is None
    # and the gradient Adam used is the sum of the two steps' gradients (checked with a fresh model)
    fresh = StandIn(s)
    for step in (0, 1):
        fresh(*batch(step, 0)).backward()
    assert torch.allclose(fresh.scalars.grad.double(), summed["scalars"], rtol=1e-6)


def test_adam_lr_multipliers_on_a_first_sign_like_step():
    """From zero weights (no decay) the first update is lr * lr_mul * f * sign(g) (m/sqrt(v) = sign)."""
    s = tiny_settings()
    g = torch.Generator().manual_seed(6)
    named = [(name, nn.Parameter(torch.zeros(5, 3))) for name in ("value_embeds", "post_lambdas", "smear_gate")]
    adam = T.Adam(named, s)
    for _, p in named:
        p.grad = torch.randn(5, 3, generator=g)
    signs = {name: p.grad.sign() for name, p in named}
    step_plan = SimpleNamespace(lr_factor=0.5, muon_momentum=0.9, adam_updates=True)
    T.step_optimizers([adam], step_plan)
    moved = {name: p.detach() for name, p in named}
    for name, lr_mul in (("value_embeds", 75.0), ("post_lambdas", 1.0), ("smear_gate", 0.01)):
        assert torch.allclose(moved[name], -0.008 * 0.5 * lr_mul * signs[name], rtol=1e-5, atol=0)
    assert torch.allclose(moved["value_embeds"], 75 * moved["post_lambdas"] * signs["value_embeds"]
                          * signs["post_lambdas"], rtol=1e-5)
    p = named[0][1]
    p.grad = torch.ones(5, 3)
    before = p.detach().clone()
    T.step_optimizers([adam], SimpleNamespace(lr_factor=0.5, muon_momentum=0.9, adam_updates=False))
    assert torch.equal(p.detach(), before) and p.grad is not None, "Adam must wait for an Adam step"


def test_untie_gives_the_embedding_the_heads_moments_transposed():
    s = tiny_settings(slots_per_step=1)
    model = StandIn(s)
    optimizers = T.build_optimizers(model, s, runtime())
    communicator = T.GradientCommunicator(optimizers, s, runtime())
    run_steps(model, optimizers, communicator, s, runtime(), range(2), untie_at=1)
    _, adam = optimizers
    head_m, head_v = adam.moments["lm_head"]
    embed_m, embed_v = adam.moments["embed"]
    assert head_m.abs().sum() > 0
    assert torch.equal(embed_m, head_m.T) and torch.equal(embed_v, head_v.T)
    assert embed_m.is_contiguous()
    assert torch.equal(model.embed.detach(), model.lm_head.detach().T)
    # after the untie the embedding trains: its first Adam update continues from the head's moments
    embed_before = model.embed.detach().clone()
    run_steps(model, optimizers, communicator, s, runtime(), range(2, 4))
    assert not torch.equal(model.embed.detach(), embed_before)
    assert adam.updates == 2


def test_one_process_accumulation_is_the_mean_over_micro_steps():
    """At world size 1 with 2 micro-steps, the communicator hands NorMuon (g1 + g2) / 2 and Adam the sum of
    the two steps' per-step means (muon_lr 0: the weights stay those of the reference model)."""
    s = tiny_settings(slots_per_step=2, muon_lr=0.0)
    model = StandIn(s)
    optimizers = T.build_optimizers(model, s, runtime())
    muon, adam = optimizers
    communicator = T.GradientCommunicator(optimizers, s, runtime())
    reference = StandIn(s)
    for step in (0, 1):
        for slot in (0, 1):
            reference(*batch(step, slot)).backward()
        if step == 0:
            first_qkvo = reference.blocks[0].attn.qkvo.grad.clone()
    communicator.start_last_micro_step(plan(0))
    for slot in (0, 1):
        model(*batch(0, slot)).backward()
    communicator.finish()
    group = next(g for g in muon.groups if g.rows == g.cols)  # V and O
    v_unit = next(i for i, u in enumerate(group.units) if u.name == "blocks.0.attn.qkvo" and u.kind == "v")
    assert torch.allclose(group.reduced_gradient[v_unit], first_qkvo[2] / 2, rtol=1e-6, atol=0)
    T.step_optimizers(optimizers, plan(0))
    communicator.start_last_micro_step(plan(1))
    for slot in (0, 1):
        model(*batch(1, slot)).backward()
    communicator.finish()
    assert torch.allclose(model.scalars.grad, reference.scalars.grad / 2, rtol=1e-6)
