"""LoRA stage switching vs the same LoRAs merged by hand, side by side in one process.

The benchmark model (4 double + 8 single blocks, 4 heads x 64, MoE 4/2), 256x256, 30 steps, CFG 5,
the Full default scheduler, one thread. Two random rank-16 LoRAs on every attention and
feed-forward Linear (kohya files, alpha 16): one ``high``, one ``low`` (boundary 0.875).

- ours: the pack's sampler with both LoRAs on the handle, as the LoRA node makes them
  (``merge_at_boundary: auto``, which merges a copy here: one fits in RAM).
  Each LoRA is merged into temporary weights when its stage starts; the run checks it did.
- per call: ``auto`` when a copy does not fit (free memory reported as 0), as on a full card and
  always on fp8-stored weights: each patched Linear adds its LoRA delta to its weight per call.
- live: ``merge_at_boundary: off``: live PEFT adapters switched per step by sigma.
- merged: a copy of the transformer with no LoRA layers whose weights are the base weights
  plus each LoRA merged by hand (``W + (alpha/rank) * B @ A``); the high-merged weights are in
  place for the high steps and the low-merged ones are swapped in (by reference, free) at the
  first low step. This is the floor: plain-model speed with the LoRAs' effect.

All four produce the same latents (checked, max |diff| printed). Timings are the minimum of
interleaved repeats after one warm-up run each. The last line is the figure the README quotes:

    switch_overhead=<(ours - merged)/merged wall> steps_high=<n> steps_low=<n>

``--smoke``: 128x128, 2 steps (one per stage), 1 timed repeat. CI runs it so the benchmark
cannot silently stop working; its numbers are not figures.
"""

from __future__ import annotations

import argparse
import copy
import re
import tempfile
import time
from pathlib import Path

from _common import bench_transformer, load_pack, model_handle, random_conditioning, setup_threads

RANK = 16
TARGETS = re.compile(r".*\.(to_q|to_k|to_v|to_out|to_q_t|to_k_t|to_v_t|to_out_t|w1|w2|w3)$")


def make_lora(transformer, seed: int) -> dict:
    """Random kohya-layout LoRA on every attention / feed-forward Linear (alpha = rank: scale 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and TARGETS.match(name):
            flat = "lora_unet_" + name.replace(".", "_")
            sd[f"{flat}.lora_down.weight"] = (
                torch.randn(RANK, module.in_features, generator=g) / module.in_features**0.5
            )
            sd[f"{flat}.lora_up.weight"] = torch.randn(module.out_features, RANK, generator=g) * 0.02
            sd[f"{flat}.alpha"] = torch.tensor(float(RANK))
    return sd


def merged_weights(transformer, sd: dict) -> dict:
    """Module name -> W + (alpha / rank) * up @ down, computed by hand from the kohya keys."""
    import torch

    out = {}
    with torch.no_grad():
        for name, module in transformer.named_modules():
            flat = "lora_unet_" + name.replace(".", "_")
            if f"{flat}.lora_down.weight" in sd:
                scale = float(sd[f"{flat}.alpha"]) / RANK
                delta = scale * (sd[f"{flat}.lora_up.weight"] @ sd[f"{flat}.lora_down.weight"])
                out[name] = (module.weight + delta).contiguous()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 timed repeats instead of 5")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="128x128, 2 steps, 1 timed repeat: CI runs it so the benchmark cannot silently stop "
        "working; its numbers are not figures",
    )
    args = parser.parse_args()
    if args.smoke:
        args.size, args.steps = 128, 2
    setup_threads(1)
    load_pack()
    from hidream_pack.hidream.lora import apply as lora_apply
    from hidream_pack.hidream.lora import session as lora
    from hidream_pack.hidream.lora import spec as lora_spec  # type: ignore[import-not-found]
    from hidream_pack.hidream.model import devices
    from hidream_pack.hidream.sampling.loop import SampleSettings, sample_latents  # type: ignore[import-not-found]
    from hidream_pack.hidream.sampling.schedulers import SchedulerSpec  # type: ignore[import-not-found]

    transformer = bench_transformer()
    plain = copy.deepcopy(transformer)  # the hand-merged model: never sees a LoRA layer
    cond = random_conditioning()
    scheduler = SchedulerSpec("Default")
    settings = SampleSettings(width=args.size, height=args.size, steps=args.steps, cfg=5.0, seed=0)
    sd_high, sd_low = make_lora(transformer, 1), make_lora(transformer, 2)
    w_high, w_low = merged_weights(plain, sd_high), merged_weights(plain, sd_low)

    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix="hidream_lora_bench_"))
    save_file(sd_high, str(tmp / "high.safetensors"))
    save_file(sd_low, str(tmp / "low.safetensors"))

    def handle(merge: str):
        specs = [
            lora_spec.LoraSpec(path=str(tmp / "high.safetensors"), weight=1.0, stage="high", merge=merge),
            lora_spec.LoraSpec(path=str(tmp / "low.safetensors"), weight=1.0, stage="low", merge=merge),
        ]
        h = model_handle(transformer)
        for spec in specs:
            h = h.with_lora(spec)
        return h

    ours, live = handle(lora_spec.DEFAULT_MERGE), handle("off")

    # Count the steps each LoRA is active in a real run (first image), from the session itself.
    active_log: list[dict] = []
    merged_log: list[bool] = []
    real_on_step = lora.LoraSession.on_step

    def logging_on_step(self, sigma):
        changed = real_on_step(self, sigma)
        active_log.append({spec.stage for adapter, spec in self._plan if adapter in self.active})
        merged_log.append(set(self.merged) == set(self.active) and self._auto_merge == lora_apply.COPY)
        return changed

    lora.LoraSession.on_step = logging_on_step
    try:
        lat_ours = sample_latents(ours, cond, scheduler, settings).latents
    finally:
        lora.LoraSession.on_step = real_on_step
    steps_high = sum(1 for s in active_log if s == {"high"})
    steps_low = sum(1 for s in active_log if s == {"low"})
    if steps_high + steps_low != args.steps:
        raise SystemExit(f"expected exactly one LoRA active per step, got {active_log}")
    if not all(merged_log):
        raise SystemExit(
            "merge_at_boundary auto did not merge a copy here; the figures would not be ours-as-default"
        )

    modules = dict(plain.named_modules())

    def use(weights: dict) -> None:
        for name, w in weights.items():
            modules[name].weight.data = w

    def on_progress(done: int, total: int) -> None:
        if done == steps_high:  # called before step `done` runs: swap in the low-stage weights
            use(w_low)

    plain_handle = model_handle(plain)

    def run_merged():
        use(w_high if steps_high else w_low)
        return sample_latents(plain_handle, cond, scheduler, settings, callback=on_progress).latents

    def run(h):
        return sample_latents(h, cond, scheduler, settings).latents

    def run_per_call():
        """auto with no room for a copy (as on a full card, and always on fp8 storage)."""
        real = devices.free_memory
        devices.free_memory = lambda device: 0
        try:
            return run(ours)
        finally:
            devices.free_memory = real

    lat_merged = run_merged()
    lat_live = run(live)
    lat_per_call = run_per_call()
    print(
        f"latents max |diff| vs hand-merged: ours (auto: merged copy) {(lat_ours - lat_merged).abs().max().item():.2e}, "
        f"per call {(lat_per_call - lat_merged).abs().max().item():.2e}, "
        f"live {(lat_live - lat_merged).abs().max().item():.2e}"
    )

    variants = {
        "merged": run_merged,
        "ours": lambda: run(ours),
        "per_call": run_per_call,
        "live": lambda: run(live),
    }
    best = dict.fromkeys(variants, float("inf"))
    cpu = dict.fromkeys(variants, float("inf"))  # CPU time: a cross-check that other load cannot inflate
    order = list(variants.items())
    for repeat in range(1 if args.smoke else 3 if args.quick else 5):
        # interleaved, so machine noise hits all alike; the order flips each repeat (no position bias)
        for key, fn in order if repeat % 2 else order[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            best[key] = min(best[key], time.perf_counter() - start)
            cpu[key] = min(cpu[key], time.process_time() - start_cpu)
    lora.release_unused(transformer)
    print(
        f"{args.size}x{args.size}, {args.steps} steps, CFG 5: merged {best['merged']:.3f} s, "
        f"ours (auto: merged copy) {best['ours']:.3f} s, auto merged per call {best['per_call']:.3f} s, "
        f"live {best['live']:.3f} s"
    )
    print(
        "cpu-time overheads (same runs): "
        + ", ".join(
            f"{k} {(cpu[k] - cpu['merged']) / cpu['merged']:.3f}" for k in ("ours", "per_call", "live")
        )
    )
    print(f"live_overhead={(best['live'] - best['merged']) / best['merged']:.3f}")
    print(f"per_call_overhead={(best['per_call'] - best['merged']) / best['merged']:.3f}")
    print(
        f"switch_overhead={(best['ours'] - best['merged']) / best['merged']:.3f} "
        f"steps_high={steps_high} steps_low={steps_low}"
    )


if __name__ == "__main__":
    main()
