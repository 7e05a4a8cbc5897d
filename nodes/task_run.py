"""All-in-one Runware task node: loaded models + task JSON -> Runware response JSON."""

from __future__ import annotations

import json

import torch

from ..hidream.runware import task as task_schema
from ..hidream.runware.run import TaskModels, run_task
from .task import _example_task


class HiDreamI1RunRunwareTask:
    NODE_ID = "HiDreamI1RunRunwareTask"
    TITLE = "HiDream-I1 Run Runware Task"
    CATEGORY = "HiDream"
    DESCRIPTION = (
        "Runs Runware imageInference task JSON (one task or an array) as it is: LoRAs, scheduler, cache options, "
        "safety check, output format, upload endpoint and webhook. Every task is validated before any model work. "
        "Returns the Runware-format response JSON and the images."
    )
    RETURN_TYPES = ("STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("response_json", "images", "report")
    OUTPUT_TOOLTIPS = (
        "Runware responses: one object per image (sync) or the acknowledgement per task (async).",
        "Every generated image (masked where the safety check flagged it).",
        "Per task: seconds, cache hits, delivery outcomes, safety results.",
    )
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": (
                    "HIDREAM_MODEL",
                    {"tooltip": "HiDream-I1 Full (runware:97@1) from a model loader."},
                ),
                "text_encoders": ("HIDREAM_TEXT", {"tooltip": "From the text encoders or diffusers loader."}),
                "vae": ("HIDREAM_VAE", {"tooltip": "From the VAE or diffusers loader."}),
                "task_json": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": _example_task(),
                        "tooltip": "Runware imageInference task JSON.",
                    },
                ),
                "price_per_hour": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1000.0,
                        "step": 0.01,
                        "tooltip": "For includeCost: cost = measured generation seconds x this price per hour. "
                        "0 = report cost 0.",
                    },
                ),
                "safety_mask": (
                    ["blur", "black"],
                    {"default": "blur", "tooltip": "How images flagged by safety.checkContent are masked."},
                ),
            }
        }

    def run(self, model, text_encoders, vae, task_json, price_per_hour, safety_mask):
        tasks = task_schema.parse_tasks(task_json)  # every error of every task, before model work
        models = TaskModels(model=model, text=text_encoders, vae=vae)
        responses, ui_images, tensors, report = [], [], [], []
        for task in tasks:
            run = run_task(task, models, price_per_hour=price_per_hour, safety_mask=safety_mask)
            responses.extend(run.responses)
            report.append(
                {
                    "taskUUID": task.task_uuid,
                    "seconds": round(run.seconds, 3),
                    "cache": run.cache_report,
                    "deliveries": run.delivery_report(),
                    "safety": [getattr(r, "__dict__", str(r)) for r in run.safety],
                }
            )
            ui_images.extend(s.ui_entry() for s in run.published.saved)
            tensors.append(run.images)
        # Tasks of different sizes cannot share one IMAGE batch: the output keeps the first size.
        same = [t for t in tensors if t.shape[1:] == tensors[0].shape[1:]]
        return {
            "ui": {"images": ui_images},
            "result": (json.dumps(responses), torch.cat(same), json.dumps(report, default=str)),
        }


NODES = [HiDreamI1RunRunwareTask]
