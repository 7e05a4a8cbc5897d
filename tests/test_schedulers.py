"""The 75 scheduler names: each runs, is deterministic per seed and is correct for flow matching.

Correctness uses the analytic Gaussian flow problem. With data x0 ~ N(mu, s^2) per dimension and
x_t = (1 - t) x0 + t z, the marginal is N((1 - t) mu, S(t)^2) with S(t)^2 = (1 - t)^2 s^2 + t^2, the
exact velocity is v(x, t) = -mu + S'(t) (x - (1 - t) mu) / S(t), and the ODE carries the noise z at
t = 1 to exactly mu + s z at t = 0. Deterministic samplers are checked against that endpoint,
stochastic ones against the data's mean and standard deviation.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hidream_pack.hidream.sampling import flow_samplers, schedulers, sigmas
from hidream_pack.hidream.sampling.schedulers import (
    DEFAULT_SHIFT,
    HIDREAM_FULL_SCHEDULER_CONFIG,
    NAME_TABLE,
    SCHEDULER_NAMES,
    SchedulerSpec,
    check_scheduler_name,
    make_sampler,
)
from hidream_pack.nodes.scheduler import HiDreamI1Scheduler

SPEC = Path(__file__).resolve().parent.parent.parent / "shared" / "spec" / "runware-scheduler-names.txt"
MU, STD = 0.3, 0.5
DETERMINISTIC = [n for n in SCHEDULER_NAMES if not schedulers.resolve(SchedulerSpec(n), "full")[0].stochastic]
STOCHASTIC = [n for n in SCHEDULER_NAMES if schedulers.resolve(SchedulerSpec(n), "full")[0].stochastic]
# LCM and TCD are consistency-model samplers: they are defined for a model whose x0 = x - t v is the
# ODE endpoint (a distilled model), so they are checked against that field.
CONSISTENCY = {"engine:lcm", "engine:tcd"}


def _marginal_std(t: float) -> float:
    return math.sqrt((1 - t) ** 2 * STD**2 + t**2)


def flow_velocity(x: torch.Tensor, timestep: torch.Tensor, sigma: float) -> torch.Tensor:
    """Exact velocity of the Gaussian problem (the posterior mean E[z - x0 | x_t])."""
    big = _marginal_std(sigma)
    slope = (sigma - (1 - sigma) * STD**2) / big
    return -MU + slope * (x - (1 - sigma) * MU) / big


def consistency_velocity(x: torch.Tensor, timestep: torch.Tensor, sigma: float) -> torch.Tensor:
    """A consistency model's velocity: x - t v is the ODE endpoint, not the posterior mean."""
    if sigma <= 0:
        return flow_velocity(x, timestep, sigma)
    endpoint = MU + STD * (x - (1 - sigma) * MU) / _marginal_std(sigma)
    return (x - endpoint) / sigma


def _ode_error(name: str, steps: int) -> float:
    z = torch.linspace(-3, 3, 61).view(1, 1, 61, 1)
    out = make_sampler(SchedulerSpec(name), "full", steps).sample(flow_velocity, z, _no_noise, _ignore)
    return (out - (MU + STD * z)).abs().max().item()


def _no_noise() -> torch.Tensor:
    raise AssertionError("a deterministic sampler asked for noise")


def _ignore(i: int, sigma: float) -> None:
    return None


# --- names, validation, node ------------------------------------------------------------------


def test_names_are_the_75_spec_names_in_spec_order():
    """Against the spec file in ../shared/spec (beside the checkout in CI and development)."""
    if not SPEC.is_file():
        pytest.skip(f"the spec file is not beside this checkout ({SPEC})")
    expected = SPEC.read_text().splitlines()
    assert len(expected) == 75
    assert list(SCHEDULER_NAMES) == expected
    assert "Default" in SCHEDULER_NAMES and "UniPCMultistepScheduler" not in SCHEDULER_NAMES


def test_unknown_name_lists_the_closest_valid_names():
    with pytest.raises(ValueError) as err:
        check_scheduler_name("DPM++ 2M Karas")
    msg = str(err.value)
    assert msg.startswith("scheduler: unknown name 'DPM++ 2M Karas'; closest valid names: DPM++ 2M Karras")
    with pytest.raises(ValueError, match=r"closest valid names: Euler a"):
        SchedulerSpec("euler_a")
    with pytest.raises(ValueError, match=r"scheduler: unknown name 42"):
        check_scheduler_name(42)


def test_shift_variant_and_steps_are_validated():
    with pytest.raises(ValueError, match=r"shift: got 0.05; allowed: a number from 0.1 to 20"):
        SchedulerSpec("Euler", 0.05)
    with pytest.raises(ValueError, match=r'variant: got "turbo"; allowed: one of full, dev, fast'):
        make_sampler(SchedulerSpec("Euler"), "turbo", 4)
    with pytest.raises(ValueError, match=r"steps: got 0; allowed: an integer from 1 to 1000"):
        make_sampler(SchedulerSpec("Euler"), "full", 0)


def test_node_returns_the_spec_and_maps_zero_shift_to_the_variant_default():
    spec = HiDreamI1Scheduler.INPUT_TYPES()["required"]
    assert spec["scheduler"][0] == list(SCHEDULER_NAMES)
    assert spec["scheduler"][1]["default"] == "Default"
    assert spec["shift"][1]["default"] == 0.0
    node = HiDreamI1Scheduler()
    assert node.build("Default", 0.0) == (SchedulerSpec("Default", None),)
    assert node.build("DPM++ 2M Karras", 4.5) == (SchedulerSpec("DPM++ 2M Karras", 4.5),)
    with pytest.raises(ValueError, match=r"shift: got 0.05"):
        node.build("Euler", 0.05)


def test_default_resolves_per_variant_and_a_given_shift_overrides():
    assert DEFAULT_SHIFT == {"full": 3.0, "dev": 6.0, "fast": 3.0}
    full, shift = schedulers.resolve(SchedulerSpec("Default"), "full")
    assert (full.impl, shift) == ("diffusers:UniPCMultistepScheduler", 3.0)
    dev, shift = schedulers.resolve(SchedulerSpec("Default"), "dev")
    assert (dev.impl, shift) == ("diffusers:FlowMatchEulerDiscreteScheduler", 6.0)
    fast, shift = schedulers.resolve(SchedulerSpec("Default", 4.0), "fast")
    assert (fast.impl, shift) == ("diffusers:FlowMatchEulerDiscreteScheduler", 4.0)


def test_default_schedules_are_the_pipelines_own():
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    unipc = UniPCMultistepScheduler.from_config(HIDREAM_FULL_SCHEDULER_CONFIG)
    unipc.set_timesteps(7)
    assert torch.equal(make_sampler(SchedulerSpec("Default"), "full", 7).sigmas, unipc.sigmas)
    euler = FlowMatchEulerDiscreteScheduler(shift=6.0, use_dynamic_shifting=False)
    euler.set_timesteps(7)
    assert torch.equal(make_sampler(SchedulerSpec("Default"), "dev", 7).sigmas, euler.sigmas)


def test_readme_table_has_a_row_per_name():
    rows = schedulers.scheduler_table_markdown().splitlines()[2:]
    assert [r.split(" | ")[0].removeprefix("| ") for r in rows] == list(SCHEDULER_NAMES)


# --- sigma schedules ----------------------------------------------------------------------------


def test_uniform_schedule_is_the_shifted_linear_ramp():
    assert sigmas.uniform_sigmas(4, 3.0).tolist() == [1.0, 0.9, 0.75, 0.5, 0.0]
    assert sigmas.uniform_sigmas(2, 1.0).tolist() == [1.0, 0.5, 0.0]


def test_karras_exponential_and_beta_arrays():
    lo = 3.0 * 0.001 / (1 + 2.0 * 0.001)  # shift(1/1000) at shift 3
    karras = sigmas.karras_sigmas(4, 3.0)
    expected = [(1 + r * (lo ** (1 / 7) - 1)) ** 7 for r in (0, 1 / 3, 2 / 3, 1)] + [0.0]
    assert karras.tolist() == pytest.approx(expected, rel=1e-12, abs=0)
    expo = sigmas.exponential_sigmas(4, 3.0)
    assert expo.tolist() == pytest.approx([lo**r for r in (0, 1 / 3, 2 / 3, 1)] + [0.0], rel=1e-12, abs=0)
    # Beta(0.6, 0.6) is symmetric: its median is 1/2 and quantiles q and 1 - q sum to 1.
    assert sigmas.beta_sigmas(3, 3.0).tolist() == pytest.approx(
        [1.0, lo + 0.5 * (1 - lo), lo, 0.0], abs=1e-12
    )
    five = sigmas.beta_sigmas(5, 3.0).tolist()
    assert (five[1] - lo) + (five[3] - lo) == pytest.approx(1 - lo, abs=1e-12)


def test_beta_cdf_matches_closed_forms():
    # Beta(1/2, 1/2) is the arcsine law; Beta(1, 1) is uniform.
    for x in (0.01, 0.3, 0.5, 0.77, 0.999):
        assert sigmas.beta_cdf(x, 0.5, 0.5) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)), abs=1e-12)
        assert sigmas.beta_cdf(x, 1.0, 1.0) == pytest.approx(x, abs=1e-12)
        assert sigmas.beta_cdf(sigmas.beta_ppf(x, 0.6, 0.6), 0.6, 0.6) == pytest.approx(x, abs=1e-12)


@pytest.mark.parametrize("kind", sigmas.SIGMA_SCHEDULES)
def test_every_schedule_starts_at_one_ends_at_zero_and_falls(kind):
    for steps in (1, 2, 3, 10, 50):
        for shift in (0.1, 1.0, 3.0, 6.0, 20.0):
            sig = sigmas.flow_sigmas(kind, steps, shift)
            assert len(sig) == steps + 1
            assert sig[0].item() == 1.0 and sig[-1].item() == 0.0
            assert bool((sig[1:] < sig[:-1]).all()), (kind, steps, shift)
    with pytest.raises(ValueError, match=r"sigma schedule: got 'cosine'; allowed: uniform, karras"):
        sigmas.flow_sigmas("cosine", 4, 3.0)


def test_named_schedules_reach_the_sampler():
    expected = sigmas.karras_sigmas(8, 3.0).to(torch.float32)
    euler = make_sampler(SchedulerSpec("Euler Karras"), "full", 8).sigmas
    assert torch.equal(euler, expected)
    lms = make_sampler(SchedulerSpec("LMS Karras"), "full", 8).sigmas
    assert torch.equal(lms, expected)
    dpm = make_sampler(SchedulerSpec("DPM++ 2M Karras"), "full", 8).sigmas
    assert torch.equal(dpm[1:], expected[1:]) and dpm[0].item() == pytest.approx(1 - 1e-6, abs=1e-7)


# --- all 75 names on the tiny transformer ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_transformer):
    transformer = tiny_transformer
    gen = torch.Generator().manual_seed(1)
    t5, llama = torch.randn(1, 8, 32, generator=gen), torch.randn(4, 1, 8, 32, generator=gen)
    pooled = torch.randn(1, 32, generator=gen)
    seen: list[tuple[torch.Tensor, float]] = []

    @torch.no_grad()
    def model(x: torch.Tensor, timestep: torch.Tensor, sigma: float) -> torch.Tensor:
        seen.append((timestep, sigma))
        out = transformer(
            hidden_states=x,
            timesteps=timestep.expand(x.shape[0]),
            encoder_hidden_states_t5=t5,
            encoder_hidden_states_llama3=llama,
            pooled_embeds=pooled,
            return_dict=False,
        )[0]
        return -out

    return model, seen


def _run(model, name: str, seed: int, steps: int = 3, noise_seed: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 8, 8, generator=gen)
    if noise_seed is not None:
        gen = torch.Generator().manual_seed(noise_seed)
    calls: list[tuple[int, float]] = []
    sampler = make_sampler(SchedulerSpec(name), "full", steps)
    out = sampler.sample(
        model, x, lambda: torch.randn(x.shape, generator=gen), lambda i, s: calls.append((i, s))
    )
    return out, calls, sampler


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_name_runs_three_steps_on_the_tiny_transformer(tiny_model, name):
    model, seen = tiny_model
    seen.clear()
    out, calls, sampler = _run(model, name, seed=7)
    assert out.shape == (1, 16, 8, 8) and bool(torch.isfinite(out).all())
    assert [i for i, _ in calls] == [0, 1, 2]
    assert [s for _, s in calls] == sampler.sigmas[:3].tolist()
    assert len(sampler.sigmas) == 4 and sampler.sigmas[-1].item() == 0.0
    assert all(t.dim() == 0 for t, _ in seen)
    if NAME_TABLE[name].impl.startswith("engine:"):
        assert all(t.dtype == torch.float32 and t.item() == pytest.approx(s * 1000) for t, s in seen)
    torch.manual_seed(12345)  # the global RNG must not matter
    again, _, _ = _run(model, name, seed=7)
    assert torch.equal(out, again)
    if name in STOCHASTIC:  # same start, other noise stream: the noise comes from noise() only
        assert not torch.equal(_run(model, name, seed=7, noise_seed=99)[0], out)


def test_a_sampler_can_run_twice_and_instances_share_no_state(tiny_model):
    model, _ = tiny_model
    for name in ("Default", "DPM++ 2M SDE Karras", "Heun Karras", "LMS"):
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(1, 16, 8, 8, generator=gen)
        zeros = torch.zeros_like(x)
        sampler = make_sampler(SchedulerSpec(name), "full", 4)
        first = sampler.sample(model, x, zeros.clone, _ignore)
        other = make_sampler(SchedulerSpec(name), "full", 4)
        assert torch.equal(other.sample(model, x, zeros.clone, _ignore), first)
        assert torch.equal(sampler.sample(model, x, zeros.clone, _ignore), first)


# --- the analytic flow problem -------------------------------------------------------------------


def _bound(order: int, steps: int) -> float:
    """Error bound C / N^p with p = min(order, 2): at 30 steps with shift 3 the low-noise end gets
    few steps and the third/fourth-order methods are not yet in their asymptotic regime."""
    return 6.0 / steps if order == 1 else 80.0 / steps**2


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_converge_on_the_gaussian_flow(name):
    order = schedulers.resolve(SchedulerSpec(name), "full")[0].order
    e15, e30 = _ode_error(name, 15), _ode_error(name, 30)
    assert e30 < _bound(order, 30), (name, e30)
    # First order: halves from 15 to 30 steps (>= 1.9: the 1/N^2 term of a first-order error is not
    # zero at 15 steps). Higher orders: strictly better than first order.
    assert e15 / e30 >= (1.9 if order == 1 else 2.1), (name, e15, e30)


def _moments(name: str, steps: int, shift: float | None = None) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 200, 200, generator=gen)
    info = schedulers.resolve(SchedulerSpec(name), "full")[0]
    model = consistency_velocity if info.impl in CONSISTENCY else flow_velocity
    sampler = make_sampler(SchedulerSpec(name, shift), "full", steps)
    out = sampler.sample(model, x, lambda: torch.randn(x.shape, generator=gen), _ignore)
    return out.mean().item(), out.std().item() / STD - 1


@pytest.mark.parametrize("name", [n for n in STOCHASTIC if NAME_TABLE[n].impl != "engine:tcd"])
def test_stochastic_samplers_match_the_data_distribution(name):
    """40000 draws at 100 steps: mean within 0.01 (4 standard errors) and std within 8%.

    Ancestral samplers (DDPM, Euler a, DPM++ SDE) insert the model's x0 (a posterior mean) at every
    step, which loses variance at a rate O(step): their std bias must also shrink by more than half
    from 30 to 100 steps, the signature of a correct first-order sampler.
    """
    mean, rel_std = _moments(name, 100)
    assert abs(mean - MU) < 0.01, (name, mean)
    assert abs(rel_std) < 0.08, (name, rel_std)
    _, rel_std_30 = _moments(name, 30)
    if abs(rel_std_30) > 0.03:
        assert abs(rel_std) < abs(rel_std_30) / 2, (name, rel_std_30, rel_std)


def test_tcd_is_between_ddim_and_lcm_and_keeps_the_mean():
    """TCD's gamma interpolates DDIM (gamma 0, deterministic) and LCM (gamma 1), exactly."""
    sig = [float(v) for v in sigmas.uniform_sigmas(6, 3.0)]
    x = torch.randn(1, 1, 50, 50, generator=torch.Generator().manual_seed(0))

    def run(fn, **kw):
        gen = torch.Generator().manual_seed(1)
        return fn(
            lambda xt, t: flow_velocity(xt, None, t),
            x,
            sig,
            lambda: torch.randn(x.shape, generator=gen),
            _ignore,
            **kw,
        )

    assert torch.equal(run(flow_samplers.tcd_like, gamma=0.0), run(flow_samplers.ddim))
    assert torch.equal(run(flow_samplers.tcd_like, gamma=1.0), run(flow_samplers.lcm))
    mean, _ = _moments("TCDScheduler", 100)
    assert abs(mean - MU) < 0.01
