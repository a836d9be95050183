package qupath.lib.images.writers

import qupath.lib.images.ImageData
import qupath.lib.images.servers.ImageServer

class TileExporter {
    TileExporter(ImageData imageData) {}
    TileExporter downsample(double d) { this }
    TileExporter imageExtension(String ext) { this }
    TileExporter labeledImageExtension(String ext) { this }
    TileExporter tileSize(int size) { this }
    TileExporter overlap(int overlap) { this }
    TileExporter labeledServer(ImageServer server) { this }
    TileExporter annotatedTilesOnly(boolean b) { this }
    void writeTiles(String dir) throws IOException {}
}
