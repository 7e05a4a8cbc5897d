"""CPU time of the content safety check per 1024x1024 image (NudeNet 320n on onnxruntime).

Times, for a [1, 1024, 1024, 3] float IMAGE (seeded noise, and a gradient):
- load: building NudeNet's detector (once per process; ``load_detector`` caches it);
- detect: one ``detect`` call on the uint8 RGB array (resize to 320, the network, NMS);
- check: ``check_images(..., "fast")``: float -> uint8 conversion plus detect plus verdict;
- blur / black: ``mask_images`` on a flagged image.

onnxruntime uses its default thread count (all cores). Figures are the median and minimum of
``--repeats`` runs after one warm-up. The last line is the figure the README quotes:

    check_ms_per_1024_image=<median of check over both images>

``--smoke``: 1 repeat (the detector still sees 1024x1024 images: the figure's name carries the
size). CI runs it so the benchmark cannot silently stop working; its numbers are not figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import load_pack


def _times(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="1 repeat: CI runs it so the benchmark cannot silently stop working; its numbers are not figures",
    )
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1

    import torch

    load_pack()
    from hidream_pack.hidream.runware import safety

    size = args.size
    start = time.perf_counter()
    detector = safety.load_detector()
    print(f"load: {(time.perf_counter() - start) * 1000:.0f} ms (once per process)")

    ramp = torch.linspace(0, 1, size)
    images = {
        "noise": torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(0)),
        "gradient": torch.stack([ramp[None, :].expand(size, size)] * 3, dim=-1)[None].contiguous(),
    }
    flagged = [safety.SafetyResult(True, 1.0, ("ANUS_EXPOSED",), "bench")]
    check_all: list[float] = []
    for name, image in images.items():
        array = safety._as_uint8_list(image)[0]
        rows = {
            "detect": _times(lambda a=array: detector.detect(a), args.repeats),
            "check": _times(lambda i=image: safety.check_images(i, "fast"), args.repeats),
            "blur": _times(lambda i=image: safety.mask_images(i, flagged, "blur"), args.repeats),
            "black": _times(lambda i=image: safety.mask_images(i, flagged, "black"), args.repeats),
        }
        check_all += rows["check"]
        for what, t in rows.items():
            print(f"{name:8s} {what:6s} median {statistics.median(t):7.1f} ms  min {min(t):7.1f} ms")
    print(f"check_ms_per_{size}_image={statistics.median(check_all):.1f}")


if __name__ == "__main__":
    main()
