"""Command line: ``python . tiny-models DIR``, ``python . demo``, ``python . run TASK.json``.

``demo`` is the "does it work on my machine" command: it builds tiny random-weight model
files (if needed) and runs the shipped text-to-image workflow end to end on them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEMO_WORKFLOW = ROOT / "workflows" / "api" / "hidream_i1_full_t2i.json"


def _tiny_models(args: argparse.Namespace) -> int:
    from .hidream.model.tiny import write_tiny_models

    start = time.perf_counter()
    written = write_tiny_models(Path(args.dir), variant=args.variant)
    print(f"wrote tiny {args.variant} models to {args.dir} in {time.perf_counter() - start:.1f} s")
    for kind, path in written.items():
        print(f"  {kind}: {path}")
    return 0


def demo_overrides(files: dict[str, Path]) -> dict[str, dict[str, object]]:
    """Widget values swapped in for the demo: tiny files, fp32 on this device, small and fast."""
    common = {"dtype": "fp32", "weights": "gpu"}
    return {
        "HiDreamI1ModelLoader": {"model_name": files["transformer_bf16"].name, **common},
        "HiDreamI1TextEncodersLoader": {
            "clip_l": files["clip_l"].name,
            "clip_g": files["clip_g"].name,
            "t5": files["t5"].name,
            "llama": files["llama"].name,
            **common,
        },
        "HiDreamI1VAELoader": {"vae_name": files["vae"].name, **common},
        "HiDreamI1Sampler": {"width": 256, "height": 256, "steps": 8},
    }


def apply_overrides(graph: dict, overrides: dict[str, dict[str, object]]) -> dict:
    """Return a copy of an API workflow with widget values replaced per node type."""
    graph = json.loads(json.dumps(graph))
    for node in graph.values():
        for name, value in overrides.get(node["class_type"], {}).items():
            node["inputs"][name] = value
    return graph


def _demo(args: argparse.Namespace) -> int:
    from .hidream.model import paths
    from .hidream.model.tiny import ensure_tiny_models
    from .nodes._executor import load_workflow, run_api_workflow

    out = Path(args.output_dir)
    models_dir = Path(args.models_dir) if args.models_dir else out / "tiny_models"
    print(f"tiny random-weight models in {models_dir} (built if missing) ...")
    files = ensure_tiny_models(models_dir)
    paths.set_models_dir(models_dir)
    graph = apply_overrides(load_workflow(DEMO_WORKFLOW), demo_overrides(files))
    start = time.perf_counter()
    results = run_api_workflow(graph, out, on_node=lambda i, t: print(f"  node {i}: {t}"))
    saved = [p for r in results.values() if isinstance(r, dict) for p in r.get("ui", {}).get("images", [])]
    print(f"ran {DEMO_WORKFLOW.name} in {time.perf_counter() - start:.1f} s; wrote {', '.join(saved)}")
    print("note: the tiny models have random weights, so the image is noise; that is expected.")
    return 0


def _run(args: argparse.Namespace) -> int:
    from .hidream.runware.run import run_task_file

    return run_task_file(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python .", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny-models", help="write tiny random-weight model files in ComfyUI's layout")
    tiny.add_argument("dir", help="a folder laid out like ComfyUI's models/")
    tiny.add_argument("--variant", default="full", choices=["full", "dev", "fast"])
    tiny.set_defaults(func=_tiny_models)
    demo = sub.add_parser("demo", help="run the example workflow on tiny models (CPU, < 1 minute)")
    demo.add_argument("--output-dir", required=True)
    demo.add_argument("--models-dir", default=None, help="default: OUTPUT_DIR/tiny_models")
    demo.set_defaults(func=_demo)
    run = sub.add_parser("run", help="run Runware imageInference task JSON with the pack's engine")
    run.add_argument("task", help="a task JSON file (one task or an array)")
    run.add_argument("--models-dir", default=None)
    run.add_argument("--output-dir", default="output")
    run.add_argument("--price-per-hour", type=float, default=0.0, help="for includeCost; default 0")
    run.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    run.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
