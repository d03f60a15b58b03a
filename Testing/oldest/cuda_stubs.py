"""Make a PyPI (CUDA) torch wheel importable on a CPU-only Linux machine without GBs of NVIDIA libraries.

The Linux torch 2.2 wheels on PyPI are CUDA builds: even libtorch_cpu.so links libcudart/libcupti, and
libtorch.so links libtorch_cuda.so, which links cuBLAS, cuDNN, cuFFT, cuRAND, cuSPARSE and NCCL (~1.7 GB
as pip packages). The CPU-only wheels live on download.pytorch.org, which CI may not reach. This script,
run after `pip install --no-deps torch==X`:

- installs the small real CUDA runtime packages torch pins (cudart, cupti, nvtx: ~15 MB), so
  `torch.cuda.is_available()` answers False through the real runtime as on any machine without a GPU;
- builds, for every other library torch's own .so files need, a stub with the same SONAME and the symbols
  torch imports from it (each one aborts with a message if ever called), placed where torch's RPATH looks
  (site-packages/nvidia/<name>/lib). A CPU run never calls them; a call would abort loudly, never silently.

Libraries torch opens only on use (cuSOLVER, NVRTC, triton) are not installed. Without a C compiler (cc, nm)
it installs the real NVIDIA packages instead (slow but complete).

Usage: python cuda_stubs.py   (with the target venv's python)
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REAL = ("nvidia-cuda-runtime", "nvidia-cuda-cupti", "nvidia-nvtx")   # small: installed for real
# SONAME prefix -> folder under site-packages/nvidia that torch's RPATH names
FOLDERS = {"libcublas": "cublas", "libcublasLt": "cublas", "libcudnn": "cudnn", "libcufft": "cufft",
           "libcurand": "curand", "libcusparse": "cusparse", "libnccl": "nccl", "libcusolver": "cusolver",
           "libnvrtc": "cuda_nvrtc", "libcudart": "cuda_runtime", "libcupti": "cuda_cupti",
           "libnvToolsExt": "nvtx"}


def _torch_requirements() -> list[str]:
    """torch's pinned NVIDIA/triton requirements for this platform, e.g. 'nvidia-cublas-cu12==12.1.3.1'."""
    out = []
    for req in metadata.requires("torch") or []:
        name = req.split(";")[0].strip().replace(" ", "").replace("(", "").replace(")", "")
        if name.startswith(("nvidia-", "triton")) and "linux" in req.lower():
            out.append(name)
    return out


def _pip(*reqs: str) -> None:
    if reqs:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *reqs], check=True)


def _needed(lib: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)


def _imports(libs: list[Path], soname: str) -> set[str]:
    """Symbols torch's libraries import from `soname`: versioned ones name it, unversioned ones share its prefix."""
    prefix = soname.split(".so")[0][3:]  # libcublasLt.so.12 -> cublasLt
    syms = set()
    for lib in libs:
        out = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True,
                             check=True).stdout
        for line in out.split("\n"):
            sym = line.split()[-1] if line.split() else ""
            name, _, version = sym.partition("@")
            if version.lstrip("@") == soname or (not version and name.startswith(prefix)
                                                 and not (prefix == "cublas" and name.startswith("cublasLt"))):
                syms.add(name)
    return syms


def _build_stub(soname: str, syms: set[str], dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        c, script = Path(tmp, "stub.c"), Path(tmp, "stub.map")
        body = ["#include <stdio.h>", "#include <stdlib.h>",
                f'static void die(const char *f) {{ fprintf(stderr, "{soname} stub: %s called (CPU-only test '
                f'environment, see Testing/oldest/cuda_stubs.py)\\n", f); abort(); }}']
        body += [f'int {s}(void) {{ die("{s}"); return 1; }}' for s in sorted(syms)]
        c.write_text("\n".join(body) + "\n")
        script.write_text(f"{soname} {{ global: {' '.join(s + ';' for s in sorted(syms))} local: *; }};\n"
                          if syms else f"{soname} {{ local: *; }};\n")
        dest.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cc", "-shared", "-fPIC", "-O0", "-o", str(dest), str(c), f"-Wl,-soname,{soname}",
                        f"-Wl,--version-script={script}"], check=True)


def main() -> None:
    import sysconfig
    site = Path(sysconfig.get_paths()["purelib"])
    torch_lib = site / "torch" / "lib"
    reqs = _torch_requirements()
    if not all(shutil.which(t) for t in ("cc", "nm", "readelf")):
        print("cuda_stubs: no C toolchain; installing torch's NVIDIA packages for real", file=sys.stderr)
        _pip(*[r for r in reqs if not r.startswith("triton")])
        return
    _pip(*[r for r in reqs if r.startswith(REAL)])
    libs = sorted(torch_lib.glob("*.so*"))
    present = {p.name for p in torch_lib.iterdir()} | {p.name for p in site.glob("nvidia/*/lib/*")}
    missing = sorted({n for lib in libs for n in _needed(lib)
                      if n.split(".so")[0] in FOLDERS and n not in present})
    for soname in missing:
        dest = site / "nvidia" / FOLDERS[soname.split(".so")[0]] / "lib" / soname
        syms = _imports(libs, soname)
        _build_stub(soname, syms, dest)
        print(f"cuda_stubs: {dest.relative_to(site)} ({len(syms)} symbols)")


if __name__ == "__main__":
    main()
