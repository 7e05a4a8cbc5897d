"""The 75 Runware scheduler names, each turned into a sampler that is correct for flow matching.

HiDream-I1 is a flow-matching model: ``x_t = (1 - t) * x0 + t * noise`` and the network (after the
engine negates it and applies CFG) returns the velocity ``v = noise - x0``. A name becomes a
``FlowSampler`` in one of two ways:

- a diffusers scheduler that supports flow matching (``FlowMatchEuler/Heun``, and ``UniPC``,
  ``DPMSolverMultistep``, ``DPMSolverSinglestep``, ``DEISMultistep`` configured with
  ``use_flow_sigmas`` + ``prediction_type="flow_prediction"``), driven exactly like diffusers'
  ``HiDreamImagePipeline`` drives it (``DiffusersFlowSampler``);
- a sampler written on the flow ODE/SDE in ``flow_samplers`` where no diffusers class fits
  (LMS, IPNDM, PNDM, DDIM, DDPM, KDPM2 (+ancestral), Euler ancestral, DPM++ SDE, DPM++ 3M SDE,
  LCM, TCD).

Sigma schedules are ``native`` (what the diffusers class computes itself for flow matching:
FlowMatchEuler/Heun ``shift(linspace(1, shift(1/1000), N))``; UniPC ``shift(linspace(1, 1/1000,
N + 1)[:-1])``; DPM-Solver/DEIS ``shift(linspace(0.999, 0, N + 1)[:-1])``; each then 0; for the
engine samplers "native" means uniform) or one of ``sigmas.SIGMA_SCHEDULES``, which replace the
scheduler's sigmas after ``set_timesteps``. ``NAME_TABLE`` is the single source of truth; the
table in docs/schedulers.md is generated from it (``scheduler_table_markdown``).

Names beyond one algorithm: "DPM++" = "DPM++ 2M" and "UniPC" = "UniPC 2M" (the diffusers
defaults); "X Uniform Y" = "X Y" (the Y spacing between the uniform schedule's ends);
"DPMSolverMultistepInverse" runs DPM-Solver++ 2M forward (inversion maps an image to noise and
needs an input image; a text-to-image sampler starts from noise); "EulerDiscreteScheduler" runs
the flow-match Euler class; "EDM*" names run their solver on the Karras (rho 7) schedule, all
that remains of EDM on a flow model (EDM's Euler step in VE coordinates is the flow Euler step).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ..limits import STEPS
from ..limits import schedulers as names
from ..limits.check import check_choice, check_int, check_number
from ..limits.schedulers import (
    DEFAULT_SHIFT,
    NAME_TABLE,
    SCHEDULER_NAMES,
    SHIFT,
    SIGMA_SCHEDULES,
    VARIANTS,
    SchedulerInfo,
    check_scheduler_name,
)
from . import flow_samplers
from .sigmas import flow_sigmas

ModelFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
NoiseFn = Callable[[], torch.Tensor]
StepFn = Callable[[int, float], None]

# HiDream-ai/HiDream-I1-Full scheduler/scheduler_config.json (the fields that matter with flow sigmas).
HIDREAM_FULL_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "solver_order": 2,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "final_sigmas_type": "zero",
    "timestep_spacing": "linspace",
    "disable_corrector": [],
}
# The same flow-matching switches for the other log-SNR multistep solvers.
_FLOW_SOLVER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "timestep_spacing": "linspace",
    "lower_order_final": True,
    "final_sigmas_type": "zero",
}
# Log-SNR solvers take log(alpha_t) with alpha_t = 1 - sigma: keep the first sigma just below 1
# (diffusers' UniPC does the same to its own schedule).
_LOGSNR_MAX_SIGMA = 1.0 - 1e-6


class FlowSampler(Protocol):
    sigmas: torch.Tensor

    def sample(self, model: ModelFn, x: torch.Tensor, noise: NoiseFn, on_step: StepFn) -> torch.Tensor: ...


@dataclass(frozen=True)
class SchedulerSpec:
    """The HIDREAM_SCHEDULER value: a scheduler name and an optional shift (None = variant default)."""

    name: str
    shift: float | None = None

    def __post_init__(self) -> None:
        check_scheduler_name(self.name)
        if self.shift is not None:
            validate_shift(self.shift)


def validate_shift(shift: float) -> float:
    return check_number("shift", shift, SHIFT, " (or unset for the variant default)")


def resolve(spec: SchedulerSpec, variant: str) -> tuple[SchedulerInfo, float]:
    """The concrete table entry and shift a spec runs with for ``variant`` (``Default`` resolved)."""
    check_choice("variant", variant, VARIANTS)
    shift = DEFAULT_SHIFT[variant] if spec.shift is None else float(spec.shift)
    info = NAME_TABLE[check_scheduler_name(spec.name)]
    if info.impl == "default":
        info = names.UNIPC_2M if variant == "full" else NAME_TABLE["FlowMatchEulerDiscreteScheduler"]
    return info, shift


def make_sampler(spec: SchedulerSpec, variant: str, steps: int) -> FlowSampler:
    """A fresh sampler (no state shared between calls) for ``steps`` steps."""
    check_int("steps", steps, STEPS)
    info, shift = resolve(spec, variant)
    kind, _, target = info.impl.partition(":")
    if kind == "engine":
        return flow_samplers.EngineSampler(target, flow_sigmas(_engine_schedule(info), steps, shift))
    return DiffusersFlowSampler(
        _build_diffusers(target, dict(info.options), shift), steps, info.schedule, shift
    )


def _engine_schedule(info: SchedulerInfo) -> str:
    return "uniform" if info.schedule == "native" else info.schedule


def _build_diffusers(cls_name: str, options: dict, shift: float):
    import diffusers

    cls = getattr(diffusers, cls_name)
    if cls_name == names.EULER:
        return cls(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    if cls_name == names.HEUN:
        return cls(num_train_timesteps=1000, shift=shift)
    base = HIDREAM_FULL_SCHEDULER_CONFIG if cls_name == names.UNIPC else _FLOW_SOLVER_CONFIG
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in base.items() if k in accepted}
    return cls(**{**config, "flow_shift": shift, **options})


class DiffusersFlowSampler:
    """Drives a diffusers scheduler the way ``HiDreamImagePipeline`` does.

    ``schedule`` other than ``native`` replaces the scheduler's sigmas (and the timesteps derived
    from them, in the scheduler's own dtype) after ``set_timesteps``, so every family can run every
    documented sigma array.
    """

    def __init__(self, scheduler, steps: int, schedule: str, shift: float) -> None:
        self._sched = scheduler
        self._setup = (steps, schedule, shift)
        name = type(scheduler).__name__
        self._two_evals = name == names.HEUN
        self._sde = getattr(scheduler.config, "algorithm_type", "") == "sde-dpmsolver++"
        # DEIS's epsilon-form update cannot reach sigma 0 (0 * inf) and diffusers' flow DEIS stops
        # at the last nonzero sigma; its final step into 0 is taken here as the first-order data
        # prediction x0 = x - sigma * v, like the other solvers' final_sigmas_type="zero" step.
        self._x0_final = name == names.DEIS
        self._prepare()
        sig = scheduler.sigmas.to(torch.float32)
        self.sigmas = torch.cat([sig[:1], sig[1::2]]) if self._two_evals else sig.clone()

    def _prepare(self) -> None:
        """(Re)set the scheduler's timesteps and state, so ``sample`` may run more than once."""
        steps, schedule, shift = self._setup
        self._sched.set_timesteps(steps)
        if schedule != "native":
            self._override(flow_sigmas(schedule, steps, shift))
        if self._x0_final:
            self._sched.sigmas[-1] = 0.0
        self._sched.set_begin_index(0)

    def _override(self, sigmas: torch.Tensor) -> None:
        sched = self._sched
        name = type(sched).__name__
        if name == names.EULER:
            sched.timesteps = (sigmas[:-1] * 1000).to(torch.float32)
            sched.sigmas = sigmas.to(torch.float32)
            return
        if name == names.HEUN:
            s = sigmas.to(torch.float32)
            sched.sigmas = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
            t = s[:-1] * 1000
            sched.timesteps = torch.cat([t[:1], t[1:].repeat_interleave(2)])
            return
        s = sigmas.clone()
        s[0] = min(float(s[0]), _LOGSNR_MAX_SIGMA)
        dtype = sched.timesteps.dtype
        sched.timesteps = torch.from_numpy((s[:-1].numpy() * 1000).astype("int64")).to(dtype)
        sched.sigmas = s.to(torch.float32)

    def sample(self, model: ModelFn, x: torch.Tensor, noise: NoiseFn, on_step: StepFn) -> torch.Tensor:
        self._prepare()
        sched = self._sched
        dtype = x.dtype
        step = -1
        last = len(sched.timesteps) - 1
        for j, t in enumerate(sched.timesteps):
            sigma = float(sched.sigmas[j])
            if not self._two_evals or sched.state_in_first_order:
                step += 1
                on_step(step, sigma)
            v = model(x, t, sigma)
            if self._x0_final and j == last:
                x = (x.to(torch.float32) - sigma * v.to(torch.float32)).to(dtype)
                break
            if self._sde:
                x = sched.step(v, t, x, variance_noise=noise(), return_dict=False)[0]
            else:
                x = sched.step(v, t, x, return_dict=False)[0]
            if x.dtype != dtype:
                x = x.to(dtype)
        return x


def scheduler_table_markdown() -> str:
    """The docs/schedulers.md table: every name, what family runs, its order, noise, schedule and implementation."""
    rows = [
        "| Name | Family | Order | Stochastic | Sigma schedule | Implementation | Note |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, info in NAME_TABLE.items():
        sched = _engine_schedule(info) if info.impl.startswith("engine") else info.schedule
        impl = "Full: `UniPCMultistepScheduler`, Dev/Fast: `FlowMatchEulerDiscreteScheduler`"
        if info.impl != "default":
            kind, _, target = info.impl.partition(":")
            impl = f"`{target}`" + (
                " (diffusers)" if kind == "diffusers" else " (`hidream.sampling.flow_samplers`)"
            )
        opts = ", ".join(f"{k}={v}" for k, v in info.options)
        note = "; ".join(p for p in (opts, info.note) if p)
        rows.append(
            f"| {name} | {info.family} | {info.order} | {'yes' if info.stochastic else 'no'} | {sched} | {impl} | {note} |"
        )
    return "\n".join(rows)


__all__ = [
    "DEFAULT_SHIFT",
    "NAME_TABLE",
    "SCHEDULER_NAMES",
    "SIGMA_SCHEDULES",
    "FlowSampler",
    "SchedulerInfo",
    "SchedulerSpec",
    "make_sampler",
    "resolve",
    "check_scheduler_name",
    "validate_shift",
]
