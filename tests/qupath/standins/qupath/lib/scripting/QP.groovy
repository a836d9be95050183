package qupath.lib.scripting

import qupath.lib.images.ImageData
import qupath.lib.images.servers.ImageServer
import qupath.lib.objects.PathObject
import qupath.lib.objects.hierarchy.PathObjectHierarchy
import qupath.lib.projects.Project
import qupath.lib.projects.ProjectImageEntry

import java.awt.image.BufferedImage

/**
 * Test stand-in for QuPath's qupath.lib.scripting.QP (qupath-core-processing, not in qupath-core): only the
 * static methods the qpbridge scripts call, with the signatures and behaviour of QuPath 0.5/0.6's source
 * (a per-thread "batch" project and image set by the script runner). Everything returned is a real QuPath object.
 */
class QP {
    private static final ThreadLocal<ImageData<BufferedImage>> BATCH_IMAGE = new ThreadLocal<>()
    private static final ThreadLocal<Project<BufferedImage>> BATCH_PROJECT = new ThreadLocal<>()

    static void setBatchProjectAndImage(Project<BufferedImage> project, ImageData<BufferedImage> imageData) {
        BATCH_PROJECT.set(project)
        BATCH_IMAGE.set(imageData)
    }

    static void resetBatchProjectAndImage() {
        BATCH_PROJECT.remove()
        BATCH_IMAGE.remove()
    }

    static ImageData<BufferedImage> getCurrentImageData() { BATCH_IMAGE.get() }

    static Project<BufferedImage> getProject() { BATCH_PROJECT.get() }

    static ProjectImageEntry<BufferedImage> getProjectEntry() {
        Project<BufferedImage> project = getProject()
        ImageData<BufferedImage> imageData = getCurrentImageData()
        if (project == null || imageData == null) return null
        project.getEntry(imageData)
    }

    static PathObjectHierarchy getCurrentHierarchy() {
        ImageData<?> imageData = getCurrentImageData()
        imageData == null ? null : imageData.getHierarchy()
    }

    static ImageServer<?> getCurrentServer() {
        ImageData<?> imageData = getCurrentImageData()
        imageData == null ? null : imageData.getServer()
    }

    static Collection<PathObject> getSelectedObjects() {
        PathObjectHierarchy hierarchy = getCurrentHierarchy()
        hierarchy == null ? null : hierarchy.getSelectionModel().getSelectedObjects()
    }

    static PathObject getSelectedObject() {
        PathObjectHierarchy hierarchy = getCurrentHierarchy()
        hierarchy == null ? null : hierarchy.getSelectionModel().getSelectedObject()
    }

    static Collection<PathObject> getAnnotationObjects() {
        PathObjectHierarchy hierarchy = getCurrentHierarchy()
        hierarchy == null ? null : hierarchy.getAnnotationObjects()
    }

    static Collection<PathObject> getDetectionObjects() {
        PathObjectHierarchy hierarchy = getCurrentHierarchy()
        hierarchy == null ? null : hierarchy.getDetectionObjects()
    }
}
