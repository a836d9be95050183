package qupath.lib.regions

class ImagePlane {
    int getZ() { 0 }
    int getT() { 0 }
    static ImagePlane getDefaultPlane() { new ImagePlane() }
}

class RegionRequest {
    static RegionRequest createInstance(String path, double downsample, int x, int y, int width, int height, int z, int t) {
        new RegionRequest()
    }
}
