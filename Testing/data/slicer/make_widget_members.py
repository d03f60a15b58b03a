"""Regenerate widget_members.json: what Python (PythonQt) can reach on each widget class SegBook.ui uses.

Not run by the tests (it needs PyQt5 and the CTK and Slicer sources); run it by hand after adding a widget of
a new class to SegBook.ui, and commit the JSON:

    python -m venv /tmp/qt && /tmp/qt/bin/pip install PyQt5==5.15.11
    /tmp/qt/bin/python Testing/data/slicer/make_widget_members.py --ctk CTK_SOURCE --slicer SLICER_SOURCE

Sources of truth, per kind of class:
- Qt classes (Q*): PyQt5's own class (Qt 5.15, as Slicer 5.8): every public method and signal (dir()), and the
  Q_PROPERTY names of its meta-object, which PythonQt exposes as attributes (`enabled`, `checked`...).
- CTK and Slicer widgets (ctk*, qMRML*): PythonQt exposes a QObject's meta-object only: Q_PROPERTY names,
  signals, public slots and Q_INVOKABLE methods, read here from the class's header, plus its base classes'
  members (recursively, down to a Qt class).
"""
from __future__ import annotations

import argparse
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
UI = HERE.parents[2] / "SegBookSlicer" / "Resources" / "UI" / "SegBook.ui"
HEADER_DIRS = {"ctk": ["Libs/Widgets", "Libs/Core"], "qMRML": ["Libs/MRML/Widgets"]}
LAYOUTS = {"QGridLayout", "QHBoxLayout", "QVBoxLayout", "QFormLayout"}


def qt_members(name: str) -> set:
    from PyQt5 import QtWidgets
    cls = getattr(QtWidgets, name)
    meta = cls.staticMetaObject
    props = {str(meta.property(i).name()) for i in range(meta.propertyCount())}
    return {n for n in dir(cls) if not n.startswith("_")} | props


def header_members(text: str) -> tuple[set, str]:
    """(meta-object members, base class) of a CTK/Slicer QObject header."""
    base = re.search(r"class\s+\w+\s+(\w+)\s*:\s*public\s+(\w+)", text).group(2)
    members = set()
    for m in re.finditer(r"Q_PROPERTY\(\s*[\w:<>*& ]+?\s+\**(\w+)\s+READ\s+(\w+)(?:\s+WRITE\s+(\w+))?", text):
        members |= {g for g in m.groups() if g}
    members |= set(re.findall(r"Q_INVOKABLE\s+[\w:<>*&, ]+?[\s*&]+(\w+)\s*\(", text))
    section = None
    for line in text.splitlines():
        s = line.strip()
        if re.match(r"^(public|protected|private)?\s*(Q_SLOTS|slots|Q_SIGNALS|signals)\s*:", s):
            section = "public" if s.startswith(("public", "Q_SIGNALS", "signals")) else None
            continue
        if re.match(r"^(public|protected|private)\s*:", s):
            section = None
            continue
        if section and not s.startswith("//"):
            m = re.search(r"(\w+)\s*\(", s)
            if m and m.group(1) not in ("Q_DECL_DEPRECATED",):
                members.add(m.group(1))
    return members, base


def find_header(name: str, roots: dict) -> Path:
    kind = "ctk" if name.startswith("ctk") else "qMRML"
    for sub in HEADER_DIRS[kind]:
        p = roots[kind] / sub / f"{name}.h"
        if p.is_file():
            return p
    raise SystemExit(f"no header for {name} under {roots[kind]}")


def members_of(name: str, roots: dict, sources: dict) -> set:
    if name.startswith("Q"):
        sources[name] = "PyQt5 5.15 (dir() and meta-object properties)"
        return qt_members(name)
    path = find_header(name, roots)
    own, base = header_members(path.read_text())
    sources[name] = f"{path.relative_to(roots['ctk' if name.startswith('ctk') else 'qMRML'])} (meta-object)"
    return own | members_of(base, roots, sources)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ctk", required=True, help="a CTK source tree (commontk/CTK)")
    p.add_argument("--slicer", required=True, help="a Slicer source tree (Slicer/Slicer)")
    p.add_argument("--note", default="", help="where the sources came from (commits)")
    args = p.parse_args()
    roots = {"ctk": Path(args.ctk), "qMRML": Path(args.slicer)}
    classes = sorted({w.get("class") for w in ET.parse(UI).iter("widget")} - LAYOUTS)
    sources, out = {}, {}
    for c in classes:
        out[c] = sorted(members_of(c, roots, sources))
    doc = {"generated_by": "Testing/data/slicer/make_widget_members.py", "note": args.note,
           "sources": sources, "members": out}
    (HERE / "widget_members.json").write_text(json.dumps(doc, indent=0) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
