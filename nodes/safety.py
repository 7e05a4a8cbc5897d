"""Content safety node: IMAGE -> IMAGE with flagged images masked, plus a per-image JSON report."""

from __future__ import annotations

from ..hidream import limits
from ..hidream.runware import safety


class HiDreamI1SafetyCheck:
    NODE_ID = "HiDreamI1SafetyCheck"
    TITLE = "HiDream-I1 Safety Check"
    CATEGORY = "HiDream"
    DESCRIPTION = (
        "Runware's safety check (safety.checkContent / safety.mode): runs the NudeNet detector (optional, "
        "AGPL-3.0: pip install nudenet) once per image on the CPU and masks every flagged image whole, so it "
        "is never passed on unmasked. Flags exposed genitalia, breasts, buttocks or anus; the report says "
        "which images were flagged and why (NSFWContent per image)."
    )
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "report")
    OUTPUT_TOOLTIPS = (
        "The same batch with every flagged image blurred or blacked out; the others unchanged.",
        "JSON list, one object per image: index, NSFWContent, flagged, score, labels, reason.",
    )
    FUNCTION = "check"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        lo, hi = limits.SAFETY_THRESHOLD.lo, limits.SAFETY_THRESHOLD.hi
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Images to check (any batch size)."}),
                "mode": (
                    list(reversed(safety.SAFETY_MODES)),
                    {
                        "default": "fast",
                        "tooltip": "fast = one NudeNet pass per image (needs `pip install nudenet`; an error "
                        "if missing, never a silent pass). none = no check: images pass through unflagged.",
                    },
                ),
                "mask_method": (
                    list(limits.SAFETY_MASK_METHODS),
                    {
                        "default": "blur",
                        "tooltip": "How a flagged image is hidden: blur = the whole image reduced to a soft "
                        "8-cell colour field; black = the whole image set to black.",
                    },
                ),
                "threshold": (
                    "FLOAT",
                    {
                        "default": safety.DEFAULT_THRESHOLD,
                        "min": lo,
                        "max": hi,
                        "step": 0.05,
                        "tooltip": f"Detector score (0..1) at or above which an exposed-nudity detection flags "
                        f"the image. Lower flags more. {lo} is NudeNet's own floor.",
                    },
                ),
            }
        }

    def check(self, images, mode: str, mask_method: str, threshold: float) -> tuple:
        masked, results = safety.check_and_mask(images, mode, mask_method, threshold)
        return (masked, safety.report_json(results))


NODES = [HiDreamI1SafetyCheck]
