/*
 * qpbridge client library, QuPath adapter: ImageServer -> tiles, QuPath GeoJSON -> PathObjects, results into
 * the hierarchy in one event. Needs qpbridge_core.groovy inlined beside it.
 *
 * Takes everything it works on as parameters (ImageServer, PathObjectHierarchy, parent objects) and never
 * calls QuPath's script globals, so the GUI, "Run for project", headless `QuPath script` runs and tests use it
 * alike. Methods whose names changed between QuPath 0.4 and 0.6 are called dynamically with a fallback.
 *
 * How earlier qpbridge results are recognised (for "replace"): a direct child of the parent whose metadata
 * "qpbridge.model" names the model; for detections and cells, which cannot hold metadata in every QuPath
 * version, also one without that metadata whose object type and classification match the model's output.
 * Annotations without the metadata are never touched, so hand-drawn annotations survive a re-run.
 */
import com.google.gson.JsonArray
import com.google.gson.JsonElement
import com.google.gson.JsonObject
import org.locationtech.jts.geom.Envelope
import org.locationtech.jts.geom.Geometry
import org.locationtech.jts.geom.GeometryFactory
import org.locationtech.jts.geom.prep.PreparedGeometry
import org.locationtech.jts.geom.prep.PreparedGeometryFactory
import org.slf4j.LoggerFactory
import qupath.lib.images.servers.ImageServer
import qupath.lib.io.GsonTools
import qupath.lib.objects.PathObject
import qupath.lib.objects.hierarchy.PathObjectHierarchy
import qupath.lib.regions.ImagePlane
import qupath.lib.regions.RegionRequest
import qupath.lib.roi.GeometryTools
import qupath.lib.roi.interfaces.ROI

import java.awt.image.BufferedImage

class QpbQuPath {
    static final String MODEL_KEY = 'qpbridge.model'

    /** Log lines to QuPath's log (and the console of headless runs). */
    static Closure logger() {
        def log = LoggerFactory.getLogger('qpbridge')
        return { String s -> log.info(s) }
    }

    /** Tiles read from a QuPath ImageServer on one z/t plane. */
    static Closure tileSource(ImageServer<BufferedImage> server, int z, int t) {
        String path = server.getPath()
        return { int x, int y, double ds, int w, int h ->
            server.readRegion(RegionRequest.createInstance(path, ds, x, y, w, h, z, t))
        }
    }

    /** Pixel size in µm/px: the override when given (> 0), else the image's calibration, else null. */
    static Double pixelSizeMicrons(ImageServer server, Double override) {
        if (override != null && override > 0) return override
        def cal = server.getPixelCalibration()
        if (!cal.hasPixelSizeMicrons()) return null
        double px = cal.getAveragedPixelSizeMicrons()
        Double.isNaN(px) || px <= 0 ? null : px
    }

    /** One feature (QuPath GeoJSON text) through QuPath's own reader. */
    static PathObject toObject(String featureJson) {
        (PathObject) GsonTools.getInstance().fromJson(featureJson, PathObject)
    }

    /** Features to objects, one at a time so a feature QuPath rejects costs only itself, not the batch. */
    static List<PathObject> toObjects(List<String> features, String model, Closure log) {
        List<PathObject> out = new ArrayList<PathObject>(features.size())
        int failed = 0
        String firstError = null
        for (String f : features) {
            try {
                PathObject o = toObject(f)
                if (o == null) continue
                // Tag annotations (QuPath keeps their metadata in every version). Detections keep what the reader
                // gave them: a metadata map on each of 100k detections would cost memory.
                if (model != null && o.isAnnotation() && metadataValue(o, MODEL_KEY) == null) setMetadata(o, MODEL_KEY, model)
                out.add(o)
            } catch (Exception e) {
                failed++
                if (firstError == null) firstError = e.getMessage()
            }
        }
        if (failed > 0) log.call("qpbridge: QuPath could not read ${failed} of ${features.size()} objects (first error: ${firstError})")
        out
    }

    static String metadataValue(PathObject o, String key) {
        try {
            if (o.metaClass.respondsTo(o, 'getMetadata')) {
                def m = o.getMetadata() // 0.5+: every object
                if (m instanceof Map) return (String) m.get(key)
            }
            if (o.metaClass.respondsTo(o, 'getMetadataString', String)) return o.getMetadataString(key) // 0.4 annotations
        } catch (Exception ignored) {
            // objects without metadata support
        }
        null
    }

    /** Best effort: annotations in every version, other objects where QuPath supports it. */
    static boolean setMetadata(PathObject o, String key, String value) {
        try {
            if (o.metaClass.respondsTo(o, 'getMetadata')) {
                def m = o.getMetadata()
                if (m instanceof Map) {
                    m.put(key, value)
                    return true
                }
            }
            if (o.metaClass.respondsTo(o, 'putMetadataValue', String, String)) {
                o.putMetadataValue(key, value)
                return true
            }
        } catch (Exception ignored) {
            // not supported for this object type or version
        }
        false
    }

    static String objectType(PathObject o) {
        o.isCell() ? 'cell' : (o.isTile() ? 'tile' : (o.isDetection() ? 'detection' : (o.isAnnotation() ? 'annotation' : 'other')))
    }

    /** See the header comment: metadata first; class + type only for objects that cannot carry metadata. */
    static boolean isPreviousResult(PathObject o, String model, Collection<String> objectTypes, Collection<String> classNames) {
        String tag = metadataValue(o, MODEL_KEY)
        if (tag != null) return tag == model
        if (o.isAnnotation()) return false
        String cls = o.getPathClass() == null ? null : o.getPathClass().toString()
        objectTypes.contains(objectType(o)) && cls != null && classNames.contains(cls)
    }

    static List<String> classNames(Map card) {
        ((List<Map>) card.classes).findAll { Map c -> c.emit == null || c.emit }.collect { Map c -> (String) c.name }
    }

    /**
     * Keep what belongs to a parent annotation: detections whose centroid lies in its ROI, annotations clipped
     * to it (with area, perimeter and circularity recomputed). Everything moves to the parent's z/t plane.
     */
    static List<PathObject> fitToParent(List<PathObject> objects, PathObject parent, double pixelWidth, double pixelHeight) {
        if (parent == null || parent.isRootObject() || parent.getROI() == null) return objects
        ROI roi = parent.getROI()
        ImagePlane plane = roi.getImagePlane()
        Geometry parentGeom = roi.getGeometry()
        PreparedGeometry prepared = PreparedGeometryFactory.prepare(parentGeom)
        List<PathObject> kept = []
        for (PathObject o : objects) {
            ROI r = o.getROI()
            if (r == null) continue
            if (o.isDetection()) {
                if (!roi.contains(r.getCentroidX(), r.getCentroidY())) continue
            } else {
                Geometry g = r.getGeometry()
                if (!prepared.intersects(g)) continue
                if (!prepared.covers(g)) {
                    Geometry clipped = GeometryTools.homogenizeGeometryCollection(g.intersection(parentGeom))
                    if (clipped.isEmpty() || clipped.getDimension() < 2) continue
                    o.setROI(GeometryTools.geometryToROI(clipped, plane))
                    remeasure(o, pixelWidth, pixelHeight)
                    r = o.getROI()
                }
            }
            if (r.getZ() != plane.getZ() || r.getT() != plane.getT()) {
                try {
                    o.setROI(r.updatePlane(plane))
                } catch (Exception ignored) {
                    // cells cannot change their ROI; they stay on the default plane
                }
            }
            kept.add(o)
        }
        kept
    }

    /** The server's shape measurements, recomputed for a clipped annotation. */
    static void remeasure(PathObject o, double pw, double ph) {
        Map m = o.getMeasurements()
        ROI r = o.getROI()
        double area = r.getScaledArea(pw, ph)
        double perimeter = r.getScaledLength(pw, ph)
        for (Object k : new ArrayList(m.keySet())) {
            String key = (String) k
            if (key.endsWith('Area µm^2')) m.put(key, area)
            else if (key.endsWith('Perimeter µm')) m.put(key, perimeter)
            else if (key.endsWith('Circularity')) m.put(key, perimeter > 0 ? 4 * Math.PI * area / (perimeter * perimeter) : 0d)
        }
    }

    /**
     * Add objects as children of parent (the root for the whole image), first removing earlier results of the
     * same model when replace is true; the hierarchy hears of it in ONE event.
     */
    static Map addResults(PathObjectHierarchy hierarchy, PathObject parent, List<PathObject> objects, boolean replace,
                          String model, Collection<String> objectTypes, Collection<String> classNames) {
        PathObject p = parent == null ? hierarchy.getRootObject() : parent
        List<PathObject> old = []
        if (replace) {
            for (PathObject c : new ArrayList<PathObject>(p.getChildObjects())) {
                if (isPreviousResult(c, model, objectTypes, classNames)) old.add(c)
            }
        }
        List<PathObject> orphans = []
        for (PathObject o : old) orphans.addAll(o.getChildObjects()) // keep what users put inside old results
        if (!old.isEmpty()) removeChildren(p, old)
        if (!orphans.isEmpty()) addChildren(p, orphans)
        addChildren(p, objects)
        hierarchy.fireHierarchyChangedEvent(hierarchy, p)
        [removed: old.size(), added: objects.size()]
    }

    static void addChildren(PathObject parent, Collection<PathObject> children) {
        if (parent.metaClass.respondsTo(parent, 'addChildObjects', Collection)) parent.addChildObjects(children) // 0.4+
        else parent.addPathObjects(children)
    }

    static void removeChildren(PathObject parent, Collection<PathObject> children) {
        if (parent.metaClass.respondsTo(parent, 'removeChildObjects', Collection)) parent.removeChildObjects(children)
        else parent.removePathObjects(children)
    }

    /**
     * Run a model on each parent (the whole image when parents is empty) and add the results below it.
     * opts: server (ImageServer, required), hierarchy (required), parents (List<PathObject>), address, model,
     * replace (true), pixelSizeUm (override, null = the image's calibration), imageName, encoding ('raw'|'png'),
     * batchSize, timeoutS, log (Closure), client (an open QpbClient to reuse).
     * Returns [parents, tiles, objects, removed].
     */
    static Map run(Map opts) {
        ImageServer<BufferedImage> server = (ImageServer<BufferedImage>) opts.server
        PathObjectHierarchy hierarchy = (PathObjectHierarchy) opts.hierarchy
        if (server == null || hierarchy == null) throw new QpbException('bad_request', 'qpbridge: no image is open')
        Closure log = opts.log == null ? logger() : (Closure) opts.log
        String model = (String) opts.model
        boolean replace = opts.replace == null ? true : (boolean) opts.replace
        List<PathObject> parents = opts.parents == null ? [] : new ArrayList<PathObject>((Collection) opts.parents)
        if (parents.isEmpty()) parents.add(hierarchy.getRootObject())
        if (!server.isRGB()) {
            throw new QpbException('not_rgb', "qpbridge models take RGB brightfield images; ${server.getMetadata().getName()} is not RGB.")
        }
        QpbClient client = (QpbClient) opts.client
        boolean ownClient = client == null
        if (ownClient) client = new QpbClient((String) (opts.address ?: QpbVersion.DEFAULT_ADDRESS))
        if (opts.timeoutS != null) client.requestTimeoutMs = (long) (((Number) opts.timeoutS).doubleValue() * 1000)
        Map total = [parents: 0, tiles: 0, objects: 0, removed: 0]
        try {
            if (client.helloReply == null) client.hello()
            Map card = client.model(model)
            Double px = pixelSizeMicrons(server, (Double) opts.pixelSizeUm)
            double ds = QpbTiling.downsample(px, card)
            int tileSize = ((Number) card.tile_size).intValue(), overlap = ((Number) card.overlap).intValue()
            List<String> types = [(String) card.object_type]
            List<String> classes = classNames(card)
            String name = (String) (opts.imageName ?: server.getMetadata().getName())
            Map image = [name: name, mpp: px, width: server.getWidth(), height: server.getHeight()]
            for (PathObject parent : parents) {
                ROI roi = parent.isRootObject() ? null : parent.getROI()
                int z = roi == null ? 0 : roi.getZ(), t = roi == null ? 0 : roi.getT()
                List<QpbTile> tiles
                if (roi == null) {
                    tiles = QpbTiling.plan(0, 0, server.getWidth(), server.getHeight(), server.getWidth(), server.getHeight(),
                            ds, tileSize, overlap)
                } else {
                    int x0 = (int) Math.floor(roi.getBoundsX()), y0 = (int) Math.floor(roi.getBoundsY())
                    int x1 = (int) Math.ceil(roi.getBoundsX() + roi.getBoundsWidth())
                    int y1 = (int) Math.ceil(roi.getBoundsY() + roi.getBoundsHeight())
                    PreparedGeometry area = PreparedGeometryFactory.prepare(roi.getGeometry())
                    GeometryFactory gf = new GeometryFactory()
                    tiles = QpbTiling.plan(x0, y0, x1 - x0, y1 - y0, server.getWidth(), server.getHeight(), ds, tileSize, overlap,
                            { int x, int y, int w, int h -> area.intersects(gf.toGeometry(new Envelope(x, x + w, y, y + h))) })
                }
                String where = parent.isRootObject() ? 'whole image' : parent.toString()
                log.call("qpbridge ${model}: ${name}, ${where}: ${tiles.size()} tiles")
                List<PathObject> objects = []
                QpbJobRunner runner = new QpbJobRunner(client: client, card: card, image: image, log: log,
                        tileSource: tileSource(server, z, t), encoding: (String) (opts.encoding ?: 'raw'),
                        batchSize: (Integer) opts.batchSize)
                runner.onFeatures = { List<String> page -> objects.addAll(toObjects(page, model, log)) }
                runner.run(tiles)
                def cal = server.getPixelCalibration()
                double pw = px, ph = px
                if (cal.hasPixelSizeMicrons() && opts.pixelSizeUm == null) {
                    pw = cal.getPixelWidthMicrons()
                    ph = cal.getPixelHeightMicrons()
                }
                objects = fitToParent(objects, parent, pw, ph)
                Map r = addResults(hierarchy, parent, objects, replace, model, types, classes)
                log.call("qpbridge ${model}: added ${r.added} objects below ${where}" +
                        (replace ? ", replaced ${r.removed} earlier results" : ''))
                total.parents = (int) total.parents + 1
                total.tiles = (int) total.tiles + tiles.size()
                total.objects = (int) total.objects + (int) r.added
                total.removed = (int) total.removed + (int) r.removed
            }
        } finally {
            if (ownClient) client.close()
        }
        total
    }

    /** Read a GeoJSON file (FeatureCollection, Feature or array) as QuPath objects, grouped by qpbridge model. */
    static Map<String, List<PathObject>> readSidecar(File file, Closure log) {
        JsonObject root = null
        JsonArray features
        def parsed = QpbJson.GSON.fromJson(file.getText('UTF-8'), JsonElement)
        if (parsed.isJsonArray()) {
            features = parsed.getAsJsonArray()
        } else {
            root = parsed.getAsJsonObject()
            features = root.has('features') ? root.getAsJsonArray('features') : new JsonArray()
            if (!root.has('features')) features.add(root)
        }
        Map<String, List<String>> byModel = new LinkedHashMap<String, List<String>>()
        for (JsonElement f : features) {
            String model = ''
            JsonObject props = f.getAsJsonObject().getAsJsonObject('properties')
            if (props != null && props.has('metadata') && props.get('metadata').isJsonObject()) {
                model = QpbJson.stringOrNull(props.getAsJsonObject('metadata'), MODEL_KEY) ?: ''
            }
            if (!byModel.containsKey(model)) byModel.put(model, new ArrayList<String>())
            byModel.get(model).add(QpbJson.toJson(f))
        }
        Map<String, List<PathObject>> out = new LinkedHashMap<String, List<PathObject>>()
        for (String model : byModel.keySet()) out.put(model, toObjects(byModel.get(model), model ?: null, log))
        out
    }
}
