"""The node that runs one Runware API task inside ComfyUI's prompt queue."""

from __future__ import annotations

import json

from ..runware_api.jobs import run_job, running_prompt_id


class HiDreamI1RunwareApiJob:
    NODE_ID = "HiDreamI1RunwareApiJob"
    TITLE = "HiDream-I1 Runware API Job"
    CATEGORY = "HiDream"
    API_ONLY = True  # runs only jobs the API queued: no shipped workflow can use it
    DESCRIPTION = (
        "Runs one imageInference task received by the pack's Runware API (/runware/v1). The API queues it "
        "by itself; it is a node so the task waits its turn in ComfyUI's queue and can be cancelled there."
    )
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("response_json",)
    OUTPUT_TOOLTIPS = ("The task's Runware results (one object per image), as the API sent them.",)
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "job_id": ("STRING", {"default": "", "tooltip": "taskUUID of a task the API received."}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, job_id: str) -> float:
        """Never reuse a cached run: a taskUUID may come back after its old job expired."""
        return float("nan")

    def run(self, job_id: str) -> dict:
        ui, results = run_job(job_id, running_prompt_id())
        return {"ui": ui, "result": (json.dumps(results),)}


NODES = [HiDreamI1RunwareApiJob]
