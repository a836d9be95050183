/**
 * qpbridge: export training tiles and masks from this image's annotations (or detections), for `qpbridge train`.
 *
 * Layout, shared by every image of a project ("Run for project" adds to the same folders):
 *   OUTPUT_DIR/images/<image> [d=..,x=..,y=..,w=..,h=..].png   RGB tiles
 *   OUTPUT_DIR/masks/<same name>.png                            8-bit label images of the same size
 *   OUTPUT_DIR/labels.json                                      label values, classes, pixel size, mode
 * MODE 'semantic': one label per class in CLASSES (0 = background), for tissue / region models.
 * MODE 'instances': every object its own label 1..n, for nucleus models.
 * Uses QuPath's TileExporter and LabeledImageServer; needs no server and no JeroMQ.
 */
import qupath.lib.common.ColorTools
import qupath.lib.common.GeneralTools
import qupath.lib.images.servers.LabeledImageServer
import qupath.lib.images.writers.TileExporter

// ---- parameters -------------------------------------------------------------------------------------
String OUTPUT_DIR = null                 // null: <project folder>/training_tiles (or next to the image without a project)
String MODE = 'semantic'                 // 'semantic' (class masks) or 'instances' (one label per object)
List<String> CLASSES = []                // semantic: class names in label order (1, 2, ...); empty: the project's classes
String INSTANCE_OBJECTS = 'detections'   // instances: 'detections', 'annotations' or 'cell_nuclei'
double PIXEL_SIZE_UM = 1.0               // export resolution in µm/px (the model's mpp)
double DOWNSAMPLE = -1                   // > 0: use this downsample instead (images without calibration)
int TILE_SIZE = 512                      // tile size in exported pixels
int OVERLAP = 0                          // overlap in exported pixels
boolean ANNOTATED_TILES_ONLY = true      // skip tiles without annotations
String IMAGE_EXT = '.png'                // '.png' or '.jpg' for the RGB tiles (masks are always PNG)

// ---- script -----------------------------------------------------------------------------------------
def log = org.slf4j.LoggerFactory.getLogger('qpbridge')
def imageData = getCurrentImageData()
if (imageData == null) {
    log.warn('qpbridge: no image is open')
    return
}
def server = imageData.getServer()
def project = getProject()
def entry = getProjectEntry()
String imageName = entry != null ? entry.getImageName() : server.getMetadata().getName()
Object batchIndex = null, batchSize = null
try {
    batchIndex = getProperty('qupath.script.batchIndex')
    batchSize = getProperty('qupath.script.batchSize')
} catch (Exception ignored) {
    // no batch information
}
if (batchIndex != null && batchSize != null && (batchSize as int) > 1) {
    log.info("qpbridge: image ${(batchIndex as int) + 1} of ${batchSize}: ${imageName}")
}

File out
if (OUTPUT_DIR != null) {
    out = new File(OUTPUT_DIR)
} else if (project != null) {
    out = new File(project.getPath().getParent().toFile(), 'training_tiles')
} else {
    def uris = server.getURIs()
    File imageFile = uris.isEmpty() ? null : new File(uris.iterator().next())
    if (imageFile == null) throw new IllegalArgumentException('qpbridge: set OUTPUT_DIR (the image is not a file)')
    out = new File(imageFile.getParentFile(), 'training_tiles')
}
File imagesDir = new File(out, 'images'), masksDir = new File(out, 'masks')
imagesDir.mkdirs()
masksDir.mkdirs()

double downsample = DOWNSAMPLE
if (downsample <= 0) {
    def cal = server.getPixelCalibration()
    if (!cal.hasPixelSizeMicrons()) {
        throw new IllegalArgumentException("qpbridge: ${imageName} has no pixel size calibration: set it in the Image tab, " +
                'or set DOWNSAMPLE in the script parameters')
    }
    downsample = PIXEL_SIZE_UM / cal.getAveragedPixelSizeMicrons()
}
if (downsample < 1) {
    log.warn("qpbridge: the image is coarser than ${PIXEL_SIZE_UM} µm/px; exporting at full resolution")
    downsample = 1
}

def builder = new LabeledImageServer.Builder(imageData)
        .backgroundLabel(0, ColorTools.packRGB(0, 0, 0))
        .downsample(downsample)
        .multichannelOutput(false)
Map<String, Integer> labels = new LinkedHashMap<String, Integer>()
if (MODE == 'semantic') {
    List<String> names = CLASSES
    if (names.isEmpty()) {
        // The project's class list is the same for every image, so labels agree across a batch.
        def source = project != null ? project.getPathClasses() :
                imageData.getHierarchy().getAnnotationObjects().collect { it.getPathClass() }.unique()
        names = source.findAll { it != null && !it.toString().endsWith('*') }.collect { it.toString() }.unique().sort()
    }
    if (names.isEmpty()) throw new IllegalArgumentException('qpbridge: no classes to export: set CLASSES')
    names.eachWithIndex { String n, int i ->
        builder.addLabel(n, i + 1)
        labels.put(n, i + 1)
    }
} else if (MODE == 'instances') {
    if (INSTANCE_OBJECTS == 'detections') builder.useDetections()
    else if (INSTANCE_OBJECTS == 'cell_nuclei') builder.useCellNuclei()
    else builder.useAnnotations()
    builder.useInstanceLabels()
} else {
    throw new IllegalArgumentException("qpbridge: MODE must be 'semantic' or 'instances', not '${MODE}'")
}
def labelServer = builder.build()

new TileExporter(imageData)
        .downsample(downsample)
        .imageExtension(IMAGE_EXT)
        .labeledImageExtension('.png')
        .tileSize(TILE_SIZE)
        .overlap(OVERLAP)
        .labeledServer(labelServer)
        .annotatedTilesOnly(ANNOTATED_TILES_ONLY)
        .writeTiles(imagesDir.getAbsolutePath())

// TileExporter writes each mask beside its tile, as "<tile>-labelled.png" when the tiles are PNG too, else as
// "<tile>.png": move them to masks/ under the tile's own name (subfolder options are not in every version).
int moved = 0
String prefix = GeneralTools.getNameWithoutExtension(server.getMetadata().getName())
boolean pngTiles = IMAGE_EXT.toLowerCase() == '.png'
imagesDir.listFiles().findAll { pngTiles ? it.getName().endsWith('-labelled.png') : it.getName().endsWith('.png') }.each { File f ->
    String base = pngTiles ? f.getName().substring(0, f.getName().length() - '-labelled.png'.length()) :
            f.getName().substring(0, f.getName().length() - '.png'.length())
    File target = new File(masksDir, base + '.png')
    if (target.exists()) target.delete()
    if (f.renameTo(target)) moved++
}

def gson = new com.google.gson.GsonBuilder().setPrettyPrinting().disableHtmlEscaping().create()
def cal = server.getPixelCalibration()
Map info = [mode: MODE, labels: labels, background: 0, instance_objects: MODE == 'instances' ? INSTANCE_OBJECTS : null,
            downsample: downsample, tile_size: TILE_SIZE, overlap: OVERLAP,
            pixel_size_um: cal.hasPixelSizeMicrons() ? cal.getAveragedPixelSizeMicrons() * downsample : null,
            images: 'images', masks: 'masks']
new File(out, 'labels.json').setText(gson.toJson(info), 'UTF-8')
log.info("qpbridge: ${imageName} (${prefix}): ${moved} tiles with masks -> ${out} (${MODE}, downsample " +
        String.format(Locale.ROOT, '%.3f', downsample) + ')')
