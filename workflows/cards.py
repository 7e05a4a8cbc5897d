"""Template cards: a thumbnail per shipped workflow, with its title, one line and its graph.

    python workflows/cards.py          # write workflows/NAME.jpg for every workflows/NAME.json
    python workflows/cards.py --check  # exit 1 if a workflow has no card entry or no thumbnail

ComfyUI's template browser shows a custom pack's templates by file name only (frontends 1.27
and 1.49: the title and the description are both the file name) and takes the thumbnail
from ``<name>.jpg`` beside the file. So the thumbnail carries what the file name cannot: the
card's place in the reading order, a title, a one-line description and a sketch of the graph
(its nodes where the workflow puts them, the pack's in the pack's colour).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parent
SIZE = (640, 480)
# Reading order of the pack's templates: title, one line.
CARDS: dict[str, tuple[str, str]] = {
    "hidream_i1_full_t2i": ("Text to image", "The three loaders, prompt, scheduler, sampler and decode."),
    "hidream_i1_full_lora_stages": (
        "LoRA on noise stages",
        "One LoRA on the high-noise steps, one on the low.",
    ),
    "hidream_i1_full_first_block_cache": (
        "First Block Cache",
        "Skip steps whose first block barely changes.",
    ),
    "hidream_i1_full_teacache": ("TeaCache", "Skip steps by the change of the timestep-modulated input."),
    "hidream_i1_full_dbcache": ("DBCache", "cache-dit's dual-block cache: first and last blocks compute."),
    "hidream_i1_full_teacache_dbcache": ("TeaCache + DBCache", "Two step caches stacked on one model."),
    "hidream_i1_diffusers_folder": ("Diffusers folder", "All three models from one diffusers-format folder."),
    "hidream_i1_full_safety_check": ("Safety check", "Blur or black out flagged images before saving."),
    "hidream_i1_runware_task": ("Runware task, wired", "A task JSON split into prompts, size, steps, seed."),
    "hidream_i1_run_runware_task": ("Runware task, one node", "A whole imageInference task in one node."),
    "hidream_i1_full_native_cache_lora": (
        "ComfyUI MODEL: cache + LoRA",
        "Caches and stage LoRA on ComfyUI's own MODEL.",
    ),
    "hidream_i1_full_native_custom_sampler": (
        "ComfyUI MODEL: schedulers",
        "Runware schedulers for SamplerCustomAdvanced.",
    ),
    "task_cathedral": ("Spec example: cathedral", "One of Runware's example tasks as a graph, 1024x1536."),
    "task_orchard": ("Spec example: orchard", "One of Runware's example tasks as a graph, 1024x768."),
    "task_glasswright_caravan": (
        "Spec example: caravan",
        "One of Runware's example tasks as a graph, 1024x768.",
    ),
    "task_monorail": ("Spec example: monorail", "One of Runware's example tasks as a graph, 1024x768."),
}
_BG, _INK, _DIM, _PACK, _CORE = (24, 26, 33), (235, 236, 240), (150, 156, 170), (88, 132, 224), (96, 104, 120)


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return [*lines, line] if line else lines


def _sketch(draw, workflow: dict, box: tuple[int, int, int, int]) -> None:
    """The graph's nodes at their places, scaled into ``box``; links as lines."""
    nodes = workflow["nodes"]
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] for n in nodes)
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    scale = min((box[2] - box[0]) / (x1 - x0), (box[3] - box[1]) / (y1 - y0))

    def at(x: float, y: float) -> tuple[float, float]:
        return box[0] + (x - x0) * scale, box[1] + (y - y0) * scale

    rects = {
        n["id"]: (*at(*n["pos"]), *at(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])) for n in nodes
    }
    for link in workflow.get("links", []):
        a, b = rects.get(link[1]), rects.get(link[3])
        if a and b:
            draw.line([(a[2], (a[1] + a[3]) / 2), (b[0], (b[1] + b[3]) / 2)], fill=_DIM, width=2)
    label = _font(max(9, int(14 * min(scale * 2.2, 1.0))))
    for n in nodes:
        r = rects[n["id"]]
        ours = n["type"].startswith("HiDreamI1")
        draw.rounded_rectangle(r, radius=4, fill=_PACK if ours else _CORE)
        name = n["type"].removeprefix("HiDreamI1")
        while name and draw.textlength(name, font=label) > r[2] - r[0] - 6:
            name = name[:-1]
        draw.text((r[0] + 3, r[1] + 2), name, font=label, fill=_INK)


def render(stem: str, number: int) -> bytes:
    """The card of ``workflows/<stem>.json`` as JPEG bytes."""
    import io

    from PIL import Image, ImageDraw

    title, line = CARDS[stem]
    workflow = json.loads((WORKFLOWS / f"{stem}.json").read_text(encoding="utf-8"))
    image = Image.new("RGB", SIZE, _BG)
    draw = ImageDraw.Draw(image)
    draw.text((28, 22), f"{number:02d}", font=_font(28), fill=_PACK)
    draw.text((80, 22), title, font=_font(30), fill=_INK)
    y = 68
    for text in _wrap(draw, line, _font(20), SIZE[0] - 56):
        draw.text((28, y), text, font=_font(20), fill=_DIM)
        y += 26
    draw.text((28, SIZE[1] - 30), "HiDream-I1 for ComfyUI", font=_font(16), fill=_DIM)
    _sketch(draw, workflow, (28, y + 20, SIZE[0] - 28, SIZE[1] - 44))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=88)
    return out.getvalue()


def problems() -> list[str]:
    """Every UI workflow has a card entry and a JPEG thumbnail of the card's size, and no more."""
    from PIL import Image

    stems = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    found = [f"{s}.json: no entry in CARDS" for s in stems if s not in CARDS]
    found += [f"CARDS[{s!r}]: no workflows/{s}.json" for s in CARDS if s not in stems]
    for stem in stems:
        path = WORKFLOWS / f"{stem}.jpg"
        if not path.is_file():
            found.append(f"{path.name}: missing (python workflows/cards.py)")
            continue
        with Image.open(path) as jpg:
            if (jpg.format, jpg.size) != ("JPEG", SIZE):
                found.append(f"{path.name}: {jpg.format} {jpg.size}, expected JPEG {SIZE}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if not args.check:
        for number, stem in enumerate(CARDS, start=1):
            (WORKFLOWS / f"{stem}.jpg").write_bytes(render(stem, number))
    found = problems()
    print("\n".join(found) or f"{len(CARDS)} template cards ok")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
