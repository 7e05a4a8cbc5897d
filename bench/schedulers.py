"""Every scheduler name on the analytic Gaussian flow problem.

Data x0 ~ N(mu, s^2) per dimension, x_t = (1 - t) x0 + t z: the exact velocity is known in closed
form and the flow ODE carries z at t = 1 to mu + s z at t = 0 (see tests/test_schedulers.py).

- deterministic names: max |x_N - (mu + s z)| over z in [-3, 3] at 30 steps; ok when below the
  bound C / N^min(order, 2) (C = 6 for first order, 80 otherwise) and the 15 -> 30 step error
  ratio is >= 1.9 (first order) or >= 2.1 (higher orders);
- stochastic names: mean and std of 40000 draws at 30 steps; ok when |mean - mu| < 0.01 and the
  std is within 20% (ancestral samplers lose O(step) variance; the tests check 8% at 100 steps).
  LCM and TCD run on a consistency model's field (x - t v = the ODE endpoint), the model class
  they are made for; TCD's std is reported but only its mean is checked: with any single x0/eps
  prediction its gamma-step lands off the marginal (+34% std here), by design of the method.

``python bench/schedulers.py --quick`` ends with exactly
``names_ok=<n>/75 worst_ode_error=<max error over deterministic names>``.

``--smoke``: every name at 2 (and 1) steps on 400 draws. CI runs it so the benchmark cannot
silently stop working; its numbers are not figures (few names pass at 2 steps).
"""

from __future__ import annotations

import argparse
import math

from _common import load_pack, setup_threads

MU, STD = 0.3, 0.5
STEPS = 30
DRAWS = 200  # per side: 40000 draws


def _std_at(t: float) -> float:
    return math.sqrt((1 - t) ** 2 * STD**2 + t**2)


def flow_velocity(x, timestep, sigma: float):
    big = _std_at(sigma)
    return -MU + (sigma - (1 - sigma) * STD**2) / big * (x - (1 - sigma) * MU) / big


def consistency_velocity(x, timestep, sigma: float):
    if sigma <= 0:
        return flow_velocity(x, timestep, sigma)
    return (x - (MU + STD * (x - (1 - sigma) * MU) / _std_at(sigma))) / sigma


def ode_error(S, name: str, steps: int) -> float:
    import torch

    z = torch.linspace(-3, 3, 61).view(1, 1, 61, 1)
    out = S.make_sampler(S.SchedulerSpec(name), "full", steps).sample(
        flow_velocity, z, lambda: None, lambda i, s: None
    )
    return (out - (MU + STD * z)).abs().max().item()


def moments(S, name: str, steps: int) -> tuple[float, float]:
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, DRAWS, DRAWS, generator=gen)
    info = S.resolve(S.SchedulerSpec(name), "full")[0]
    model = consistency_velocity if info.impl in ("engine:lcm", "engine:tcd") else flow_velocity
    sampler = S.make_sampler(S.SchedulerSpec(name), "full", steps)
    out = sampler.sample(model, x, lambda: torch.randn(x.shape, generator=gen), lambda i, s: None)
    return out.mean().item(), out.std().item() / STD - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 steps only (the default run adds 100)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="2 steps, 400 draws, as --quick otherwise: CI runs it so the benchmark cannot "
        "silently stop working; its numbers are not figures",
    )
    args = parser.parse_args()
    global STEPS, DRAWS
    if args.smoke:
        args.quick, STEPS, DRAWS = True, 2, 20
    setup_threads(1)
    load_pack()
    from hidream_pack.hidream.sampling import schedulers as S

    ok, worst = 0, 0.0
    for name in S.SCHEDULER_NAMES:
        info = S.resolve(S.SchedulerSpec(name), "full")[0]
        try:
            if info.stochastic:
                mean, rel = moments(S, name, STEPS)
                good = abs(mean - MU) < 0.01 and (info.impl == "engine:tcd" or abs(rel) < 0.2)
                line = f"mean={mean:.4f} std_rel={rel:+.4f}"
                if not args.quick:
                    mean100, rel100 = moments(S, name, 100)
                    line += f" (100 steps: mean={mean100:.4f} std_rel={rel100:+.4f})"
            else:
                e15, e30 = ode_error(S, name, STEPS // 2), ode_error(S, name, STEPS)
                bound = 6.0 / STEPS if info.order == 1 else 80.0 / STEPS**2
                good = e30 < bound and e15 / e30 >= (1.9 if info.order == 1 else 2.1)
                worst = max(worst, e30)
                line = f"err30={e30:.3e} bound={bound:.3e} err15/err30={e15 / e30:.2f}"
        except Exception as exc:  # a name that fails to run is reported, not fatal to the benchmark
            good, line = False, f"error: {exc!r}"
        ok += good
        kind = "stochastic" if info.stochastic else f"order {info.order}"
        print(f"{name:34s} {kind:10s} {'ok ' if good else 'BAD'} {line}")
    print(f"names_ok={ok}/{len(S.SCHEDULER_NAMES)} worst_ode_error={worst:.4g}")


if __name__ == "__main__":
    main()
