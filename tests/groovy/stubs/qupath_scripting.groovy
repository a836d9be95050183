package qupath.lib.scripting

import qupath.lib.images.ImageData
import qupath.lib.objects.PathObject
import qupath.lib.projects.Project
import qupath.lib.projects.ProjectImageEntry

class QP {
    static ImageData getCurrentImageData() { null }
    static Project getProject() { null }
    static ProjectImageEntry getProjectEntry() { null }
    static Collection<PathObject> getSelectedObjects() { null }
}
