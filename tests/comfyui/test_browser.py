"""Every shipped UI workflow in ComfyUI's real editor (headless Chromium), as a user drops it in.

For each ``workflows/*.json``: load it through the editor's file input (the drag-and-drop
handler), check that no missing-nodes dialog opens, every node type is registered, every
widget holds the file's value and every combo value is in its list, shrink it (sampler
width/height/steps, the task nodes' task_json) by editing widgets, press Run, and check that
the editor queued exactly the graph the HTTP suite runs, that the run succeeded, that the
images are in the output folder at the requested size and shown on their output nodes, and
that the browser console logged no error. One screenshot per workflow goes to
``$ARTIFACTS_DIR`` (default ``artifacts/browser``).

Needs Debian's ``chromium`` (``/usr/bin/chromium`` or ``$CHROMIUM``) and the ``playwright``
package; never ``playwright install``. Skipped without them unless ``BROWSER_REQUIRED=1``.
Same server and session as the HTTP suite; tests/comfyui/conftest.py runs each workflow's
browser test right after the HTTP run of its API twin, so its sampling is served from
ComfyUI's cache and the browser part stays short. Each node's help page (web/docs/) is
checked last, opened as a user does: select the node, press the selection toolbox's info button.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import graphs
import pytest
from harness import PACK_ROOT, TEST_NODES, Client

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("ARTIFACTS_DIR") or PACK_ROOT / "artifacts" / "browser")
FLAGS = [
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
RUN_TIMEOUT_MS = 300_000

# Per node of the file: registered type, same widget values, combo values in their lists.
CHECK_NODES = """(wf) => wf.nodes.flatMap(j => {
  const n = app.graph.getNodeById(j.id), ws = n?.widgets || [];
  if (!LiteGraph.registered_node_types[j.type]) return [`${j.id} ${j.type}: not registered`];
  if (n?.type !== j.type) return [`${j.id} ${j.type}: not in the graph`];
  const bad = ws.filter(w => w.type === 'combo' && !w.options.values.includes(w.value))
    .map(w => `${j.id} ${j.type}.${w.name}=${JSON.stringify(w.value)}: not in its list`);
  const got = JSON.stringify(ws.map(w => w.value)), want = JSON.stringify(j.widgets_values || []);
  if (got !== want) bad.push(`${j.id} ${j.type} widgets: ${got} != file ${want}`);
  return bad; })"""

# Widget edits as a user types them: [node id, widget name, value].
SET_WIDGETS = """(edits) => edits.forEach(([id, name, value]) => {
  const w = app.graph.getNodeById(id).widgets.find(w => w.name === name);
  w.value = value; w.callback?.(value); })"""

# Widget values per node; the editor's own image-preview widget ("$$canvas-image-preview") excluded.
WIDGET_VALUES = """() => Object.fromEntries(app.graph._nodes.map(n => [n.id,
  (n.widgets || []).filter(w => !w.name?.startsWith('$$')).map(w => w.value)]))"""

SHOWN = """([id, w, h]) => { const img = app.graph.getNodeById(id)?.imgs?.[0];
  return !!img && img.complete && img.naturalWidth === w && img.naturalHeight === h; }"""


def _known_noise(kind: str, text: str, url: str | None) -> bool:
    """What every page start logs offline (none of it ours: the pack ships no JavaScript): with
    ComfyUI 0.3.64 / frontend 1.27.10 a TypeError in the frontend's settings code, with 0.33.0 /
    frontend 1.49.6 its settings store reading the graph before the app made it; on both, 404s
    for a new user's userdata, user.css and favicon, and the release check to an outside host."""
    if kind == "pageerror":
        return "reading 'id'" in text
    if text == "ComfyApp graph accessed before initialization":
        return "/assets/settingStore-" in (url or "")
    from urllib.parse import urlparse

    local = urlparse(url or "").hostname in ("127.0.0.1", "localhost")
    return text.startswith("Failed to load resource") and (
        not local or "/userdata" in (url or "") or (url or "").endswith(("user.css", "favicon.ico"))
    )


class Editor:
    """One Chromium page on the server's editor, with the console errors it logged."""

    def __init__(self, page, errors: list[tuple[str, str, str | None]]):
        self.page = page
        self.errors = errors

    def new_errors(self, since: int) -> list[tuple[str, str, str | None]]:
        return self.errors[since:]


def _require_browser():
    """playwright's sync API, or skip (fail when BROWSER_REQUIRED=1) with what is missing."""
    problem = None
    if not Path(CHROMIUM).is_file():
        problem = f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set CHROMIUM)"
    else:
        try:
            from playwright.sync_api import sync_playwright

            return sync_playwright
        except ImportError:
            problem = (
                'playwright is not installed (pip install "playwright==1.65.*"; never `playwright install`)'
            )
    if os.environ.get("BROWSER_REQUIRED") == "1":
        pytest.fail(f"browser suite required (BROWSER_REQUIRED=1): {problem}")
    pytest.skip(problem)


@pytest.fixture(scope="session")  # one page for the suite, also when its tests are interleaved
def editor(comfy: Client):
    sync_playwright = _require_browser()
    # A new user gets a template dialog and no graph; the minimap covers the screenshots; below
    # 8 px fonts the canvas draws nodes without text (Fit View of 9+ nodes), useless in screenshots.
    settings = {
        "Comfy.TutorialCompleted": True,
        "Comfy.Minimap.Visible": False,
        "LiteGraph.Canvas.MinFontSizeForLOD": 0,
    }
    status, _ = comfy.request("/api/settings", settings)
    assert status == 200
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    errors: list[tuple[str, str, str | None]] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.on(
            "console",
            lambda m: m.type == "error" and errors.append(("console", m.text, m.location.get("url"))),
        )
        page.on("pageerror", lambda e: errors.append(("pageerror", str(e), None)))
        page.goto(comfy.url + "/")
        page.wait_for_function(
            "() => window.app?.graph && app.canvas && document.querySelector('#graph-canvas')"
        )
        page.wait_for_timeout(2000)
        start = [e for e in errors if not _known_noise(*e)]
        assert start == [], f"console errors at page start: {start}"
        errors.clear()
        try:
            yield Editor(page, errors)
        finally:
            browser.close()


def _load(editor: Editor, path: Path, workflow: dict) -> None:
    """Through the editor's hidden file input: the same handler a drop on the canvas runs."""
    page = editor.page
    page.set_input_files(
        "#comfy-file-input",
        files=[{"name": path.name, "mimeType": "application/json", "buffer": path.read_bytes()}],
    )
    page.wait_for_function(
        "([n, ids]) => app.graph._nodes.length === n && ids.every(id => app.graph.getNodeById(id))",
        arg=[len(workflow["nodes"]), [n["id"] for n in workflow["nodes"]]],
    )
    page.wait_for_timeout(500)  # room for a missing-nodes dialog to open
    dialogs = page.locator(".p-dialog")
    assert dialogs.count() == 0, f"{path.name}: dialog on load: {dialogs.first.inner_text()[:500]}"


def _shrink_edits(twin: dict, shrunk: dict) -> list[list]:
    """The widget edits that turn the file's graph into the shrunk one the HTTP suite runs."""
    edits = []
    for node_id, node in shrunk.items():
        for name, value in node["inputs"].items():
            if not isinstance(value, list) and twin[node_id]["inputs"][name] != value:
                edits.append([int(node_id), name, value])
    return edits


def _run_button(page):
    """The editor's Run button. Frontend 1.27 tags its split button's wrapper ``queue-button``;
    1.49 tags the button itself and names a second one (the mode menu) "Run" too."""
    tagged = page.get_by_test_id("queue-button")
    return tagged if tagged.evaluate("e => e.tagName") == "BUTTON" else tagged.locator("button").first


def _run(editor: Editor, name: str) -> dict:
    """Press Run; the body the editor POSTed and the server's answer (its ``_meta`` titles are
    for display only: the server ignores them)."""
    page = editor.page
    page.get_by_role("button", name="Fit View (.)").click()  # previews load only for nodes in view
    with page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as rsp:
        _run_button(page).click()
    answer = rsp.value.json()
    assert rsp.value.ok and not answer.get("node_errors"), f"{name}: queue refused: {answer}"
    return {"sent": rsp.value.request.post_data_json, "answer": answer}


@pytest.mark.parametrize("path", graphs.UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_loads_runs_and_shows_its_image_in_the_editor(editor: Editor, comfy: Client, path: Path):
    workflow = graphs.load(path)
    twin = graphs.load(graphs.WORKFLOWS / "api" / path.name)
    shrunk = graphs.shrink(twin, keep_dtype=path.stem == graphs.AS_SHIPPED)
    since = len(editor.errors)

    _load(editor, path, workflow)
    assert editor.page.evaluate(CHECK_NODES, workflow) == []
    if path.stem in graphs.NATIVE_ONLY:  # loads and checks; tiny weights cannot run there (graphs.py)
        editor.page.screenshot(path=str(ARTIFACTS / f"{path.stem}.png"))
        assert editor.new_errors(since) == [], f"{path.name}: console errors"
        return

    editor.page.evaluate(SET_WIDGETS, _shrink_edits(twin, shrunk))
    before = editor.page.evaluate(WIDGET_VALUES)
    queued = _run(editor, path.name)
    sent = {i: {k: v for k, v in n.items() if k != "_meta"} for i, n in queued["sent"]["prompt"].items()}
    assert sent == shrunk, f"{path.name}: the editor queued another graph than the HTTP suite"

    entry = comfy.wait(queued["answer"]["prompt_id"], timeout=RUN_TIMEOUT_MS / 1000)
    assert entry["status"]["status_str"] == "success", f"{path.name}: {entry['status']['messages']}"
    images = comfy.images(entry)
    assert images, f"{path.name}: no images in {entry['outputs']}"
    want = graphs.requested_sizes(shrunk)
    for node_id, found in images.items():
        assert {size for _, size in found} <= want, (path.name, node_id, found, want)
        for image, _ in found:
            assert image["type"] == "output", image
            assert (comfy.base / "output" / image.get("subfolder", "") / image["filename"]).is_file(), image
        width, height = found[0][1]
        editor.page.wait_for_function(SHOWN, arg=[int(node_id), width, height], timeout=30_000)
    # A Run changes no widget: no 'control after generate' may move a seed the file fixed.
    assert editor.page.evaluate(WIDGET_VALUES) == before, f"{path.name}: widget values changed by Run"
    editor.page.screenshot(path=str(ARTIFACTS / f"{path.stem}.png"))
    assert editor.new_errors(since) == [], f"{path.name}: console errors"


HELP_PAGE = ".node-help-content .markdown-content"
# The node's title bar in page coordinates (the canvas draws no DOM for nodes).
TITLE_POINT = """(id) => { const n = app.graph.getNodeById(id), ds = app.canvas.ds;
  const r = app.canvas.canvas.getBoundingClientRect();
  const x = n.pos[0] + 40, y = n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2;
  return [r.left + (x + ds.offset[0]) * ds.scale, r.top + (y + ds.offset[1]) * ds.scale]; }"""
# A new node right of the canvas middle, clear of the sidebar the help opens in (it overlays the canvas).
ADD_NODE = """(type) => { const n = LiteGraph.createNode(type); app.graph.add(n);
  const ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect();
  n.pos = [r.width * 0.55 / ds.scale - ds.offset[0], r.height * 0.3 / ds.scale - ds.offset[1]];
  app.canvas.setDirty(true, true); return n.id; }"""


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="session")
def pack_nodes(comfy: Client) -> dict[str, dict]:
    """The pack's nodes: every custom node but the suite's own stand-ins (harness.TEST_NODES)."""
    stand_ins = "custom_nodes." + Path(TEST_NODES).stem
    return {
        k: v
        for k, v in comfy.object_info().items()
        if v["python_module"].startswith("custom_nodes.") and v["python_module"] != stand_ins
    }


def _help_text(editor: Editor, node_id: str) -> str:
    """Add the node, click its title, press the toolbox's info button; the help page's text."""
    page = editor.page
    nid = page.evaluate(ADD_NODE, node_id)
    page.wait_for_timeout(100)
    x, y = page.evaluate(TITLE_POINT, nid)
    page.mouse.click(x, y)
    page.locator('[data-testid="info-button"]').click()
    title = page.evaluate("(id) => app.graph.getNodeById(id).title", nid)
    page.wait_for_function(
        "(title) => document.querySelector('.node-help-content .markdown-content h1')?.textContent === title",
        arg=title,
    )
    return page.locator(HELP_PAGE).inner_text()


def test_every_pack_node_shows_its_help_page_in_the_editor(editor: Editor, pack_nodes: dict[str, dict]):
    assert len(pack_nodes) == len(list((PACK_ROOT / "web" / "docs").glob("*.md")))
    since = len(editor.errors)
    editor.page.evaluate("() => app.graph.clear()")
    missing = {}
    for node_id, info in sorted(pack_nodes.items()):
        text = _flat(_help_text(editor, node_id))
        wanted = [info["description"]]
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                wanted += [name, spec[1]["tooltip"]]
        wanted += list(info["output_name"]) + list(info["output_tooltips"])
        gaps = [w for w in wanted if _flat(w) not in text]
        if gaps:
            missing[node_id] = gaps
        if node_id == "HiDreamI1Sampler":
            editor.page.screenshot(path=str(ARTIFACTS / "help_page.png"))
        editor.page.evaluate("() => app.graph.clear()")
    assert missing == {}, "help page lacks these texts"
    # The editor asks for docs/<id>/<locale>.md first; the pack ships one page for all locales.
    locale_404 = re.compile(r"/extensions/[^/]+/docs/HiDreamI1\w+/en\.md$")
    others = [e for e in editor.new_errors(since) if not locale_404.search(e[2] or "")]
    assert others == [], others


OPEN_TEMPLATES = "() => app.extensionManager.command.execute('Comfy.BrowseTemplates')"
WIDGET_LABEL = "([id, name]) => app.graph.getNodeById(id).widgets.find(w => w.name === name).label"
FIRST = "hidream_i1_full_t2i"
# The card titled ``name`` shows our 640x480 thumbnail (both frontends load it as a blob: URL).
CARD_SHOWN = """(name) => { const title = [...document.querySelectorAll('[role=dialog] *')]
  .find(e => e.children.length === 0 && e.textContent.trim() === name);
  let card = title; while (card && !card.querySelector('img')) card = card.parentElement;
  const img = card?.querySelector('img'); return !!img && img.complete && img.naturalWidth === 640; }"""


def _pack_module(comfy: Client) -> str:
    listed = comfy.get_json("/workflow_templates")
    (module,) = [m for m in listed if FIRST in listed[m]]
    return module


def test_first_five_minutes_tiny_models_a_template_card_and_an_image(editor: Editor, comfy: Client, tmp_path):
    """The README's first five minutes: ``python . tiny-models`` writes what the server's models
    folder holds; Browse Templates shows the pack's card with its thumbnail; a click opens the
    workflow; Run (steps lowered to 8, the size kept) shows a 1024x1024 image on Save Image."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(PACK_ROOT), "tiny-models", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    server_models = comfy.base / "models"
    for path in tmp_path.rglob("*.safetensors"):
        rel = path.relative_to(tmp_path)
        if rel.parts[0] != "diffusers":
            assert (server_models / rel).read_bytes() == path.read_bytes(), rel

    page = editor.page
    since = len(editor.errors)
    page.evaluate("() => app.graph.clear()")
    page.evaluate(OPEN_TEMPLATES)
    module = _pack_module(comfy)
    dialog = page.get_by_role("dialog")  # not the workflow tabs, which may carry the same name
    dialog.get_by_text(module, exact=True).first.click(timeout=30_000)  # the pack's category
    title = dialog.get_by_text(FIRST, exact=True).first  # frontends title a pack's card by its file name
    title.wait_for(timeout=30_000)
    title.scroll_into_view_if_needed(timeout=30_000)  # cards load their thumbnails when in view
    page.wait_for_function(CARD_SHOWN, arg=FIRST, timeout=30_000)  # the editor re-renders the img
    page.screenshot(path=str(ARTIFACTS / "template_cards.png"))
    title.click()
    workflow = graphs.load(graphs.WORKFLOWS / f"{FIRST}.json")
    page.wait_for_function("(n) => app.graph._nodes.length === n", arg=len(workflow["nodes"]))
    assert page.evaluate(CHECK_NODES, workflow) == []
    assert page.evaluate(WIDGET_LABEL, [5, "shift"]) == "shift (0 = variant default)"
    page.evaluate(SET_WIDGETS, [[6, "steps", 8]])
    queued = _run(editor, FIRST)
    entry = comfy.wait(queued["answer"]["prompt_id"], timeout=RUN_TIMEOUT_MS / 1000)
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    (found,) = comfy.images(entry).values()
    assert [size for _, size in found] == [(1024, 1024)]
    page.wait_for_function(SHOWN, arg=[8, 1024, 1024], timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "first_five_minutes.png"))
    assert editor.new_errors(since) == [], "console errors"


SEEN = """() => { window.__hidreamSeen = [];
  const api = window.comfyAPI?.api?.api ?? app.api;
  for (const t of ['executing', 'progress', 'progress_state', 'executed', 'execution_start', 'execution_error', 'b_preview'])
    api.addEventListener(t, (e) => window.__hidreamSeen.push([t, JSON.stringify(e.detail ?? null)]));
  return !!api; }"""


def test_an_api_task_never_lights_up_the_open_graph(editor: Editor, comfy: Client):
    """While the Runware API runs a task, the user's open graph (whose node 1 the API's old
    one-node prompt shared an id with) gets no executing outline, progress bar or preview."""
    import json
    import uuid

    import requests

    folder = comfy.base / "user" / "hidream_runware"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "api_key").write_text("browser-key-5d1e\n")
    (folder / "models.json").write_text(json.dumps({"runware:97@1": {"dtype": "fp32", "weights": "gpu"}}))
    page = editor.page
    if page.locator(".p-dialog").count():  # an earlier test's template dialog
        page.keyboard.press("Escape")
        page.wait_for_function("() => !document.querySelector('.p-dialog')", timeout=10_000)
    _load(editor, graphs.WORKFLOWS / f"{FIRST}.json", graphs.load(graphs.WORKFLOWS / f"{FIRST}.json"))
    assert page.evaluate(SEEN)
    task = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "positivePrompt": "a kite",
        "model": "runware:97@1",
        "width": 256,
        "height": 256,
        "steps": 60,
        "seed": 99,
        "deliveryMethod": "async",
    }
    headers = {"Authorization": "Bearer browser-key-5d1e"}
    url = comfy.url + "/runware/v1"
    assert requests.post(url, json=[task], headers=headers, timeout=60).status_code == 200
    deadline, shot = time.time() + 120, False
    while time.time() < deadline:
        body = requests.post(
            url, json=[{"taskType": "getResponse", "taskUUID": task["taskUUID"]}], headers=headers, timeout=60
        ).json()
        if body.get("data") and body["data"][0].get("status") == "success":
            break
        if not shot and comfy.get_json("/queue")["queue_running"]:
            page.wait_for_timeout(1500)
            page.screenshot(path=str(ARTIFACTS / "api_task_running.png"))  # node 1 without an outline
            shot = True
        time.sleep(0.3)
    else:
        raise AssertionError(f"the API task did not finish: {body}")
    assert shot, "never saw the API task running"
    assert page.evaluate("() => window.__hidreamSeen") == []
