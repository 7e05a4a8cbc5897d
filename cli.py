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
from typing import Any

ROOT = Path(__file__).resolve().parent
DEMO_WORKFLOW = ROOT / "workflows" / "api" / "hidream_i1_full_t2i.json"
log = logging.getLogger(__name__)


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


def check_output_dir(root: str | Path) -> Path:
    """The folder images are saved in (``root/hidream``) exists or can be made, and takes files.

    Checked before any model work: an unusable folder found after generation loses the image.
    """
    from .hidream.runware.output import PACK_SUBFOLDER

    folder = Path(root) / PACK_SUBFOLDER
    probe = folder / ".write-test"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(
            f"--output-dir: {str(root)!r} cannot hold images ({exc.strerror or exc}: {exc.filename or folder}); "
            "expected a writable folder"
        ) from exc
    return folder


def _run(args: argparse.Namespace) -> int:
    """``python . run TASK.json``: one Runware response JSON line per result on stdout.

    Exit status: 0 when every task generated and delivered; 1 when any task failed (its
    webhook is told, Runware's error shape); 2 when the input was refused before any model work.
    """
    from .hidream.model import paths
    from .hidream.runware.run import check_price, check_task, find_models, prepare
    from .hidream.runware.task import TaskValidationError, parse_tasks, read_task_file

    try:
        tasks = parse_tasks(read_task_file(args.task))
    except TaskValidationError as exc:
        print(f"task validation failed ({Path(args.task).name}):", *exc.errors, sep="\n  ", file=sys.stderr)
        return 2
    check_price(args.price_per_hour, "--price-per-hour")
    check_output_dir(args.output_dir)
    if args.models_dir:
        paths.set_models_dir(args.models_dir)
    for task in tasks:
        check_task(task)  # LoRA names, detector, caches: before the models load
    models = find_models(dtype=getattr(args, "dtype", "bf16"))
    preps = [prepare(task, models) for task in tasks]  # every task checked before any runs
    failed = [prep.task.task_uuid for prep in preps if not _run_prepared(prep, models, args)]
    if failed:
        print(f"error: {len(failed)} of {len(preps)} task(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _tell_failure(task: Any, message: str) -> None:
    """Log a task's failure and, when it has a webhook, post it there as Runware does."""
    from .hidream.runware.delivery import error_payload, post_webhook

    log.error("task %s failed: %s", task.task_uuid, message)
    if task.webhook_url:
        result = post_webhook(task.webhook_url, error_payload(task.task_type, task.task_uuid, message))
        log.info("failure report: %s", json.dumps(result.to_dict()))


def _report_deliveries(published: Any) -> bool:
    """Log each delivery outcome (never "delivered" for a failure); True when all succeeded."""
    paths = {item.image_uuid: item.path for item in published.saved}
    ok = True
    for result in published.deliveries:
        if result.ok:
            log.info("delivered %s of result %s to %s", result.kind, result.image_uuid, result.url)
        else:
            ok = False
            log.error(
                "NOT delivered: %s of result %s to %s (%s); the image is kept at %s",
                result.kind,
                result.image_uuid,
                result.url,
                "; ".join(result.errors) or f"HTTP {result.status}",
                paths.get(result.image_uuid),
            )
    return ok


def _failure_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, (ValueError, TypeError)) else f"{type(exc).__name__}: {exc}"


def _run_prepared(prep: Any, models: Any, args: argparse.Namespace) -> bool:
    """Generate, save, print, deliver one task; False when it failed (its webhook is told)."""
    from .hidream.runware.delivery import deliver_async
    from .hidream.runware.run import generate, publish_images

    task = prep.task
    options = {
        "price_per_hour": args.price_per_hour,
        "output_root": args.output_dir,
        "file_urls": True,
    }

    def produce() -> Any:
        images, seconds, report = generate(prep, models)
        published, _, _ = publish_images(
            prep, images, seconds, sync_delivery=True, defer_delivery=True, **options
        )
        log.info(
            "task %s: %.1f s; %s; saved %s",
            task.task_uuid,
            seconds,
            report,
            [str(s.path) for s in published.saved],
        )
        return published

    if task.delivery_method == "async":
        box: list = []

        def work() -> list:
            box.append(produce())
            return box[0].deliver()

        handle = deliver_async(task.task_type, task.task_uuid, work)
        print(json.dumps(handle.ack[0]), flush=True)
        handle.wait()
        if handle.error:
            _tell_failure(task, handle.error)
            return False
        return _report_deliveries(box[0])
    try:
        published = produce()
    except Exception as exc:  # noqa: BLE001 - one failed task is reported (and its webhook told), the rest run
        _tell_failure(task, _failure_text(exc))
        return False
    for response in published.response_json():
        print(json.dumps(response), flush=True)  # the answer first: delivery may take minutes
    published.deliver()
    return _report_deliveries(published)


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
