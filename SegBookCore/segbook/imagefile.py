"""Refuse image files that cannot be read exactly, before any pixel is used.

ITK reads some damaged files without an error: a `.nii.gz` or `.nii` cut short is padded with zeros, a
compressed MetaImage whose zlib stream is corrupt is returned half empty, a NIfTI voxel size of 0 or NaN is
silently replaced by 1. So every file is checked against what its header promises:

- gzip streams (`.nii.gz`) are read to their end marker and CRC, and must hold the header's byte count;
- raw data (`.nii`, NRRD raw attached or detached, MHA/MHD raw) must hold the header's byte count;
- zlib data of MHA/MHD (`CompressedData = True`) must inflate to its end and to the header's byte count
  (checked before ITK reads, a rare format);
- voxel spacing must be finite and positive, the origin finite, the direction finite and invertible.

NRRD gzip/bzip2 data is left to ITK, which already refuses a short or corrupt stream.

Header checks run first (no pixel read); reading a compressed stream to its end runs in a thread beside
ITK's own reading (both release the GIL), so the normal path costs about what it did on a machine with a
spare core, and the image is only returned once both are done.
"""
from __future__ import annotations

import math
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk

from .errors import InputError

__all__ = ["inspect_file", "check_file", "check_written", "read_beside", "check_geometry"]

_CHUNK = 1 << 22
_REEXPORT = "re-download or re-export it"

_NRRD_BYTES = {1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"),
               2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                   "unsigned short", "unsigned short int", "uint16", "uint16_t"),
               4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"),
               8: ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                   "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                   "double")}
_NRRD_SIZE = {name: n for n, names in _NRRD_BYTES.items() for name in names}
_MET_SIZE = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
             "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
             "MET_DOUBLE": 8}


def _truncated(path, holds: int, needs: int) -> InputError:
    return InputError(f"{path}: truncated (holds {holds} of the {needs} data bytes its header promises): "
                      f"{_REEXPORT}")


def _inflate(path: Path, wbits: int, offset: int = 0, length: int | None = None) -> int:
    """Inflate the stream(s) of `path` from `offset` to their end marker (and gzip CRC); returns the inflated
    byte count. InputError when cut short or corrupt."""
    total = 0
    d = zlib.decompressobj(wbits)
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            left = length
            while left is None or left > 0:
                chunk = f.read(_CHUNK if left is None else min(_CHUNK, left))
                if not chunk:
                    break
                if left is not None:
                    left -= len(chunk)
                while chunk:
                    total += len(d.decompress(chunk))
                    chunk = d.unused_data if d.eof else b""
                    if d.eof and chunk and wbits & 16 and chunk[:2] == b"\x1f\x8b":
                        d = zlib.decompressobj(wbits)     # a further gzip member (pigz, concatenated files)
                    elif d.eof:
                        chunk = b""                       # padding after the stream
    except zlib.error as e:
        raise InputError(f"{path}: damaged compressed data ({e}): {_REEXPORT}") from None
    if not d.eof:
        raise InputError(f"{path}: truncated (the compressed data stops before its end): {_REEXPORT}")
    return total


# ---------------------------------------------------------------------------------------------- NIfTI
def _nifti_header(raw: bytes, path) -> dict | None:
    """The fields we check of a NIfTI-1/2 header, or None when `raw` is not one."""
    for end in "<>":
        if len(raw) >= 348 and struct.unpack(end + "i", raw[:4])[0] == 348 and raw[344:347] in (b"n+1", b"ni1"):
            dim = struct.unpack(end + "8h", raw[40:56])
            datatype, bitpix = struct.unpack(end + "2h", raw[70:74])
            pixdim = struct.unpack(end + "8f", raw[76:108])
            vox_offset, slope, inter = struct.unpack(end + "3f", raw[108:120])
            return dict(end=end, version=1, dim=dim, datatype=datatype, bitpix=bitpix, pixdim=pixdim,
                        vox_offset=vox_offset, slope=slope, inter=inter, pair=raw[344:347] == b"ni1")
        if len(raw) >= 540 and struct.unpack(end + "i", raw[:4])[0] == 540 and raw[4:7] == b"n+2":
            datatype, bitpix = struct.unpack(end + "2h", raw[12:16])
            dim = struct.unpack(end + "8q", raw[16:80])
            pixdim = struct.unpack(end + "8d", raw[104:168])
            (vox_offset,) = struct.unpack(end + "q", raw[168:176])
            return dict(end=end, version=2, dim=dim, datatype=datatype, bitpix=bitpix, pixdim=pixdim,
                        vox_offset=vox_offset, slope=0.0, inter=0.0, pair=False)
    return None


def _first_bytes(path: Path, gz: bool, n: int = 540) -> bytes:
    with open(path, "rb") as f:
        if not gz:
            return f.read(n)
        d, out = zlib.decompressobj(31), b""
        while len(out) < n and not d.eof:
            chunk = f.read(1 << 16)
            if not chunk:
                break
            try:
                out += d.decompress(chunk, n - len(out))
            except zlib.error as e:
                raise InputError(f"{path}: damaged compressed data ({e}): {_REEXPORT}") from None
            while d.unconsumed_tail and len(out) < n:
                out += d.decompress(d.unconsumed_tail, n - len(out))
        return out


def _check_nifti(path: Path, gz: bool) -> Optional[Callable[[], None]]:
    """Check a NIfTI header and, uncompressed, its byte count; returns the check of the gzip stream, if any."""
    header = _nifti_header(_first_bytes(path, gz), path)
    if header is None or header["pair"]:
        return None         # not NIfTI after all, or an .hdr/.img pair: ITK decides
    dim, pixdim = header["dim"], header["pixdim"]
    # refused here, in one line: the NIfTI library inside ITK would print its own complaint to stderr first
    if not 1 <= dim[0] <= 7:
        raise InputError(f"{path}: damaged header (dim[0] = {dim[0]}, the number of dimensions, must be 1 to 7): "
                         f"{_REEXPORT}")
    for axis in range(1, dim[0] + 1):
        if dim[axis] < 1:
            raise InputError(f"{path}: damaged header (size {dim[axis]} along axis {axis}): {_REEXPORT}")
    if header["bitpix"] not in (8, 16, 24, 32, 64, 128, 256):
        raise InputError(f"{path}: damaged header (bitpix {header['bitpix']}, bits per voxel): {_REEXPORT}")
    for axis in range(1, min(dim[0], 3) + 1):
        if not (math.isfinite(pixdim[axis]) and pixdim[axis] > 0):
            raise InputError(f"{path}: header gives voxel size {pixdim[axis]:g} along axis {axis} "
                             f"(must be a positive number): fix the header or re-export the image")
    count = int(np.prod([max(int(d), 0) for d in dim[1: dim[0] + 1]], dtype=np.int64))
    offset = max(int(header["vox_offset"]), 348 if header["version"] == 1 else 540)
    needs = offset + count * max(int(header["bitpix"]), 0) // 8

    def check(holds: int) -> None:
        if holds < needs:
            raise _truncated(path, max(holds - offset, 0), needs - offset)

    if not gz:
        check(os.path.getsize(path))
        return None
    return lambda: check(_inflate(path, 31))


# ------------------------------------------------------------------------------------- NRRD, MetaImage
def _text_header(path: Path, stop) -> tuple[dict, int]:
    """`key: value` / `Key = Value` lines up to the line where `stop(key, line)` is true (included);
    returns the fields (lower-case keys) and the byte offset just after the header."""
    fields, offset = {}, 0
    with open(path, "rb") as f:
        for line in f:
            offset += len(line)
            text = line.decode("latin-1").rstrip("\r\n")
            sep = "=" if "=" in text and (":" not in text or text.index("=") < text.index(":")) else ":"
            key, _, value = text.partition(sep)
            key = key.strip().lower()
            fields.setdefault(key, value.strip().lstrip("="))
            if stop(key, text) or offset > 1 << 20:
                break
    return fields, offset


def _check_raw_bytes(path: Path, data: Path, start: int, needs: int) -> None:
    try:
        holds = os.path.getsize(data) - start
    except OSError:
        raise InputError(f"{path}: its data file {data.name} is missing: copy it next to the header") from None
    if holds < needs:
        raise _truncated(data if data != path else path, max(holds, 0), needs)


def _check_sizes(path: Path, text: str, field: str) -> None:
    """A header's sizes must be whole numbers >= 1 (ITK would try to allocate a negative or empty image)."""
    try:
        sizes = [int(v) for v in text.split()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise InputError(f"{path}: damaged header ({field} '{text}'): {_REEXPORT}")


def _check_nrrd(path: Path) -> None:
    fields, offset = _text_header(path, lambda key, line: line.strip() == "")
    if "sizes" in fields:
        _check_sizes(path, fields["sizes"], "sizes")
    try:
        count = int(np.prod([int(s) for s in fields["sizes"].split()], dtype=np.int64))
        needs = count * _NRRD_SIZE[fields["type"].lower()]
    except (KeyError, ValueError):
        return              # a header we do not understand: ITK decides
    detached = fields.get("data file") or fields.get("datafile")
    data = path
    if detached:
        if detached.startswith("LIST") or len(detached.split()) > 1:
            return          # several data files: ITK checks them
        data, offset = path.parent / detached, 0
    if fields.get("line skip", fields.get("lineskip", "0")) != "0":
        return
    skip = int(fields.get("byte skip", fields.get("byteskip", "0")) or 0)
    if fields.get("encoding", "raw").lower() == "raw" and skip >= 0:
        _check_raw_bytes(path, data, offset + skip, needs)


def _check_metaimage(path: Path) -> Optional[Callable[[], None]]:
    fields, offset = _text_header(path, lambda key, line: key == "elementdatafile")
    if "dimsize" in fields:
        _check_sizes(path, fields["dimsize"], "DimSize")
    try:
        count = int(np.prod([int(s) for s in fields["dimsize"].split()], dtype=np.int64))
        needs = count * _MET_SIZE[fields["elementtype"].upper()] * int(fields.get("elementnumberofchannels", "1"))
        source = fields["elementdatafile"]
    except (KeyError, ValueError):
        return None
    if source.upper().startswith("LIST") or "%" in source or len(source.split()) > 1:
        return None
    data = path if source.upper() == "LOCAL" else path.parent / source
    if data != path:
        offset = int(fields.get("headersize", "0"))
        if offset < 0:
            return None     # HeaderSize = -1: the data are the last bytes of the file, whatever its size
    if fields.get("compresseddata", "false").lower() == "true":
        if not data.is_file():
            raise InputError(f"{path}: its data file {data.name} is missing: copy it next to the header")
        size = fields.get("compresseddatasize")

        def check() -> None:
            holds = _inflate(data, 47, offset, int(size) if size and size.isdigit() else None)
            if holds < needs:
                raise _truncated(data, holds, needs)
        return check
    _check_raw_bytes(path, data, offset, needs)
    return None


# ------------------------------------------------------------------------------------------ geometry
def check_geometry(path, spacing, origin, direction) -> None:
    """InputError unless spacing is finite and positive, origin finite, direction finite and invertible."""
    spacing, origin = np.asarray(spacing, float), np.asarray(origin, float)
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
        raise InputError(f"{path}: voxel spacing {tuple(float(s) for s in spacing)} is not positive and finite: "
                         f"fix the header or re-export the image")
    if not np.all(np.isfinite(origin)):
        raise InputError(f"{path}: origin {tuple(float(s) for s in origin)} is not finite: fix the header or "
                         f"re-export the image")
    n = int(round(math.sqrt(len(direction))))
    matrix = np.asarray(direction, float).reshape(n, n)
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-6:
        raise InputError(f"{path}: direction matrix {tuple(round(float(v), 4) for v in matrix.ravel())} is not "
                         f"a valid orientation: fix the header or re-export the image")


def inspect_file(path: Path) -> tuple[sitk.ImageFileReader, Optional[Callable[[], None]]]:
    """Check an image file's header against the file (see module docstring), without reading its pixels.

    Returns ITK's reader with the header read, and the check still to run on a compressed stream (None if
    none): run it, or pass both to `read_beside`. InputError naming the file when it is damaged or its
    geometry invalid; RuntimeError (ITK's) when ITK cannot read the header at all.
    """
    name = path.name.lower()
    deep = None
    try:
        if name.endswith((".nii", ".nii.gz")):
            with open(path, "rb") as f:
                gz = f.read(2) == b"\x1f\x8b"     # by content: a `.nii.gz` may be stored uncompressed
            deep = _check_nifti(path, gz)
        elif name.endswith((".nrrd", ".nhdr")):
            _check_nrrd(path)
        elif name.endswith((".mha", ".mhd")):
            zlib_check = _check_metaimage(path)
            if zlib_check is not None:
                zlib_check()    # first: ITK prints to stderr on the corrupt zlib data it returns half empty
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        if deep is not None:
            deep()              # damaged data often makes ITK refuse the header too: say what is wrong
        raise
    check_geometry(path, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    return reader, deep


def check_file(path: Path) -> sitk.ImageFileReader:
    """Every check of `inspect_file`, the compressed stream's included, for a file read later or elsewhere
    (fine-tune datasets, Slicer's own reader); returns ITK's reader with the header read."""
    reader, deep = inspect_file(path)
    if deep is not None:
        deep()
    return reader


def _check_nrrd_gzip(path: Path) -> None:
    """A gzip-encoded NRRD's data inflated to its end and to the header's byte count."""
    fields, offset = _text_header(path, lambda key, line: line.strip() == "")
    if fields.get("encoding", "raw").lower() not in ("gzip", "gz") or fields.get("data file", fields.get("datafile")):
        return
    try:
        count = int(np.prod([int(s) for s in fields["sizes"].split()], dtype=np.int64))
        needs = count * _NRRD_SIZE[fields["type"].lower()]
    except (KeyError, ValueError):
        return
    holds = _inflate(path, 31, offset)
    if holds < needs:
        raise _truncated(path, holds, needs)


def check_written(path: Path) -> None:
    """Every check of `check_file`, and a gzip NRRD's stream too: a file just written is complete. ITK's NIfTI
    and NRRD writers can stop short of the end (a full disk, a file size limit) without raising."""
    check_file(path)
    if path.name.lower().endswith(".nrrd"):
        _check_nrrd_gzip(path)


def read_beside(reader: sitk.ImageFileReader, deep: Optional[Callable[[], None]]) -> sitk.Image:
    """ITK reads the image while `deep` checks the stream in a thread; the image only once both are done.
    The check's InputError wins over ITK's error (it says what is wrong and what to do)."""
    if deep is None:
        return reader.Execute()
    failures: list = []

    def run() -> None:
        try:
            deep()
        except Exception as e:  # noqa: BLE001  handed over to the reading thread
            failures.append(e)

    thread = threading.Thread(target=run, name="segbook-check", daemon=True)
    thread.start()
    try:
        image = reader.Execute()
    except RuntimeError:
        thread.join()
        if failures:
            raise failures[0] from None
        raise
    thread.join()
    if failures:
        raise failures[0]
    return image
