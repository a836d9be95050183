package qupath.lib.objects

import qupath.lib.objects.classes.PathClass
import qupath.lib.roi.interfaces.ROI

abstract class PathObject {
    abstract ROI getROI()
    abstract PathClass getPathClass()
    Collection<PathObject> getChildObjects() { [] }
    boolean isRootObject() { false }
    boolean isAnnotation() { false }
    boolean isDetection() { false }
    boolean isCell() { false }
    boolean isTile() { false }
    boolean hasROI() { getROI() != null }
    Map<String, Number> getMeasurements() { [:] }
    void addChildObjects(Collection<? extends PathObject> children) {}
    void removeChildObjects(Collection<? extends PathObject> children) {}
}
