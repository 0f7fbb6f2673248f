/*
 * loadgen: a small single-threaded closed-loop load generator for echo servers.
 *
 * Build:  cc -O2 -o loadgen bench/loadgen.c -lssl -lcrypto
 *
 * Usage:  loadgen --host 127.0.0.1 --port P --proto pyasync|floor|line
 *                 --connections N --inflight K --size BYTES --warmup SEC --duration SEC
 *                 [--tls] [--tls-insecure] [--cafile PEM] [--keys N]
 *
 * --keys N (pyasync only) sends REQUEST_KV_GET (12) of a random key "key00000".."key<N-1>"
 * instead of ECHO, and counts ANSWER_KV_GET (13) answers: the database benchmark.
 * --tls-insecure skips the certificate check; otherwise the server certificate is verified
 * against --cafile (or the system CAs) and must name --host.
 *
 * It opens N connections (TLS handshakes included) before the warm-up starts, writes K
 * pipelined requests on each and writes a new one for every answer it reads (closed loop).
 * Answers read during the first --warmup seconds are not counted; then it counts for
 * --duration seconds and prints one JSON object on stdout:
 *
 *   {"proto":..,"connections":N,"inflight":K,"size":S,"tls":bool,"duration_s":..,
 *    "requests":..,"rps":..,"mb_per_s":..,"errors":..,"p50_us":..,"p90_us":..,
 *    "p99_us":..,"p999_us":..,"max_us":..}
 *
 * "requests" counts echo answers only; error answers (pyasync ANSWER_ERROR) are counted in
 * "errors" and not in "requests" or the latencies. "mb_per_s" is payload bytes echoed
 * (request payload + answer payload) / 2 per second, in 10^6 bytes. Latency runs from the
 * moment the first byte of a request is handed to the kernel (or to TLS) to the moment its
 * answer has been read completely; it is kept in a log-linear histogram with < 0.8% error.
 *
 * Wire formats (big-endian):
 *   pyasync  18-byte header "!2sBBHIII" (magic "PY", version 1, flags, type, request id,
 *            timeout ms, body length); REQUEST_ECHO (4) with MessagePack {"data": bin},
 *            answered by ANSWER_ECHO (5) or ANSWER_ERROR (1). Compressed answers are not
 *            supported: run the server with compression off (COMPRESSION_THRESHOLD=0).
 *   floor    8-byte header (body length u32, request id u32), then the raw payload; echoed.
 *   line     one JSON string of --size letters and "\n" per request; answers in order.
 *
 * Publish/subscribe mode (--mode pubsub, plain TCP only):
 *
 *   loadgen --port P --proto pyasync|floor|socketio --mode pubsub --subscribers N
 *           [--window W] [--rate R] [--topic T] [--size BYTES] [--warmup SEC] [--duration SEC]
 *           [--cpu-pid PID] [--publish-port P2]
 *
 * It opens N subscriber connections and one publisher connection, subscribes each subscriber to
 * --topic (and waits for every subscription to be confirmed), then publishes --size-byte
 * messages (32 by default, and at least: 16 hex digits of a sequence number, 16 of the send
 * time in ns, 'x' after) on the publisher connection. Without --rate it publishes at
 * saturation: message n leaves only once every subscriber has received message n-W (the
 * window, default 64), so the publisher always has W messages not yet delivered everywhere.
 * With --rate R it publishes R messages per second (still within the window) to measure
 * latency at a light load. Every subscriber checks that the offsets it receives run without
 * hole or duplicate (each break is an error). After --duration the publisher stops and the
 * subscribers are given the time to receive everything published (for as long as deliveries go
 * on, 5 s without one at most, 120 s in all); what they still miss then is "lost". Output, one
 * JSON object:
 *
 *   {"mode":"pubsub","proto":..,"subscribers":N,"window":W,"rate":R,"size":S,"duration_s":..,
 *    "messages":..,"messages_per_s":..,"deliveries":..,"deliveries_per_s":..,"published":..,
 *    "errors":..,"lost":..,"p50_us":..,"p90_us":..,"p99_us":..,"max_us":..,
 *    "client_cpu_percent":..,"server_cpu_percent":..}
 *
 * "deliveries" counts messages read by a subscriber during the measured window; "messages"
 * counts messages that reached every subscriber during it. Latency runs from the moment the
 * publisher wrote the message (its send time is in the data) to the moment a subscriber read it,
 * one sample per delivery. "server_cpu_percent" is the CPU use of process --cpu-pid over the
 * measured window (null without it); "client_cpu_percent" is this process's own. With
 * --publish-port the publisher connects to that port instead (another node of one cluster, sharing
 * the subscribers' server's broker), so that every message crosses from one node to the other.
 *
 *   pyasync   SUBSCRIBE (20) {"topic"} answered by ANSWER_SUBSCRIBE (21) {"subscription",
 *             "position",..}; PUBLISH (24) {"topic","data"} answered by ANSWER_PUBLISH (25);
 *             pushed EVENT_MESSAGE (40, request id 0) {"subscription","topic","offset","data"}
 *             and EVENT_GAP (41, counted as an error).
 *   floor     bench/floor_pubsub.py: 8-byte header (body length u32, kind u32); SUBSCRIBE (1,
 *             empty) answered by kind 1 with the topic's offset (u64); PUBLISH (2, the data)
 *             answered by kind 2 with the message's offset; MESSAGE (3): offset u64 and data.
 *   socketio  Socket.IO 5 over Engine.IO 4 over WebSocket (bench/peers/socketio_server.py):
 *             GET /socket.io/?EIO=4&transport=websocket, "40" to join the namespace, the event
 *             ["subscribe", topic] with an acknowledgement; the publisher emits
 *             ["publish", topic, data], subscribers receive ["message", data]. Text frames
 *             only, no compression; the sequence number in the data stands in for the offset.
 *
 * Exit status: 0 done, 1 the server closed a connection or sent something unexpected,
 * 2 a connection (or TLS handshake) could not be set up or bad arguments.
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

/* ---------------------------------------------------------------------------------------- */
/* Settings and globals                                                                      */

enum proto { P_PYASYNC, P_FLOOR, P_LINE, P_SOCKETIO };
enum mode { M_ECHO, M_PUBSUB };

#define PY_HEADER 18
#define FLOOR_HEADER 8
#define PFX_MAX 32                     /* largest request prefix (header + body preamble) */
#define MAX_BODY (1024u * 1024u * 1024u) /* sanity limit on an answer body */
#define RBUF_INIT (64 * 1024)
#define RMIN_FREE (16 * 1024)
#define RBIG (64 * 1024)               /* frames above this are read exactly, never moved */
#define WBUF_MAX (256 * 1024)          /* TLS staging buffer limit per connection */
#define IOV_BATCH 256
#define MAX_EVENTS 256
#define SETUP_TIMEOUT_NS (30ull * 1000000000ull)

static const char *opt_host = "127.0.0.1";
static int opt_port = -1;
static enum proto opt_proto = P_PYASYNC;
static long opt_keys = 0; /* pyasync: > 0 sends KV_GET of "key00000".."key<N-1>" instead of ECHO */
static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static const char *opt_proto_name = NULL;
static long opt_conns = 1;
static long opt_inflight = 1;
static long opt_size = 32;
static double opt_warmup = 1.0;
static double opt_duration = 5.0;
static int opt_tls = 0;
static int opt_insecure = 0;
static const char *opt_cafile = NULL;
static enum mode opt_mode = M_ECHO;
static long opt_subscribers = 100;     /* pubsub: subscriber connections */
static long opt_window = 64;           /* pubsub: messages not yet delivered everywhere, at most */
static double opt_rate = 0.0;          /* pubsub: messages per second; 0 = saturation */
static const char *opt_topic = "bench.t";
static long opt_cpu_pid = 0;           /* pubsub: report this process's CPU use too */
static int opt_publish_port = -1;      /* pubsub: the publisher's server, if not --port's */

static uint32_t K;                     /* requests in flight per connection */
static unsigned char *g_payload;       /* shared request payload (size bytes) */
static size_t g_size;                  /* payload bytes */
static unsigned char g_prefix[PFX_MAX]; /* request prefix template */
static size_t g_plen;                  /* prefix bytes */
static const unsigned char *g_suffix = (const unsigned char *)"\"\n";
static size_t g_slen;                  /* suffix bytes (line only) */
static size_t g_reqlen;                /* whole request on the wire */
static uint32_t g_bodylen;             /* request body length (pyasync, floor) */
static size_t g_linelen;               /* expected answer line, newline included */

static int g_ep = -1;
static SSL_CTX *g_ctx;

/* phases: -1 setup, 0 warm-up, 1 measuring, 2 done */
static int g_phase = -1;
static uint64_t g_warm_end, g_t_start, g_t_stop, g_dur_ns;
static uint64_t g_requests, g_errors;

/* ---------------------------------------------------------------------------------------- */
/* Small helpers                                                                             */

static void die(int code, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
static void die(int code, const char *fmt, ...)
{
    va_list ap;
    fputs("loadgen: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(code);
}

static const char *ssl_errstr(void)
{
    static char buf[256];
    unsigned long e = ERR_get_error();
    if (e == 0)
        return errno ? strerror(errno) : "unknown error";
    ERR_error_string_n(e, buf, sizeof buf);
    ERR_clear_error();
    return buf;
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint32_t be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint16_t be16(const unsigned char *p) { return (uint16_t)((p[0] << 8) | p[1]); }

static inline void put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        die(2, "out of memory (%zu bytes)", n);
    return p;
}

static void *xcalloc(size_t n, size_t m)
{
    void *p = calloc(n ? n : 1, m ? m : 1);
    if (!p)
        die(2, "out of memory");
    return p;
}

/* ---------------------------------------------------------------------------------------- */
/* Latency histogram: log-linear, nanoseconds, 128 sub-buckets per power of two (< 0.8%)     */

#define H_SUBBITS 7
#define H_SUB (1u << H_SUBBITS)
#define H_BUCKETS (2 * H_SUB + 32 * H_SUB)
#define H_MAX_NS (60ull * 1000000000ull)

static uint64_t g_hist[H_BUCKETS];
static uint64_t g_hist_max;

static inline unsigned h_index(uint64_t v)
{
    if (v < 2 * H_SUB)
        return (unsigned)v;
    unsigned msb = 63u - (unsigned)__builtin_clzll(v);
    unsigned shift = msb - H_SUBBITS;
    return 2 * H_SUB + (shift - 1) * H_SUB + (unsigned)((v >> shift) - H_SUB);
}

static inline void h_record(uint64_t v)
{
    if (v > H_MAX_NS)
        v = H_MAX_NS;
    if (v > g_hist_max)
        g_hist_max = v;
    g_hist[h_index(v)]++;
}

/* middle of a bucket, in ns */
static double h_value(unsigned idx)
{
    if (idx < 2 * H_SUB)
        return (double)idx;
    unsigned k = idx - 2 * H_SUB;
    unsigned shift = k / H_SUB + 1;
    uint64_t lo = (uint64_t)(k % H_SUB + H_SUB) << shift;
    uint64_t width = 1ull << shift;
    return (double)lo + (double)(width - 1) / 2.0;
}

static double h_percentile_us(double pct, uint64_t total)
{
    if (total == 0)
        return 0.0;
    uint64_t target = (uint64_t)((double)total * pct / 100.0 + 0.999999);
    if (target < 1)
        target = 1;
    if (target > total)
        target = total;
    uint64_t seen = 0;
    for (unsigned i = 0; i < H_BUCKETS; i++) {
        seen += g_hist[i];
        if (seen >= target) {
            double v = h_value(i);
            if (v > (double)g_hist_max)
                v = (double)g_hist_max;
            return v / 1000.0;
        }
    }
    return (double)g_hist_max / 1000.0;
}

/* ---------------------------------------------------------------------------------------- */
/* Connections                                                                               */

struct conn {
    int fd;
    int state;                 /* 0 connecting, 1 TLS handshake, 2 ready */
    SSL *ssl;
    uint32_t events;           /* registered epoll events */
    int out_blocked;           /* a write could not complete: wait for EPOLLOUT */
    int tls_read_wants_write;  /* SSL_read returned WANT_WRITE */

    /* read side: bytes [rpos, rlen) of rbuf are unparsed */
    unsigned char *rbuf;
    size_t rcap, rpos, rlen;
    size_t rneed;              /* bytes the frame at rpos needs, 0 if unknown */
    size_t rscan;              /* line: bytes after rpos already searched for '\n' */

    /* per request slot */
    uint64_t *ts;              /* send time */
    uint32_t *ids;             /* request id on the wire */
    uint32_t *gen;             /* reuse counter, to make ids differ */
    unsigned char *busy;       /* in flight (queued or sent, not answered) */
    unsigned char *pfx;        /* per-slot prefix (pyasync, floor): K * PFX_MAX */
    uint32_t line_next;        /* line: slot of the next expected answer */

    /* write queue: ring of slots, head request has qoff bytes written */
    uint32_t *q;
    uint32_t qhead, qcount;
    size_t qoff;

    /* TLS staging buffer: bytes [wpos, wlen) still to go to SSL_write; in pubsub mode the
       plain output buffer of the connection */
    unsigned char *wbuf;
    size_t wcap, wpos, wlen;

    /* pubsub mode */
    int ps_state;              /* handshake progress, PS_READY once subscribed */
    uint64_t got;              /* messages received (subscriber) */
    uint64_t last;             /* offset (socketio: sequence) of the last message received */
    int64_t sub_id;            /* pyasync: the subscription's id */
    char ws_accept[32];        /* socketio: the Sec-WebSocket-Accept the server must send */
};

static struct conn *g_conns;

static void set_events(struct conn *c)
{
    uint32_t ev = EPOLLIN;
    if (c->out_blocked || c->tls_read_wants_write)
        ev |= EPOLLOUT;
    if (ev == c->events)
        return;
    struct epoll_event e = {.events = ev, .data.ptr = c};
    if (epoll_ctl(g_ep, EPOLL_CTL_MOD, c->fd, &e) < 0)
        die(1, "epoll_ctl: %s", strerror(errno));
    c->events = ev;
}

static inline const unsigned char *prefix_of(const struct conn *c, uint32_t slot)
{
    return opt_proto == P_LINE ? g_prefix : c->pfx + (size_t)slot * PFX_MAX;
}

/* Queue the request of a free slot (with a fresh id). */
static inline void enqueue(struct conn *c, uint32_t slot)
{
    if (opt_proto != P_LINE) {
        uint64_t id = (uint64_t)(++c->gen[slot]) * K + slot + 1;
        if (id > 0xFFFFFFFFull) {
            c->gen[slot] = 0;
            id = slot + 1;
        }
        c->ids[slot] = (uint32_t)id;
        put32(c->pfx + (size_t)slot * PFX_MAX + (opt_proto == P_PYASYNC ? 6 : 4), (uint32_t)id);
        if (opt_keys) { /* a random key: the 5 digits after "key" in the body */
            g_rng ^= g_rng << 13;
            g_rng ^= g_rng >> 7;
            g_rng ^= g_rng << 17;
            unsigned long k = (unsigned long)(g_rng % (uint64_t)opt_keys);
            unsigned char *digits = c->pfx + (size_t)slot * PFX_MAX + PY_HEADER + 9;
            for (int i = 4; i >= 0; i--, k /= 10)
                digits[i] = (unsigned char)('0' + k % 10);
        }
    }
    c->busy[slot] = 1;
    uint32_t tail = c->qhead + c->qcount;
    if (tail >= K)
        tail -= K;
    c->q[tail] = slot;
    c->qcount++;
}

/* Describe up to maxbytes of queued request bytes as iovecs, without copying. */
static int gather(const struct conn *c, struct iovec *iov, int maxiov, size_t maxbytes,
                  size_t *outbytes)
{
    int n = 0;
    size_t bytes = 0, off = c->qoff;
    uint32_t pos = c->qhead;
    for (uint32_t i = 0; i < c->qcount && bytes < maxbytes && n + 3 <= maxiov; i++) {
        uint32_t slot = c->q[pos];
        if (++pos == K)
            pos = 0;
        const unsigned char *segp[3] = {prefix_of(c, slot), g_payload, g_suffix};
        size_t segl[3] = {g_plen, g_size, g_slen};
        for (int s = 0; s < 3 && bytes < maxbytes; s++) {
            if (off >= segl[s]) {
                off -= segl[s];
                continue;
            }
            size_t l = segl[s] - off;
            if (l > maxbytes - bytes)
                l = maxbytes - bytes;
            iov[n].iov_base = (void *)(segp[s] + off);
            iov[n].iov_len = l;
            n++;
            bytes += l;
            off = 0;
        }
        off = 0;
    }
    *outbytes = bytes;
    return n;
}

/* w bytes of the queue went out: stamp requests whose first byte left, drop finished ones. */
static inline void advance(struct conn *c, size_t w, uint64_t now)
{
    while (w > 0) {
        uint32_t slot = c->q[c->qhead];
        if (c->qoff == 0)
            c->ts[slot] = now;
        size_t rem = g_reqlen - c->qoff;
        if (w >= rem) {
            w -= rem;
            c->qoff = 0;
            if (++c->qhead == K)
                c->qhead = 0;
            c->qcount--;
        } else {
            c->qoff += w;
            w = 0;
        }
    }
}

static void flush_tcp(struct conn *c)
{
    struct iovec iov[IOV_BATCH];
    while (c->qcount) {
        size_t bytes;
        int n = gather(c, iov, IOV_BATCH, (size_t)SSIZE_MAX, &bytes);
        uint64_t now = now_ns();
        ssize_t w = writev(c->fd, iov, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                c->out_blocked = 1;
                set_events(c);
                return;
            }
            die(1, "connection %d: closed by server (write: %s)", (int)(c - g_conns),
                strerror(errno));
        }
        advance(c, (size_t)w, now);
        if ((size_t)w < bytes) { /* socket buffer full */
            c->out_blocked = 1;
            set_events(c);
            return;
        }
    }
    c->out_blocked = 0;
    set_events(c);
}

static void flush_tls(struct conn *c)
{
    struct iovec iov[IOV_BATCH];
    for (;;) {
        if (c->wpos < c->wlen) {
            ERR_clear_error();
            int r = SSL_write(c->ssl, c->wbuf + c->wpos, (int)(c->wlen - c->wpos));
            if (r > 0) {
                c->wpos += (size_t)r;
                continue;
            }
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_WRITE) {
                c->out_blocked = 1;
                set_events(c);
                return;
            }
            if (e == SSL_ERROR_WANT_READ) { /* retried after the next read */
                c->out_blocked = 0;
                set_events(c);
                return;
            }
            die(1, "connection %d: TLS write failed (closed by server?): %s",
                (int)(c - g_conns), ssl_errstr());
        }
        c->wpos = c->wlen = 0;
        if (!c->qcount)
            break;
        size_t bytes;
        int n = gather(c, iov, IOV_BATCH, c->wcap, &bytes);
        unsigned char *d = c->wbuf;
        for (int i = 0; i < n; i++) {
            memcpy(d, iov[i].iov_base, iov[i].iov_len);
            d += iov[i].iov_len;
        }
        c->wlen = bytes;
        advance(c, bytes, now_ns());
    }
    c->out_blocked = 0;
    set_events(c);
}

static inline void flush(struct conn *c)
{
    if (c->ssl)
        flush_tls(c);
    else
        flush_tcp(c);
}

static inline int has_output(const struct conn *c) { return c->qcount || c->wpos < c->wlen; }

/* ---------------------------------------------------------------------------------------- */
/* Phases and answers                                                                        */

static void phase_check(uint64_t now)
{
    if (g_phase == 0 && now >= g_warm_end) {
        g_phase = 1;
        g_t_start = now;
        g_requests = g_errors = 0;
        memset(g_hist, 0, sizeof g_hist);
        g_hist_max = 0;
    }
    if (g_phase == 1 && now >= g_t_start + g_dur_ns) {
        g_phase = 2;
        g_t_stop = now;
    }
}

static inline void answered(struct conn *c, uint32_t slot, uint64_t now, int is_error)
{
    if (g_phase == 1) {
        if (is_error)
            g_errors++;
        else {
            g_requests++;
            h_record(now - c->ts[slot]);
        }
    }
    c->busy[slot] = 0;
    enqueue(c, slot);
}

static void show_body(const char *what, struct conn *c, uint32_t type, const unsigned char *b,
                      uint32_t len)
{
    char text[201];
    size_t n = 0;
    for (uint32_t i = 0; i < len && n < sizeof text - 1; i++)
        text[n++] = (b[i] >= 0x20 && b[i] < 0x7f) ? (char)b[i] : '.';
    text[n] = 0;
    die(1, "connection %d: %s (type %u, %u body bytes): %s", (int)(c - g_conns), what, type, len,
        text);
}

static inline uint32_t slot_of_id(struct conn *c, uint32_t id)
{
    uint32_t slot = (id - 1) % K;
    if (id == 0 || !c->busy[slot] || c->ids[slot] != id)
        die(1, "connection %d: answer with unknown request id %u", (int)(c - g_conns), id);
    return slot;
}

/* Parse every complete answer in the read buffer (in place). */
static void parse(struct conn *c, uint64_t now)
{
    for (;;) {
        unsigned char *p = c->rbuf + c->rpos;
        size_t avail = c->rlen - c->rpos;
        if (opt_proto == P_PYASYNC) {
            if (avail < PY_HEADER) {
                c->rneed = PY_HEADER;
                break;
            }
            if (p[0] != 0x50 || p[1] != 0x59 || p[2] != 1 || (p[3] & 0xfe))
                die(1, "connection %d: malformed answer header (magic/version/flags %02x %02x "
                       "%02x %02x)", (int)(c - g_conns), p[0], p[1], p[2], p[3]);
            uint32_t blen = be32(p + 14);
            if (blen > MAX_BODY)
                die(1, "connection %d: malformed answer: body length %u", (int)(c - g_conns),
                    blen);
            if (avail < PY_HEADER + (size_t)blen) {
                c->rneed = PY_HEADER + (size_t)blen;
                break;
            }
            uint16_t type = be16(p + 4);
            uint32_t id = be32(p + 6);
            const unsigned char *body = p + PY_HEADER;
            if (p[3] & 1)
                die(1, "connection %d: compressed answer (flags bit 0); start the server with "
                       "compression off: COMPRESSION_THRESHOLD=0", (int)(c - g_conns));
            if (id == 0)
                show_body("server frame with request id 0", c, type, body, blen);
            if (opt_keys && type == 13) { /* ANSWER_KV_GET: value and version */
                answered(c, slot_of_id(c, id), now, 0);
            } else if (!opt_keys && type == 5) {
                uint32_t slot = slot_of_id(c, id);
                if (blen != g_bodylen ||
                    memcmp(body, g_prefix + PY_HEADER, g_plen - PY_HEADER) != 0)
                    die(1, "connection %d: malformed echo answer (body %u bytes, sent %u)",
                        (int)(c - g_conns), blen, g_bodylen);
                answered(c, slot, now, 0);
            } else if (type == 1) {
                uint32_t slot = slot_of_id(c, id);
                answered(c, slot, now, 1);
            } else {
                show_body("unexpected answer type", c, type, body, blen);
            }
            c->rpos += PY_HEADER + (size_t)blen;
        } else if (opt_proto == P_FLOOR) {
            if (avail < FLOOR_HEADER) {
                c->rneed = FLOOR_HEADER;
                break;
            }
            uint32_t blen = be32(p);
            if (blen != g_bodylen)
                die(1, "connection %d: malformed answer: body length %u, sent %u",
                    (int)(c - g_conns), blen, g_bodylen);
            if (avail < FLOOR_HEADER + (size_t)blen) {
                c->rneed = FLOOR_HEADER + (size_t)blen;
                break;
            }
            uint32_t slot = slot_of_id(c, be32(p + 4));
            answered(c, slot, now, 0);
            c->rpos += FLOOR_HEADER + (size_t)blen;
        } else {
            size_t lim = avail < g_linelen ? avail : g_linelen;
            unsigned char *nl = NULL;
            if (lim > c->rscan)
                nl = memchr(p + c->rscan, '\n', lim - c->rscan);
            if (!nl) {
                if (avail >= g_linelen)
                    die(1, "connection %d: malformed answer: line longer than %zu bytes",
                        (int)(c - g_conns), g_linelen);
                c->rscan = lim;
                c->rneed = g_linelen;
                break;
            }
            size_t len = (size_t)(nl - p) + 1;
            if (len != g_linelen || p[0] != '"' || p[len - 2] != '"')
                die(1, "connection %d: malformed answer line (%zu bytes, expected %zu)",
                    (int)(c - g_conns), len, g_linelen);
            uint32_t slot = c->line_next;
            if (!c->busy[slot])
                die(1, "connection %d: answer line without a request", (int)(c - g_conns));
            if (++c->line_next == K)
                c->line_next = 0;
            answered(c, slot, now, 0);
            c->rpos += len;
            c->rscan = 0;
        }
        c->rneed = 0;
    }
    if (c->rpos == c->rlen)
        c->rpos = c->rlen = c->rscan = 0;
}

/* Make room for the next read; returns how many bytes to ask for. */
static size_t read_space(struct conn *c)
{
    size_t used = c->rlen - c->rpos;
    size_t need_free = c->rneed > used ? c->rneed - used : 0;
    int exact = c->rneed > RBIG && need_free > 0;
    if (need_free < RMIN_FREE)
        need_free = RMIN_FREE;
    if (c->rcap - c->rlen < need_free) {
        if (c->rpos > 0) {
            memmove(c->rbuf, c->rbuf + c->rpos, used);
            c->rpos = 0;
            c->rlen = used;
        }
        if (c->rcap - c->rlen < need_free) {
            size_t ncap = c->rcap * 2;
            if (ncap < c->rlen + need_free)
                ncap = c->rlen + need_free;
            unsigned char *nb = realloc(c->rbuf, ncap);
            if (!nb)
                die(1, "out of memory for a %zu-byte read buffer", ncap);
            c->rbuf = nb;
            c->rcap = ncap;
        }
    }
    /* a large frame is read up to its end only, so that it never has to be moved */
    if (exact)
        return c->rneed - used;
    return c->rcap - c->rlen;
}

static void closed_by_server(struct conn *c)
{
    die(1, "connection %d: closed by server", (int)(c - g_conns));
}

static void on_readable(struct conn *c)
{
    for (;;) {
        size_t space = read_space(c);
        ssize_t n;
        if (c->ssl) {
            ERR_clear_error();
            int want = space > INT32_MAX ? INT32_MAX : (int)space;
            int r = SSL_read(c->ssl, c->rbuf + c->rlen, want);
            if (r <= 0) {
                int e = SSL_get_error(c->ssl, r);
                c->tls_read_wants_write = 0;
                if (e == SSL_ERROR_WANT_READ)
                    break;
                if (e == SSL_ERROR_WANT_WRITE) {
                    c->tls_read_wants_write = 1;
                    set_events(c);
                    break;
                }
                if (e == SSL_ERROR_ZERO_RETURN ||
                    (e == SSL_ERROR_SYSCALL && ERR_peek_error() == 0))
                    closed_by_server(c);
                die(1, "connection %d: TLS read failed: %s", (int)(c - g_conns), ssl_errstr());
            }
            c->tls_read_wants_write = 0;
            n = r;
        } else {
            n = read(c->fd, c->rbuf + c->rlen, space);
            if (n == 0)
                closed_by_server(c);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    break;
                die(1, "connection %d: closed by server (%s)", (int)(c - g_conns),
                    strerror(errno));
            }
        }
        c->rlen += (size_t)n;
        uint64_t now = now_ns();
        phase_check(now);
        if (g_phase == 2)
            return;
        parse(c, now);
        /* plain TCP: a short read means the socket is drained (level-triggered epoll
           reports it again otherwise); TLS: read until WANT_READ, records may be buffered */
        if (!c->ssl && (size_t)n < space)
            break;
    }
    if (c->tls_read_wants_write)
        set_events(c);
    if (has_output(c) && g_phase >= 0)
        flush(c);
}

/* ---------------------------------------------------------------------------------------- */
/* Set-up                                                                                    */

/* A pyasync request header: magic, version 1, no flags, type, request id 0 (set per request),
   timeout 0 (the server's default), body length. */
static void put_py_header(unsigned char *p, unsigned char type, uint32_t bodylen)
{
    p[0] = 0x50;
    p[1] = 0x59;
    p[2] = 1;
    p[3] = 0;
    p[4] = 0;
    p[5] = type;
    put32(p + 6, 0);
    put32(p + 10, 0);
    put32(p + 14, bodylen);
}

static void build_templates(void)
{
    g_size = (size_t)opt_size;
    g_payload = xmalloc(g_size);
    memset(g_payload, 'x', g_size);
    unsigned char *p = g_prefix;
    switch (opt_proto) {
    case P_PYASYNC: {
        if (opt_keys) { /* KV_GET {"key": "keyNNNNN"}: the whole request lives in the prefix */
            static const unsigned char body[14] = {0x81, 0xa3, 'k', 'e', 'y', 0xa8, 'k',
                                                   'e',  'y',  '0', '0', '0', '0', '0'};
            put_py_header(p, 12, sizeof body); /* REQUEST_KV_GET */
            memcpy(p + PY_HEADER, body, sizeof body);
            g_bodylen = sizeof body;
            g_plen = PY_HEADER + sizeof body;
            g_slen = 0;
            g_size = 0;
            break;
        }
        unsigned char bin[5];
        size_t binlen;
        if (g_size <= 0xff) {
            bin[0] = 0xc4;
            bin[1] = (unsigned char)g_size;
            binlen = 2;
        } else if (g_size <= 0xffff) {
            bin[0] = 0xc5;
            bin[1] = (unsigned char)(g_size >> 8);
            bin[2] = (unsigned char)g_size;
            binlen = 3;
        } else {
            bin[0] = 0xc6;
            put32(bin + 1, (uint32_t)g_size);
            binlen = 5;
        }
        g_bodylen = (uint32_t)(6 + binlen + g_size);
        put_py_header(p, 4, g_bodylen); /* REQUEST_ECHO */
        static const unsigned char map[6] = {0x81, 0xa4, 'd', 'a', 't', 'a'};
        memcpy(p + PY_HEADER, map, sizeof map);
        memcpy(p + PY_HEADER + 6, bin, binlen);
        g_plen = PY_HEADER + 6 + binlen;
        g_slen = 0;
        break;
    }
    case P_FLOOR:
        g_bodylen = (uint32_t)g_size;
        put32(p, g_bodylen);
        put32(p + 4, 0);
        g_plen = FLOOR_HEADER;
        g_slen = 0;
        break;
    case P_LINE:
        p[0] = '"';
        g_plen = 1;
        g_slen = 2;
        g_linelen = g_size + 3;
        break;
    case P_SOCKETIO: /* publish/subscribe only: ps_build_templates */
        break;
    }
    g_reqlen = g_plen + g_size + g_slen;
}

static void init_conn(struct conn *c)
{
    c->rcap = RBUF_INIT;
    c->rbuf = xmalloc(c->rcap);
    c->ts = xcalloc(K, sizeof *c->ts);
    c->ids = xcalloc(K, sizeof *c->ids);
    c->gen = xcalloc(K, sizeof *c->gen);
    c->busy = xcalloc(K, 1);
    c->q = xcalloc(K, sizeof *c->q);
    if (opt_proto != P_LINE) {
        c->pfx = xmalloc((size_t)K * PFX_MAX);
        for (uint32_t i = 0; i < K; i++)
            memcpy(c->pfx + (size_t)i * PFX_MAX, g_prefix, g_plen);
    }
    if (opt_tls) {
        size_t want = (size_t)K * g_reqlen;
        if (want < 16 * 1024)
            want = 16 * 1024;
        if (want > WBUF_MAX)
            want = WBUF_MAX;
        c->wcap = want;
        c->wbuf = xmalloc(c->wcap);
    }
}

static int is_ip_literal(const char *h)
{
    unsigned char buf[16];
    return inet_pton(AF_INET, h, buf) == 1 || inet_pton(AF_INET6, h, buf) == 1;
}

static void init_tls(void)
{
    g_ctx = SSL_CTX_new(TLS_client_method());
    if (!g_ctx)
        die(2, "TLS: %s", ssl_errstr());
    SSL_CTX_set_min_proto_version(g_ctx, TLS1_2_VERSION);
    SSL_CTX_set_mode(g_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (opt_insecure) {
        SSL_CTX_set_verify(g_ctx, SSL_VERIFY_NONE, NULL);
    } else {
        if (opt_cafile) {
            if (SSL_CTX_load_verify_locations(g_ctx, opt_cafile, NULL) != 1)
                die(2, "TLS: cannot load CA file %s: %s", opt_cafile, ssl_errstr());
        } else if (SSL_CTX_set_default_verify_paths(g_ctx) != 1) {
            die(2, "TLS: cannot load the system CAs: %s", ssl_errstr());
        }
        SSL_CTX_set_verify(g_ctx, SSL_VERIFY_PEER, NULL);
    }
}

static void start_tls(struct conn *c)
{
    c->ssl = SSL_new(g_ctx);
    if (!c->ssl || SSL_set_fd(c->ssl, c->fd) != 1)
        die(2, "TLS: %s", ssl_errstr());
    if (is_ip_literal(opt_host)) {
        if (!opt_insecure &&
            X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), opt_host) != 1)
            die(2, "TLS: bad host %s", opt_host);
    } else {
        SSL_set_tlsext_host_name(c->ssl, opt_host);
        if (!opt_insecure && SSL_set1_host(c->ssl, opt_host) != 1)
            die(2, "TLS: bad host %s", opt_host);
    }
    SSL_set_connect_state(c->ssl);
    c->state = 1;
}

/* Drive a handshake; returns 1 once it is done. */
static int handshake(struct conn *c)
{
    ERR_clear_error();
    int r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        c->state = 2;
        c->out_blocked = 0;
        set_events(c);
        return 1;
    }
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ) {
        c->out_blocked = 0;
        set_events(c);
        return 0;
    }
    if (e == SSL_ERROR_WANT_WRITE) {
        c->out_blocked = 1;
        set_events(c);
        return 0;
    }
    long v = SSL_get_verify_result(c->ssl);
    if (v != X509_V_OK)
        die(2, "connection %d: TLS handshake failed: certificate: %s", (int)(c - g_conns),
            X509_verify_cert_error_string(v));
    die(2, "connection %d: TLS handshake failed: %s", (int)(c - g_conns), ssl_errstr());
}

static void raise_fd_limit(long conns)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return;
    rlim_t want = (rlim_t)conns + 64;
    if (rl.rlim_cur < want) {
        rl.rlim_cur = rl.rlim_max < want ? rl.rlim_max : want;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static struct addrinfo *resolve(int port_number)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *ai;
    char port[16];
    snprintf(port, sizeof port, "%d", port_number);
    int rc = getaddrinfo(opt_host, port, &hints, &ai);
    if (rc != 0)
        die(2, "cannot resolve %s: %s", opt_host, gai_strerror(rc));
    return ai;
}

/* The port connection i goes to: pubsub's publisher (connection 0) may have its own. */
static int port_of(long i)
{
    return i == 0 && opt_mode == M_PUBSUB && opt_publish_port > 0 ? opt_publish_port : opt_port;
}

static void connect_all(void)
{
    struct addrinfo *main_ai = resolve(opt_port);
    struct addrinfo *first_ai = port_of(0) == opt_port ? main_ai : resolve(port_of(0));

    for (long i = 0; i < opt_conns; i++) {
        struct conn *c = &g_conns[i];
        struct addrinfo *ai = i == 0 ? first_ai : main_ai;
        init_conn(c);
        c->fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (c->fd < 0)
            die(2, "connect failed (connection %ld): socket: %s", i, strerror(errno));
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(c->fd, ai->ai_addr, ai->ai_addrlen) < 0 && errno != EINPROGRESS)
            die(2, "connect to %s:%d failed (connection %ld): %s", opt_host, port_of(i), i,
                strerror(errno));
        c->events = EPOLLOUT;
        struct epoll_event e = {.events = EPOLLOUT, .data.ptr = c};
        if (epoll_ctl(g_ep, EPOLL_CTL_ADD, c->fd, &e) < 0)
            die(2, "epoll_ctl: %s", strerror(errno));
    }
    if (first_ai != main_ai)
        freeaddrinfo(first_ai);
    freeaddrinfo(main_ai);

    long ready = 0;
    uint64_t deadline = now_ns() + SETUP_TIMEOUT_NS;
    struct epoll_event evs[MAX_EVENTS];
    while (ready < opt_conns) {
        uint64_t t = now_ns();
        if (t >= deadline)
            die(2, "connect failed: %ld of %ld connections not ready after %llu s",
                opt_conns - ready, opt_conns, SETUP_TIMEOUT_NS / 1000000000ull);
        int n = epoll_wait(g_ep, evs, MAX_EVENTS, (int)((deadline - t) / 1000000 + 1));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die(2, "epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c->state == 0) {
                int err = 0;
                socklen_t len = sizeof err;
                if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
                    err = errno;
                if (err)
                    die(2, "connect to %s:%d failed (connection %d): %s", opt_host,
                        port_of(c - g_conns), (int)(c - g_conns), strerror(err));
                if (!(evs[i].events & EPOLLOUT))
                    continue;
                if (opt_tls) {
                    start_tls(c);
                    ready += handshake(c);
                } else {
                    c->state = 2;
                    set_events(c);
                    ready++;
                }
            } else if (c->state == 1) {
                ready += handshake(c);
            } else {
                /* ready already: TLS session tickets, or the server refusing us */
                if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
                    on_readable(c);
                else if (c->out_blocked)
                    set_events(c);
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Publish/subscribe mode                                                                    */

#define PS_DATA_MIN 32                 /* 16 hex digits of sequence, 16 of send time (ns) */
#define PS_DATA_MAX 65535
#define PS_DRAIN_IDLE_NS (5ull * 1000000000ull)  /* drain: given up after this without delivery */
#define PS_DRAIN_MAX_NS (120ull * 1000000000ull) /* drain: given up after this in any case */
#define PS_HTTP_MAX 8192               /* longest WebSocket upgrade answer accepted */
#define PS_BURST 4096                  /* most messages published in one loop pass */
#define PS_READS 64                    /* most reads of one connection per readiness event */
#define PS_FLOOR_HEADER 8
#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

enum { PS_UPGRADING, PS_OPENING, PS_JOINING, PS_SUBSCRIBING, PS_READY };

static unsigned char *g_pub;           /* the publish request template (socketio: the payload) */
static size_t g_pub_len, g_pub_data;   /* its length, and where its data starts */
static uint64_t g_published, g_pub_acked, g_pub_failed;
static uint64_t g_min, g_at_min;       /* fewest messages a subscriber has; how many have that */
static uint64_t g_min_start, g_min_stop;
static uint64_t g_deliveries;           /* in the measured window */
static uint64_t g_received, g_received_seen; /* in all, and when the drain last saw it move */
static long g_ready;                   /* connections subscribed (or, publisher, able to publish) */
static double g_cpu_self0, g_cpu_self1, g_cpu_pid0, g_cpu_pid1;

static inline struct conn *publisher(void) { return &g_conns[0]; }

static inline uint64_t rng_next(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return g_rng;
}
static inline int is_publisher(const struct conn *c) { return c == g_conns; }

static void put_hex64(unsigned char *p, uint64_t v)
{
    static const char digits[] = "0123456789abcdef";
    for (int i = 15; i >= 0; i--, v >>= 4)
        p[i] = (unsigned char)digits[v & 15];
}

static int get_hex64(const unsigned char *p, uint64_t *out)
{
    uint64_t v = 0;
    for (int i = 0; i < 16; i++) {
        unsigned d = p[i];
        if (d >= '0' && d <= '9')
            d -= '0';
        else if (d >= 'a' && d <= 'f')
            d = d - 'a' + 10;
        else
            return -1;
        v = v << 4 | d;
    }
    *out = v;
    return 0;
}

static inline uint64_t be64(const unsigned char *p)
{
    return (uint64_t)be32(p) << 32 | be32(p + 4);
}

static double self_cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

/* utime + stime of a process from /proc/PID/stat (fields 14 and 15), in seconds; -1 if gone */
static double pid_cpu_seconds(long pid)
{
    char path[64], text[1024];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1.0;
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = 0;
    char *p = strrchr(text, ')');
    if (!p)
        return -1.0;
    unsigned long long ticks[2] = {0, 0};
    char *save = NULL;
    char *field = strtok_r(p + 1, " ", &save);
    for (int i = 0; field && i <= 12; i++, field = strtok_r(NULL, " ", &save))
        if (i >= 11)
            ticks[i - 11] = strtoull(field, NULL, 10);
    return (double)(ticks[0] + ticks[1]) / (double)sysconf(_SC_CLK_TCK);
}

/* ---- output buffer (plain TCP) ---- */

/* Room for n more bytes at the end of the output buffer; the caller adds what it used. */
static unsigned char *out_room(struct conn *c, size_t n)
{
    if (c->wcap - c->wlen < n) {
        if (c->wpos > 0) {
            memmove(c->wbuf, c->wbuf + c->wpos, c->wlen - c->wpos);
            c->wlen -= c->wpos;
            c->wpos = 0;
        }
        if (c->wcap - c->wlen < n) {
            size_t ncap = c->wcap ? c->wcap * 2 : 4096;
            while (ncap - c->wlen < n)
                ncap *= 2;
            unsigned char *nb = realloc(c->wbuf, ncap);
            if (!nb)
                die(1, "out of memory for a %zu-byte write buffer", ncap);
            c->wbuf = nb;
            c->wcap = ncap;
        }
    }
    return c->wbuf + c->wlen;
}

static void out_flush(struct conn *c)
{
    while (c->wpos < c->wlen) {
        ssize_t w = write(c->fd, c->wbuf + c->wpos, c->wlen - c->wpos);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                c->out_blocked = 1;
                set_events(c);
                return;
            }
            die(1, "connection %d: closed by server (write: %s)", (int)(c - g_conns),
                strerror(errno));
        }
        c->wpos += (size_t)w;
    }
    c->wpos = c->wlen = 0;
    if (c->out_blocked) {
        c->out_blocked = 0;
        set_events(c);
    }
}

/* One masked WebSocket frame (a client's frames are masked: RFC 6455, 5.3). */
static void ws_put(struct conn *c, unsigned opcode, const void *payload, size_t len)
{
    if (len > 0xffff)
        die(2, "WebSocket frame of %zu bytes: too large for this client", len);
    unsigned char *f = out_room(c, 8 + len);
    size_t h = 0;
    f[h++] = (unsigned char)(0x80 | opcode);
    if (len < 126) {
        f[h++] = (unsigned char)(0x80 | len);
    } else {
        f[h++] = 0x80 | 126;
        f[h++] = (unsigned char)(len >> 8);
        f[h++] = (unsigned char)len;
    }
    unsigned char *mask = f + h;
    put32(mask, (uint32_t)rng_next());
    h += 4;
    const unsigned char *src = payload;
    for (size_t i = 0; i < len; i++)
        f[h + i] = src[i] ^ mask[i & 3];
    c->wlen += h + len;
}

static void ws_text(struct conn *c, const char *text) { ws_put(c, 1, text, strlen(text)); }

/* ---- MessagePack, just enough to read the server's maps ---- */

struct mp {
    const unsigned char *p, *end;
    int bad;
};

static int mp_has(struct mp *m, size_t n)
{
    if ((size_t)(m->end - m->p) < n) {
        m->bad = 1;
        return 0;
    }
    return 1;
}

static uint64_t mp_uint(struct mp *m, int n)
{
    if (!mp_has(m, (size_t)n))
        return 0;
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = v << 8 | m->p[i];
    m->p += n;
    return v;
}

static int64_t mp_int(struct mp *m)
{
    if (!mp_has(m, 1))
        return 0;
    unsigned t = *m->p++;
    if (t <= 0x7f)
        return (int64_t)t;
    if (t >= 0xe0)
        return (int64_t)(int8_t)t;
    switch (t) {
    case 0xcc: return (int64_t)mp_uint(m, 1);
    case 0xcd: return (int64_t)mp_uint(m, 2);
    case 0xce: return (int64_t)mp_uint(m, 4);
    case 0xcf: return (int64_t)mp_uint(m, 8);
    case 0xd0: return (int8_t)mp_uint(m, 1);
    case 0xd1: return (int16_t)mp_uint(m, 2);
    case 0xd2: return (int32_t)mp_uint(m, 4);
    case 0xd3: return (int64_t)mp_uint(m, 8);
    default: m->bad = 1; return 0;
    }
}

/* A str or bin: its bytes (not copied) and length. */
static const unsigned char *mp_bytes(struct mp *m, size_t *len)
{
    if (!mp_has(m, 1))
        return NULL;
    unsigned t = *m->p++;
    size_t n;
    if ((t & 0xe0) == 0xa0)
        n = t & 0x1f;
    else if (t == 0xc4 || t == 0xd9)
        n = mp_uint(m, 1);
    else if (t == 0xc5 || t == 0xda)
        n = mp_uint(m, 2);
    else if (t == 0xc6 || t == 0xdb)
        n = mp_uint(m, 4);
    else {
        m->bad = 1;
        return NULL;
    }
    if (m->bad || !mp_has(m, n))
        return NULL;
    const unsigned char *s = m->p;
    m->p += n;
    *len = n;
    return s;
}

static uint32_t mp_map(struct mp *m)
{
    if (!mp_has(m, 1))
        return 0;
    unsigned t = *m->p++;
    if ((t & 0xf0) == 0x80)
        return t & 0x0f;
    if (t == 0xde)
        return (uint32_t)mp_uint(m, 2);
    if (t == 0xdf)
        return (uint32_t)mp_uint(m, 4);
    m->bad = 1;
    return 0;
}

/* Skip one value of any type (nesting up to 8 deep). */
static void mp_skip(struct mp *m, int depth)
{
    if (depth > 8 || !mp_has(m, 1)) {
        m->bad = 1;
        return;
    }
    unsigned t = *m->p;
    uint64_t items = 0;
    size_t len;
    if (t <= 0x7f || t >= 0xe0 || t == 0xc0 || t == 0xc2 || t == 0xc3) {
        m->p++;
        return;
    }
    if ((t >= 0xcc && t <= 0xd3)) {
        mp_int(m);
        return;
    }
    if (t == 0xca || t == 0xcb) {
        m->p++;
        mp_uint(m, t == 0xca ? 4 : 8);
        return;
    }
    if ((t & 0xe0) == 0xa0 || (t >= 0xc4 && t <= 0xc6) || (t >= 0xd9 && t <= 0xdb)) {
        mp_bytes(m, &len);
        return;
    }
    if ((t & 0xf0) == 0x80 || t == 0xde || t == 0xdf) {
        items = 2 * (uint64_t)mp_map(m);
    } else if ((t & 0xf0) == 0x90 || t == 0xdc || t == 0xdd) {
        m->p++;
        items = (t & 0xf0) == 0x90 ? (t & 0x0f) : mp_uint(m, t == 0xdc ? 2 : 4);
    } else if (t >= 0xd4 && t <= 0xd8) { /* fixext 1..16 */
        m->p++;
        mp_uint(m, 1);
        if (mp_has(m, (size_t)1 << (t - 0xd4)))
            m->p += (size_t)1 << (t - 0xd4);
        return;
    } else if (t >= 0xc7 && t <= 0xc9) { /* ext 8/16/32 */
        m->p++;
        size_t n = mp_uint(m, t == 0xc7 ? 1 : t == 0xc8 ? 2 : 4);
        mp_uint(m, 1);
        if (mp_has(m, n))
            m->p += n;
        return;
    } else {
        m->bad = 1;
        return;
    }
    for (uint64_t i = 0; i < items && !m->bad; i++)
        mp_skip(m, depth + 1);
}

static int mp_key_is(const unsigned char *k, size_t n, const char *name)
{
    return n == strlen(name) && memcmp(k, name, n) == 0;
}

/* ---- subscriber side ---- */

static void ps_new_min(void)
{
    uint64_t lowest = UINT64_MAX, at = 0;
    for (long i = 1; i < opt_conns; i++) {
        uint64_t got = g_conns[i].got;
        if (got < lowest) {
            lowest = got;
            at = 1;
        } else if (got == lowest) {
            at++;
        }
    }
    g_min = lowest;
    g_at_min = at;
}

static void ps_ready(struct conn *c)
{
    if (c->ps_state == PS_READY)
        die(1, "connection %d: confirmed twice", (int)(c - g_conns));
    c->ps_state = PS_READY;
    g_ready++;
}

/* A message reached a subscriber: check its offset, count it, time it. */
static void ps_delivered(struct conn *c, uint64_t offset, const unsigned char *data, size_t len,
                         uint64_t now)
{
    if (is_publisher(c) || c->ps_state != PS_READY)
        die(1, "connection %d: a message before its subscription was confirmed",
            (int)(c - g_conns));
    if (len != g_size)
        die(1, "connection %d: a message of %zu bytes, %zu were published", (int)(c - g_conns),
            len, g_size);
    if (offset != c->last + 1) {
        g_errors++; /* a hole, a duplicate, or out of order */
        if (offset <= c->last)
            return;
    }
    c->last = offset;
    g_received++;
    if (c->got++ == g_min && --g_at_min == 0)
        ps_new_min();
    if (g_phase == 1) {
        uint64_t sent;
        if (get_hex64(data + 16, &sent) != 0 || sent > now)
            die(1, "connection %d: a message whose data is not what was published",
                (int)(c - g_conns));
        g_deliveries++;
        h_record(now - sent);
    }
}

static void ps_parse_pyasync(struct conn *c, uint64_t now)
{
    for (;;) {
        unsigned char *p = c->rbuf + c->rpos;
        size_t avail = c->rlen - c->rpos;
        if (avail < PY_HEADER) {
            c->rneed = PY_HEADER;
            return;
        }
        if (p[0] != 0x50 || p[1] != 0x59 || p[2] != 1 || (p[3] & 0xfe))
            die(1, "connection %d: malformed frame header", (int)(c - g_conns));
        if (p[3] & 1)
            die(1, "connection %d: compressed frame; start the server with "
                   "COMPRESSION_THRESHOLD=0", (int)(c - g_conns));
        uint32_t blen = be32(p + 14);
        if (blen > MAX_BODY)
            die(1, "connection %d: malformed frame: body length %u", (int)(c - g_conns), blen);
        if (avail < PY_HEADER + (size_t)blen) {
            c->rneed = PY_HEADER + (size_t)blen;
            return;
        }
        uint16_t type = be16(p + 4);
        uint32_t id = be32(p + 6);
        const unsigned char *body = p + PY_HEADER;
        struct mp m = {body, body + blen, 0};
        if (type == 40 && id == 0) { /* EVENT_MESSAGE */
            int64_t sub = -1, offset = -1;
            const unsigned char *data = NULL;
            size_t dlen = 0;
            uint32_t n = mp_map(&m);
            for (uint32_t i = 0; i < n && !m.bad; i++) {
                size_t klen;
                const unsigned char *k = mp_bytes(&m, &klen);
                if (m.bad)
                    break;
                if (mp_key_is(k, klen, "subscription"))
                    sub = mp_int(&m);
                else if (mp_key_is(k, klen, "offset"))
                    offset = mp_int(&m);
                else if (mp_key_is(k, klen, "data"))
                    data = mp_bytes(&m, &dlen);
                else
                    mp_skip(&m, 0);
            }
            if (m.bad || offset < 1 || !data)
                show_body("malformed EVENT_MESSAGE", c, type, body, blen);
            if (sub != c->sub_id)
                die(1, "connection %d: EVENT_MESSAGE for subscription %lld, not %lld",
                    (int)(c - g_conns), (long long)sub, (long long)c->sub_id);
            ps_delivered(c, (uint64_t)offset, data, dlen, now);
        } else if (type == 41 && id == 0) { /* EVENT_GAP: messages that will never come */
            g_errors++;
            int64_t last_missing = -1;
            uint32_t n = mp_map(&m);
            for (uint32_t i = 0; i < n && !m.bad; i++) {
                size_t klen;
                const unsigned char *k = mp_bytes(&m, &klen);
                if (m.bad)
                    break;
                if (mp_key_is(k, klen, "last_missing"))
                    last_missing = mp_int(&m);
                else
                    mp_skip(&m, 0);
            }
            if (last_missing > (int64_t)c->last)
                c->last = (uint64_t)last_missing;
        } else if (type == 21 && id == 1 && c->ps_state == PS_SUBSCRIBING) {
            int64_t sub = -1, position = -1;
            uint32_t n = mp_map(&m);
            for (uint32_t i = 0; i < n && !m.bad; i++) {
                size_t klen;
                const unsigned char *k = mp_bytes(&m, &klen);
                if (m.bad)
                    break;
                if (mp_key_is(k, klen, "subscription"))
                    sub = mp_int(&m);
                else if (mp_key_is(k, klen, "position"))
                    position = mp_int(&m);
                else
                    mp_skip(&m, 0);
            }
            if (m.bad || sub < 0 || position < 0)
                show_body("malformed ANSWER_SUBSCRIBE", c, type, body, blen);
            c->sub_id = sub;
            c->last = (uint64_t)position;
            ps_ready(c);
        } else if (type == 25 && id != 0 && is_publisher(c)) { /* ANSWER_PUBLISH */
            g_pub_acked++;
        } else if (type == 1 && id != 0 && is_publisher(c)) { /* a publish refused */
            g_pub_failed++;
            g_errors++;
        } else if (type == 1) {
            show_body(id ? "subscribe refused" : "connection refused", c, type, body, blen);
        } else {
            show_body("unexpected frame", c, type, body, blen);
        }
        c->rpos += PY_HEADER + (size_t)blen;
        c->rneed = 0;
    }
}

static void ps_parse_floor(struct conn *c, uint64_t now)
{
    for (;;) {
        unsigned char *p = c->rbuf + c->rpos;
        size_t avail = c->rlen - c->rpos;
        if (avail < PS_FLOOR_HEADER) {
            c->rneed = PS_FLOOR_HEADER;
            return;
        }
        uint32_t blen = be32(p), kind = be32(p + 4);
        if (blen > MAX_BODY || blen < 8)
            die(1, "connection %d: malformed frame: body length %u", (int)(c - g_conns), blen);
        if (avail < PS_FLOOR_HEADER + (size_t)blen) {
            c->rneed = PS_FLOOR_HEADER + (size_t)blen;
            return;
        }
        const unsigned char *body = p + PS_FLOOR_HEADER;
        if (kind == 3)
            ps_delivered(c, be64(body), body + 8, blen - 8, now);
        else if (kind == 2 && is_publisher(c))
            g_pub_acked++;
        else if (kind == 1 && c->ps_state == PS_SUBSCRIBING) {
            c->last = be64(body);
            ps_ready(c);
        } else
            die(1, "connection %d: unexpected frame of kind %u", (int)(c - g_conns), kind);
        c->rpos += PS_FLOOR_HEADER + (size_t)blen;
        c->rneed = 0;
    }
}

/* The answer to the WebSocket upgrade; returns the bytes it took, 0 if incomplete. */
static size_t ws_upgraded(struct conn *c, const unsigned char *p, size_t avail)
{
    const unsigned char *end = memmem(p, avail, "\r\n\r\n", 4);
    if (!end) {
        if (avail > PS_HTTP_MAX)
            die(1, "connection %d: no end to the HTTP answer in %d bytes", (int)(c - g_conns),
                PS_HTTP_MAX);
        return 0;
    }
    size_t len = (size_t)(end - p) + 4;
    char head[PS_HTTP_MAX + 8];
    if (len > PS_HTTP_MAX)
        die(1, "connection %d: HTTP answer above %d bytes", (int)(c - g_conns), PS_HTTP_MAX);
    memcpy(head, p, len);
    head[len] = 0;
    if (strncmp(head, "HTTP/1.1 101", 12) != 0) {
        char *eol = strstr(head, "\r\n");
        if (eol)
            *eol = 0;
        die(1, "connection %d: WebSocket upgrade refused: %s", (int)(c - g_conns), head);
    }
    const char *accept = strcasestr(head, "\r\nsec-websocket-accept:");
    if (!accept)
        die(1, "connection %d: no Sec-WebSocket-Accept in the upgrade", (int)(c - g_conns));
    accept += strlen("\r\nsec-websocket-accept:");
    while (*accept == ' ' || *accept == '\t')
        accept++;
    if (strncmp(accept, c->ws_accept, strlen(c->ws_accept)) != 0)
        die(1, "connection %d: wrong Sec-WebSocket-Accept", (int)(c - g_conns));
    return len;
}

/* One Engine.IO packet (a text frame's payload). */
static void eio_packet(struct conn *c, const unsigned char *p, size_t len, uint64_t now)
{
    static const char event[] = "42[\"message\",\"";
    size_t elen = sizeof event - 1;
    if (len == 0)
        die(1, "connection %d: empty Engine.IO packet", (int)(c - g_conns));
    if (len >= elen + g_size + 2 && memcmp(p, event, elen) == 0) {
        uint64_t seq;
        if (p[elen + g_size] != '"' || get_hex64(p + elen, &seq) != 0)
            die(1, "connection %d: malformed message event", (int)(c - g_conns));
        ps_delivered(c, seq, p + elen, g_size, now);
        return;
    }
    if (p[0] == '2') { /* ping: answer pong */
        ws_text(c, "3");
    } else if (p[0] == '0' && c->ps_state == PS_OPENING) { /* open: join the namespace */
        ws_text(c, "40");
        c->ps_state = PS_JOINING;
    } else if (len >= 2 && p[0] == '4' && p[1] == '0' && c->ps_state == PS_JOINING) {
        if (is_publisher(c)) {
            ps_ready(c);
        } else {
            char sub[300];
            snprintf(sub, sizeof sub, "420[\"subscribe\",\"%s\"]", opt_topic);
            ws_text(c, sub);
            c->ps_state = PS_SUBSCRIBING;
        }
    } else if (len >= 3 && memcmp(p, "430", 3) == 0 && c->ps_state == PS_SUBSCRIBING) {
        ps_ready(c);
    } else if (p[0] == '6' || p[0] == '3') { /* noop, pong */
    } else {
        char text[201];
        size_t n = len < 200 ? len : 200;
        memcpy(text, p, n);
        text[n] = 0;
        die(1, "connection %d: unexpected Engine.IO packet: %s", (int)(c - g_conns), text);
    }
}

static void ps_parse_socketio(struct conn *c, uint64_t now)
{
    for (;;) {
        unsigned char *p = c->rbuf + c->rpos;
        size_t avail = c->rlen - c->rpos;
        if (c->ps_state == PS_UPGRADING) {
            size_t took = ws_upgraded(c, p, avail);
            if (!took)
                return;
            c->rpos += took;
            c->ps_state = PS_OPENING;
            continue;
        }
        if (avail < 2) {
            c->rneed = 2;
            return;
        }
        unsigned opcode = p[0] & 0x0f;
        size_t hlen = 2;
        uint64_t plen = p[1] & 0x7f;
        if (p[1] & 0x80)
            die(1, "connection %d: masked frame from the server", (int)(c - g_conns));
        if (!(p[0] & 0x80) || opcode == 0)
            die(1, "connection %d: fragmented WebSocket message (not supported)",
                (int)(c - g_conns));
        if (plen == 126) {
            hlen = 4;
            if (avail < hlen) {
                c->rneed = hlen;
                return;
            }
            plen = be16(p + 2);
        } else if (plen == 127) {
            hlen = 10;
            if (avail < hlen) {
                c->rneed = hlen;
                return;
            }
            plen = be64(p + 2);
        }
        if (plen > MAX_BODY)
            die(1, "connection %d: WebSocket frame of %llu bytes", (int)(c - g_conns),
                (unsigned long long)plen);
        if (avail < hlen + plen) {
            c->rneed = hlen + (size_t)plen;
            return;
        }
        const unsigned char *payload = p + hlen;
        if (opcode == 1)
            eio_packet(c, payload, (size_t)plen, now);
        else if (opcode == 9)
            ws_put(c, 10, payload, (size_t)plen); /* ping: pong with the same payload */
        else if (opcode == 8)
            closed_by_server(c);
        else if (opcode != 10)
            die(1, "connection %d: unexpected WebSocket frame (opcode %u)", (int)(c - g_conns),
                opcode);
        c->rpos += hlen + (size_t)plen;
        c->rneed = 0;
    }
}

static void ps_readable(struct conn *c)
{
    for (int round = 0; round < PS_READS; round++) {
        size_t space = read_space(c);
        ssize_t n = read(c->fd, c->rbuf + c->rlen, space);
        if (n == 0)
            closed_by_server(c);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            die(1, "connection %d: closed by server (%s)", (int)(c - g_conns), strerror(errno));
        }
        c->rlen += (size_t)n;
        uint64_t now = now_ns();
        if (opt_proto == P_PYASYNC)
            ps_parse_pyasync(c, now);
        else if (opt_proto == P_FLOOR)
            ps_parse_floor(c, now);
        else
            ps_parse_socketio(c, now);
        if (c->rpos == c->rlen)
            c->rpos = c->rlen = 0;
        if ((size_t)n < space)
            break;
    }
    if (c->wpos < c->wlen && !c->out_blocked)
        out_flush(c);
}

/* ---- publisher side ---- */

/* The msgpack map entry "topic": opt_topic at p + b (a fixstr or str8 value); returns the new b. */
static size_t put_topic_entry(unsigned char *p, size_t b)
{
    size_t tlen = strlen(opt_topic);
    p[b++] = 0xa5;
    memcpy(p + b, "topic", 5);
    b += 5;
    if (tlen < 32) {
        p[b++] = (unsigned char)(0xa0 | tlen);
    } else {
        p[b++] = 0xd9;
        p[b++] = (unsigned char)tlen;
    }
    memcpy(p + b, opt_topic, tlen);
    return b + tlen;
}

static void ps_build_templates(void)
{
    g_size = (size_t)opt_size;
    size_t tlen = strlen(opt_topic);
    g_pub = xmalloc(64 + tlen + g_size);
    unsigned char *p = g_pub;
    if (opt_proto == P_PYASYNC) { /* {"topic": T, "data": bin} */
        size_t b = PY_HEADER;
        p[b++] = 0x82;
        b = put_topic_entry(p, b);
        p[b++] = 0xa4;
        memcpy(p + b, "data", 4);
        b += 4;
        if (g_size < 256) {
            p[b++] = 0xc4;
            p[b++] = (unsigned char)g_size;
        } else {
            p[b++] = 0xc5;
            p[b++] = (unsigned char)(g_size >> 8);
            p[b++] = (unsigned char)g_size;
        }
        g_pub_data = b;
        g_pub_len = b + g_size;
        put_py_header(p, 24, (uint32_t)(g_pub_len - PY_HEADER)); /* REQUEST_PUBLISH */
    } else if (opt_proto == P_FLOOR) {
        put32(p, (uint32_t)g_size);
        put32(p + 4, 2); /* PUBLISH */
        g_pub_data = PS_FLOOR_HEADER;
        g_pub_len = PS_FLOOR_HEADER + g_size;
    } else { /* 42["publish","T","data"] */
        int n = snprintf((char *)p, 64 + tlen, "42[\"publish\",\"%s\",\"", opt_topic);
        g_pub_data = (size_t)n;
        g_pub_len = g_pub_data + g_size + 2;
        p[g_pub_len - 2] = '"';
        p[g_pub_len - 1] = ']';
    }
    memset(p + g_pub_data, 'x', g_size);
}

static void ps_publish(struct conn *c, uint64_t now)
{
    uint64_t seq = ++g_published;
    unsigned char *d = g_pub + g_pub_data;
    put_hex64(d, seq);
    put_hex64(d + 16, now);
    if (opt_proto == P_SOCKETIO) {
        ws_put(c, 1, g_pub, g_pub_len);
        return;
    }
    unsigned char *f = out_room(c, g_pub_len);
    memcpy(f, g_pub, g_pub_len);
    if (opt_proto == P_PYASYNC) /* request ids 1..2^32-1, one per publish */
        put32(f + 6, (uint32_t)(seq % 0xFFFFFFFFull) + 1);
    c->wlen += g_pub_len;
}

/* Messages published and neither refused nor yet received by every subscriber. */
static inline uint64_t ps_outstanding(void) { return g_published - g_pub_failed - g_min; }

static uint64_t g_rate_ns, g_next_pub;

/* Publish what the window (and, with --rate, the clock) allows; returns when to look again. */
static uint64_t ps_publish_due(uint64_t now)
{
    struct conn *c = publisher();
    int sent = 0;
    while (sent < PS_BURST && ps_outstanding() < (uint64_t)opt_window &&
           (!g_rate_ns || now >= g_next_pub)) {
        ps_publish(c, now);
        sent++;
        if (g_rate_ns)
            g_next_pub += g_rate_ns;
    }
    if (sent && !c->out_blocked)
        out_flush(c);
    /* a full window opens with a delivery, not with time */
    return g_rate_ns && ps_outstanding() < (uint64_t)opt_window ? g_next_pub : UINT64_MAX;
}

static void ps_start(struct conn *c)
{
    c->ps_state = PS_SUBSCRIBING;
    c->sub_id = -1;
    if (opt_proto == P_PYASYNC) {
        if (is_publisher(c)) {
            ps_ready(c);
            return;
        }
        size_t tlen = strlen(opt_topic);
        unsigned char *f = out_room(c, PY_HEADER + 10 + tlen);
        size_t b = PY_HEADER;
        f[b++] = 0x81;
        b = put_topic_entry(f, b);
        put_py_header(f, 20, (uint32_t)(b - PY_HEADER)); /* REQUEST_SUBSCRIBE, since: none */
        put32(f + 6, 1);
        c->wlen += b;
    } else if (opt_proto == P_FLOOR) {
        if (is_publisher(c)) {
            ps_ready(c);
            return;
        }
        unsigned char *f = out_room(c, PS_FLOOR_HEADER);
        put32(f, 0);
        put32(f + 4, 1); /* SUBSCRIBE */
        c->wlen += PS_FLOOR_HEADER;
    } else {
        unsigned char nonce[16], digest[EVP_MAX_MD_SIZE];
        unsigned char key[32], source[64];
        unsigned int dlen = 0;
        for (int i = 0; i < 16; i++)
            nonce[i] = (unsigned char)rng_next();
        EVP_EncodeBlock(key, nonce, 16); /* 24 characters */
        int n = snprintf((char *)source, sizeof source, "%s%s", (char *)key, WS_GUID);
        if (EVP_Digest(source, (size_t)n, digest, &dlen, EVP_sha1(), NULL) != 1)
            die(2, "SHA-1: %s", ssl_errstr());
        EVP_EncodeBlock((unsigned char *)c->ws_accept, digest, (int)dlen);
        char request[512];
        int len = snprintf(request, sizeof request,
                           "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"
                           "Host: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
                           opt_host, opt_port, (char *)key);
        if (len < 0 || (size_t)len >= sizeof request)
            die(2, "--host too long for the WebSocket upgrade request");
        memcpy(out_room(c, (size_t)len), request, (size_t)len);
        c->wlen += (size_t)len;
        c->ps_state = PS_UPGRADING;
    }
    out_flush(c);
}

static uint64_t g_drain_end, g_drain_idle_end;

static void ps_phase_check(uint64_t now)
{
    if (g_phase == 0 && now >= g_warm_end) {
        g_phase = 1;
        g_t_start = now;
        g_deliveries = 0;
        memset(g_hist, 0, sizeof g_hist);
        g_hist_max = 0;
        g_min_start = g_min;
        g_cpu_self0 = self_cpu_seconds();
        if (opt_cpu_pid)
            g_cpu_pid0 = pid_cpu_seconds(opt_cpu_pid);
    }
    if (g_phase == 1 && now >= g_t_start + g_dur_ns) {
        g_phase = 2; /* publishing stops; what was published may still arrive */
        g_t_stop = now;
        g_min_stop = g_min;
        g_cpu_self1 = self_cpu_seconds();
        if (opt_cpu_pid)
            g_cpu_pid1 = pid_cpu_seconds(opt_cpu_pid);
        g_drain_end = now + PS_DRAIN_MAX_NS;
        g_drain_idle_end = now + PS_DRAIN_IDLE_NS;
        g_received_seen = g_received;
    }
    if (g_phase == 2 && g_received != g_received_seen) { /* still delivering: wait on */
        g_received_seen = g_received;
        g_drain_idle_end = now + PS_DRAIN_IDLE_NS;
    }
}

/* Every publish answered (socketio has no answers) and received by every subscriber. */
static int ps_drained(void)
{
    int answered = opt_proto == P_SOCKETIO || g_pub_acked + g_pub_failed == g_published;
    return answered && g_min >= g_published - g_pub_failed;
}

static void ps_event(const struct epoll_event *e)
{
    struct conn *c = e->data.ptr;
    if (e->events & (EPOLLIN | EPOLLHUP | EPOLLERR))
        ps_readable(c);
    if ((e->events & EPOLLOUT) && c->out_blocked)
        out_flush(c);
}

static int ps_wait(uint64_t until, uint64_t now)
{
    struct epoll_event evs[MAX_EVENTS];
    int timeout = until > now ? (int)((until - now + 999999) / 1000000) : 0;
    if (until == UINT64_MAX)
        timeout = 1000;
    int n = epoll_wait(g_ep, evs, MAX_EVENTS, timeout);
    if (n < 0) {
        if (errno == EINTR)
            return 0;
        die(1, "epoll_wait: %s", strerror(errno));
    }
    for (int i = 0; i < n; i++)
        ps_event(&evs[i]);
    return n;
}

static int run_pubsub(void)
{
    K = 1;
    opt_conns = opt_subscribers + 1; /* connection 0 publishes */
    ps_build_templates();
    raise_fd_limit(opt_conns);
    g_ep = epoll_create1(EPOLL_CLOEXEC);
    if (g_ep < 0)
        die(2, "epoll_create1: %s", strerror(errno));
    g_conns = xcalloc((size_t)opt_conns, sizeof *g_conns);
    connect_all();

    /* subscribe everyone, and wait until every subscription is confirmed */
    for (long i = 0; i < opt_conns; i++)
        ps_start(&g_conns[i]);
    uint64_t deadline = now_ns() + SETUP_TIMEOUT_NS;
    while (g_ready < opt_conns) {
        uint64_t t = now_ns();
        if (t >= deadline)
            die(2, "subscribe failed: %ld of %ld connections not confirmed after %llu s",
                opt_conns - g_ready, opt_conns, SETUP_TIMEOUT_NS / 1000000000ull);
        ps_wait(deadline, t);
    }
    g_min = 0;
    g_at_min = (uint64_t)opt_subscribers;

    uint64_t t0 = now_ns();
    g_warm_end = t0 + (uint64_t)(opt_warmup * 1e9);
    g_dur_ns = (uint64_t)(opt_duration * 1e9);
    g_rate_ns = opt_rate > 0 ? (uint64_t)(1e9 / opt_rate) : 0;
    g_next_pub = t0;
    g_phase = 0;
    for (;;) {
        uint64_t t = now_ns();
        ps_phase_check(t);
        if (g_phase == 2 && (ps_drained() || t >= g_drain_end || t >= g_drain_idle_end))
            break;
        uint64_t next = g_phase == 0 ? g_warm_end : g_phase == 1 ? g_t_start + g_dur_ns
                                                                  : g_drain_idle_end;
        if (g_phase < 2) {
            uint64_t due = ps_publish_due(t);
            if (due < next)
                next = due;
        }
        ps_wait(next, t);
    }

    uint64_t expected = g_published - g_pub_failed, lost = 0;
    for (long i = 1; i < opt_conns; i++)
        if (g_conns[i].got < expected)
            lost += expected - g_conns[i].got;
    double dur = (double)(g_t_stop - g_t_start) / 1e9;
    uint64_t messages = g_min_stop - g_min_start;
    char server_cpu[32] = "null";
    if (opt_cpu_pid && g_cpu_pid0 >= 0 && g_cpu_pid1 >= 0)
        snprintf(server_cpu, sizeof server_cpu, "%.1f", 100 * (g_cpu_pid1 - g_cpu_pid0) / dur);
    printf("{\"mode\":\"pubsub\",\"proto\":\"%s\",\"subscribers\":%ld,\"window\":%ld,"
           "\"rate\":%g,\"size\":%ld,\"duration_s\":%.3f,\"messages\":%llu,"
           "\"messages_per_s\":%.1f,\"deliveries\":%llu,\"deliveries_per_s\":%.1f,"
           "\"published\":%llu,\"errors\":%llu,\"lost\":%llu,\"p50_us\":%.1f,\"p90_us\":%.1f,"
           "\"p99_us\":%.1f,\"max_us\":%.1f,\"client_cpu_percent\":%.1f,"
           "\"server_cpu_percent\":%s}\n",
           opt_proto_name, opt_subscribers, opt_window, opt_rate, opt_size, dur,
           (unsigned long long)messages, (double)messages / dur,
           (unsigned long long)g_deliveries, (double)g_deliveries / dur,
           (unsigned long long)g_published, (unsigned long long)g_errors,
           (unsigned long long)lost, h_percentile_us(50, g_deliveries),
           h_percentile_us(90, g_deliveries), h_percentile_us(99, g_deliveries),
           (double)g_hist_max / 1000.0, 100 * (g_cpu_self1 - g_cpu_self0) / dur, server_cpu);
    fflush(stdout);
    if (g_deliveries == 0)
        fprintf(stderr, "loadgen: warning: no message was delivered in the measured window\n");
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Main                                                                                      */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: loadgen --host H --port P --proto pyasync|floor|line [--connections N]\n"
            "               [--inflight K] [--size BYTES] [--warmup SEC] [--duration SEC]\n"
            "               [--tls] [--tls-insecure] [--cafile PEM] [--keys N]\n"
            "       loadgen --port P --proto pyasync|floor|socketio --mode pubsub\n"
            "               [--subscribers N] [--window W] [--rate R] [--topic T] [--size BYTES]\n"
            "               [--warmup SEC] [--duration SEC] [--cpu-pid PID] [--publish-port P]\n"
            "defaults: --host 127.0.0.1 --connections 1 --inflight 1 --size 32 --warmup 1\n"
            "--duration 5; --tls-insecure (no certificate check) and --cafile imply --tls;\n"
            "with --tls alone the server is verified against the system CAs.\n"
            "pubsub defaults: --subscribers 100 --window 64 --rate 0 (saturation)\n"
            "--topic bench.t\n");
}

static long parse_long(const char *name, const char *s, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi)
        die(2, "--%s: expected an integer from %ld to %ld, got '%s'", name, lo, hi, s);
    return v;
}

static double parse_double(const char *name, const char *s)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || end == s || v < 0 || v > 1e6)
        die(2, "--%s: expected a number from 0 to 1e6, got '%s'", name, s);
    return v;
}

/* A topic the three wire formats carry without escaping: dot-separated [A-Za-z0-9_-] tokens. */
static int topic_ok(const char *t)
{
    size_t n = strlen(t);
    if (n == 0 || n > 255 || t[0] == '.' || t[n - 1] == '.')
        return 0;
    for (size_t i = 0; i < n; i++) {
        char ch = t[i];
        int word = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                   (ch >= '0' && ch <= '9') || ch == '_' || ch == '-';
        if (!word && !(ch == '.' && t[i + 1] != '.'))
            return 0;
    }
    return 1;
}

static void parse_args(int argc, char **argv)
{
    static const struct option opts[] = {
        {"host", required_argument, 0, 'h'},        {"port", required_argument, 0, 'p'},
        {"proto", required_argument, 0, 'P'},       {"connections", required_argument, 0, 'c'},
        {"inflight", required_argument, 0, 'k'},    {"size", required_argument, 0, 's'},
        {"warmup", required_argument, 0, 'w'},      {"duration", required_argument, 0, 'd'},
        {"tls", no_argument, 0, 't'},               {"tls-insecure", no_argument, 0, 'i'},
        {"cafile", required_argument, 0, 'C'},      {"keys", required_argument, 0, 'K'},
        {"mode", required_argument, 0, 'M'},        {"subscribers", required_argument, 0, 'S'},
        {"window", required_argument, 0, 'W'},      {"rate", required_argument, 0, 'R'},
        {"topic", required_argument, 0, 'T'},       {"cpu-pid", required_argument, 0, 'U'},
        {"publish-port", required_argument, 0, 'Q'}, {"help", no_argument, 0, 'H'},
        {0, 0, 0, 0},
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'h': opt_host = optarg; break;
        case 'p': opt_port = (int)parse_long("port", optarg, 1, 65535); break;
        case 'P':
            opt_proto_name = optarg;
            if (strcmp(optarg, "pyasync") == 0)
                opt_proto = P_PYASYNC;
            else if (strcmp(optarg, "floor") == 0)
                opt_proto = P_FLOOR;
            else if (strcmp(optarg, "line") == 0)
                opt_proto = P_LINE;
            else if (strcmp(optarg, "socketio") == 0)
                opt_proto = P_SOCKETIO;
            else
                die(2, "--proto: expected pyasync, floor, line or socketio, got '%s'", optarg);
            break;
        case 'M':
            if (strcmp(optarg, "echo") == 0)
                opt_mode = M_ECHO;
            else if (strcmp(optarg, "pubsub") == 0)
                opt_mode = M_PUBSUB;
            else
                die(2, "--mode: expected echo or pubsub, got '%s'", optarg);
            break;
        case 'S': opt_subscribers = parse_long("subscribers", optarg, 1, 100000); break;
        case 'W': opt_window = parse_long("window", optarg, 1, 1000000); break;
        case 'R': opt_rate = parse_double("rate", optarg); break;
        case 'T': opt_topic = optarg; break;
        case 'U': opt_cpu_pid = parse_long("cpu-pid", optarg, 1, INT_MAX); break;
        case 'Q': opt_publish_port = (int)parse_long("publish-port", optarg, 1, 65535); break;
        case 'K': opt_keys = parse_long("keys", optarg, 1, 100000); break;
        case 'c': opt_conns = parse_long("connections", optarg, 1, 1000000); break;
        case 'k': opt_inflight = parse_long("inflight", optarg, 1, 1000000); break;
        case 's': opt_size = parse_long("size", optarg, 0, 1024L * 1024 * 1024); break;
        case 'w': opt_warmup = parse_double("warmup", optarg); break;
        case 'd': opt_duration = parse_double("duration", optarg); break;
        case 't': opt_tls = 1; break;
        case 'i': opt_insecure = 1; break;
        case 'C': opt_cafile = optarg; break;
        case 'H': usage(stdout); exit(0);
        default: usage(stderr); exit(2);
        }
    }
    if (optind < argc) {
        usage(stderr);
        die(2, "unexpected argument '%s'", argv[optind]);
    }
    if (opt_port < 0 || !opt_proto_name) {
        usage(stderr);
        die(2, "--port and --proto are required");
    }
    if (opt_duration <= 0)
        die(2, "--duration must be above 0");
    if ((opt_insecure || opt_cafile) && !opt_tls)
        opt_tls = 1;
    if (opt_mode == M_PUBSUB) {
        if (opt_proto == P_LINE)
            die(2, "--mode pubsub: --proto must be pyasync, floor or socketio");
        if (opt_tls)
            die(2, "--mode pubsub: plain TCP only, no --tls");
        if (opt_keys)
            die(2, "--mode pubsub: no --keys");
        if (opt_size < PS_DATA_MIN || opt_size > PS_DATA_MAX)
            die(2, "--mode pubsub: --size must be %d to %d (the data holds a sequence number "
                   "and a send time)", PS_DATA_MIN, PS_DATA_MAX);
        if (!topic_ok(opt_topic))
            die(2, "--topic: dot-separated tokens of letters, digits, '_' and '-', got '%s'",
                opt_topic);
    } else if (opt_proto == P_SOCKETIO) {
        die(2, "--proto socketio needs --mode pubsub");
    }
    /* frame lengths are u32; the body must fit */
    if (opt_proto != P_LINE && (unsigned long)opt_size + 16 > 0xFFFFFFFFul)
        die(2, "--size too large");
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    if (opt_mode == M_PUBSUB)
        return run_pubsub();
    K = (uint32_t)opt_inflight;
    build_templates();
    raise_fd_limit(opt_conns);
    if (opt_tls)
        init_tls();

    g_ep = epoll_create1(EPOLL_CLOEXEC);
    if (g_ep < 0)
        die(2, "epoll_create1: %s", strerror(errno));
    g_conns = xcalloc((size_t)opt_conns, sizeof *g_conns);
    connect_all();

    /* all connections are up: start the clock and fill the pipelines */
    uint64_t t0 = now_ns();
    g_warm_end = t0 + (uint64_t)(opt_warmup * 1e9);
    g_dur_ns = (uint64_t)(opt_duration * 1e9);
    g_phase = 0;
    for (long i = 0; i < opt_conns; i++) {
        struct conn *c = &g_conns[i];
        for (uint32_t s = 0; s < K; s++)
            enqueue(c, s);
        flush(c);
    }

    struct epoll_event evs[MAX_EVENTS];
    while (g_phase != 2) {
        uint64_t t = now_ns();
        phase_check(t);
        if (g_phase == 2)
            break;
        uint64_t next = g_phase == 0 ? g_warm_end : g_t_start + g_dur_ns;
        int timeout = next > t ? (int)((next - t + 999999) / 1000000) : 0;
        int n = epoll_wait(g_ep, evs, MAX_EVENTS, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die(1, "epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n && g_phase != 2; i++) {
            struct conn *c = evs[i].data.ptr;
            uint32_t ev = evs[i].events;
            if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                on_readable(c); /* reports a closed or failed connection itself */
                if (g_phase == 2)
                    break;
            }
            if ((ev & EPOLLOUT) && c->tls_read_wants_write)
                on_readable(c);
            if ((ev & EPOLLOUT) && c->out_blocked && g_phase != 2)
                flush(c);
        }
    }

    double dur = (double)(g_t_stop - g_t_start) / 1e9;
    double rps = dur > 0 ? (double)g_requests / dur : 0.0;
    double mbps = dur > 0 ? (double)g_requests * (double)g_size / 1e6 / dur : 0.0;
    printf("{\"proto\":\"%s\",\"connections\":%ld,\"inflight\":%ld,\"size\":%ld,\"tls\":%s,"
           "\"duration_s\":%.3f,\"requests\":%llu,\"rps\":%.1f,\"mb_per_s\":%.2f,"
           "\"errors\":%llu,\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f,"
           "\"max_us\":%.1f}\n",
           opt_proto_name, opt_conns, opt_inflight, opt_size, opt_tls ? "true" : "false", dur,
           (unsigned long long)g_requests, rps, mbps, (unsigned long long)g_errors,
           h_percentile_us(50, g_requests), h_percentile_us(90, g_requests),
           h_percentile_us(99, g_requests), h_percentile_us(99.9, g_requests),
           (double)g_hist_max / 1000.0);
    fflush(stdout);
    if (g_requests == 0 && g_errors == 0)
        fprintf(stderr, "loadgen: warning: no answer was counted (server stalled, or --proto "
                        "does not match the server?)\n");
    /* no clean shutdown: the process exits and the kernel closes the sockets */
    return 0;
}
