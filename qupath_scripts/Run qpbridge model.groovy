/**
 * qpbridge: run a model on the selected annotations, or on the whole image when nothing is selected.
 *
 * The server plans overlapping tiles at the model's resolution (from the image's pixel size) over each selected
 * annotation; they are read here and sent to a running qpbridge server (`qpbridge serve`), which stitches them
 * seam-free and clips the results to the annotation. The objects are added as children of each annotation.
 * When the server was started with `--slide-root DIR` and the image file lies below DIR, the server reads the
 * slide itself (faster; nothing is read in QuPath) unless USE_SERVER_SIDE_READING is false.
 * Progress (percent, tiles/s, ETA) goes to the log; "Kill running script" cancels the server job.
 * Works in the GUI, in "Run for project" (no selection there: whole image) and headless:
 *   QuPath script -p project.qpproj -s "Run qpbridge model.groovy"
 *
 * Needs the JeroMQ jar in QuPath's extensions folder: see docs/qupath.md (`qpbridge install-qupath`).
 */

// ---- parameters -------------------------------------------------------------------------------------
String SERVER = 'tcp://127.0.0.1:5555'   // address of `qpbridge serve`
String SERVER_KEY = null                 // a remote server's public key (its server.key file, or the 40-character key)
String CLIENT_KEY_FILE = null            // your .key_secret file, if the server only admits listed clients
String MODEL = 'nuclei'                  // a model the server serves: run 'qpbridge server status' to list them
boolean REPLACE_PREVIOUS = true          // true: remove this model's earlier results below each parent first
Double PIXEL_SIZE_UM = null              // µm per pixel, only for images without calibration (e.g. 0.25 at 40x)
String ENCODING = 'raw'                  // 'raw' (same machine, fastest) or 'png' (server on another machine)
Integer BATCH_SIZE = null                // tiles per request; null: chosen from the server's limits
double TIMEOUT_S = 120                   // longest wait for one batch of tiles
boolean USE_SERVER_SIDE_READING = true   // let a server started with --slide-root read the image file itself

// ---- script -----------------------------------------------------------------------------------------
QpbReport.run(this, 'Run qpbridge model') {
    def qpbLog = QpbQuPath.logger()
    def imageData = getCurrentImageData()
    if (imageData == null) throw new QpbException('no_image', 'no image is open: open one, then run the script again')
    String imageName = QpbQuPath.startImage(this, imageData, getProjectEntry(), qpbLog)
    List parents = QpbQuPath.selectedAnnotations(getSelectedObjects())
    Map result = QpbQuPath.run(server: imageData.getServer(), hierarchy: imageData.getHierarchy(), parents: parents,
            address: SERVER, serverKey: SERVER_KEY, clientKeyFile: CLIENT_KEY_FILE, model: MODEL, replace: REPLACE_PREVIOUS, pixelSizeUm: PIXEL_SIZE_UM, imageName: imageName,
            encoding: ENCODING, batchSize: BATCH_SIZE, timeoutS: TIMEOUT_S, serverSideReading: USE_SERVER_SIDE_READING,
            log: qpbLog)
    qpbLog.call("qpbridge ${MODEL}: ${imageName}: ${result.objects} objects from ${result.tiles} tiles" +
            (result.slideJobs ? " (${result.slideJobs} read on the server)" : ''))
}

// @qpbridge-include qpbridge_transport.groovy
// @qpbridge-include qpbridge_client.groovy
// @qpbridge-include qpbridge_jobs.groovy
// @qpbridge-include qpbridge_qupath.groovy
