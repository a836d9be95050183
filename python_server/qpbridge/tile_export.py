"""Training tiles from annotated images: ``qpbridge export-tiles``.

Writes the folder described in docs/training.md ("Dataset layout"), the same one QuPath's *Export training
tiles* script writes: ``images/`` + ``masks/`` under QuPath's tile names, ``labels.json``, and ``dataset.json``
with every tile's source, region and split; ``types/``, ``coco/`` and ``points/`` by format.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from shapely.geometry.base import BaseGeometry

from qpbridge import __version__
from qpbridge.annotation_files import AnnotatedObject
from qpbridge.dataset import (
    DATASET_JSON,
    DEFAULT_SEED,
    DEFAULT_VAL_FRACTION,
    LABELS_JSON,
    mode_of,
    split_sources,
    tile_name,
)
from qpbridge.errors import BadRequestError, MissingPixelSizeError

log = logging.getLogger("qpbridge")

__all__ = ["ExportOptions", "ExportResult", "Source", "export_tiles", "open_image", "paint_geometry"]

# Colours for classes that bring none (QuPath's default-ish palette).
_PALETTE = [(200, 0, 0), (0, 150, 0), (30, 60, 200), (200, 150, 0), (150, 0, 150), (0, 150, 150), (255, 120, 0),
            (120, 80, 40), (90, 90, 90), (255, 0, 255)]


class _Image:
    """Width, height, pixel size and ``read(x0, y0, x1, y1, out_w, out_h)`` of a plain image or a slide."""

    def __init__(self, width: int, height: int, mpp: float | None, read: Callable[..., np.ndarray],
                 close: Callable[[], None] | None = None) -> None:
        self.width, self.height, self.mpp, self.read = width, height, mpp, read
        self._close = close

    def close(self) -> None:
        if self._close is not None:
            self._close()


def open_image(path: Path, mpp: float | None = None) -> _Image:
    """PNG/JPEG read whole (as ``predict`` does); TIFF and slide formats through tiffslide, region by region."""
    from qpbridge.images import ArrayImage, read_image
    from qpbridge.projects import PLAIN_IMAGE_SUFFIXES
    from qpbridge.slides import Slide

    if mpp is not None and (not math.isfinite(mpp) or mpp <= 0):
        raise BadRequestError(f"--mpp must be a positive number of µm/px, got {mpp}")
    if path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
        rgb, file_mpp = read_image(path)
        arr = ArrayImage(rgb)
        return _Image(arr.width, arr.height, mpp if mpp is not None else file_mpp, arr.read)
    slide = Slide(path, mpp)
    mpp_ = slide.mpp
    if mpp_ is None and path.suffix.lower() in (".tif", ".tiff"):  # resolution tags tiffslide does not read
        from qpbridge.images import _tiff_mpp

        mpp_ = _tiff_mpp(path)
    return _Image(slide.width, slide.height, mpp_, slide.read, getattr(slide, "close", None))


@dataclass
class Source:
    """One image (or slide) and its annotations."""

    name: str                     # unique in the dataset; the tile names start with it (the file name without
    #                               extension, as QuPath's TileExporter writes it)
    path: Path
    objects: list[AnnotatedObject]
    annotations: str | None = None  # where the objects came from (a file, or "<project>#<entry>")
    mpp: float | None = None      # full-resolution µm/px, overriding the file's


@dataclass
class ExportOptions:
    out: Path
    fmt: str = "semantic"
    tile_mpp: float | None = None          # µm/px of the tiles; None: full resolution
    size: int = 256
    overlap: int = 0
    classes: list[str] | None = None       # label order 1..n; None: every class found, sorted by name
    default_class: str = "Nucleus"         # the class of unclassified objects
    val_fraction: float = DEFAULT_VAL_FRACTION
    seed: int = DEFAULT_SEED
    all_tiles: bool = False                # also tiles without any object
    licence: str | None = None
    image_ext: str = ".png"


@dataclass
class ExportResult:
    tiles: int = 0
    objects: int = 0
    per_source: dict[str, int] = field(default_factory=dict)
    split: dict[str, str] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)


def _class_table(sources: list[Source], opts: ExportOptions) -> list[dict[str, Any]]:
    found: dict[str, tuple[int, int, int] | None] = {}
    for s in sources:
        for o in s.objects:
            name = o.class_name or opts.default_class
            if found.get(name) is None:
                found[name] = o.color
    names = list(opts.classes) if opts.classes else sorted(found)
    if len(set(names)) != len(names):
        raise BadRequestError(f"--classes names a class twice: {', '.join(names)}")
    unknown = sorted(set(found) - set(names))
    if unknown:
        where = [f"{s.name} ({s.annotations})" for s in sources
                 if any((o.class_name or opts.default_class) in unknown for o in s.objects)]
        raise BadRequestError(f"unknown class{'es' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in "
                              f"{'; '.join(where[:3])}: not in --classes ({', '.join(names)}); add "
                              f"{'them' if len(unknown) > 1 else 'it'} to --classes (label order) or fix the "
                              "annotations")
    if len(names) > 255:
        raise BadRequestError(f"{len(names)} classes do not fit an 8-bit mask (at most 255)")
    return [{"name": n, "label": i + 1, "color": list(found.get(n) or _PALETTE[i % len(_PALETTE)])}
            for i, n in enumerate(names)]


def _tile_grid(width: int, height: int, downsample: float, size: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tile regions (x, y, w, h) in full-resolution pixels; tiles at the right and bottom edges are smaller, as
    QuPath's TileExporter keeps them."""
    full = max(1, round(size * downsample))
    step = max(1, round((size - overlap) * downsample))
    out = []
    for y in range(0, height, step):
        for x in range(0, width, step):
            out.append((x, y, min(full, width - x), min(full, height - y)))
            if x + full >= width:
                break
        if y + full >= height:
            break
    return out


def _clip(geom: BaseGeometry, margin: BaseGeometry) -> BaseGeometry:
    """The object cut to the tile (plus a margin): a tissue outline of thousands of vertices is painted from the
    few inside the tile."""
    return geom if margin.contains(geom) else geom.intersection(margin)


def _polygons(geom: BaseGeometry) -> list[BaseGeometry]:
    """The polygons of a geometry, however nested (a cut may give a collection of polygons and lines)."""
    if geom.is_empty:
        return []
    if geom.geom_type == "Polygon":
        return [geom]
    return [p for g in getattr(geom, "geoms", []) for p in _polygons(g)]


def paint_geometry(mask: np.ndarray, geom: BaseGeometry, x: float, y: float, d: float, value: int) -> None:
    """Paint ``geom`` (full-resolution pixels) into ``mask``, the tile whose corner is (x, y) at downsample d: a
    pixel is painted when its centre lies inside the geometry (holes excluded), as QuPath's labelled servers do,
    so a 10 x 10 px square paints 100 pixels and two polygons sharing an edge never paint the same pixel."""
    h, w = mask.shape[:2]
    for p in _polygons(geom):
        # Pixel centres at integers: the outline in tile pixels, less half a pixel.
        rings = [(np.asarray(r.coords, np.float64)[:, :2] - (x, y)) / d - 0.5 for r in (p.exterior, *p.interiors)]
        box = _scanline(rings, h, w)
        if box is not None:
            r0, c0, inside = box
            region = mask[r0:r0 + inside.shape[0], c0:c0 + inside.shape[1]]
            region[inside] = value


def _scanline(rings: list[np.ndarray], h: int, w: int) -> tuple[int, int, np.ndarray] | None:
    """Even-odd scanline fill of closed rings (pixel centres at integers) clipped to h x w: (row, col, mask) of
    the covered box, or None. A centre exactly on a left or top edge is inside, on a right or bottom edge
    outside, so shared edges are painted once. Linear in rows x edges, unlike point-in-polygon per pixel."""
    seg = np.concatenate([np.stack([r[:-1], r[1:]], axis=1) for r in rings if len(r) >= 2])
    x0, y0, x1, y1 = seg[:, 0, 0], seg[:, 0, 1], seg[:, 1, 0], seg[:, 1, 1]
    keep = y0 != y1  # horizontal edges cross no scanline
    x0, y0, x1, y1 = x0[keep], y0[keep], x1[keep], y1[keep]
    if x0.size == 0:
        return None
    ylo, yhi = np.minimum(y0, y1), np.maximum(y0, y1)
    r0, r1 = max(0, math.ceil(ylo.min())), min(h, math.ceil(yhi.max()))  # rows r with ylo <= r < yhi
    c0 = max(0, math.ceil(min(x0.min(), x1.min())))
    c1 = min(w, math.ceil(max(x0.max(), x1.max())))
    if r1 <= r0 or c1 <= c0:
        return None
    slope = (x1 - x0) / (y1 - y0)
    out = np.zeros((r1 - r0, c1 - c0), bool)
    step = max(1, 2_000_000 // x0.size)  # rows per chunk: bounded memory for long outlines
    for a in range(r0, r1, step):
        rows = np.arange(a, min(r1, a + step), dtype=np.float64)[:, None]
        active = (ylo <= rows) & (rows < yhi)
        xs = np.where(active, x0 + (rows - y0) * slope, np.inf)
        xs.sort(axis=1)
        if xs.shape[1] % 2:
            xs = np.concatenate([xs, np.full((xs.shape[0], 1), np.inf)], axis=1)
        starts = np.clip(np.ceil(xs[:, 0::2]) - c0, 0, c1 - c0).astype(np.int64)
        ends = np.clip(np.ceil(xs[:, 1::2]) - c0, 0, c1 - c0).astype(np.int64)
        diff = np.zeros((xs.shape[0], c1 - c0 + 1), np.int32)
        idx = np.broadcast_to(np.arange(xs.shape[0])[:, None], starts.shape)
        np.add.at(diff, (idx, starts), 1)
        np.add.at(diff, (idx, ends), -1)
        out[a - r0:a - r0 + xs.shape[0]] = np.cumsum(diff[:, :-1], axis=1) > 0
    return r0, c0, out


def _write_png(path: Path, arr: np.ndarray, palette: list[list[int]] | None = None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if palette is not None:
        arr8 = np.ascontiguousarray(arr, dtype=np.uint8)
        img = Image.frombytes("P", (arr8.shape[1], arr8.shape[0]), arr8.tobytes())
        flat = [0, 0, 0] + [c for rgb in palette for c in rgb]
        img.putpalette(flat + [0] * (768 - len(flat)))
        img.save(path)
    elif arr.dtype == np.uint16:
        import cv2

        if not cv2.imwrite(str(path), arr):  # a 16-bit grey PNG
            raise OSError(f"cannot write {path}")
    else:
        Image.fromarray(arr).save(path)


def _coco_polygons(geom: BaseGeometry, x: int, y: int, d: float) -> list[list[float]]:
    out = []
    for p in _polygons(geom):
        coords = (np.asarray(p.exterior.coords)[:-1, :2] - (x, y)) / d
        if len(coords) >= 3:
            out.append([round(float(v), 2) for v in coords.ravel()])
    return out


def _check_inside(src: Source, width: int, height: int) -> None:
    from shapely.geometry import box

    frame = box(0, 0, width, height)
    outside = [o for o in src.objects if not o.geometry.intersects(frame)]
    if outside:
        b = outside[0].geometry.bounds
        raise BadRequestError(
            f"{src.name}: {len(outside)} of {len(src.objects)} annotations lie outside the image ({width} x "
            f"{height} px), the first at x {b[0]:.0f}..{b[2]:.0f}, y {b[1]:.0f}..{b[3]:.0f}: are they from another "
            "image, or in other units than full-resolution pixels?")


def _existing(out: Path, mode: str, fmt: str, tile_mpp: float | None, size: int,
              overlap: int) -> dict[str, Any] | None:
    """The folder's dataset.json when exports are being added to it; refuses a folder of another kind."""
    import json

    path = out / DATASET_JSON
    if not path.is_file():
        return None
    info = json.loads(path.read_text(encoding="utf-8"))
    old_mpp = info.get("mpp")
    if tile_mpp is None:  # full resolution, as before?
        same_mpp = all(abs(float(t.get("downsample", 1)) - 1) < 1e-9 for t in info.get("tiles", []))
    else:
        same_mpp = old_mpp is not None and abs(old_mpp - tile_mpp) < 1e-6
    if info.get("mode") != mode or info.get("format") != fmt or not same_mpp:
        raise BadRequestError(f"{out} already holds a {info.get('format')} dataset at {old_mpp} µm/px; export "
                              f"{fmt} tiles at {tile_mpp} µm/px into another folder (-o)")
    if (info.get("tile_size"), info.get("overlap")) != (size, overlap):
        raise BadRequestError(f"{out} holds tiles of {info.get('tile_size')} px (overlap {info.get('overlap')}); "
                              f"export tiles of {size} px (overlap {overlap}) into another folder (-o)")
    return info


@dataclass
class _TileBox:
    """One tile being written: its name, full-resolution region, downsample and size in tile pixels."""

    base: str
    x: int
    y: int
    w: int
    h: int
    d: float
    ow: int
    oh: int

    @property
    def box(self) -> BaseGeometry:
        import shapely

        return shapely.box(self.x, self.y, self.x + self.w, self.y + self.h)

    def to_tile(self, px: float, py: float) -> tuple[float, float]:
        return (px - self.x) / self.d, (py - self.y) / self.d


def _export_source(src: Source, img: _Image, opts: ExportOptions, mode: str, label_of: dict[str, int],
                   palette: list[list[int]]) -> tuple[dict[str, Any], list[dict[str, Any]],
                                                      list[tuple[dict[str, Any], list[dict[str, Any]]]]]:
    """Write the tiles of one image: (its ``sources`` entry, its ``tiles`` entries, its COCO images)."""
    import shapely

    if opts.tile_mpp is not None and img.mpp is None:
        raise MissingPixelSizeError(
            f"{src.path.name} records no pixel size (µm/px): pass --mpp (its full-resolution pixel size, e.g. "
            "0.25 for MoNuSeg's 40x images) to export tiles at --tile-mpp")
    d = 1.0 if opts.tile_mpp is None or img.mpp is None else opts.tile_mpp / img.mpp
    if d < 1:
        log.warning("%s is coarser (%.3g µm/px) than --tile-mpp %.3g: exporting at full resolution", src.name,
                    img.mpp, opts.tile_mpp)
        d = 1.0
    _check_inside(src, img.width, img.height)
    objs = sorted(src.objects, key=lambda o: -o.geometry.area)  # small objects on top of large ones
    labels = [label_of[o.class_name or opts.default_class] for o in objs]
    tree = shapely.STRtree([o.geometry for o in objs]) if objs else None
    out = opts.out
    tiles: list[dict[str, Any]] = []
    coco: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for (x, y, w, h) in _tile_grid(img.width, img.height, d, opts.size, opts.overlap):
        t = _TileBox(tile_name(src.name, x, y, w, h, d), x, y, w, h, d, max(1, round(w / d)), max(1, round(h / d)))
        tbox = t.box
        hits = sorted(int(i) for i in tree.query(tbox, predicate="intersects")) if tree is not None else []
        if not hits and not opts.all_tiles:
            continue
        # Each object cut to the tile (plus a margin): a long tissue outline is painted from its few vertices there.
        margin = tbox.buffer(2 * d, join_style="mitre")
        parts = {i: _clip(objs[i].geometry, margin) for i in hits}
        entry: dict[str, Any] = {"image": f"images/{t.base}{opts.image_ext}", "mask": f"masks/{t.base}.png",
                                 "source": src.name, "x": x, "y": y, "w": w, "h": h, "downsample": round(d, 6),
                                 "mpp": None if img.mpp is None else img.mpp * d, "objects": len(hits)}
        if mode == "semantic":
            mask = np.zeros((t.oh, t.ow), np.uint8)
            for i in hits:
                paint_geometry(mask, parts[i], x, y, d, labels[i])
            _write_png(out / entry["mask"], mask, palette)
        else:
            if len(hits) > 65535:
                raise BadRequestError(f"{t.base}: more than 65535 objects in one tile; use a smaller --size")
            inst = np.zeros((t.oh, t.ow), np.uint16)
            types = np.zeros((t.oh, t.ow), np.uint8)
            for k, i in enumerate(hits, start=1):
                paint_geometry(inst, parts[i], x, y, d, k)
                paint_geometry(types, parts[i], x, y, d, labels[i])
            # Objects hidden by others or thinner than a pixel at this resolution leave no label: they are left
            # out of the points and COCO files too, so that every listed object is in the mask.
            present = set(np.unique(inst).tolist())
            kept = [i for k, i in enumerate(hits, start=1) if k in present]
            entry["objects"] = len(kept)
            entry["types"] = f"types/{t.base}.png"
            _write_png(out / entry["mask"], inst)
            _write_png(out / entry["types"], types, palette)
            if opts.fmt == "points":
                entry["points"] = f"points/{t.base}.json"
                _write_json(out / entry["points"], _points([objs[i].geometry for i in kept], [labels[i] for i in kept],
                                                           [objs[i].class_name or opts.default_class for i in kept], t))
            if opts.fmt == "coco":
                anns = _coco_annotations([objs[i].geometry for i in kept], [labels[i] for i in kept], t)
                coco.append(({"file_name": t.base + opts.image_ext, "width": t.ow, "height": t.oh,
                              "source": src.name}, anns))
        _write_rgb(out / entry["image"], img.read(x, y, x + w, y + h, t.ow, t.oh))
        tiles.append(entry)
    info = {"name": src.name, "path": str(src.path.resolve()), "annotations": src.annotations,
            "width": img.width, "height": img.height, "mpp": img.mpp, "downsample": round(d, 6),
            "tiles": len(tiles), "objects": len(src.objects)}
    return info, tiles, coco


def _points(geoms: list[BaseGeometry], labels: list[int], names: list[str], t: _TileBox) -> list[dict[str, Any]]:
    """Centroids in tile pixels of the objects whose (whole) centroid lies in the tile."""
    pts = []
    for geom, label, name in zip(geoms, labels, names, strict=True):
        c = geom.centroid
        u, v = t.to_tile(c.x, c.y)
        if 0 <= u < t.ow and 0 <= v < t.oh:
            pts.append({"x": round(u, 3), "y": round(v, 3), "label": label, "class": name})
    return pts


def _coco_annotations(geoms: list[BaseGeometry], labels: list[int], t: _TileBox) -> list[dict[str, Any]]:
    """COCO annotations (no ids yet) of the objects cut to the tile: polygons, box and area in tile pixels."""
    anns = []
    for geom, label in zip(geoms, labels, strict=True):
        part = geom.intersection(t.box)
        polys = _coco_polygons(part, t.x, t.y, t.d)
        if not polys:
            continue
        bx0, by0, bx1, by1 = part.bounds
        (u0, v0), (u1, v1) = t.to_tile(bx0, by0), t.to_tile(bx1, by1)
        anns.append({"category_id": label, "segmentation": polys, "iscrowd": 0,
                     "area": round(part.area / (t.d * t.d), 3),
                     "bbox": [round(u0, 3), round(v0, 3), round(u1 - u0, 3), round(v1 - v0, 3)]})
    return anns


def export_tiles(sources: list[Source], opts: ExportOptions,
                 on_source: Callable[[str, int], None] | None = None) -> ExportResult:
    """Export tiles of every source into ``opts.out``; adds to a folder that holds an export of the same kind
    (tiles of the sources exported again are replaced) and re-splits all its sources."""

    mode = mode_of(opts.fmt)
    if opts.size < 8:
        raise BadRequestError(f"--size must be at least 8 px, got {opts.size}")
    if not 0 <= opts.overlap < opts.size:
        raise BadRequestError(f"--overlap must be in [0, size), got {opts.overlap}")
    if not sources:
        raise BadRequestError("no image to export")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise BadRequestError(f"two images are named {', '.join(dup)} (without extension): tiles are named after "
                              "the image, as QuPath names them; rename one")
    classes = _class_table(sources, opts)
    label_of = {c["name"]: c["label"] for c in classes}
    palette = [c["color"] for c in classes]
    out = opts.out
    existing = _existing(out, mode, opts.fmt, opts.tile_mpp, opts.size, opts.overlap)
    if existing is not None and [c["name"] for c in existing.get("classes", [])] != [c["name"] for c in classes]:
        raise BadRequestError(f"{out} holds tiles with the classes {[c['name'] for c in existing['classes']]}, not "
                              f"{[c['name'] for c in classes]}: give --classes in that order, or another folder")
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    result = ExportResult()
    tiles: list[dict[str, Any]] = []
    infos: list[dict[str, Any]] = []
    coco: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for src in sources:
        img = open_image(src.path, src.mpp)
        try:
            info, new_tiles, new_coco = _export_source(src, img, opts, mode, label_of, palette)
        finally:
            img.close()  # a slide's file descriptor
        tiles += new_tiles
        coco += new_coco
        infos.append(info)
        result.per_source[src.name] = len(new_tiles)
        result.tiles += len(new_tiles)
        result.objects += sum(t["objects"] for t in new_tiles)
        if on_source is not None:
            on_source(src.name, len(new_tiles))

    # Merge with an earlier export into the same folder: the sources exported now replace their old entries.
    exported = set(names)
    if existing is not None:
        now = {t["image"] for t in tiles}
        for t in existing.get("tiles", []):
            if t["source"] in exported and t["image"] not in now:  # a tile of the earlier grid: remove its files
                for key in ("image", "mask", "types", "points"):
                    if t.get(key):
                        (out / t[key]).unlink(missing_ok=True)
        tiles = [t for t in existing.get("tiles", []) if t["source"] not in exported] + tiles
        infos = [s for s in existing.get("sources", []) if s["name"] not in exported] + infos
    split = split_sources([s["name"] for s in infos], opts.val_fraction, opts.seed)
    for t in tiles:
        t["split"] = split[t["source"]]
    for s in infos:
        s["split"] = split[s["name"]]
    tile_mpps = {t["mpp"] for t in tiles}
    dataset = {
        "version": 1, "created_by": f"qpbridge export-tiles {__version__}", "format": opts.fmt, "mode": mode,
        # µm/px of the tiles: the one asked for, else (full resolution) the sources' when they all have the same
        "mpp": opts.tile_mpp if opts.tile_mpp is not None else
        (tile_mpps.pop() if len(tile_mpps) == 1 else None),
        "tile_size": opts.size, "overlap": opts.overlap, "background": 0,
        "classes": classes, "licence": opts.licence if opts.licence is not None else
        (existing or {}).get("licence"),
        "split": {"method": "sha256-rank", "val_fraction": opts.val_fraction, "seed": opts.seed,
                  "train": sorted(n for n, v in split.items() if v == "train"),
                  "val": sorted(n for n, v in split.items() if v == "val")},
        "sources": infos, "tiles": tiles,
    }
    if opts.fmt == "coco":
        _write_coco(out, coco, classes, split, existing is not None, exported)
    _write_json(out / LABELS_JSON, {
        "mode": mode, "labels": {c["name"]: c["label"] for c in classes} if mode == "semantic" else {},
        "background": 0, "instance_objects": "annotations" if mode == "instances" else None,
        "mask_bits": 8 if mode == "semantic" else 16, "tile_size": opts.size, "overlap": opts.overlap,
        "pixel_size_um": dataset["mpp"], "images": "images", "masks": "masks"})
    _write_json(out / DATASET_JSON, dataset)
    result.split = split
    result.dataset = dataset
    return result


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(rgb).save(path, quality=95)
    else:
        Image.fromarray(rgb).save(path)


def _write_json(path: Path, data: Any) -> None:
    from qpbridge.files import write_json_atomic

    write_json_atomic(path, data)


def _write_coco(out: Path, coco: list[tuple[dict[str, Any], list[dict[str, Any]]]], classes: list[dict[str, Any]],
                split: dict[str, str], merge: bool, exported: set[str]) -> None:
    """coco/train.json and coco/val.json; images of sources exported before (into this folder) are kept."""
    import json

    old: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    if merge:
        for which in ("train", "val"):
            path = out / "coco" / f"{which}.json"
            if not path.is_file():
                continue
            data = json.loads(path.read_text(encoding="utf-8"))
            by_image: dict[int, list[dict[str, Any]]] = {}
            for a in data.get("annotations", []):
                by_image.setdefault(a["image_id"], []).append(a)
            old += [(im, by_image.get(im["id"], [])) for im in data.get("images", [])
                    if im.get("source") not in exported]
    cats = [{"id": c["label"], "name": c["name"], "supercategory": "object"} for c in classes]
    for which in ("train", "val"):
        images: list[dict[str, Any]] = []
        anns: list[dict[str, Any]] = []
        for im, objs in old + coco:
            if split.get(im.get("source", "")) != which:
                continue
            image_id = len(images) + 1
            images.append({**{k: v for k, v in im.items() if k != "id"}, "id": image_id})
            for a in objs:
                anns.append({**{k: v for k, v in a.items() if k not in ("id", "image_id")}, "id": len(anns) + 1,
                             "image_id": image_id})
        _write_json(out / "coco" / f"{which}.json", {"images": images, "annotations": anns, "categories": cats,
                                                     "info": {"description": "qpbridge export-tiles"}})
