"""Every benchmark still runs: ``python <script> --smoke`` for each script in ``bench/``.

Each script (the ``_*.py`` helpers aside; found by glob, so a new benchmark is covered without
a change here) runs as a user runs it, ``cd bench && python X.py --smoke``, in its own process,
with ``TRITON_INTERPRET`` (which conftest sets for this process) removed from its environment.
It must exit 0 and end, as its real run does, with a line of ``key=value`` tokens whose keys
are the ones ``LAST_LINE_KEYS`` lists for it. A smoke run's numbers are not figures: only the
line's shape is checked, so a benchmark cannot silently stop working (an import that moved, an
option that was renamed) while the README still quotes it.

The scripts that need ComfyUI (``NEEDS_COMFYUI``) are skipped with a message when
``COMFYUI_PATH`` is unset and ``<repo>/.comfyui/ComfyUI`` does not exist, unless
``COMFYUI_REQUIRED=1``, where that is a failure.

Speed: each smoke run is mostly one thread, so the selected scripts run ``WORKERS`` at a time
(``BENCH_SMOKE_WORKERS`` overrides), all started when the first of these tests starts, longest
first; each test then waits for its own script. Under pytest-xdist each test runs its own.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))

# The keys of each script's last line, in order (what its docstring says it ends with).
LAST_LINE_KEYS: dict[str, tuple[str, ...]] = {
    "api.py": ("api_overhead",),
    "cache.py": ("efficiency", "vs_cachedit", "same_steps"),
    "cache_kernels.py": (
        ("card", "l1_speedup", "l1_pct_peak", "residual_l1_speedup", "residual_l1_pct_peak")
        if torch.cuda.is_available()
        else ("cpu_l1_ms", "cpu_residual_l1_ms", "interp_l1_ratio", "interp_residual_l1_ratio")
    ),
    "compile.py": ("host_syncs", "moe_ratio", "compiled_ratio"),
    "lora.py": ("switch_overhead", "steps_high", "steps_low"),
    "native_cache.py": ("native_efficiency", "vs_easycache"),
    "native_compile.py": ("native_host_syncs", "native_compiled_ratio"),
    "safety.py": ("check_ms_per_1024_image",),
    "sampler_vs_diffusers.py": ("square_ratio", "nonsquare_ratio"),
    "schedulers.py": ("names_ok", "worst_ode_error"),
    "report.py": ("reported", "met"),
}
NEEDS_COMFYUI = frozenset({"api.py", "native_cache.py", "native_compile.py"})
# Scripts run with TRITON_INTERPRET kept (none: cache_kernels.py sets it itself without CUDA).
NEEDS_TRITON_INTERPRET: frozenset[str] = frozenset()
# Started first, so the pool is not left waiting on one long script at the end (a cold
# inductor compile or a ComfyUI start dominates these).
LONGEST_FIRST = ("api.py", "compile.py", "native_compile.py", "lora.py", "cache.py")

TIMEOUT_S = 300  # a hang, not slowness: a smoke run takes seconds to about a minute
WORKERS = int(os.environ.get("BENCH_SMOKE_WORKERS") or max(1, min(4, os.cpu_count() or 1)))
TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S+")
COMFYUI_HINT = (
    "ComfyUI not found (set COMFYUI_PATH or install it into the checkout with "
    "`bash ../shared/comfyui/install.sh .venv/bin/python .comfyui`)"
)


@dataclass(frozen=True)
class SmokeRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def comfyui_missing() -> bool:
    return not os.environ.get("COMFYUI_PATH") and not (REPO / ".comfyui" / "ComfyUI").exists()


def run_smoke(script: str) -> SmokeRun:
    """``cd bench && python <script> --smoke`` in a session of its own: on a timeout the whole
    group is killed (api.py's ComfyUI server with it)."""
    env = dict(os.environ)
    if script not in NEEDS_TRITON_INTERPRET:
        env.pop("TRITON_INTERPRET", None)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, script, "--smoke"],
        cwd=BENCH,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr += f"\n[test_bench_smoke] killed after {TIMEOUT_S} s"
    return SmokeRun(proc.returncode, stdout, stderr, time.perf_counter() - start)


@pytest.fixture(scope="module")
def smoke_runs(request: pytest.FixtureRequest) -> Iterator[dict[str, Future[SmokeRun]]]:
    """The selected scripts' runs, started together (``WORKERS`` at a time, longest first)."""
    if hasattr(request.config, "workerinput"):  # an xdist worker runs only some of the items
        yield {}
        return
    selected = {
        item.callspec.params["script"]
        for item in request.session.items
        if getattr(item, "obj", None) is test_bench_smoke
    }
    selected -= NEEDS_COMFYUI if comfyui_missing() else set()
    order = sorted(
        selected, key=lambda s: (LONGEST_FIRST.index(s) if s in LONGEST_FIRST else len(LONGEST_FIRST), s)
    )
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="bench-smoke")
    try:
        yield {script: pool.submit(run_smoke, script) for script in order}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def tail(text: str, chars: int = 4000) -> str:
    return text if len(text) <= chars else "..." + text[-chars:]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_smoke(script: str, smoke_runs: dict[str, Future[SmokeRun]]) -> None:
    if script in NEEDS_COMFYUI and comfyui_missing():
        if os.environ.get("COMFYUI_REQUIRED") == "1":
            pytest.fail(f"{script} needs ComfyUI: {COMFYUI_HINT}")
        pytest.skip(f"{script} needs ComfyUI: {COMFYUI_HINT}")
    run = smoke_runs[script].result() if script in smoke_runs else run_smoke(script)
    print(f"{script} --smoke: {run.seconds:.1f} s")
    lines = [line.strip() for line in run.stdout.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    report = f"exit {run.returncode} after {run.seconds:.1f} s\nstdout:\n{tail(run.stdout)}\nstderr:\n{tail(run.stderr)}"
    assert run.returncode == 0, f"bench/{script} --smoke failed: {report}"
    tokens = last.split()
    assert tokens and all(TOKEN.fullmatch(t) for t in tokens), (
        f"bench/{script} --smoke: the last line is not key=value tokens: {last!r}\n{report}"
    )
    keys = tuple(t.split("=", 1)[0] for t in tokens)
    if script not in LAST_LINE_KEYS:
        pytest.fail(f"bench/{script} is not in LAST_LINE_KEYS: add its keys {keys} (its last line: {last!r})")
    assert keys == LAST_LINE_KEYS[script], f"bench/{script} --smoke ended with {last!r}"
