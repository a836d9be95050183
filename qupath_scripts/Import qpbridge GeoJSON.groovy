/**
 * qpbridge: import the GeoJSON file that a batch run wrote for this image (a "sidecar" file), replacing
 * earlier results of the same model. Needs no server and no JeroMQ. Works in "Run for project" and headless:
 *   QuPath script -p project.qpproj -s "Import qpbridge GeoJSON.groovy"
 *
 * For an image /data/slide1.svs it looks for, in order, in SIDECAR_DIR (or next to the image when null):
 *   slide1.qpbridge.geojson, slide1.svs.qpbridge.geojson, slide1.geojson
 * (and the same names built from the project's image name). Objects are added below the image root in one
 * hierarchy event; set RESOLVE_HIERARCHY to place them inside existing annotations instead.
 */

// ---- parameters -------------------------------------------------------------------------------------
String SIDECAR_DIR = null                // folder with the .geojson files; null: the image's own folder
boolean REPLACE_PREVIOUS = true          // remove earlier objects of the same qpbridge model first
boolean RESOLVE_HIERARCHY = false        // true: move objects into the annotations that contain them (slow)

// ---- script -----------------------------------------------------------------------------------------
def qpbLog = QpbQuPath.logger()
def imageData = getCurrentImageData()
if (imageData == null) {
    qpbLog.call('qpbridge: no image is open')
    return
}
def server = imageData.getServer()
def entry = getProjectEntry()
String imageName = QpbQuPath.startImage(this, imageData, entry, qpbLog)

// Candidate folders and base names: from the image file when the server has one, and from the image name.
List<File> folders = []
List<String> baseNames = []
if (SIDECAR_DIR != null) folders.add(new File(SIDECAR_DIR))
for (def uri : server.getURIs()) {
    if (uri != null && 'file'.equalsIgnoreCase(uri.getScheme())) {
        File f = new File(uri)
        if (SIDECAR_DIR == null) folders.add(f.getParentFile())
        baseNames.add(f.getName())
    }
}
if (imageName != null) baseNames.add(imageName)
List<String> candidates = []
for (String n : baseNames) {
    String stem = n.contains('.') ? n.substring(0, n.lastIndexOf('.')) : n
    candidates.addAll([stem + '.qpbridge.geojson', n + '.qpbridge.geojson', stem + '.geojson'])
}
File sidecar = null
for (File d : folders) {
    for (String c : candidates.unique()) {
        File f = new File(d, c)
        if (sidecar == null && f.isFile()) sidecar = f
    }
}
if (sidecar == null) {
    qpbLog.call("qpbridge: no sidecar GeoJSON for ${imageName}; looked for ${candidates.unique().join(', ')} in " +
            "${folders.collect { it.getAbsolutePath() }.unique().join(', ')}")
    return
}

def hierarchy = imageData.getHierarchy()
Map<String, List> groups = QpbQuPath.readSidecar(sidecar, qpbLog)
int added = 0, removed = 0
for (String model : groups.keySet()) {
    List objects = groups.get(model)
    Set<String> types = new LinkedHashSet<String>(objects.collect { QpbQuPath.objectType(it) })
    Set<String> classes = new LinkedHashSet<String>(objects.findAll { it.getPathClass() != null }.collect { it.getPathClass().toString() })
    // Objects without a qpbridge model tag are added, never used to find earlier results.
    Map r = QpbQuPath.addResults(hierarchy, hierarchy.getRootObject(), objects, REPLACE_PREVIOUS && model, model,
            types, classes)
    added += (int) r.added
    removed += (int) r.removed
}
if (RESOLVE_HIERARCHY) hierarchy.resolveHierarchy()
qpbLog.call("qpbridge: ${imageName}: imported ${added} objects from ${sidecar}" +
        (REPLACE_PREVIOUS ? ", replaced ${removed} earlier ones" : ''))

// @qpbridge-include qpbridge_core.groovy
// @qpbridge-include qpbridge_qupath.groovy
