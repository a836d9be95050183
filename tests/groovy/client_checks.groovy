/*
 * Test driver for the qpbridge Groovy client, run with Groovy 4 on QuPath's core jars after the library is inlined at the
 * include line below (tests/test_groovy_client.py does that with qpbridge.install_qupath.inline_script, the
 * same code the installer uses). Each check prints one line "QPB <json>" that pytest reads.
 *
 * usage: groovy -cp jeromq.jar:gson.jar client_checks.groovy CHECK[,CHECK...] [key=value...]
 *   plan                      reads of a server plan, regions, progress text, slide-reading decisions (no server)
 *   hello    address=         hello + models
 *   errors   address= dead=   server down, protocol mismatch, unknown model, missing pixel size
 *   job      address= image= mpp= out=   planned nuclei job on a real image; tiles sent + features to out
 *   seams    address= png= roi= out=     a dark shape across many tiles of model 'seams', whole image and ROI
 *   slide    address= png= slide= outside= roi= rx= ry= rw= rh= out=   job.slide, fallbacks, slide-job cancel
 *   cancel   address=         interrupt a running planned job of model 'slow': time to return, server job state
 *   nojeromq                  the library without JeroMQ on the classpath
 *   curve    address= key= [client=]   a CURVE server: hello without the key, and with it (key: .key file)
 *   busy     address=         a model request to a full server, with a deadline too short for a retry
 */
import javax.imageio.ImageIO
import java.awt.RenderingHints
import java.awt.image.BufferedImage

// @qpbridge-include qpbridge_transport.groovy
// @qpbridge-include qpbridge_client.groovy
// @qpbridge-include qpbridge_jobs.groovy

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
    // The nuclei model on a real image through a planned (server-tiled, seam-free) job.
    String address = opt.address
    BufferedImage img = readRgb(opt.image)
    double mpp = opt.mpp as double
    File outDir = new File(opt.out)
    outDir.mkdirs()
    QpbClient c = new QpbClient(address)
    try {
        c.hello()
        Map card = c.model('nuclei')
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
        Map image = [name: new File(opt.image).getName(), mpp: QpbTiling.pixelSize(mpp, card), width: img.getWidth(),
                     height: img.getHeight()]
        Map plan = null
        QpbJobRunner runner = new QpbJobRunner(client: c, card: card, tileSource: recording, log: log, batchSize: 3,
                image: image, progressIntervalMs: 0, onPlan: { Map p -> plan = p })
        Map region = QpbTiling.region(0, 0, img.getWidth(), img.getHeight(), img.getWidth(), img.getHeight())
        long t0 = System.nanoTime()
        List features = runner.runRegion(region, null, QpbSlides.choose(c.helloReply, [new File(opt.image).toURI()], true), null)
        double seconds = (System.nanoTime() - t0) / 1e9d
        new File(outDir, 'tiles.json').text = QpbJson.toJson(sent)
        new File(outDir, 'features.json').text = QpbJson.toJson(features)
        emit([check: 'job', tiles: runner.tilesTotal, kind: runner.kind, plan: plan, region: region,
              downsample: QpbTiling.downsample(mpp, card), features: features.size(), seconds: seconds,
              progress_lines: logLines.findAll { it.contains('tiles/s') }, job: runner.jobId,
              path_lines: logLines.findAll { it.contains('reading tiles in QuPath') }])
    } finally {
        c.close()
    }
} else if (check == 'seams') {
    // A large dark shape crossing many 64 px tiles of the semantic test model 'seams': one feature, whole image
    // and inside a ROI.
    BufferedImage img = readRgb(opt.png)
    File outDir = new File(opt.out)
    outDir.mkdirs()
    Map roi = (Map) QpbJson.GSON.fromJson(new File(opt.roi).getText('UTF-8'), Map)
    QpbClient c = new QpbClient(opt.address)
    try {
        c.hello()
        Map card = c.model('seams')
        Map image = [name: 'seams.png', mpp: 1.0d, width: img.getWidth(), height: img.getHeight()]
        Map out = [check: 'seams']
        for (String mode : ['whole', 'roi']) {
            QpbJobRunner runner = new QpbJobRunner(client: c, card: card, tileSource: bufferedImageSource(img), log: log,
                    image: image, batchSize: 7)
            List features
            if (mode == 'whole') {
                features = runner.runPlanned(QpbTiling.region(0, 0, img.getWidth(), img.getHeight(), img.getWidth(), img.getHeight()))
            } else {
                List<List> ring = (List<List>) ((List) roi.coordinates)[0]
                double x0 = ring.collect { ((Number) it[0]).doubleValue() }.min(), x1 = ring.collect { ((Number) it[0]).doubleValue() }.max()
                double y0 = ring.collect { ((Number) it[1]).doubleValue() }.min(), y1 = ring.collect { ((Number) it[1]).doubleValue() }.max()
                features = runner.runPlanned(QpbTiling.region(x0, y0, x1 - x0, y1 - y0, img.getWidth(), img.getHeight()), roi)
            }
            new File(outDir, "${mode}.json").text = QpbJson.toJson(features)
            out[mode] = [features: features.size(), tiles: runner.tilesTotal]
        }
        emit(out)
    } finally {
        c.close()
    }
} else if (check == 'slide') {
    // Server-side reading (job.slide) and the fallbacks, against a server started with a slide root.
    BufferedImage img = readRgb(opt.png)
    File outDir = new File(opt.out)
    outDir.mkdirs()
    Map roi = (Map) QpbJson.GSON.fromJson(new File(opt.roi).getText('UTF-8'), Map)
    Map region = QpbTiling.region(opt.rx as double, opt.ry as double, opt.rw as double, opt.rh as double,
            img.getWidth(), img.getHeight())
    QpbClient c = new QpbClient(opt.address)
    try {
        Map hello = c.hello()
        Map card = c.model('seams')
        Map image = [name: 'slide.tif', mpp: 1.0d, width: img.getWidth(), height: img.getHeight()]
        Map out = [check: 'slide', capabilities: hello.capabilities, slide_roots: hello.slide_roots]
        Closure make = {
            new QpbJobRunner(client: c, card: card, tileSource: bufferedImageSource(img), log: log, image: image,
                    pollIntervalMs: 100, progressIntervalMs: 0)
        }
        // 1. The file lies below the root: the server reads it.
        Map inside = QpbSlides.choose(hello, [new File(opt.slide).toURI()], true)
        QpbJobRunner r1 = (QpbJobRunner) make.call()
        List f1 = r1.runRegion(region, roi, inside, null)
        new File(outDir, 'slide.json').text = QpbJson.toJson(f1)
        out.inside = [choice: inside, kind: r1.kind, features: f1.size(), tiles: r1.tilesTotal]
        // 2. Outside the roots: decided here, the tiles are read on this side.
        Map outside = QpbSlides.choose(hello, [new File(opt.outside).toURI()], true)
        QpbJobRunner r2 = (QpbJobRunner) make.call()
        List f2 = r2.runRegion(region, roi, outside, null)
        new File(outDir, 'fallback.json').text = QpbJson.toJson(f2)
        out.outside = [choice: outside, kind: r2.kind, features: f2.size(), tiles: r2.tilesTotal]
        // 3. The server refuses a path outside its roots: a clear error from runSlide ...
        try {
            ((QpbJobRunner) make.call()).runSlide(new File(opt.outside).getAbsolutePath(), roi, null)
            out.refused = [error: null]
        } catch (Exception e) {
            out.refused = [error: errorInfo(e)]
        }
        // ... and runRegion falls back when the client thought the server could read it.
        QpbJobRunner r4 = (QpbJobRunner) make.call()
        List f4 = r4.runRegion(region, roi, [use: true, path: new File(opt.outside).getAbsolutePath(),
                                                      reason: 'forced by the test'], null)
        out.forced = [kind: r4.kind, features: f4.size()]
        // 4. Switched off by the script parameter.
        out.disabled = QpbSlides.choose(hello, [new File(opt.slide).toURI()], false)
        // 5. Cancel a running slide job (model 'slow', 50 ms per tile).
        QpbClient observer = new QpbClient(opt.address)
        observer.hello()
        QpbJobRunner slow = new QpbJobRunner(client: c, card: c.model('slow'), log: log, image: image,
                pollIntervalMs: 50, progressIntervalMs: 0)
        Map outcome = [:]
        Thread worker = new Thread({
            try {
                slow.runSlide(new File(opt.slide).getAbsolutePath(), null, null)
                outcome.result = 'finished'
            } catch (Throwable e) {
                outcome.result = 'threw'
                outcome.error = errorInfo(e)
            }
        } as Runnable, 'script-thread')
        worker.start()
        long waitUntil = System.currentTimeMillis() + 30000
        while (slow.tilesSent < 3 && worker.isAlive() && System.currentTimeMillis() < waitUntil) Thread.sleep(20)
        String slowJob = slow.jobId
        Map before = slowJob == null ? null : observer.jobStatus(slowJob)
        long interruptedAt = System.nanoTime()
        worker.interrupt()
        worker.join(30000)
        double returnSeconds = (System.nanoTime() - interruptedAt) / 1e9d
        Map after
        try {
            after = observer.jobStatus(slowJob)
        } catch (QpbException e) {
            after = [error: e.code]
        }
        observer.close()
        out.cancel = [state_before: before?.state, tiles_before: before?.tiles_done, expected: before?.tiles_expected,
                      outcome: outcome, alive: worker.isAlive(), return_seconds: returnSeconds, after: after]
        out.log = logLines.findAll { it.contains('slide') || it.contains('QuPath') || it.contains('tiles/s') }
        emit(out)
    } finally {
        c.close()
    }
} else if (check == 'cancel') {
    // Interrupt a planned job of the test model 'slow' (50 ms per 64 px tile) part-way.
    String address = opt.address
    BufferedImage img = new BufferedImage(1024, 1024, BufferedImage.TYPE_INT_RGB)
    QpbClient c = new QpbClient(address)
    QpbClient observer = new QpbClient(address)
    try {
        c.hello()
        observer.hello()
        Map card = c.model('slow')
        QpbJobRunner runner = new QpbJobRunner(client: c, card: card, tileSource: bufferedImageSource(img), log: log,
                batchSize: 2, image: [name: 'black', mpp: 1.0d, width: img.getWidth(), height: img.getHeight()])
        Map outcome = [:]
        long[] stoppedAt = [0L] as long[]
        Thread worker = new Thread({
            try {
                runner.runPlanned([x: 0, y: 0, width: img.getWidth(), height: img.getHeight()])
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
        emit([check: 'cancel', tiles: runner.tilesTotal, sent_before_interrupt: before?.tiles_done,
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
            QpbTiling.pixelSize(Double.NaN, card)
            emit([check: 'missing_mpp', error: null])
        } catch (Exception e) {
            emit([check: 'missing_mpp', error: errorInfo(e)])
        }
        // The server's own missing_mpp reply, for a client that sends no pixel size.
        try {
            c.jobOpenPlanned('nuclei', [name: 'x', width: 100, height: 100], [x: 0, y: 0, width: 100, height: 100])
            emit([check: 'server_missing_mpp', error: null])
        } catch (Exception e) {
            emit([check: 'server_missing_mpp', error: errorInfo(e)])
        }
    } finally {
        c.close()
    }
} else if (check == 'busy') {
    QpbClient c = new QpbClient(opt.address)
    long t0 = System.nanoTime()
    try {
        c.call([op: 'predict', model: 'dark', tiles: []], [], 1400L, 1)
        emit([check: 'busy', error: null, seconds: (System.nanoTime() - t0) / 1e9])
    } catch (Exception e) {
        emit([check: 'busy', error: errorInfo(e), seconds: (System.nanoTime() - t0) / 1e9])
    } finally {
        c.close()
    }
} else if (check == 'curve') {
    for (String keyed : ['without', 'with']) {
        long t0 = System.nanoTime()
        QpbClient c = new QpbClient(opt.address, 1500, keyed == 'with' ? opt.key : null, opt.client ?: null)
        try {
            Map h = c.hello()
            emit([check: "curve_${keyed}_key".toString(), error: null, protocol: h.protocol, seconds: (System.nanoTime() - t0) / 1e9,
                  jeromq: QpbZmq.version()])
        } catch (Exception e) {
            emit([check: "curve_${keyed}_key".toString(), error: errorInfo(e), seconds: (System.nanoTime() - t0) / 1e9,
                  jeromq: QpbZmq.version()])
        } finally {
            c.close()
        }
    }
} else if (check == 'nojeromq') {
    try {
        new QpbClient('tcp://127.0.0.1:1')
        emit([check: 'nojeromq', error: null])
    } catch (Exception e) {
        emit([check: 'nojeromq', error: errorInfo(e)])
    }
} else if (check == 'plan') {
    // Reads for a server plan, regions, progress text and the server-side reading decision (no server needed).
    Map plan = [downsample: 1.9d, tile_size: 512, overlap: 32, rows: 1, cols: 3, tiles: [
            [x: 100, y: 50, width: 512, height: 512, downsample: 1.9d],
            [x: 1012, y: 50, width: 512, height: 512, downsample: 1.9d],
            [x: 1924, y: 50, width: 170, height: 512, downsample: 1.9d]]]
    List<QpbTile> reads = QpbTiling.fromPlan(plan, 2240, 1000)
    List regions = [QpbTiling.region(10.4, 20.6, 100.2, 50.1, 1000, 1000), QpbTiling.region(-5, -5, 20, 20, 1000, 1000),
                    QpbTiling.region(990.5, 10, 100, 10, 1000, 1000), QpbTiling.region(2000, 10, 100, 10, 1000, 1000)]
    QpbProgress p = new QpbProgress('qpbridge nuclei', 200, { String s -> })
    Map card = [name: 'm', mpp: 0.5, requires_mpp: true]
    Map free = [name: 'f', mpp: 1.0, requires_mpp: false]
    // Files below and outside a slide root, and links crossing it (compared as canonical paths).
    File tmp = File.createTempFile('qpb', '')
    tmp.delete()
    File root = new File(tmp, 'root'), other = new File(tmp, 'other')
    root.mkdirs()
    other.mkdirs()
    File inRoot = new File(root, 'a b.tif'), outRoot = new File(other, 'b.tif')
    inRoot.text = 'x'
    outRoot.text = 'y'
    File linkOut = new File(root, 'link-out.tif'), linkIn = new File(other, 'link-in.tif')
    java.nio.file.Files.createSymbolicLink(linkOut.toPath(), outRoot.toPath())
    java.nio.file.Files.createSymbolicLink(linkIn.toPath(), inRoot.toPath())
    Map hello = [capabilities: ['jobs', 'slide-jobs'], slide_roots: [root.getPath() + '/../root']]
    Map decisions = [
            inside    : QpbSlides.choose(hello, [inRoot.toURI()], true),
            inside_str: QpbSlides.choose(hello, [inRoot.toURI().toString()], true),
            outside   : QpbSlides.choose(hello, [outRoot.toURI()], true),
            link_out  : QpbSlides.choose(hello, [linkOut.toURI()], true),
            link_in   : QpbSlides.choose(hello, [linkIn.toURI()], true),
            missing   : QpbSlides.choose(hello, [new File(root, 'nope.tif').toURI()], true),
            not_file  : QpbSlides.choose(hello, [new URI('https://example.org/a.tif')], true),
            two_files : QpbSlides.choose(hello, [inRoot.toURI(), outRoot.toURI()], true),
            no_uris   : QpbSlides.choose(hello, [], true),
            no_cap    : QpbSlides.choose([capabilities: ['jobs'], slide_roots: []], [inRoot.toURI()], true),
            disabled  : QpbSlides.choose(hello, [inRoot.toURI()], false)]
    [linkOut, linkIn, inRoot, outRoot, root, other, tmp].each { it.delete() }
    Map mpp = [:]
    try {
        QpbTiling.pixelSize(null, card)
    } catch (QpbException e) {
        mpp.required = errorInfo(e)
    }
    mpp.free = QpbTiling.pixelSize(Double.NaN, free)
    mpp.given = QpbTiling.pixelSize(0.25d, card)
    emit([check: 'plan', reads: reads.collect { [it.x, it.y, it.width, it.height, it.downsample, it.outWidth, it.outHeight] },
          regions: regions, progress: p.line(50), eta: QpbProgress.formatSeconds(3725),
          server_line: QpbProgress.format('qpbridge x', 5, 10, 2.5d, 2d), decisions: decisions, root: root.getCanonicalPath(),
          mpp: mpp])
} else {
    System.err.println("unknown check '${check}'")
    System.exit(2)
}
}
