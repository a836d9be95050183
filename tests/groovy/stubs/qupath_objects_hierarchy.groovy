package qupath.lib.objects.hierarchy

import qupath.lib.objects.PathObject

class PathObjectHierarchy {
    PathObject getRootObject() { null }
    Collection<PathObject> getAnnotationObjects() { [] }
    void resolveHierarchy() {}
    void fireHierarchyChangedEvent(Object source, PathObject pathObject) {}
    void fireHierarchyChangedEvent(Object source) {}
}
