"""Command line: ``qpbridge serve | predict | annotate | annotate-project | translate | models | train |
install-qupath | doctor``.

``main(argv) -> int`` is the whole CLI (tested in process); errors of the package become one-line
messages and exit code 1, usage errors exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from qpbridge import PROTOCOL_VERSION, __version__
from qpbridge.errors import QPBridgeError

log = logging.getLogger("qpbridge")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# ---- commands -------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from qpbridge.devices import resolve_device
    from qpbridge.engine import Engine
    from qpbridge.protocol import Limits
    from qpbridge.server import Server

    device = resolve_device(args.device)
    engine = Engine(Path(args.models_dir) if args.models_dir else None, device=device,
                    model_roots=[Path(r) for r in args.model_root], compile_models=args.compile)
    limits = Limits(max_request_bytes=int(args.max_request_mb * (1 << 20)), max_tiles_per_request=args.max_tiles,
                    max_tile_pixels=args.max_tile_pixels, job_ttl_s=args.job_ttl, job_grace_s=args.job_grace,
                    max_client_requests=args.max_client_requests)
    cache = None
    if args.cache_dir:
        from qpbridge.server.cache import TileCache

        cache = TileCache(Path(args.cache_dir), int(args.cache_mb * (1 << 20)))
    server = Server(engine, args.bind, limits=limits, workers=args.workers, allow_remote=args.insecure,
                    slide_roots=[Path(r) for r in args.slide_root],
                    curve_secret=Path(args.curve_secret) if args.curve_secret else None,
                    curve_clients=Path(args.curve_clients) if args.curve_clients else None, cache=cache)

    def stop(signum: int, frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        server.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if device == "cpu":
        log.warning("running on the CPU: deep-learning models will be slow (no CUDA device in use)")
    from qpbridge import gc_policy

    gc_policy.relax()
    gc_policy.freeze_startup()
    server.serve_forever()
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from qpbridge.files import write_json_atomic
    from qpbridge.geometry import feature_collection
    from qpbridge.images import ArrayImage, read_image
    from qpbridge.protocol import ImageInfo

    path = Path(args.image)
    img, file_mpp = read_image(path)
    mpp = args.mpp if args.mpp is not None else file_mpp
    image = ImageInfo(name=path.name, mpp=mpp, width=img.shape[1], height=img.shape[0])
    source = ArrayImage(img)
    region = (0, 0, source.width, source.height)
    t0 = time.perf_counter()
    if args.server:
        from qpbridge.client import Client

        with Client(args.server, timeout_s=args.timeout) as client:
            sent: list[int] = []
            features = client.run_planned(args.model, image, region, source.read, encoding=args.encoding,
                                          on_progress=lambda r: sent.append(r["tiles_done"]))
        n_tiles = sent[-1] if sent else 0
    else:
        from qpbridge.annotate import annotate_image
        from qpbridge.cards import require_weights
        from qpbridge.devices import resolve_device
        from qpbridge.engine import Engine

        engine = Engine(Path(args.models_dir) if args.models_dir else None, device=resolve_device(args.device),
                        any_model_path=True)
        require_weights(engine.card(args.model).to_wire())
        features, stats = annotate_image(engine, args.model, img, mpp, name=path.name)
        n_tiles = stats.tiles
    out = Path(args.output)
    write_json_atomic(out, feature_collection(features))
    print(f"{len(features)} features from {n_tiles} tiles in {time.perf_counter() - t0:.2f} s -> {out}")
    return 0


class ProgressLine:
    """One self-updating progress line on stderr: tiles, percent, tiles/s, ETA."""

    def __init__(self, label: str, enabled: bool = True) -> None:
        self.label = label
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, p: Any) -> None:
        now = time.monotonic()
        final = p.tiles_done >= p.tiles_total
        if not self.enabled or (not final and now - self._last < (0.2 if self.tty else 5.0)):
            return
        self._last = now
        pct = 100.0 * p.tiles_done / p.tiles_total if p.tiles_total else 100.0
        eta = f"{p.eta_s:.0f} s" if p.eta_s is not None else "?"
        line = (f"{self.label}: {p.tiles_done}/{p.tiles_total} tiles ({pct:5.1f}%) "
                f"{p.tiles_per_s:.1f} tiles/s, ETA {eta}")
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


def cmd_annotate(args: argparse.Namespace) -> int:
    from qpbridge.annotate import annotate_slide
    from qpbridge.devices import resolve_device
    from qpbridge.engine import Engine
    from qpbridge.files import write_json_atomic
    from qpbridge.geometry import feature_collection
    from qpbridge.roi import read_roi
    from qpbridge.sidecars import sidecar_path

    if not args.output and args.sidecar is None:
        raise QPBridgeError("say where the results go: -o FILE.geojson, and/or --sidecar [DIR] (the file QuPath's "
                            "'Import qpbridge GeoJSON' script finds)")
    slide_path = Path(args.slide)
    if slide_path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        raise QPBridgeError(f"{slide_path.name} is a plain image, not a slide: use `qpbridge predict {args.slide} "
                            f"--model {args.model} -o {args.output or 'out.geojson'}` (it also takes TIFF images)")
    engine = Engine(Path(args.models_dir) if args.models_dir else None, device=resolve_device(args.device),
                    any_model_path=True)
    from qpbridge.cards import require_weights

    require_weights(engine.card(args.model).to_wire())  # before any work: tissue detection runs first
    roi = read_roi(Path(args.roi)) if args.roi else None
    result = annotate_slide(engine, slide_path, args.model, mpp=args.mpp, roi=roi,
                            tissue_filter=not args.no_tissue_filter, readers=args.readers,
                            on_progress=ProgressLine(slide_path.name, not args.quiet))
    outputs = [Path(args.output)] if args.output else []
    if args.sidecar is not None:
        outputs.append(sidecar_path(slide_path, args.sidecar or None))
    if outputs:
        write_json_atomic(outputs[0], feature_collection(result.features), *outputs[1:])
    out = ", ".join(str(p) for p in outputs)
    st = result.stats
    print(f"{len(result.features)} features -> {out}; {st.table()}")
    if args.overlay:
        from qpbridge.overlay import draw_overlay

        print(f"overlay -> {draw_overlay(result.slide, result.features, Path(args.overlay))}")
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    """An image through an image-translation model (IHC -> H&E), tiled with overlap and blended; writes an image."""
    import cv2

    from qpbridge.images import read_image
    from qpbridge.translation import translate_image

    path = Path(args.image)
    img, file_mpp = read_image(path)
    mpp = args.mpp if args.mpp is not None else file_mpp
    t0 = time.perf_counter()
    if args.server:
        from qpbridge.client import Client
        from qpbridge.protocol import ImageInfo, TileSpec

        with Client(args.server, timeout_s=args.timeout) as client:
            card = next((c for c in client.models() if c["name"] == args.model), None)
            if card is None:
                raise QPBridgeError(f"the server at {args.server} has no model '{args.model}' (qpbridge models "
                                    f"--server {args.server} lists them)")
            tile_size, card_mpp = int(card["tile_size"]), float(card["mpp"])

            def translate(tiles: Sequence[Any]) -> list[Any]:
                specs = [(TileSpec(0, 0, t.shape[1], t.shape[0]), t) for t in tiles]
                return client.translate(args.model, specs, ImageInfo(mpp=card_mpp), encoding="png")

            factor = mpp / card_mpp if mpp else 1.0
            out = translate_image(img, translate, tile_size, _overlap(args, tile_size, card.get("overlap", 0)),
                                  batch=args.batch, factor=factor)
    else:
        from qpbridge.devices import resolve_device
        from qpbridge.engine import Engine
        from qpbridge.translation import translator

        engine = Engine(Path(args.models_dir) if args.models_dir else None, device=resolve_device(args.device),
                        any_model_path=True)
        model_card = engine.card(args.model)
        fn = translator(engine, args.model)
        factor = mpp / model_card.mpp if mpp else 1.0
        out = translate_image(img, fn, model_card.tile_size,
                              _overlap(args, model_card.tile_size, model_card.overlap), batch=args.batch,
                              factor=factor)
    dest = Path(args.output)
    tmp = dest.with_name(f".{dest.name}.tmp{dest.suffix}")
    if not cv2.imwrite(str(tmp), cv2.cvtColor(out, cv2.COLOR_RGB2BGR)):
        raise QPBridgeError(f"could not write {dest} (is the suffix an image format, such as .png?)")
    os.replace(tmp, dest)
    print(f"{img.shape[1]}x{img.shape[0]} px translated by {args.model} in {time.perf_counter() - t0:.2f} s -> {dest}")
    return 0


def _overlap(args: argparse.Namespace, tile: int, card_overlap: int) -> int:
    overlap = args.overlap if args.overlap is not None else max(card_overlap, tile // 4)
    if not 0 <= overlap < tile:
        raise QPBridgeError(f"--overlap must be in [0, {tile}) (the model's tile size), got {overlap}")
    return int(overlap)


def cmd_models(args: argparse.Namespace) -> int:
    if args.server:
        from qpbridge.client import Client

        with Client(args.server, timeout_s=args.timeout) as client:
            cards = client.models()
    else:
        from qpbridge.engine import Engine

        engine = Engine(Path(args.models_dir) if args.models_dir else None)
        cards = [c.to_wire() for _, c in sorted(engine.cards.items())]
    if args.json:
        print(json.dumps(cards, indent=2, ensure_ascii=False))
        return 0
    for c in cards:
        classes = ", ".join(k["name"] for k in c["classes"] if k.get("emit", True))
        missing = "" if c.get("available", True) else "  (weights missing: see the card's README)"
        translator = c["task"] == "image-translation"  # no objects: previewed with `qpbridge translate`
        kind = "-" if translator else c["object_type"]
        makes = "(translate)" if translator else f"[{classes}]"
        stages = f"  pipeline: {' -> '.join(c['pipeline'])}" if c.get("pipeline") else ""
        print(f"{c['name']:<16} {c['task']:<22} {kind:<11} {c['tile_size']:>5} px @ {c['mpp']} µm/px"
              f"  {makes}{stages}{missing}")
    return 0


def cmd_install_qupath(args: argparse.Namespace) -> int:
    from qpbridge.install_qupath import JEROMQ_SHA256, JEROMQ_URL, install_qupath

    if args.jeromq_url and not args.jeromq_sha256:
        raise QPBridgeError("--jeromq-url needs --jeromq-sha256: a downloaded jar is installed only when its "
                            "checksum is known")
    url = None if args.no_download else (args.jeromq_url or JEROMQ_URL)
    return install_qupath(Path(args.user_dir) if args.user_dir else None,
                          Path(args.jeromq) if args.jeromq else None,
                          download_url=url, download_sha256=args.jeromq_sha256 or JEROMQ_SHA256)


def cmd_annotate_project(args: argparse.Namespace) -> int:
    from qpbridge.projects import BatchOptions, StopFlag, annotate_project, summary_table

    opts = BatchOptions(model=args.model, images=args.images, replace=not args.append, dry_run=args.dry_run,
                        server=args.server, mpp=args.mpp, roi_class=args.roi_class,
                        sidecars=True if args.sidecars else (False if args.paquo else None),
                        sidecar_dir=Path(args.sidecar_dir) if args.sidecar_dir else None,
                        models_dir=Path(args.models_dir) if args.models_dir else None, device=args.device,
                        tissue_filter=not args.no_tissue_filter, timeout=args.timeout, force=args.force)
    stop = StopFlag()

    def on_sigint(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nqpbridge: stopping after the current image (Ctrl-C again to stop at once; the current image "
              "is then left as it was)", file=sys.stderr, flush=True)

    def handle_sigint() -> None:
        signal.signal(signal.SIGINT, on_sigint)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = annotate_project(Path(args.project), opts, out=lambda s: print(s, flush=True),
                                  progress_factory=lambda label: ProgressLine(label, not args.quiet), stop=stop,
                                  after_setup=handle_sigint)
    finally:
        signal.signal(signal.SIGINT, previous)
    print()
    print(summary_table(result))
    for m in result.messages:
        print(m)
    if result.stopped:
        return 130
    return 1 if result.failed else 0


def cmd_keys(args: argparse.Namespace) -> int:
    from qpbridge.keys import new_key_pair

    public, secret = new_key_pair(Path(args.dir), args.name)
    print(f"public key (give it to clients, or put it in the server's --curve-clients folder): {public}")
    print(f"secret key (keep it private; serve --curve-secret, or a client's --client-key): {secret}")
    return 0


@contextlib.contextmanager
def _client_keys(args: argparse.Namespace) -> Iterator[None]:
    """--server-key/--client-key reach every Client this command makes (projects, doctor) through the
    environment variables the client reads; restored afterwards (main() also runs in process)."""
    saved = {env: os.environ.get(env) for env in ("QPBRIDGE_SERVER_KEY", "QPBRIDGE_CLIENT_KEY")}
    for value, env in ((getattr(args, "server_key", None), "QPBRIDGE_SERVER_KEY"),
                       (getattr(args, "client_key", None), "QPBRIDGE_CLIENT_KEY")):
        if value:
            os.environ[env] = value
    try:
        yield
    finally:
        for env, old in saved.items():
            if old is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = old


def _add_key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server-key", metavar="FILE|KEY", help="the server's CURVE public key (its .key file or "
                        "the 40-character key), for a server started with --curve-secret")
    parser.add_argument("--client-key", metavar="FILE", help="this client's .key_secret file, for a server with a "
                        "--curve-clients allow-list")


def cmd_train(args: argparse.Namespace) -> int:
    from qpbridge.training.train import TrainOptions, train

    opts = TrainOptions(card=Path(args.card), data=Path(args.data), out=Path(args.out), epochs=args.epochs,
                        device=args.device, resume=args.resume, batch_size=args.batch_size, seed=args.seed,
                        crop=args.crop, lr=args.lr, patience=args.patience, samples_per_epoch=args.samples_per_epoch,
                        max_minutes=args.max_minutes, progress=not args.quiet)
    result = train(opts)
    best = result["best"]
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in best.items() if k != "epoch")
    print(f"{result['epochs_run']} epochs ({result['stopped']}); best epoch {best['epoch']}: {metrics} -> {opts.out} "
          f"(serve it with --models-dir {opts.out.parent}, or name the folder as the model)")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from qpbridge.doctor import run_doctor

    return run_doctor(args.server, Path(args.user_dir) if args.user_dir else None)


# ---- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qpbridge", description="Bridge between QuPath and deep-learning models.")
    p.add_argument("--version", action="version", version=f"qpbridge {__version__} (protocol {PROTOCOL_VERSION})")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the ZeroMQ model server")
    s.add_argument("--bind", default="tcp://127.0.0.1:5555", help="ZeroMQ endpoint (default: %(default)s)")
    s.add_argument("--models-dir", help="folder of model cards (<name>/config.json) served beside the built-ins")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    s.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="threads running models (default: CPU count, at most 4)")
    s.add_argument("--job-ttl", type=float, default=600.0, help="seconds before an idle job expires")
    s.add_argument("--max-request-mb", type=float, default=512.0, help="largest request in MiB")
    s.add_argument("--max-tiles", type=int, default=256, help="most tiles in one request")
    s.add_argument("--max-tile-pixels", type=int, default=4096 * 4096, help="most pixels in one tile")
    s.add_argument("--model-root", action="append", default=[], metavar="DIR",
                   help="let clients name model folders (qpbridge or WSInfer-style) by path below DIR (repeatable)")
    s.add_argument("--slide-root", action="append", default=[], metavar="DIR",
                   help="let clients run slide jobs on files below DIR (repeatable; none by default)")
    s.add_argument("--curve-secret", metavar="FILE", help="serve with CURVE authentication and encryption, with "
                   "this key pair (NAME.key_secret from `qpbridge keys new`); required off loopback")
    s.add_argument("--curve-clients", metavar="DIR", help="only clients whose public key (*.key) is in DIR")
    s.add_argument("--insecure", "--allow-remote", dest="insecure", action="store_true",
                   help="bind a non-loopback address WITHOUT authentication (anyone reaching the port is served)")
    s.add_argument("--job-grace", type=float, default=60.0,
                   help="seconds without a request after which a running job is cancelled (default: 60)")
    s.add_argument("--max-client-requests", type=int, default=4,
                   help="model requests one client may have queued or running (default: 4)")
    s.add_argument("--cache-dir", metavar="DIR", help="keep tile results on disk so re-run jobs resume")
    s.add_argument("--cache-mb", type=float, default=2048.0, help="size of the tile cache in MiB (default: 2048)")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile every torch model (compiled in the background; eager serves meanwhile)")
    s.set_defaults(func=cmd_serve)

    pr = sub.add_parser("predict", help="run a model on a PNG/JPEG/TIFF image and write QuPath GeoJSON")
    pr.add_argument("image")
    pr.add_argument("--model", required=True, help="model card name, or the path of a model folder")
    pr.add_argument("-o", "--output", required=True, help="output .geojson")
    pr.add_argument("--server", help="server address (default: run in this process)")
    pr.add_argument("--mpp", type=float, help="full-resolution pixel size in µm/px (overrides the file's)")
    pr.add_argument("--encoding", default="raw", choices=["raw", "png", "jpeg"], help="tile encoding to a server")
    pr.add_argument("--models-dir", help="extra model cards (in-process runs)")
    pr.add_argument("--device", default="auto", help="in-process device: auto, cpu, cuda")
    pr.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a server reply")
    _add_key_options(pr)
    pr.set_defaults(func=cmd_predict)

    a = sub.add_parser("annotate", help="annotate a whole slide (SVS, NDPI, TIFF, OME-TIFF) and write QuPath GeoJSON")
    a.add_argument("slide")
    a.add_argument("--model", required=True, help="model card name, or the path of a model folder "
                   "(qpbridge card or WSInfer-style config.json + torchscript_model.pt)")
    a.add_argument("-o", "--output", help="output .geojson")
    a.add_argument("--sidecar", nargs="?", const="", metavar="DIR",
                   help="also write <slide file name>.qpbridge.geojson beside the slide (or in DIR), the file "
                        "QuPath's 'Import qpbridge GeoJSON' script finds for this image")
    a.add_argument("--roi", help="GeoJSON file with the region to annotate (full-resolution coordinates)")
    a.add_argument("--mpp", type=float, help="full-resolution pixel size in µm/px (overrides the slide's)")
    a.add_argument("--overlay", help="also write a PNG of the results over a thumbnail")
    a.add_argument("--no-tissue-filter", action="store_true", help="run on background tiles too")
    a.add_argument("--readers", type=int, default=None,
                   help="slide-reading threads (default: half the cores, 2 to 8)")
    a.add_argument("--models-dir", help="extra model cards")
    a.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a.add_argument("--quiet", action="store_true", help="no progress line")
    a.set_defaults(func=cmd_annotate)

    t = sub.add_parser("translate", help="translate an image's stain with an image-translation model (IHC -> H&E) "
                       "and write the image")
    t.add_argument("image")
    t.add_argument("--model", required=True, help="image-translation model card (e.g. ihc2he), or a model folder")
    t.add_argument("-o", "--output", required=True, help="output image (.png, .tif, .jpg)")
    t.add_argument("--server", help="server address (default: run in this process)")
    t.add_argument("--mpp", type=float, help="pixel size in µm/px (overrides the file's); the image is resampled "
                   "to the model's and back")
    t.add_argument("--overlap", type=int, help="tile overlap in model pixels (default: a quarter tile)")
    t.add_argument("--batch", type=int, default=8, help="tiles per request or forward pass (default: 8)")
    t.add_argument("--models-dir", help="extra model cards (in-process runs)")
    t.add_argument("--device", default="auto", help="in-process device: auto, cpu, cuda")
    t.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a server reply")
    t.set_defaults(func=cmd_translate)

    m = sub.add_parser("models", help="list model cards (local, or a server's)")
    m.add_argument("--server")
    m.add_argument("--models-dir")
    m.add_argument("--json", action="store_true")
    m.add_argument("--timeout", type=float, default=10.0)
    _add_key_options(m)
    m.set_defaults(func=cmd_models)

    ap = sub.add_parser("annotate-project", help="run a model over the images of a QuPath project (paquo, or "
                        "sidecar GeoJSON files without Java)")
    ap.add_argument("project", help="project folder or its project.qpproj")
    ap.add_argument("--model", required=True, help="model card name, or the path of a model folder")
    ap.add_argument("--images", metavar="GLOB", help="only images whose name matches (e.g. '*.svs')")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--replace", action="store_true", default=True,
                      help="remove earlier results of this model first (default; never touches other objects)")
    mode.add_argument("--append", action="store_true", help="keep earlier results of this model")
    ap.add_argument("--dry-run", action="store_true", help="list what would be done; run and write nothing")
    ap.add_argument("--server", help="server address (default: run in this process)")
    ap.add_argument("--mpp", type=float, help="full-resolution pixel size in µm/px for images that record none")
    ap.add_argument("--roi-class", metavar="NAME", help="run only inside annotations of this class; results go "
                    "below them (needs paquo)")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--sidecars", action="store_true", help="write <image>.qpbridge.geojson files instead of "
                     "the project (no Java needed; import them with QuPath's Import script)")
    out.add_argument("--paquo", action="store_true", help="write through paquo only (fail if it cannot start)")
    ap.add_argument("--sidecar-dir", metavar="DIR",
                    help="folder for the sidecar files (implies --sidecars; default: beside each image)")
    ap.add_argument("--force", action="store_true", help="write even when QuPath seems to have the project open")
    ap.add_argument("--no-tissue-filter", action="store_true", help="run on background tiles too")
    ap.add_argument("--models-dir", help="extra model cards (in-process runs)")
    ap.add_argument("--device", default="auto", help="in-process device: auto, cpu, cuda or cuda:N")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a server reply")
    _add_key_options(ap)
    ap.add_argument("--quiet", action="store_true", help="no tile progress lines")
    ap.set_defaults(func=cmd_annotate_project)

    q = sub.add_parser("install-qupath", help="install the QuPath scripts and the JeroMQ jar")
    q.add_argument("--user-dir", help="QuPath user directory (default: the newest ~/QuPath/v*)")
    q.add_argument("--jeromq", help="path to a jeromq-*.jar to copy into the extensions folder")
    q.add_argument("--jeromq-url", default=None,
                   help="where to download JeroMQ when no jar is given or found (default: the pinned "
                        "release on Maven Central)")
    q.add_argument("--jeromq-sha256", default=None, help="the SHA-256 the downloaded jar must have (with --jeromq-url)")
    q.add_argument("--no-download", action="store_true", help="never download JeroMQ; only report it missing")
    q.set_defaults(func=cmd_install_qupath)
    t = sub.add_parser("train", help="train a model from a card on a training-tile folder; writes a model folder "
                       "(card + weights + training.json) that serve and annotate use at once")
    t.add_argument("--card", required=True, help="the model card to train (config.json, or its folder)")
    t.add_argument("--data", required=True, help="training-tile folder (qpbridge export-tiles / the QuPath script; "
                   "cyclegan: a folder with trainA/ and trainB/ images)")
    t.add_argument("--out", required=True, help="model folder to write, e.g. models/my-nuclei")
    t.add_argument("--epochs", type=int, default=50, help="most epochs (default: %(default)s)")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (mixed precision on CUDA)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (after a crash or Ctrl-C)")
    t.add_argument("--batch-size", type=int, default=8, help="crops per step (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    t.add_argument("--crop", type=int, help="training crop size in px (default: the card's tile size)")
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    t.add_argument("--patience", type=int, default=10,
                   help="stop after this many epochs without a better validation metric (default: %(default)s)")
    t.add_argument("--samples-per-epoch", type=int,
                   help="crops per epoch (default: enough to cover the training tiles once)")
    t.add_argument("--max-minutes", type=float, help="stop after the epoch that passes this many minutes")
    t.add_argument("--quiet", action="store_true", help="no progress lines")
    t.set_defaults(func=cmd_train)

    dr = sub.add_parser("doctor", help="check the installation: packages, torch and CUDA, paquo and QuPath, "
                        "JeroMQ in QuPath, the server and model weights")
    dr.add_argument("--server", help="server address to check (default: tcp://127.0.0.1:5555, a warning if absent)")
    dr.add_argument("--user-dir", help="QuPath user directory (default: the newest ~/QuPath/v*)")
    _add_key_options(dr)
    dr.set_defaults(func=cmd_doctor)
    k = sub.add_parser("keys", help="CURVE key pairs for authenticated servers and clients")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kn = ksub.add_parser("new", help="write NAME.key (public) and NAME.key_secret (private) in DIR")
    kn.add_argument("dir", metavar="DIR")
    kn.add_argument("--name", default="server", help="file name stem (default: server)")
    kn.set_defaults(func=cmd_keys)
    from qpbridge.cli_data import add_parsers as add_data_parsers

    add_data_parsers(sub)  # export-tiles, evaluate
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        with _client_keys(args):
            rc = int(args.func(args))
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        # The reader of our output has gone (`qpbridge models --json | head`): not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except QPBridgeError as err:
        print(f"qpbridge: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qpbridge: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
