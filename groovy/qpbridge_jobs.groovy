/*
 * qpbridge Groovy client library, part 3 of 3: running a model as a server job (needs qpbridge_transport.groovy
 * and qpbridge_client.groovy): the server's tile plans, tile reads and encoding, progress, slide jobs.
 */
import com.google.gson.JsonArray
import com.google.gson.JsonElement
import com.google.gson.JsonObject
import groovy.transform.CompileStatic

import javax.imageio.ImageIO
import java.awt.image.BufferedImage

/** A tile to read: full-resolution origin and extent, the downsample to read it at, and its planned pixel size. */
class QpbTile {
    /** The tile's index in the server's plan (null for plans that carry none). */
    Integer index
    int x, y, width, height
    double downsample
    int outWidth, outHeight

    String toString() { "tile(x=${x}, y=${y}, w=${width}, h=${height}, ds=${downsample})" }
}

/** A tile ready to send: its protocol header and its bytes. */
class QpbEncodedTile {
    Map header
    byte[] bytes
}

/** Pixel sizes, regions and the server's tile plans, in full-resolution image coordinates. */
class QpbTiling {
    static String missingMppMessage(Map card, String overrideHint) {
        "The image has no pixel size calibration (µm per pixel), which model '${card.name}' needs " +
                "to work at its resolution (${card.mpp} µm/px). Set the pixel size in QuPath (Image tab, " +
                "double-click 'Pixel width' and 'Pixel height'), or set ${overrideHint} in the script " +
                'parameters (about 0.25 for 40x scans, 0.5 for 20x).'
    }

    static boolean valid(Double px) { px != null && !Double.isNaN(px) && !Double.isInfinite(px) && px > 0 }

    /**
     * The pixel size to send as image.mpp: px when valid; null when it is unknown and the model's card says
     * requires_mpp false (the server then takes the image at the model's resolution); otherwise an error that
     * names the override parameter: a silent guess would give wrong results.
     */
    static Double pixelSize(Double px, Map card, String overrideHint = 'PIXEL_SIZE_UM') {
        if (valid(px)) return px
        if (card.requires_mpp == false) return null
        throw new QpbException('missing_mpp', missingMppMessage(card, overrideHint))
    }

    /** The downsample the server will read at (model µm/px over image µm/px, at least 1); needs a pixel size. */
    static double downsample(Double pixelSizeMicrons, Map card, String overrideHint = 'PIXEL_SIZE_UM') {
        if (!valid(pixelSizeMicrons)) throw new QpbException('missing_mpp', missingMppMessage(card, overrideHint))
        Math.max(1.0d, ((Number) card.mpp).doubleValue() / pixelSizeMicrons)
    }

    /**
     * The region job.open takes ([x, y, width, height], whole pixels) for a bounding box, clipped to the image;
     * null when nothing of it lies inside the image.
     */
    static Map region(double bx, double by, double bw, double bh, int imageWidth, int imageHeight) {
        int x0 = Math.max(0, (int) Math.floor(bx)), y0 = Math.max(0, (int) Math.floor(by))
        int x1 = (int) Math.ceil(bx + bw), y1 = (int) Math.ceil(by + bh)
        if (imageWidth > 0) x1 = Math.min(imageWidth, x1)
        if (imageHeight > 0) y1 = Math.min(imageHeight, y1)
        if (x1 <= x0 || y1 <= y0) return null
        [x: x0, y: y0, width: x1 - x0, height: y1 - y0]
    }

    /**
     * The tiles of a server plan as reads: full-resolution origin, extent width*downsample x height*downsample
     * (rounded, and cut at the image's edge; the server resizes a tile a pixel or two off the planned size).
     */
    static List<QpbTile> fromPlan(Map plan, int imageWidth, int imageHeight) {
        List<QpbTile> out = []
        for (Object o : (List) plan.tiles) {
            Map t = (Map) o
            int x = ((Number) t.x).intValue(), y = ((Number) t.y).intValue()
            int w = ((Number) t.width).intValue(), h = ((Number) t.height).intValue()
            double ds = ((Number) (t.downsample != null ? t.downsample : plan.downsample)).doubleValue()
            int fw = (int) Math.round(w * ds), fh = (int) Math.round(h * ds)
            if (imageWidth > 0) fw = Math.min(fw, imageWidth - x)
            if (imageHeight > 0) fh = Math.min(fh, imageHeight - y)
            Integer index = t.index == null ? null : ((Number) t.index).intValue()
            out.add(new QpbTile(index: index, x: x, y: y, width: Math.max(1, fw), height: Math.max(1, fh), downsample: ds,
                    outWidth: w, outHeight: h))
        }
        out
    }
}

/** Whether the server can read the image's file itself (job.slide), and why (not). */
class QpbSlides {
    static final String CAPABILITY = 'slide-jobs'

    /**
     * hello: the server's hello reply; uris: the image's URIs (java.net.URI or text); enabled: the script's
     * switch. Returns [use: boolean, reason: String] and, when use is true, path (canonical) and root.
     */
    static Map choose(Map hello, Collection uris, boolean enabled) {
        if (!enabled) return no('server-side reading is switched off (USE_SERVER_SIDE_READING = false)')
        List caps = hello != null && hello.capabilities instanceof List ? (List) hello.capabilities : []
        if (!caps.contains(CAPABILITY)) {
            return no("the server does not read slides itself (no '${CAPABILITY}' capability; start it with " +
                    '`qpbridge serve --slide-root DIR` to enable it)')
        }
        List<String> roots = []
        if (hello.slide_roots instanceof List) for (Object r : (List) hello.slide_roots) roots.add(String.valueOf(r))
        if (uris == null || uris.size() != 1) {
            return no("the image does not come from one file (${uris == null ? 0 : uris.size()} URIs)")
        }
        Object uri = uris.iterator().next()
        File file = localFile(uri)
        if (file == null) return no("the image is not a local file (${uri})")
        File canon
        try {
            canon = file.getCanonicalFile()
        } catch (IOException e) {
            return no("cannot resolve ${file}: ${e.getMessage()}")
        }
        if (!canon.isFile()) return no("${canon} is not a file on this machine")
        for (String root : roots) {
            File r
            try {
                r = new File(root).getCanonicalFile()
            } catch (IOException ignored) {
                continue
            }
            if (canon.toPath().startsWith(r.toPath())) {
                return [use: true, path: canon.getPath(), root: r.getPath(),
                        reason: "${canon} lies below the server's slide root ${r}".toString()]
            }
        }
        no("${canon} is not below the server's slide roots (${roots.join(', ')})")
    }

    private static Map no(Object reason) { [use: false, reason: String.valueOf(reason)] }

    /** The file of a file: URI (java.net.URI or its text), else null. */
    static File localFile(Object uri) {
        try {
            URI u = uri instanceof URI ? (URI) uri : new URI(String.valueOf(uri))
            if (u.getScheme() == null || !u.getScheme().equalsIgnoreCase('file')) return null
            return java.nio.file.Paths.get(u).toFile()
        } catch (Exception ignored) {
            return null
        }
    }
}

/** Raised by QpbJobRunner.runSlide when the server cannot take the slide (nothing delivered yet): fall back. */
class QpbSlideUnusableException extends QpbException {
    QpbSlideUnusableException(String code, String message, Map details = null) { super(code, message, details) }
}

/** BufferedImage to protocol bytes. */
class QpbPixels {
    /** uint8 RGB, row-major, whatever the image type (INT_RGB, INT_ARGB, 3BYTE_BGR, grey, custom). */
    @CompileStatic
    static byte[] rgb(BufferedImage img) {
        int w = img.getWidth(), h = img.getHeight()
        int[] px = img.getRGB(0, 0, w, h, null, 0, w)
        byte[] out = new byte[w * h * 3]
        int j = 0
        for (int i = 0; i < px.length; i++) {
            int p = px[i]
            out[j] = (byte) ((p >> 16) & 0xff)
            out[j + 1] = (byte) ((p >> 8) & 0xff)
            out[j + 2] = (byte) (p & 0xff)
            j += 3
        }
        out
    }

    /** PNG bytes (for servers on another machine); redrawn as RGB because ImageIO cannot write every type. */
    static byte[] png(BufferedImage img) {
        BufferedImage rgbImg = img
        if (img.getType() != BufferedImage.TYPE_INT_RGB && img.getType() != BufferedImage.TYPE_3BYTE_BGR) {
            rgbImg = new BufferedImage(img.getWidth(), img.getHeight(), BufferedImage.TYPE_INT_RGB)
            def g = rgbImg.createGraphics()
            g.drawImage(img, 0, 0, null)
            g.dispose()
        }
        ByteArrayOutputStream bos = new ByteArrayOutputStream()
        ImageIO.write(rgbImg, 'png', bos)
        bos.toByteArray()
    }

    static QpbEncodedTile encode(QpbTile t, BufferedImage img, String encoding) {
        byte[] bytes = encoding == 'png' ? png(img) : rgb(img)
        Map header = [x: t.x, y: t.y, downsample: t.downsample, width: img.getWidth(), height: img.getHeight(),
                      encoding: encoding]
        if (t.index != null) header.index = t.index
        new QpbEncodedTile(header: header, bytes: bytes)
    }
}

/** Progress lines for the log: percent, tiles/s, ETA; at most one line per interval. */
class QpbProgress {
    final String label
    final int total
    final Closure log
    long intervalMs = 2000
    private final long start = System.nanoTime()
    private long lastLog = 0
    private int lastDone = -1

    QpbProgress(String label, int total, Closure log) {
        this.label = label
        this.total = total
        this.log = log
    }

    double elapsedSeconds() { (System.nanoTime() - start) / 1e9d }

    /** The line for done tiles, with the rate and ETA measured here. */
    String line(int done) {
        double s = elapsedSeconds()
        double rate = s > 0 ? done / s : 0d
        Double eta = rate > 0 && done < total ? (Double) ((total - done) / rate) : (done >= total ? (Double) 0d : null)
        format(label, done, total, rate, eta)
    }

    static String format(String label, int done, int total, double rate, Double etaSeconds) {
        int pct = total > 0 ? (int) Math.floor(100d * done / total) : 100
        String eta = etaSeconds == null ? '?' : formatSeconds(etaSeconds)
        String.format(Locale.ROOT, '%s: %d%% (%d/%d tiles), %.1f tiles/s, ETA %s', label, pct, done, total, rate, eta)
    }

    void update(int done, boolean force = false) { maybeLog(done, force, null) }

    /** Logs text (or the local line) when forced, at the end, or once the interval has passed. */
    void maybeLog(int done, boolean force, String text) {
        long now = System.currentTimeMillis()
        if (done == lastDone && lastLog != 0) return
        if (force || done >= total || now - lastLog >= intervalMs) {
            lastLog = now
            lastDone = done
            log.call(text == null ? line(done) : text)
        }
    }

    static String formatSeconds(double seconds) {
        long s = (long) Math.ceil(seconds)
        long h = (long) (s / 3600), m = (long) ((s % 3600) / 60), sec = s % 60
        h > 0 ? String.format(Locale.ROOT, '%d:%02d:%02d', h, m, sec) : String.format(Locale.ROOT, '%d:%02d', m, sec)
    }
}

/**
 * Runs one model as a server job and pages its results back, in one of two ways:
 *  - runPlanned: the server plans the tiles over a region (and ROI); this side reads them (tileSource), sends them
 *    in batches sized by the server's limits, reading the next batch while the server works on the current one;
 *    the server stitches overlapping tiles seam-free and clips the results to the region and ROI.
 *  - runSlide: the server reads the slide file itself (job.slide); this side polls job.status for progress.
 * runRegion picks one (see QpbSlides.choose) and falls back to runPlanned when the server cannot read the file.
 * Interrupting the calling thread cancels and closes the server job and throws QpbCancelledException.
 */
class QpbJobRunner {
    QpbClient client
    Map card
    /** image: [name, mpp, width, height]; mpp is the full-resolution pixel size (null: unknown) */
    Map image
    /** Called with (x, y, downsample, width, height) in full-resolution pixels; returns a BufferedImage. */
    Closure tileSource
    Closure log = { String s -> println s }
    String encoding = 'raw'
    Integer batchSize = null
    long batchBytes = 64L * 1024 * 1024
    int pageSize = 2000
    /** How often a slide job's status is asked for. */
    long pollIntervalMs = 1000
    long progressIntervalMs = 2000
    /** Called with each page of features (Gson elements, as parsed from the reply); when null, the run methods return them all. */
    Closure onFeatures = null
    /** Called with the job id once it is open (tests use it to watch the job). */
    Closure onJobOpen = null
    /** Called with the server's plan of a tile job. */
    Closure onPlan = null
    String jobId
    /** 'slide' or 'tiles': how the last run went. */
    String kind
    int tilesSent = 0
    int tilesTotal = 0
    int featuresReceived = 0
    private List<JsonElement> collected = []

    String getModelName() { (String) card.name }

    /**
     * A slide job when choice.use (from QpbSlides.choose), else a planned tile job. A slide the server cannot
     * take (a path it refuses, a file it cannot open) falls back to the tile job; a slide without a pixel size
     * is retried once with image.mpp (QuPath's calibration).
     */
    List<JsonElement> runRegion(Map region, Map roi, Map choice, Double mppOverride) {
        if (choice != null && choice.use) {
            log.call("qpbridge ${modelName}: the server reads the slide itself: ${choice.reason}")
            Double mpp = mppOverride
            for (int attempt = 0; attempt < 2; attempt++) {
                try {
                    return runSlide((String) choice.path, roi, mpp)
                } catch (QpbSlideUnusableException e) {
                    Double px = image?.mpp == null ? null : ((Number) image.mpp).doubleValue()
                    if (e.code == 'missing_mpp' && mpp == null && QpbTiling.valid(px)) {
                        log.call("qpbridge ${modelName}: the slide file records no pixel size; " +
                                "sending QuPath's calibration (${px} µm/px)")
                        mpp = px
                        continue
                    }
                    log.call("qpbridge ${modelName}: the server cannot read the slide (${e.getMessage()}); " +
                            'reading tiles in QuPath instead')
                    break
                }
            }
        } else if (choice != null) {
            log.call("qpbridge ${modelName}: reading tiles in QuPath: ${choice.reason}")
        }
        runPlanned(region, roi)
    }

    /** The planned, seam-free tile job over region [x, y, width, height] (and roi, a GeoJSON geometry). */
    List<JsonElement> runPlanned(Map region, Map roi = null) {
        reset('tiles')
        Map opened = client.jobOpenPlanned(modelName, image, region, roi)
        jobId = (String) opened.job
        if (onJobOpen != null) onJobOpen.call(jobId)
        QpbPending inFlight = null
        guarded {
            Map plan = (Map) opened.plan
            if (plan == null) {
                throw new QpbException('capability', "The qpbridge server at ${client.address} returned no tile plan " +
                        'for job.open with a region: it is too old for this script; upgrade it.')
            }
            if (onPlan != null) onPlan.call(plan)
            int imgW = image?.width == null ? 0 : ((Number) image.width).intValue()
            int imgH = image?.height == null ? 0 : ((Number) image.height).intValue()
            List<QpbTile> tiles = QpbTiling.fromPlan(plan, imgW, imgH)
            tilesTotal = tiles.size()
            QpbProgress progress = new QpbProgress("qpbridge ${modelName}", tiles.size(), log)
            progress.intervalMs = progressIntervalMs
            int perBatch = effectiveBatchSize()
            log.call("qpbridge ${modelName}: job ${jobId}, ${tiles.size()} tiles planned by the server " +
                    "(${num(plan.rows)} x ${num(plan.cols)} grid of ${num(plan.tile_size)} px, overlap ${num(plan.overlap)}, " +
                    String.format(Locale.ROOT, 'downsample %.3f', ((Number) plan.downsample).doubleValue()) +
                    "), ${perBatch} per batch")
            for (int i = 0; i < tiles.size(); i += perBatch) {
                checkInterrupt()
                List<QpbEncodedTile> batch = readBatch(tiles.subList(i, Math.min(tiles.size(), i + perBatch)))
                if (inFlight != null) handleBatchReply(client.conn.await(inFlight), progress)
                checkInterrupt()
                inFlight = client.jobTilesAsync(jobId, batch)
                tilesSent += batch.size()
            }
            if (inFlight != null) handleBatchReply(client.conn.await(inFlight), progress)
            inFlight = null
            checkInterrupt()
            progress.update(tiles.size(), true)
            client.jobFinish(jobId)
            fetchResults(0, true)
        }
    }

    /**
     * A slide job: the server reads the file at path (absolute, below one of its slide roots), inside roi (a
     * GeoJSON geometry in full-resolution pixels) when given; mpp overrides the file's pixel size. Progress comes
     * from job.status; results are paged while the job runs. A refusal or a failure before any result throws
     * QpbSlideUnusableException (runRegion falls back on it); a later failure throws QpbException.
     */
    List<JsonElement> runSlide(String path, Map roi = null, Double mpp = null) {
        reset('slide')
        Map opened
        try {
            opened = client.jobSlide(modelName, path, roi, mpp)
        } catch (QpbException e) {
            if (e.code == 'bad_request' || e.code == 'image_read' || e.code == 'unknown_op') {
                throw new QpbSlideUnusableException(e.code, "the server refused to read ${path}: ${e.getMessage()}",
                        e.details)
            }
            throw e
        }
        jobId = (String) opened.job
        if (onJobOpen != null) onJobOpen.call(jobId)
        log.call("qpbridge ${modelName}: slide job ${jobId} reads ${path} on the server" +
                (roi == null ? ' (whole slide)' : ' (inside the annotation)') + (mpp == null ? '' : ", at ${mpp} µm/px"))
        long lastLog = 0
        boolean waitingLogged = false
        guarded {
            int offset = 0
            while (true) {
                checkInterrupt()
                Map st = client.jobStatus(jobId)
                String state = (String) st.state
                int done = st.tiles_done == null ? 0 : ((Number) st.tiles_done).intValue()
                Integer expected = st.tiles_expected == null ? null : ((Number) st.tiles_expected).intValue()
                if (expected != null) tilesTotal = expected
                tilesSent = done
                long now = System.currentTimeMillis()
                if (expected == null) {
                    if (!waitingLogged) {
                        log.call("qpbridge ${modelName}: the server is preparing the slide job (tissue detection, " +
                                'or waiting for earlier slide jobs) ...')
                        waitingLogged = true
                    }
                } else if (state == 'running' && now - lastLog >= progressIntervalMs) {
                    lastLog = now
                    double rate = st.tiles_per_s == null ? 0d : ((Number) st.tiles_per_s).doubleValue()
                    Double eta = st.eta_s == null ? null : ((Number) st.eta_s).doubleValue()
                    log.call(QpbProgress.format("qpbridge ${modelName}", done, expected, rate, eta) + ' (read on the server)')
                }
                if (state == 'running') {
                    int available = st.features == null ? 0 : ((Number) st.features).intValue()
                    if (available > offset) offset = fetchResults(offset, false)
                    Thread.sleep(pollIntervalMs)
                    continue
                }
                if (state == 'done') {
                    double rate = st.tiles_per_s == null ? 0d : ((Number) st.tiles_per_s).doubleValue()
                    log.call(QpbProgress.format("qpbridge ${modelName}", done, expected == null ? done : expected,
                            rate, 0d) + ' (read on the server)')
                    fetchResults(offset, true)
                    break
                }
                Map err = st.error instanceof Map ? (Map) st.error : [:]
                String code = (String) (err.code ?: state)
                String message = (String) (err.message ?: "the server job ended in state ${state}")
                if (state == 'failed' && featuresReceived == 0 && done == 0 &&
                        (code == 'image_read' || code == 'missing_mpp' || code == 'bad_request')) {
                    throw new QpbSlideUnusableException(code, message, err.details instanceof Map ? (Map) err.details : null)
                }
                if (state == 'cancelled') {
                    throw new QpbException('cancelled', "qpbridge ${modelName}: server job ${jobId} was cancelled " +
                            '(by another client or a server shutdown); nothing was added')
                }
                throw new QpbException(code, "qpbridge ${modelName}: the server's slide job failed: ${message}",
                        err.details instanceof Map ? (Map) err.details : null)
            }
        }
    }

    /**
     * Runs a job's work (the job is open); then logs the total, closes the job and returns the features. An
     * interrupt cancels the server job; any other failure still closes it.
     */
    private List<JsonElement> guarded(Closure work) {
        long start = System.nanoTime()
        boolean closed = false
        try {
            work.call()
            log.call("qpbridge ${modelName}: done, ${featuresReceived} objects in " +
                    String.format(Locale.ROOT, '%.1f s', (System.nanoTime() - start) / 1e9d))
            closeQuietly()
            closed = true
            return onFeatures == null ? collected : []
        } catch (InterruptedException e) {
            closed = true
            throw cancelled()
        } catch (java.nio.channels.ClosedByInterruptException e) {
            closed = true
            throw cancelled()
        } finally {
            if (!closed) closeQuietly()
        }
    }

    private void reset(String k) {
        kind = k
        jobId = null
        tilesSent = 0
        tilesTotal = 0
        featuresReceived = 0
        collected = []
    }

    private static String num(Object o) { o instanceof Number ? String.valueOf(((Number) o).longValue()) : String.valueOf(o) }

    /**
     * Pages results from offset. drain: until the server says there are no more (the job is no longer running);
     * otherwise only what is there now. Returns the next offset.
     */
    private int fetchResults(int offset, boolean drain) {
        while (true) {
            checkInterrupt()
            JsonObject page = client.jobResults(jobId, offset, pageSize)
            List<JsonElement> features = QpbJson.elements(page.getAsJsonArray('features'))
            featuresReceived += features.size()
            if (!features.isEmpty()) {
                if (onFeatures != null) onFeatures.call(features) else collected.addAll(features)
            }
            Integer next = QpbJson.intOrNull(page, 'next_offset')
            if (next == null) return offset + features.size()
            offset = next
            if (features.size() < pageSize) {
                if (!drain) return offset
                if (features.isEmpty()) Thread.sleep(50)
            }
        }
    }

    private int effectiveBatchSize() {
        Map limits = client.helloReply == null ? [:] : (Map) client.helloReply.limits
        int maxTiles = limits?.max_tiles_per_request == null ? 256 : ((Number) limits.max_tiles_per_request).intValue()
        long maxBytes = limits?.max_request_bytes == null ? 512L * 1024 * 1024 : ((Number) limits.max_request_bytes).longValue()
        long tileBytes = 3L * ((Number) card.tile_size).longValue() * ((Number) card.tile_size).longValue()
        long budget = Math.min(batchBytes, (long) (maxBytes * 0.8))
        int bySize = (int) Math.max(1L, (long) (budget / Math.max(1L, tileBytes)))
        int n = Math.min(maxTiles, bySize)
        if (batchSize != null) n = Math.min(n, batchSize)
        Math.max(1, n)
    }

    private List<QpbEncodedTile> readBatch(List<QpbTile> batch) {
        List<QpbEncodedTile> out = []
        for (QpbTile t : batch) {
            checkInterrupt()
            BufferedImage img
            try {
                img = (BufferedImage) tileSource.call(t.x, t.y, t.downsample, t.width, t.height)
            } catch (InterruptedException e) {
                throw e
            } catch (Exception e) {
                // Image readers report an interrupt in many ways (InterruptedIOException, ClosedByInterrupt...).
                if (Thread.currentThread().isInterrupted() || e instanceof InterruptedIOException) {
                    throw new InterruptedException('interrupted while reading a tile')
                }
                throw new QpbException('tile_read', "Could not read ${t}: ${e.getMessage()}", [:], e)
            }
            if (img == null) throw new QpbException('tile_read', "The image returned no pixels for ${t}")
            out.add(QpbPixels.encode(t, img, encoding))
        }
        out
    }

    private void handleBatchReply(JsonObject reply, QpbProgress progress) {
        Integer done = QpbJson.intOrNull(reply, 'tiles_done')
        progress.update(done == null ? tilesSent : done)
    }

    private static void checkInterrupt() {
        if (Thread.currentThread().isInterrupted()) throw new InterruptedException('interrupted')
    }

    /** Cancels and closes the server job (with the interrupt flag cleared, so that is not cut short). */
    private QpbCancelledException cancelled() {
        Thread.interrupted()
        if (jobId != null) {
            try {
                Map r = client.jobCancel(jobId)
                log.call("qpbridge ${modelName}: cancelled server job ${jobId} (state ${r.state})")
            } catch (Exception e) {
                log.call("qpbridge ${modelName}: could not cancel server job ${jobId}: ${e.getMessage()} " +
                        '(it expires on the server after its TTL)')
            }
            closeQuietly()
        }
        new QpbCancelledException("qpbridge ${modelName}: stopped by the user; server job ${jobId} cancelled")
    }

    private void closeQuietly() {
        if (jobId == null) return
        try {
            client.jobClose(jobId)
        } catch (Exception ignored) {
            // an unclosed job expires on the server
        }
    }
}
