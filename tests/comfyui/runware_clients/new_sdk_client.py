"""Runware's ``runware-sdk`` 1.8.0 (WebSocket and REST) against the pack's API.

Run as ``PYTHONPATH=<dir with runware-sdk 1.8.0> python new_sdk_client.py WS_URL HTTP_URL KEY
[WEBHOOK_URL]``; prints one JSON line per scenario for tests/comfyui/test_runware_api.py.
Tasks carry ``taskType`` and an AIR model, so the SDK never needs its online model registry.
"""

from __future__ import annotations

import asyncio
import json
import sys

from runware import Runware

BASE = {
    "taskType": "imageInference",
    "model": "runware:97@1",
    "positivePrompt": "a windmill",
    "width": 128,
    "height": 128,
    "steps": 2,
    "seed": 31,
}


def out(scenario: str, **fields) -> None:
    print(json.dumps({"scenario": scenario, **fields}), flush=True)


def short(items) -> list[dict]:
    items = items if isinstance(items, list) else [items]
    long = ("imageBase64Data", "imageDataURI")
    return [{k: (v[:40] if k in long and isinstance(v, str) else v) for k, v in i.items()} for i in items]


def failure(exc: Exception) -> dict:
    fields = ("code", "parameter", "status_code", "task_uuid")
    return {"raised": type(exc).__name__, "message": str(exc), **{f: getattr(exc, f, None) for f in fields}}


async def interrupt_when_running(http: str, task_uuid: str) -> None:
    """Press ComfyUI's cancel (POST /interrupt) while the task's prompt runs."""
    import aiohttp

    async with aiohttp.ClientSession() as client:
        seen = False
        for _ in range(600):
            async with client.get(f"{http}/queue") as reply:
                running = (await reply.json())["queue_running"]
            ids = [
                item[1]
                for item in running
                if next(iter(item[2].values()))["inputs"].get("job_id") == task_uuid
            ]
            if ids:  # again until it stops: ComfyUI clears the flag when a prompt starts
                seen = True
                async with client.post(f"{http}/interrupt", json={"prompt_id": ids[0]}):
                    pass
            elif seen:
                return
            await asyncio.sleep(0.2)


async def cancelled(rw: Runware, http_url: str) -> None:
    import uuid

    task_uuid = str(uuid.uuid4())
    watcher = asyncio.ensure_future(interrupt_when_running(http_url.rsplit("/runware/", 1)[0], task_uuid))
    try:
        await rw.run({**BASE, "steps": 400, "deliveryMethod": "sync", "taskUUID": task_uuid})
        out("ws_cancelled", raised=None)
    except Exception as exc:  # noqa: BLE001
        out("ws_cancelled", **failure(exc))
    await watcher


async def scenarios(ws_url: str, http_url: str, key: str, webhook: str | None) -> None:
    async with Runware(api_key=key, ws_base_url=ws_url) as rw:
        got = await rw.run(
            {
                **BASE,
                "numberResults": 2,
                "deliveryMethod": "sync",
                "outputType": "dataURI",
                "outputFormat": "PNG",
            }
        )
        out("ws_sync2", images=short(got))
        got = await rw.run({**BASE, "numberResults": 2, "seed": 41})  # the SDK's default: async + getResponse
        out("ws_async2", images=short(got))
        if webhook:
            got = await rw.run(
                {**BASE, "deliveryMethod": "sync", "seed": 51, "webhookURL": webhook, "outputType": "URL"}
            )
            out("ws_webhook", images=short(got))
    async with Runware(api_key=key, transport="rest", http_base_url=http_url) as rw:
        got = await rw.run(
            {
                **BASE,
                "deliveryMethod": "sync",
                "outputType": "base64Data",
                "outputFormat": "JPG",
                "includeCost": True,
            }
        )
        out("rest_sync", images=short(got))
        got = await rw.run({**BASE, "seed": 61, "outputFormat": "WEBP"})
        out("rest_async", images=short(got))
        try:
            await rw.run({**BASE, "steps": 0, "deliveryMethod": "sync"})
            out("rest_bad_task", raised=None)
        except Exception as exc:  # noqa: BLE001 - the scenario reports what the SDK raised
            out("rest_bad_task", **failure(exc))
    async with Runware(api_key=key, ws_base_url=ws_url) as rw:
        await cancelled(rw, http_url)
    try:
        async with Runware(api_key="not-the-key", ws_base_url=ws_url) as rw:
            await rw.run({**BASE, "deliveryMethod": "sync"})
        out("ws_wrong_key", raised=None)
    except Exception as exc:  # noqa: BLE001
        out("ws_wrong_key", **failure(exc))
    try:
        async with Runware(api_key="not-the-key", transport="rest", http_base_url=http_url) as rw:
            await rw.run({**BASE, "deliveryMethod": "sync"})
        out("rest_wrong_key", raised=None)
    except Exception as exc:  # noqa: BLE001
        out("rest_wrong_key", **failure(exc))


if __name__ == "__main__":
    args = sys.argv[1:] + [None]
    asyncio.run(asyncio.wait_for(scenarios(args[0], args[1], args[2], args[3]), 240))
