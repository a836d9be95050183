package qupath.lib.projects

import java.nio.file.Path
import qupath.lib.objects.classes.PathClass

interface Project<T> {
    Path getPath()
    List<PathClass> getPathClasses()
}

interface ProjectImageEntry<T> {
    String getImageName()
}
