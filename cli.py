"""Command line: ``python . tiny-models DIR``, ``python . demo``, ``python . run TASK.json``.

``demo`` is the "does it work on my machine" command: it builds tiny random-weight model
files (if needed) and runs the shipped text-to-image workflow end to end on them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
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
    """The folder images will be saved in (``root/hidream``) can be made and takes files.

    Checked before any model work (an unusable folder found after generation loses the image),
    and without writing anything: a refused run leaves no trace. The folder is made when the
    first image is saved.
    """
    from .hidream.runware.output import PACK_SUBFOLDER

    folder = Path(root).expanduser().absolute() / PACK_SUBFOLDER
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    if problem:
        raise ValueError(
            f"--output-dir: {str(root)!r} cannot hold images ({problem}); expected a writable folder"
        )
    return folder


def comfyui_models_dir() -> Path | None:
    """``ComfyUI/models`` when this pack sits in ``ComfyUI/custom_nodes/``, else None."""
    candidate = ROOT.parent.parent / "models"
    return candidate if ROOT.parent.name == "custom_nodes" and candidate.is_dir() else None


def check_models_dir(value: str | None) -> Path:
    """The models folder to read, named in every error; refused before anything loads."""
    if value is None:
        found = comfyui_models_dir()
        if found is None:
            raise ValueError(
                "--models-dir: not given, and this pack is not inside ComfyUI/custom_nodes (whose "
                "models/ would be the default); expected a folder laid out like ComfyUI's models/ "
                "(python . tiny-models DIR writes one)"
            )
        return found
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"--models-dir: {value!r} ({folder.resolve()}) is not a folder; expected a folder laid "
            "out like ComfyUI's models/ (diffusion_models/, text_encoders/, vae/, loras/)"
        )
    return folder


def _run(args: argparse.Namespace) -> int:
    """``python . run TASK.json``: one Runware response JSON line per result on stdout.

    Exit status: 0 when every task generated and delivered; 1 when any task failed (its
    webhook is told, Runware's error shape); 2 when the input was refused before any model work.
    """
    from .hidream.model import paths
    from .hidream.runware import targets
    from .hidream.runware.run import check_price, check_task, find_models, prepare
    from .hidream.runware.task import TaskValidationError, parse_tasks, read_task_file

    try:
        tasks = parse_tasks(read_task_file(args.task))
    except TaskValidationError as exc:
        print(f"task validation failed ({Path(args.task).name}):", *exc.errors, sep="\n  ", file=sys.stderr)
        return 2
    check_price(args.price_per_hour, "--price-per-hour")
    targets.configure(
        "cli",
        targets.TargetPolicy.parse(
            args.allow_target, args.deny_target, source="--allow-target/--deny-target"
        ),
    )
    check_output_dir(args.output_dir)
    paths.set_models_dir(check_models_dir(args.models_dir))
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


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it (or it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            any(action.default is v for v in (None, False, argparse.SUPPRESS))
            or action.default == []
            or "default" in text
        ):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    fmt = _Help
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose", action="store_true", help="also show weight-loading bars and library warnings"
    )
    parser = argparse.ArgumentParser(prog="python .", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser(
        "tiny-models",
        parents=[common],
        formatter_class=fmt,
        help="write tiny random-weight models (and two LoRAs) under the names the shipped workflows use",
        description="Writes tiny random-weight HiDream-I1 files into DIR in ComfyUI's models/ layout, "
        "under the file names the shipped workflows use, plus the two LoRA files of the LoRA workflow. "
        "Point it at ComfyUI/models and the templates of the pack's own loaders run. Files that this "
        "command did not write are never replaced.",
    )
    tiny.add_argument("dir", help="a folder laid out like ComfyUI's models/ (made if missing)")
    tiny.add_argument("--variant", default="full", choices=["full", "dev", "fast"], help="HiDream-I1 variant")
    tiny.set_defaults(func=_tiny_models)
    demo = sub.add_parser(
        "demo",
        parents=[common],
        formatter_class=fmt,
        help="run the example workflow on tiny models (CPU, < 1 minute)",
    )
    demo.add_argument(
        "--output-dir", required=True, help="where the PNG is written (never over an earlier one)"
    )
    demo.add_argument(
        "--models-dir",
        default=None,
        help="tiny models to use, built there if missing (default: OUTPUT_DIR/tiny_models)",
    )
    demo.set_defaults(func=_demo)
    run = sub.add_parser(
        "run",
        parents=[common],
        formatter_class=fmt,
        help="run Runware imageInference task JSON with the pack's engine",
    )
    run.add_argument("task", help="a task JSON file (one task or an array)")
    run.add_argument(
        "--models-dir",
        default=None,
        help="a folder laid out like ComfyUI's models/ (default: ComfyUI/models when this pack is in "
        "ComfyUI/custom_nodes)",
    )
    run.add_argument(
        "--output-dir",
        default="output",
        help="images go to OUTPUT_DIR/hidream/, made when the first is saved",
    )
    run.add_argument("--price-per-hour", type=float, default=0.0, help="machine price for includeCost")
    run.add_argument(
        "--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="compute dtype of the three models"
    )
    run.add_argument(
        "--allow-target",
        action="append",
        default=[],
        metavar="CIDR_OR_HOST",
        help="also send webhooks/uploads there (repeatable; by default only public addresses are allowed)",
    )
    run.add_argument(
        "--deny-target",
        action="append",
        default=[],
        metavar="CIDR_OR_HOST",
        help="never send there (repeatable)",
    )
    run.set_defaults(func=_run)
    return parser


_LIBRARIES = ("transformers", "diffusers", "huggingface_hub", "accelerate", "tokenizers")


def configure_output(verbose: bool) -> None:
    """The pack's own log at INFO; third-party chatter (weight-loading bars, tokenizer advice)
    only with ``--verbose``: a user running a task wants its results, not library notices."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in _LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module=rf"{name}(\.|$)")


def silence_library_bars() -> None:
    """transformers' and diffusers' own progress bars, once they are imported (run, demo)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for module in (transformers_logging, diffusers_logging):
        module.set_verbosity_error()
        module.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_output(args.verbose)
    try:
        if not args.verbose and args.command in ("run", "demo"):
            silence_library_bars()
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
