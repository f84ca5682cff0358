"""One decoder per input format: every path that reads a record calls these.

Training (:mod:`common.data.readers`), ``fedtransfer site check``
(:mod:`common.data.sitecheck`), ``predict`` and export
(:mod:`common.models.predict`) read files through this module only, so a file is
accepted or refused, and decoded to the same float32 values, everywhere.

**Images** (:func:`decode_image`): PNG, JPEG, BMP and TIFF through Pillow, DICOM
through pydicom (:func:`decode_dicom`). Values become float32 in [0, 1]:

* integer pixels are divided by the largest value their bit depth holds: 255 for
  8-bit images, 65535 for 16-bit ones (a 16-bit pixel of 4000 is 4000 / 65535 =
  0.061, never saturated to 1);
* a DICOM pixel first goes through the modality LUT (rescale slope and
  intercept, or a Modality LUT Sequence), then is scaled from the whole range its
  stored bits can hold (``BitsStored``, ``PixelRepresentation``) after that LUT;
  ``MONOCHROME1`` is inverted (0 is white there), so bright is bright;
* float pixels (TIFF mode ``F``) must already lie in [0, 1];
* a ``window = [lower, upper]`` declared in the schema (raw units: a PNG's pixel
  values, a DICOM's modality units) replaces the bit-depth rule for every image:
  ``(clip(v, lower, upper) - lower) / (upper - lower)``.

Each image is then conformed on its own (:func:`conform`): to the declared
channels (colour to grey by ITU-R 601-2 luma ``0.299 R + 0.587 G + 0.114 B``;
grey to colour by repeating it; an alpha channel is dropped) and resized to the
declared size (bilinear, on the float values, channel by channel).

**CSV** (:func:`read_csv_table`): UTF-8 with or without a byte-order mark, rows
numbered as a spreadsheet shows them (the header is row 1). Cells are parsed by
:meth:`common.data.schema.Schema.encode` (numbers and missing-value tokens:
:func:`common.data.schema.parse_number`).

**Where.** Every message names a place with :func:`where` ("file F, row R,
column C"), once.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Images Pillow decodes, and DICOM. Every reader takes the same list.
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = PILLOW_SUFFIXES + DICOM_SUFFIXES
# The DICOM tags this product reads: the pixel data and what decoding and the
# transforms above need. PatientID only when the site declares it as the patient source.
DICOM_PIXEL_TAGS = ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
                    "PlanarConfiguration", "NumberOfFrames")
DICOM_TRANSFORM_TAGS = ("RescaleSlope", "RescaleIntercept", "RescaleType",
                        "ModalityLUTSequence")
DICOM_PATIENT_TAG = "PatientID"
_GRAY_MODES = {"1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LA", "La", "LAB", "HSV"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


class RecordError(ValueError):
    """One record (a file, a row) cannot be read; the message says why (not where)."""


def where(file: str | Path, row: int | None = None, column: str | None = None) -> str:
    """The one way a message names a place: ``file F, row R, column 'C'``."""
    out = f"file {file}"
    if row is not None:
        out += f", row {row}"
    if column is not None:
        out += f", column '{column}'"
    return out


@dataclass(frozen=True)
class Window:
    """A declared intensity window in raw units: ``lower`` maps to 0, ``upper`` to 1."""

    lower: float
    upper: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lower) and math.isfinite(self.upper)
                and self.lower < self.upper):
            raise ValueError(f"an image window needs finite lower < upper, got "
                             f"[{self.lower}, {self.upper}]")

    def apply(self, values: np.ndarray) -> np.ndarray:
        v = np.clip(values.astype(np.float64), self.lower, self.upper)
        return ((v - self.lower) / (self.upper - self.lower)).astype(np.float32)


def is_image_file(path: Path, *, dicom_any_suffix: bool = False) -> bool:
    """Whether the readers take ``path`` as an image (hidden files never)."""
    if path.name.startswith(".") or not path.is_file():
        return False
    return dicom_any_suffix or path.suffix.lower() in IMAGE_SUFFIXES


def is_dicom(path: Path, *, dicom_any_suffix: bool = False) -> bool:
    return dicom_any_suffix or path.suffix.lower() in DICOM_SUFFIXES


# --------------------------------------------------------------------------
# Decoding: a file to float32 values in [0, 1], (H, W) or (H, W, C)
# --------------------------------------------------------------------------


def decode_image(path: str | Path, *, window: Window | None = None,
                 dicom: bool | None = None) -> tuple[np.ndarray, str]:
    """``(values, description)`` of one image file; ``values`` float32 in [0, 1],
    ``(H, W)`` for grey, ``(H, W, 3)`` for colour; ``description`` like ``"8x8 L"``
    (for reports). ``dicom``: force (or forbid) DICOM; None: by suffix.

    Raises:
        RecordError: the file cannot be decoded, or its values cannot be mapped.
    """
    path = Path(path)
    if dicom if dicom is not None else is_dicom(path):
        values, desc, _ = decode_dicom(path, window=window)
        return values, desc
    return _decode_pillow(path, window)


def _decode_pillow(path: Path, window: Window | None) -> tuple[np.ndarray, str]:
    import struct

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # decodes fully: a truncated file fails here, not later
            img = im.copy()
    except UnidentifiedImageError:
        raise RecordError("not an image Pillow can read (unknown format or corrupt header)"
                          ) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error,
            Image.DecompressionBombError) as exc:
        raise RecordError(f"cannot be decoded ({type(exc).__name__}: {exc})") from None
    desc = f"{img.width}x{img.height} {img.mode}"
    mode = img.mode
    if mode in _GRAY_MODES:
        if mode == "1":
            raw, depth = np.asarray(img.convert("L"), dtype=np.float64), 255.0
        elif mode == "L":
            raw, depth = np.asarray(img, dtype=np.float64), 255.0
        elif mode == "F":
            raw, depth = np.asarray(img, dtype=np.float64), None
        else:  # I;16*, or I (Pillow's 32-bit container, e.g. for 16-bit PNGs)
            raw, depth = np.asarray(img, dtype=np.float64), 65535.0
            if mode == "I" and window is None and (raw.min() < 0 or raw.max() > 65535):
                raise RecordError(f"integer pixels outside 0..65535 (min {raw.min():g}, max "
                                  f"{raw.max():g}); declare the schema's image window")
    elif mode in _COLOUR_MODES:
        rgb = img.convert("RGB") if mode != "LA" and mode != "La" else img.convert("L")
        raw, depth = np.asarray(rgb, dtype=np.float64), 255.0
    else:
        raise RecordError(f"unsupported image mode {mode}")
    if window is not None:
        return window.apply(raw), desc
    if depth is None:  # float pixels are taken as they are, and must be in [0, 1]
        if not np.isfinite(raw).all() or raw.min() < 0 or raw.max() > 1:
            raise RecordError("float pixels outside [0, 1]; declare the schema's image window")
        return raw.astype(np.float32), desc
    return (raw / depth).astype(np.float32), desc


def decode_dicom(path: str | Path, *, window: Window | None = None, patient: bool = False
                 ) -> tuple[np.ndarray, str, str | None]:
    """``(values, description, patient id)`` of one DICOM file.

    Reads only :data:`DICOM_PIXEL_TAGS`, :data:`DICOM_TRANSFORM_TAGS` and (with
    ``patient``) ``PatientID``; the patient id is for grouping at the site only.
    Multi-frame files are refused by name.

    Raises:
        RecordError: not DICOM, no pixel data, multi-frame, or an undecodable
            transfer syntax.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    tags = [*DICOM_PIXEL_TAGS, *DICOM_TRANSFORM_TAGS] + ([DICOM_PATIENT_TAG] if patient else [])
    try:
        ds = pydicom.dcmread(path, specific_tags=tags)
    except InvalidDicomError:
        raise RecordError("not a DICOM file (no DICM preamble)") from None
    except (OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise RecordError(f"cannot be read as DICOM ({type(exc).__name__}: {exc})") from None
    if "PixelData" not in ds:
        raise RecordError("DICOM file without pixel data (PixelData)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise RecordError(f"multi-frame DICOM ({frames} frames) is not supported; save one "
                          "frame per file")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    try:
        stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001  (pydicom raises many types for codec problems)
        raise RecordError(f"DICOM pixel data cannot be decoded ({type(exc).__name__}: {exc}); "
                          "compressed transfer syntaxes need a pydicom decoder plugin") from None
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    desc = f"{ds.Columns}x{ds.Rows} DICOM {photometric} {bits}-bit"
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        raw = np.asarray(apply_modality_lut(stored.astype(np.int64), ds), dtype=np.float64)
        if window is not None:
            values = window.apply(raw)
        else:
            lo, hi = ((-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1))
            ends = np.asarray(apply_modality_lut(np.array([lo, hi], dtype=np.int64), ds),
                              dtype=np.float64)
            lo_v, hi_v = float(ends.min()), float(ends.max())
            if not hi_v > lo_v:
                raise RecordError("the modality LUT maps every stored value to one value")
            values = Window(lo_v, hi_v).apply(raw)
        if photometric == "MONOCHROME1":
            values = (1.0 - values).astype(np.float32)
    elif photometric == "RGB":
        raw = np.asarray(stored, dtype=np.float64)
        values = window.apply(raw) if window is not None else (raw / (2 ** bits - 1)).astype(
            np.float32)
    else:
        raise RecordError(f"DICOM photometric interpretation {photometric} is not supported "
                          "(MONOCHROME1, MONOCHROME2, RGB are)")
    pid = None
    if patient:
        pid = str(ds.get(DICOM_PATIENT_TAG, "") or "").strip() or None
    return values.astype(np.float32), desc, pid


def gray_like(values: np.ndarray) -> bool:
    return values.ndim == 2


def conform(values: np.ndarray, *, channels: int | None, size: tuple[int, int] | None
            ) -> np.ndarray:
    """One decoded image at the declared ``channels`` (1 or 3; None: as it is)
    and ``size`` ``(width, height)`` (None: as it is). float32 in [0, 1]."""
    from PIL import Image

    x = values
    if channels == 1 and x.ndim == 3:
        x = (x[..., :3].astype(np.float64) @ _LUMA).astype(np.float32)
    elif channels == 3 and x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=2)
    if size is not None and (x.shape[1], x.shape[0]) != tuple(size):
        planes = [x] if x.ndim == 2 else [x[..., c] for c in range(x.shape[2])]
        out = [np.asarray(Image.fromarray(np.ascontiguousarray(p, dtype=np.float32), mode="F")
                          .resize(tuple(size), Image.BILINEAR), dtype=np.float32)
               for p in planes]
        x = out[0] if x.ndim == 2 else np.stack(out, axis=2)
        x = np.clip(x, 0.0, 1.0)
    return np.ascontiguousarray(x, dtype=np.float32)


def channel_words(n: int) -> str:
    return {1: "grey (1 channel)", 3: "colour (3 channels)"}.get(n, f"{n} channels")


# --------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------


@dataclass
class CsvTable:
    """A CSV's header and its non-blank rows with their spreadsheet row numbers."""

    path: Path
    header: list[str]
    rows: list[tuple[int, list[str]]]

    def column(self, name: str) -> int:
        return self.header.index(name)


def read_csv_table(path: str | Path) -> CsvTable:
    """The header and every non-blank row (``(row number, cells)``, the header
    being row 1), read as UTF-8 with or without a byte-order mark.

    Raises:
        RecordError: the file cannot be read as CSV, or it is empty (the message
            names the file).
    """
    path = Path(path)
    try:
        # utf-8-sig: a spreadsheet's byte-order mark must not rename the first column.
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader, [])]
            rows, start = [], reader.line_num + 1
            for row in reader:
                if any(c.strip() for c in row):
                    rows.append((start, row))
                start = reader.line_num + 1
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RecordError(f"{where(path.name)}: not a readable CSV ({exc})") from exc
    if not header or not any(header):
        raise RecordError(f"{where(path.name)}: empty file")
    return CsvTable(path, header, rows)


def patient_from_name(pattern: re.Pattern, name: str) -> str | None:
    """The patient id a file-name pattern finds (its ``patient`` group, else group 1)."""
    m = pattern.search(name)
    if m is None:
        return None
    if "patient" in m.groupdict():
        return m.group("patient")
    return m.group(1) if m.groups() else m.group(0)


def sorted_unique(values: Sequence[str]) -> list[str]:
    return sorted(set(values))
