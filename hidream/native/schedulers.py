"""The 75 Runware scheduler names as a ComfyUI ``SAMPLER`` + ``SIGMAS`` pair, for
*SamplerCustomAdvanced* on the native HiDream MODEL.

The SAMPLER runs the very sampler the HIDREAM_MODEL path builds for that name
(``hidream.sampling.schedulers.make_sampler``: diffusers' flow schedulers or the engine's flow
ODE/SDE samplers) with ComfyUI's model as the velocity: ComfyUI's model returns the denoised
latent ``x - sigma * v``, so ``v = (x - denoised) / sigma``, evaluated at the sigma whose
timestep (``1000 * sigma``) is the one the pack's sampler gives the transformer. Stochastic
samplers draw their noise from a CPU generator seeded like the pack's (the sampling seed,
advanced past the initial noise), so with batch 1 the two paths draw the same noise.

The SIGMAS are the sampler's own schedule, except that the first is 1.0: the pack starts
from pure noise (ComfyUI scales the initial noise by the first sigma). The sampler checks that
it was given these sigmas (its step count and values are fixed when the node runs).
"""

from __future__ import annotations

import torch

from ..limits import STEPS, check_int
from ..sampling.schedulers import SchedulerSpec, make_sampler


def sampler_sigmas(name: str, shift: float | None, steps: int, variant: str) -> torch.Tensor:
    """The SIGMAS for ``name`` (validated): the sampler's schedule with the first set to 1.0."""
    try:
        check_int("steps", steps, STEPS)
    except TypeError as exc:  # the node reports every bad input as a ValueError
        raise ValueError(str(exc)) from None
    sigmas = make_sampler(SchedulerSpec(name, shift), variant, steps).sigmas.to(torch.float32).clone()
    sigmas[0] = 1.0
    return sigmas


def _check_sigmas(given: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    g = given.detach().float().cpu().flatten()
    if g.shape != expected.shape or not torch.allclose(g, expected, atol=1e-6, rtol=0):
        raise ValueError(
            f"sigmas: the HiDream-I1 sampler {name!r} was given {g.numel()} sigmas that are not its own "
            f"({expected.numel()} from the same scheduler node); connect that node's SIGMAS output "
            "(split or denoise-cut schedules are not supported)"
        )


def make_comfy_sampler(name: str, shift: float | None, steps: int, variant: str):
    """A ``comfy.samplers.KSAMPLER`` that runs the pack's sampler for ``name``, and its SIGMAS."""
    import comfy.samplers

    sigmas = sampler_sigmas(name, shift, steps, variant)
    spec = SchedulerSpec(name, shift)

    def sample(model, x, given, extra_args=None, callback=None, disable=None):
        _check_sigmas(given, sigmas, name)
        extra = extra_args or {}
        flow = make_sampler(spec, variant, steps)  # fresh state per run
        s_in = x.new_ones([x.shape[0]])
        gen = torch.Generator("cpu").manual_seed(int(extra.get("seed", 0) or 0))
        torch.randn(x.shape, generator=gen)  # the pack drew the initial noise from it first
        state = {"x": x, "denoised": x}

        def velocity(xt: torch.Tensor, timestep, sigma: float) -> torch.Tensor:
            t = float(timestep) / 1000.0
            denoised = model(xt, t * s_in, **extra)
            state.update(x=xt, denoised=denoised)
            return (xt - denoised) / t

        def noise() -> torch.Tensor:
            return torch.randn(x.shape, generator=gen).to(x.device)

        def on_step(i: int, sigma: float) -> None:
            if callback is not None and i > 0:
                callback(
                    {
                        "x": state["x"],
                        "i": i - 1,
                        "sigma": sigma,
                        "sigma_hat": sigma,
                        "denoised": state["denoised"],
                    }
                )

        return flow.sample(velocity, x, noise, on_step)

    return comfy.samplers.KSAMPLER(sample), sigmas
