package qupath.lib.images.servers

import qupath.lib.images.ImageData
import qupath.lib.regions.RegionRequest

interface ImageServer<T> {
    String getPath()
    int getWidth()
    int getHeight()
    boolean isRGB()
    PixelCalibration getPixelCalibration()
    ImageServerMetadata getMetadata()
    Collection<URI> getURIs()
    T readRegion(RegionRequest request)
}

class PixelCalibration {
    boolean hasPixelSizeMicrons() { false }
    double getPixelWidthMicrons() { Double.NaN }
    double getPixelHeightMicrons() { Double.NaN }
    double getAveragedPixelSizeMicrons() { Double.NaN }
}

class ImageServerMetadata {
    String getName() { null }
}

class LabeledImageServer {
    static class Builder {
        Builder(ImageData imageData) {}
        Builder backgroundLabel(int label, Integer color) { this }
        Builder downsample(double downsample) { this }
        Builder multichannelOutput(boolean b) { this }
        Builder addLabel(String pathClassName, int label) { this }
        Builder useDetections() { this }
        Builder useAnnotations() { this }
        Builder useCellNuclei() { this }
        Builder useInstanceLabels() { this }
        ImageServer build() { null }
    }
}
