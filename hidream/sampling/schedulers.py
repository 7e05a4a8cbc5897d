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

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from . import flow_samplers
from .sigmas import SIGMA_SCHEDULES, flow_sigmas

ModelFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
NoiseFn = Callable[[], torch.Tensor]
StepFn = Callable[[int, float], None]

VARIANTS = ("full", "dev", "fast")
DEFAULT_SHIFT: dict[str, float] = {"full": 3.0, "dev": 6.0, "fast": 3.0}
SHIFT_RANGE = (0.1, 20.0)

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
_DEIS = "DEISMultistepScheduler"


class FlowSampler(Protocol):
    sigmas: torch.Tensor

    def sample(self, model: ModelFn, x: torch.Tensor, noise: NoiseFn, on_step: StepFn) -> torch.Tensor: ...


@dataclass(frozen=True)
class SchedulerInfo:
    """What a name runs. ``impl`` is ``diffusers:<Class>``, ``engine:<function>`` or ``default``."""

    family: str
    impl: str
    order: int
    stochastic: bool
    schedule: str  # "native" or one of SIGMA_SCHEDULES
    options: tuple[tuple[str, object], ...] = ()
    note: str = ""


def _d(
    cls: str,
    family: str,
    order: int,
    schedule: str = "native",
    stochastic: bool = False,
    note: str = "",
    **opts,
):
    return SchedulerInfo(
        family, f"diffusers:{cls}", order, stochastic, schedule, tuple(sorted(opts.items())), note
    )


def _e(fn: str, family: str, order: int, schedule: str = "uniform", stochastic: bool = False, note: str = ""):
    return SchedulerInfo(family, f"engine:{fn}", order, stochastic, schedule, (), note)


_EULER = "FlowMatchEulerDiscreteScheduler"
_HEUN = "FlowMatchHeunDiscreteScheduler"
_UNIPC = "UniPCMultistepScheduler"
_DPM = "DPMSolverMultistepScheduler"


def _unipc(order: int, schedule: str = "native") -> SchedulerInfo:
    return _d(_UNIPC, f"UniPC (bh2, order {order})", order, schedule, solver_order=order)


def _dpm(order: int, schedule: str = "native", sde: bool = False, note: str = "") -> SchedulerInfo:
    family = f"DPM-Solver++ {order}M" + (" SDE" if sde else "")
    algo = "sde-dpmsolver++" if sde else "dpmsolver++"
    return _d(_DPM, family, order, schedule, sde, note, solver_order=order, algorithm_type=algo)


def _dpmpp_sde(schedule: str = "uniform") -> SchedulerInfo:
    return _e(
        "dpmpp_sde", "DPM-Solver++(2S) SDE", 2, schedule, True, "k-diffusion's DPM++ SDE on the flow path"
    )


def _ipndm(schedule: str) -> SchedulerInfo:
    return _e("ipndm", "iPNDM (Adams-Bashforth 4)", 4, schedule)


_DISTILLED = "for consistency-distilled models; on a plain flow model samples are under-dispersed"
_ALIAS = "'Uniform X' is the X spacing between the uniform schedule's ends, the same array as 'X'"

NAME_TABLE: dict[str, SchedulerInfo] = {
    "DDIM": _e("ddim", "DDIM (eta 0)", 1, note="equals flow Euler algebraically"),
    "DDIMScheduler": _e("ddim", "DDIM (eta 0)", 1, note="equals flow Euler algebraically"),
    "DDPMScheduler": _e(
        "ddpm",
        "DDPM ancestral (posterior)",
        1,
        stochastic=True,
        note="same update as Euler a, written as DDPM",
    ),
    "DEISMultistepScheduler": _d(_DEIS, "DEIS (logrho, order 2)", 2, solver_order=2),
    "Default": SchedulerInfo(
        "variant default", "default", 2, False, "native", (), "Full: UniPC; Dev/Fast: Euler"
    ),
    "DPM++": _dpm(2),
    "DPM++ 2M": _dpm(2),
    "DPM++ 2M Beta": _dpm(2, "beta"),
    "DPM++ 2M Exponential": _dpm(2, "exponential"),
    "DPM++ 2M Karras": _dpm(2, "karras"),
    "DPM++ 2M SDE": _dpm(2, sde=True),
    "DPM++ 2M SDE Beta": _dpm(2, "beta", sde=True),
    "DPM++ 2M SDE Exponential": _dpm(2, "exponential", sde=True),
    "DPM++ 2M SDE Karras": _dpm(2, "karras", sde=True),
    "DPM++ 2M SDE Uniform": _dpm(2, "uniform", sde=True),
    "DPM++ 2M Uniform": _dpm(2, "uniform"),
    "DPM++ 3M": _dpm(3),
    "DPM++ 3M Beta": _dpm(3, "beta"),
    "DPM++ 3M Exponential": _dpm(3, "exponential"),
    "DPM++ 3M Karras": _dpm(3, "karras"),
    "DPM++ 3M SDE Uniform": _e(
        "dpmpp_3m_sde",
        "DPM-Solver++ 3M SDE",
        3,
        stochastic=True,
        note="not diffusers': its third-order SDE branch is first order (sign of its D2 weight)",
    ),
    "DPM++ 3M Uniform": _dpm(3, "uniform"),
    "DPM++ Beta": _dpm(2, "beta"),
    "DPM++ Exponential": _dpm(2, "exponential"),
    "DPM++ Karras": _dpm(2, "karras"),
    "DPM++ SDE": _dpmpp_sde(),
    "DPM++ SDE Beta": _dpmpp_sde("beta"),
    "DPM++ SDE Exponential": _dpmpp_sde("exponential"),
    "DPM++ SDE Karras": _dpmpp_sde("karras"),
    "DPM++ Uniform": _dpm(2, "uniform"),
    "DPM++ Uniform Beta": _dpm(2, "beta", note=_ALIAS),
    "DPM++ Uniform Exponential": _dpm(2, "exponential", note=_ALIAS),
    "DPM++ Uniform Karras": _dpm(2, "karras", note=_ALIAS),
    "DPMSolverMultistepInverse": _dpm(
        2,
        note="inversion (image to noise) needs an input image; runs the same solver forward (noise to image)",
    ),
    "DPMSolverMultistepScheduler": _dpm(2),
    "DPMSolverSinglestepScheduler": _d(
        "DPMSolverSinglestepScheduler", "DPM-Solver++ singlestep (order 2)", 2, solver_order=2
    ),
    "EDMDPMSolverMultistepScheduler": _dpm(2, "karras", note="EDM = the Karras rho=7 schedule on flow time"),
    "EDMEulerScheduler": _d(
        _EULER, "Euler (EDM)", 1, "karras", note="EDM Euler on flow = Euler, Karras schedule"
    ),
    "Euler": _d(_EULER, "Euler", 1),
    "Euler a": _e("euler_ancestral", "Euler ancestral (eta 1)", 1, stochastic=True),
    "Euler Beta": _d(_EULER, "Euler", 1, "beta"),
    "Euler Exponential": _d(_EULER, "Euler", 1, "exponential"),
    "Euler Karras": _d(_EULER, "Euler", 1, "karras"),
    "EulerAncestralDiscreteScheduler": _e("euler_ancestral", "Euler ancestral (eta 1)", 1, stochastic=True),
    "EulerDiscreteScheduler": _d(_EULER, "Euler", 1),
    "FlowMatchEulerDiscreteScheduler": _d(_EULER, "Euler", 1),
    "Heun": _d(_HEUN, "Heun (2 evaluations/step)", 2),
    "HeunDiscreteScheduler": _d(_HEUN, "Heun (2 evaluations/step)", 2),
    "Heun Karras": _d(_HEUN, "Heun (2 evaluations/step)", 2, "karras"),
    "IPNDMScheduler": _ipndm("uniform"),
    "IPNDM Uniform": _ipndm("uniform"),
    "IPNDM Uniform Beta": _ipndm("beta"),
    "IPNDM Uniform Exponential": _ipndm("exponential"),
    "IPNDM Uniform Karras": _ipndm("karras"),
    "KDPM2AncestralDiscreteScheduler": _e(
        "dpm2_ancestral", "DPM2 ancestral (2 evaluations/step)", 2, stochastic=True
    ),
    "KDPM2DiscreteScheduler": _e("dpm2", "DPM2 midpoint (2 evaluations/step)", 2),
    "LCM": _e("lcm", "LCM (x0 + fresh noise)", 1, stochastic=True, note=_DISTILLED),
    "LCMScheduler": _e("lcm", "LCM (x0 + fresh noise)", 1, stochastic=True, note=_DISTILLED),
    "LMS": _e("lms", "LMS (variable-step Adams-Bashforth 4)", 4),
    "LMSDiscreteScheduler": _e("lms", "LMS (variable-step Adams-Bashforth 4)", 4),
    "LMS Karras": _e("lms", "LMS (variable-step Adams-Bashforth 4)", 4, "karras"),
    "PNDMScheduler": _e("pndm", "PNDM (RK4 warm-up + PLMS)", 4),
    "TCDScheduler": _e("tcd", "TCD (gamma 0.3)", 1, stochastic=True, note=_DISTILLED),
    "UniPC": _unipc(2),
    "UniPC 2M": _unipc(2),
    "UniPC 2M Karras": _unipc(2, "karras"),
    "UniPC 2M Uniform": _unipc(2, "uniform"),
    "UniPC 3M": _unipc(3),
    "UniPC 3M Karras": _unipc(3, "karras"),
    "UniPC 3M Uniform": _unipc(3, "uniform"),
    "UniPC Karras": _unipc(2, "karras"),
    "UniPC Uniform": _unipc(2, "uniform"),
    "UniPC Uniform Beta": _unipc(2, "beta"),
    "UniPC Uniform Exponential": _unipc(2, "exponential"),
    "UniPC Uniform Karras": _unipc(2, "karras"),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(NAME_TABLE)


@dataclass(frozen=True)
class SchedulerSpec:
    """The HIDREAM_SCHEDULER value: a scheduler name and an optional shift (None = variant default)."""

    name: str
    shift: float | None = None

    def __post_init__(self) -> None:
        validate_scheduler_name(self.name)
        if self.shift is not None:
            validate_shift(self.shift)


def validate_scheduler_name(name: str) -> str:
    """``name`` if it is one of the 75 names, else a ValueError listing the closest valid names."""
    if isinstance(name, str) and name in NAME_TABLE:
        return name
    text = name if isinstance(name, str) else str(name)
    by_lower = {n.lower(): n for n in SCHEDULER_NAMES}
    close = [by_lower[m] for m in difflib.get_close_matches(text.lower(), list(by_lower), n=5, cutoff=0.4)]
    hint = (
        f"closest valid names: {', '.join(close)}"
        if close
        else "see hidream.sampling.schedulers.SCHEDULER_NAMES"
    )
    raise ValueError(f"scheduler: unknown name {name!r}; {hint} (75 names are accepted)")


def validate_shift(shift: float) -> float:
    lo, hi = SHIFT_RANGE
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not (lo <= shift <= hi):
        raise ValueError(
            f"shift: got {shift!r}; must be a number in {lo}..{hi} (or unset for the variant default)"
        )
    return float(shift)


def _validate_variant(variant: str) -> str:
    if variant not in DEFAULT_SHIFT:
        raise ValueError(f"variant: got {variant!r}; allowed: {', '.join(VARIANTS)}")
    return variant


def resolve(spec: SchedulerSpec, variant: str) -> tuple[SchedulerInfo, float]:
    """The concrete table entry and shift a spec runs with for ``variant`` (``Default`` resolved)."""
    _validate_variant(variant)
    shift = DEFAULT_SHIFT[variant] if spec.shift is None else float(spec.shift)
    info = NAME_TABLE[validate_scheduler_name(spec.name)]
    if info.impl == "default":
        info = _unipc(2) if variant == "full" else NAME_TABLE["FlowMatchEulerDiscreteScheduler"]
    return info, shift


def make_sampler(spec: SchedulerSpec, variant: str, steps: int) -> FlowSampler:
    """A fresh sampler (no state shared between calls) for ``steps`` steps."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: got {steps!r}; must be an integer >= 1")
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
    if cls_name == _EULER:
        return cls(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    if cls_name == _HEUN:
        return cls(num_train_timesteps=1000, shift=shift)
    base = HIDREAM_FULL_SCHEDULER_CONFIG if cls_name == _UNIPC else _FLOW_SOLVER_CONFIG
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
        self._two_evals = name == _HEUN
        self._sde = getattr(scheduler.config, "algorithm_type", "") == "sde-dpmsolver++"
        # DEIS's epsilon-form update cannot reach sigma 0 (0 * inf) and diffusers' flow DEIS stops
        # at the last nonzero sigma; its final step into 0 is taken here as the first-order data
        # prediction x0 = x - sigma * v, like the other solvers' final_sigmas_type="zero" step.
        self._x0_final = name == _DEIS
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
        if name == _EULER:
            sched.timesteps = (sigmas[:-1] * 1000).to(torch.float32)
            sched.sigmas = sigmas.to(torch.float32)
            return
        if name == _HEUN:
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
    "validate_scheduler_name",
    "validate_shift",
]
