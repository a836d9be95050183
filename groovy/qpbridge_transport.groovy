/*
 * qpbridge Groovy client library, part 1 of 3: transport (protocol v1, see docs/protocol.md).
 * Versions, the library's exceptions, Gson helpers, and one ZeroMQ DEALER connection over JeroMQ.
 *
 * Needs only the JDK, Gson (bundled with QuPath) and JeroMQ (loaded by reflection, so a missing jar is a
 * clear error at run time instead of a compile error). QuPath 0.4-0.6 run scripts with Groovy 4.
 *
 * No package statement: `qpbridge install-qupath` inlines the library parts a script names on its
 * `// @qpbridge-include` lines (QuPath cannot import a separate .groovy file); the tests inline them the same way.
 */
import com.google.gson.Gson
import com.google.gson.GsonBuilder
import com.google.gson.JsonArray
import com.google.gson.JsonElement
import com.google.gson.JsonObject

import java.util.concurrent.Callable
import java.util.concurrent.ExecutionException
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors
import java.util.concurrent.Future
import java.util.concurrent.ThreadFactory
import java.util.concurrent.TimeUnit
import java.util.concurrent.TimeoutException
import java.util.concurrent.atomic.AtomicBoolean

/** Version constants shared by every part of the library. */
class QpbVersion {
    static final String LIBRARY = '0.1.0'
    static final int PROTOCOL = 1
    static final String DEFAULT_ADDRESS = 'tcp://127.0.0.1:5555'
}

/** Every error the library raises on purpose: a stable code plus a message that says what to do. */
class QpbException extends RuntimeException {
    final String code
    final Map details

    QpbException(String code, String message, Map details = null, Throwable cause = null) {
        super(message, cause)
        this.code = code
        this.details = details == null ? [:] : details
    }
}

/** Thrown when the user stops the script ("Kill running script"): the server job was cancelled. */
class QpbCancelledException extends InterruptedException {
    QpbCancelledException(String message) { super(message) }
}

/** Gson helpers; groovy.json is not shipped with QuPath. */
class QpbJson {
    static final Gson GSON = new GsonBuilder().disableHtmlEscaping().create()

    static String toJson(Object o) { GSON.toJson(o) }

    static JsonObject parseObject(String s) { GSON.fromJson(s, JsonObject) }

    /** A JSON tree as plain Groovy values (Map, List, String, Double, Boolean, null). */
    static Object plain(JsonElement e) { e == null || e.isJsonNull() ? null : GSON.fromJson(e, Object) }

    static Integer intOrNull(JsonObject o, String key) {
        JsonElement e = o.get(key)
        e == null || e.isJsonNull() ? null : e.getAsInt()
    }

    static String stringOrNull(JsonObject o, String key) {
        JsonElement e = o.get(key)
        e == null || e.isJsonNull() ? null : e.getAsString()
    }

    /** The elements of an array (empty for null), as parsed: nothing is serialised again. */
    static List<JsonElement> elements(JsonArray a) {
        List<JsonElement> out = new ArrayList<JsonElement>(a == null ? 0 : a.size())
        if (a != null) {
            for (JsonElement e : a) out.add(e)
        }
        out
    }
}

/**
 * One ZeroMQ DEALER connection. All socket work happens on one private daemon thread, so an interrupt of the
 * caller (QuPath's "Kill running script") can never reach JeroMQ, whose NIO pipes are closed by interrupts;
 * the caller only waits on a Future and can give up at once.
 */
class QpbConnection {
    /** Time left for the answer to a request sent again after a `busy` reply. */
    static final long BUSY_ANSWER_MS = 500
    final String address
    long connectTimeoutMs = 5000
    /** The server's CURVE public key (40 characters of Z85, or a .key file from `qpbridge keys new`) for a
     *  server started with --curve-secret; null for a server on loopback without authentication. */
    String serverKey = null
    /** This client's key pair (a .key_secret file) when the server keeps an allow-list (--curve-clients);
     *  null: a fresh key pair per connection. */
    String clientKeyFile = null
    private final ExecutorService io
    private Object context
    private Object socket
    private long nextId = 1
    private boolean everAnswered = false

    QpbConnection(String address) {
        this.address = address
        QpbZmq.check()
        this.io = Executors.newSingleThreadExecutor({ Runnable r ->
            Thread t = new Thread(r, 'qpbridge-io')
            t.setDaemon(true)
            t
        } as ThreadFactory)
    }

    /** Send one request and wait for its reply header; server errors become QpbException(code). */
    JsonObject request(Map header, List<byte[]> payloads = [], long timeoutMs = 60000, int attempts = 2) {
        await(submit(header, payloads, timeoutMs, attempts))
    }

    /** Start a request on the I/O thread; pair with await(). */
    QpbPending submit(Map header, List<byte[]> payloads = [], long timeoutMs = 60000, int attempts = 2) {
        final Map h = new LinkedHashMap(header)
        if (!h.containsKey('v')) h.v = QpbVersion.PROTOCOL
        final List<byte[]> frames = payloads == null ? [] : payloads
        final AtomicBoolean abort = new AtomicBoolean(false)
        final long timeout = timeoutMs
        final int tries = attempts
        Future<JsonObject> f = io.submit({ -> exchange(h, frames, timeout, tries, abort) } as Callable<JsonObject>)
        new QpbPending(future: f, abort: abort)
    }

    /** Wait for a submitted request. On interrupt the I/O thread is told to stop waiting, then we rethrow. */
    JsonObject await(QpbPending p) {
        try {
            return p.future.get()
        } catch (InterruptedException e) {
            p.abort.set(true)
            throw e
        } catch (ExecutionException e) {
            throw e.getCause()
        }
    }

    private JsonObject exchange(Map header, List<byte[]> payloads, long timeoutMs, int attempts, AtomicBoolean abort) {
        String op = String.valueOf(header.op)
        for (int attempt = 1; attempt <= attempts; attempt++) {
            ensureSocket()
            Object id = nextId++
            header.id = id
            resend(header, payloads)
            long wait = everAnswered ? timeoutMs : Math.min(timeoutMs, connectTimeoutMs)
            long deadline = System.nanoTime() + wait * 1000000L
            while (System.nanoTime() < deadline) {
                if (abort.get()) throw new QpbException('aborted', "request '${op}' abandoned")
                List<byte[]> parts = receive()
                if (parts == null) continue
                JsonObject reply
                try {
                    reply = QpbJson.parseObject(new String(parts[parts.size() - 1], 'UTF-8'))
                } catch (Exception ignored) {
                    continue
                }
                if (reply == null || !idMatches(reply, id)) continue // a late reply to a request we gave up on
                everAnswered = true
                Long retry = busyRetryMs(reply)
                // Retry only while the wait and the retry's answer still fit before the deadline; else the busy
                // answer stands (never a 'no reply' from a server that did reply).
                if (retry != null && System.nanoTime() + (retry + BUSY_ANSWER_MS) * 1000000L < deadline) {
                    // The server is full (per-client fair share): wait as it asks and send again.
                    Thread.sleep(retry)
                    id = nextId++
                    header.id = id
                    resend(header, payloads)
                    continue
                }
                return checkReply(reply)
            }
            // No reply: drop the socket with its queued messages (linger 0) and try again on a fresh one.
            closeSocket()
            if (!everAnswered) break
        }
        if (!everAnswered && serverKey != null) {
            throw new QpbException('auth',
                    "No answer from the qpbridge server at ${address} with CURVE authentication: check that " +
                    'SERVER_KEY is the public key of this server (its server.key file), that the server was ' +
                    'started with --curve-secret, and, if it keeps an allow-list (--curve-clients), that this ' +
                    "client's key is in it (CLIENT_KEY_FILE).", [address: address])
        }
        if (!everAnswered) {
            throw new QpbException('server_unavailable',
                    "No qpbridge server answered at ${address} within ${seconds(Math.min(timeoutMs, connectTimeoutMs))} s. " +
                    "Start one with `qpbridge serve` (it listens on ${QpbVersion.DEFAULT_ADDRESS} by default), " +
                    'check the address in the script parameters, and for a server on another machine that it was ' +
                    'started with --bind tcp://0.0.0.0:PORT --curve-secret FILE (then set SERVER_KEY to its public key) ' +
                    'and that no firewall blocks the port. A server that requires CURVE does not answer a client ' +
                    'without SERVER_KEY.',
                    [address: address])
        }
        throw new QpbException('timeout',
                "The qpbridge server at ${address} did not answer '${op}' within ${seconds(timeoutMs)} s " +
                "(${attempts} attempt(s)). It may be overloaded or stopped: check its log, or raise the timeout.",
                [address: address, op: op])
    }

    private void resend(Map header, List<byte[]> payloads) {
        socket.sendMore(new byte[0])
        byte[] head = QpbJson.toJson(header).getBytes('UTF-8')
        if (payloads.isEmpty()) {
            socket.send(head, 0)
        } else {
            socket.sendMore(head)
            for (int i = 0; i < payloads.size(); i++) {
                if (i < payloads.size() - 1) socket.sendMore(payloads[i]) else socket.send(payloads[i], 0)
            }
        }
    }

    /** The wait a `busy` error reply asks for, else null. */
    private static Long busyRetryMs(JsonObject reply) {
        JsonElement ok = reply.get('ok')
        if (ok == null || !ok.isJsonPrimitive() || ok.getAsBoolean() || !reply.has('error')) return null
        JsonObject err = reply.getAsJsonObject('error')
        if (QpbJson.stringOrNull(err, 'code') != 'busy') return null
        JsonObject details = err.has('details') && err.get('details').isJsonObject() ? err.getAsJsonObject('details') : null
        Integer ms = details == null ? null : QpbJson.intOrNull(details, 'retry_after_ms')
        Math.max(10L, Math.min(ms == null ? 500L : ms.longValue(), 30000L))
    }

    private static boolean idMatches(JsonObject reply, Object id) {
        JsonElement e = reply.get('id')
        if (e == null || e.isJsonNull()) {
            // A server that could not read our header (e.g. unsupported_version) cannot echo the id.
            JsonElement ok = reply.get('ok')
            return ok != null && ok.isJsonPrimitive() && !ok.getAsBoolean()
        }
        e.isJsonPrimitive() && e.getAsJsonPrimitive().isNumber() && e.getAsLong() == ((Number) id).longValue()
    }

    private static String seconds(long ms) { String.format(Locale.ROOT, '%.1f', ms / 1000d) }

    private JsonObject checkReply(JsonObject reply) {
        JsonElement ok = reply.get('ok')
        if (ok != null && ok.isJsonPrimitive() && ok.getAsBoolean()) return reply
        JsonObject err = reply.has('error') && reply.get('error').isJsonObject() ? reply.getAsJsonObject('error') : new JsonObject()
        String code = QpbJson.stringOrNull(err, 'code') ?: 'error'
        String message = QpbJson.stringOrNull(err, 'message') ?: 'the server reported an error without a message'
        Map details = err.has('details') ? (Map) QpbJson.plain(err.get('details')) : [:]
        throw new QpbException(code, message, details)
    }

    /** One whole multipart message, or null after the short receive timeout. */
    private List<byte[]> receive() {
        byte[] first = socket.recv(0)
        if (first == null) return null
        List<byte[]> parts = [first]
        while (socket.hasReceiveMore()) parts.add(socket.recv(0))
        parts
    }

    private void ensureSocket() {
        if (socket != null) return
        if (context == null) context = QpbZmq.newContext()
        socket = QpbZmq.dealer(context)
        if (serverKey != null) QpbZmq.curve(socket, serverKey, clientKeyFile)
        socket.connect(address)
    }

    private void closeSocket() {
        if (socket == null) return
        try {
            socket.close()
        } catch (Exception ignored) {
            // closing a broken socket must not hide the real error
        }
        socket = null
    }

    private Object closeAll() {
        closeSocket()
        if (context != null) {
            try {
                QpbZmq.closeContext(context)
            } catch (Exception ignored) {
                // best effort
            }
            context = null
        }
        null
    }

    /** Close the socket and context on the I/O thread; never blocks the caller for more than a few seconds. */
    void close() {
        Future f = io.submit({ -> closeAll() } as Callable<Object>)
        boolean interrupted = Thread.interrupted()
        try {
            f.get(3, TimeUnit.SECONDS)
        } catch (InterruptedException e) {
            interrupted = true
        } catch (TimeoutException e) {
            // a close stuck in JeroMQ is left to the daemon thread
        } catch (ExecutionException e) {
            // best effort
        } finally {
            io.shutdown()
            if (interrupted) Thread.currentThread().interrupt()
        }
    }
}

/** A request in flight: its Future and the flag that tells the I/O thread to stop waiting for it. */
class QpbPending {
    Future<JsonObject> future
    AtomicBoolean abort
}

/** JeroMQ through reflection, so the library compiles and fails with a useful message without the jar. */
class QpbZmq {
    static final String INSTALL_HINT =
            'JeroMQ is not on the classpath. Run `qpbridge install-qupath` (it copies the jar), or copy a ' +
            'jeromq-0.5.x/0.6.x jar into the "extensions" folder of your QuPath user directory ' +
            '(Edit > Preferences > QuPath user directory, e.g. ~/QuPath/v0.6/extensions), then restart QuPath. ' +
            'Outside QuPath put the jar on the classpath (-cp).'

    static Class load(String name) {
        List<ClassLoader> loaders = [QpbZmq.classLoader, Thread.currentThread().getContextClassLoader()]
        for (ClassLoader l : loaders) {
            if (l == null) continue
            try {
                return Class.forName(name, true, l)
            } catch (ClassNotFoundException ignored) {
                // try the next loader
            } catch (NoClassDefFoundError ignored) {
                // same
            }
        }
        throw new QpbException('jeromq_missing', INSTALL_HINT, [missing: name])
    }

    static void check() { load('org.zeromq.ZMQ') }

    static Object newContext() { load('org.zeromq.ZContext').getDeclaredConstructor().newInstance() }

    static Object dealer(Object context) {
        Class zmq = load('org.zeromq.ZMQ')
        // Integer socket types exist in JeroMQ 0.3 to 0.6 (SocketType only from 0.5).
        Object s = context.createSocket(zmq.getField('DEALER').getInt(null))
        s.setLinger(0)
        s.setReceiveTimeOut(100)
        s.setSendTimeOut(5000)
        s
    }

    /**
     * CURVE on a socket: the server's public key, and this client's key pair (from a .key_secret file, or a
     * fresh one). JeroMQ speaks CURVE from 0.4.0 on, through its jnacl dependency (jnacl-1.0.0.jar, Maven
     * eu.neilalexander:jnacl, beside jeromq-0.5.x/0.6.x in QuPath's extensions folder); 0.3.x cannot.
     */
    static void curve(Object socket, String serverKey, String clientKeyFile) {
        Class curve
        try {
            curve = load('org.zeromq.ZMQ$Curve')
        } catch (QpbException ignored) {
            curve = null
        }
        if (curve == null || !socket.metaClass.respondsTo(socket, 'setCurveServerKey', byte[])) {
            throw new QpbException('curve_unsupported', "This server needs CURVE authentication, which JeroMQ " +
                    "${version()} cannot do: put jeromq-0.6.0.jar and jnacl-1.0.0.jar in QuPath's extensions " +
                    'folder (instead of the older jeromq jar), then restart QuPath.', [jeromq: version()])
        }
        String pub
        String sec
        try {
            if (clientKeyFile != null) {
                pub = keyFrom(clientKeyFile, 'public-key')
                sec = keyFrom(clientKeyFile, 'secret-key')
            } else {
                Object pair = curve.getMethod('generateKeyPair').invoke(null)
                pub = (String) pair.publicKey
                sec = (String) pair.secretKey
            }
            socket.setCurveServerKey(z85(curve, keyFrom(serverKey, 'public-key')))
            socket.setCurvePublicKey(z85(curve, pub))
            socket.setCurveSecretKey(z85(curve, sec))
        } catch (NoClassDefFoundError e) {
            throw new QpbException('curve_unsupported', 'CURVE in JeroMQ needs the jnacl jar (jnacl-1.0.0.jar, ' +
                    "Maven eu.neilalexander:jnacl) beside the jeromq jar in QuPath's extensions folder; it is " +
                    "missing (${e.message}). Add it and restart QuPath.", [jeromq: version()])
        } catch (java.lang.reflect.InvocationTargetException e) {
            if (e.getCause() instanceof NoClassDefFoundError) {
                throw new QpbException('curve_unsupported', 'CURVE in JeroMQ needs the jnacl jar ' +
                        "(jnacl-1.0.0.jar) beside the jeromq jar in QuPath's extensions folder: ${e.getCause().message}",
                        [jeromq: version()])
            }
            throw e
        }
    }

    private static byte[] z85(Class curve, String key) {
        (byte[]) curve.getMethod('z85Decode', String).invoke(null, key)
    }

    /** A key given as its 40 Z85 characters, or read from a ZeroMQ certificate file (`key = "..."` lines). */
    static String keyFrom(String keyOrFile, String field) {
        String s = keyOrFile.trim()
        File f = new File(s)
        if (s.length() == 40 && !f.exists()) return s
        if (!f.isFile()) throw new QpbException('bad_key', "${s} is neither a 40-character CURVE key nor a key file")
        for (String line : f.readLines('US-ASCII')) {
            def m = line =~ /^\s*${field}\s*=\s*"(.{40})"\s*$/
            if (m.find()) return m.group(1)
        }
        throw new QpbException('bad_key', "${s} has no ${field} line (use the files `qpbridge keys new` writes)")
    }

    static void closeContext(Object context) {
        // ZContext.close() exists in 0.3.6+, destroy() in all versions.
        if (context.metaClass.respondsTo(context, 'close')) context.close() else context.destroy()
    }

    static String version() {
        try {
            return String.valueOf(load('org.zeromq.ZMQ').getMethod('getVersionString').invoke(null))
        } catch (Exception ignored) {
            return 'unknown'
        }
    }
}
