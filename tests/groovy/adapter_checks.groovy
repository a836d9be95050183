/*
 * Checks of the QuPath adapter's helpers on QuPath's REAL classes (annotation ROI -> GeoJSON for
 * job.open/job.slide, the image's file URIs for server-side reading), run with Groovy 4 on QuPath's core jars.
 * The library is inlined at the include lines, as the installer does. Prints one "QPB <json>" line.
 *
 * usage: groovy -cp <QuPath core jars> adapter_checks.groovy
 */
import org.locationtech.jts.geom.Coordinate
import org.locationtech.jts.geom.Geometry
import org.locationtech.jts.geom.GeometryFactory
import org.locationtech.jts.io.WKTReader
import qupath.lib.images.servers.RotatedImageServer
import qupath.lib.images.servers.WrappedBufferedImageServer

import java.awt.image.BufferedImage

// @qpbridge-include qpbridge_transport.groovy
// @qpbridge-include qpbridge_client.groovy
// @qpbridge-include qpbridge_jobs.groovy
// @qpbridge-include qpbridge_qupath.groovy

/** A real QuPath ImageServer over pixels read from one file, reporting the file's URI as QuPath's readers do. */
class FileServer extends WrappedBufferedImageServer {
    final URI uri

    FileServer(File f) {
        super(f.getName(), new BufferedImage(64, 64, BufferedImage.TYPE_INT_RGB))
        uri = f.toURI()
    }

    @Override
    Collection<URI> getURIs() { [uri] }
}

WKTReader wkt = new WKTReader()
Map geo = [
        hole : QpbQuPath.geometryToGeoJson(wkt.read('POLYGON ((0 0, 100 0, 100 80, 0 80, 0 0), (10 10, 20 10, 20 20, 10 20, 10 10))')),
        multi: QpbQuPath.geometryToGeoJson(wkt.read('MULTIPOLYGON (((0 0, 10 0, 10 10, 0 0)), ((20 20, 30.123456 20, 30 30, 20 20)))')),
        mixed: QpbQuPath.geometryToGeoJson(wkt.read('GEOMETRYCOLLECTION (LINESTRING (0 0, 5 5), POLYGON ((0 0, 4 0, 4 4, 0 4, 0 0)))')),
        line : QpbQuPath.geometryToGeoJson(wkt.read('LINESTRING (0 0, 5 5)')),
        empty: QpbQuPath.geometryToGeoJson(wkt.read('POLYGON EMPTY'))]
// A traced tissue outline with 60 000 vertices: over the header budget, so it is sent simplified.
int n = 60000
Coordinate[] ring = new Coordinate[n + 1]
for (int i = 0; i < n; i++) {
    double a = 2 * Math.PI * i / n, r = 5000 + 3 * Math.sin(a * 700)
    ring[i] = new Coordinate(10000 + r * Math.cos(a), 10000 + r * Math.sin(a))
}
ring[n] = ring[0]
Geometry big = new GeometryFactory().createPolygon(ring)
List<String> lines = []
Map bigJson = QpbQuPath.geometryToGeoJson(big, 400000, { String s -> lines.add(s) })

File f = File.createTempFile('qpb-adapter', '.tif')
Map hello = [capabilities: ['jobs', 'slide-jobs'], slide_roots: [f.getParentFile().getPath()]]
FileServer server = new FileServer(f)
Collection fileUris = QpbQuPath.imageUris(server)
// A rotated view of the same file: its coordinates are not the file's, so the server must not read the file.
Collection rotatedUris = QpbQuPath.imageUris(new RotatedImageServer(server, RotatedImageServer.Rotation.ROTATE_90))
Map uris = [file: fileUris.collect { it.toString() }, rotated: rotatedUris.collect { it.toString() },
            choice_file: QpbSlides.choose(hello, fileUris, true), choice_rotated: QpbSlides.choose(hello, rotatedUris, true)]
f.delete()
println 'QPB ' + QpbJson.toJson([check: 'adapter', geo: geo, big: [json_chars: QpbJson.toJson(bigJson).length(),
        vertices: ((List) ((List) bigJson.coordinates)[0]).size(), log: lines], uris: uris, file: f.getCanonicalPath()])
