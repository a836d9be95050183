/*
 * Test driver for the qpbridge Groovy client, run under plain Groovy 2.4+ after the library is inlined at the
 * include line below (tests/test_groovy_client.py does that with qpbridge.install_qupath.inline_script, the
 * same code the installer uses). Each check prints one line "QPB <json>" that pytest reads.
 *
 * usage: groovy -cp jeromq.jar:gson.jar client_checks.groovy CHECK[,CHECK...] [key=value...]
 *   plan                      tile grids and progress text (no server needed)
 *   hello    address=         hello + models
 *   errors   address= dead=   server down, protocol mismatch, unknown model, missing pixel size
 *   job      address= image= mpp= out=   full nuclei job on tiles of a real image; tiles + features to out
 *   cancel   address= image= mpp=        interrupt a running job: time to return, server job state
 *   nojeromq                  the library without JeroMQ on the classpath
 */
import javax.imageio.ImageIO
import java.awt.RenderingHints
import java.awt.image.BufferedImage

// @qpbridge-include qpbridge_core.groovy

void emit(Map m) { println 'QPB ' + QpbJson.toJson(m) }

/** A tile source over an in-memory image, like QuPath's ImageServer.readRegion at a downsample. */
Closure bufferedImageSource(BufferedImage img) {
    return { int x, int y, double ds, int w, int h ->
        BufferedImage crop = img.getSubimage(x, y, w, h)
        int ow = Math.max(1, (int) Math.round(w / ds)), oh = Math.max(1, (int) Math.round(h / ds))
        if (ow == w && oh == h) return crop
        BufferedImage out = new BufferedImage(ow, oh, BufferedImage.TYPE_INT_RGB)
        def g = out.createGraphics()
        g.setRenderingHint(RenderingHints.KEY_INTERPOLATION, RenderingHints.VALUE_INTERPOLATION_BILINEAR)
        g.drawImage(crop, 0, 0, ow, oh, null)
        g.dispose()
        out
    }
}

BufferedImage readRgb(String path) {
    BufferedImage raw = ImageIO.read(new File(path))
    if (raw == null) throw new IllegalStateException("ImageIO cannot read ${path}")
    // A MoNuSeg TIFF comes back as a custom type (0): redraw it as plain RGB.
    BufferedImage img = new BufferedImage(raw.getWidth(), raw.getHeight(), BufferedImage.TYPE_INT_RGB)
    def g = img.createGraphics()
    g.drawImage(raw, 0, 0, null)
    g.dispose()
    img
}

/** A bigger image made of copies of a real one, so a job has enough tiles to be interrupted. */
BufferedImage mosaic(BufferedImage img, int n) {
    BufferedImage out = new BufferedImage(img.getWidth() * n, img.getHeight() * n, BufferedImage.TYPE_INT_RGB)
    def g = out.createGraphics()
    for (int i = 0; i < n; i++) for (int j = 0; j < n; j++) g.drawImage(img, i * img.getWidth(), j * img.getHeight(), null)
    g.dispose()
    out
}

Map errorInfo(Throwable e) {
    [cls: e.getClass().getSimpleName(), code: (e instanceof QpbException) ? e.code : null, message: e.getMessage()]
}

List<String> checks = args.length > 0 ? args[0].split(',') as List<String> : []
Map<String, String> opt = [:]
for (String a : (args.length > 1 ? args[1..-1] : [])) opt.put(a.substring(0, a.indexOf('=')), a.substring(a.indexOf('=') + 1))
List<String> logLines = []
Closure log = { String s -> logLines.add(s); System.err.println(s) }

for (String check : checks) {
if (check == 'hello') {
    QpbClient c = new QpbClient(opt.address)
    try {
        Map h = c.hello()
        emit([check: 'hello', protocol: h.protocol, server_version: h.server_version, models: h.models,
              capabilities: h.capabilities, limits: h.limits])
        List<Map> cards = c.models()
        emit([check: 'models', names: cards.collect { it.name }, nuclei: c.model('nuclei')])
    } finally {
        c.close()
    }
} else if (check == 'job') {
    String address = opt.address
    BufferedImage img = readRgb(opt.image)
    double mpp = opt.mpp as double
    File outDir = new File(opt.out)
    outDir.mkdirs()
    QpbClient c = new QpbClient(address)
    try {
        c.hello()
        Map card = c.model('nuclei')
        double ds = QpbTiling.downsample(mpp, card)
        List<QpbTile> tiles = QpbTiling.plan(0, 0, img.getWidth(), img.getHeight(), img.getWidth(), img.getHeight(),
                ds, ((Number) card.tile_size).intValue(), ((Number) card.overlap).intValue())
        // Record the exact pixels sent so the Python client can send the very same tiles.
        List<Map> sent = []
        Closure source = bufferedImageSource(img)
        Closure recording = { int x, int y, double d, int w, int h ->
            BufferedImage t = (BufferedImage) source.call(x, y, d, w, h)
            String name = "tile_${sent.size()}.rgb"
            new File(outDir, name).bytes = QpbPixels.rgb(t)
            sent.add([file: name, x: x, y: y, downsample: d, width: t.getWidth(), height: t.getHeight()])
            t
        }
        QpbJobRunner runner = new QpbJobRunner(client: c, card: card, tileSource: recording, log: log, batchSize: 3,
                image: [name: new File(opt.image).getName(), mpp: mpp, width: img.getWidth(), height: img.getHeight()])
        long t0 = System.nanoTime()
        List<String> features = runner.run(tiles)
        double seconds = (System.nanoTime() - t0) / 1e9d
        new File(outDir, 'tiles.json').text = QpbJson.toJson(sent)
        new File(outDir, 'features.json').text = '[' + features.join(',') + ']'
        emit([check: 'job', tiles: tiles.size(), downsample: ds, features: features.size(), seconds: seconds,
              progress_lines: logLines.findAll { it.contains('tiles/s') }, job: runner.jobId])
    } finally {
        c.close()
    }
} else if (check == 'cancel') {
    String address = opt.address
    BufferedImage img = mosaic(readRgb(opt.image), 3)
    double mpp = opt.mpp as double
    QpbClient c = new QpbClient(address)
    QpbClient observer = new QpbClient(address)
    try {
        c.hello()
        observer.hello()
        Map card = c.model('nuclei')
        double ds = QpbTiling.downsample(mpp, card)
        List<QpbTile> tiles = QpbTiling.plan(0, 0, img.getWidth(), img.getHeight(), img.getWidth(), img.getHeight(),
                ds, ((Number) card.tile_size).intValue(), ((Number) card.overlap).intValue())
        QpbJobRunner runner = new QpbJobRunner(client: c, card: card, tileSource: bufferedImageSource(img), log: log,
                batchSize: 2, image: [name: 'mosaic', mpp: mpp, width: img.getWidth(), height: img.getHeight()])
        Map outcome = [:]
        long[] stoppedAt = [0L] as long[]
        Thread worker = new Thread({
            try {
                runner.run(tiles)
                outcome.result = 'finished'
            } catch (Throwable e) {
                outcome.result = 'threw'
                outcome.error = errorInfo(e)
                outcome.interruptFlag = Thread.currentThread().isInterrupted()
            } finally {
                stoppedAt[0] = System.nanoTime()
            }
        } as Runnable, 'script-thread')
        worker.start()
        long waitUntil = System.currentTimeMillis() + 60000
        while (runner.tilesSent < 4 && worker.isAlive() && System.currentTimeMillis() < waitUntil) Thread.sleep(20)
        String jobId = runner.jobId
        Map before = jobId == null ? null : observer.jobStatus(jobId)
        long interruptedAt = System.nanoTime()
        worker.interrupt()
        worker.join(30000)
        Map after = null
        try {
            after = observer.jobStatus(jobId)
        } catch (QpbException e) {
            after = [error: e.code]
        }
        emit([check: 'cancel', tiles: tiles.size(), sent_before_interrupt: before?.tiles_done,
              state_before: before?.state, outcome: outcome, alive: worker.isAlive(),
              return_seconds: (stoppedAt[0] - interruptedAt) / 1e9d, after: after,
              cancel_lines: logLines.findAll { it.contains('cancel') }])
    } finally {
        c.close()
        observer.close()
    }
} else if (check == 'errors') {
    String address = opt.address
    String dead = opt.dead
    // Server down: a clear error within the connect timeout.
    long t0 = System.nanoTime()
    QpbClient down = new QpbClient(dead, 1500)
    try {
        down.hello()
        emit([check: 'server_down', error: null])
    } catch (Exception e) {
        emit([check: 'server_down', error: errorInfo(e), seconds: (System.nanoTime() - t0) / 1e9d])
    } finally {
        down.close()
    }
    // Protocol mismatch: this client claims protocol 2.
    QpbClient future = new QpbClient(address)
    future.protocolVersion = 2
    try {
        future.hello()
        emit([check: 'mismatch', error: null])
    } catch (Exception e) {
        emit([check: 'mismatch', error: errorInfo(e)])
    } finally {
        future.close()
    }
    QpbClient c = new QpbClient(address)
    try {
        c.hello()
        try {
            c.model('no-such-model')
            emit([check: 'unknown_model', error: null])
        } catch (Exception e) {
            emit([check: 'unknown_model', error: errorInfo(e)])
        }
        Map card = c.model('nuclei')
        try {
            QpbTiling.downsample(Double.NaN, card)
            emit([check: 'missing_mpp', error: null])
        } catch (Exception e) {
            emit([check: 'missing_mpp', error: errorInfo(e)])
        }
        // The server's own missing_mpp reply, for a client that sends no pixel size.
        try {
            c.jobOpen('nuclei', [name: 'x'], 1)
            emit([check: 'server_missing_mpp', error: null])
        } catch (Exception e) {
            emit([check: 'server_missing_mpp', error: errorInfo(e)])
        }
    } finally {
        c.close()
    }
} else if (check == 'nojeromq') {
    try {
        new QpbClient('tcp://127.0.0.1:1')
        emit([check: 'nojeromq', error: null])
    } catch (Exception e) {
        emit([check: 'nojeromq', error: errorInfo(e)])
    }
} else if (check == 'plan') {
    Map card = [name: 'nuclei', mpp: 0.5, tile_size: 512, overlap: 32]
    List<Map> cases = [
            [w: 1000, h: 1000, mpp: 0.5], [w: 1000, h: 700, mpp: 0.25], [w: 2000, h: 1500, mpp: 0.5],
            [w: 300, h: 200, mpp: 0.5], [w: 5000, h: 3000, mpp: 0.2527], [w: 100, h: 100, mpp: 1.0]]
    List<Map> out = []
    for (Map k : cases) {
        double ds = QpbTiling.downsample(k.mpp as Double, card)
        List<QpbTile> tiles = QpbTiling.plan(0, 0, k.w as int, k.h as int, k.w as int, k.h as int, ds, 512, 32)
        out.add([w: k.w, h: k.h, mpp: k.mpp, downsample: ds,
                 tiles: tiles.collect { [it.x, it.y, it.width, it.height] }])
    }
    // A region inside the image, and a filter that keeps tiles touching a circle.
    List<QpbTile> region = QpbTiling.plan(1500, 900, 1200, 700, 2000, 1500, 1.0d, 512, 32)
    List<QpbTile> filtered = QpbTiling.plan(0, 0, 2000, 2000, 2000, 2000, 1.0d, 512, 32,
            { int x, int y, int w, int h -> x < 600 && y < 600 })
    QpbProgress p = new QpbProgress('qpbridge nuclei', 200, { String s -> })
    emit([check: 'plan', cases: out, region: region.collect { [it.x, it.y, it.width, it.height] },
          filtered: filtered.size(), progress: p.line(50), eta: QpbProgress.formatSeconds(3725)])
} else {
    System.err.println("unknown check '${check}'")
    System.exit(2)
}
}
