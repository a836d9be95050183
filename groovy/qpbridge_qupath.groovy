/*
 * qpbridge client library, QuPath adapter: ImageServer -> the server's planned tiles (or the image file's path for
 * a server that reads slides itself), annotation ROI -> GeoJSON, QuPath GeoJSON -> PathObjects, results into
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
import org.locationtech.jts.geom.Coordinate
import org.locationtech.jts.geom.Geometry
import org.locationtech.jts.geom.GeometryCollection
import org.locationtech.jts.geom.LineString
import org.locationtech.jts.geom.Polygon
import org.locationtech.jts.simplify.TopologyPreservingSimplifier
import org.slf4j.LoggerFactory
import qupath.lib.images.servers.ImageServer
import qupath.lib.io.GsonTools
import qupath.lib.objects.PathObject
import qupath.lib.objects.hierarchy.PathObjectHierarchy
import qupath.lib.regions.ImagePlane
import qupath.lib.regions.RegionRequest
import qupath.lib.roi.interfaces.ROI

import java.awt.image.BufferedImage

class QpbQuPath {
    static final String MODEL_KEY = 'qpbridge.model'

    /** Log lines to QuPath's log (and the console of headless runs). */
    /**
     * The image's name (the project entry's when there is one) after logging "image i of n" in "Run for
     * project" runs, where QuPath 0.4+ sets the batch script properties.
     */
    static String startImage(Script script, Object imageData, Object entry, Closure log) {
        String name = entry != null ? entry.getImageName() : imageData.getServer().getMetadata().getName()
        Object index = null, size = null
        try {
            index = script.getProperty('qupath.script.batchIndex')
            size = script.getProperty('qupath.script.batchSize')
        } catch (Exception ignored) {
            // QuPath before 0.4, or a plain run: no batch information
        }
        if (index != null && size != null && (size as int) > 1) {
            log.call("qpbridge: image ${(index as int) + 1} of ${size}: ${name}")
        }
        name
    }

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
     * Move objects to the parent's z/t plane (the server knows nothing of planes). No clipping here: the server
     * already clipped every result to the job's region and the annotation's ROI.
     */
    static List<PathObject> toPlane(List<PathObject> objects, ImagePlane plane) {
        if (plane == null || (plane.getZ() == 0 && plane.getT() == 0)) return objects
        for (PathObject o : objects) {
            ROI r = o.getROI()
            if (r == null || (r.getZ() == plane.getZ() && r.getT() == plane.getT())) continue
            try {
                o.setROI(r.updatePlane(plane))
            } catch (Exception ignored) {
                // cells cannot change their ROI; they stay on the default plane
            }
        }
        objects
    }

    /**
     * A JTS geometry as a GeoJSON Polygon or MultiPolygon (full-resolution pixels, coordinates rounded to 0.01 px),
     * as job.open and job.slide take an annotation's ROI; null when it has no area. A ROI whose JSON would exceed
     * maxChars (the server caps request headers at 1 MiB) is simplified, within a fraction of a pixel first.
     */
    static Map geometryToGeoJson(Geometry g, int maxChars = 400000, Closure log = null) {
        Map out = polygonsToGeoJson(g)
        double tolerance = 0.25
        while (out != null && QpbJson.toJson(out).length() > maxChars && tolerance < 1e6) {
            Geometry simpler = TopologyPreservingSimplifier.simplify(g, tolerance)
            Map m = polygonsToGeoJson(simpler)
            if (m != null) out = m
            if (log != null && m != null && QpbJson.toJson(m).length() <= maxChars) {
                log.call("qpbridge: the annotation has ${g.getNumPoints()} vertices; sent to the server simplified " +
                        "within ${tolerance} px (${simpler.getNumPoints()} vertices)")
            }
            tolerance *= 2
        }
        out
    }

    private static Map polygonsToGeoJson(Geometry g) {
        List<List> polygons = []
        collectPolygons(g, polygons)
        if (polygons.isEmpty()) return null
        polygons.size() == 1 ? [type: 'Polygon', coordinates: polygons[0]] : [type: 'MultiPolygon', coordinates: polygons]
    }

    private static void collectPolygons(Geometry g, List<List> out) {
        if (g == null || g.isEmpty()) return
        if (g instanceof Polygon) {
            Polygon p = (Polygon) g
            List<List> rings = [ring(p.getExteriorRing())]
            for (int i = 0; i < p.getNumInteriorRing(); i++) rings.add(ring(p.getInteriorRingN(i)))
            out.add(rings)
        } else if (g instanceof GeometryCollection) { // MultiPolygon and mixed collections
            for (int i = 0; i < g.getNumGeometries(); i++) collectPolygons(g.getGeometryN(i), out)
        }
    }

    private static List ring(LineString r) {
        List pts = []
        for (Coordinate c : r.getCoordinates()) pts.add([Math.round(c.x * 100d) / 100d, Math.round(c.y * 100d) / 100d])
        pts
    }

    /**
     * The image's URIs when they are the pixels QuPath shows: empty for servers that transform another
     * (rotated, cropped, sliced, affine...), whose coordinates differ from the file's.
     */
    static Collection imageUris(ImageServer server) {
        for (Class c = server.getClass(); c != null; c = c.getSuperclass()) {
            String n = c.getSimpleName()
            if (n.contains('Transforming') || n.contains('Rotated') || n.contains('Cropped') || n.contains('Affine') ||
                    n.contains('Sliced') || n.contains('Sparse') || n.contains('Concatenat')) return []
        }
        try {
            Collection uris = server.getURIs()
            return uris == null ? [] : uris
        } catch (Exception ignored) {
            return []
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
     * batchSize, timeoutS, serverSideReading (true: let a server started with --slide-root read the file itself),
     * log (Closure), client (an open QpbClient to reuse).
     * Returns [parents, tiles, objects, removed, slideJobs].
     */
    static Map run(Map opts) {
        ImageServer<BufferedImage> server = (ImageServer<BufferedImage>) opts.server
        PathObjectHierarchy hierarchy = (PathObjectHierarchy) opts.hierarchy
        if (server == null || hierarchy == null) throw new QpbException('bad_request', 'qpbridge: no image is open')
        Closure log = opts.log == null ? logger() : (Closure) opts.log
        String model = (String) opts.model
        boolean replace = opts.replace == null ? true : (boolean) opts.replace
        boolean serverSide = opts.serverSideReading == null ? true : (boolean) opts.serverSideReading
        List<PathObject> parents = opts.parents == null ? [] : new ArrayList<PathObject>((Collection) opts.parents)
        if (parents.isEmpty()) parents.add(hierarchy.getRootObject())
        if (!server.isRGB()) {
            throw new QpbException('not_rgb', "qpbridge models take RGB brightfield images; ${server.getMetadata().getName()} is not RGB.")
        }
        QpbClient client = (QpbClient) opts.client
        boolean ownClient = client == null
        if (ownClient) client = new QpbClient((String) (opts.address ?: QpbVersion.DEFAULT_ADDRESS))
        if (opts.timeoutS != null) client.requestTimeoutMs = (long) (((Number) opts.timeoutS).doubleValue() * 1000)
        Map total = [parents: 0, tiles: 0, objects: 0, removed: 0, slideJobs: 0]
        try {
            if (client.helloReply == null) client.hello()
            Map card = client.model(model)
            Double override = opts.pixelSizeUm == null ? null : ((Number) opts.pixelSizeUm).doubleValue()
            Double px = QpbTiling.pixelSize(pixelSizeMicrons(server, override), card)
            if (px == null) log.call("qpbridge ${model}: the image has no pixel size; model ${model} does not need one")
            List<String> types = [(String) card.object_type]
            List<String> classes = classNames(card)
            String name = (String) (opts.imageName ?: server.getMetadata().getName())
            Map image = [name: name, width: server.getWidth(), height: server.getHeight()]
            if (px != null) image.mpp = px
            Map choice = QpbSlides.choose(client.helloReply, imageUris(server), serverSide)
            for (PathObject parent : parents) {
                ROI roi = parent.isRootObject() ? null : parent.getROI()
                String where = parent.isRootObject() ? 'whole image' : parent.toString()
                if (roi != null && !roi.isArea()) {
                    log.call("qpbridge ${model}: skipped ${where}: only area annotations can hold results (not lines or points)")
                    continue
                }
                Map region = roi == null ? [x: 0, y: 0, width: server.getWidth(), height: server.getHeight()] :
                        QpbTiling.region(roi.getBoundsX(), roi.getBoundsY(), roi.getBoundsWidth(), roi.getBoundsHeight(),
                                server.getWidth(), server.getHeight())
                Map roiJson = roi == null ? null : geometryToGeoJson(roi.getGeometry(), 400000, log)
                if (region == null || (roi != null && roiJson == null)) {
                    log.call("qpbridge ${model}: skipped ${where}: it does not cover any part of the image")
                    continue
                }
                int z = roi == null ? 0 : roi.getZ(), t = roi == null ? 0 : roi.getT()
                Map parentChoice = choice
                if (choice.use && (z != 0 || t != 0)) {
                    parentChoice = [use: false, reason: "the annotation lies on plane z=${z}, t=${t}; the server reads only the first plane".toString()]
                }
                log.call("qpbridge ${model}: ${name}, ${where}")
                List<PathObject> objects = []
                QpbJobRunner runner = new QpbJobRunner(client: client, card: card, image: image, log: log,
                        tileSource: tileSource(server, z, t), encoding: (String) (opts.encoding ?: 'raw'),
                        batchSize: (Integer) opts.batchSize)
                runner.onFeatures = { List<String> page -> objects.addAll(toObjects(page, model, log)) }
                runner.runRegion(region, roiJson, parentChoice, override)
                objects = toPlane(objects, roi == null ? null : roi.getImagePlane())
                Map r = addResults(hierarchy, parent, objects, replace, model, types, classes)
                log.call("qpbridge ${model}: added ${r.added} objects below ${where}" +
                        (replace ? ", replaced ${r.removed} earlier results" : ''))
                total.parents = (int) total.parents + 1
                total.tiles = (int) total.tiles + runner.tilesTotal
                total.objects = (int) total.objects + (int) r.added
                total.removed = (int) total.removed + (int) r.removed
                if (runner.kind == 'slide') total.slideJobs = (int) total.slideJobs + 1
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
