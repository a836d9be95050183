package qupath.lib.objects.classes

class PathClass {
    String toString() { '' }
}
