package qupath.lib.roi.interfaces

import org.locationtech.jts.geom.Geometry
import qupath.lib.regions.ImagePlane

interface ROI {
    double getBoundsX()
    double getBoundsY()
    double getBoundsWidth()
    double getBoundsHeight()
    double getCentroidX()
    double getCentroidY()
    int getZ()
    int getT()
    ImagePlane getImagePlane()
    Geometry getGeometry()
    boolean contains(double x, double y)
    boolean isArea()
    double getScaledArea(double pixelWidth, double pixelHeight)
    double getScaledLength(double pixelWidth, double pixelHeight)
    ROI updatePlane(ImagePlane plane)
}
