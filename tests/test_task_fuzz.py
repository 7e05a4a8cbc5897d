"""Seeded fuzzing of the task parser and the pre-model checks (issue #16).

Every mutated task file (values swapped for hostile ones, keys dropped or renamed, text cut,
bytes flipped, nesting, encodings) goes through what ``python . run`` does before any model
loads: ``read_task_file``, ``parse_tasks`` and ``check_task``. Asserted for every case: no
exception other than the pack's own ``ValueError``/``TypeError`` (no traceback), no case over
2 s (no hang), and every refusal line names a task field or the file. The tally is printed
(``pytest -s``) for the README's reliability section.
"""

from __future__ import annotations

import json
import random
import re
import time

import pytest
import torch
from hidream_pack.hidream.runware import run as task_runner
from hidream_pack.hidream.runware.task import _TASK_KEYS, TaskValidationError, parse_tasks, read_task_file
from safetensors.torch import save_file

SEED = 20261201
CASES = 400
BASE = {
    "taskType": "imageInference",
    "taskUUID": "c02c8676-a2cb-4b12-8e53-09cc6cd14f84",
    "model": "runware:97@1",
    "positivePrompt": "a lighthouse at dusk",
    "negativePrompt": "blurry",
    "width": 1024,
    "height": 768,
    "steps": 30,
    "CFGScale": 5.0,
    "seed": 42,
    "numberResults": 2,
    "scheduler": "Euler",
    "lora": [{"model": "style.safetensors", "weight": 0.8, "transformer": "high"}],
    "outputType": "URL",
    "outputFormat": "PNG",
    "outputQuality": 90,
    "deliveryMethod": "async",
    "webhookURL": "https://hooks.example.com/services/T1/B2/abcdefghijklmnopqrstuvwx?token=s3cret",
    "uploadEndpoint": "https://bucket.s3.amazonaws.com/k.png?X-Amz-Signature=abc",
    "ttl": 3600,
    "includeCost": True,
    "safety": {"checkContent": False, "mode": "none"},
    "acceleratorOptions": {
        "teaCache": True,
        "teaCacheDistance": 0.4,
        "cacheStartStep": 2,
        "cacheEndStep": 20,
    },
}
HOSTILE_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    2**63,
    -(2**70),
    1e308,
    -0.0,
    0.5,
    "",
    " ",
    "\ud800",
    "\x00",
    "a" * 5000,
    "../../etc/passwd",
    "C:\\x.safetensors",
    "file:///etc/passwd",
    "http://h/" + "x" * 3000,
    [],
    [None],
    {},
    {"model": None},
    [[[[[]]]]],
    "NaN",
    "1e999",
    "Infinity",
]
# Where a refusal may start: a field path, an array entry, the JSON, the file.
_ROOTS = set(_TASK_KEYS) | {"task", "task JSON", "task file"}
_FIELD_RE = re.compile(r"^(?:tasks\[\d+\]\.?)?(?P<root>[^.:\[]*)")


def _mutate_value(rng: random.Random, task: dict) -> dict:
    key = rng.choice(list(task))
    value = task[key]
    if isinstance(value, dict) and value and rng.random() < 0.6:
        inner = rng.choice(list(value))
        task[key] = {**value, inner: rng.choice(HOSTILE_VALUES)}
    elif isinstance(value, list) and value and isinstance(value[0], dict) and rng.random() < 0.6:
        task[key] = [
            {**value[0], rng.choice(["model", "weight", "transformer", "x"]): rng.choice(HOSTILE_VALUES)}
        ]
    else:
        task[key] = rng.choice(HOSTILE_VALUES)
    return task


def _mutate_keys(rng: random.Random, task: dict) -> dict:
    key = rng.choice(list(task))
    value = task.pop(key)
    if rng.random() < 0.5:
        task[rng.choice([key.lower(), key.upper(), key + "s", key[:-1], "\ud800", ""])] = value
    return task


def _text_mutation(rng: random.Random, text: str) -> bytes:
    data = bytearray(text.encode("utf-8"))
    kind = rng.randrange(7)
    if kind == 0:
        return bytes(data[: rng.randrange(len(data))])  # cut short
    if kind == 1:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)  # flipped bytes, maybe invalid UTF-8
        return bytes(data)
    if kind == 2:
        depth = rng.choice([50, 1000, 100_000])
        return ("[" * depth + text + "]" * depth).encode()
    if kind == 3:
        return b"\xef\xbb\xbf" + bytes(data)  # a BOM
    if kind == 4:
        return text.encode("utf-16")
    if kind == 5:
        return text.replace("42", "NaN", 1).replace("5.0", "Infinity", 1).encode()
    return (text[:-1] + ', "seed": 1}').encode()  # a duplicate key


def _cases(rng: random.Random) -> list[bytes]:
    out = []
    for i in range(CASES):
        task = json.loads(json.dumps(BASE))
        if i % 4 == 3:
            out.append(_text_mutation(rng, json.dumps(task)))
            continue
        for _ in range(rng.randint(1, 3)):
            task = (_mutate_value if rng.random() < 0.7 else _mutate_keys)(rng, task)
        payload = [task, BASE] if i % 9 == 0 else task
        out.append(json.dumps(payload).encode("utf-8", "surrogatepass"))
    return out


def _names_a_field(line: str) -> bool:
    if re.match(r"^tasks\[\d+\]:", line):  # the whole entry of an array (not an object, say)
        return True
    m = _FIELD_RE.match(line)
    root = m.group("root") if m else ""
    return root in _ROOTS or root.startswith(("task file", "task JSON")) or ": unknown field" in line


@pytest.fixture
def models_dir(tmp_path, point_models_dir):
    """A models folder holding one LoRA (overrides conftest's tiny-models folder)."""
    (tmp_path / "loras").mkdir()
    save_file({"a.lora_A.weight": torch.zeros(2, 4)}, str(tmp_path / "loras" / "style.safetensors"))
    return point_models_dir(tmp_path)


def test_task_parser_fuzz(tmp_path, models_dir, monkeypatch):
    import socket

    # Webhook hosts resolve to a public address (never contacted: checks open no connection),
    # so valid mutations are accepted and the policy is not what refuses them.
    monkeypatch.setattr(
        socket, "getaddrinfo", lambda host, port, *a, **k: [(2, 1, 6, "", ("8.8.8.8", port or 443))]
    )
    rng = random.Random(SEED)
    tally = {"tried": 0, "accepted": 0, "refused cleanly": 0, "tracebacks": 0, "hangs": 0, "unnamed": 0}
    problems: list[str] = []
    start_all = time.perf_counter()
    for i, data in enumerate(_cases(rng)):
        path = tmp_path / "task.json"
        path.write_bytes(data)
        tally["tried"] += 1
        start = time.perf_counter()
        try:
            tasks = parse_tasks(read_task_file(path))
            for task in tasks:
                task_runner.check_task(task)
            tally["accepted"] += 1
        except TaskValidationError as exc:
            tally["refused cleanly"] += 1
            unnamed = [e for e in exc.errors if not _names_a_field(e)]
            if unnamed:
                tally["unnamed"] += 1
                problems.append(f"case {i}: unnamed {unnamed[:2]}")
        except (ValueError, TypeError) as exc:
            line = str(exc)
            tally["refused cleanly"] += 1
            if "\n" in line or not _names_a_field(line):
                tally["unnamed"] += 1
                problems.append(f"case {i}: unnamed {line[:120]!r}")
        except Exception as exc:  # noqa: BLE001 - anything else is a traceback for the user
            tally["tracebacks"] += 1
            problems.append(f"case {i}: {type(exc).__name__}: {str(exc)[:120]}")
        if time.perf_counter() - start > 2.0:
            tally["hangs"] += 1
            problems.append(f"case {i}: took {time.perf_counter() - start:.1f} s")
    print(f"\ntask fuzz (seed {SEED}): {json.dumps(tally)} in {time.perf_counter() - start_all:.1f} s")
    assert tally["tried"] == CASES
    assert (tally["tracebacks"], tally["hangs"], tally["unnamed"]) == (0, 0, 0), problems[:10]
    assert tally["refused cleanly"] > CASES // 2  # the mutations do reach the checks
    assert time.perf_counter() - start_all < 60
