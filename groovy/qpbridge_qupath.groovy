/*
 * qpbridge Groovy client library, QuPath adapter (needs the three qpbridge_*.groovy parts inlined beside it):
 * ImageServer -> the server's planned tiles (or the image file's path for a server that reads slides itself),
 * annotation ROI -> GeoJSON, QuPath GeoJSON -> PathObjects, results into the hierarchy in one event, and the
 * one-line error report (plus a dialog in QuPath's GUI) that every script ends with on failure.
 *
 * Takes everything it works on as parameters (ImageServer, PathObjectHierarchy, parent objects) and never
 * calls QuPath's script globals, so the GUI, "Run for project", headless `QuPath script` runs and tests use it
 * alike. Methods whose names changed between QuPath 0.4 and 0.6 are called dynamically with a fallback.
 *
 * How earlier qpbridge results are recognised (for "replace"): a direct child of the parent whose metadata
 * "qpbridge.model" names the model. QuPath 0.5 cannot keep metadata on detections and cells (their metadata
 * map is read-only, and its GeoJSON reader logs a stack trace for each one that carries some), so there the
 * tag is dropped before reading and an earlier result is a detection or cell without the tag whose object
 * type and class are the model's. Annotations without the tag are never touched, so hand-drawn annotations
 * survive a re-run.
 */
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
import qupath.lib.objects.PathObjects
import qupath.lib.objects.hierarchy.PathObjectHierarchy
import qupath.lib.regions.ImagePlane
import qupath.lib.regions.RegionRequest
import qupath.lib.roi.ROIs
import qupath.lib.roi.interfaces.ROI

import java.awt.image.BufferedImage

/**
 * How a script ends when something goes wrong: ONE error line in QuPath's log saying what failed and what to do
 * (no re-thrown exception, so QuPath adds no Groovy stack trace), and in QuPath's GUI the same text in a dialog
 * (a notification in "Run for project" runs, so a batch is not buried under dialogs).
 */
class QpbReport {
    static final String TITLE = 'qpbridge'

    /**
     * Runs a script's body. Returns its value, or null after reporting a failure. script: the running
     * Script (for the batch attributes); what: the script's name for the dialog title.
     */
    static Object run(Script script, String what, Closure body) {
        try {
            return body.call()
        } catch (InterruptedException e) {
            // "Kill running script": the server job is already cancelled; one line, no stack trace. The interrupt
            // flag stays cleared so that QuPath's own saving after the script is not cut short; "Run for
            // project" stops through its own cancel flag.
            String msg = e instanceof QpbCancelledException ? e.getMessage() : "qpbridge: ${what} stopped by the user"
            LoggerFactory.getLogger('qpbridge').warn(msg)
        } catch (QpbException e) {
            failure(script, what, e.getMessage())
        } catch (Exception e) {
            // Not one of ours: say what it was in one line; the stack trace goes to the debug log.
            LoggerFactory.getLogger('qpbridge').debug("qpbridge: ${what} failed", e)
            failure(script, what, "unexpected ${e.getClass().getSimpleName()}: ${e.getMessage()} " +
                    '(set the log level to DEBUG for the stack trace, and please report it)')
        }
        null
    }

    static void failure(Script script, String what, String message) {
        String line = message.startsWith('qpbridge') ? message : "qpbridge: ${message}"
        LoggerFactory.getLogger('qpbridge').error(line)
        showInGui("${TITLE}: ${what} failed", line, isBatch(script))
    }

    static boolean isBatch(Script script) {
        try {
            Object size = script?.getProperty('qupath.script.batchSize')
            return size != null && (size as int) > 1
        } catch (Exception ignored) {
            return false
        }
    }

    /**
     * Shows the message in QuPath's GUI when there is one (QuPathGUI.getInstance() is null in headless runs,
     * where the log line is all). Dialogs lives in qupath.fx.dialogs from 0.5, qupath.lib.gui.dialogs in 0.4.
     * Returns whether it was shown.
     */
    static boolean showInGui(String title, String message, boolean notification) {
        try {
            Class gui = loadClass('qupath.lib.gui.QuPathGUI')
            if (gui == null || gui.getMethod('getInstance').invoke(null) == null) return false
            for (String name : ['qupath.fx.dialogs.Dialogs', 'qupath.lib.gui.dialogs.Dialogs']) {
                Class dialogs = loadClass(name)
                if (dialogs == null) continue
                String method = notification ? 'showErrorNotification' : 'showErrorMessage'
                dialogs.getMethod(method, String, String).invoke(null, title, message)
                return true
            }
        } catch (Throwable e) {
            LoggerFactory.getLogger('qpbridge').debug('qpbridge: could not show the error in a dialog', e)
        }
        false
    }

    private static Class loadClass(String name) {
        for (ClassLoader l : [Thread.currentThread().getContextClassLoader(), QpbReport.classLoader]) {
            if (l == null) continue
            try {
                return Class.forName(name, false, l)
            } catch (ClassNotFoundException | LinkageError ignored) {
                // try the next loader
            }
        }
        null
    }
}

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

    private static Boolean detectionMetadata = null

    /** Whether detections keep metadata (QuPath 0.6+); 0.5's detection metadata map is read-only. */
    static boolean detectionsKeepMetadata() {
        if (detectionMetadata == null) {
            boolean ok = false
            try {
                PathObject d = PathObjects.createDetectionObject(ROIs.createRectangleROI(0, 0, 1, 1, ImagePlane.getDefaultPlane()))
                Map m = (Map) d.getMetadata()
                m.put(MODEL_KEY, 'check')
                ok = m.get(MODEL_KEY) == 'check'
            } catch (Throwable ignored) {
                ok = false
            }
            detectionMetadata = ok
        }
        detectionMetadata
    }

    private static boolean isAnnotationFeature(JsonObject props) {
        String type = props == null ? null : QpbJson.stringOrNull(props, 'objectType')
        if (type == null && props != null) type = QpbJson.stringOrNull(props, 'object_type')
        type == null || type == 'annotation' // QuPath's reader makes unknown types annotations
    }

    /**
     * Features (QuPath GeoJSON, as parsed by Gson) to objects through QuPath's own reader, each element read once
     * and never serialised again. One feature QuPath rejects costs only itself. Annotations are tagged with the
     * model; detections and cells keep the server's tag where QuPath can hold it (0.6), and lose it before
     * reading where it cannot (0.5).
     */
    static List<PathObject> toObjects(List<JsonElement> features, String model, Closure log) {
        List<PathObject> out = new ArrayList<PathObject>(features.size())
        boolean keep = detectionsKeepMetadata()
        def gson = GsonTools.getInstance()
        int failed = 0
        String firstError = null
        for (JsonElement f : features) {
            try {
                JsonObject feature = f.getAsJsonObject()
                JsonObject props = feature.has('properties') && feature.get('properties').isJsonObject() ?
                        feature.getAsJsonObject('properties') : null
                boolean annotation = isAnnotationFeature(props)
                if (!keep && !annotation && props != null) props.remove('metadata')
                // Read the tag from the JSON: no reflective metadata call per object when the server tagged it.
                boolean tagged = props != null && props.get('metadata') instanceof JsonObject &&
                        props.getAsJsonObject('metadata').has(MODEL_KEY)
                PathObject o = (PathObject) gson.fromJson(feature, PathObject)
                if (o == null) continue
                if (model != null && (annotation || keep) && !tagged) setMetadata(o, MODEL_KEY, model)
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
                def m = o.getMetadata() // 0.5+
                if (m instanceof Map) return (String) m.get(key)
            }
            if (o.metaClass.respondsTo(o, 'getMetadataString', String)) return o.getMetadataString(key) // 0.4 annotations
        } catch (Exception ignored) {
            // objects without metadata support
        }
        null
    }

    /** Annotations in every version, other objects where QuPath supports it; false where it does not. */
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

    /**
     * The parents to run on: the selected area annotations (QuPath's selection is a Set; any Collection is
     * taken), or an empty list for "the whole image" when none is selected.
     */
    static List<PathObject> selectedAnnotations(Collection selected) {
        List<PathObject> out = []
        if (selected == null) return out
        for (Object o : selected) {
            if (o instanceof PathObject && ((PathObject) o).isAnnotation() && ((PathObject) o).hasROI()) out.add((PathObject) o)
        }
        out
    }

    static String objectType(PathObject o) {
        o.isCell() ? 'cell' : (o.isTile() ? 'tile' : (o.isDetection() ? 'detection' : (o.isAnnotation() ? 'annotation' : 'other')))
    }

    /** See the header comment: metadata first; class + type only for objects that cannot carry metadata. */
    static boolean isPreviousResult(PathObject o, String model, Collection<String> objectTypes, Collection<String> classNames) {
        String tag = metadataValue(o, MODEL_KEY)
        if (tag != null) return tag == model
        // Untagged: only detections and cells in a QuPath that cannot tag them (0.5) are matched by type and class.
        if (o.isAnnotation() || detectionsKeepMetadata()) return false
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
     * opts: server (ImageServer, required), hierarchy (required), parents (List<PathObject>), address, serverKey,
     * clientKeyFile, model,
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
        if (ownClient) {
            client = new QpbClient((String) (opts.address ?: QpbVersion.DEFAULT_ADDRESS), 5000,
                    (String) (opts.serverKey ?: null), (String) (opts.clientKeyFile ?: null))
        }
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
                runner.onFeatures = { List<JsonElement> page -> objects.addAll(toObjects(page, model, log)) }
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

    /**
     * A GeoJSON file (FeatureCollection, Feature or array of Features) as QuPath objects grouped by the qpbridge
     * model that made them ('' for features without a tag). Parsed once into a tree; each feature goes to
     * QuPath's reader as it is.
     */
    static Map<String, List<PathObject>> readSidecar(File file, Closure log) {
        JsonElement parsed
        Reader reader = new InputStreamReader(new FileInputStream(file), 'UTF-8')
        try {
            parsed = com.google.gson.JsonParser.parseReader(reader)
        } catch (Exception e) {
            throw new QpbException('bad_sidecar', "${file} is not valid GeoJSON (${e.getMessage()}); re-create it with " +
                    '`qpbridge annotate SLIDE --model NAME --sidecar`')
        } finally {
            reader.close()
        }
        List<JsonElement> features = []
        if (parsed != null && parsed.isJsonArray()) {
            features = QpbJson.elements(parsed.getAsJsonArray())
        } else if (parsed != null && parsed.isJsonObject()) {
            JsonObject root = parsed.getAsJsonObject()
            if (root.has('features') && root.get('features').isJsonArray()) features = QpbJson.elements(root.getAsJsonArray('features'))
            else if (QpbJson.stringOrNull(root, 'type') == 'Feature') features = [(JsonElement) root]
        }
        if (features.isEmpty()) log.call("qpbridge: ${file} holds no GeoJSON features")
        Map<String, List<JsonElement>> byModel = new LinkedHashMap<String, List<JsonElement>>()
        for (JsonElement f : features) {
            String model = ''
            JsonObject props = f.isJsonObject() && f.getAsJsonObject().get('properties') instanceof JsonObject ?
                    f.getAsJsonObject().getAsJsonObject('properties') : null
            if (props != null && props.get('metadata') instanceof JsonObject) {
                model = QpbJson.stringOrNull(props.getAsJsonObject('metadata'), MODEL_KEY) ?: ''
            }
            if (!byModel.containsKey(model)) byModel.put(model, new ArrayList<JsonElement>())
            byModel.get(model).add(f)
        }
        Map<String, List<PathObject>> out = new LinkedHashMap<String, List<PathObject>>()
        for (String model : byModel.keySet()) out.put(model, toObjects(byModel.get(model), model ?: null, log))
        out
    }
}

/**
 * Where the sidecar GeoJSON of an image is: the file `qpbridge annotate --sidecar` writes is
 * "<image file name>.qpbridge.geojson" (python_server/qpbridge/sidecars.py; keep the two in step).
 */
class QpbSidecars {
    static final String SUFFIX = '.qpbridge.geojson'

    /** Candidate file names, best first, for the image's file names and its (project) name. */
    static List<String> names(List<String> imageNames) {
        LinkedHashSet<String> out = new LinkedHashSet<String>()
        for (String n : imageNames) if (n) out.add(n + SUFFIX)
        for (String n : imageNames) {
            if (!n) continue
            String stem = n.contains('.') ? n.substring(0, n.lastIndexOf('.')) : n
            out.add(stem + SUFFIX)
            out.add(stem + '.geojson')
        }
        new ArrayList<String>(out)
    }

    /**
     * The sidecar to import: `given` itself when it is a file; else the first candidate name found in `given`
     * (a folder) or, when given is null, in the folder of each of the image's files. A clear error otherwise.
     */
    static File find(File given, Collection uris, String imageName) {
        if (given != null && given.isFile()) return given
        if (given != null && !given.exists()) {
            throw new QpbException('no_sidecar', "SIDECAR ${given} does not exist: set it to the .geojson file, or to " +
                    'the folder `qpbridge annotate --sidecar DIR` wrote into')
        }
        List<File> folders = []
        List<String> fileNames = []
        for (Object uri : uris == null ? [] : uris) {
            File f = QpbSlides.localFile(uri)
            if (f == null) continue
            fileNames.add(f.getName())
            if (given == null && f.getParentFile() != null) folders.add(f.getParentFile())
        }
        if (given != null) folders.add(given)
        if (imageName != null) fileNames.add(imageName)
        List<String> candidates = names(fileNames)
        for (File d : folders) {
            for (String c : candidates) {
                File f = new File(d, c)
                if (f.isFile()) return f
            }
        }
        if (folders.isEmpty()) {
            throw new QpbException('no_sidecar', "${imageName} is not a local file, so there is no folder to look in: " +
                    'set SIDECAR to the .geojson file or its folder')
        }
        throw new QpbException('no_sidecar', "no sidecar GeoJSON for ${imageName}: looked for ${candidates.join(', ')} in " +
                "${folders.collect { it.getAbsolutePath() }.unique().join(', ')}. Write one with `qpbridge annotate " +
                'IMAGE --model NAME --sidecar`, or set SIDECAR to the file or folder')
    }
}
