"""HiDream-I1 Save Image (Runware) queued again: a new taskUUID and file unless task_uuid is given.

Without an IS_CHANGED, ComfyUI served the second queue of the same graph from its cache: the
same imageUUID and no new file, although the task_uuid tooltip promises a new one each run.
"""

from __future__ import annotations

import graphs
from harness import Client

UUID = "5d7c1a3e-9b2f-4c8d-a6e1-0f3b2c4d5e6f"


def _save_node(graph: dict) -> str:
    (node_id,) = [i for i, n in graph.items() if n["class_type"] == "HiDreamI1SaveImage"]
    return node_id


def _run_twice(comfy: Client, graph: dict, node_id: str) -> tuple[list[str], list[str], dict]:
    first, second = comfy.run(graph), comfy.run(graph)
    names = [
        [image["filename"] for image in entry["outputs"][node_id]["images"]] for entry in (first, second)
    ]
    return names[0], names[1], second


def _cached_nodes(entry: dict) -> list[str]:
    return [
        node
        for kind, data in entry["status"]["messages"]
        if kind == "execution_cached"
        for node in data["nodes"]
    ]


def test_save_node_writes_a_new_file_each_run_without_task_uuid(comfy: Client):
    graph = graphs.shrink(graphs.load(graphs.WORKFLOWS / "api" / "hidream_i1_full_safety_check.json"))
    node_id = _save_node(graph)
    assert graph[node_id]["inputs"]["task_uuid"] == ""
    first, second, entry = _run_twice(comfy, graph, node_id)
    assert len(first) == len(second) == 1 and first != second
    assert node_id not in _cached_nodes(entry)
    for name in first + second:
        assert (comfy.base / "output" / "hidream" / name).is_file(), name


def test_save_node_with_a_task_uuid_is_served_from_cache(comfy: Client):
    graph = graphs.shrink(graphs.load(graphs.WORKFLOWS / "api" / "hidream_i1_full_safety_check.json"))
    node_id = _save_node(graph)
    graph[node_id]["inputs"]["task_uuid"] = UUID
    first, second, entry = _run_twice(comfy, graph, node_id)
    assert first == second and len(first) == 1
    assert node_id in _cached_nodes(entry)


def test_save_node_refuses_a_private_webhook_through_comfyuis_open_prompt_route(comfy: Client):
    """``/prompt`` needs no key: the node's own webhook input passes the outbound target policy,
    so a stranger cannot make this server POST to its LAN or the cloud metadata address."""
    import harness
    import pytest

    graph = graphs.shrink(graphs.load(graphs.WORKFLOWS / "api" / "hidream_i1_full_safety_check.json"))
    node_id = _save_node(graph)
    graph[node_id]["inputs"]["webhook_url"] = "http://169.254.169.254/latest/meta-data/"
    with pytest.raises(
        harness.PromptFailed,
        match=r"webhookURL: http://169\.254\.169\.254/latest/meta-data/ is refused: .* link-local",
    ):
        comfy.run(graph)
    graph[node_id]["inputs"]["webhook_url"] = "http://[::1]:8188/interrupt"  # this server, by another name
    with pytest.raises(harness.PromptFailed, match=r"is a loopback address"):
        comfy.run(graph)
