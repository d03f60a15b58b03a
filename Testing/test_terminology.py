"""Every terminology entry SegBook writes resolves against the context files it ships.

Slicer looks a segment's codes up in the context its entry names (vtkSlicerTerminologiesModuleLogic:
DeserializeTerminologyEntry, then GetCategoryInTerminology -> GetTypeInTerminologyCategory ->
GetTypeModifierInTerminologyType, matching CodingSchemeDesignator and CodeValue; regions likewise in the
named anatomic context); a code the named context lacks shows as unknown in the Segment Editor. Checked
twice: by `resolve` below, a re-implementation of those functions, and by the real logic of the slicer-core
wheel after the module's own loader (NodeIO.loadTerminologyContexts) has loaded the shipped files.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import types

import pytest

from slicer_fixtures import ROOT, SLICER_MODULE
from SegBookLib import NodeIO

from segbook import labels

SCHEMAS = ROOT / "Testing" / "data" / "schemas"
DCMQI = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/schemas/"
TABLE = ROOT / "SegBookCore" / "segbook" / "data" / "totalsegmentator_snomed_mapping.csv"


def generator():
    spec = importlib.util.spec_from_file_location("generate_terminology", ROOT / "Utilities" / "generate_terminology.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = generator()


def shipped():
    return (json.loads(GEN.SEGMENT_FILE.read_text(encoding="utf-8")),
            json.loads(GEN.ANATOMIC_FILE.read_text(encoding="utf-8")))


def table_names():
    with TABLE.open(newline="", encoding="utf-8") as f:
        return [row["Name"] for row in csv.DictReader(f) if row["Name"]]


def _find(items, code):
    """Slicer's GetCodeInArray: the first object whose scheme and value equal the code's."""
    for item in items or []:
        if isinstance(item, dict) and (item.get("CodingSchemeDesignator"), item.get("CodeValue")) == code[:2]:
            return item
    return None


def resolve(entry: str, segmentContexts: dict, anatomicContexts: dict) -> list:
    """What of a serialised entry is missing from the contexts it names ([] = everything resolves)."""
    parts = entry.split("~")
    if len(parts) != 7 or parts[1] == "^^":
        return ["not a terminology entry"]
    codes = [p.split("^") for p in parts]
    if len(codes[1]) != 3 or len(codes[2]) != 3:
        return ["invalid category or type component"]
    valid = lambda c: len(c) == 3 and c[0] != "" and c[1] != ""  # noqa: E731  CodeIdentifier::IsValid
    missing = []
    root = segmentContexts.get(parts[0])
    if root is None:
        return [f"context '{parts[0]}' is not loaded"]
    category = _find(root["SegmentationCodes"]["Category"], tuple(codes[1]))
    kind = _find(category.get("Type"), tuple(codes[2])) if category else None
    if kind is None:
        missing.append(f"type {parts[2]} in category {parts[1]}")
    elif valid(codes[3]) and _find(kind.get("Modifier"), tuple(codes[3])) is None:
        missing.append(f"modifier {parts[3]}")
    if valid(codes[5]):
        anatomic = anatomicContexts.get(parts[4])
        region = _find(anatomic["AnatomicCodes"]["AnatomicRegion"], tuple(codes[5])) if anatomic else None
        if region is None:
            missing.append(f"region {parts[5]} in '{parts[4]}'")
        elif valid(codes[6]) and _find(region.get("Modifier"), tuple(codes[6])) is None:
            missing.append(f"region modifier {parts[6]}")
    return missing


def entries_for(names) -> dict:
    """{name: entry} as the module writes them: the core's class table -> NodeIO.terminologyString."""
    table = labels.class_table(["background", *names])
    return {e["name"]: NodeIO.terminologyString(e["terminology"]) for e in table}


# -- the files --------------------------------------------------------------------------------------------
def test_context_files_are_what_the_mapping_table_gives():
    for path, text in GEN.rendered().items():
        assert path.read_text(encoding="utf-8") == text, \
            f"{path.name} is stale: run python Utilities/generate_terminology.py"
    # and without the generator: the table read with csv, each row's codes looked up in the shipped files by
    # scheme and value (as Slicer does) with the table's meanings; the files hold no type or region it lacks
    segment, anatomic = shipped()
    with TABLE.open(newline="", encoding="utf-8") as f:
        rows = [row for row in csv.DictReader(f) if row["Name"]]
    assert len(rows) > 400
    types, regions = set(), set()

    def code(row, prefix):
        return row[f"{prefix}_CodingScheme"], row[f"{prefix}_CodeValue"], row[f"{prefix}_CodeMeaning"]

    def found(items, row, prefix):
        item = _find(items, code(row, prefix))
        assert item is not None and item["CodeMeaning"] == row[f"{prefix}_CodeMeaning"], (row["Name"], prefix)
        return item
    for row in rows:
        category = found(segment["SegmentationCodes"]["Category"], row, "Category")
        kind = found(category.get("Type"), row, "Type")
        types.add((row["Category_CodeValue"], row["Type_CodeValue"]))
        if row["TypeModifier_CodeValue"]:
            found(kind.get("Modifier"), row, "TypeModifier")
        if row["Region_CodeValue"]:
            region = found(anatomic["AnatomicCodes"]["AnatomicRegion"], row, "Region")
            regions.add(row["Region_CodeValue"])
            if row["RegionModifier_CodeValue"]:
                found(region.get("Modifier"), row, "RegionModifier")
    assert types == {(c["CodeValue"], t["CodeValue"]) for c in segment["SegmentationCodes"]["Category"]
                     for t in c.get("Type", [])}
    assert regions == {r["CodeValue"] for r in anatomic["AnatomicCodes"]["AnatomicRegion"]}


def test_context_files_follow_the_dcmqi_schemas_slicer_reads():
    import jsonschema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT4
    schemas = {p.name: json.loads(p.read_text()) for p in SCHEMAS.glob("*.json") if "context" in p.name
               or p.name == "common-schema.json"}
    registry = Registry().with_resources(
        (DCMQI + name, Resource.from_contents(doc, default_specification=DRAFT4)) for name, doc in schemas.items())
    segment, anatomic = shipped()
    for doc, schemaName in ((segment, "segment-context-schema.json"), (anatomic, "anatomic-context-schema.json")):
        assert doc["@schema"] == DCMQI + schemaName + "#"   # one of the two URLs Slicer dispatches on
        jsonschema.Draft4Validator(schemas[schemaName], registry=registry).validate(doc)
    # the validation is not vacuous: a code meaning over DICOM's 64 characters (LO) is refused
    broken = json.loads(json.dumps(segment))
    broken["SegmentationCodes"]["Category"][0]["Type"][0]["CodeMeaning"] = "x" * 65
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(schemas["segment-context-schema.json"], registry=registry).validate(broken)
    assert segment["SegmentationCategoryTypeContextName"] == NodeIO.TERMINOLOGY_CONTEXT == labels.TERMINOLOGY_CONTEXT
    assert anatomic["AnatomicContextName"] == NodeIO.ANATOMIC_CONTEXT == labels.ANATOMIC_CONTEXT


# -- the entries ------------------------------------------------------------------------------------------
def test_every_class_of_the_released_models_resolves_in_the_shipped_context():
    segment, anatomic = shipped()
    contexts = ({segment["SegmentationCategoryTypeContextName"]: segment},
                {anatomic["AnatomicContextName"]: anatomic})
    names = list(labels.totalseg_class_names()[1:])
    assert len(names) == 104
    entries = entries_for(names)
    assert all(entries.values()), [n for n, e in entries.items() if not e]
    unresolved = {n: resolve(e, *contexts) for n, e in entries.items() if resolve(e, *contexts)}
    assert unresolved == {}
    # user classes: a table name (any of the 413) is coded and resolves; other names carry no entry
    user = entries_for([*table_names(), "anterior", "posterior"])
    assert user["anterior"] is None and user["posterior"] is None
    unresolved = {n: resolve(e, *contexts) for n, e in user.items() if e and resolve(e, *contexts)}
    assert unresolved == {}
    assert sum(1 for e in user.values() if e and e.split("~")[5] != "^^") > 30     # regions exercised
    # the core's .seg.nrrd tags and the module write the same string
    for entry in labels.class_table(["background", *table_names()]):
        assert labels.terminology_entry(entry["terminology"]) == NodeIO.terminologyString(entry["terminology"])


def test_resolve_reports_a_code_the_context_lacks():
    segment, anatomic = shipped()
    contexts = ({segment["SegmentationCategoryTypeContextName"]: segment},
                {anatomic["AnatomicContextName"]: anatomic})
    good = entries_for(["vertebrae_L1"])["vertebrae_L1"]
    assert resolve(good, *contexts) == []
    assert resolve(good.replace(NodeIO.TERMINOLOGY_CONTEXT, "Segmentation category and type - DICOM master list"),
                   *contexts) == ["context 'Segmentation category and type - DICOM master list' is not loaded"]
    parts = good.split("~")
    parts[2] = "SCT^000000^Nothing"
    assert resolve("~".join(parts), *contexts)
    parts = entries_for(["kidney_cyst_left"])["kidney_cyst_left"].split("~")
    assert resolve("~".join(parts), *contexts) == []
    parts[6] = "SCT^999^Nowhere"
    assert resolve("~".join(parts), *contexts) == ["region modifier SCT^999^Nowhere"]


def _slicer_resolves(logic, entry: str) -> bool:
    """The real logic: deserialise the entry, then find its codes in the context it names."""
    import slicer
    term = slicer.vtkSlicerTerminologyEntry()
    if not logic.DeserializeTerminologyEntry(entry, term):
        return False
    name = term.GetTerminologyContextName()
    same = lambda a, b: (a.GetCodingSchemeDesignator(), a.GetCodeValue()) == (b.GetCodingSchemeDesignator(), b.GetCodeValue())  # noqa: E731,E501
    category = slicer.vtkSlicerTerminologyCategory()
    for i in range(logic.GetNumberOfCategoriesInTerminology(name)):
        logic.GetNthCategoryInTerminology(name, i, category)
        if same(category, term.GetCategoryObject()):
            break
    else:
        return False
    kind = slicer.vtkSlicerTerminologyType()
    for i in range(logic.GetNumberOfTypesInTerminologyCategory(name, category)):
        logic.GetNthTypeInTerminologyCategory(name, category, i, kind)
        if same(kind, term.GetTypeObject()):
            break
    else:
        return False
    if term.GetTypeModifierObject().GetCodeValue():
        modifier = slicer.vtkSlicerTerminologyType()
        if not any(logic.GetNthTypeModifierInTerminologyType(name, category, kind, i, modifier)
                   and same(modifier, term.GetTypeModifierObject())
                   for i in range(logic.GetNumberOfTypeModifiersInTerminologyType(name, category, kind))):
            return False
    return True


@pytest.mark.slicer
def test_the_module_loads_the_contexts_at_start_up_and_slicer_resolves_every_entry(monkeypatch):
    """SegBook's start-up slot on a real vtkSlicerTerminologiesModuleLogic (the application is stubbed)."""
    import slicer
    import sys
    from unittest import mock
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    app = mock.MagicMock(name="app")
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
        terminologies=types.SimpleNamespace(logic=lambda: logic)), raising=False)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in ("ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest", "ScriptedLoadableModuleWidget"):
        setattr(slm, cls, type(cls, (), {}))
    slm.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {"__init__": lambda self, p: setattr(self, "parent", p)})
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    monkeypatch.delitem(sys.modules, "SegBook", raising=False)
    import SegBook
    module = SegBook.SegBook(types.SimpleNamespace(path=str(SLICER_MODULE / "SegBook.py")))
    app.connect.assert_called_once_with("startupCompleted()", module.loadTerminology)
    module.loadTerminology()                       # what the application does once started
    import vtk
    loaded = vtk.vtkStringArray()
    logic.GetLoadedTerminologyNames(loaded)
    assert NodeIO.TERMINOLOGY_CONTEXT in [loaded.GetValue(i) for i in range(loaded.GetNumberOfValues())]
    regions = vtk.vtkStringArray()
    logic.GetLoadedRegionContextNames(regions)
    assert NodeIO.ANATOMIC_CONTEXT in [regions.GetValue(i) for i in range(regions.GetNumberOfValues())]
    entries = entries_for(table_names())
    failed = [n for n, e in entries.items() if e and not _slicer_resolves(logic, e)]
    assert failed == []
    # and the real logic does refuse a code its contexts lack
    parts = entries["vertebrae_L1"].split("~")
    parts[2] = "SCT^000000^Nothing"
    assert not _slicer_resolves(logic, "~".join(parts))
