"""Refuse image files that cannot be read exactly, before any pixel is used.

ITK reads some damaged files without an error: a `.nii.gz` or `.nii` cut short is padded with zeros, a
compressed MetaImage whose zlib stream is corrupt is returned half empty, a NIfTI voxel size of 0 or NaN is
silently replaced by 1. So every file is checked against what its header promises:

- gzip streams (`.nii.gz`) are read to their end marker and CRC, and must hold the header's byte count;
- raw data (`.nii`, NRRD raw attached or detached, MHA/MHD raw) must hold the header's byte count;
- zlib data of MHA/MHD (`CompressedData = True`) must inflate to its end and to the header's byte count;
- voxel spacing must be finite and positive, the origin finite, the direction finite and invertible.

NRRD gzip/bzip2 data is left to ITK, which already refuses a short or corrupt stream.

To keep the normal path as fast as before, a plain 3D scalar `.nii.gz` is inflated only once: the checked
bytes become the array (ITK's own reading is used for its geometry, and for every other file).
"""
from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

__all__ = ["inspect_file", "check_geometry"]

_CHUNK = 1 << 22
_REEXPORT = "re-download or re-export it"

# NIfTI datatype code -> numpy dtype (scalar types the fast path reads itself; others go through ITK)
_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4",
                 1024: "i8", 1280: "u8"}
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


def _inflate(path: Path, wbits: int, offset: int = 0, length: int | None = None,
             into: bytearray | None = None) -> int:
    """Inflate the stream(s) of `path` from `offset` to their end marker (and gzip CRC); returns the inflated
    byte count, copying the bytes into `into` (up to its size) when given. InputError when cut short or corrupt."""
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
                    out = d.decompress(chunk)
                    if into is not None and total < len(into):
                        into[total:total + len(out)] = out[: len(into) - total]
                    total += len(out)
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


def _check_nifti(path: Path, gz: bool) -> np.ndarray | None:
    """Check a NIfTI file; returns its voxels (z, y, x) as stored when the fast path applies, else None."""
    header = _nifti_header(_first_bytes(path, gz), path)
    if header is None or header["pair"] or not 1 <= header["dim"][0] <= 7:
        return None         # not NIfTI after all, or an .hdr/.img pair: ITK decides
    dim, pixdim = header["dim"], header["pixdim"]
    for axis in range(1, min(dim[0], 3) + 1):
        if not (math.isfinite(pixdim[axis]) and pixdim[axis] > 0):
            raise InputError(f"{path}: header gives voxel size {pixdim[axis]:g} along axis {axis} "
                             f"(must be a positive number): fix the header or re-export the image")
    count = int(np.prod([max(int(d), 0) for d in dim[1: dim[0] + 1]], dtype=np.int64))
    offset = max(int(header["vox_offset"]), 348 if header["version"] == 1 else 540)
    needs = offset + count * max(int(header["bitpix"]), 0) // 8
    fast = (header["version"] == 1 and header["datatype"] in _NIFTI_DTYPES and gz
            and all(int(d) == 1 for d in dim[4: dim[0] + 1]) and dim[0] >= 3
            and math.isfinite(header["slope"]) and math.isfinite(header["inter"]))
    if not gz:
        holds = os.path.getsize(path)
        if holds < needs:
            raise _truncated(path, max(holds - offset, 0), needs - offset)
        return None
    buffer = bytearray(needs) if fast else None
    holds = _inflate(path, 31, into=buffer)
    if holds < needs:
        raise _truncated(path, max(holds - offset, 0), needs - offset)
    if not fast:
        return None
    dtype = np.dtype(header["end"] + _NIFTI_DTYPES[header["datatype"]])
    voxels = np.frombuffer(buffer, dtype, count, offset).reshape(dim[3], dim[2], dim[1])
    slope, inter = header["slope"] or 1.0, header["inter"]   # as ITK: a slope of 0 means 1
    if slope != 1 or inter != 0:
        # as ITK: in double precision, returned as float32
        voxels = (voxels.astype(np.float64) * slope + inter).astype(np.float32)
    return voxels


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


def _check_nrrd(path: Path) -> None:
    fields, offset = _text_header(path, lambda key, line: line.strip() == "")
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


def _check_metaimage(path: Path) -> None:
    fields, offset = _text_header(path, lambda key, line: key == "elementdatafile")
    try:
        count = int(np.prod([int(s) for s in fields["dimsize"].split()], dtype=np.int64))
        needs = count * _MET_SIZE[fields["elementtype"].upper()] * int(fields.get("elementnumberofchannels", "1"))
        source = fields["elementdatafile"]
    except (KeyError, ValueError):
        return
    if source.upper().startswith("LIST") or "%" in source or len(source.split()) > 1:
        return
    data = path if source.upper() == "LOCAL" else path.parent / source
    if data != path:
        offset = int(fields.get("headersize", "0"))
        if offset < 0:
            return          # HeaderSize = -1: the data are the last bytes of the file, whatever its size
    if fields.get("compresseddata", "false").lower() == "true":
        if not data.is_file():
            raise InputError(f"{path}: its data file {data.name} is missing: copy it next to the header")
        size = fields.get("compresseddatasize")
        holds = _inflate(data, 47, offset, int(size) if size and size.isdigit() else None)
        if holds < needs:
            raise _truncated(data, holds, needs)
    else:
        _check_raw_bytes(path, data, offset, needs)


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


def inspect_file(path: Path) -> tuple[sitk.ImageFileReader, np.ndarray | None]:
    """Check an image file (see module docstring); returns ITK's reader with the header read, and the voxels
    (z, y, x) as stored when they were read here (plain 3D scalar `.nii.gz`), else None. InputError naming
    the file when the file is damaged or its geometry invalid."""
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            with open(path, "rb") as f:
                gz = f.read(2) == b"\x1f\x8b"     # by content: a `.nii.gz` may be stored uncompressed
            voxels = _check_nifti(path, gz)
        else:
            voxels = None
            if name.endswith((".nrrd", ".nhdr")):
                _check_nrrd(path)
            elif name.endswith((".mha", ".mhd")):
                _check_metaimage(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()           # RuntimeError for what ITK cannot read at all: the caller says so
    check_geometry(path, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    if voxels is not None and (reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1
                               or tuple(reader.GetSize()) != voxels.shape[::-1]):
        voxels = None                       # not what ITK sees as a plain volume: let ITK read it
    return reader, voxels
