"""Image encoding, embedded metadata, saving, response fields and ttl cleanup."""

from __future__ import annotations

import base64
import io
import json
import time
import uuid

import numpy as np
import pytest
import torch
from hidream_pack.hidream.runware import output
from PIL import Image

MAGIC = {"JPG": (b"\xff\xd8\xff", 0), "PNG": (b"\x89PNG\r\n\x1a\n", 0), "WEBP": (b"WEBP", 8)}


def textured(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: lossy codecs have something to lose at low quality."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


META = output.ImageMetadata(
    parameters={"taskType": "imageInference", "positivePrompt": "a glass pear, ünïcode"},
    prompt={"3": {"class_type": "HiDreamI1Sampler", "inputs": {"seed": 5}}},
    extra_pnginfo={"workflow": {"nodes": [{"id": 3}], "links": []}},
)


@pytest.mark.parametrize("fmt", list(output.FORMATS))
def test_magic_bytes_and_decodable(fmt):
    img = textured()
    data = output.encode_image(img, fmt, 90)
    magic, offset = MAGIC[fmt]
    assert data[offset : offset + len(magic)] == magic
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (128, 96) and im.mode == "RGB"
        assert im.format == output.FORMATS[fmt][0]
    if fmt == "PNG":  # lossless: exact pixels back
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), img)


@pytest.mark.parametrize("fmt", ["JPG", "WEBP"])
def test_quality_changes_size_monotonically(fmt):
    img = textured()
    sizes = [len(output.encode_image(img, fmt, q)) for q in (20, 40, 60, 80, 95, 99)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), sizes


def test_png_ignores_quality():
    img = textured()
    assert output.encode_image(img, "PNG", 20) == output.encode_image(img, "PNG", 99)


@pytest.mark.parametrize("fmt", list(output.FORMATS))
def test_metadata_reads_back(fmt):
    data = output.encode_image(textured(), fmt, 90, META)
    meta = output.read_metadata(data)
    assert meta["parameters"] == META.parameters
    assert meta["prompt"] == META.prompt
    assert meta["workflow"] == META.extra_pnginfo["workflow"]
    if fmt != "PNG":
        assert meta["user_comment"] == META.parameters


def test_png_chunks_as_comfyui_writes_them():
    data = output.encode_image(textured(), "PNG", 95, META)
    with Image.open(io.BytesIO(data)) as im:
        assert im.text["prompt"] == json.dumps(META.prompt)
        assert im.text["workflow"] == json.dumps(META.extra_pnginfo["workflow"])
        assert json.loads(im.text["parameters"]) == META.parameters


def test_jpeg_exif_with_pillow_directly():
    data = output.encode_image(textured(), "JPG", 95, META)
    with Image.open(io.BytesIO(data)) as im:
        exif = im.getexif()
        assert json.loads(exif[0x010E]) == META.parameters  # ImageDescription
        assert exif.get_ifd(0x8769)[0x9286][:8] == b"ASCII\0\0\0"  # UserComment charset prefix
        assert exif[0x0110] == "prompt:" + json.dumps(META.prompt)


def test_oversized_workflow_left_out_of_jpeg_only():
    huge = output.ImageMetadata(
        parameters={"a": 1}, prompt={"p": 1}, extra_pnginfo={"workflow": {"blob": "x" * 70000}}
    )
    jpg = output.read_metadata(output.encode_image(textured(), "JPG", 90, huge))
    assert (jpg["parameters"], jpg["prompt"], jpg["workflow"]) == ({"a": 1}, None, None)
    webp = output.read_metadata(output.encode_image(textured(), "WEBP", 90, huge))
    assert webp["workflow"] == {"blob": "x" * 70000}


def test_no_metadata_means_none_embedded():
    for fmt in output.FORMATS:
        meta = output.read_metadata(output.encode_image(textured(), fmt, 90))
        assert meta["parameters"] is None and meta["prompt"] is None and meta["workflow"] is None


def test_comfy_image_tensor_conversion_matches_saveimage():
    t = torch.rand(2, 32, 48, 3, generator=torch.Generator().manual_seed(0))
    arrays = output.to_uint8_images(t)
    assert len(arrays) == 2
    expected = np.clip(255.0 * t[1].numpy(), 0, 255).astype(np.uint8)
    assert np.array_equal(arrays[1], expected)
    rgba = output.to_uint8_images(np.zeros((8, 8, 4), np.uint8))
    assert rgba[0].shape == (8, 8, 4)
    gray = output.to_uint8_images(np.full((1, 8, 8, 1), 0.5, np.float32))
    assert gray[0].shape == (8, 8, 3) and gray[0][0, 0].tolist() == [127, 127, 127]


@pytest.mark.parametrize(
    ("bad", "error", "text"),
    [
        (np.zeros((8, 8, 2), np.uint8), ValueError, "C = 1, 3 or 4"),
        (np.zeros((0, 8, 8, 3), np.float32), ValueError, "got shape (0, 8, 8, 3)"),
        (np.zeros((8, 8, 3), np.int32), TypeError, "got dtype int32"),
        ([[1, 2, 3]], TypeError, "got list"),
    ],
)
def test_bad_images_rejected(bad, error, text):
    with pytest.raises(error, match="images: ") as info:
        output.to_uint8_images(bad)
    assert text in str(info.value)


@pytest.mark.parametrize(
    ("fmt", "quality", "text"),
    [
        ("TIFF", 90, 'outputFormat: got "TIFF"'),
        ("JPG", 19, "outputQuality: got 19"),
        ("PNG", True, "got true"),
    ],
)
def test_bad_encode_settings(fmt, quality, text):
    with pytest.raises(ValueError, match="; allowed: ") as info:
        output.encode_image(textured(), fmt, quality)
    assert text in str(info.value)


def test_save_unique_never_overwrites(tmp_path):
    data = output.encode_image(textured(), "PNG", 95)
    a = output.save_image(data, "PNG", tmp_path)
    b = output.save_image(data, "PNG", tmp_path)
    assert a.path != b.path and a.path.parent == tmp_path / "hidream"
    assert a.filename == f"HiDream_{a.image_uuid}.png" and uuid.UUID(a.image_uuid).version == 4
    assert a.path.read_bytes() == data and a.ui_entry() == {
        "filename": a.filename,
        "subfolder": "hidream",
        "type": "output",
    }
    with pytest.raises(FileExistsError):
        output.save_image(data, "PNG", tmp_path, image_uuid=a.image_uuid)
    with pytest.raises(ValueError, match="filename_prefix"):
        output.save_image(data, "PNG", tmp_path, prefix="../evil")


def test_response_fields_by_output_type(tmp_path):
    opts = dict(task_uuid="c02c8676-a2cb-4b12-8e53-09cc6cd14f84", seeds=[7, 8], root=tmp_path)
    images = np.stack([textured(seed=1), textured(seed=2)])
    by_type = {}
    for output_type in output.OUTPUT_TYPES:
        options = output.PublishOptions(output_format="WEBP", output_quality=70, output_type=output_type)
        by_type[output_type] = output.publish(images, options=options, **opts)
    for kind, pub in by_type.items():
        assert [r["seed"] for r in pub.responses] == [7, 8]
        for saved, resp in zip(pub.saved, pub.responses, strict=True):
            file_bytes = saved.path.read_bytes()
            assert list(resp)[:3] == ["taskType", "taskUUID", "imageUUID"]
            assert resp["imageUUID"] == saved.image_uuid and resp["taskType"] == "imageInference"
            if kind == "dataURI":
                head, payload = resp["imageDataURI"].split(",", 1)
                assert head == "data:image/webp;base64" and base64.b64decode(payload) == file_bytes
            elif kind == "base64Data":
                assert base64.b64decode(resp["imageBase64Data"]) == file_bytes
            else:
                assert resp["imageURL"] == (
                    f"http://127.0.0.1:8188/view?filename={saved.filename}&subfolder=hidream&type=output"
                )


def test_url_base_and_file_urls(tmp_path, monkeypatch):
    img = textured()
    monkeypatch.setenv(output.BASE_URL_ENV, "https://gpu-box.example:8443/")
    pub = output.publish(img, "c02c8676-a2cb-4b12-8e53-09cc6cd14f84", output.PublishOptions(), root=tmp_path)
    assert pub.responses[0]["imageURL"].startswith("https://gpu-box.example:8443/view?filename=HiDream_")
    pub = output.publish(
        img, "c02c8676-a2cb-4b12-8e53-09cc6cd14f84", output.PublishOptions(file_urls=True), root=tmp_path
    )
    assert pub.responses[0]["imageURL"] == pub.saved[0].path.resolve().as_uri()
    assert "seed" not in pub.responses[0] and "cost" not in pub.responses[0]


def test_cost_and_seed_counts_checked(tmp_path):
    img = np.stack([textured(), textured()])
    pub = output.publish(
        img, "c02c8676-a2cb-4b12-8e53-09cc6cd14f84", output.PublishOptions(), costs=[0.5, 0.25], root=tmp_path
    )
    assert [r["cost"] for r in pub.responses] == [0.5, 0.25]
    with pytest.raises(ValueError, match="seeds: got 1 value"):
        output.publish(
            img, "c02c8676-a2cb-4b12-8e53-09cc6cd14f84", output.PublishOptions(), seeds=[1], root=tmp_path
        )


@pytest.mark.parametrize(
    ("options", "text"),
    [
        (output.PublishOptions(ttl=30), "ttl: got 30"),
        (output.PublishOptions(output_type="url"), 'outputType: got "url"'),
        (output.PublishOptions(delivery_method="async"), 'deliveryMethod: got "async"'),
        (output.PublishOptions(webhook_url="file:///etc/passwd"), 'webhookURL: got "file:///etc/passwd"'),
    ],
)
def test_bad_publish_options_rejected_before_saving(tmp_path, options, text):
    with pytest.raises(ValueError) as info:
        output.publish(textured(), "c02c8676-a2cb-4b12-8e53-09cc6cd14f84", options, root=tmp_path)
    assert text in str(info.value)
    assert not (tmp_path / "hidream").exists()


def test_ttl_cleanup_removes_only_expired_pack_files(tmp_path):
    data = output.encode_image(textured(), "JPG", 80)
    now = time.time()
    expired = output.save_image(data, "JPG", tmp_path, ttl=60, now=now - 120)
    alive = output.save_image(data, "JPG", tmp_path, ttl=3600, now=now)
    forever = output.save_image(data, "JPG", tmp_path)  # no ttl: never removed
    folder = tmp_path / "hidream"
    foreign = folder / "someone_else.jpg"
    foreign.write_bytes(b"not ours")
    fake = folder / "fake.jpg"
    fake.write_bytes(b"x")
    (folder / ("fake.jpg" + output.TTL_SUFFIX)).write_text(json.dumps({"expiresAt": 0}))  # no pack marker
    (folder / ("junk.jpg" + output.TTL_SUFFIX)).write_text("{not json")
    outside = tmp_path / "HiDream_outside.jpg"
    outside.write_bytes(b"y")
    removed = output.cleanup_expired(folder, now=now)
    assert removed == [expired.path]
    remaining = sorted(p.name for p in folder.iterdir())
    assert remaining == sorted(
        [
            alive.filename,
            alive.filename + output.TTL_SUFFIX,
            forever.filename,
            "someone_else.jpg",
            "fake.jpg",
            "fake.jpg" + output.TTL_SUFFIX,
            "junk.jpg" + output.TTL_SUFFIX,
        ]
    )
    assert outside.exists()
    assert output.cleanup_expired(folder, now=now + 3601) == [alive.path]
    assert output.cleanup_expired(tmp_path / "missing") == []


def test_next_publish_cleans_expired(tmp_path):
    data = output.encode_image(textured(), "JPG", 80)
    old = output.save_image(data, "JPG", tmp_path, ttl=60, now=time.time() - 61)
    pub = output.publish(
        textured(), "c02c8676-a2cb-4b12-8e53-09cc6cd14f84", output.PublishOptions(ttl=60), root=tmp_path
    )
    assert not old.path.exists()
    assert pub.saved[0].path.exists()
    sidecar = json.loads((pub.saved[0].path.parent / (pub.saved[0].filename + output.TTL_SUFFIX)).read_text())
    assert sidecar["pack"] == output.PACK_MARKER and sidecar["ttl"] == 60
    assert abs(sidecar["expiresAt"] - (time.time() + 60)) < 30


def test_output_root_outside_comfyui(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert output.output_root() == tmp_path / "output"
    assert output.output_root(tmp_path / "x") == tmp_path / "x"
