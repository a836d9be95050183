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
 *   OUTPUT_DIR/dataset.json                                     every tile: source image, region, downsample,
 *       µm/px and train/val split (by image); the classes with colours. The same file `qpbridge export-tiles`
 *       writes, so `qpbridge train --data OUTPUT_DIR` reads tiles from either. See docs/training.md.
 * Tiles at the image's edges are kept (smaller than TILE_SIZE) unless INCLUDE_PARTIAL_TILES is false, so an
 * image smaller than one tile still gives one. Uses QuPath's TileExporter and LabeledImageServer; needs no
 * server and no JeroMQ. See docs/qupath.md ("Export training tiles").
 */
import qupath.lib.common.ColorTools
import qupath.lib.common.GeneralTools
import qupath.lib.objects.classes.PathClass
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
double VAL_FRACTION = 0.2                // fraction of the images (not tiles) held out for validation
int SPLIT_SEED = 0                       // seed of that split (the same split as `qpbridge export-tiles --seed`)

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
    List<String> newTiles = []
    for (File f : imagesDir.listFiles()) {
        if (before.contains(f.getName()) || !f.getName().endsWith(maskSuffix)) continue
        String base = f.getName().substring(0, f.getName().length() - maskSuffix.length())
        File target = new File(masksDir, base + '.png')
        if (target.exists()) target.delete()
        if (f.renameTo(target)) {
            moved++
            newTiles << base
        }
    }

    def gson = new com.google.gson.GsonBuilder().setPrettyPrinting().disableHtmlEscaping().create()
    def cal = server.getPixelCalibration()
    Map info = [mode: MODE, labels: labels, background: 0, instance_objects: MODE == 'instances' ? INSTANCE_OBJECTS : null,
                mask_bits: MODE == 'instances' ? 16 : 8, downsample: downsample, tile_size: TILE_SIZE, overlap: OVERLAP,
                pixel_size_um: cal.hasPixelSizeMicrons() ? cal.getAveragedPixelSizeMicrons() * downsample : null,
                images: 'images', masks: 'masks']
    new File(out, 'labels.json').setText(gson.toJson(info), 'UTF-8')

    // dataset.json (docs/training.md, "Dataset layout"): this image's tiles replace its earlier ones, and the split
    // by image is recomputed over every image in the folder with the rule `qpbridge export-tiles` uses.
    def tileName = ~/^(.*) \[(?:d=([0-9.eE+-]+),)?x=(-?\d+),y=(-?\d+),w=(\d+),h=(\d+)\]$/
    String format = MODE == 'semantic' ? 'semantic' : 'instance'
    String mode = MODE == 'semantic' ? 'semantic' : 'instances'
    Double tileMpp = cal.hasPixelSizeMicrons() ? cal.getAveragedPixelSizeMicrons() * downsample : null
    File datasetFile = new File(out, 'dataset.json')
    Map dataset = datasetFile.isFile() ? gson.fromJson(datasetFile.getText('UTF-8'), Map) : null
    if (dataset != null && (dataset.mode != mode || dataset.format != format ||
            (dataset.mpp == null) != (tileMpp == null) || (tileMpp != null && Math.abs((dataset.mpp as double) - tileMpp) > 1e-6) ||
            (dataset.tile_size as int) != TILE_SIZE || (dataset.overlap as int) != OVERLAP)) {
        throw new QpbException('bad_output', "${out} already holds ${dataset.format} tiles of ${dataset.tile_size as int} px " +
                "at ${dataset.mpp} µm/px: export ${format} tiles of ${TILE_SIZE} px at ${tileMpp} µm/px into another OUTPUT_DIR")
    }
    List<Map> classes = []
    if (MODE == 'semantic') {
        labels.each { String n, Integer v ->
            def pc = project != null ? project.getPathClasses().find { it != null && it.toString() == n } : null
            Integer rgb = (pc ?: PathClass.fromString(n)).getColor()
            classes << [name: n, label: v, color: rgb == null ? null :
                    [ColorTools.red(rgb), ColorTools.green(rgb), ColorTools.blue(rgb)]]
        }
    } else {
        classes << [name: INSTANCE_OBJECTS == 'annotations' ? 'Object' : 'Nucleus', label: 1, color: null]
    }
    File imageFile = null
    for (Object uri : QpbQuPath.imageUris(server)) if (imageFile == null) imageFile = QpbSlides.localFile(uri)
    def entry = getProjectEntry()
    List<Map> tiles = []
    String sourceName = null
    for (String base : newTiles.sort()) {
        def m = tileName.matcher(base)
        if (!m.matches()) continue
        sourceName = m.group(1)
        String stem = base
        tiles << [image: "images/${stem}${IMAGE_EXT}".toString(), mask: "masks/${stem}.png".toString(),
                  source: sourceName, x: m.group(3) as long, y: m.group(4) as long, w: m.group(5) as long,
                  h: m.group(6) as long, downsample: downsample, mpp: tileMpp, objects: null]
    }
    List<Map> sources = []
    if (dataset != null) {
        // Earlier entries of other images stay (numbers back to integers where the layout has them).
        List<Map> earlier = []
        for (Map t : (dataset.tiles ?: []) as List<Map>) {
            if (t.source == sourceName || t.source == imageName) continue
            ['x', 'y', 'w', 'h'].each { k -> t[k] = (t[k] as double) as long }
            earlier << t
        }
        tiles = earlier + tiles
        for (Map src : (dataset.sources ?: []) as List<Map>) {
            if (src.name == sourceName || src.name == imageName) continue
            ['width', 'height', 'tiles'].each { k -> if (src[k] != null) src[k] = (src[k] as double) as long }
            sources << src
        }
    }
    if (sourceName != null) {
        sources << [name: sourceName, path: imageFile?.getAbsolutePath(),
                    annotations: entry != null && project != null ? "${project.getPath()}#${entry.getID()}".toString() : null,
                    width: server.getWidth(), height: server.getHeight(),
                    mpp: cal.hasPixelSizeMicrons() ? cal.getAveragedPixelSizeMicrons() : null,
                    downsample: downsample, tiles: newTiles.size(), objects: null]
    }
    // The split: names ranked by sha256("<seed>:<name>"); the first floor(fraction * n + 0.5) are validation,
    // at least one of each with two images or more (qpbridge.dataset.split_sources).
    List<String> names = sources.collect { it.name as String }.unique().sort()
    def rank = { String n -> java.security.MessageDigest.getInstance('SHA-256')
            .digest("${SPLIT_SEED}:${n}".toString().getBytes('UTF-8')).encodeHex().toString() }
    List<String> ranked = names.sort(false) { a, b -> rank(a) <=> rank(b) }
    int nVal = (int) Math.floor(VAL_FRACTION * names.size() + 0.5)
    if (VAL_FRACTION > 0 && names.size() >= 2) nVal = Math.min(Math.max(nVal, 1), names.size() - 1)
    Set<String> val = new HashSet<String>(ranked.take(nVal))
    tiles.each { it.split = val.contains(it.source) ? 'val' : 'train' }
    sources.each { it.split = val.contains(it.name) ? 'val' : 'train' }
    String qupathVersion = null
    try { qupathVersion = GeneralTools.getVersion() } catch (Throwable ignored) { }
    Map ds = [version: 1, created_by: "QuPath Export training tiles (QuPath ${qupathVersion ?: '?'})".toString(),
              format: format, mode: mode, mpp: tileMpp, tile_size: TILE_SIZE, overlap: OVERLAP, background: 0,
              classes: classes, licence: dataset?.licence,
              split: [method: 'sha256-rank', val_fraction: VAL_FRACTION, seed: SPLIT_SEED,
                      train: names.findAll { !val.contains(it) }, val: names.findAll { val.contains(it) }],
              sources: sources, tiles: tiles]
    File tmp = new File(out, '.dataset.json.tmp')
    tmp.setText(new com.google.gson.GsonBuilder().disableHtmlEscaping().serializeNulls().create().toJson(ds), 'UTF-8')
    java.nio.file.Files.move(tmp.toPath(), datasetFile.toPath(), java.nio.file.StandardCopyOption.REPLACE_EXISTING)
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
