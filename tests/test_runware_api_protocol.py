"""The Runware API's protocol layer without a server: codes, keys, models.json, sessions, jobs.

The real server (routes on ComfyUI, the queue, both SDKs) is tested in
tests/comfyui/test_runware_api.py; here a fake queue stands in for ComfyUI's, so every
protocol branch is checked in milliseconds and without models.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
import uuid

import pytest
from hidream_pack import runware_api
from hidream_pack.hidream.model import paths
from hidream_pack.runware_api import config, jobs, service, wire

KEY = "unit-key-123"


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A user folder with a key and models.json, and a models folder with placeholder files."""
    monkeypatch.delenv(config.KEY_ENV, raising=False)
    models = tmp_path / "models"
    for sub, name in [
        ("diffusion_models", "hidream_i1_full_bf16.safetensors"),
        ("text_encoders", "clip_l_hidream.safetensors"),
        ("text_encoders", "clip_g_hidream.safetensors"),
        ("text_encoders", "t5xxl_fp8_e4m3fn_scaled.safetensors"),
        ("text_encoders", "llama_3.1_8b_instruct_fp8_scaled.safetensors"),
        ("vae", "ae.safetensors"),
        ("loras", "style.safetensors"),
    ]:
        (models / sub).mkdir(parents=True, exist_ok=True)
        (models / sub / name).write_bytes(b"placeholder")
    paths.set_models_dir(models)
    config.set_user_dir(tmp_path / "user")
    folder = tmp_path / "user" / config.FOLDER
    folder.mkdir(parents=True)
    (folder / config.KEY_FILE).write_text(f"# comment\n\n{KEY}\n")
    (folder / config.MODELS_FILE).write_text(json.dumps({"loras": {"civitai:1@1": "style.safetensors"}}))
    yield folder
    config.set_user_dir(None)
    paths.set_models_dir(None)


class FakeQueue:
    """Records submitted jobs; ``state`` is what ComfyUI's queue would say about them."""

    def __init__(self) -> None:
        self.submitted: list[jobs.Job] = []
        self.state = "queued"

    async def submit(self, job: jobs.Job) -> None:
        job.prompt_id = str(uuid.uuid4())
        self.submitted.append(job)

    def check(self, job: jobs.Job) -> None:
        if self.state == "gone":
            job.fail(wire.CODE_CANCELLED, "removed")


def task(**over) -> dict:
    out = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "runware:97@1",
        "positivePrompt": "a fox",
        "width": 128,
        "height": 128,
        "steps": 2,
        "seed": 5,
    }
    out.update(over)
    return out


def run_async(coro):
    """``asyncio.run`` on a thread of its own: the browser suite, earlier in the same session,
    keeps Playwright's event loop running on the main thread."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def talk(session: service.Session, items) -> tuple[list[dict], list]:
    """Send one frame; return the messages emitted at once and the pending sync work."""
    sent: list[dict] = []

    async def emit(message: dict) -> None:
        sent.append(message)

    async def run():
        return await session.handle(json.dumps(items), emit)

    pending = run_async(run())
    return sent, pending


# ------------------------------------------------------------------ wire


@pytest.mark.parametrize(
    ("line", "code", "parameter"),
    [
        ("steps: got 0; allowed: an integer from 1 to 1000", "invalidSteps", "steps"),
        ("positivePrompt: missing; allowed: a string", "missingPositivePrompt", "positivePrompt"),
        ("colour: unknown field; allowed fields: taskType", "unknownParameter", "colour"),
        ('model: got "x"; allowed: one of runware:97@1', "unknownModel", "model"),
        ("lora[1].weight: got 5.0; allowed: a number", "invalidLora", "lora[1].weight"),
        ("tasks[2].CFGScale: got -1; allowed: a number", "invalidCFGScale", "CFGScale"),
        (
            "acceleratorOptions.cacheEndStep: got 9; allowed:",
            "invalidAcceleratorOptions",
            "acceleratorOptions.cacheEndStep",
        ),
    ],
)
def test_validation_codes(line, code, parameter):
    assert wire.validation_code(line) == (code, parameter)


def test_http_status_by_first_error():
    assert [
        wire.http_status([wire.error(c, "m")])
        for c in (
            "invalidApiKey",
            "noApiKeyConfigured",
            "taskCancelled",
            "taskFailedOrNotFound",
            "invalidSteps",
            "inferenceError",
        )
    ] == [401, 403, 409, 404, 400, 500]
    assert wire.http_status([]) == 200


# ------------------------------------------------------------------ config


def test_keys_from_file_and_env(user_dir, monkeypatch):
    assert config.configured_keys() == (KEY,)
    assert [config.check_key(k) for k in (KEY, "nope", "", None, 5)] == [
        "ok",
        "invalid",
        "missing",
        "missing",
        "missing",
    ]
    monkeypatch.setenv(config.KEY_ENV, "env-key")
    assert config.configured_keys() == (KEY, "env-key") and config.check_key("env-key") == "ok"
    (user_dir / config.KEY_FILE).unlink()
    monkeypatch.delenv(config.KEY_ENV)
    assert config.configured_keys() == () and not config.api_enabled()


def test_key_file_change_is_picked_up_without_restart(user_dir):
    assert config.check_key("rotated-key") == "invalid"
    (user_dir / config.KEY_FILE).write_text("rotated-key\n")
    assert config.check_key("rotated-key") == "ok" and config.check_key(KEY) == "invalid"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "models.json: got list; allowed: a JSON object"),
        (
            {"runware:100@1": {}},
            "models.json: 'runware:100@1' is not served; this pack runs only runware:97@1",
        ),
        (
            {"runware:97@1": {"dtype": "fp64"}},
            "models.json: runware:97@1.dtype: got 'fp64'; allowed: one of bf16, fp16, fp32",
        ),
        ({"runware:97@1": {"vea": "ae.safetensors"}}, "models.json: runware:97@1.vea: unknown field"),
        ({"loras": {"a": 3}}, "models.json: loras: expected an object mapping AIR ids"),
        ({"pricePerHour": -1}, "models.json: pricePerHour: got -1; allowed: a number >= 0"),
    ],
)
def test_models_json_errors_name_the_field(doc, message):
    with pytest.raises(ValueError) as exc:
        config.parse_settings(doc)
    assert str(exc.value).startswith(message)


def test_models_json_defaults_pick_files(user_dir):
    settings = config.settings()
    assert settings.entry == config.ModelEntry() and settings.price_per_hour == 0.0
    files = config.resolve_files(settings.entry)
    assert {k: p.name for k, p in files.items()} == {
        "model": "hidream_i1_full_bf16.safetensors",
        "clip_l": "clip_l_hidream.safetensors",
        "clip_g": "clip_g_hidream.safetensors",
        "t5": "t5xxl_fp8_e4m3fn_scaled.safetensors",
        "llama": "llama_3.1_8b_instruct_fp8_scaled.safetensors",
        "vae": "ae.safetensors",
    }


def test_register_routes_only_inside_comfyui():
    assert runware_api.register_routes() is False  # no ComfyUI server in this process


# ------------------------------------------------------------------ sessions


def test_ping_auth_and_refusals(user_dir):
    session = service.Session(FakeQueue(), "http://h:1")
    t = task()
    sent, _ = talk(
        session, [{"taskType": "ping", "ping": True}, t, {"taskType": "authentication", "apiKey": "bad"}]
    )
    assert sent[0] == {"data": [{"taskType": "ping", "pong": True}]}
    assert (sent[1]["errors"][0]["code"], sent[1]["errors"][0]["taskUUID"]) == (
        "missingApiKey",
        t["taskUUID"],
    )
    assert sent[2] == {
        "errors": [
            {
                "code": "invalidApiKey",
                "message": "Invalid API key.",
                "parameter": "apiKey",
                "taskType": "authentication",
            }
        ]
    }
    sent, _ = talk(session, [{"taskType": "authentication", "apiKey": KEY}])
    assert sent == [{"data": [{"taskType": "authentication", "connectionSessionUUID": session.session_uuid}]}]
    assert session.authenticated


def test_api_off_without_key(user_dir):
    (user_dir / config.KEY_FILE).unlink()
    sent, _ = talk(
        service.Session(FakeQueue(), "http://h:1"), [{"taskType": "authentication", "apiKey": KEY}]
    )
    assert sent[0]["errors"][0]["code"] == "noApiKeyConfigured"
    assert KEY not in json.dumps(sent)


def test_bad_tasks_are_refused_before_the_queue(user_dir):
    queue = FakeQueue()
    session = service.Session(queue, "http://h:1", authenticated=True)
    bad = [
        task(steps=0, width=100),
        task(lora=[{"model": "civitai:2@2"}]),
        task(steps=4, acceleratorOptions={"teaCache": True, "cacheEndStep": 9}),
        {"taskType": "upscale", "taskUUID": str(uuid.uuid4())},
        "not an object",
    ]
    sent, pending = talk(session, bad)
    codes = [[e["code"] for e in m["errors"]] for m in sent]
    assert codes == [
        ["invalidSteps", "invalidWidth"],
        ["unknownModel"],
        ["invalidAcceleratorOptions"],
        ["unsupportedTaskType"],
        ["invalidTask"],
    ]
    assert sent[1]["errors"][0]["parameter"] == "lora[0].model"
    assert queue.submitted == [] and pending == []


def test_refusals_name_no_configured_id_and_no_duplicate_task_is_queued(user_dir):
    (user_dir / config.MODELS_FILE).write_text(
        json.dumps({"loras": {"civitai:1@1": "secret_client_lora.safetensors"}})
    )
    queue = FakeQueue()
    session = service.Session(queue, "http://h:1", authenticated=True)
    twin = task()
    sent, _ = talk(session, [task(lora=[{"model": "civitai:2@2"}]), twin, dict(twin, seed=6)])
    unknown = sent[0]["errors"][0]
    assert unknown["code"] == "unknownModel" and "civitai:1@1" not in unknown["message"]
    assert "secret_client_lora" not in json.dumps(sent)
    duplicate = sent[-1]["errors"][0]
    assert (duplicate["code"], duplicate["parameter"], duplicate["taskUUID"]) == (
        "conflictTaskUUID",
        "taskUUID",
        twin["taskUUID"],
    )
    assert duplicate["message"].startswith("tasks[2].taskUUID: ")
    assert [j.task_uuid for j in queue.submitted] == [twin["taskUUID"]]


def test_broken_models_json_is_a_clear_error(user_dir):
    (user_dir / config.MODELS_FILE).write_text('{"runware:97@1": {"model": "missing.safetensors"}}')
    sent, _ = talk(service.Session(FakeQueue(), "http://h:1", authenticated=True), [task()])
    error = sent[0]["errors"][0]
    assert error["code"] == "invalidModelConfiguration" and "missing.safetensors" in error["message"]


def test_async_ack_then_get_response_processing_then_success(user_dir):
    queue = FakeQueue()
    session = service.Session(queue, "http://h:1", authenticated=True)
    t = task(numberResults=2, deliveryMethod="async")  # async without webhook: fine in the API
    sent, pending = talk(session, [t])
    assert sent == [{"data": [{"taskType": "imageInference", "taskUUID": t["taskUUID"]}]}] and pending == []
    job = queue.submitted[0]
    assert job.task.delivery_method == "async" and len(job.image_uuids) == 2
    poll = [{"taskType": "getResponse", "taskUUID": t["taskUUID"]}]
    sent, _ = talk(session, poll)
    assert sent[0]["data"] == [
        {"taskType": "imageInference", "taskUUID": t["taskUUID"], "status": "processing", "imageUUID": u}
        for u in job.image_uuids
    ]
    job.add_result({"taskType": "imageInference", "taskUUID": t["taskUUID"], "imageUUID": job.image_uuids[0]})
    sent, _ = talk(session, poll)
    assert [i["status"] for i in sent[0]["data"]] == ["processing", "processing"]  # all or nothing
    job.add_result({"taskType": "imageInference", "taskUUID": t["taskUUID"], "imageUUID": job.image_uuids[1]})
    job.finish()
    sent, _ = talk(session, poll)
    assert [(i["imageUUID"], i["status"]) for i in sent[0]["data"]] == [
        (u, "success") for u in job.image_uuids
    ]
    sent, _ = talk(session, [t])  # the same task again (an SDK re-send): acknowledged, not queued twice
    assert sent == [{"data": [{"taskType": "imageInference", "taskUUID": t["taskUUID"]}]}]
    assert len(queue.submitted) == 1


def test_sync_streams_each_result_as_it_is_added(user_dir):
    queue = FakeQueue()
    session = service.Session(queue, "http://h:1", authenticated=True)
    t = task(numberResults=2)
    frames: list[dict] = []

    def worker(job: jobs.Job) -> None:  # ComfyUI's prompt worker thread, in miniature
        for u in job.image_uuids:
            time.sleep(0.05)
            job.add_result({"taskUUID": t["taskUUID"], "imageUUID": u})
        job.finish()

    async def run() -> jobs.Job:
        async def emit(message: dict) -> None:
            frames.append(message)

        first = await session.handle(json.dumps([t]), emit)
        replay = await session.handle(json.dumps([t]), emit)  # an SDK re-send attaches to the same job
        job = queue.submitted[0]
        threading.Thread(target=worker, args=(job,)).start()
        await asyncio.wait_for(asyncio.gather(*first, *replay), 10)
        return job

    job = run_async(run())
    assert len(queue.submitted) == 1
    assert [len(f["data"]) for f in frames] == [1, 1, 1, 1]  # one frame per image per waiter
    assert sorted(f["data"][0]["imageUUID"] for f in frames) == sorted(job.image_uuids * 2)


async def _append(frames: list, message: dict) -> None:
    frames.append(message)


def test_sync_waiter_sees_a_job_removed_from_the_queue(user_dir):
    queue = FakeQueue()
    session = service.Session(queue, "http://h:1", authenticated=True)
    t = task()
    _, pending = talk(session, [t])
    queue.state = "gone"
    frames: list[dict] = []
    run_async(session._stream(queue.submitted[0], lambda m: _append(frames, m)))
    assert frames == [
        {
            "errors": [
                {
                    "code": "taskCancelled",
                    "message": "removed",
                    "taskType": "imageInference",
                    "taskUUID": t["taskUUID"],
                }
            ]
        }
    ]
    for coroutine in pending:
        coroutine.close()


def test_get_response_unknown_task(user_dir):
    uid = str(uuid.uuid4())
    sent, _ = talk(
        service.Session(FakeQueue(), "http://h:1", authenticated=True),
        [{"taskType": "getResponse", "taskUUID": uid}],
    )
    assert sent[0]["errors"][0]["code"] == "taskFailedOrNotFound" and sent[0]["errors"][0]["taskUUID"] == uid


def test_finished_jobs_are_kept_for_their_ttl():
    from hidream_pack.hidream.runware.task import parse_tasks

    job = jobs.new_job(parse_tasks(task(ttl=120))[0], {}, "http://h:1")
    assert not job.expired(time.time() + 10**6)  # running jobs never expire
    job.finish()
    assert not job.expired(job.finished_at + 119) and job.expired(job.finished_at + 121)
    plain = jobs.new_job(parse_tasks(task())[0], {}, "http://h:1")
    plain.finish()
    assert not plain.expired(plain.finished_at + jobs.DEFAULT_RETENTION_S - 1)
    assert plain.expired(plain.finished_at + jobs.DEFAULT_RETENTION_S + 1)
    assert job.fail("x", "y") is False  # an ended job keeps its outcome


def _codes(sent: list[dict]) -> list[str]:
    return [e["code"] for m in sent for e in m.get("errors", [])]


def test_hostile_bodies_get_errors_never_a_traceback(user_dir):
    queue = FakeQueue()
    session = service.Session(queue, "http://h:1", authenticated=True, owner="k")

    def send(body: str) -> list[dict]:
        sent: list[dict] = []

        async def emit(message: dict) -> None:
            sent.append(message)

        assert run_async(session.handle(body, emit)) == []
        return sent

    deep = send("[" * 5000 + "]" * 5000)
    assert (
        _codes(deep) == ["invalidJson"]
        and "nested thousands of levels deep" in deep[0]["errors"][0]["message"]
    )
    nested = send(json.dumps([{"lora": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}]))
    assert (
        nested[0]["errors"][0]["message"]
        == "request: nested 20 levels deep; allowed: at most 16 (maxJsonDepth)"
    )
    many = send(json.dumps([{"taskType": "ping"}] * 33))
    assert _codes(many) == ["maxTasksPerRequestExceeded"]
    assert many[0]["errors"][0]["message"].startswith("request: 33 tasks; allowed: at most 32 per request")
    assert queue.submitted == []


def test_limits_from_models_json_work_per_task_and_queue_per_key(user_dir):
    limits = {"maxBodyBytes": 4000, "maxQueuedTasksPerKey": 2, "maxTaskWork": 1024 * 1024 * 30}
    (user_dir / config.MODELS_FILE).write_text(json.dumps({"limits": limits}))
    queue = FakeQueue()
    session = service.Session(queue, "http://h:1", authenticated=True, owner=config.key_owner(KEY))
    big = talk(session, [task(width=1024, height=1024, steps=31)])[0]
    assert _codes(big) == ["maxTaskWorkExceeded"]
    assert "1024x1024 x 31 steps x 1 images = 32505856 pixel-steps" in big[0]["errors"][0]["message"]
    first, second = task(deliveryMethod="async"), task(deliveryMethod="async")
    assert _codes(talk(session, [first, second])[0]) == []
    third = talk(session, [task(deliveryMethod="async")])[0]
    assert _codes(third) == ["rateLimitExceeded"]
    assert _codes(talk(session, [first])[0]) == []  # a re-send of a queued task is not a new one
    other = service.Session(queue, "http://h:1", authenticated=True, owner=config.key_owner("another key"))
    assert _codes(talk(other, [task(deliveryMethod="async")])[0]) == []  # the limit is per key
    assert len(queue.submitted) == 3
    huge = talk(session, [task(positivePrompt="x" * 5000)])[0]
    assert _codes(huge) == ["maxBodySizeExceeded"]
    (user_dir / config.MODELS_FILE).write_text(json.dumps({"limits": {"maxTaskWork": 0}}))
    broken = talk(session, [task()])[0]
    assert _codes(broken) == ["invalidModelConfiguration"]
    assert "limits.maxTaskWork: got 0; allowed: an integer >= 1" in broken[0]["errors"][0]["message"]


def test_a_broken_lora_entry_is_a_configuration_error_without_a_file_listing(user_dir, caplog):
    (user_dir / config.MODELS_FILE).write_text(json.dumps({"loras": {"civitai:1@1": "gone.safetensors"}}))
    session = service.Session(FakeQueue(), "http://h:1", authenticated=True)
    sent, _ = talk(session, [task(lora=[{"model": "civitai:1@1"}])])
    (error,) = sent[0]["errors"]
    assert (error["code"], error["parameter"]) == ("invalidModelConfiguration", "lora[0].model")
    assert error["message"].startswith(
        "lora[0].model: 'civitai:1@1' is configured in the server's models.json"
    )
    assert "style.safetensors" not in json.dumps(sent)  # the folder's files are not listed
    assert "gone.safetensors" in caplog.text  # the operator finds it in the log


def test_accepted_tasks_are_journaled_until_they_end_and_replayed_after_a_restart(user_dir):
    from hidream_pack.runware_api import journal

    queue = FakeQueue()
    session = service.Session(queue, "http://h:1", authenticated=True, owner="k")
    done, waiting = task(deliveryMethod="async"), task(deliveryMethod="async", numberResults=2)
    talk(session, [done, waiting])
    folder = user_dir / journal.FOLDER
    assert sorted(p.stem for p in folder.glob("*.json")) == sorted(t["taskUUID"] for t in (done, waiting))
    first, second = queue.submitted
    first.finish()
    assert [p.stem for p in folder.glob("*.json")] == [waiting["taskUUID"]]
    announced = list(second.image_uuids)

    jobs.STORE.remove(second)  # ComfyUI restarted: the in-memory store is empty again
    again = FakeQueue()
    assert run_async(journal.replay(again)) == 1
    (rerun,) = again.submitted
    assert (rerun.task_uuid, rerun.image_uuids, rerun.owner) == (waiting["taskUUID"], announced, "k")
    rerun.finish()
    assert list(folder.glob("*.json")) == []

    (user_dir / config.MODELS_FILE).write_text(json.dumps({"onRestart": "fail"}))
    lost = task(deliveryMethod="async")
    talk(session, [lost])
    jobs.STORE.remove(jobs.STORE.get(lost["taskUUID"]))
    none = FakeQueue()
    assert run_async(journal.replay(none)) == 1 and none.submitted == []
    sent, _ = talk(session, [{"taskType": "getResponse", "taskUUID": lost["taskUUID"]}])
    (error,) = sent[0]["errors"]
    assert (error["code"], error["taskUUID"]) == ("taskFailed", lost["taskUUID"])
    assert "restarted" in error["message"]
    assert list(folder.glob("*.json")) == []


def test_a_task_belongs_to_the_key_that_sent_it(user_dir):
    """Another key neither reads a task's results (getResponse) nor replays them (same taskUUID)."""
    queue = FakeQueue()
    mine = service.Session(queue, "http://h:1", authenticated=True, owner=config.key_owner(KEY))
    theirs = service.Session(queue, "http://h:1", authenticated=True, owner=config.key_owner("other"))
    t = task(deliveryMethod="async")
    talk(mine, [t])
    queue.submitted[0].add_result({"taskType": "imageInference", "taskUUID": t["taskUUID"], "imageUUID": "x"})
    queue.submitted[0].finish()
    poll = [{"taskType": "getResponse", "taskUUID": t["taskUUID"]}]
    assert talk(mine, poll)[0][0]["data"][0]["status"] == "success"
    assert _codes(talk(theirs, poll)[0]) == ["taskFailedOrNotFound"]
    assert _codes(talk(theirs, [t])[0]) == ["conflictTaskUUID"]
    assert len(queue.submitted) == 1
