"""Class names, display colours and SNOMED CT terminology for segment outputs.

The TotalSegmentator STU-Nets output 105 channels in alphabetical order (`totalsegmentator_label_order.json`,
uni-medical/STU-Net); codes and colours come from SlicerTotalSegmentator's mapping table (Apache-2.0).
"""
from __future__ import annotations

import csv
import colorsys
import json
from functools import lru_cache
from importlib import resources

from .errors import InputError

__all__ = ["parse_class_names", "totalseg_class_names", "terminology", "terminology_entry", "default_color",
           "class_table", "TERMINOLOGY_CONTEXT", "ANATOMIC_CONTEXT"]

# The Slicer terminology contexts the SegBook extension ships (SegBookSlicer/Resources/Terminology) and
# loads: they hold every code of the mapping table, most of which (vertebrae, ribs...) Slicer's DICOM
# master lists lack. The Slicer module (SegBookLib/NodeIO.py, which cannot import torch) has the same names.
TERMINOLOGY_CONTEXT = "Segmentation category and type - SegBook"
ANATOMIC_CONTEXT = "Anatomic codes - SegBook"


def parse_class_names(text: str | None) -> list[str] | None:
    """The names in a comma-separated `--classes` value ("liver, spleen"); None for None. An empty name
    ("liver,,spleen", ",", "liver,") is an error, not a request for every class."""
    if text is None:
        return None
    names = [c.strip() for c in text.split(",")]
    if not all(names):
        raise InputError(f"--classes '{text}': comma-separated class names, none of them empty")
    return names


def _data(name: str):
    return resources.files("segbook") / "data" / name


@lru_cache(maxsize=None)
def totalseg_class_names() -> tuple[str, ...]:
    """The 105 output names of the TotalSegmentator-pretrained STU-Nets; index 0 is background."""
    order = json.loads(_data("totalsegmentator_label_order.json").read_text())
    return tuple(order[str(i)] for i in range(len(order)))


@lru_cache(maxsize=None)
def _snomed() -> dict[str, dict]:
    with _data("totalsegmentator_snomed_mapping.csv").open(newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f) if row.get("Name")}


def terminology(name: str) -> dict | None:
    """SNOMED CT category/type/modifier of a structure name, as {"category": (scheme, code, meaning), ...}."""
    row = _snomed().get(name)
    if row is None:
        return None
    out = {}
    for key, prefix in (("category", "Category"), ("type", "Type"), ("type_modifier", "TypeModifier"),
                        ("region", "Region"), ("region_modifier", "RegionModifier")):
        if row.get(f"{prefix}_CodeValue"):
            out[key] = [row[f"{prefix}_CodingScheme"], row[f"{prefix}_CodeValue"], row[f"{prefix}_CodeMeaning"]]
    return out


def terminology_entry(term: dict | None) -> str | None:
    """Slicer's terminology entry string for terminology() codes, or None without category and type.

    context~category~type~typeModifier~anatomicContext~region~regionModifier, each code scheme^value^meaning
    (empty: ^^), as vtkSlicerTerminologiesModuleLogic serialises it.
    """
    if not term or not term.get("category") or not term.get("type"):
        return None
    code = lambda key: "^".join(term.get(key) or ["", "", ""])  # noqa: E731
    return "~".join([TERMINOLOGY_CONTEXT, code("category"), code("type"), code("type_modifier"),
                     ANATOMIC_CONTEXT, code("region"), code("region_modifier")])


def default_color(name: str, index: int) -> list[int]:
    """The mapping table's colour where known, else a stable distinct hue from the class index."""
    row = _snomed().get(name)
    if row is not None and row.get("Color_R"):
        return [int(row["Color_R"]), int(row["Color_G"]), int(row["Color_B"])]
    r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.65, 0.95)
    return [round(r * 255), round(g * 255), round(b * 255)]


def class_table(class_names, colors=None) -> list[dict]:
    """One entry per foreground class: {"value", "name", "color", "terminology"}; the sidecar's contents."""
    table = []
    for i, name in enumerate(class_names):
        if i == 0:
            continue
        color = list(colors[i]) if colors else default_color(name, i)
        table.append({"value": i, "name": name, "color": color, "terminology": terminology(name)})
    return table
