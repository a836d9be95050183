package qupath.lib.roi

import org.locationtech.jts.geom.Geometry
import qupath.lib.regions.ImagePlane
import qupath.lib.roi.interfaces.ROI

class GeometryTools {
    static ROI geometryToROI(Geometry geometry, ImagePlane plane) { null }
    static Geometry homogenizeGeometryCollection(Geometry geometry) { geometry }
}
