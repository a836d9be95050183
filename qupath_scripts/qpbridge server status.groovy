/**
 * qpbridge: check the connection to a qpbridge server and list the models it serves.
 *
 * Start the server first with `qpbridge serve` (in a terminal, on this machine or on a GPU box).
 * Needs the JeroMQ jar in QuPath's extensions folder: see docs/qupath.md (`qpbridge install-qupath`).
 */

// ---- parameters -------------------------------------------------------------------------------------
String SERVER = 'tcp://127.0.0.1:5555'   // address of `qpbridge serve`
String SERVER_KEY = null                 // a remote server's public key (its server.key file, or the 40-character key)
String CLIENT_KEY_FILE = null            // your .key_secret file, if the server only admits listed clients
long TIMEOUT_MS = 5000                   // how long to wait for the server's answer

// ---- script -----------------------------------------------------------------------------------------
QpbReport.run(this, 'qpbridge server status') {
    def qpbLog = QpbQuPath.logger()
    QpbClient client = null
    try {
        client = new QpbClient(SERVER, TIMEOUT_MS, SERVER_KEY, CLIENT_KEY_FILE)
        Map hello = client.hello()
        Map limits = (Map) hello.limits
        qpbLog.call("qpbridge server ${hello.server_version} at ${SERVER}: protocol ${(hello.protocol as Number).intValue()}, " +
                "device ${hello.device}, JeroMQ ${QpbZmq.version()}, client ${QpbVersion.LIBRARY}")
        qpbLog.call("  limits: ${(limits.max_tiles_per_request as Number).intValue()} tiles and " +
                "${(long) ((limits.max_request_bytes as Number).longValue() / (1024 * 1024))} MiB per request, " +
                "idle jobs expire after ${(limits.job_ttl_s as Number).intValue()} s")
        if (client.hasCapability(QpbSlides.CAPABILITY)) {
            qpbLog.call("  server-side reading: on, for image files below ${((List) hello.slide_roots).join(', ')}")
        } else {
            qpbLog.call('  server-side reading: off (QuPath reads the tiles; start the server with --slide-root DIR to let it read files below DIR)')
        }
        List<Map> models = client.models()
        qpbLog.call("  ${models.size()} model(s):")
        for (Map m : models) {
            String classes = ((List<Map>) m.classes).findAll { it.emit == null || it.emit }.collect { it.name }.join(', ')
            qpbLog.call(String.format(Locale.ROOT, '    %-16s %-22s %-10s %5d px at %s µm/px  [%s]', m.name, m.task,
                    m.object_type, (m.tile_size as Number).intValue(), m.mpp, classes))
            if (m.description) qpbLog.call("      ${m.description}")
        }
    } finally {
        if (client != null) client.close()
    }
}

// @qpbridge-include qpbridge_transport.groovy
// @qpbridge-include qpbridge_client.groovy
// @qpbridge-include qpbridge_jobs.groovy
// @qpbridge-include qpbridge_qupath.groovy
