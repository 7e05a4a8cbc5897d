"""Encode, tag, save and describe generated images the way the Runware API returns them.

- Encoding: JPG and WEBP are lossy at ``outputQuality`` (20..99); PNG is lossless, so the
  quality does not apply to it (compress level 4, as ComfyUI's SaveImage uses).
- Metadata: PNG gets text chunks ``prompt`` and one per ``extra_pnginfo`` key (``workflow``)
  exactly as ComfyUI's SaveImage writes them, so a PNG dragged onto ComfyUI restores the
  graph, plus ``parameters`` with the task JSON. JPG and WEBP get EXIF: ImageDescription and
  UserComment carry the task JSON, Model ``prompt:{...}`` and Make ``workflow:{...}`` follow
  ComfyUI's animated-WEBP convention. A JPEG EXIF block cannot exceed 64 KB; a workflow too
  large for it is left out (logged), the task JSON is kept.
- Files go to ``<output root>/hidream/`` with a UUID in the name (never overwritten). A
  file saved with a ttl gets a sidecar ``<name>.ttl.json`` holding its expiry; the next save
  removes expired files that have such a sidecar, and nothing else.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .. import host
from ..limits import (
    DELIVERY_METHODS,
    OUTPUT_FORMATS,
    OUTPUT_TYPES,
    QUALITY,
    TTL,
    check_choice,
    check_int,
    problem,
)

log = logging.getLogger(__name__)

PACK_SUBFOLDER = "hidream"
DEFAULT_BASE_URL = "http://127.0.0.1:8188"
BASE_URL_ENV = "HIDREAM_VIEW_BASE_URL"
TTL_SUFFIX = ".ttl.json"
PACK_MARKER = "comfyui-hidream-i1"
PNG_COMPRESS_LEVEL = 4
JPEG_EXIF_MAX = 65000  # an APP1 segment holds at most 65533 bytes
# outputFormat -> (Pillow format, file extension, MIME type)
FORMATS = {
    "JPG": ("JPEG", "jpg", "image/jpeg"),
    "PNG": ("PNG", "png", "image/png"),
    "WEBP": ("WEBP", "webp", "image/webp"),
}
_EXIF_IFD = 0x8769
_TAG_DESCRIPTION, _TAG_MAKE, _TAG_MODEL, _TAG_USER_COMMENT = 0x010E, 0x010F, 0x0110, 0x9286
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ImageMetadata:
    """What to embed: the task JSON (``parameters``), ComfyUI's API prompt and its extra_pnginfo."""

    parameters: dict | None = None
    prompt: dict | None = None
    extra_pnginfo: dict | None = None


@dataclass(frozen=True)
class SavedImage:
    """One saved file and the bytes written to it."""

    path: Path
    filename: str
    subfolder: str
    output_format: str
    data: bytes
    image_uuid: str

    @property
    def content_type(self) -> str:
        return FORMATS[self.output_format][2]

    def ui_entry(self) -> dict:
        """The entry ComfyUI's UI uses to show a saved image (as SaveImage returns)."""
        return {"filename": self.filename, "subfolder": self.subfolder, "type": "output"}


def to_uint8_images(images: Any) -> list[np.ndarray]:
    """HxWxC uint8 arrays from a ComfyUI IMAGE ([B,H,W,C] float 0..1) or a uint8/float array.

    Floats are scaled by 255, clipped and truncated exactly as ComfyUI's SaveImage does, so
    the same IMAGE gives the same pixels here and there.
    """
    if hasattr(images, "detach"):  # torch tensor, without importing torch here
        images = images.detach().float().cpu().numpy()
    if not isinstance(images, np.ndarray):
        raise TypeError(
            f"images: got {type(images).__name__}; allowed: a ComfyUI IMAGE tensor or a numpy array"
        )
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[-1] not in (1, 3, 4) or 0 in images.shape:
        raise ValueError(
            f"images: got shape {tuple(images.shape)}; allowed: [B, H, W, C] or [H, W, C] with C = 1, 3 or 4"
        )
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise TypeError(f"images: got dtype {images.dtype}; allowed: uint8 (0..255) or float (0..1)")
        images = np.clip(255.0 * images, 0, 255).astype(np.uint8)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return [np.ascontiguousarray(img) for img in images]


def _check_format(output_format: str, quality: int) -> None:
    check_choice("outputFormat", output_format, OUTPUT_FORMATS)
    try:
        check_int("outputQuality", quality, QUALITY)
    except TypeError as exc:  # one exception type for every output setting
        raise ValueError(str(exc)) from None


def _check_ttl(ttl: Any) -> None:
    """None (keep forever) or at least Runware's floor, in seconds."""
    if ttl is not None:
        try:
            check_int("ttl", ttl, TTL, " (seconds), or none")
        except TypeError as exc:
            raise ValueError(str(exc)) from None


def _png_info(meta: ImageMetadata) -> PngInfo:
    info = PngInfo()
    if meta.parameters is not None:
        info.add_text("parameters", json.dumps(meta.parameters))
    if meta.prompt is not None:
        info.add_text("prompt", json.dumps(meta.prompt))
    for key, value in (meta.extra_pnginfo or {}).items():
        info.add_text(key, json.dumps(value))
    return info


def _exif(meta: ImageMetadata, limit: int | None) -> bytes:
    """EXIF bytes; drops the ComfyUI graph, then everything, if over ``limit`` bytes."""
    exif = Image.Exif()
    if meta.parameters is not None:
        params = json.dumps(meta.parameters)  # ASCII: json escapes everything else
        exif[_TAG_DESCRIPTION] = params
        exif.get_ifd(_EXIF_IFD)[_TAG_USER_COMMENT] = b"ASCII\0\0\0" + params.encode("ascii")
    small = exif.tobytes()
    if meta.prompt is not None:
        exif[_TAG_MODEL] = "prompt:" + json.dumps(meta.prompt)
    workflow = (meta.extra_pnginfo or {}).get("workflow")
    if workflow is not None:
        exif[_TAG_MAKE] = "workflow:" + json.dumps(workflow)
    full = exif.tobytes()
    if limit is None or len(full) <= limit:
        return full
    log.warning("EXIF with the ComfyUI graph is %d bytes (JPEG max %d): graph left out", len(full), limit)
    if len(small) <= limit:
        return small
    log.warning("EXIF with the task JSON is %d bytes (JPEG max %d): no metadata embedded", len(small), limit)
    return b""


def encode_image(
    image: np.ndarray, output_format: str, quality: int = 95, metadata: ImageMetadata | None = None
) -> bytes:
    """Encode one HxWxC uint8 image as JPG, PNG or WEBP bytes, with metadata if given."""
    _check_format(output_format, quality)
    pil = Image.fromarray(image, "RGBA" if image.shape[-1] == 4 else "RGB")
    meta = metadata or ImageMetadata()
    buf = io.BytesIO()
    if output_format == "PNG":
        pil.save(buf, "PNG", pnginfo=_png_info(meta), compress_level=PNG_COMPRESS_LEVEL)
    elif output_format == "JPG":
        pil.convert("RGB").save(buf, "JPEG", quality=quality, exif=_exif(meta, JPEG_EXIF_MAX))
    else:
        pil.save(buf, "WEBP", quality=quality, exif=_exif(meta, None))
    return buf.getvalue()


def _json_or_none(text: Any) -> Any:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        return json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None


def read_metadata(source: bytes | str | Path) -> dict:
    """The embedded ``parameters``, ``prompt`` and ``workflow`` (None when absent), read back."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        if im.format == "PNG":
            text = dict(im.text)
            return {k: _json_or_none(text.get(k)) for k in ("parameters", "prompt", "workflow")}
        exif = im.getexif()
        comment = exif.get_ifd(_EXIF_IFD).get(_TAG_USER_COMMENT)
        model, make = exif.get(_TAG_MODEL, ""), exif.get(_TAG_MAKE, "")
        return {
            "parameters": _json_or_none(exif.get(_TAG_DESCRIPTION)),
            "user_comment": _json_or_none(comment[8:] if isinstance(comment, bytes) else None),
            "prompt": _json_or_none(model[7:]) if model.startswith("prompt:") else None,
            "workflow": _json_or_none(make[9:]) if make.startswith("workflow:") else None,
        }


def output_root(output_dir: str | os.PathLike | None = None) -> Path:
    """``output_dir`` if given, else ComfyUI's output folder inside ComfyUI, else ``./output``."""
    if output_dir:
        return Path(output_dir)
    return host.output_directory() or Path.cwd() / "output"


def save_image(
    data: bytes,
    output_format: str,
    root: str | os.PathLike,
    *,
    subfolder: str = PACK_SUBFOLDER,
    image_uuid: str | None = None,
    prefix: str = "HiDream",
    ttl: int | None = None,
    now: float | None = None,
) -> SavedImage:
    """Write ``data`` to ``root/subfolder/<prefix>_<imageUUID>.<ext>``; never overwrites a file.

    With ``ttl`` (seconds) a sidecar records the expiry for ``cleanup_expired``.
    """
    check_choice("outputFormat", output_format, OUTPUT_FORMATS)
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
        raise ValueError(problem("filename_prefix", prefix, "1..64 letters, digits, '_' or '-'"))
    _check_ttl(ttl)
    image_uuid = image_uuid or str(uuid.uuid4())
    folder = Path(root) / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    filename = f"{prefix}_{image_uuid}.{FORMATS[output_format][1]}"
    path = folder / filename
    with open(path, "xb") as fh:  # "x": a name clash fails loudly instead of overwriting
        fh.write(data)
    if ttl is not None:
        expires = (time.time() if now is None else now) + ttl
        sidecar = {"pack": PACK_MARKER, "file": filename, "ttl": ttl, "expiresAt": expires}
        (folder / (filename + TTL_SUFFIX)).write_text(json.dumps(sidecar), encoding="utf-8")
    return SavedImage(path, filename, Path(subfolder).as_posix(), output_format, data, image_uuid)


def cleanup_expired(folder: str | os.PathLike, now: float | None = None) -> list[Path]:
    """Remove files whose ttl sidecar says they expired; return the removed image paths.

    Only files next to one of our own sidecars (marked with the pack name) are touched: no
    sidecar means no expiry, and other files in the folder are never looked at.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now = time.time() if now is None else now
    removed = []
    for sidecar in sorted(folder.glob("*" + TTL_SUFFIX)):
        try:
            info = json.loads(sidecar.read_text(encoding="utf-8"))
            expires = float(info["expiresAt"])
            ours = info.get("pack") == PACK_MARKER
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ttl cleanup: unreadable sidecar %s left alone", sidecar.name)
            continue
        if not ours or expires > now:
            continue
        image = folder / sidecar.name[: -len(TTL_SUFFIX)]  # same folder, by construction
        if image.is_file() or image.is_symlink():
            image.unlink(missing_ok=True)
            removed.append(image)
        sidecar.unlink(missing_ok=True)
    if removed:
        log.info("ttl cleanup: removed %d expired file(s) from %s", len(removed), folder)
    return removed


def default_base_url() -> str:
    """Where ``/view`` URLs point: $HIDREAM_VIEW_BASE_URL, else the running ComfyUI server, else 127.0.0.1:8188."""
    env = os.environ.get(BASE_URL_ENV)
    if env:
        return env
    address, port = host.server_address() or (None, None)
    if not port:
        return DEFAULT_BASE_URL
    name = "127.0.0.1" if address in (None, "", "0.0.0.0", "::") else address
    return f"http://{name}:{port}"


def image_url(saved: SavedImage, base_url: str | None) -> str:
    """ComfyUI ``/view`` URL of the file; with ``base_url=None`` a ``file://`` URI (no server)."""
    if base_url is None:
        return saved.path.resolve().as_uri()
    query = urlencode(
        {"filename": saved.filename, "subfolder": saved.subfolder, "type": "output"}, quote_via=quote
    )
    return f"{base_url.rstrip('/')}/view?{query}"


def data_uri(data: bytes, output_format: str) -> str:
    return f"data:{FORMATS[output_format][2]};base64,{base64.b64encode(data).decode('ascii')}"


def build_response(
    task_type: str,
    task_uuid: str,
    saved: SavedImage,
    output_type: str,
    seed: int | None = None,
    base_url: str | None = DEFAULT_BASE_URL,
    cost: float | None = None,
) -> dict:
    """One Runware-format result: taskType, taskUUID, imageUUID, the image field, seed, cost."""
    check_choice("outputType", output_type, OUTPUT_TYPES)
    out: dict[str, Any] = {"taskType": task_type, "taskUUID": task_uuid, "imageUUID": saved.image_uuid}
    if output_type == "URL":
        out["imageURL"] = image_url(saved, base_url)
    elif output_type == "dataURI":
        out["imageDataURI"] = data_uri(saved.data, saved.output_format)
    else:
        out["imageBase64Data"] = base64.b64encode(saved.data).decode("ascii")
    if seed is not None:
        out["seed"] = seed
    if cost is not None:
        out["cost"] = cost
    return out


@dataclass(frozen=True)
class PublishOptions:
    """How results leave the pack: format, response type, delivery (Runware field names in comments).

    ``base_url`` None means ``default_base_url()``; ``file_urls`` gives ``file://`` URLs
    instead (command-line runs, where no server serves ``/view``).
    """

    output_format: str = "JPG"  # outputFormat
    output_quality: int = 95  # outputQuality
    output_type: str = "URL"  # outputType
    delivery_method: str = "sync"  # deliveryMethod
    upload_endpoint: str | None = None  # uploadEndpoint
    webhook_url: str | None = None  # webhookURL
    ttl: int | None = None  # ttl
    include_metadata: bool = True
    base_url: str | None = None
    file_urls: bool = False

    @classmethod
    def from_task(cls, task: Any, **overrides: Any) -> PublishOptions:
        """The options a ``hidream.runware.task.Task`` asks for."""
        fields = {
            "output_format": task.output_format,
            "output_quality": task.output_quality,
            "output_type": task.output_type,
            "delivery_method": task.delivery_method,
            "upload_endpoint": task.upload_endpoint,
            "webhook_url": task.webhook_url,
            "ttl": task.ttl,
        }
        return cls(**{**fields, **overrides})

    def validate(self) -> None:
        """Raise ValueError naming the field before anything is written or sent."""
        from . import targets
        from .delivery import redact_url, url_problem

        _check_format(self.output_format, self.output_quality)
        check_choice("outputType", self.output_type, OUTPUT_TYPES)
        check_choice("deliveryMethod", self.delivery_method, DELIVERY_METHODS)
        for name, url in (("uploadEndpoint", self.upload_endpoint), ("webhookURL", self.webhook_url)):
            trouble = url_problem(url) if url else None
            if trouble:
                raise ValueError(problem(name, redact_url(url), f"an http:// or https:// URL ({trouble})"))
            if url:
                targets.check_url(url, name)
        if self.delivery_method == "async" and not (self.upload_endpoint or self.webhook_url):
            raise ValueError(
                problem("deliveryMethod", "async", "sync, unless webhookURL or uploadEndpoint is given")
            )
        _check_ttl(self.ttl)


@dataclass
class Published:
    """What ``publish`` did: saved files, Runware responses, delivery outcomes."""

    saved: list[SavedImage]
    responses: list[dict]
    deliveries: list[Any]  # DeliveryResult; empty until an async delivery finishes
    pending: Any = None  # delivery.AsyncDelivery when deliveryMethod is async
    deferred: Any = None  # sync delivery not yet run (``publish(defer_delivery=True)``)

    def response_json(self) -> list[dict]:
        """The Runware answer: every result (sync) or the acknowledgement (async)."""
        return self.pending.ack if self.pending is not None else self.responses

    def deliver(self) -> list:
        """Run a deferred sync delivery now (after the caller printed the responses)."""
        if self.deferred is not None:
            work, self.deferred = self.deferred, None
            self.deliveries = work()
        return self.deliveries


def keep_undelivered(saved: list[SavedImage], results: list) -> list[Path]:
    """Remove the ttl sidecar of every image whose upload or webhook failed; returns their paths.

    ttl cleanup must never delete the only copy of an image nobody received: without its
    sidecar the file is never expired.
    """
    failed = {r.image_uuid for r in results if not r.ok}
    kept = []
    for item in saved:
        sidecar = item.path.with_name(item.filename + TTL_SUFFIX)
        if item.image_uuid in failed and sidecar.exists():
            sidecar.unlink(missing_ok=True)
            kept.append(item.path)
            log.warning("%s was not delivered; it is kept (its ttl no longer applies)", item.path)
    return kept


def webhook_payload(response: dict, upload_endpoint: str | None, file_urls: bool) -> dict:
    """What the webhook receives for one image.

    With ``file_urls`` (command-line runs) a ``file://`` URL names a path on this machine that
    the receiver cannot open: it gets the upload's URL without its query (where the image was
    PUT), or, with no upload, the image itself as a data URI.
    """
    url = response.get("imageURL")
    if not (file_urls and isinstance(url, str) and url.startswith("file:")):
        return response
    out = {k: v for k, v in response.items() if k != "imageURL"}
    if upload_endpoint:
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(upload_endpoint)  # the object's URL: no signature (query), no user info
        out["imageURL"] = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    else:
        path = Path(url_to_path(url))
        out["imageDataURI"] = data_uri(path.read_bytes(), _format_of(path))
    return out


def url_to_path(url: str) -> str:
    from urllib.parse import unquote, urlsplit

    return unquote(urlsplit(url).path)


def _format_of(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return next(name for name, (_, e, _) in FORMATS.items() if e == ext)


def publish(
    images: Any,
    task_uuid: str,
    options: PublishOptions,
    *,
    seeds: list[int] | None = None,
    costs: list[float | None] | None = None,
    metadata: ImageMetadata | None = None,
    root: str | os.PathLike | None = None,
    prefix: str = "HiDream",
    task_type: str = "imageInference",
    retry: dict | None = None,
    extra: list[dict] | None = None,
    defer_delivery: bool = False,
    image_uuids: list[str] | None = None,
) -> Published:
    """Save every image FIRST, then describe and deliver it; a failed delivery never loses a file.

    Expired files of the pack's folder are removed before saving. Metadata has upload and
    webhook URLs redacted. An image whose delivery failed keeps its file (``keep_undelivered``).
    ``defer_delivery`` leaves a sync delivery for ``Published.deliver()``. ``image_uuids`` fixes
    each image's UUID in advance (the Runware API announces them in ``processing`` items before
    the images exist); default: new ones.
    """
    from . import delivery

    options.validate()
    arrays = to_uint8_images(images)
    for name, values in (("seeds", seeds), ("costs", costs), ("extra", extra), ("image_uuids", image_uuids)):
        if values is not None and len(values) != len(arrays):
            raise ValueError(
                f"{name}: got {len(values)} value(s) for {len(arrays)} image(s); allowed: one per image"
            )
    folder_root = output_root(root)
    cleanup_expired(folder_root / PACK_SUBFOLDER)
    secrets = [options.upload_endpoint, options.webhook_url]
    meta = None
    if options.include_metadata and metadata is not None:
        meta = ImageMetadata(
            *(
                delivery.redact_secrets(m, secrets)
                for m in (metadata.parameters, metadata.prompt, metadata.extra_pnginfo)
            )
        )
    base_url = None if options.file_urls else (options.base_url or default_base_url())
    saved, responses, items = [], [], []
    for i, array in enumerate(arrays):
        data = encode_image(array, options.output_format, options.output_quality, meta)
        item = save_image(
            data,
            options.output_format,
            folder_root,
            prefix=prefix,
            ttl=options.ttl,
            image_uuid=None if image_uuids is None else image_uuids[i],
        )
        response = build_response(
            task_type,
            task_uuid,
            item,
            options.output_type,
            seed=None if seeds is None else seeds[i],
            base_url=base_url,
            cost=None if costs is None else costs[i],
        )
        if extra is not None:
            response.update(extra[i])  # e.g. NSFWContent from the safety check
        saved.append(item)
        responses.append(response)
        payload = webhook_payload(response, options.upload_endpoint, options.file_urls)
        items.append(delivery.Deliverable(item.data, item.content_type, payload))
    result = Published(saved, responses, [])
    if not (options.upload_endpoint or options.webhook_url):
        return result

    def work() -> list:
        results = delivery.deliver_all(items, options.upload_endpoint, options.webhook_url, **(retry or {}))
        keep_undelivered(saved, results)
        return results

    if options.delivery_method == "async":
        result.pending = delivery.deliver_async(task_type, task_uuid, work)
    elif defer_delivery:
        result.deferred = work
    else:
        result.deliveries = work()
    return result
