"""Runs every benchmark's ``--quick`` and writes its last line into the docs, with the machine.

Figures in the README and docs/benchmarks.md come from here, never from memory: one run of the
current code, each script in its own process (``cd bench && python X.py --quick``, as a user
runs it), one after another so they never share the machine. The table between the
``<!-- bench-report -->`` markers of docs/benchmarks.md and README.md is rewritten with the
date, the machine, the commit and, per benchmark, its last line and whether it met its target.

    cd bench && python report.py            # all of them (about an hour on a 2-core CPU)
    cd bench && python report.py cache lora # some of them; the others' rows stay as they were

``--smoke``: each named script's ``--smoke`` instead (default: schedulers), and the tables are
printed, not written. CI runs it so the report cannot silently stop working; its numbers are
not figures. Last line: ``reported=<benchmarks with a parsed last line>/<run> met=<n>/<n>``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOCS = {ROOT / "docs" / "benchmarks.md": "full", ROOT / "README.md": "short"}
START, END = "<!-- bench-report -->", "<!-- /bench-report -->"
TIMEOUT_S = 3600


def _le(limit: float) -> Callable[[str], bool]:
    return lambda v: float(v) <= limit


def _ge(limit: float) -> Callable[[str], bool]:
    return lambda v: float(v) >= limit


def _is(want: str) -> Callable[[str], bool]:
    return lambda v: v == want


@dataclass(frozen=True)
class Bench:
    what: str
    args: tuple[str, ...]  # the script's arguments for the report (``--quick`` where it has one)
    targets: dict[str, tuple[str, Callable[[str], bool]]]  # key -> (target as written, check)


BENCHES: dict[str, Bench] = {
    "sampler_vs_diffusers": Bench(
        "sampler vs diffusers' pipeline", ("--quick",),
        {"square_ratio": ("≤ 1.02", _le(1.02)), "nonsquare_ratio": ("≤ 0.6", _le(0.6))},
    ),
    "schedulers": Bench("75 scheduler names on an analytic flow", ("--quick",), {"names_ok": ("75/75", _is("75/75"))}),
    "lora": Bench("stage LoRA switching", ("--quick",), {"switch_overhead": ("≤ 0.05", _le(0.05))}),
    "cache": Bench(
        "step caches vs ideal and vs cache-dit", ("--quick",),
        {"efficiency": ("≥ 0.90", _ge(0.90)), "vs_cachedit": ("≤ 1.0", _le(1.0)), "same_steps": ("yes", _is("yes"))},
    ),
    "native_cache": Bench(
        "caches on ComfyUI's own HiDream vs ideal and vs core EasyCache", ("--quick",),
        {"native_efficiency": ("≥ 0.90", _ge(0.90)), "vs_easycache": ("≤ 1.0", _le(1.0))},
    ),
    "compile": Bench(
        "sync-free MoE and regional compile", ("--quick",),
        {"host_syncs": ("0", _is("0")), "moe_ratio": ("≤ 1.0", _le(1.0)), "compiled_ratio": ("≤ 0.9", _le(0.9))},
    ),
    "native_compile": Bench(
        "sync-free MoE and regional compile on ComfyUI's own HiDream", ("--quick",),
        {"native_host_syncs": ("0", _is("0")), "native_compiled_ratio": ("≤ 1.0", _le(1.0))},
    ),
    "api": Bench("Runware API over HTTP vs in-process", ("--quick",), {"api_overhead": ("≤ 0.05", _le(0.05))}),
    "safety": Bench("content check per 1024x1024 image", (), {}),
    "cache_kernels": Bench("cache kernels, torch vs Triton (CUDA; CPU: reference timings)", (), {}),
}


def run(name: str, smoke: bool) -> str | None:
    """The script's last line, or None when it failed (its output's tail is printed)."""
    args = ("--smoke",) if smoke else BENCHES[name].args
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    print(f"== {name} {' '.join(args)}", flush=True)
    done = subprocess.run(
        [sys.executable, f"{name}.py", *args], cwd=HERE, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if done.returncode != 0 or not re.fullmatch(r"(\w+=\S+)( \w+=\S+)*", last):
        print(f"   failed (exit {done.returncode}):\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}", flush=True)
        return None
    print(f"   {last}", flush=True)
    return last


def verdict(name: str, last: str) -> str:
    """``met``, ``not met: key`` or ``no target``."""
    values = dict(token.split("=", 1) for token in last.split())
    targets = BENCHES[name].targets
    if not targets:
        return "no target"
    missed = [key for key, (_, ok) in targets.items() if key in values and not ok(values[key])]
    absent = [key for key in targets if key not in values]
    return "met" if not missed and not absent else "not met: " + ", ".join(missed + absent)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def _rows(text: str) -> dict[str, str]:
    """The rows of an existing report table, by benchmark name (kept for those not rerun)."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"\| `(\w+)` ", line)
        if match and match.group(1) in BENCHES:
            rows[match.group(1)] = line
    return rows


def table(kind: str, results: dict[str, str], old: str, stamp: str) -> str:
    kept = _rows(old)
    head = ["| benchmark | what | last line | target | |", "|---|---|---|---|---|"]
    if kind == "short":
        head = ["| benchmark | last line | |", "|---|---|---|"]
    lines = [f"Measured {stamp}. Command: `cd bench && python report.py`; each row is that script's "
             "`--quick` (see below for what each measures).", "", *head]
    for name, bench in BENCHES.items():
        if name not in results:
            if name in kept:
                lines.append(kept[name])
            continue
        last = results[name]
        target = ", ".join(f"{k} {t}" for k, (t, _) in bench.targets.items()) or "–"
        if kind == "short":
            lines.append(f"| `{name}` | `{last}` | {verdict(name, last)} |")
        else:
            lines.append(f"| `{name}` | {bench.what} | `{last}` | {target} | {verdict(name, last)} |")
    return "\n".join(lines)


def rewrite(path: Path, kind: str, results: dict[str, str], stamp: str, write: bool) -> None:
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path.name}: no {START} ... {END} markers to write the report between")
    before, rest = text.split(START, 1)
    old, after = rest.split(END, 1)
    new = table(kind, results, old, stamp)
    if write:
        path.write_text(f"{before}{START}\n{new}\n{END}{after}")
    else:
        print(f"--- {path.relative_to(ROOT)} would get:\n{new}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {', '.join(BENCHES)}")
    parser.add_argument("--smoke", action="store_true", help="each script's --smoke; print, do not write")
    args = parser.parse_args()
    names = args.names or (["schedulers"] if args.smoke else list(BENCHES))
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise SystemExit(f"names: got {', '.join(unknown)}; allowed: {', '.join(BENCHES)}")
    results = {}
    for name in names:
        last = run(name, args.smoke)
        if last is not None:
            results[name] = last
    stamp = f"{datetime.date.today().isoformat()} on {machine()}, commit {commit()}"
    for path, kind in DOCS.items():
        rewrite(path, kind, results, stamp, write=not args.smoke)
    met = sum(verdict(n, last) in ("met", "no target") for n, last in results.items())
    print(f"reported={len(results)}/{len(names)} met={met}/{len(results)}")
    if len(results) < len(names):
        sys.exit(1)


if __name__ == "__main__":
    main()
