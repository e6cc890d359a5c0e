"""muon_ds.Muon on one process: equal to torch.optim.Muon, to Moonlight's equations written
out here, and to torch.optim.AdamW for the rest; non-finite policy, state round trip, lr.

Gradients are fed by hand (fixed random sequences, not a loss), so two optimizers that
drift apart by rounding still see the same gradients and differences do not compound.
"""

from __future__ import annotations

import copy
import io
import logging
import math
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.optim._muon as torch_muon_module

import muon_ds
from muon_ds import MuonConfig
from muon_ds.math import update_scale

MU = 0.95
LR = 0.02
WD = 0.1
# Wide, tall, two same-shape squares (batched into one Newton-Schulz call), a row, a column.
SHAPES = [(32, 48), (64, 24), (40, 40), (40, 40), (1, 16), (16, 1)]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These matrices are tiny: intra-op threads only add OpenMP spin on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _matrices(seed: int, shapes: list[tuple[int, ...]] = SHAPES) -> list[torch.Tensor]:
    # Scale 0.1 (a typical init): one fp32 ulp of a weight is ~1e-8, far below an update.
    gen = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(s, generator=gen) for s in shapes]


def _grad_sequence(
    steps: int, shapes: list[tuple[int, ...]], seed: int
) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


def _leaves(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone().requires_grad_() for t in tensors]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------------------
# torch.optim.Muon
# --------------------------------------------------------------------------------------


def _torch_ns_float32(
    grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> torch.Tensor:
    """torch 2.14's ``_zeropower_via_newtonschulz`` line for line, but in float32."""
    a, b, c = ns_coefficients
    ortho = grad.float()
    if grad.size(0) > grad.size(1):
        ortho = ortho.T
    ortho = ortho.div(ortho.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram = ortho @ ortho.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        ortho = torch.addmm(ortho, gram_update, ortho, beta=a)
    if grad.size(0) > grad.size(1):
        ortho = ortho.T
    return ortho


def _compare_with_torch_muon(config: MuonConfig, steps: int = 6) -> tuple[float, float]:
    """Run muon_ds.Muon and torch.optim.Muon side by side; worst per-step deviations.

    Returns (max relative Frobenius deviation of a step's update W_after - W_before,
    max relative deviation of a momentum buffer).

    torch keeps an EMA ``B <- mu B + (1 - mu) g`` and orthogonalises ``(1 - mu) g + mu B``
    (Nesterov) or ``B``; Moonlight keeps ``M <- mu M + g`` and orthogonalises ``g + mu M``
    or ``M``. By induction ``B = (1 - mu) M`` and torch's matrix is ``(1 - mu)`` times ours
    when both see the same g. Feeding torch ``g / (1 - mu)`` instead makes ``B = M`` and
    the orthogonalised matrices equal (up to fp32 rounding of lerp against mul-add), so
    the momentum buffers can be compared directly and Newton-Schulz receives the same
    input on both sides rather than relying on its normalisation to remove the factor.
    """
    init = _matrices(0)
    grads = _grad_sequence(steps, SHAPES, seed=1)
    ours, theirs = _leaves(init), _leaves(init)
    opt = muon_ds.Muon([(f"layers.{i}.weight", p) for i, p in enumerate(ours)], config)
    ref = torch.optim.Muon(
        theirs,
        lr=config.lr,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        nesterov=config.nesterov,
        adjust_lr_fn="match_rms_adamw",
    )
    worst_update, worst_momentum = 0.0, 0.0
    for step_grads in grads:
        before_ours = [p.detach().clone() for p in ours]
        before_theirs = [p.detach().clone() for p in theirs]
        for p, q, g in zip(ours, theirs, step_grads, strict=True):
            p.grad = g.clone()
            q.grad = g / (1.0 - config.momentum)
        opt.step()
        ref.step()
        for p, q, p0, q0 in zip(ours, theirs, before_ours, before_theirs, strict=True):
            worst_update = max(worst_update, _relative(p.detach() - p0, q.detach() - q0))
            worst_momentum = max(
                worst_momentum,
                _relative(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"]),
            )
    return worst_update, worst_momentum


# Momentum: torch's lerp and Moonlight's mul-add round differently in fp32; measured 1e-7
# relative after 6 steps. 1e-6 leaves room and still catches any wrong coefficient.
MOMENTUM_RTOL = 1e-6


@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon_within_bf16_newton_schulz_tolerance(nesterov: bool) -> None:
    """Both run Newton-Schulz in bf16 in the same fused form (``b A + c A^2`` and
    ``a X + B X`` each one addmm/baddbmm, rounded once). Measured worst step: 1.4e-6, as
    the two sides' inputs differ only by fp32 rounding (lerp against mul-add); but one
    ulp of input difference can flip a bf16 rounding, which five steps amplify to a few
    percent (ENVIRONMENT.md: 1e-4 relative input moves the bf16 output by 2-3%; the
    unfused form muon_ds had before differed from torch's by 4.5%, 8.4% on vectors).
    Tolerance 10% relative (Frobenius) on every step's update. Errors it must catch are
    far larger (measured: Nesterov off 68%, 4 or 6 steps ~40%, polar_express 36%,
    momentum 0.9 21%); the tight float32 test below catches the small ones."""
    config = MuonConfig(lr=LR, weight_decay=WD, momentum=MU, nesterov=nesterov, ns_dtype="bfloat16")
    worst_update, worst_momentum = _compare_with_torch_muon(config)
    assert worst_update < 0.1
    assert worst_momentum < MOMENTUM_RTOL


@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon_tightly_with_float32_newton_schulz_on_both_sides(
    nesterov: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's Newton-Schulz is hard-wired to bf16; it is replaced by the same function in
    float32 (torch's own addmm form, copied above), and muon_ds runs ns_dtype="float32".
    Everything else (momentum, Nesterov, eps clamp vs eps add, scale, decay) is torch's
    code. Measured 1.9e-6 worst relative step deviation; tolerance 1e-4 (float32 roundoff
    amplified by the polynomial's slopes), which a momentum of 0.94 (6%) already fails."""
    monkeypatch.setattr(torch_muon_module, "_zeropower_via_newtonschulz", _torch_ns_float32)
    config = MuonConfig(lr=LR, weight_decay=WD, momentum=MU, nesterov=nesterov, ns_dtype="float32")
    worst_update, worst_momentum = _compare_with_torch_muon(config)
    assert worst_update < 1e-4
    assert worst_momentum < MOMENTUM_RTOL


# --------------------------------------------------------------------------------------
# Moonlight's equations, written out
# --------------------------------------------------------------------------------------


def _moonlight_ns5(u: torch.Tensor) -> torch.Tensor:
    """Newton-Schulz as in the Moonlight paper, one matrix, float32."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = u.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(5):
        big_a = x @ x.T
        big_b = b * big_a + c * big_a @ big_a
        x = a * x + big_b @ x
    return x.T if tall else x


class _MoonlightReference:
    """M <- mu M + G; U = G + mu M; O = NS5(U); W <- W (1 - lr wd) - lr 0.2 sqrt(max(A,B)) O."""

    def __init__(self, params: list[torch.Tensor], lr: float, wd: float, mu: float) -> None:
        self.params = [p.clone() for p in params]
        self.momenta = [torch.zeros_like(p) for p in params]
        self.lr, self.wd, self.mu = lr, wd, mu

    def step(self, grads: list[torch.Tensor]) -> None:
        for i, g in enumerate(grads):
            w, m = self.params[i], self.momenta[i]
            m = self.mu * m + g
            u = g + self.mu * m
            o = _moonlight_ns5(u)
            rows, cols = w.shape
            w = w * (1 - self.lr * self.wd) - self.lr * 0.2 * math.sqrt(max(rows, cols)) * o
            self.params[i], self.momenta[i] = w, m


def test_matches_moonlight_equations_rederived_in_float32() -> None:
    """Tolerance: 1e-5 relative on each step's update, 1e-6 absolute on the weights (they
    are ~0.1, steps ~4e-3): float32 roundoff only (muon_ds batches the two squares into one
    call and adds with ``alpha``; the reference does neither). Measured: 2.8e-6 and 6e-8.
    The momentum is the same two IEEE operations (mu * M, then + G) on both sides, so it
    must be bit-identical."""
    steps = 5
    init = _matrices(2)
    grads = _grad_sequence(steps, SHAPES, seed=3)
    ours = _leaves(init)
    opt = muon_ds.Muon(
        [(f"h.{i}.weight", p) for i, p in enumerate(ours)],
        MuonConfig(lr=LR, weight_decay=WD, momentum=MU, ns_dtype="float32"),
    )
    ref = _MoonlightReference(init, LR, WD, MU)
    for step_grads in grads:
        before_ours = [p.detach().clone() for p in ours]
        before_ref = [p.clone() for p in ref.params]
        for p, g in zip(ours, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
        ref.step(step_grads)
        for p, w, p0, w0 in zip(ours, ref.params, before_ours, before_ref, strict=True):
            assert _relative(p.detach() - p0, w - w0) < 1e-5
            torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-6)
        for p, m in zip(ours, ref.momenta, strict=True):
            assert torch.equal(opt.state[p]["momentum_buffer"], m)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("moonlight", lambda a, b: 0.2 * math.sqrt(max(a, b))),
        ("keller", lambda a, b: math.sqrt(max(1.0, a / b))),
        ("spectral", lambda a, b: math.sqrt(max(a, b))),
        ("none", lambda a, b: 1.0),
    ],
)
@pytest.mark.parametrize(("rows", "cols"), [(64, 16), (16, 64), (30, 30), (1, 100)])
def test_update_scale_follows_scale_mode_formula(
    mode: str, expected: Callable[[int, int], float], rows: int, cols: int
) -> None:
    assert update_scale(rows, cols, mode) == expected(rows, cols)


@pytest.mark.parametrize("mode", ["keller", "spectral", "none"])
def test_scale_mode_sets_step_size_relative_to_moonlight(mode: str) -> None:
    """Same gradient from W = 0: the step (then exactly -lr * scale * O) scales by the
    mode's factor relative to Moonlight's, up to one fp32 rounding each."""
    (grad,) = _grad_sequence(1, [(48, 16)], seed=5)[0]
    steps = {}
    for m in ("moonlight", mode):
        p = torch.zeros(48, 16, requires_grad=True)
        p.grad = grad.clone()
        muon_ds.Muon([("h.w", p)], MuonConfig(lr=LR, scale_mode=m)).step()
        steps[m] = p.detach()
    ratio = update_scale(48, 16, mode) / update_scale(48, 16, "moonlight")
    torch.testing.assert_close(steps[mode], steps["moonlight"] * ratio, rtol=1e-6, atol=0)


def test_momentum_is_float32_for_bfloat16_params() -> None:
    p = torch.randn(8, 12, dtype=torch.bfloat16, requires_grad=True)
    opt = muon_ds.Muon([("h.w", p)])
    g = torch.randn(8, 12, dtype=torch.bfloat16)
    p.grad = g
    opt.step()
    buf = opt.state[p]["momentum_buffer"]
    assert buf.dtype == torch.float32
    assert torch.equal(buf, g.float())
    assert p.dtype == torch.bfloat16


def test_param_without_grad_is_left_untouched_and_gets_no_state() -> None:
    a, b = _leaves(_matrices(6, [(8, 8), (8, 8)]))
    before = b.detach().clone()
    opt = muon_ds.Muon([("h.a", a), ("h.b", b)])
    a.grad = torch.randn(8, 8)
    opt.step()
    assert torch.equal(b.detach(), before)
    assert b not in opt.state


# --------------------------------------------------------------------------------------
# AdamW part
# --------------------------------------------------------------------------------------


class _TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.lm_head = torch.nn.Linear(8, 11, bias=False)


ADAMW_NAMES = ["embed.weight", "proj.bias", "norm.weight", "norm.bias", "lm_head.weight"]


def _set_grads(model: torch.nn.Module, gen: torch.Generator) -> None:
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)


def test_adamw_part_equals_torch_adamw_bit_for_bit(device: torch.device) -> None:
    """Embedding, biases, norm and head: same arithmetic as torch.optim.AdamW with
    betas (0.9, 0.95), eps 1e-8 and the same lr and weight decay: torch.equal. On a GPU
    both take torch's fused kernel (muon_ds always does there)."""
    torch.manual_seed(0)
    model = _TinyLM().to(device)
    opt = muon_ds.Muon(model, MuonConfig(lr=3e-3, weight_decay=0.1))
    adamw_params = [p for g in opt.param_groups if g["algorithm"] == "adamw" for p in g["params"]]
    named = dict(model.named_parameters())
    assert {id(p) for p in adamw_params} == {id(named[n]) for n in ADAMW_NAMES}
    mirror = {n: named[n].detach().clone().requires_grad_() for n in ADAMW_NAMES}
    ref = torch.optim.AdamW(
        list(mirror.values()),
        lr=3e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.1,
        fused=device.type == "cuda" or None,
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        _set_grads(model, gen)
        for n, q in mirror.items():
            q.grad = named[n].grad.clone()
        opt.step()
        ref.step()
        for n, q in mirror.items():
            assert torch.equal(named[n].detach(), q.detach()), n
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt.state[named[n]][key], ref.state[q][key]), (n, key)


# --------------------------------------------------------------------------------------
# Non-finite gradients
# --------------------------------------------------------------------------------------


def _snapshot(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    snap = {f"param{i}": p.detach().clone() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            snap[f"state{i}.{key}"] = value.clone()
    return snap


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["proj.weight", "lm_head.weight", "proj.bias"])
def test_nonfinite_gradient_skips_whole_step_and_next_finite_step_works(
    where: str, bad: float, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    model, twin = _TinyLM(), _TinyLM()
    twin.load_state_dict(model.state_dict())
    opt = muon_ds.Muon(model)
    twin_opt = muon_ds.Muon(twin)
    params, twin_params = list(model.parameters()), list(twin.parameters())
    gen = torch.Generator().manual_seed(1)

    def step_both(poison: bool) -> None:
        _set_grads(model, gen)
        for p, q in zip(params, twin_params, strict=True):
            q.grad = p.grad.clone()
        if poison:
            dict(model.named_parameters())[where].grad.view(-1)[3] = bad
        opt.step()
        if not poison:
            twin_opt.step()

    step_both(poison=False)
    before = _snapshot(opt, params)
    with caplog.at_level(logging.WARNING, logger="muon_ds"):
        step_both(poison=True)
    after = _snapshot(opt, params)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert opt.skipped_steps == 1
    assert opt.last_step_skipped is True
    warnings = [r for r in caplog.records if r.name == "muon_ds" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "non-finite gradient, step skipped" in warnings[0].getMessage()

    # The next finite step is exactly the step of an optimizer that never saw the bad one.
    step_both(poison=False)
    assert opt.last_step_skipped is False
    assert opt.skipped_steps == 1
    for p, q in zip(params, twin_params, strict=True):
        assert torch.all(torch.isfinite(p))
        assert torch.equal(p.detach(), q.detach())


def test_nonfinite_first_step_creates_no_state() -> None:
    model = _TinyLM()
    opt = muon_ds.Muon(model)
    before = [p.detach().clone() for p in model.parameters()]
    _set_grads(model, torch.Generator().manual_seed(0))
    model.embed.weight.grad[0, 0] = math.nan
    opt.step()
    assert len(opt.state) == 0
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True))


# --------------------------------------------------------------------------------------
# state_dict round trip
# --------------------------------------------------------------------------------------


class _MixedPrecisionNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(9, 12)
        self.hidden = torch.nn.Linear(12, 20)
        self.hidden_bf16 = torch.nn.Linear(20, 12, bias=False).to(torch.bfloat16)
        self.conv = torch.nn.Conv1d(3, 4, 2)


def _through_bytes(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("transport", ["in_memory", "torch_save_bytesio"])
def test_state_dict_round_trip_continues_bit_identically(transport: str) -> None:
    torch.manual_seed(0)
    model = _MixedPrecisionNet()
    opt = muon_ds.Muon(model, MuonConfig(lr=1e-2))

    def grads_for(m: torch.nn.Module, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)

    for step in range(3):
        grads_for(model, 100 + step)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    if transport == "torch_save_bytesio":
        saved = _through_bytes(saved)

    resumed_model = _MixedPrecisionNet()
    resumed_model.load_state_dict(model.state_dict())
    resumed = muon_ds.Muon(resumed_model, MuonConfig(lr=1e-2))
    resumed.load_state_dict(saved)

    momentum = resumed.state[resumed_model.hidden_bf16.weight]["momentum_buffer"]
    saved_momentum = opt.state[model.hidden_bf16.weight]["momentum_buffer"]
    assert momentum.dtype == torch.float32
    assert torch.equal(momentum, saved_momentum)
    # ... and that fp32 value is not one a bf16 round trip would preserve.
    assert not torch.equal(saved_momentum.bfloat16().float(), saved_momentum)

    for step in range(3, 6):
        grads_for(model, 100 + step)
        grads_for(resumed_model, 100 + step)
        opt.step()
        resumed.step()
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p.detach(), q.detach()), name
        for key, value in opt.state[p].items():
            assert torch.equal(value, resumed.state[q][key]), (name, key)
            assert value.dtype == resumed.state[q][key].dtype


# --------------------------------------------------------------------------------------
# Learning rate and weight decay come from the param group
# --------------------------------------------------------------------------------------


def _run(
    lrs: list[float] | None, scheduler: bool, base_lr: float = 1e-2
) -> tuple[list[torch.Tensor], muon_ds.Muon]:
    torch.manual_seed(0)
    model = _TinyLM()
    opt = muon_ds.Muon(model, MuonConfig(lr=base_lr))
    sched = (
        torch.optim.lr_scheduler.LambdaLR(opt, lambda t: [1.0, 0.5, 0.1, 0.02, 0.0][t])
        if scheduler
        else None
    )
    gen = torch.Generator().manual_seed(1)
    for t in range(4):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[t]
        _set_grads(model, gen)
        opt.step()
        if sched is not None:
            sched.step()
    return [p.detach().clone() for p in model.parameters()], opt


def test_scheduler_lr_in_param_group_drives_both_parts() -> None:
    """A LambdaLR run equals a run whose group lr is set by hand to the same values, and
    differs from a constant-lr run in every parameter (Muon and AdamW alike)."""
    scheduled, opt = _run(None, scheduler=True)
    assert {g["algorithm"] for g in opt.param_groups} == {"muon", "adamw"}
    by_hand, _ = _run([1e-2, 5e-3, 1e-3, 2e-4], scheduler=False)
    constant, _ = _run(None, scheduler=False)
    for s, h, c in zip(scheduled, by_hand, constant, strict=True):
        assert torch.equal(s, h)
        assert not torch.equal(s, c)


def test_group_lr_equals_config_lr() -> None:
    """Setting a group's lr is exactly the same as building the optimizer with that lr."""
    via_group, _ = _run([3e-3] * 4, scheduler=False, base_lr=1e-2)
    via_config, _ = _run(None, scheduler=False, base_lr=3e-3)
    for a, b in zip(via_group, via_config, strict=True):
        assert torch.equal(a, b)


def test_user_param_groups_keep_their_own_lr_and_weight_decay() -> None:
    a, b = _leaves(_matrices(7, [(16, 24), (16, 24)]))
    ga, gb = _grad_sequence(1, [(16, 24), (16, 24)], seed=8)[0]
    opt = muon_ds.Muon(
        [
            {"params": [("h.a", a)], "lr": 1e-2, "weight_decay": 0.0},
            {"params": [("h.b", b)], "weight_decay": 0.5},
        ],
        MuonConfig(lr=2e-3),
    )
    solo_a, solo_b = _leaves([a.detach(), b.detach()])
    a.grad, b.grad = ga.clone(), gb.clone()
    opt.step()
    solo_a.grad, solo_b.grad = ga.clone(), gb.clone()
    muon_ds.Muon([("h.a", solo_a)], MuonConfig(lr=1e-2, weight_decay=0.0)).step()
    muon_ds.Muon([("h.b", solo_b)], MuonConfig(lr=2e-3, weight_decay=0.5)).step()
    assert torch.equal(a.detach(), solo_a.detach())
    assert torch.equal(b.detach(), solo_b.detach())


def test_keyword_overrides_replace_config_fields_and_are_validated() -> None:
    p = torch.zeros(4, 4, requires_grad=True)
    opt = muon_ds.Muon([("h.w", p)], MuonConfig(lr=0.5, momentum=0.9), weight_decay=0.0)
    assert (opt.config.lr, opt.config.momentum, opt.config.weight_decay) == (0.5, 0.9, 0.0)
    assert opt.param_groups[0]["weight_decay"] == 0.0
    with pytest.raises(muon_ds.MuonConfigError, match=r"momentum=1\.0 is not allowed"):
        muon_ds.Muon([("h.w", p)], momentum=1.0)
