/*
 * qpbridge Groovy client library, part 2 of 3: the protocol operations (needs qpbridge_transport.groovy).
 */
import com.google.gson.JsonObject

/** Protocol operations. One client per script run; close() it in a finally block. */
class QpbClient {
    final String address
    final QpbConnection conn
    int protocolVersion = QpbVersion.PROTOCOL
    long helloTimeoutMs = 5000
    long requestTimeoutMs = 120000
    Map helloReply

    /** serverKey: the server's CURVE public key (40 characters or its .key file) for a server started with
     *  --curve-secret, else null; clientKeyFile: this client's .key_secret for a server with an allow-list. */
    QpbClient(String address = QpbVersion.DEFAULT_ADDRESS, long connectTimeoutMs = 5000, String serverKey = null,
              String clientKeyFile = null) {
        this.address = address
        this.conn = new QpbConnection(address)
        this.conn.connectTimeoutMs = connectTimeoutMs
        this.conn.serverKey = serverKey ?: null
        this.conn.clientKeyFile = clientKeyFile ?: null
    }

    JsonObject call(Map header, List<byte[]> payloads = [], Long timeoutMs = null, int attempts = 2) {
        Map h = new LinkedHashMap(header)
        h.v = protocolVersion
        conn.request(h, payloads, timeoutMs == null ? requestTimeoutMs : timeoutMs, attempts)
    }

    /** Handshake; checks the protocol version and that the server runs jobs. */
    Map hello() {
        JsonObject r
        try {
            r = call([op: 'hello', client: [name: 'qpbridge-groovy', version: QpbVersion.LIBRARY]], [], helloTimeoutMs)
        } catch (QpbException e) {
            if (e.code == 'unsupported_version') throw mismatch(e.details.server_protocol, null)
            throw e
        }
        Map m = (Map) QpbJson.plain(r)
        int serverProtocol = ((Number) m.protocol).intValue()
        if (serverProtocol != protocolVersion) throw mismatch(serverProtocol, m.server_version)
        if (!(m.capabilities as List).contains('jobs')) {
            throw new QpbException('capability', "The qpbridge server at ${address} does not offer jobs " +
                    "(capabilities: ${m.capabilities}); upgrade it.")
        }
        helloReply = m
        m
    }

    private QpbException mismatch(Object serverProtocol, Object serverVersion) {
        if (serverProtocol instanceof Number) serverProtocol = ((Number) serverProtocol).intValue()
        String sv = serverVersion == null ? '' : " (qpbridge ${serverVersion})"
        new QpbException('protocol_mismatch',
                "Protocol mismatch: the qpbridge server at ${address} speaks protocol ${serverProtocol}${sv}, " +
                "this QuPath script speaks protocol ${protocolVersion} (qpbridge-groovy ${QpbVersion.LIBRARY}). " +
                'Use matching versions: upgrade the older side (update its qpbridge installation) and re-install the ' +
                'scripts with `qpbridge install-qupath`.',
                [server_protocol: serverProtocol, client_protocol: protocolVersion])
    }

    List<Map> models() { (List<Map>) QpbJson.plain(call([op: 'models'], [], helloTimeoutMs * 2).get('models')) }

    /** The card of one model; unknown names list the served ones. */
    Map model(String name) {
        List<Map> all = models()
        Map card = all.find { Map c -> c.name == name }
        if (card == null) {
            throw new QpbException('unknown_model', "The server at ${address} has no model '${name}'. " +
                    "Models served: ${all.collect { Map c -> c.name }.join(', ')}.", [known_models: all.collect { Map c -> c.name }])
        }
        card
    }



    /**
     * A job whose tiles the server plans over region ([x, y, width, height], full-resolution pixels), optionally
     * limited to roi (a GeoJSON geometry). The reply's plan lists the tiles to send; the server stitches them.
     * A retry after a lost reply leaves an idle job behind, which does no work and expires after the server's TTL.
     */
    Map jobOpenPlanned(String model, Map image, Map region, Map roi = null) {
        Map h = [op: 'job.open', model: model, image: image, region: region]
        if (roi != null) h.roi = roi
        (Map) QpbJson.plain(call(h, [], requestTimeoutMs, 2))
    }

    /**
     * A slide job: the server reads the file at path itself. One attempt only: a retry after a lost reply would
     * start a second job reading the whole slide.
     */
    Map jobSlide(String model, String path, Map roi = null, Double mpp = null) {
        Map h = [op: 'job.slide', model: model, path: path]
        if (roi != null) h.roi = roi
        if (mpp != null) h.mpp = mpp
        (Map) QpbJson.plain(call(h, [], requestTimeoutMs, 1))
    }

    boolean hasCapability(String name) {
        helloReply != null && helloReply.capabilities instanceof List && ((List) helloReply.capabilities).contains(name)
    }

    QpbPending jobTilesAsync(String job, List<QpbEncodedTile> tiles) {
        Map h = [op: 'job.tiles', job: job, tiles: tiles.collect { it.header }, v: protocolVersion]
        // Re-sending a batch is safe (the server skips tiles already done), so one retry is allowed.
        conn.submit(h, tiles.collect { it.bytes }, requestTimeoutMs, 2)
    }


    Map jobStatus(String job) { (Map) QpbJson.plain(call([op: 'job.status', job: job], [], helloTimeoutMs * 2)) }

    JsonObject jobResults(String job, int offset, int limit) {
        call([op: 'job.results', job: job, offset: offset, limit: limit])
    }

    Map jobFinish(String job) { (Map) QpbJson.plain(call([op: 'job.finish', job: job])) }

    Map jobCancel(String job, long timeoutMs = 5000) {
        (Map) QpbJson.plain(call([op: 'job.cancel', job: job], [], timeoutMs, 1))
    }

    Map jobClose(String job, long timeoutMs = 5000) {
        (Map) QpbJson.plain(call([op: 'job.close', job: job], [], timeoutMs, 1))
    }

    void close() { conn.close() }
}
