/*
 * Runs installed qpbridge QuPath scripts on REAL QuPath core classes, the way QuPath runs a script: QuPath's
 * default imports prepended to the script text, the image set as the per-thread batch image
 * (QP.setBatchProjectAndImage), batch attributes in the binding, the hierarchy's events fired afterwards.
 *
 *   run-groovy 0.5.1|0.6.0 run_scripts.groovy SCENARIO.json      (EXTRA_CP: the compiled QP/QPEx stand-ins)
 *
 * The scenario names an image file (PNG or TIFF; read with ImageIO into a real WrappedBufferedImageServer
 * that reports the file's URI, as QuPath's ImageJ server does), its pixel size, annotations to draw (a
 * pathologist's), and steps. Each step runs one script file on one image (optionally selecting annotations
 * first, optionally inside a DefaultProject entry as "Run for project" does, reading and saving the entry's
 * data) and dumps the hierarchy as QuPath GeoJSON; a step without a script only dumps (in a project: the
 * entry as saved). One line "QPB <json>" per step on stdout; "QPB-STEP n" on stderr where a step's log starts.
 */
import com.google.gson.GsonBuilder
import com.google.gson.JsonObject
import com.google.gson.JsonParser
import qupath.lib.common.GeneralTools
import qupath.lib.images.ImageData
import qupath.lib.images.servers.ImageServer
import qupath.lib.images.servers.ImageServerBuilder
import qupath.lib.images.servers.ImageServerMetadata
import qupath.lib.images.servers.ImageServers
import qupath.lib.images.servers.WrappedBufferedImageServer
import qupath.lib.io.GsonTools
import qupath.lib.objects.PathObject
import qupath.lib.objects.PathObjects
import qupath.lib.objects.classes.PathClass
import qupath.lib.objects.hierarchy.PathObjectHierarchy
import qupath.lib.projects.Project
import qupath.lib.projects.ProjectImageEntry
import qupath.lib.projects.Projects
import qupath.lib.regions.ImagePlane
import qupath.lib.roi.ROIs
import qupath.lib.scripting.QP

import javax.imageio.ImageIO
import java.awt.image.BufferedImage

/** An image file read whole into memory (as QuPath's ImageJ server reads PNG/TIFF), reporting its file URI. */
class FileImageServer extends WrappedBufferedImageServer {
    final URI uri
    final Double mpp

    FileImageServer(File file, Double mpp) {
        super(file.getName(), readRgb(file))
        this.uri = file.toURI()
        this.mpp = mpp
        if (mpp != null) setMetadata(new ImageServerMetadata.Builder(getMetadata()).pixelSizeMicrons(mpp, mpp).build())
    }

    static BufferedImage readRgb(File file) {
        BufferedImage src = ImageIO.read(file)
        if (src == null) throw new IOException("ImageIO cannot read ${file}")
        BufferedImage rgb = new BufferedImage(src.getWidth(), src.getHeight(), BufferedImage.TYPE_INT_RGB)
        def g = rgb.createGraphics()
        g.drawImage(src, 0, 0, null)
        g.dispose()
        rgb
    }

    @Override
    Collection<URI> getURIs() { [uri] }

    @Override
    protected ImageServerBuilder.ServerBuilder<BufferedImage> createServerBuilder() { new FileImageBuilder(uri, mpp) }
}

/** The project entry's builder for a FileImageServer (QuPath's real ServerBuilder interface). */
class FileImageBuilder implements ImageServerBuilder.ServerBuilder<BufferedImage> {
    final URI uri
    final Double mpp

    FileImageBuilder(URI uri, Double mpp) {
        this.uri = uri
        this.mpp = mpp
    }

    ImageServer<BufferedImage> build() { new FileImageServer(new File(uri), mpp) }

    Collection<URI> getURIs() { [uri] }

    ImageServerBuilder.ServerBuilder<BufferedImage> updateURIs(Map<URI, URI> updateMap) {
        new FileImageBuilder(updateMap.getOrDefault(uri, uri), mpp)
    }

    boolean equals(Object o) { o instanceof FileImageBuilder && ((FileImageBuilder) o).uri == uri }

    int hashCode() { uri.hashCode() }
}

// What QuPath prepends to every Groovy script it runs (default imports on; QPEx statics and core classes).
String DEFAULT_IMPORTS = [
        'qupath.lib.images.ImageData', 'qupath.lib.images.servers.ImageServer', 'qupath.lib.objects.PathObject',
        'qupath.lib.objects.PathObjects', 'qupath.lib.roi.ROIs', 'qupath.lib.regions.RegionRequest',
        'qupath.lib.regions.ImagePlane', 'qupath.lib.roi.GeometryTools', 'qupath.lib.io.PathIO',
        'qupath.lib.io.GsonTools', 'qupath.lib.images.writers.TileExporter',
        'qupath.lib.images.servers.LabeledImageServer', 'qupath.lib.common.ColorTools',
        'qupath.lib.common.GeneralTools', 'qupath.lib.objects.classes.PathClass', 'java.awt.image.BufferedImage'
].collect { "import ${it};" }.join(' ') + ' import static qupath.lib.gui.scripting.QPEx.*'

JsonObject scenario = JsonParser.parseString(new File(args[0]).getText('UTF-8')).getAsJsonObject()
def gson = new GsonBuilder().disableHtmlEscaping().serializeSpecialFloatingPointValues().create()

Map<String, ImageData<BufferedImage>> images = [:]
Map<String, ProjectImageEntry<BufferedImage>> entries = [:]
Project<BufferedImage> project = null

// Let QuPath's project files store FileImageBuilder, the way QuPath's own builders are registered.
((GsonTools.SubTypeAdapterFactory) ImageServers.getServerBuilderFactory()).registerSubtype(FileImageBuilder)

if (scenario.has('project')) {
    File dir = new File(scenario.get('project').getAsString())
    dir.mkdirs()
    project = Projects.createProject(dir, BufferedImage)
}

for (def el : scenario.getAsJsonArray('images')) {
    JsonObject spec = el.getAsJsonObject()
    String key = spec.get('key').getAsString()
    File file = new File(spec.get('file').getAsString())
    Double mpp = spec.has('mpp') && !spec.get('mpp').isJsonNull() ? spec.get('mpp').getAsDouble() : null
    ImageData<BufferedImage> data
    if (project != null) {
        ProjectImageEntry<BufferedImage> entry = project.addImage(new FileImageBuilder(file.toURI(), mpp))
        entry.setImageName(spec.has('name') ? spec.get('name').getAsString() : file.getName())
        data = entry.readImageData()
        entries[key] = entry
    } else {
        data = new ImageData<BufferedImage>(new FileImageServer(file, mpp), null, ImageData.ImageType.BRIGHTFIELD_H_E)
    }
    // A pathologist's own annotations: rectangles [name, class, x, y, w, h].
    for (def a : spec.has('annotations') ? spec.getAsJsonArray('annotations') : []) {
        JsonObject o = a.getAsJsonObject()
        def roi = ROIs.createRectangleROI(o.get('x').getAsDouble(), o.get('y').getAsDouble(), o.get('w').getAsDouble(),
                o.get('h').getAsDouble(), ImagePlane.getDefaultPlane())
        PathObject ann = PathObjects.createAnnotationObject(roi, o.has('class') ? PathClass.fromString(o.get('class').getAsString()) : null)
        ann.setName(o.get('name').getAsString())
        data.getHierarchy().addObject(ann)
    }
    // A detection drawn by hand (e.g. a pathologist's own nucleus): [name, class, x, y, w, h].
    for (def a : spec.has('detections') ? spec.getAsJsonArray('detections') : []) {
        JsonObject o = a.getAsJsonObject()
        def roi = ROIs.createEllipseROI(o.get('x').getAsDouble(), o.get('y').getAsDouble(), o.get('w').getAsDouble(),
                o.get('h').getAsDouble(), ImagePlane.getDefaultPlane())
        PathObject det = PathObjects.createDetectionObject(roi, PathClass.fromString(o.get('class').getAsString()))
        det.setName(o.get('name').getAsString())
        data.getHierarchy().addObject(det)
    }
    data.getHierarchy().resolveHierarchy() // hand-drawn detections become children of the annotations holding them
    if (project != null) entries[key].saveImageData(data)
    images[key] = data
}
if (project != null) project.syncChanges()

int stepIndex = 0
for (def el : scenario.getAsJsonArray('steps')) {
    JsonObject step = el.getAsJsonObject()
    String key = step.get('image').getAsString()
    ImageData<BufferedImage> data = images[key]
    if (project != null) data = entries[key].readImageData() // "Run for project" reads each entry afresh
    PathObjectHierarchy hierarchy = data.getHierarchy()
    hierarchy.getSelectionModel().clearSelection()
    List<String> select = step.has('select') ? step.getAsJsonArray('select').collect { it.getAsString() } : []
    if (!select.isEmpty()) {
        List<PathObject> chosen = hierarchy.getAnnotationObjects().findAll { select.contains(it.getName()) }
        hierarchy.getSelectionModel().setSelectedObjects(chosen, chosen[0])
    }
    Binding binding = new Binding()
    binding.setVariable('args', new String[0])
    if (step.has('batch')) {
        JsonObject b = step.getAsJsonObject('batch')
        binding.setVariable('qupath.script.batchIndex', b.get('index').getAsInt())
        binding.setVariable('qupath.script.batchSize', b.get('size').getAsInt())
    }
    // Marks where this step's log starts (slf4j-simple writes to the same stream).
    System.err.println("QPB-STEP ${stepIndex}")
    System.err.flush()
    Map result = [step: stepIndex, image: key]
    if (step.has('script')) {
        String text = new File(step.get('script').getAsString()).getText('UTF-8')
        result.script = new File(step.get('script').getAsString()).getName()
        long t0 = System.nanoTime()
        Throwable failure = null
        // Compiled first (QuPath compiles and caches scripts too), so that a timed interrupt meets the running script.
        Script compiled = null
        try {
            compiled = new GroovyShell(this.class.classLoader, binding).parse(DEFAULT_IMPORTS + '\n' + text, 'QuPathScript')
        } catch (Throwable e) {
            failure = e
        }
        Closure body = {
            if (compiled == null) return
            QP.setBatchProjectAndImage(project, data)
            try {
                compiled.run()
            } catch (Throwable e) {
                failure = e
            } finally {
                QP.resetBatchProjectAndImage()
                result.interrupted = Thread.interrupted() // what QuPath's code after the script would see
            }
        }
        if (step.has('interrupt_after_s')) {
            // "Kill running script": QuPath interrupts the thread running the script.
            Thread worker = new Thread(body as Runnable, 'script')
            worker.start()
            Thread.sleep((long) (step.get('interrupt_after_s').getAsDouble() * 1000))
            long t1 = System.nanoTime()
            worker.interrupt()
            worker.join(60000)
            result.returned_after_interrupt_s = (System.nanoTime() - t1) / 1e9d
            result.alive = worker.isAlive()
        } else {
            body.call()
        }
        result.ok = failure == null
        if (failure == null) {
            hierarchy.fireHierarchyChangedEvent(this)
        } else {
            // What QuPath would show: the exception escaping the script.
            result.error = [cls: failure.getClass().getName(), message: String.valueOf(failure.getMessage())]
            System.err.println("SCRIPT FAILED: ${failure}")
        }
        result.seconds = (System.nanoTime() - t0) / 1e9d
        if (project != null) entries[key].saveImageData(data)
    }
    if (step.has('dump')) {
        // The whole hierarchy, as QuPath's own GeoJSON writer writes it, plus each object's parent.
        List<Map> objects = []
        for (PathObject o : hierarchy.getFlattenedObjectList(null)) {
            if (o.isRootObject()) continue
            JsonObject f = JsonParser.parseString(GsonTools.getInstance().toJson(o)).getAsJsonObject()
            PathObject p = o.getParent()
            objects.add([feature: gson.fromJson(f, Map), parent: p == null || p.isRootObject() ? null : p.getName(),
                         parent_type: p == null ? null : (p.isRootObject() ? 'root' : p.getClass().getSimpleName()),
                         metadata_api: metadataOf(o)])
        }
        new File(step.get('dump').getAsString()).setText(gson.toJson(objects), 'UTF-8')
        result.objects = objects.size()
    }
    println 'QPB ' + gson.toJson(result)
    stepIndex++
}

static Map metadataOf(PathObject o) {
    try {
        def m = o.getMetadata()
        return m == null ? null : new LinkedHashMap(m)
    } catch (Throwable ignored) {
        return null
    }
}
