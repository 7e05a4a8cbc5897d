"""Runware's official Python SDK ``runware`` 0.5.24 (WebSocket) against the pack's API.

Run as ``PYTHONPATH=<dir with runware 0.5.24> python old_sdk_client.py URL KEY``; prints one
JSON line per scenario (``{"scenario": ..., ...}``) for tests/comfyui/test_runware_api.py.
The SDK is used exactly as a Runware customer uses it, only ``url=`` points here.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from runware import IAcceleratorOptions, IImageInference, Runware


def out(scenario: str, **fields) -> None:
    print(json.dumps({"scenario": scenario, **fields}), flush=True)


def images(items) -> list[dict]:
    keys = (
        "taskType",
        "taskUUID",
        "imageUUID",
        "imageURL",
        "imageBase64Data",
        "imageDataURI",
        "seed",
        "cost",
    )
    return [{k: getattr(i, k, None) for k in keys} for i in items]


def request(**over) -> IImageInference:
    fields = dict(
        positivePrompt="a lighthouse", model="runware:97@1", height=128, width=128, steps=2, seed=11
    )
    fields.update(over)
    return IImageInference(**fields)


def job_id(queue_item: list) -> str | None:
    """The taskUUID an API job prompt (one node) in /queue runs."""
    (node,) = queue_item[2].values()
    return node["inputs"].get("job_id")


async def interrupt_when_running(http: str, task_uuid: str) -> None:
    """Press ComfyUI's cancel (POST /interrupt) while the task's prompt runs."""
    import httpx

    async with httpx.AsyncClient() as client:
        seen = False
        for _ in range(600):
            running = (await client.get(f"{http}/queue")).json()["queue_running"]
            ids = [item[1] for item in running if job_id(item) == task_uuid]
            if ids:  # again until it stops: ComfyUI clears the flag when a prompt starts
                seen = True
                await client.post(f"{http}/interrupt", json={"prompt_id": ids[0]})
            elif seen:
                return
            await asyncio.sleep(0.2)


async def cancelled(rw: Runware, url: str) -> None:
    import uuid

    http = url.replace("ws://", "http://").rsplit("/runware/", 1)[0]
    task_uuid = str(uuid.uuid4())
    watcher = asyncio.ensure_future(interrupt_when_running(http, task_uuid))
    try:
        await rw.imageInference(requestImage=request(steps=400, taskUUID=task_uuid))
        out("cancelled", raised=None)
    except Exception as exc:  # noqa: BLE001
        out("cancelled", raised=type(exc).__name__, error=getattr(exc, "error_data", None))
    await watcher


async def scenarios(url: str, key: str) -> None:
    rw = Runware(api_key=key, url=url)
    await rw.connect()
    start = time.perf_counter()
    got = await rw.imageInference(
        requestImage=request(numberResults=2, outputType="base64Data", outputFormat="WEBP", includeCost=True)
    )
    out("sync2", images=images(got), seconds=time.perf_counter() - start)
    got = await rw.imageInference(requestImage=request(outputType="URL", outputFormat="PNG", seed=12))
    out("url_png", images=images(got))
    got = await rw.imageInference(requestImage=request(outputType="dataURI", outputFormat="JPG", seed=13))
    out("datauri_jpg", images=images(got))
    ack = await rw.imageInference(requestImage=request(numberResults=2, deliveryMethod="async", seed=21))
    out("async_ack", taskType=ack.taskType, taskUUID=ack.taskUUID)
    got = await rw.getResponse(taskUUID=ack.taskUUID, numberResults=2)
    out("async_result", images=images(got))
    try:
        await rw.imageInference(requestImage=request(height=100))
        out("bad_task", raised=None)
    except Exception as exc:  # noqa: BLE001 - the scenario reports what the SDK raised
        out("bad_task", raised=type(exc).__name__, error=getattr(exc, "error_data", None))
    await cancelled(rw, url)
    typed = IAcceleratorOptions(fbcache=True, cacheDistance=0.2, cacheStartStep=1, cacheStopStep=3)
    got = await rw.imageInference(
        requestImage=request(
            steps=4, seed=14, outputType="base64Data", outputFormat="PNG", acceleratorOptions=typed
        )
    )
    out("typed_fbcache", images=images(got))
    try:
        bad_window = IAcceleratorOptions(teaCache=True, cacheStopStep=9)
        await rw.imageInference(requestImage=request(steps=4, acceleratorOptions=bad_window))
        out("typed_bad_window", raised=None)
    except Exception as exc:  # noqa: BLE001
        out("typed_bad_window", raised=type(exc).__name__, error=getattr(exc, "error_data", None))
    bad = Runware(api_key="not-the-key", url=url, max_retries=1, retry_delay=0.2)
    await bad.connect()
    try:
        await asyncio.wait_for(bad.imageInference(requestImage=request()), 60)
        out("wrong_key", raised=None)
    except Exception as exc:  # noqa: BLE001
        out("wrong_key", raised=type(exc).__name__, message=str(exc))


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(scenarios(sys.argv[1], sys.argv[2]), 240))
    sys.stdout.flush()
    import os

    os._exit(0)  # the old SDK leaves heartbeat tasks and sockets behind
