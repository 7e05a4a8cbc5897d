"""Sigma schedules for flow matching: x_t = (1 - t) * x0 + t * noise, sampled from t = 1 to t = 0.

Every schedule here returns ``steps + 1`` float64 values: the sigma at the start of each step, then
the final sigma 0. They all start at exactly 1 (pure noise: ``shift_sigma(1, shift) == 1`` for any
shift) and fall strictly to 0, so the sampler always starts from the noise the engine drew.

- ``uniform``: the shifted linear ramp ``shift(linspace(1, 0, steps + 1))`` (ComfyUI's "simple" /
  "sgm_uniform" on a flow model). diffusers' flow schedules stop the ramp at 1/1000 and then jump
  to 0; that uneven last step costs the multistep methods an order (measured on the analytic
  problem), so the named "Uniform" schedule uses the even ramp.
- ``karras`` / ``exponential`` / ``beta``: the Karras (rho = 7), log-linear and Beta(0.6, 0.6)
  spacings of diffusers' ``_convert_to_*`` helpers, placed between ``sigma_max = 1`` and
  ``sigma_min = shift(1/1000)`` (the ends of the shifted uniform schedule, which is how diffusers'
  flow-match schedulers derive their Karras / exponential / beta sigmas), then 0.

Why our own arrays instead of the schedulers' ``use_karras_sigmas`` flags: with
``use_flow_sigmas`` diffusers' multistep schedulers derive Karras sigmas from a DDPM beta schedule
(ignoring the shift and never reaching t = 1) and their exponential / beta sigmas are not mapped to
flow time at all (values far above 1), and beta needs scipy. One set of arrays, fed to every
sampler, keeps each name's schedule what its name says, for every family.
"""

from __future__ import annotations

import math

import torch

from ..limits import SIGMA_SCHEDULES

NUM_TRAIN_TIMESTEPS = 1000
KARRAS_RHO = 7.0
BETA_ALPHA = 0.6
BETA_BETA = 0.6


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3/Flux time shift ``shift * s / (1 + (shift - 1) * s)``: more steps at high noise when > 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def _check(steps: int, shift: float) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: got {steps!r}; must be an integer >= 1")
    if not (shift > 0 and math.isfinite(shift)):
        raise ValueError(f"shift: got {shift!r}; must be a finite number > 0")


def _with_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.to(torch.float64), torch.zeros(1, dtype=torch.float64)])


def _ends(shift: float) -> tuple[float, float]:
    """(sigma_max, sigma_min) of the shifted uniform schedule."""
    return 1.0, float(shift_sigma(1.0 / NUM_TRAIN_TIMESTEPS, shift))


def uniform_sigmas(steps: int, shift: float) -> torch.Tensor:
    _check(steps, shift)
    out = shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)
    out[0] = 1.0  # shift(1) rounds to 1 + 2e-16 for some shifts; the start is exactly pure noise
    return out


def karras_sigmas(steps: int, shift: float, rho: float = KARRAS_RHO) -> torch.Tensor:
    _check(steps, shift)
    hi, lo = _ends(shift)
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    inv_hi, inv_lo = hi ** (1.0 / rho), lo ** (1.0 / rho)
    return _with_zero((inv_hi + ramp * (inv_lo - inv_hi)) ** rho)


def exponential_sigmas(steps: int, shift: float) -> torch.Tensor:
    _check(steps, shift)
    hi, lo = _ends(shift)
    return _with_zero(torch.linspace(math.log(hi), math.log(lo), steps, dtype=torch.float64).exp())


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta I_x(a, b) (no scipy needed)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of ``beta_cdf`` by bisection (monotone, 1e-15 absolute)."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return 0.5 * (lo + hi)


def beta_sigmas(steps: int, shift: float, alpha: float = BETA_ALPHA, beta: float = BETA_BETA) -> torch.Tensor:
    """Beta-distribution spacing (arXiv 2407.12173): dense at both ends of the schedule."""
    _check(steps, shift)
    hi, lo = _ends(shift)
    qs = [1.0 - i / (steps - 1) for i in range(steps)] if steps > 1 else [1.0]
    vals = [lo + beta_ppf(q, alpha, beta) * (hi - lo) for q in qs]
    return _with_zero(torch.tensor(vals, dtype=torch.float64))


_BUILDERS = {
    "uniform": uniform_sigmas,
    "karras": karras_sigmas,
    "exponential": exponential_sigmas,
    "beta": beta_sigmas,
}


def flow_sigmas(kind: str, steps: int, shift: float) -> torch.Tensor:
    """The ``kind`` schedule (one of ``SIGMA_SCHEDULES``) for ``steps`` steps at ``shift``."""
    try:
        builder = _BUILDERS[kind]
    except KeyError as exc:
        raise ValueError(f"sigma schedule: got {kind!r}; allowed: {', '.join(SIGMA_SCHEDULES)}") from exc
    return builder(steps, shift)
