"""Write SegBook's Slicer terminology contexts from the SNOMED CT mapping table the core ships.

    python Utilities/generate_terminology.py           # rewrite both .term.json files
    python Utilities/generate_terminology.py --check   # exit 1 if a committed file differs from the table

Most TotalSegmentator codes (the vertebrae, ribs, many muscles...) are not in Slicer's "Segmentation
category and type - DICOM master list", so entries naming that context show as unknown in the Segment
Editor. These two files hold every category, type, type modifier, region and region modifier of the table
(`segbook/data/totalsegmentator_snomed_mapping.csv`, from lassoan/SlicerTotalSegmentator, Apache-2.0), in
the formats Slicer's terminologies logic loads (dcmqi's segment- and anatomic-context schemas); the module
loads them at start-up and names them in every segment's terminology entry (SegBookLib/NodeIO.py).
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "SegBookCore" / "segbook" / "data" / "totalsegmentator_snomed_mapping.csv"
FOLDER = ROOT / "SegBookSlicer" / "Resources" / "Terminology"
SEGMENT_FILE = FOLDER / "SegmentationCategoryTypeModifier-SegBook.term.json"
ANATOMIC_FILE = FOLDER / "AnatomicRegionAndModifier-SegBook.term.json"
# the schema URLs Slicer's vtkSlicerTerminologiesModuleLogic recognises (it dispatches on "@schema")
SEGMENT_SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/schemas/segment-context-schema.json#"
ANATOMIC_SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/schemas/anatomic-context-schema.json#"

sys.path.insert(0, str(ROOT / "SegBookSlicer"))
from SegBookLib.NodeIO import ANATOMIC_CONTEXT, TERMINOLOGY_CONTEXT  # noqa: E402


def _code(row: dict, prefix: str):
    if not row.get(f"{prefix}_CodeValue"):
        return None
    return {"CodingSchemeDesignator": row[f"{prefix}_CodingScheme"], "CodeValue": row[f"{prefix}_CodeValue"],
            "CodeMeaning": row[f"{prefix}_CodeMeaning"]}


def _member(items: list, code: dict) -> dict:
    """The item of `items` with the code's scheme and value (Slicer matches on these two), added if absent."""
    for item in items:
        if (item["CodingSchemeDesignator"], item["CodeValue"]) == (code["CodingSchemeDesignator"], code["CodeValue"]):
            return item
    items.append(dict(code))
    return items[-1]


def build(rows) -> tuple:
    """(segment context, anatomic context) dicts holding every code of the table's rows, in table order."""
    categories, regions = [], []
    for row in rows:
        if not row.get("Name"):
            continue
        category = _member(categories, _code(row, "Category"))
        kind = _member(category.setdefault("Type", []), _code(row, "Type"))
        modifier = _code(row, "TypeModifier")
        leaf = _member(kind.setdefault("Modifier", []), modifier) if modifier else kind
        if row.get("Color_R") and "recommendedDisplayRGBValue" not in leaf:
            leaf["recommendedDisplayRGBValue"] = [int(row[f"Color_{c}"]) for c in "RGB"]
        region = _code(row, "Region")
        if region:
            category["showAnatomy"] = True
            place = _member(regions, region)
            regionModifier = _code(row, "RegionModifier")
            if regionModifier:
                _member(place.setdefault("Modifier", []), regionModifier)
    for category in categories:
        category.setdefault("showAnatomy", False)
    segment = {"SegmentationCategoryTypeContextName": TERMINOLOGY_CONTEXT, "@schema": SEGMENT_SCHEMA,
               "SegmentationCodes": {"Category": categories}}
    anatomic = {"AnatomicContextName": ANATOMIC_CONTEXT, "@schema": ANATOMIC_SCHEMA,
                "AnatomicCodes": {"AnatomicRegion": regions}}
    return segment, anatomic


def rendered() -> dict:
    """{path: file text} of both context files as the table gives them."""
    with TABLE.open(newline="", encoding="utf-8") as f:
        segment, anatomic = build(csv.DictReader(f))
    return {path: json.dumps(doc, indent=1) + "\n" for path, doc in ((SEGMENT_FILE, segment),
                                                                    (ANATOMIC_FILE, anatomic))}


def main(argv=None) -> int:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    stale = []
    for path, text in rendered().items():
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        if check:
            stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".tmp-" + path.name)
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        print(f"wrote {path.relative_to(ROOT)}")
    for path in stale:
        print(f"{path.relative_to(ROOT)} differs from {TABLE.name}: run python Utilities/generate_terminology.py",
              file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
