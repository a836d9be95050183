"""The data commands of the CLI: ``export-tiles`` (training tiles) and ``evaluate`` (metrics of a model)."""

from __future__ import annotations

import argparse
from pathlib import Path

from qpbridge.errors import QPBridgeError


def cmd_export_tiles(args: argparse.Namespace) -> int:
    from qpbridge.dataset import FORMATS
    from qpbridge.tile_export import ExportOptions, export_tiles
    from qpbridge.tile_sources import is_project, project_sources, sources_from_paths

    inputs = [Path(p) for p in args.inputs]
    ann = Path(args.annotations) if args.annotations else None
    if ann is not None and not ann.exists():
        raise QPBridgeError(f"--annotations {ann} does not exist")
    if any(is_project(p) for p in inputs):
        if len(inputs) != 1:
            raise QPBridgeError("give one QuPath project at a time (its images are all exported)")
        if ann is not None and not ann.is_dir():
            raise QPBridgeError("with a project, --annotations is a folder of sidecar files (or leave it out: "
                                "annotations are read through paquo, or from sidecars beside the images)")
        sources = project_sources(inputs[0], images=args.images, sidecar_dir=ann,
                                  use_paquo=False if args.sidecars else (True if args.paquo else None),
                                  mpp=args.mpp, objects=args.objects, out=lambda s: print(s, flush=True))
    else:
        if args.images:
            raise QPBridgeError("--images selects images of a QuPath project; give the image files instead")
        sources = sources_from_paths(inputs, ann, mpp=args.mpp, objects=args.objects, nuclei=args.nuclei)
    if args.format not in FORMATS:  # argparse checks too; kept for callers of main()
        raise QPBridgeError(f"unknown --format {args.format}")
    opts = ExportOptions(out=Path(args.output), fmt=args.format, tile_mpp=args.tile_mpp, size=args.size,
                         overlap=args.overlap, classes=args.classes or None, default_class=args.default_class,
                         val_fraction=args.val_fraction, seed=args.seed, all_tiles=args.all_tiles,
                         licence=args.licence, image_ext=".jpg" if args.jpeg else ".png")
    res = export_tiles(sources, opts, on_source=lambda name, n: print(f"  {name}: {n} tiles", flush=True))
    ds = res.dataset
    print(f"{res.tiles} tiles from {len(sources)} image(s) -> {opts.out} ({opts.fmt}, "
          f"{'full resolution' if opts.tile_mpp is None else f'{opts.tile_mpp:g} µm/px'}, classes: "
          f"{', '.join(c['name'] for c in ds['classes'])})")
    print(f"split by image: train {', '.join(ds['split']['train']) or '-'}; val {', '.join(ds['split']['val']) or '-'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from qpbridge.evaluate import EvalOptions, evaluate, format_table
    from qpbridge.files import write_json_atomic

    opts = EvalOptions(model=args.model, data=Path(args.data), mpp=args.mpp, radius_um=args.radius_um,
                       models_dir=Path(args.models_dir) if args.models_dir else None, device=args.device,
                       match_iou=args.match_iou, images=args.images)
    report = evaluate(opts, out=lambda s: print(s, flush=True))
    print(format_table(report))
    if args.output:
        write_json_atomic(Path(args.output), report)
        print(f"metrics -> {args.output}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from qpbridge.dataset import DEFAULT_SEED, DEFAULT_VAL_FRACTION, FORMATS
    from qpbridge.tile_sources import OBJECT_KINDS

    e = sub.add_parser("export-tiles", help="training tiles and masks from annotated images, slides or a QuPath "
                       "project (the layout of QuPath's 'Export training tiles' script)")
    e.add_argument("inputs", nargs="+", metavar="IMAGE|SLIDE|FOLDER|PROJECT",
                   help="images or slides; folders of images with their annotation files; or one QuPath project")
    e.add_argument("--annotations", metavar="FILE|DIR",
                   help="QuPath GeoJSON or ImageScope XML of the image, or a folder of such files named after the "
                        "images (default: beside each image)")
    e.add_argument("-o", "--output", required=True, metavar="DIR", help="dataset folder (created; an earlier "
                   "export of the same kind there is added to)")
    e.add_argument("--format", default="semantic", choices=FORMATS,
                   help="semantic: class masks; instance: instance label images (+ types); coco: + COCO JSON per "
                        "split; points: + centroid lists (default: %(default)s)")
    e.add_argument("--mpp", type=float, help="full-resolution pixel size in µm/px of images that record none "
                   "(MoNuSeg: 0.25)")
    e.add_argument("--tile-mpp", type=float, help="µm/px of the tiles, e.g. the model's (default: full resolution)")
    e.add_argument("--size", type=int, default=256, help="tile size in tile pixels (default: %(default)s)")
    e.add_argument("--overlap", type=int, default=0, help="overlap in tile pixels (default: %(default)s)")
    e.add_argument("--classes", nargs="+", metavar="NAME",
                   help="class names in label order 1, 2, ... (default: every class found, sorted by name); "
                        "an object of another class is an error")
    e.add_argument("--default-class", default="Nucleus",
                   help="class of unclassified objects, e.g. MoNuSeg's nuclei (default: %(default)s)")
    e.add_argument("--objects", default="all", choices=OBJECT_KINDS,
                   help="which QuPath objects to export (default: %(default)s)")
    e.add_argument("--nuclei", action="store_true", help="cells: export the nucleus outline (QuPath GeoJSON)")
    e.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="fraction of the images held out for validation (default: %(default)s)")
    e.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the split (default: %(default)s)")
    e.add_argument("--all-tiles", action="store_true", help="also tiles without any object")
    e.add_argument("--licence", help="licence of the data, recorded in dataset.json (e.g. 'CC BY-NC-SA 4.0')")
    e.add_argument("--jpeg", action="store_true", help="write the RGB tiles as JPEG (masks stay PNG)")
    e.add_argument("--images", metavar="GLOB", help="project: only images whose name matches")
    src = e.add_mutually_exclusive_group()
    src.add_argument("--sidecars", action="store_true", help="project: read sidecar GeoJSON files, not paquo")
    src.add_argument("--paquo", action="store_true", help="project: read through paquo only (fail if it cannot "
                     "start)")
    e.set_defaults(func=cmd_export_tiles)

    v = sub.add_parser("evaluate", help="run a model on annotated images and compute the source projects' metrics")
    v.add_argument("--model", required=True, help="model card name, or the path of a model folder")
    v.add_argument("--data", required=True, metavar="DIR", help="images with ImageScope XML, QuPath GeoJSON or "
                   "label masks (masks/<stem>.png), or a dataset folder from export-tiles (its val split)")
    v.add_argument("--mpp", type=float, help="full-resolution pixel size in µm/px of images that record none")
    v.add_argument("-o", "--output", metavar="metrics.json", help="write the metrics as JSON")
    v.add_argument("--radius-um", type=float, default=3.0,
                   help="centroid matching distance in µm (default: %(default)s)")
    v.add_argument("--match-iou", type=float, default=0.5, help="IoU for a PQ match (default: %(default)s)")
    v.add_argument("--images", metavar="GLOB", help="only images whose file name matches")
    v.add_argument("--models-dir", help="extra model cards")
    v.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    v.set_defaults(func=cmd_evaluate)
