"""Samplers written on the flow-matching ODE/SDE, for names no diffusers class runs on a flow model.

Path: ``x_t = (1 - t) * x0 + t * eps`` with ``alpha_t = 1 - t``, ``sigma_t = t``. The model returns
the velocity ``v = eps - x0``, so ``x0 = x - t * v`` and ``eps = x + (1 - t) * v``. The ODE is
``dx/dt = v``; every deterministic sampler below integrates it from t = 1 to t = 0.

Stochastic samplers follow the forward process's posterior. Going from ``t`` to ``s < t`` with
eta = 1 (DDPM / ancestral), the fresh-noise standard deviation is
``c = s * sqrt(1 - SNR_t / SNR_s)`` with ``SNR = ((1 - t) / t)^2``, and the sample is
``(1 - s) * x0 + sqrt(s^2 - c^2) * eps + c * z``. That deterministic part is the flow point at
``t_down = b / (1 - s + b)`` (``b = sqrt(s^2 - c^2)``) scaled by ``1 - s + b``, so an ancestral
sampler = any ODE step to ``t_down``, a rescale, plus noise. On the flow path these are the exact
counterparts of k-diffusion's ``sigma_down`` / ``sigma_up`` (which live in VE space).

All arithmetic is float32 on the engine's device; all noise comes from the engine's ``noise()``
(per-image generators), never from a global RNG. Each sampler calls ``on_step(i, t_i)`` once per
step before that step's model evaluations. The timestep given to the model is ``t * 1000`` as a
float32 0-dim tensor, the convention of diffusers' flow-match schedulers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
NoiseFn = Callable[[], torch.Tensor]
StepFn = Callable[[int, float], None]
Velocity = Callable[[torch.Tensor, float], torch.Tensor]

TCD_GAMMA = 0.3
# Fixed Adams-Bashforth coefficients (newest first), the iPNDM / PLMS update for equal steps.
_AB_COEFFS = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def _steps(sigmas, on_step: StepFn) -> Iterator[tuple[int, float, float]]:
    """Each step's ``(i, t, s)`` (its sigma and the next), after ``on_step(i, t)``: the one place
    every sampler reports a step (progress bar, cancel, the caches' step) before evaluating it."""
    for i in range(len(sigmas) - 1):
        t = sigmas[i]
        on_step(i, t)
        yield i, t, sigmas[i + 1]


def _x0(x: torch.Tensor, t: float, v: torch.Tensor) -> torch.Tensor:
    return x - t * v


def _eps(x: torch.Tensor, t: float, v: torch.Tensor) -> torch.Tensor:
    return x + (1.0 - t) * v


def ancestral_split(t: float, s: float, eta: float = 1.0) -> tuple[float, float, float]:
    """(t_down, scale, noise_std) for a posterior step t -> s (see the module docstring)."""
    if s <= 0.0:
        return 0.0, 1.0, 0.0
    ratio = 0.0 if t >= 1.0 else ((1.0 - t) * s / ((1.0 - s) * t)) ** 2
    c = eta * s * math.sqrt(max(0.0, 1.0 - ratio))
    b = math.sqrt(max(0.0, s * s - c * c))
    k = (1.0 - s) + b
    return b / k, k, c


def _dpmpp_first_order(x: torch.Tensor, t: float, s: float, denoised: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++ first-order (data prediction) step t -> s; with the model's x0 it is DDIM/Euler."""
    return (s / t) * x + ((1.0 - s) - s * (1.0 - t) / t) * denoised


def ddim(velocity: Velocity, x, sigmas, noise, on_step):
    """DDIM, eta 0: x0 and eps from the model, re-mixed at the next sigma (equals flow Euler)."""
    for _i, t, s in _steps(sigmas, on_step):
        v = velocity(x, t)
        x = (1.0 - s) * _x0(x, t, v) + s * _eps(x, t, v)
    return x


def euler_ancestral(velocity: Velocity, x, sigmas, noise, on_step):
    """Euler to t_down, rescale, add noise: k-diffusion's Euler ancestral on the flow path (eta 1)."""
    for _i, t, s in _steps(sigmas, on_step):
        v = velocity(x, t)
        t_down, k, c = ancestral_split(t, s)
        x = k * (x + (t_down - t) * v)
        if c > 0:
            x = x + c * noise()
    return x


def ddpm(velocity: Velocity, x, sigmas, noise, on_step):
    """DDPM ancestral sampling: draw x_s from q(x_s | x_t, x0 = model's x0) (posterior variance)."""
    for _i, t, s in _steps(sigmas, on_step):
        v = velocity(x, t)
        x0, eps = _x0(x, t, v), _eps(x, t, v)
        _, _, c = ancestral_split(t, s)
        x = (1.0 - s) * x0 + math.sqrt(max(0.0, s * s - c * c)) * eps
        if c > 0:
            x = x + c * noise()
    return x


def _dpm2_step(velocity: Velocity, x, t: float, s: float, v: torch.Tensor) -> torch.Tensor:
    """KDPM2's midpoint step: the derivative at the geometric-mean sigma (Euler into sigma 0)."""
    if s <= 0.0:
        return x + (s - t) * v
    t_mid = math.sqrt(t * s)
    v_mid = velocity(x + (t_mid - t) * v, t_mid)
    return x + (s - t) * v_mid


def dpm2(velocity: Velocity, x, sigmas, noise, on_step):
    for _i, t, s in _steps(sigmas, on_step):
        x = _dpm2_step(velocity, x, t, s, velocity(x, t))
    return x


def dpm2_ancestral(velocity: Velocity, x, sigmas, noise, on_step):
    for _i, t, s in _steps(sigmas, on_step):
        v = velocity(x, t)
        t_down, k, c = ancestral_split(t, s)
        x = k * _dpm2_step(velocity, x, t, t_down, v)
        if c > 0:
            x = x + c * noise()
    return x


def _ancestral_move(x, t: float, s: float, denoised: torch.Tensor, noise: NoiseFn) -> torch.Tensor:
    t_down, k, c = ancestral_split(t, s)
    x = k * _dpmpp_first_order(x, t, t_down, denoised)
    return x + c * noise() if c > 0 else x


def dpmpp_sde(velocity: Velocity, x, sigmas, noise, on_step):
    """DPM-Solver++(2S) SDE (k-diffusion's ``sample_dpmpp_sde``, eta 1, r = 1/2) in flow half-log-SNR.

    Each step: an ancestral move to the log-SNR midpoint with the model's x0, a second evaluation
    there, then an ancestral move to the next sigma with the midpoint x0. Noise is independent per
    sub-step (k-diffusion uses a Brownian tree; the marginals are the same). The first step from
    t = 1 (log-SNR -inf, no midpoint) and the last step into 0 are first-order.
    """
    for _i, t, s in _steps(sigmas, on_step):
        v = velocity(x, t)
        x0 = _x0(x, t, v)
        if s <= 0.0:
            x = x0
            continue
        if t >= 1.0:
            x = _ancestral_move(x, t, s, x0, noise)
            continue
        lam_t, lam_s = math.log((1.0 - t) / t), math.log((1.0 - s) / s)
        t_mid = 1.0 / (1.0 + math.exp(lam_t + 0.5 * (lam_s - lam_t)))
        x_mid = _ancestral_move(x, t, t_mid, x0, noise)
        x0_mid = _x0(x_mid, t_mid, velocity(x_mid, t_mid))
        x = _ancestral_move(x, t, s, x0_mid, noise)
    return x


def dpmpp_3m_sde(velocity: Velocity, x, sigmas, noise, on_step):
    """DPM-Solver++(3M) SDE, eta 1 (k-diffusion's ``sample_dpmpp_3m_sde``) on the flow path.

    Works on ``y = x / alpha_t`` (the VE variable) and half-log-SNR ``lambda = log((1 - t) / t)``:
    ``y' = e^{-2h} y + (1 - e^{-2h}) x0 + phi2 * D1 - phi3 * D2 + (t'/alpha') sqrt(1 - e^{-2h}) z``
    with ``phi2 = (e^{-2h} - 1) / (2h) + 1`` and ``phi3 = phi2 / (2h) - 1/2``. diffusers'
    ``sde-dpmsolver++`` third-order branch adds its D2 term with the opposite sign of the 1/2
    (an O(1) instead of O(h) weight), which makes it first order: on the analytic Gaussian problem
    its sample std stays +14% / +7% off at 100 / 300 steps, so this name runs here instead.
    The step out of t = 1 (lambda = -inf) is the exact first-order one and starts no history.
    """
    hist: list[tuple[torch.Tensor, float]] = []  # (x0, h of the step that followed it), newest first
    for _i, t, s in _steps(sigmas, on_step):
        x0 = _x0(x, t, velocity(x, t))
        if s <= 0.0:
            x = x0
            continue
        z = noise()
        if t >= 1.0:
            x = (1.0 - s) * x0 + s * z
            hist = []
            continue
        h = math.log((1.0 - s) / s) - math.log((1.0 - t) / t)
        e2h = math.exp(-2.0 * h)
        y = e2h * (x / (1.0 - t)) + (1.0 - e2h) * x0
        phi2 = -math.expm1(-2.0 * h) / (-2.0 * h) + 1.0
        if len(hist) >= 2:
            (m1, h1), (m2, h2) = hist[0], hist[1]
            r0, r1 = h1 / h, h2 / h
            d1_0, d1_1 = (x0 - m1) / r0, (m1 - m2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) / (r0 + r1)
            y = y + phi2 * d1 - (phi2 / (2.0 * h) - 0.5) * d2
        elif hist:
            m1, h1 = hist[0]
            y = y + phi2 * ((x0 - m1) / (h1 / h))
        y = y + (s / (1.0 - s)) * math.sqrt(-math.expm1(-2.0 * h)) * z
        x = (1.0 - s) * y
        hist = [(x0, h)] + hist[:1]
    return x


def ipndm(velocity: Velocity, x, sigmas, noise, on_step):
    """iPNDM: Adams-Bashforth with the fixed equal-step coefficients, warming up from order 1 to 4."""
    hist: list[torch.Tensor] = []
    for _i, t, s in _steps(sigmas, on_step):
        hist = [velocity(x, t)] + hist[:3]
        coeffs = _AB_COEFFS[len(hist) - 1]
        x = x + (s - t) * sum(c * v for c, v in zip(coeffs, hist, strict=True))
    return x


def _lms_coefficients(nodes: list[float], t: float, s: float) -> list[float]:
    """Integrals over [t, s] of the Lagrange basis on ``nodes`` (exact, 4-point Gauss-Legendre)."""
    gl_x = (-0.8611363115940526, -0.3399810435848563, 0.3399810435848563, 0.8611363115940526)
    gl_w = (0.3478548451374538, 0.6521451548625461, 0.6521451548625461, 0.3478548451374538)
    half, mid = 0.5 * (s - t), 0.5 * (s + t)
    out = []
    for j, tj in enumerate(nodes):
        total = 0.0
        for xg, wg in zip(gl_x, gl_w, strict=True):
            tau = mid + half * xg
            basis = 1.0
            for k, tk in enumerate(nodes):
                if k != j:
                    basis *= (tau - tk) / (tj - tk)
            total += wg * basis
        out.append(total * half)
    return out


def lms(velocity: Velocity, x, sigmas, noise, on_step):
    """Linear multistep (k-diffusion LMS, order 4) on dx/dt = v with exact variable-step weights."""
    hist: list[torch.Tensor] = []
    for i, t, s in _steps(sigmas, on_step):
        hist = [velocity(x, t)] + hist[:3]
        coeffs = _lms_coefficients([sigmas[i - j] for j in range(len(hist))], t, s)
        x = x + sum(c * v for c, v in zip(coeffs, hist, strict=True))
    return x


def pndm(velocity: Velocity, x, sigmas, noise, on_step):
    """PNDM: three classical RK4 steps (the pseudo Runge-Kutta warm-up), then PLMS (fixed AB4).

    On the flow path the pseudo-numerical transfer (DDIM) is the Euler step, so the pseudo
    Runge-Kutta and linear multistep methods reduce to the classical ones on ``dx/dt = v``.
    """
    hist: list[torch.Tensor] = []
    for i, t, s in _steps(sigmas, on_step):
        h = s - t
        k1 = velocity(x, t)
        hist = [k1] + hist[:3]
        if i < 3:
            k2 = velocity(x + 0.5 * h * k1, t + 0.5 * h)
            k3 = velocity(x + 0.5 * h * k2, t + 0.5 * h)
            k4 = velocity(x + h * k3, s)
            x = x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        else:
            x = x + h * sum(c * v for c, v in zip(_AB_COEFFS[3], hist, strict=True))
    return x


def _renoise(x_mid, t_mid: float, s: float, noise: NoiseFn) -> torch.Tensor:
    """Forward process from t_mid up to s >= t_mid: rescale and add the missing noise."""
    if s <= t_mid:
        return x_mid
    scale = (1.0 - s) / (1.0 - t_mid)
    std = math.sqrt(max(0.0, s * s - (scale * t_mid) ** 2))
    return scale * x_mid + std * noise()


def tcd_like(velocity: Velocity, x, sigmas, noise, on_step, gamma: float):
    """TCD's strategic stochastic sampling: DDIM to (1 - gamma) * s, then forward-noise back to s."""
    for _i, t, s in _steps(sigmas, on_step):
        v = velocity(x, t)
        t_mid = (1.0 - gamma) * s
        x_mid = (1.0 - t_mid) * _x0(x, t, v) + t_mid * _eps(x, t, v)
        x = _renoise(x_mid, t_mid, s, noise) if s > 0 else x_mid
    return x


def tcd(velocity: Velocity, x, sigmas, noise, on_step):
    return tcd_like(velocity, x, sigmas, noise, on_step, TCD_GAMMA)


def lcm(velocity: Velocity, x, sigmas, noise, on_step):
    """LCM multistep sampling: the model's x0, then fresh noise at the next sigma (TCD, gamma 1)."""
    return tcd_like(velocity, x, sigmas, noise, on_step, 1.0)


SAMPLERS = {
    "ddim": ddim,
    "ddpm": ddpm,
    "euler_ancestral": euler_ancestral,
    "dpm2": dpm2,
    "dpm2_ancestral": dpm2_ancestral,
    "dpmpp_sde": dpmpp_sde,
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "ipndm": ipndm,
    "lms": lms,
    "pndm": pndm,
    "tcd": tcd,
    "lcm": lcm,
}


class EngineSampler:
    """A ``FlowSampler`` running one of ``SAMPLERS`` on a float64 sigma array (first 1, last 0)."""

    def __init__(self, name: str, sigmas: torch.Tensor) -> None:
        if name not in SAMPLERS:
            raise ValueError(f"engine sampler: got {name!r}; allowed: {', '.join(SAMPLERS)}")
        self.name = name
        # float32 values (computed in float64), so on_step's sigma equals ``self.sigmas[i]`` exactly.
        self.sigmas = sigmas.to(torch.float32)
        self._sig = self.sigmas.tolist()

    def sample(self, model: ModelFn, x: torch.Tensor, noise: NoiseFn, on_step: StepFn) -> torch.Tensor:
        dtype = x.dtype

        def velocity(xt: torch.Tensor, t: float) -> torch.Tensor:
            timestep = torch.tensor(t * 1000.0, dtype=torch.float32)
            return model(xt.to(dtype), timestep, t).to(torch.float32)

        def draw() -> torch.Tensor:
            return noise().to(device=x.device, dtype=torch.float32)

        out = SAMPLERS[self.name](velocity, x.to(torch.float32), self._sig, draw, on_step)
        return out.to(dtype)
