"""Scheduler node: one of the 75 Runware scheduler names plus a shift -> HIDREAM_SCHEDULER."""

from __future__ import annotations

from ..hidream.limits import SCHEDULER_NAMES, SHIFT
from ..hidream.sampling.schedulers import SchedulerSpec, validate_shift


class HiDreamI1Scheduler:
    NODE_ID = "HiDreamI1Scheduler"
    TITLE = "HiDream-I1 Scheduler"
    CATEGORY = "HiDream"
    DESCRIPTION = (
        "Chooses how the sampler integrates HiDream-I1's flow: any of the 75 Runware scheduler names, each run "
        "as a flow-matching sampler (diffusers' flow schedulers, or the engine's own flow ODE/SDE samplers). "
        "'Default' is the variant's own: Full = UniPC (shift 3.0), Dev = Euler (shift 6.0), Fast = Euler (shift 3.0)."
    )
    RETURN_TYPES = ("HIDREAM_SCHEDULER",)
    RETURN_NAMES = ("scheduler",)
    OUTPUT_TOOLTIPS = ("The scheduler name and shift, for HiDream-I1 Sampler.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        lo, hi = SHIFT.lo, SHIFT.hi
        return {
            "required": {
                "scheduler": (
                    list(SCHEDULER_NAMES),
                    {
                        "default": "Default",
                        "tooltip": "Runware scheduler name. 'Default' = the model variant's own scheduler "
                        "(Full: UniPC, Dev/Fast: flow-match Euler).",
                    },
                ),
                "shift": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": hi,
                        "step": 0.1,
                        "tooltip": f"Flow time shift (more steps at high noise when > 1). 0 = the variant's "
                        f"default (Full 3.0, Dev 6.0, Fast 3.0); otherwise {lo}..{hi}.",
                    },
                ),
            }
        }

    def build(self, scheduler: str, shift: float) -> tuple[SchedulerSpec]:
        value = None if shift == 0 else validate_shift(shift)
        return (SchedulerSpec(scheduler, value),)


NODES = [HiDreamI1Scheduler]
