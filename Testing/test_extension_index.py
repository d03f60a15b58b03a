"""What the Extensions Index checks before it accepts the extension, checked on this checkout.

The rules are those of Slicer/ExtensionsIndex `scripts/check_description_files.py`: the catalog entry
(`SegBook.json`, whose file name is the extension name) validates against the schema its `$schema` names
(copied into Testing/data/schemas), LF line endings, a known category; the extension name does not start
with "Slicer" and the repository name does; the top-level CMakeLists.txt `project()` equals the extension
name and sets an icon and screenshot URLs (read with the index's own patterns); a licence file at the root;
a repository under 100 MB. The index downloads each image URL: here every URL that points into this
repository must name a tracked file of the right kind.
"""
from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import urllib.parse as urlparse

from slicer_fixtures import ROOT

SCHEMAS = ROOT / "Testing" / "data" / "schemas"
CATALOG = ROOT / "SegBook.json"
CMAKE = ROOT / "CMakeLists.txt"
# the index's patterns (check_cmakelists_content)
PROJECT = r"project\s*\(\s*([^\s\)\n\r]+)"
ICON = r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)'
SCREENSHOTS = r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)'
LICENSE_NAMES = ["LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt"]
IMAGE_MAGIC = {".png": b"\x89PNG\r\n\x1a\n", ".jpg": b"\xff\xd8\xff", ".jpeg": b"\xff\xd8\xff", ".gif": b"GIF8"}


def tracked() -> dict:
    """{path relative to the root: size} of the files git tracks (what a clone holds)."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = [p for p in out.decode().split("\0") if p]
    return {p: (ROOT / p).stat().st_size for p in files if (ROOT / p).is_file()}


def repository_paths(url: str, entry: dict):
    """The file a URL names inside this repository (None when it points elsewhere)."""
    parts = urlparse.urlsplit(entry["scm_url"].strip().strip("/"))
    owner, repo = parts.path.strip("/").split("/")[:2]
    repo = repo[:-4] if repo.endswith(".git") else repo
    revision = entry.get("scm_revision", "main")
    for prefix in (f"https://raw.githubusercontent.com/{owner}/{repo}/{revision}/",
                   f"https://github.com/{owner}/{repo}/blob/{revision}/",
                   f"https://github.com/{owner}/{repo}/raw/{revision}/"):
        if url.startswith(prefix):
            return urlparse.unquote(url[len(prefix):].split("#")[0].split("?")[0])
    return None


def test_catalog_entry_validates_against_slicers_schema():
    import jsonschema
    raw = CATALOG.read_bytes()
    assert b"\r" not in raw, "SegBook.json must have LF line endings"
    entry = json.loads(raw)
    schema_file = SCHEMAS / entry["$schema"].split("#")[0].rsplit("/", 1)[-1]
    assert schema_file.is_file(), f"no copy of {entry['$schema']} in Testing/data/schemas"
    schema = json.loads(schema_file.read_text())
    jsonschema.Draft7Validator(schema).validate(entry)
    # the schema is not vacuous: an unknown key or a wrong type is refused
    for bad in (dict(entry, homepage="x"), dict(entry, tier="1"), {k: v for k, v in entry.items() if k != "scm_url"}):
        assert list(jsonschema.Draft7Validator(schema).iter_errors(bad)), bad
    # a category of the index's ACCEPTED_EXTENSION_CATEGORIES; the same as the CMake metadata
    cmake = CMAKE.read_text()
    assert entry["category"] == "Segmentation"
    assert re.search(r'set\(EXTENSION_CATEGORY\s+"([^"]+)"\)', cmake).group(1) == entry["category"]
    depends = [d for d in re.search(r'set\(EXTENSION_DEPENDS\s+"([^"]*)"\)', cmake).group(1).split() if d != "NA"]
    assert entry.get("build_dependencies", []) == depends
    assert urlparse.urlsplit(entry["scm_url"]).scheme in ("git", "https")


def test_names_follow_the_index_rules():
    extension = CATALOG.stem
    assert not extension.lower().startswith("slicer")
    projects = re.findall(PROJECT, CMAKE.read_text(), re.IGNORECASE | re.MULTILINE)
    assert projects and projects[0].strip().strip('"').strip("'") == extension
    repo = urlparse.urlsplit(json.loads(CATALOG.read_text())["scm_url"].strip().strip("/")).path.split("/")[-1]
    repo = repo[:-4] if repo.endswith(".git") else repo
    assert repo.startswith("Slicer")


def test_icon_and_screenshot_urls_name_images_in_this_repository():
    entry = json.loads(CATALOG.read_text())
    cmake = CMAKE.read_text()
    icons = re.findall(ICON, cmake, re.IGNORECASE | re.MULTILINE)
    shots = re.findall(SCREENSHOTS, cmake, re.IGNORECASE | re.MULTILINE)
    assert icons and shots, "the index needs EXTENSION_ICONURL and EXTENSION_SCREENSHOTURLS"
    files = tracked()
    urls = [icons[0].strip(), *shots[0].split()]
    assert len(urls) >= 2
    for url in urls:
        path = repository_paths(url, entry)
        assert path is not None, f"{url} does not point into {entry['scm_url']}"
        assert path in files, f"{url} names {path}, which is not a tracked file of this repository"
        magic = IMAGE_MAGIC.get((ROOT / path).suffix.lower())
        assert magic and (ROOT / path).read_bytes().startswith(magic), f"{path} is not a PNG/JPEG/GIF"


def test_every_url_into_this_repository_names_a_tracked_file():
    entry = json.loads(CATALOG.read_text())
    files = tracked()
    sources = ["CMakeLists.txt", "README.md", "THIRD_PARTY_NOTICES.md", "SegBookSlicer/SegBook.py"]
    found = []
    for source in sources:
        for url in re.findall(r"https?://[^\s\"'<>)\]]+", (ROOT / source).read_text(encoding="utf-8")):
            path = repository_paths(url, entry)
            if path is not None:
                found.append(url)
                assert path in files or any(f.startswith(path.rstrip("/") + "/") for f in files), \
                    f"{source}: {url} names {path}, which this repository does not hold"
    assert len(found) >= 3


def test_licence_notices_and_size():
    files = tracked()
    licence = next((n for n in LICENSE_NAMES if n in files), None)
    assert licence, "the index needs a licence file at the root"
    text = (ROOT / licence).read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert 'license = "Apache-2.0"' in (ROOT / "SegBookCore" / "pyproject.toml").read_text()
    notices = (ROOT / "THIRD_PARTY_NOTICES.md").read_text()
    # every third-party file shipped in the core's data folder, the terminology and the images is named
    named = re.findall(r"`([^`]+)`", notices)
    shipped = [p for p in files if p.startswith(("SegBookCore/segbook/data/", "SegBookSlicer/Resources/Terminology/"))
               or (p.startswith("Screenshots/") and p.endswith(".png"))]
    assert len(shipped) > 10
    for path in shipped:
        assert any(fnmatch.fnmatch(path, pattern) for pattern in named), f"{path} is not in THIRD_PARTY_NOTICES.md"
    for source in ("lassoan/SlicerTotalSegmentator", "uni-medical/STU-Net", "CC-BY-SA 4.0", "Apache-2.0"):
        assert source in notices
    # the index measures the cloned checkout against 100 MB; the tracked files are most of it
    assert sum(files.values()) < 60 * 2**20, f"tracked files take {sum(files.values()) / 2**20:.1f} MB"
