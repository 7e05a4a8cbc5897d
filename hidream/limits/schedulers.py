"""The 75 Runware scheduler names and what each one runs: the table, torch-free.

``NAME_TABLE`` is the single source of truth for the names (validator, widgets, engine,
docs/schedulers.md); ``hidream.sampling.schedulers`` turns an entry into a sampler. An entry
says which diffusers class (``diffusers:<Class>``) or engine sampler
(``engine:<function of hidream.sampling.flow_samplers>``) runs, its order, whether it adds
noise, and its sigma schedule (``native`` or one of ``SIGMA_SCHEDULES``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from .check import Range

VARIANTS = ("full", "dev", "fast")
DEFAULT_SHIFT: dict[str, float] = {"full": 3.0, "dev": 6.0, "fast": 3.0}
SHIFT = Range(0.1, 20.0)
SIGMA_SCHEDULES = ("uniform", "karras", "exponential", "beta")
DEIS = "DEISMultistepScheduler"


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


def _diffusers(
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


def _engine(
    fn: str, family: str, order: int, schedule: str = "uniform", stochastic: bool = False, note: str = ""
):
    return SchedulerInfo(family, f"engine:{fn}", order, stochastic, schedule, (), note)


EULER = "FlowMatchEulerDiscreteScheduler"
HEUN = "FlowMatchHeunDiscreteScheduler"
UNIPC = "UniPCMultistepScheduler"
DPM = "DPMSolverMultistepScheduler"


def _unipc(order: int, schedule: str = "native") -> SchedulerInfo:
    return _diffusers(UNIPC, f"UniPC (bh2, order {order})", order, schedule, solver_order=order)


def _dpm(order: int, schedule: str = "native", sde: bool = False, note: str = "") -> SchedulerInfo:
    family = f"DPM-Solver++ {order}M" + (" SDE" if sde else "")
    algo = "sde-dpmsolver++" if sde else "dpmsolver++"
    return _diffusers(DPM, family, order, schedule, sde, note, solver_order=order, algorithm_type=algo)


def _dpmpp_sde(schedule: str = "uniform") -> SchedulerInfo:
    return _engine(
        "dpmpp_sde", "DPM-Solver++(2S) SDE", 2, schedule, True, "k-diffusion's DPM++ SDE on the flow path"
    )


def _ipndm(schedule: str) -> SchedulerInfo:
    return _engine("ipndm", "iPNDM (Adams-Bashforth 4)", 4, schedule)


_DISTILLED = "for consistency-distilled models; on a plain flow model samples are under-dispersed"
_ALIAS = "'Uniform X' is the X spacing between the uniform schedule's ends, the same array as 'X'"

NAME_TABLE: dict[str, SchedulerInfo] = {
    "DDIM": _engine("ddim", "DDIM (eta 0)", 1, note="equals flow Euler algebraically"),
    "DDIMScheduler": _engine("ddim", "DDIM (eta 0)", 1, note="equals flow Euler algebraically"),
    "DDPMScheduler": _engine(
        "ddpm",
        "DDPM ancestral (posterior)",
        1,
        stochastic=True,
        note="same update as Euler a, written as DDPM",
    ),
    "DEISMultistepScheduler": _diffusers(DEIS, "DEIS (logrho, order 2)", 2, solver_order=2),
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
    "DPM++ 3M SDE Uniform": _engine(
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
    "DPMSolverSinglestepScheduler": _diffusers(
        "DPMSolverSinglestepScheduler", "DPM-Solver++ singlestep (order 2)", 2, solver_order=2
    ),
    "EDMDPMSolverMultistepScheduler": _dpm(2, "karras", note="EDM = the Karras rho=7 schedule on flow time"),
    "EDMEulerScheduler": _diffusers(
        EULER, "Euler (EDM)", 1, "karras", note="EDM Euler on flow = Euler, Karras schedule"
    ),
    "Euler": _diffusers(EULER, "Euler", 1),
    "Euler a": _engine("euler_ancestral", "Euler ancestral (eta 1)", 1, stochastic=True),
    "Euler Beta": _diffusers(EULER, "Euler", 1, "beta"),
    "Euler Exponential": _diffusers(EULER, "Euler", 1, "exponential"),
    "Euler Karras": _diffusers(EULER, "Euler", 1, "karras"),
    "EulerAncestralDiscreteScheduler": _engine(
        "euler_ancestral", "Euler ancestral (eta 1)", 1, stochastic=True
    ),
    "EulerDiscreteScheduler": _diffusers(EULER, "Euler", 1),
    "FlowMatchEulerDiscreteScheduler": _diffusers(EULER, "Euler", 1),
    "Heun": _diffusers(HEUN, "Heun (2 evaluations/step)", 2),
    "HeunDiscreteScheduler": _diffusers(HEUN, "Heun (2 evaluations/step)", 2),
    "Heun Karras": _diffusers(HEUN, "Heun (2 evaluations/step)", 2, "karras"),
    "IPNDMScheduler": _ipndm("uniform"),
    "IPNDM Uniform": _ipndm("uniform"),
    "IPNDM Uniform Beta": _ipndm("beta"),
    "IPNDM Uniform Exponential": _ipndm("exponential"),
    "IPNDM Uniform Karras": _ipndm("karras"),
    "KDPM2AncestralDiscreteScheduler": _engine(
        "dpm2_ancestral", "DPM2 ancestral (2 evaluations/step)", 2, stochastic=True
    ),
    "KDPM2DiscreteScheduler": _engine("dpm2", "DPM2 midpoint (2 evaluations/step)", 2),
    "LCM": _engine("lcm", "LCM (x0 + fresh noise)", 1, stochastic=True, note=_DISTILLED),
    "LCMScheduler": _engine("lcm", "LCM (x0 + fresh noise)", 1, stochastic=True, note=_DISTILLED),
    "LMS": _engine("lms", "LMS (variable-step Adams-Bashforth 4)", 4),
    "LMSDiscreteScheduler": _engine("lms", "LMS (variable-step Adams-Bashforth 4)", 4),
    "LMS Karras": _engine("lms", "LMS (variable-step Adams-Bashforth 4)", 4, "karras"),
    "PNDMScheduler": _engine("pndm", "PNDM (RK4 warm-up + PLMS)", 4),
    "TCDScheduler": _engine("tcd", "TCD (gamma 0.3)", 1, stochastic=True, note=_DISTILLED),
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
UNIPC_2M = _unipc(2)  # what "Default" runs for Full


def check_scheduler_name(name: str) -> str:
    """``name`` if it is one of the 75 names, else a ValueError listing the closest valid names."""
    if isinstance(name, str) and name in NAME_TABLE:
        return name
    text = name if isinstance(name, str) else str(name)
    by_lower = {n.lower(): n for n in SCHEDULER_NAMES}
    close = [by_lower[m] for m in difflib.get_close_matches(text.lower(), list(by_lower), n=5, cutoff=0.4)]
    hint = f"closest valid names: {', '.join(close)}" if close else "see hidream.limits.SCHEDULER_NAMES"
    raise ValueError(f"scheduler: unknown name {name!r}; {hint} (75 names are accepted)")
