"""Run by the project tests in a subprocess (paquo starts one JVM per process):

    python paquo_tool.py make PROJECT_DIR SPEC.json   create a project (images, a pathologist's annotations,
                                                      optional rotated entries) through paquo
    python paquo_tool.py dump PROJECT_DIR              print every entry's objects as JSON (read in a new process)
    python paquo_tool.py read-geojson FILE             print how many objects QuPath's own reader gets from FILE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jpype
from shapely.geometry import box


def make(project_dir: Path, spec_file: Path) -> None:
    from paquo.classes import QuPathPathClass
    from paquo.images import QuPathImageType
    from paquo.projects import QuPathProject

    spec = json.loads(spec_file.read_text())
    rotated = jpype.JClass("qupath.lib.images.servers.RotatedImageServer")
    with QuPathProject(project_dir, mode="x") as qp:
        for item in spec["images"]:
            e = qp.add_image(item["path"], image_type=QuPathImageType.BRIGHTFIELD_H_E)
            for ann in item.get("annotations", []):
                a = e.hierarchy.add_annotation(box(*ann["box"]), path_class=QuPathPathClass(ann["class"]))
                a.name = ann.get("name")
            if item.get("rotate"):
                server = e.java_object.getServerBuilder().build()
                rot = rotated(server, getattr(rotated.Rotation, item["rotate"]))
                entry = qp.java_object.addImage(rot.getBuilder())
                entry.setImageName(jpype.JString(item["rotated_name"]))
                data = entry.readImageData()
                entry.saveImageData(data)


def dump(project_dir: Path) -> None:
    from paquo.projects import QuPathProject

    wkb = jpype.JClass("org.locationtech.jts.io.WKBWriter")()
    out = {}
    with QuPathProject(project_dir, mode="r") as qp:
        out["classes"] = {c.name: list(c.color.to_rgb()) for c in qp.path_classes}
        for e in qp.images:
            h = e.java_object.readHierarchy()
            objs = []
            for o in h.getObjects(None, None):
                if o.isRootObject():
                    continue
                pc = o.getPathClass()
                parent = o.getParent()
                objs.append({
                    "id": str(o.getID()), "type": "cell" if o.isCell() else ("detection" if o.isDetection() else
                                                                             "annotation"),
                    "class": None if pc is None else str(pc.toString()),
                    "name": None if o.getName() is None else str(o.getName()),
                    "model": None if o.getMetadata().get("qpbridge.model") is None else
                    str(o.getMetadata().get("qpbridge.model")),
                    "parent": None if parent is None or parent.isRootObject() else str(parent.getID()),
                    "measurements": {str(k): float(v) for k, v in dict(o.getMeasurements()).items()},
                    "wkb": bytes(wkb.write(o.getROI().getGeometry())).hex(),
                })
            out[str(e.image_name)] = objs
    print(json.dumps(out))


def read_geojson(path: Path) -> None:
    from paquo.projects import QuPathProject  # noqa: F401  (starts the JVM)

    objs = jpype.JClass("qupath.lib.io.PathIO").readObjects(jpype.JClass("java.io.File")(str(path)))
    print(json.dumps({"objects": len(objs), "classes": sorted({str(o.getPathClass()) for o in objs})}))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        make(Path(sys.argv[2]), Path(sys.argv[3]))
    elif cmd == "dump":
        dump(Path(sys.argv[2]))
    elif cmd == "read-geojson":
        read_geojson(Path(sys.argv[2]))
    else:
        raise SystemExit(f"unknown command {cmd}")
