"""Instrument metadata of the input TIFFs: pixel size, detector, working distance, slice z.

Read from the tags the acquisition software writes (through tifffile, header only):

==========  ==========================================  =========================================
vendor      tag                                         what is read
==========  ==========================================  =========================================
Zeiss       34118 (``TiffFile.sem_metadata``)           ``ap_image_pixel_size`` (or
                                                        ``ap_pixel_size``), ``ap_wd``,
                                                        ``dp_detector_channel``
Fibics      51023, XML text                             ``Scan/Ux,Uy,Vx,Vy`` (µm per pixel
                                                        vectors), ``Image/Detector``,
                                                        ``ATLAS3D/Slice/ZPos`` (µm)
FEI/Thermo  34680 / 34682 (``TiffFile.fei_metadata``)   ``Scan/PixelWidth,PixelHeight`` (m),
                                                        ``Stage/WorkingDistance`` (m),
                                                        ``Detectors/Name``
==========  ==========================================  =========================================

Zeiss's ``ap_stage_at_z`` is the stage height, not the slice position, and is not read.

Units, everywhere in the project: pixel sizes and slice thickness in nanometres, working
distances in millimetres, slice positions in micrometres (the unit of PyStack3D's file-name
policy ``..._z={z_coord}um.tif``).

The stack's metadata (:func:`stack_metadata`) is a JSON-ready dict stored with the
ingested input: one pixel size for the stack (slices that disagree are an error naming
them, unless ``[metadata] pixel_size_nm`` overrides it), per channel the detector, and
the working distance and slice positions, one value per slice where they vary.

The ``[metadata]`` table of the parameter file (:class:`MetadataConfig`) gives what the
files lack or gets wrong, and where the z positions come from.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pystack3d_dask.config import check
from pystack3d_dask.errors import InputError

SECTION = "metadata"
#: relative difference between two slices' pixel sizes above which they disagree
RTOL = 1e-3
#: nanometres per unit, for the units instruments write
_NM = {"pm": 1e-3, "nm": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3, "mm": 1e6, "m": 1e9}


@dataclasses.dataclass(frozen=True)
class MetadataConfig:
    """The ``[metadata]`` table: physical sizes the files lack, and the source of z positions."""

    #: pixel size in nm, one value or [x, y]; wins over the instrument's
    pixel_size_nm: float | tuple[float, float] | None = None
    #: z spacing in nm, used when the slices have no z positions (export scale)
    slice_thickness_nm: float | None = None
    #: where the input z positions come from: the file names through [resampling] policy,
    #: or the instrument's slice positions (Fibics ATLAS3D/Slice/ZPos)
    zpos: Literal["file_names", "metadata"] = "file_names"

    def __post_init__(self):
        values = (self.pixel_size_nm,) if isinstance(self.pixel_size_nm, float) else self.pixel_size_nm or ()
        check(all(math.isfinite(v) and v > 0 for v in values), SECTION, "pixel_size_nm", self.pixel_size_nm,
              "expected a size > 0 in nm, or [x, y]")
        check(self.slice_thickness_nm is None or (math.isfinite(self.slice_thickness_nm)
                                                  and self.slice_thickness_nm > 0),
              SECTION, "slice_thickness_nm", self.slice_thickness_nm, "expected a thickness > 0 in nm")

    @property
    def pixel_size_xy(self) -> tuple[float, float] | None:
        """``(x, y)`` in nm, or None."""
        p = self.pixel_size_nm
        return None if p is None else (p, p) if isinstance(p, float) else tuple(p)


@dataclasses.dataclass(frozen=True)
class SliceMetadata:
    """What one TIFF says about its acquisition (None where it says nothing)."""

    vendor: str | None = None
    #: (x, y) in nm
    pixel_size_nm: tuple[float, float] | None = None
    detector: str | None = None
    working_distance_mm: float | None = None
    #: slice position in µm
    z_um: float | None = None


def read_metadata(path: str | Path) -> SliceMetadata:
    """Open a TIFF and read its instrument metadata (no pixel data); see :func:`instrument_metadata`."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return instrument_metadata(tif, path)
    except InputError:
        raise
    except Exception as exc:  # tifffile raises many types on corrupt files
        raise InputError(f"cannot read TIFF {path}: {exc}") from None


def instrument_metadata(tif: Any, path: str | Path) -> SliceMetadata:
    """The instrument metadata in the first page's tags of an open ``tifffile.TiffFile``.

    Raises
    ------
    InputError
        A metadata tag holds values that cannot be read (the file and tag are named).
    """
    tags = tif.pages.first.tags
    if 51023 in tags:
        return _fibics(tags.valueof(51023), path)
    if tif.is_sem:
        return _zeiss(tif.sem_metadata or {}, path)
    if tif.is_fei:
        return _fei(tif.fei_metadata or {}, path)
    return SliceMetadata()


def _length_nm(value: Any, unit: str, path, what: str) -> float:
    try:
        out = float(value) * _NM[unit.strip()]
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{path}: {what} = {value!r} {unit!r} is not a length "
                         f"(units read: {', '.join(_NM)}).") from None
    if not math.isfinite(out) or out <= 0:
        raise InputError(f"{path}: {what} = {value!r} {unit} is not a size > 0.")
    return out


def _zeiss(sem: dict, path) -> SliceMetadata:
    pixel = sem.get("ap_image_pixel_size") or sem.get("ap_pixel_size")
    size = None
    if pixel is not None:
        nm = _length_nm(pixel[1], pixel[2] if len(pixel) > 2 else "", path, "Zeiss ap_image_pixel_size")
        size = (nm, nm)
    wd = sem.get("ap_wd")
    wd_mm = _length_nm(wd[1], wd[2] if len(wd) > 2 else "", path, "Zeiss ap_wd") / 1e6 if wd else None
    detector = sem.get("dp_detector_channel")
    return SliceMetadata("zeiss", size, None if detector is None else str(detector[1]), wd_mm)


def _fibics(xml: str | bytes, path) -> SliceMetadata:
    try:
        root = ET.fromstring(xml.rstrip(b"\0") if isinstance(xml, bytes) else xml.rstrip("\0"))
    except ET.ParseError as exc:
        raise InputError(f"{path}: the Fibics XML (tag 51023) is not valid XML: {exc}") from None

    def number(key: str) -> float | None:
        text = root.findtext(key)
        if text is None or not text.strip():
            return None
        try:
            return float(text)
        except ValueError:
            raise InputError(f"{path}: Fibics {key} = {text!r} is not a number.") from None

    u = (number("Scan/Ux"), number("Scan/Uy"))
    v = (number("Scan/Vx"), number("Scan/Vy"))
    size = None
    if None not in u + v:  # the pixel's x and y vectors in µm: their lengths are the sizes
        size = (_length_nm(math.hypot(*u), "um", path, "Fibics Scan/Ux,Uy"),
                _length_nm(math.hypot(*v), "um", path, "Fibics Scan/Vx,Vy"))
    detector = root.findtext("Image/Detector")
    return SliceMetadata("fibics", size, detector.strip() if detector else None, None, number("ATLAS3D/Slice/ZPos"))


def _fei(fei: dict, path) -> SliceMetadata:
    scan, stage = fei.get("Scan", {}), fei.get("Stage", {})
    size = None
    if "PixelWidth" in scan:
        x = _length_nm(scan["PixelWidth"], "m", path, "FEI Scan/PixelWidth")
        size = (x, _length_nm(scan.get("PixelHeight", scan["PixelWidth"]), "m", path, "FEI Scan/PixelHeight"))
    wd = stage.get("WorkingDistance")
    wd_mm = _length_nm(wd, "m", path, "FEI Stage/WorkingDistance") / 1e6 if wd else None
    detector = fei.get("Detectors", {}).get("Name")
    return SliceMetadata("fei", size, None if detector is None else str(detector), wd_mm)


def stack_metadata(records: Mapping[str, Sequence[tuple[Path, SliceMetadata]]], *,
                   pixel_size_override: bool = False) -> dict | None:
    """Combine the metadata of every slice of every channel; None when no file has any.

    Parameters
    ----------
    records : mapping
        Channel name to its ``(file, record)`` per slice, in slice order (as filled by
        :func:`pystack3d_dask.io.tiff.discover`).
    pixel_size_override : bool
        True when ``[metadata] pixel_size_nm`` is given: slices that disagree on the pixel
        size then give a warning instead of an error.

    Returns
    -------
    dict or None
        ``vendor``, ``pixel_size_nm`` ([x, y] or None), ``detector`` (per channel),
        ``working_distance_mm`` and ``z_um`` (a number when every slice agrees, else one per
        slice of the first channel; None when absent).

    Raises
    ------
    InputError
        Two slices disagree on the pixel size (both files are named).
    """
    everything = [pair for recs in records.values() for pair in recs]
    if all(r == SliceMetadata() for _, r in everything):
        return None
    sized = [(f, r.pixel_size_nm) for f, r in everything if r.pixel_size_nm is not None]
    pixel = None
    if sized:
        ref_file, pixel = sized[0]
        for f, p in sized[1:]:
            if not np.allclose(p, pixel, rtol=RTOL, atol=0):
                msg = (f"{f} has a pixel size of {p[0]:g} x {p[1]:g} nm, but {ref_file} has "
                       f"{pixel[0]:g} x {pixel[1]:g} nm")
                if not pixel_size_override:
                    raise InputError(f"{msg}: the slices of a stack must share one pixel size (or set "
                                     "[metadata] pixel_size_nm to the right one).")
                warnings.warn(f"{msg}; [metadata] pixel_size_nm is used.", stacklevel=3)
                break
    detectors = {}
    for ch, recs in records.items():
        first_file = {}  # the first file of each detector
        for f, r in recs:
            if r.detector is not None:
                first_file.setdefault(r.detector, f)
        if len(first_file) > 1:
            where = ", ".join(f"{name} from {f}" for name, f in first_file.items())
            warnings.warn(f"channel {ch!r} holds slices from several detectors: {where}.", stacklevel=3)
        detectors[ch] = ", ".join(sorted(first_file)) or None
    first = [r for _, r in records[next(iter(records))]]
    return {"vendor": sorted({r.vendor for _, r in everything} - {None}),
            "pixel_size_nm": None if pixel is None else list(pixel), "detector": detectors,
            "working_distance_mm": _per_slice([r.working_distance_mm for r in first]),
            "z_um": _per_slice([r.z_um for r in first], constant=False)}


def _per_slice(values: list[float | None], *, constant: bool = True) -> float | list[float | None] | None:
    """None when absent everywhere, one number when every slice agrees (``constant``), else the list."""
    known = {v for v in values if v is not None}
    if not known:
        return None
    return known.pop() if constant and len(known) == 1 and None not in values else values


def metadata_zpos(metadata: dict | None, names: Sequence[str]) -> np.ndarray:
    """The input z positions (µm) from the instrument's slice positions (``[metadata] zpos = "metadata"``).

    Raises
    ------
    InputError
        Some slice has no position in its metadata (the first such file is named), or the
        positions do not increase strictly.
    """
    from pystack3d_dask.io.zpos import check_zpos

    z = None if metadata is None else metadata.get("z_um")
    if not isinstance(z, list) or None in z:
        missing = names[0] if not isinstance(z, list) else names[z.index(None)]
        raise InputError(f"[{SECTION}] zpos = 'metadata' but {missing} has no slice position in its metadata "
                         "(only Fibics ATLAS3D/Slice/ZPos gives one); use zpos = 'file_names'.")
    return check_zpos(z, names)


def voxel_size_um(metadata: dict | None, config: MetadataConfig, zpos: np.ndarray | None
                  ) -> tuple[tuple[float, float, float] | None, float]:
    """The voxel size ``(z, y, x)`` in µm and the first slice's z, for an export; None when unknown.

    The pixel size is ``[metadata] pixel_size_nm``, else the instrument's.  The z spacing is
    the median step of ``zpos`` (the z positions of the exported step), else
    ``slice_thickness_nm``, else the pixel size (with a warning); a z spacing that varies by
    more than 5 % gives a warning (run resampling first for a uniform one).
    """
    xy = config.pixel_size_xy or (None if metadata is None else metadata.get("pixel_size_nm"))
    if xy is None:
        warnings.warn("the pixel size is unknown (no instrument metadata): the export's scale is in pixels; "
                      f"set [{SECTION}] pixel_size_nm.", stacklevel=3)
        return None, 0.0
    z0 = 0.0
    if zpos is not None and len(zpos) > 1:
        steps = np.diff(zpos)
        dz = float(np.median(steps))
        if steps.max() - steps.min() > 0.05 * dz:
            warnings.warn(f"the z spacing varies from {steps.min():g} to {steps.max():g} um: the export uses the "
                          f"median, {dz:g} um (run resampling first for a uniform spacing).", stacklevel=3)
        z0 = float(zpos[0])
    elif config.slice_thickness_nm is not None:
        dz = config.slice_thickness_nm / 1e3
    else:
        warnings.warn(f"the z spacing is unknown: the export takes the pixel size ({xy[0]:g} nm); set [{SECTION}] "
                      "slice_thickness_nm or name the files with their z positions.", stacklevel=3)
        dz = xy[0] / 1e3
    return (dz, xy[1] / 1e3, xy[0] / 1e3), z0


def summary(metadata: dict | None, config: MetadataConfig) -> dict[str, Any]:
    """What ``info`` shows: the stack's metadata with per-slice lists as ranges, and the overrides."""
    out: dict[str, Any] = {"zpos": config.zpos}
    for key, value in (metadata or {}).items():
        if isinstance(value, list) and len(value) > 2 and key != "pixel_size_nm":
            known = [v for v in value if v is not None]
            value = f"{min(known):g} .. {max(known):g} over {len(value)} slices" if known else None
        out[key] = value
    if config.pixel_size_xy is not None:
        out["pixel_size_nm"] = list(config.pixel_size_xy)
        out["pixel_size_from"] = f"[{SECTION}] pixel_size_nm"
    if config.slice_thickness_nm is not None:
        out["slice_thickness_nm"] = config.slice_thickness_nm
    return out
