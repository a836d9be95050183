package qupath.lib.images

import qupath.lib.images.servers.ImageServer
import qupath.lib.objects.hierarchy.PathObjectHierarchy

class ImageData<T> {
    ImageServer<T> getServer() { null }
    PathObjectHierarchy getHierarchy() { null }
}
