/**
 * qpbridge: import the GeoJSON file that `qpbridge annotate SLIDE --model NAME --sidecar` (or
 * `qpbridge annotate-project`) wrote for this image (a "sidecar" file), replacing earlier results of the same
 * model. Needs no server and no JeroMQ. Works in the GUI, in "Run for project" and headless:
 *   QuPath script -p project.qpproj -s "Import qpbridge GeoJSON.groovy"
 *
 * SIDECAR may name the .geojson file itself (one image), or a folder; with a folder (or null: the image's own
 * folder) it looks for, in order:
 *   <image file name>.qpbridge.geojson   (slide1.svs.qpbridge.geojson: what --sidecar writes)
 *   <stem>.qpbridge.geojson, <stem>.geojson, and the same built from the project entry's image name.
 * Objects are added below the image root in one hierarchy event; set RESOLVE_HIERARCHY to place them inside
 * existing annotations instead.
 */

// ---- parameters -------------------------------------------------------------------------------------
String SIDECAR = null                    // a .geojson file, or a folder of sidecars; null: next to the image file
boolean REPLACE_PREVIOUS = true          // remove earlier objects of the same qpbridge model first
boolean RESOLVE_HIERARCHY = false        // true: move objects into the annotations that contain them (slow)

// ---- script -----------------------------------------------------------------------------------------
QpbReport.run(this, 'Import qpbridge GeoJSON') {
    def qpbLog = QpbQuPath.logger()
    def imageData = getCurrentImageData()
    if (imageData == null) throw new QpbException('no_image', 'no image is open: open one, then run the script again')
    def server = imageData.getServer()
    String imageName = QpbQuPath.startImage(this, imageData, getProjectEntry(), qpbLog)
    File sidecar = QpbSidecars.find(SIDECAR == null ? null : new File(SIDECAR), QpbQuPath.imageUris(server), imageName)

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
}

// @qpbridge-include qpbridge_transport.groovy
// @qpbridge-include qpbridge_client.groovy
// @qpbridge-include qpbridge_jobs.groovy
// @qpbridge-include qpbridge_qupath.groovy
