"""Setup: check that the Python running the engine has what the core needs, at the versions it needs, and
install it only when the user agrees.

The engine (worker, fine-tuning, downloads) runs in Slicer's own Python by default, or in any Python the
user names (e.g. a conda environment with a CUDA torch): then Slicer itself needs no torch, and everything
is checked, and installed with that Python's pip, there. The requirements and their version floors are read
from the core's pyproject.toml (shipped beside the `segbook` package), the one place they are written.

In Slicer's own Python, torch comes through light-the-torch as the PyTorch extension installs it (it picks
the CUDA build matching the driver), but torch alone: PyTorchUtils' installTorch always adds torchvision,
which the core does not use. The small packages come through `slicer.util.pip_install`. What Slicer ships
(numpy, scipy, SimpleITK, pydicom, pillow, requests: its SuperBuild requirements) is never replaced: a version
too old for the core is refused with what to do, and pip runs with a constraints file pinning the installed
versions, so that no dependency replaces them on the way (pip runs without constraints unless given some;
Slicer 5.12's `slicer.packaging.pip_install(constraints=...)` passes the same `-c FILE`, which 5.8 and 5.10 pass
on as a pip argument). The same holds in an Engine Python for what it already has. The DICOM SEG writer
(highdicom) is installed when an export first needs it; with pydicom pinned, pip picks the highdicom that works
with Slicer's pydicom (5.8 and 5.10 ship pydicom 2.4). Nothing here runs at import time.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)

SHIPPED_WITH_SLICER = ("numpy", "scipy", "SimpleITK", "pydicom", "pillow", "requests")
_COMPARE = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b,
            "<": lambda a, b: a < b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}


class InstallError(RuntimeError):
    """Setup cannot go on; the message says what the user can do."""


# -- requirements -----------------------------------------------------------------------------------
def _tomlArray(text: str, key: str) -> list:
    """The strings of `key = [...]` at the start of a line (the subset of TOML pyproject.toml uses here;
    Slicer's Python 3.9 has no tomllib)."""
    match = re.search(rf'^{re.escape(key)}\s*=\s*\[((?:[^\]"#]|"[^"]*"|#[^\n]*)*)\]', text, re.M)
    if match is None:
        raise InstallError(f"pyproject.toml: no '{key}' list")
    return re.findall(r'"([^"]*)"', re.sub(r"#[^\n]*", "", match.group(1)))


def pyprojectPath() -> Path:
    """The core's pyproject.toml: beside the `segbook` package (a clone's SegBookCore/, or the extension's
    qt-scripted-modules folder, where the CMake installs it)."""
    from .ProcessRunner import corePackageRoot
    return Path(corePackageRoot()) / "pyproject.toml"


def coreRequirements(path: Optional[Path] = None) -> dict:
    """{"core": [...], "train": [...], "dicom": [...]} requirement strings, as pyproject.toml's dependencies and
    its train and dicom extras."""
    text = Path(path or pyprojectPath()).read_text(encoding="utf-8")
    return {"core": _tomlArray(text, "dependencies"), "train": _tomlArray(text, "train"),
            "dicom": _tomlArray(text, "dicom")}


def parseRequirement(text: str):
    """"torch>=2.2" -> ("torch", [(">=", (2, 2))]). Only what pyproject.toml uses: names and version bounds."""
    match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(.*)$", text)
    name, rest = match.group(1), match.group(2)
    bounds = [(op, versionTuple(v)) for op, v in re.findall(r"(>=|<=|==|!=|>|<)\s*([0-9][0-9A-Za-z.+!-]*)", rest)]
    return name, bounds


def applies(requirement: str) -> bool:
    """Whether a requirement's environment marker ("numpy<2; platform_system == 'Darwin' and ...") holds for
    this Python and platform: a requirement for Intel Macs alone must not hold back numpy on Linux."""
    if ";" not in requirement:
        return True
    try:
        from packaging.markers import Marker
    except ImportError:   # pip vendors it, and Slicer's Python always has pip
        from pip._vendor.packaging.markers import Marker
    return Marker(requirement.split(";", 1)[1]).evaluate()


def versionTuple(version: str) -> tuple:
    """"2.2.2+cpu" -> (2, 2, 2); "2.5.0rc1" -> (2, 5, 0): the release numbers."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def satisfies(version: str, bounds: list) -> bool:
    have = versionTuple(version)
    for op, want in bounds:
        width = max(len(have), len(want))
        if not _COMPARE[op](have + (0,) * (width - len(have)), want + (0,) * (width - len(want))):
            return False
    return True


def installedVersions(names: list) -> dict:
    """{distribution name: installed version or None} in this interpreter, from package metadata (importing
    torch to ask would take seconds and could pin an old build in Slicer's process)."""
    from importlib import metadata
    out = {}
    for name in names:
        out[name] = None
        for candidate in (name, name.replace("_", "-"), name.lower()):
            try:
                out[name] = metadata.version(candidate)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def gpuAvailable() -> bool:
    import torch
    return bool(torch.cuda.is_available())


# -- installers (Slicer's own Python) ---------------------------------------------------------------
def _pipInstall(arguments: list) -> None:
    """`pip install ARGUMENTS` in Slicer's Python (a list: each item one argument, as on every Slicer version)."""
    import slicer
    slicer.util.pip_install(arguments)


def _installTorch(requirement: str) -> None:
    """torch alone, through light-the-torch as PyTorchUtils does (it picks the CUDA build for the driver)."""
    import slicer
    slicer.util.pip_install("light-the-torch>=0.5")
    run = getattr(slicer.util, "executePythonModule", None) or slicer.util._executePythonModule
    run("light_the_torch", ["install", requirement])


def _pipInstallIn(python: str) -> Callable[[list], None]:
    def install(arguments: list) -> None:
        from .ProcessRunner import baseEnvironment, noWindow
        out = subprocess.run([python, "-m", "pip", "install", *arguments], capture_output=True,
                             encoding="utf-8", errors="replace", stdin=subprocess.DEVNULL,
                             env=baseEnvironment(python), **noWindow())
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
            raise subprocess.CalledProcessError(out.returncode, out.args, out.stdout, last)
    return install


class InstallLogic:
    def __init__(self, python: Optional[str] = None, versions: Optional[Callable[[list], dict]] = None,
                 pipInstall: Optional[Callable] = None, installTorch: Optional[Callable] = None,
                 requirements: Optional[dict] = None):
        """`python`: the engine's interpreter (None: Slicer's own). The callables replace what runs in the
        application (tests): `versions(names) -> {name: version|None}`, `pipInstall(pip install arguments)`,
        `installTorch(req)`."""
        self.python = python or None
        if self.python:
            from .ProcessRunner import callInCore
            self._versions = versions or (lambda names: callInCore(self.python, f"{__name__}:installedVersions",
                                                                   names, timeout=120))
            self._pipInstall = pipInstall or _pipInstallIn(self.python)
            self._installTorch = installTorch or (lambda req: self._pipInstall([req]))
        else:
            self._versions = versions or installedVersions
            self._pipInstall = pipInstall or _pipInstall
            self._installTorch = installTorch or _installTorch
        self._requirements = requirements
        self._gpu: Optional[bool] = None
        # (training, dicom) sets found complete: not asked again (in an Engine Python each question is a child
        # process, and the panel asks at every click); what is missing is asked again, it may have been installed
        self._ready: set = set()

    @property
    def external(self) -> bool:
        return self.python is not None

    def requirements(self, training: bool = False, dicom: bool = False) -> list:
        reqs = self._requirements or coreRequirements()
        wanted = list(reqs["core"]) + (list(reqs["train"]) if training else []) + \
            (list(reqs.get("dicom", [])) if dicom else [])
        return [r for r in wanted if applies(r)]

    def problems(self, training: bool = False, dicom: bool = False) -> list:
        """[(requirement, installed version or None)] for every requirement not met, torch first."""
        if (training, dicom) in self._ready:
            return []
        importlib.invalidate_caches()   # packages installed since the last look
        parsed = [(req, *parseRequirement(req)) for req in self.requirements(training, dicom)]
        installed = self._versions([name for _, name, _ in parsed])
        out = [(req, installed.get(name)) for req, name, bounds in parsed
               if installed.get(name) is None or not satisfies(installed[name], bounds)]
        if not out:
            self._ready.add((training, dicom))
        return sorted(out, key=lambda p: parseRequirement(p[0])[0] != "torch")

    def missing(self, training: bool = False, dicom: bool = False) -> list:
        """Names of the requirements that are absent or at a version the core does not support."""
        return [parseRequirement(req)[0] for req, _ in self.problems(training, dicom)]

    def isReady(self, training: bool = False, dicom: bool = False) -> bool:
        return not self.problems(training, dicom)

    def statusText(self, training: bool = False) -> str:
        problems = self.problems(training)
        where = f" in {self.python}" if self.external else ""
        if not problems:
            return f"Ready{where}."
        return f"Needed{where}: " + "; ".join(
            f"{req} ({'not installed' if have is None else f'{have} installed'})" for req, have in problems) + "."

    def gpuAvailable(self) -> bool:
        """Whether the engine's torch sees a GPU (asked once)."""
        if self._gpu is None:
            if self.external:
                from .ProcessRunner import callInCore
                self._gpu = bool(callInCore(self.python, f"{__name__}:gpuAvailable", timeout=120))
            else:
                self._gpu = gpuAvailable()
        return self._gpu

    def constraints(self, installing: list) -> list:
        """pip constraints ("name==version") keeping what Slicer ships (or the Engine Python has) at its installed
        version, except the requirements being installed themselves."""
        names = {parseRequirement(req)[0].lower() for req in installing}
        installed = self._versions(list(SHIPPED_WITH_SLICER))
        return [f"{name}=={version}" for name, version in installed.items()
                if version and name.lower() not in names]

    def question(self, problems: list) -> str:
        """What the confirmation dialog says: what will be installed, where, and how long it may take."""
        parts = []
        kept = [c.replace("==", " ") for c in self.constraints([req for req, _ in problems])]
        for req, have in problems:
            now = "" if have is None else f", replacing {have}"
            if parseRequirement(req)[0] == "torch":
                how = ("with this Python's pip" if self.external else
                       "through light-the-torch, which picks the GPU build for this computer")
                parts.append(f"PyTorch {req}{now} ({how}: a download of up to 2-3 GB, typically 5-15 minutes)")
            elif parseRequirement(req)[0] == "highdicom":
                parts.append(f"{req}{now} (to write DICOM SEG files)")
            else:
                parts.append(f"{req}{now}")
        if kept:
            parts.append(f"kept as installed: {', '.join(kept)}")
        where = self.python if self.external else "Slicer"
        return f"SegBook needs these Python packages in {where}:\n- " + "\n- ".join(parts) + "\n\nInstall them now?"

    def install(self, confirm: Callable[[str], bool], progress: Optional[Callable[[str], None]] = None,
                training: bool = False, dicom: bool = False) -> bool:
        """Install what is missing or too old after `confirm(question)` says yes; False if the user declined.

        `training` adds the fine-tuning packages, `dicom` the DICOM SEG writer. torch goes first so that pip
        never picks a torch itself. Raises InstallError with what to do when an installer fails or the result
        still falls short.
        """
        problems = self.problems(training, dicom)
        if not problems:
            return True
        shipped = [(req, have) for req, have in problems     # installed, and would be replaced
                   if have is not None and parseRequirement(req)[0] in SHIPPED_WITH_SLICER]
        if shipped and not self.external:
            raise InstallError(shippedAdvice(shipped))
        if not confirm(self.question(problems)):
            log.info("setup declined by the user")
            return False
        say = progress or (lambda text: log.info("%s", text))
        torch = [req for req, _ in problems if parseRequirement(req)[0] == "torch"]
        pip = [req for req, _ in problems if parseRequirement(req)[0] != "torch"]
        try:
            if torch:
                say("Installing PyTorch (this may take several minutes)...")
                self._installTorch(torch[0])
            if pip:
                say(f"Installing {', '.join(pip)}...")
                with tempfile.TemporaryDirectory(prefix="segbook-pip-") as folder:
                    constraints = Path(folder) / "constraints.txt"
                    constraints.write_text("".join(c + "\n" for c in self.constraints(pip)), encoding="utf-8")
                    self._pipInstall(["-c", str(constraints), *pip])
        except (subprocess.CalledProcessError, OSError, ImportError, RuntimeError) as e:
            detail = getattr(e, "stderr", None) or str(e) or type(e).__name__
            raise InstallError(f"installing {', '.join(torch + pip)} failed ({str(detail).strip()[-300:]}); see the "
                               f"Python console, check the network connection and try again") from None
        still = self.problems(training, dicom)
        if still:
            raise InstallError("still not as needed after installing: " + "; ".join(
                f"{req} ({have or 'not installed'})" for req, have in still) +
                ("; restart Slicer and click Install again" if not self.external else ""))
        say("SegBook is ready.")
        return True


def shippedAdvice(problems: list) -> str:
    """Why what Slicer ships (installed: `problems` are (requirement, version)) does not do, and what does: a
    package of Slicer's is never replaced.

    The one case the requirements make today: on an Intel Mac, PyTorch stops at 2.2, built for numpy 1.x,
    while Slicer 5.10 and later ship numpy 2; Slicer 5.8 ships numpy 1.26."""
    parts, tooNew = [], False
    for req, have in problems:
        name, bounds = parseRequirement(req)
        above = have is not None and any(op in ("<", "<=") and not satisfies(have, [(op, v)]) for op, v in bounds)
        tooNew |= above
        parts.append(f"Slicer's {name} {have} is too {'new' if above else 'old'} (SegBook needs "
                     f"{req.split(';')[0].strip()})")
    numpyTooNew = tooNew and any(parseRequirement(req)[0] == "numpy" for req, _ in problems)
    where = ("use Slicer 5.8 (it ships numpy 1.26: the newest PyTorch for Intel Macs, 2.2, needs numpy 1.x)"
             if numpyTooNew else "use a Slicer version that ships a suitable one")
    return (f"{'; '.join(parts)}: these ship with Slicer and are not replaced; {where}, or choose an Engine "
            f"Python with the right version in Setup")


def pythonSetting(folder) -> Optional[str]:
    """The engine's interpreter the user chose (None: Slicer's own), kept in FOLDER/settings.json. A damaged
    file is named in one warning line and Slicer's own Python is used (the panel keeps working)."""
    path = Path(folder) / "settings.json"
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("python")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"'python' holds a {type(value).__name__}")
    except (OSError, ValueError, AttributeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        logging.warning("%s: not a valid settings file (%s); using Slicer's own Python: choose the Engine "
                        "Python again in Setup", path, first)
        return None
    return value or None


def setPythonSetting(folder, python: Optional[str]) -> None:
    """Remember the engine's interpreter; check first that it runs (a one-line error otherwise)."""
    if python:
        try:
            from .ProcessRunner import baseEnvironment, noWindow
            out = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2] >= (3, 9))"],
                                 capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                                 env=baseEnvironment(python), **noWindow())
        except OSError as e:
            raise InstallError(f"{python}: cannot be run ({e.strerror or e})") from None
        if out.stdout.strip() != "True":
            raise InstallError(f"{python}: not a Python 3.9 or later interpreter")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".settings.json.tmp"
    text = json.dumps({"python": python or None}, indent=1)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if tmp.read_text(encoding="utf-8") != text:      # read back before it replaces the previous one
            raise OSError("the file read back differs from what was written")
        tmp.replace(folder / "settings.json")
    except OSError as e:
        if tmp.is_file():
            tmp.unlink()
        raise InstallError(f"{folder / 'settings.json'}: cannot write ({e.strerror or e}); the previous "
                           f"setting is kept") from None

