"""Save-and-deliver node: IMAGE -> files in output/hidream/ + Runware-format response JSON."""

from __future__ import annotations

import json
import uuid

from ..hidream import limits
from ..hidream.runware import output, task


def _resolve(
    settings: dict, task_json: str | None
) -> tuple[output.PublishOptions, str, int | None, dict | None]:
    """Options, taskUUID, first seed and task JSON: from a connected task, else from the widgets."""
    base_url = settings["view_base_url"].strip() or None
    if task_json and task_json.strip():
        tasks = task.parse_tasks(task_json)
        if len(tasks) != 1:
            raise ValueError(
                f"task_json: got {len(tasks)} tasks; allowed: one (the task node's task_json output)"
            )
        t = tasks[0]
        options = output.PublishOptions.from_task(
            t, include_metadata=settings["include_metadata"], base_url=base_url
        )
        return options, t.task_uuid, t.seed, t.to_dict()
    options = output.PublishOptions(
        output_format=settings["output_format"],
        output_quality=settings["output_quality"],
        output_type=settings["output_type"],
        delivery_method=settings["delivery_method"],
        upload_endpoint=settings["upload_endpoint"].strip() or None,
        webhook_url=settings["webhook_url"].strip() or None,
        ttl=settings["ttl"] or None,
        include_metadata=settings["include_metadata"],
        base_url=base_url,
    )
    task_uuid = settings["task_uuid"].strip() or str(uuid.uuid4())
    if not task.is_uuid4(task_uuid):
        raise ValueError(f"task_uuid: got {task_uuid!r}; allowed: a UUID v4, or empty for a new one")
    seed = settings["seed"]
    return options, task_uuid, None if seed < 0 else seed, None


class HiDreamI1SaveImage:
    NODE_ID = "HiDreamI1SaveImage"
    TITLE = "HiDream-I1 Save Image (Runware)"
    CATEGORY = "HiDream"
    OUTPUT_NODE = True
    DESCRIPTION = (
        "Saves images as JPG, PNG or WEBP under output/hidream/ with the generation parameters embedded, "
        "THEN uploads them (HTTP PUT) and/or posts one webhook per image, with bounded retries. Returns the "
        "Runware imageInference response JSON; a failed delivery is reported, the file stays saved."
    )
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("response_json", "delivery_report")
    OUTPUT_TOOLTIPS = (
        "Runware response: a JSON array with one object per image (taskType, taskUUID, imageUUID, the "
        "image field, seed), or the acknowledgement [{taskType, taskUUID}] for deliveryMethod async.",
        "JSON array of delivery outcomes (URLs redacted; each failed attempt listed); [] when nothing to deliver "
        "or delivery is async.",
    )
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Images to save, [B, H, W, C] in 0..1."}),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "HiDream",
                        "tooltip": "File names are <prefix>_<imageUUID>.<ext> (letters, digits, _ -).",
                    },
                ),
                "output_format": (
                    list(limits.OUTPUT_FORMATS),
                    {"default": "JPG", "tooltip": "outputFormat: JPG, PNG or WEBP."},
                ),
                "output_quality": (
                    "INT",
                    {
                        "default": limits.DEFAULT_QUALITY,
                        "min": limits.QUALITY.lo,
                        "max": limits.QUALITY.hi,
                        "tooltip": "outputQuality 20..99 for JPG and WEBP; PNG is lossless and ignores it.",
                    },
                ),
                "output_type": (
                    list(limits.OUTPUT_TYPES),
                    {
                        "default": "URL",
                        "tooltip": "outputType: URL (ComfyUI /view link), dataURI or base64Data (the file's bytes).",
                    },
                ),
                "delivery_method": (
                    list(limits.DELIVERY_METHODS),
                    {
                        "default": "sync",
                        "tooltip": "sync: deliver, then return the results. async: return the acknowledgement at "
                        "once and deliver in the background (needs a webhook or upload URL).",
                    },
                ),
                "ttl": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 315360000,
                        "tooltip": "Seconds to keep the files; expired ones are deleted at a later save. "
                        f"0 = keep forever; otherwise >= {limits.TTL.lo}.",
                    },
                ),
                "include_metadata": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Embed the task JSON, ComfyUI prompt and workflow (PNG text chunks; EXIF for "
                        "JPG/WEBP). Upload and webhook URLs are redacted in it.",
                    },
                ),
            },
            "optional": {
                "task_json": (
                    "STRING",
                    {
                        "forceInput": True,
                        "tooltip": "From HiDream-I1 Runware Task: its taskUUID, seeds, output and delivery "
                        "fields replace the widgets above.",
                    },
                ),
                "task_uuid": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "taskUUID (UUID v4) for the response; empty = a new one each run.",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": -1,
                        "min": -1,
                        "max": limits.SEED.hi,
                        # Not a generation seed: without this the editor adds a randomize control
                        # to every INT named seed and reports a seed the image was not made with.
                        "control_after_generate": False,
                        "tooltip": "Seed of the first image for the response (image i: seed + i); -1 = no seed field.",
                    },
                ),
                "upload_endpoint": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "uploadEndpoint: http(s) URL that gets an HTTP PUT of each file (e.g. a "
                        "presigned S3 URL). Its query string never appears in logs or results.",
                    },
                ),
                "webhook_url": (
                    "STRING",
                    {"default": "", "tooltip": "webhookURL: http(s) URL that gets one JSON POST per image."},
                ),
                "view_base_url": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Base of imageURL links, e.g. https://my-host:8188; empty = this ComfyUI "
                        "server (or $HIDREAM_VIEW_BASE_URL).",
                    },
                ),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    @classmethod
    def IS_CHANGED(cls, task_uuid: str | None = "", **_: object) -> object:
        """Without a task_uuid every run must give a new taskUUID and file, as the tooltip says, so
        the result is never reused (NaN equals nothing). ComfyUI passes no linked value here
        (a connected task_json arrives as None), so a connected task also saves anew each run."""
        given = (task_uuid or "").strip()
        return given if given else float("nan")

    def save(
        self,
        images,
        filename_prefix="HiDream",
        output_format="JPG",
        output_quality=95,
        output_type="URL",
        delivery_method="sync",
        ttl=0,
        include_metadata=True,
        task_json=None,
        task_uuid="",
        seed=-1,
        upload_endpoint="",
        webhook_url="",
        view_base_url="",
        prompt=None,
        extra_pnginfo=None,
    ) -> dict:
        settings = {
            "output_format": output_format,
            "output_quality": output_quality,
            "output_type": output_type,
            "delivery_method": delivery_method,
            "ttl": ttl,
            "include_metadata": include_metadata,
            "task_uuid": task_uuid,
            "seed": seed,
            "upload_endpoint": upload_endpoint,
            "webhook_url": webhook_url,
            "view_base_url": view_base_url,
        }
        options, uid, first_seed, parameters = _resolve(settings, task_json)
        count = images.shape[0] if getattr(images, "ndim", 4) == 4 else 1
        seeds = None if first_seed is None else [first_seed + i for i in range(count)]
        metadata = output.ImageMetadata(parameters=parameters, prompt=prompt, extra_pnginfo=extra_pnginfo)
        published = output.publish(
            images, uid, options, seeds=seeds, metadata=metadata, prefix=filename_prefix.strip() or "HiDream"
        )
        report = [d.to_dict() for d in published.deliveries]
        return {
            "ui": {"images": [s.ui_entry() for s in published.saved]},
            "result": (json.dumps(published.response_json()), json.dumps(report)),
        }


NODES = [HiDreamI1SaveImage]
