"""Runware task node: a task JSON in, its validated values out as typed outputs to wire up."""

from __future__ import annotations

import json
from pathlib import Path

from ..hidream.runware import output, task

_EXAMPLE = Path(__file__).resolve().parent.parent / "workflows" / "tasks" / "cathedral.json"


def _example_task() -> str:
    try:
        return _EXAMPLE.read_text(encoding="utf-8")
    except OSError:
        return "{}"


def _scheduler_type() -> object:
    """The scheduler output as a combo of the 75 names, so it plugs into a scheduler combo input."""
    try:
        from ..hidream.sampling.schedulers import SCHEDULER_NAMES
    except ImportError:
        return "STRING"
    return list(SCHEDULER_NAMES)


def _select(task_json: str, task_index: int) -> task.Task:
    tasks = task.parse_tasks(task_json)
    if isinstance(task_index, bool) or not isinstance(task_index, int) or not 0 <= task_index < len(tasks):
        raise ValueError(
            f"task_index: got {task_index!r}; allowed: 0..{len(tasks) - 1} ({len(tasks)} task(s))"
        )
    return tasks[task_index]


class HiDreamI1RunwareTask:
    NODE_ID = "HiDreamI1RunwareTask"
    TITLE = "HiDream-I1 Runware Task"
    CATEGORY = "HiDream"
    DESCRIPTION = (
        "Validates a Runware imageInference task (HiDream-I1 Full, runware:97@1) and splits it into typed "
        "values for the text encode, sampler, scheduler, LoRA, cache and save nodes. Every problem of the "
        "task is reported at once, before the queue runs any model. An absent seed is drawn here and output."
    )
    RETURN_TYPES = (
        "STRING",
        "STRING",
        "INT",
        "INT",
        "INT",
        "FLOAT",
        "INT",
        "INT",
        _scheduler_type(),
        "STRING",
        "STRING",
        list(output.FORMATS),
        "INT",
        list(output.OUTPUT_TYPES),
        "STRING",
    )
    RETURN_NAMES = (
        "positive",
        "negative",
        "width",
        "height",
        "steps",
        "cfg",
        "seed",
        "batch",
        "scheduler",
        "lora_json",
        "accelerator_json",
        "output_format",
        "output_quality",
        "output_type",
        "task_json",
    )
    OUTPUT_TOOLTIPS = (
        "positivePrompt.",
        "negativePrompt (empty when not given).",
        "width in pixels.",
        "height in pixels.",
        "steps (default 30).",
        "CFGScale (default 5.0, HiDream-I1 Full's guidance).",
        "seed of the first result (drawn from 0..2^32-1 when the task has none); result i uses seed + i.",
        "numberResults.",
        "scheduler name (default 'Default').",
        "lora as a JSON array of {model, weight, transformer} with defaults filled in ([] when none).",
        "acceleratorOptions as JSON with defaults filled in.",
        "outputFormat (JPG, PNG or WEBP).",
        "outputQuality (20..99).",
        "outputType (URL, dataURI or base64Data).",
        "The validated task with every default spelled out; connect it to HiDream-I1 Save Image's task_json.",
    )
    FUNCTION = "parse"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "task_json": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": _example_task(),
                        "tooltip": "One Runware imageInference task (JSON object) or an array of tasks.",
                    },
                ),
                "task_index": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 1000,
                        "tooltip": "Which task of an array to output (0 = the first); 0 for a single task.",
                    },
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, task_json: str | None = None, task_index: int = 0) -> bool | str:
        """Checked when the prompt is queued, before any node runs (a linked task_json is checked at run time)."""
        if not isinstance(task_json, str):
            return True
        try:
            _select(task_json, task_index)
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def IS_CHANGED(cls, task_json: str, task_index: int = 0) -> object:
        """A task without a seed draws a new one on every run, like Runware does."""
        try:
            data = json.loads(task_json)
        except ValueError:
            return task_json
        items = data if isinstance(data, list) else [data]
        if any(isinstance(t, dict) and "seed" not in t for t in items):
            return float("nan")  # never equal: run again
        return task_json + str(task_index)

    def parse(self, task_json: str, task_index: int = 0) -> tuple:
        t = _select(task_json, task_index)
        return (
            t.positive_prompt,
            t.negative_prompt,
            t.width,
            t.height,
            t.steps,
            t.cfg_scale,
            t.seed,
            t.number_results,
            t.scheduler,
            json.dumps([entry.to_dict() for entry in t.lora]),
            json.dumps(t.accelerator_options.to_dict()),
            t.output_format,
            t.output_quality,
            t.output_type,
            json.dumps(t.to_dict()),
        )


NODES = [HiDreamI1RunwareTask]
