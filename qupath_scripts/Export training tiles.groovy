/**
 * qpbridge: export training tiles and masks from this image's annotations (or detections), to train a model.
 *
 * Layout, shared by every image of a project ("Run for project" adds to the same folders):
 *   OUTPUT_DIR/images/<image> [d=..,x=..,y=..,w=..,h=..].png   RGB tiles
 *   OUTPUT_DIR/masks/<same name>.png                            label images of the same size:
 *       MODE 'semantic':  8-bit palette PNG whose pixel values are the labels, one per class in CLASSES
 *                         (0 = background), for tissue / region models
 *       MODE 'instances': 16-bit grey PNG, every object its own label 1..n (0 = background), for nucleus models
 *   OUTPUT_DIR/labels.json                                      label values, classes, pixel size, mode
 * Tiles at the image's edges are kept (smaller than TILE_SIZE) unless INCLUDE_PARTIAL_TILES is false, so an
 * image smaller than one tile still gives one. Uses QuPath's TileExporter and LabeledImageServer; needs no
 * server and no JeroMQ. See docs/qupath.md ("Export training tiles").
 */
import qupath.lib.common.ColorTools
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
boolean INCLUDE_PARTIAL_TILES = true     // keep the smaller tiles at the image's right and bottom edges
String IMAGE_EXT = '.png'                // '.png' or '.jpg' for the RGB tiles (masks are always PNG)

// ---- script -----------------------------------------------------------------------------------------
QpbReport.run(this, 'Export training tiles') {
    def qpbLog = QpbQuPath.logger()
    def imageData = getCurrentImageData()
    if (imageData == null) throw new QpbException('no_image', 'no image is open: open one, then run the script again')
    def server = imageData.getServer()
    def project = getProject()
    String imageName = QpbQuPath.startImage(this, imageData, getProjectEntry(), qpbLog)

    File out
    if (OUTPUT_DIR != null) {
        out = new File(OUTPUT_DIR)
    } else if (project != null) {
        out = new File(project.getPath().getParent().toFile(), 'training_tiles')
    } else {
        File imageFile = null
        for (Object uri : QpbQuPath.imageUris(server)) if (imageFile == null) imageFile = QpbSlides.localFile(uri)
        if (imageFile == null) throw new QpbException('no_output', "${imageName} is not a local file: set OUTPUT_DIR")
        out = new File(imageFile.getParentFile(), 'training_tiles')
    }
    File imagesDir = new File(out, 'images'), masksDir = new File(out, 'masks')
    if (!(imagesDir.isDirectory() || imagesDir.mkdirs()) || !(masksDir.isDirectory() || masksDir.mkdirs())) {
        throw new QpbException('no_output', "cannot create ${imagesDir} and ${masksDir}: set OUTPUT_DIR to a folder you can write")
    }

    double downsample = DOWNSAMPLE
    if (downsample <= 0) {
        def cal = server.getPixelCalibration()
        if (!cal.hasPixelSizeMicrons()) {
            throw new QpbException('missing_mpp', "${imageName} has no pixel size calibration: set it in the Image tab " +
                    "(double-click 'Pixel width'), or set DOWNSAMPLE in the script parameters")
        }
        downsample = PIXEL_SIZE_UM / cal.getAveragedPixelSizeMicrons()
    }
    if (downsample < 1) {
        qpbLog.call("qpbridge: ${imageName} is coarser than ${PIXEL_SIZE_UM} µm/px; exporting at full resolution")
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
            // The project's class list is the same for every image, so labels agree across a batch. A project
            // made outside the GUI may list none: then this image's annotation classes, sorted by name.
            def source = project != null ? project.getPathClasses() : []
            names = source.findAll { it != null && !it.toString().endsWith('*') }.collect { it.toString() }.unique().sort()
            if (names.isEmpty()) {
                names = imageData.getHierarchy().getAnnotationObjects().collect { it.getPathClass() }
                        .findAll { it != null && !it.toString().endsWith('*') }.collect { it.toString() }.unique().sort()
                if (project != null && !names.isEmpty()) {
                    qpbLog.call("qpbridge: the project lists no classes; labels from ${imageName}'s annotations: " +
                            "${names.join(', ')} (set CLASSES so that every image of a batch uses the same labels)")
                }
            }
        }
        if (names.isEmpty()) {
            throw new QpbException('no_classes', "${imageName} has no classified annotations to export: classify them, " +
                    'or set CLASSES')
        }
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
        throw new QpbException('bad_parameter', "MODE must be 'semantic' or 'instances', not '${MODE}'")
    }
    def labelServer = builder.build()

    Set<String> before = new HashSet<String>(imagesDir.list() as List<String>)
    new TileExporter(imageData)
            .downsample(downsample)
            .imageExtension(IMAGE_EXT)
            .labeledImageExtension('.png')
            .tileSize(TILE_SIZE)
            .overlap(OVERLAP)
            .labeledServer(labelServer)
            .annotatedTilesOnly(ANNOTATED_TILES_ONLY)
            .includePartialTiles(INCLUDE_PARTIAL_TILES)
            .writeTiles(imagesDir.getAbsolutePath())

    // TileExporter writes each mask beside its tile, as "<tile>-labelled.png" when the tiles are PNG too, else as
    // "<tile>.png": move the new ones to masks/ under the tile's own name.
    int moved = 0
    boolean pngTiles = IMAGE_EXT.toLowerCase() == '.png'
    String maskSuffix = pngTiles ? '-labelled.png' : '.png'
    for (File f : imagesDir.listFiles()) {
        if (before.contains(f.getName()) || !f.getName().endsWith(maskSuffix)) continue
        File target = new File(masksDir, f.getName().substring(0, f.getName().length() - maskSuffix.length()) + '.png')
        if (target.exists()) target.delete()
        if (f.renameTo(target)) moved++
    }

    def gson = new com.google.gson.GsonBuilder().setPrettyPrinting().disableHtmlEscaping().create()
    def cal = server.getPixelCalibration()
    Map info = [mode: MODE, labels: labels, background: 0, instance_objects: MODE == 'instances' ? INSTANCE_OBJECTS : null,
                mask_bits: MODE == 'instances' ? 16 : 8, downsample: downsample, tile_size: TILE_SIZE, overlap: OVERLAP,
                pixel_size_um: cal.hasPixelSizeMicrons() ? cal.getAveragedPixelSizeMicrons() * downsample : null,
                images: 'images', masks: 'masks']
    new File(out, 'labels.json').setText(gson.toJson(info), 'UTF-8')
        if (moved == 0) {
        String why = ANNOTATED_TILES_ONLY ? 'no tile holds an annotation (draw some, or set ANNOTATED_TILES_ONLY = false)' :
                'the image gave no tiles'
        if (!INCLUDE_PARTIAL_TILES) why += "; the image is ${Math.round(server.getWidth() / downsample)} x " +
                "${Math.round(server.getHeight() / downsample)} px at this resolution and partial tiles are off"
        qpbLog.call("qpbridge: ${imageName}: wrote no tiles: ${why}")
    } else {
        qpbLog.call("qpbridge: ${imageName}: ${moved} tiles with masks -> ${out} (${MODE}, downsample " +
                String.format(Locale.ROOT, '%.3f', downsample) + ')')
    }
}

// @qpbridge-include qpbridge_transport.groovy
// @qpbridge-include qpbridge_client.groovy
// @qpbridge-include qpbridge_jobs.groovy
// @qpbridge-include qpbridge_qupath.groovy
