"""Runware task schema: every bad field is rejected with its path, the spec examples parse.

Validation is pure Python (no torch, no model), so a rejected task cannot reach model code.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hidream_pack.hidream.runware import task as task_mod
from hidream_pack.hidream.runware.task import TaskValidationError, parse_tasks
from hidream_pack.hidream.sampling.schedulers import SCHEDULER_NAMES
from hidream_pack.nodes.task import HiDreamI1RunwareTask

PACK_ROOT = Path(__file__).resolve().parent.parent
TASK_DIR = PACK_ROOT / "workflows" / "tasks"
EXAMPLES = {
    "cathedral": (1024, 1536, 95341, "c02c8676-a2cb-4b12-8e53-09cc6cd14f84"),
    "orchard": (1024, 768, 64095, "ee731c2c-f21b-4193-9d55-a68c219e268f"),
    "glasswright_caravan": (1024, 768, 41485, "623e400e-cc1d-461f-a7aa-3e1992bea0fa"),
    "monorail": (1024, 768, 79278, "6cd4ba4a-9031-4690-bf30-c18e03147f01"),
}


def base() -> dict:
    return json.loads((TASK_DIR / "cathedral.json").read_text())


def errors_of(data) -> list[str]:
    with pytest.raises(TaskValidationError) as info:
        parse_tasks(data)
    assert isinstance(info.value, ValueError)
    return info.value.errors


def _set(path: str, value):
    """A mutation setting ``a.b`` (or deleting it when value is DELETE) on a copy of the base task."""

    def apply(task: dict) -> dict:
        *parents, last = path.split(".")
        node = task
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = copy.deepcopy(value)
        return task

    return apply


DELETE = object()
ACC = "acceleratorOptions"
# (mutation, field path that must start the error, text the error must contain)
INVALID = [
    (_set("taskType", DELETE), "taskType", "missing"),
    (_set("taskType", "imageUpscale"), "taskType", '"imageUpscale"'),
    (_set("taskUUID", DELETE), "taskUUID", "missing"),
    (_set("taskUUID", "not-a-uuid"), "taskUUID", '"not-a-uuid"'),
    (_set("taskUUID", "6ba7b810-9dad-11d1-80b4-00c04fd430c8"), "taskUUID", "UUID v4"),  # version 1
    (_set("taskUUID", "c02c8676a2cb4b128e5309cc6cd14f84"), "taskUUID", "UUID v4"),  # not canonical
    (_set("model", "runware:97@2"), "model", "runware:97@1"),
    (_set("model", DELETE), "model", "missing"),
    (_set("positivePrompt", DELETE), "positivePrompt", "missing"),
    (_set("positivePrompt", "   "), "positivePrompt", "not only whitespace"),
    (_set("positivePrompt", "x" * 3001), "positivePrompt", "3000"),
    (_set("positivePrompt", 42), "positivePrompt", "got 42"),
    (_set("negativePrompt", ["a"]), "negativePrompt", "['a']"),
    (_set("width", 112), "width", "from 128 to 2048"),
    (_set("width", 2064), "width", "got 2064"),
    (_set("width", 1000), "width", "multiple of 16 (nearest: 992 or 1008)"),
    (_set("height", "1024"), "height", '"1024"'),
    (_set("height", True), "height", "got true"),
    (_set("height", 1024.5), "height", "got 1024.5"),
    (_set("steps", 0), "steps", "got 0"),
    (_set("steps", 1001), "steps", "from 1 to 1000"),
    (_set("steps", False), "steps", "got false"),
    (_set("CFGScale", -0.5), "CFGScale", "got -0.5"),
    (_set("CFGScale", "7"), "CFGScale", '"7"'),
    (_set("CFGScale", 100.5), "CFGScale", "from 0 to 100"),
    (_set("CFGScale", 10**400), "CFGScale", "..."),  # too big for a float: rejected, no OverflowError
    (_set("seed", -1), "seed", "got -1"),
    (_set("seed", 2**63), "seed", "9223372036854775807"),
    (_set("seed", "42"), "seed", '"42"'),
    (_set("seed", None), "seed", "got null"),
    (_set("numberResults", 0), "numberResults", "from 1 to 20"),
    (_set("numberResults", 21), "numberResults", "got 21"),
    (_set("outputQuality", 19), "outputQuality", "from 20 to 99"),
    (_set("outputQuality", 100), "outputQuality", "got 100"),
    (_set("outputType", "url"), "outputType", "did you mean 'URL'"),
    (_set("outputFormat", "JPEG"), "outputFormat", "JPG, PNG, WEBP"),
    (_set("deliveryMethod", "later"), "deliveryMethod", "sync, async"),
    (_set("deliveryMethod", "async"), "deliveryMethod", "webhookURL or uploadEndpoint"),
    (_set("webhookURL", "ftp://example.com/hook"), "webhookURL", "only http and https"),
    (_set("uploadEndpoint", "not a url"), "uploadEndpoint", "whitespace"),
    (_set("uploadEndpoint", "https:///no-host"), "uploadEndpoint", "no host"),
    (_set("webhookURL", 12), "webhookURL", "not a string"),
    (_set("ttl", 59), "ttl", "integer >= 60"),
    (_set("ttl", 60.5), "ttl", "got 60.5"),
    (_set("includeCost", "yes"), "includeCost", "true or false"),
    (_set("safety", "fast"), "safety", "a JSON object"),
    (_set("safety.checkContent", 1), "safety.checkContent", "got 1"),
    (_set("safety.mode", "full"), "safety.mode", "none, fast"),
    (_set("safety.extra", True), "safety.extra", "unknown field"),
    (
        _set("safety", {"checkContent": False, "mode": "fast"}),
        "safety.mode",
        "none when checkContent is false",
    ),
    (_set("scheduler", "Euler A"), "scheduler", "did you mean 'Euler a'"),
    (_set("scheduler", 5), "scheduler", "got 5"),
    (_set("lora", []), "lora", "at least 1"),
    (_set("lora", {"model": "a"}), "lora", "an array"),
    (_set("lora", [{"weight": 1}]), "lora[0].model", "missing"),
    (_set("lora", [{"model": "a"}, {"model": "b", "weight": 5}]), "lora[1].weight", "from -4 to 4"),
    (_set("lora", [{"model": "a", "weight": -4.01}]), "lora[0].weight", "got -4.01"),
    (_set("lora", [{"model": "a", "transformer": "middle"}]), "lora[0].transformer", "both, high, low"),
    (_set("lora", [{"model": "a", "scale": 1}]), "lora[0].scale", "unknown field"),
    (_set("lora", ["a.safetensors"]), "lora[0]", "a JSON object"),
    (_set(f"{ACC}.fbCacheThreshold", 1.5), f"{ACC}.fbCacheThreshold", "from 0 to 1"),
    (_set(f"{ACC}.teaCacheDistance", -0.1), f"{ACC}.teaCacheDistance", "got -0.1"),
    (_set(f"{ACC}.dbCacheThreshold", "0.2"), f"{ACC}.dbCacheThreshold", '"0.2"'),
    (_set(f"{ACC}.dbCacheSkipInterval", 0), f"{ACC}.dbCacheSkipInterval", "from 1 to 1000"),
    (_set(f"{ACC}.cacheMaxConsecutiveSteps", 6), f"{ACC}.cacheMaxConsecutiveSteps", "from 1 to 5"),
    (_set(f"{ACC}.cacheStartStep", -1), f"{ACC}.cacheStartStep", "integer >= 0"),
    (_set(f"{ACC}.cacheEndStep", 0), f"{ACC}.cacheEndStep", "integer >= 1"),
    (_set(f"{ACC}.cacheStartStepPercentage", 100), f"{ACC}.cacheStartStepPercentage", "from 0 to 99"),
    (_set(f"{ACC}.cacheEndStepPercentage", 0), f"{ACC}.cacheEndStepPercentage", "from 1 to 100"),
    (_set(f"{ACC}.cacheEndStep", 31), f"{ACC}.cacheEndStep", "<= steps (30)"),
    (
        _set(ACC, {"cacheStartStep": 10, "cacheEndStep": 10}),
        f"{ACC}.cacheEndStep",
        "greater than cacheStartStep (10)",
    ),
    (_set(f"{ACC}.cacheStartStep", 30), f"{ACC}.cacheStartStep", "< steps (30)"),
    (
        _set(ACC, {"cacheStartStepPercentage": 50, "cacheEndStepPercentage": 40}),
        f"{ACC}.cacheEndStepPercentage",
        "greater than cacheStartStepPercentage (50)",
    ),
    (
        _set(ACC, {"cacheStartStep": 2, "cacheEndStepPercentage": 80}),
        f"{ACC}.cacheEndStepPercentage",
        "not both",
    ),
    (_set(ACC, {"fbCache": True, "dbCache": True}), f"{ACC}.dbCache", "at most one block cache"),
    (_set(f"{ACC}.fbCache", "true"), f"{ACC}.fbCache", "true or false"),
    (_set(f"{ACC}.magCache", True), f"{ACC}.magCache", "unknown field"),
    (_set(ACC, [1]), ACC, "a JSON object"),
    (_set("cfgScale", 7), "cfgScale", "did you mean 'CFGScale'"),
    (_set("outputs", ["x"]), "outputs", "unknown field"),
]


def test_enough_distinct_invalid_cases():
    assert len(INVALID) >= 40
    assert len({path for _, path, _ in INVALID}) >= 40


@pytest.mark.parametrize(
    ("mutate", "path", "text"), INVALID, ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(INVALID)]
)
def test_invalid_task_names_field(mutate, path, text):
    errors = errors_of(mutate(base()))
    assert len(errors) == 1, errors
    assert errors[0].startswith(path + ":"), errors
    assert text in errors[0], errors


def test_all_errors_of_a_task_reported_together():
    task = base() | {"width": 100, "steps": 0, "foo": 1, "lora": [{"model": "a", "weight": 9}]}
    errors = errors_of(task)
    assert [e.split(":")[0] for e in errors] == ["foo", "steps", "width", "lora[0].weight"]


def test_array_errors_carry_task_index():
    good, bad = base(), base() | {"taskUUID": "ee731c2c-f21b-4193-9d55-a68c219e268f", "seed": -3}
    errors = errors_of([good, bad, 7])
    assert errors == [
        "tasks[1].seed: got -3; allowed: an integer from 0 to 9223372036854775807",
        "tasks[2]: got 7; allowed: a JSON object",
    ]


def test_duplicate_task_uuid_in_array():
    errors = errors_of([base(), base()])
    assert errors == [
        'tasks[1].taskUUID: got "c02c8676-a2cb-4b12-8e53-09cc6cd14f84"; allowed: a UUID not already used by tasks[0]'
    ]


def test_top_level_must_be_task_or_array():
    assert errors_of([]) == ["task: got []; allowed: a task object or a non-empty array of them"]
    assert errors_of("42") == ["task: got 42; allowed: a task object or a non-empty array of them"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"taskType": "imageInference",', "task JSON: Expecting"),
        ('{"seed": NaN}', "task JSON: NaN is not valid JSON"),
        ('{"seed": 1, "seed": 2}', "task JSON: duplicate key 'seed'"),
    ],
)
def test_bad_json_text(text, fragment):
    errors = errors_of(text)
    assert len(errors) == 1 and errors[0].startswith(fragment), errors


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_spec_examples_parse(name):
    width, height, seed, uid = EXAMPLES[name]
    raw = (TASK_DIR / f"{name}.json").read_text()
    [t] = parse_tasks(raw)
    assert (t.width, t.height, t.seed, t.task_uuid, t.steps) == (width, height, seed, uid, 30)
    assert t.positive_prompt == json.loads(raw)["positivePrompt"]
    assert (t.cfg_scale, t.scheduler, t.number_results, t.negative_prompt) == (5.0, "Default", 1, "")
    assert (t.output_type, t.output_format, t.output_quality, t.delivery_method) == ("URL", "JPG", 95, "sync")
    assert (t.webhook_url, t.upload_endpoint, t.ttl, t.include_cost, t.lora) == (None, None, None, False, ())
    assert t.safety == task_mod.Safety(False, "none")
    assert t.accelerator_options == task_mod.AcceleratorOptions()
    assert t.seed_was_random is False
    assert t.result_seeds() == (seed,)


def test_all_four_examples_as_one_array():
    tasks = parse_tasks([json.loads((TASK_DIR / f"{n}.json").read_text()) for n in EXAMPLES])
    assert [t.seed for t in tasks] == [95341, 64095, 41485, 79278]


def test_full_task_round_trips():
    raw = base() | {
        "negativePrompt": "blurry",
        "CFGScale": 3.5,
        "numberResults": 3,
        "scheduler": "DPM++ 2M Karras",
        "lora": [{"model": "style.safetensors", "weight": -0.5, "transformer": "low"}, {"model": "b"}],
        "outputType": "base64Data",
        "outputFormat": "WEBP",
        "outputQuality": 80,
        "deliveryMethod": "async",
        "webhookURL": "https://hooks.example.com/r?token=abc",
        "uploadEndpoint": "http://127.0.0.1:9/up",
        "ttl": 3600,
        "includeCost": True,
        "safety": {"checkContent": True},
        ACC: {"teaCache": True, "teaCacheDistance": 0.3, "fbCache": True, "cacheStartStepPercentage": 10},
    }
    [t] = parse_tasks(raw)
    assert t.lora == (
        task_mod.TaskLora("style.safetensors", -0.5, "low"),
        task_mod.TaskLora("b", 1.0, "both"),
    )
    assert t.safety == task_mod.Safety(True, "fast")
    assert t.result_seeds() == (95341, 95342, 95343)
    again = parse_tasks(json.dumps(t.to_dict()))
    assert again == [t]
    assert t.to_dict()[ACC] == {
        "fbCache": True,
        "fbCacheThreshold": 0.25,
        "teaCache": True,
        "teaCacheDistance": 0.3,
        "dbCache": False,
        "dbCacheThreshold": 0.25,
        "dbCacheSkipInterval": 5,
        "cacheStartStepPercentage": 10,
        "cacheMaxConsecutiveSteps": 3,
    }


def test_integral_floats_are_integers():
    [t] = parse_tasks(base() | {"steps": 20.0, "width": 512.0, "seed": 7.0})
    assert (t.steps, t.width, t.seed) == (20, 512, 7)
    assert all(type(v) is int for v in (t.steps, t.width, t.seed))
    [t] = parse_tasks(base() | {"CFGScale": 4, "lora": [{"model": "a", "weight": 2}]})
    assert type(t.cfg_scale) is float and type(t.lora[0].weight) is float


def test_absent_seed_is_drawn_in_uint32_range_and_returned():
    raw = base()
    del raw["seed"]
    seeds = set()
    for _ in range(5):
        [t] = parse_tasks(raw)
        assert 0 <= t.seed <= 2**32 - 1 and t.seed_was_random
        assert t.to_dict()["seed"] == t.seed
        seeds.add(t.seed)
    assert len(seeds) > 1


@pytest.mark.parametrize(
    ("safety", "expected"),
    [
        ({}, (False, "none")),
        ({"checkContent": True}, (True, "fast")),
        ({"checkContent": False}, (False, "none")),
        ({"mode": "fast"}, (True, "fast")),
        ({"mode": "none"}, (False, "none")),
        ({"checkContent": True, "mode": "fast"}, (True, "fast")),
    ],
)
def test_safety_defaults(safety, expected):
    [t] = parse_tasks(base() | {"safety": safety})
    assert (t.safety.check_content, t.safety.mode) == expected


def test_every_scheduler_name_accepted():
    assert len(SCHEDULER_NAMES) == 75
    for name in SCHEDULER_NAMES:
        [t] = parse_tasks(base() | {"scheduler": name})
        assert t.scheduler == name


def test_accelerator_options_map_to_engine_configs():
    from hidream_pack.hidream.cache import config as cc

    raw = base() | {
        ACC: {
            "teaCache": True,
            "teaCacheDistance": 0.4,
            "dbCache": True,
            "dbCacheThreshold": 0.1,
            "dbCacheSkipInterval": 7,
            "cacheStartStep": 2,
            "cacheEndStep": 25,
            "cacheMaxConsecutiveSteps": 2,
        }
    }
    [t] = parse_tasks(raw)
    window = cc.CacheWindow(start_step=2, end_step=25, max_consecutive=2)
    assert t.accelerator_options.cache_configs() == (
        cc.TeaCacheConfig(distance=0.4, window=window),
        cc.DBCacheConfig(threshold=0.1, refresh_interval=7, window=window),
    )
    assert task_mod.AcceleratorOptions().cache_configs() == ()


def test_url_error_never_shows_query():
    errors = errors_of(base() | {"webhookURL": "ftp://h.example/x?token=SECRET123"})
    assert errors == [
        'webhookURL: got "ftp://h.example/x?<redacted>"; allowed: an http:// or https:// URL '
        "(only http and https are allowed)"
    ]


def test_task_node_outputs_typed_values():
    raw = base() | {"lora": [{"model": "a", "weight": 0.5}], ACC: {"fbCache": True}, "numberResults": 2}
    out = HiDreamI1RunwareTask().parse(json.dumps(raw), 0)
    assert out[:8] == (raw["positivePrompt"], "", 1024, 1536, 30, 5.0, 95341, 2)
    assert out[8] == "Default"
    assert json.loads(out[9]) == [{"model": "a", "weight": 0.5, "transformer": "both"}]
    assert json.loads(out[10])["fbCache"] is True
    assert out[11:14] == ("JPG", 95, "URL")
    assert parse_tasks(out[14]) == parse_tasks(raw)
    assert len(out) == len(HiDreamI1RunwareTask.RETURN_TYPES) == len(HiDreamI1RunwareTask.RETURN_NAMES)


def test_task_node_rejects_before_running():
    bad = json.dumps(base() | {"steps": 0, "width": 100})
    message = HiDreamI1RunwareTask.VALIDATE_INPUTS(task_json=bad, task_index=0)
    assert isinstance(message, str) and "steps: got 0" in message and "width: got 100" in message
    assert HiDreamI1RunwareTask.VALIDATE_INPUTS(task_json=json.dumps(base()), task_index=0) is True
    assert HiDreamI1RunwareTask.VALIDATE_INPUTS(task_json=None) is True  # linked input: checked at run time
    with pytest.raises(TaskValidationError):
        HiDreamI1RunwareTask().parse(bad, 0)
    with pytest.raises(ValueError, match=r"task_index: got 1; allowed: 0\.\.0"):
        HiDreamI1RunwareTask().parse(json.dumps(base()), 1)


def test_task_node_inputs_have_tooltips():
    spec = HiDreamI1RunwareTask.INPUT_TYPES()
    for group in spec.values():
        for name, (_, options) in group.items():
            assert options.get("tooltip"), name
    assert parse_tasks(spec["required"]["task_json"][1]["default"])[0].seed == 95341


def test_old_sdk_accelerator_spellings_parse_as_the_spec_fields():
    """runware 0.5.24's typed IAcceleratorOptions sends fbcache / cacheDistance / cacheStopStep."""
    old = {
        **base(),
        "steps": 20,
        "acceleratorOptions": {"fbcache": True, "cacheDistance": 0.3, "cacheStopStep": 15},
    }
    spec = {
        **base(),
        "steps": 20,
        "acceleratorOptions": {"fbCache": True, "fbCacheThreshold": 0.3, "cacheEndStep": 15},
    }
    assert parse_tasks(old)[0].accelerator_options == parse_tasks(spec)[0].accelerator_options
    assert parse_tasks(old)[0].accelerator_options.cache_end_step == 15
    assert errors_of({**old, "acceleratorOptions": {"fbcache": True, "cacheStopStep": 25}}) == [
        "acceleratorOptions.cacheStopStep: got 25; allowed: an integer <= steps (20)"
    ]
    both = errors_of({**old, "acceleratorOptions": {"fbcache": True, "fbCache": True}})
    assert both == [
        "acceleratorOptions.fbcache: given together with fbCache, the same field in the spec's spelling; "
        "allowed: one of the two"
    ]
    assert (
        parse_tasks({**old, "acceleratorOptions": {"deepCache": False}})[
            0
        ].accelerator_options.cache_configs()
        == ()
    )
    (deep,) = errors_of({**old, "acceleratorOptions": {"deepCache": True}})
    assert deep.startswith("acceleratorOptions.deepCache: got true; allowed: false (DeepCache")


def test_a_resent_task_is_the_same_once_defaults_are_filled_in():
    from hidream_pack.runware_api.service import same_task

    sparse = {k: v for k, v in base().items() if k not in ("numberResults", "deliveryMethod", "CFGScale")}
    full = parse_tasks(
        {**sparse, "numberResults": 1, "deliveryMethod": "async", "webhookURL": "https://example.com/h"}
    )[0]
    first = parse_tasks({**sparse, "webhookURL": "https://example.com/h"})[0]
    assert same_task(first, full)
    assert not same_task(
        first, parse_tasks({**sparse, "numberResults": 2, "webhookURL": "https://example.com/h"})[0]
    )
    unseeded = {k: v for k, v in sparse.items() if k != "seed"}
    drawn = parse_tasks(unseeded)[0]
    assert same_task(drawn, parse_tasks(unseeded)[0])  # a second draw: still the same task
    assert not same_task(drawn, parse_tasks({**unseeded, "seed": (drawn.seed + 1) % 2**32})[0])
