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
    final String address
    long connectTimeoutMs = 5000
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
                return checkReply(reply)
            }
            // No reply: drop the socket with its queued messages (linger 0) and try again on a fresh one.
            closeSocket()
            if (!everAnswered) break
        }
        if (!everAnswered) {
            throw new QpbException('server_unavailable',
                    "No qpbridge server answered at ${address} within ${seconds(Math.min(timeoutMs, connectTimeoutMs))} s. " +
                    "Start one with `qpbridge serve` (it listens on ${QpbVersion.DEFAULT_ADDRESS} by default), " +
                    'check the address in the script parameters, and for a server on another machine that it was ' +
                    'started with --bind tcp://0.0.0.0:PORT --allow-remote and that no firewall blocks the port.',
                    [address: address])
        }
        throw new QpbException('timeout',
                "The qpbridge server at ${address} did not answer '${op}' within ${seconds(timeoutMs)} s " +
                "(${attempts} attempt(s)). It may be overloaded or stopped: check its log, or raise the timeout.",
                [address: address, op: op])
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
