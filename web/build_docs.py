"""Writes each node's help page (``web/docs/<node id>.md``) from the node classes themselves.

    python web/build_docs.py          # rewrite web/docs/*.md
    python web/build_docs.py --check  # exit 1 if any page differs or is left over (the tests do this)

ComfyUI's frontend (1.27.x) opens a node's help in the node library sidebar (the "?" of the
selection toolbox, or the node library's help button). For a custom node it fetches
``/extensions/<pack>/docs/<node id>/<locale>.md``, then ``/extensions/<pack>/docs/<node id>.md``,
served from the pack's WEB_DIRECTORY (``web/``). Without a page it shows the DESCRIPTION and the
input tooltips, after a 404 in the browser console on each try. The pages are built from
DESCRIPTION, INPUT_TYPES tooltips and OUTPUT_TOOLTIPS, so the help cannot drift from what the
node's own tooltips say.
"""

from __future__ import annotations

import argparse
import re
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "web" / "docs"


def load_pack():
    """The pack by path under its fixed name, as ComfyUI loads it (``pack_loader.py``)."""
    return runpy.run_path(str(ROOT / "pack_loader.py"))["load_pack"]()


def _flat(text: object) -> str:
    return " ".join(str(text).split())


def _cell(text: object) -> str:
    """One line of markdown that renders as the text itself: markdown's emphasis, strike and
    code marks escaped (``*_fp8_scaled`` and ``~34 GB ... ~17 GB`` rendered as italics and
    strike-through before), and < > so that <prefix> is no HTML tag."""
    text = re.sub(r"([\\`*_~\[\]])", r"\\\1", _flat(text))
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _type_name(kind: object) -> str:
    """A combo's choices depend on the model folders (and can be 75 names): say 'choice'."""
    return "choice" if isinstance(kind, (list, tuple)) else str(kind)


def _input_rows(spec: dict) -> list[str]:
    rows = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            options = entry[1] if len(entry) > 1 else {}
            facts = [_type_name(entry[0])]
            if options.get("forceInput"):
                facts.append("input only")
            if options.get("default") not in ("", None):
                facts.append(f"default `{_flat(options['default'])}`")  # code span: no escapes
            if section == "optional":
                facts.append("optional")
            rows.append(f"- **`{name}`** ({', '.join(facts)}): {_cell(options.get('tooltip', ''))}")
    return rows


def render(cls: type) -> str:
    """One node's help page: what it does, each input, each output. Lists, not tables: the
    editor shows the page in a narrow sidebar."""
    lines = [f"# {cls.TITLE}", "", _cell(cls.DESCRIPTION), "", f"Node id: `{cls.NODE_ID}`.", ""]
    lines += ["## Inputs", ""] + _input_rows(cls.INPUT_TYPES())
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    tips = getattr(cls, "OUTPUT_TOOLTIPS", None) or ("",) * len(cls.RETURN_TYPES)
    if cls.RETURN_TYPES:
        lines += ["", "## Outputs", ""]
        for name, kind, tip in zip(names, cls.RETURN_TYPES, tips, strict=True):
            lines.append(f"- **`{name}`** ({_type_name(kind)}): {_cell(tip)}")
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """File name -> text, for every node the pack registers."""
    mappings = load_pack().NODE_CLASS_MAPPINGS
    return {f"{node_id}.md": render(cls) for node_id, cls in sorted(mappings.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    wanted = pages()
    if args.check:
        present = {p.name for p in DOCS.glob("*.md")}
        stale = sorted(n for n, text in wanted.items() if n not in present or (DOCS / n).read_text() != text)
        extra = sorted(present - set(wanted))
        for name in stale:
            print(f"web/docs/{name}: differs from the node class; run python web/build_docs.py")
        for name in extra:
            print(f"web/docs/{name}: no node {name[:-3]} is registered; delete it")
        return 1 if stale or extra else 0
    DOCS.mkdir(parents=True, exist_ok=True)
    for name, text in wanted.items():
        (DOCS / name).write_text(text, encoding="utf-8")
    for path in DOCS.glob("*.md"):
        if path.name not in wanted:
            path.unlink()
    print(f"wrote {len(wanted)} pages to web/docs/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
