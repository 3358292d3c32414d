/*
 * loadgen: the bench's load generator, tunnel holder and echo server, in one
 * single-threaded epoll program so that it is never the bottleneck.
 *
 *   loadgen echo   [-p PORT] [-d MAX_SECONDS]
 *       echo server on 127.0.0.1:PORT (0 = any free port); prints
 *       {"event": "listening", "port": P} and echoes until killed or MAX_SECONDS.
 *   loadgen direct -t ECHO_PORT [-c CONC] [-d SECONDS] [-w WARMUP] [-n MAX_OPS]
 *   loadgen socks5 -x PROXY_PORT -t ECHO_PORT [same options]
 *   loadgen http   -x PROXY_PORT -t ECHO_PORT [same options]
 *       keep CONC operations in flight for SECONDS; one operation is
 *       connect + handshake (none / SOCKS5 CONNECT / HTTP CONNECT) + send 100
 *       bytes + read the 100 echoed bytes + close. Prints one JSON line:
 *       ops/s, latency percentiles, errors.
 *   loadgen hold   -x PROXY_PORT -t ECHO_PORT -N COUNT [-P socks5|http] [-c CONC] [-d MAX_SECONDS]
 *       opens COUNT tunnels (CONC at a time), echoes 100 bytes through each,
 *       prints {"held": ...}, then keeps them open until stdin closes, a
 *       SIGTERM/SIGINT, or MAX_SECONDS; closes them and prints {"closed": ...}.
 *
 * Every address is 127.0.0.1: the bench never sends a packet anywhere else.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
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
#include <time.h>
#include <unistd.h>

#define PAYLOAD_SIZE 100
#define RECV_BUF 512
#define OP_TIMEOUT 10.0     /* seconds one operation may take before it counts as an error */
#define DRAIN_TIMEOUT 3.0   /* seconds to let in-flight operations finish after the run */
#define RETRY_PAUSE 0.010   /* seconds a slot waits after a failed operation */
#define SETUP_TIMEOUT 120.0 /* seconds `hold` may spend opening its tunnels */
#define SETUP_GIVE_UP 100   /* `hold` stops opening tunnels after this many failed (a full proxy) */

enum mode { MODE_DIRECT, MODE_SOCKS5, MODE_HTTP };

/* What a connection is waiting for. */
enum state {
    ST_FREE,       /* slot unused */
    ST_PAUSED,     /* waiting until `retry_at` before starting a new operation */
    ST_CONNECTING, /* non-blocking connect in progress */
    ST_SENDING,    /* writing `out` */
    ST_RECEIVING,  /* reading the answer of the current phase */
    ST_HELD,       /* `hold`: tunnel established and idle */
};

/* The steps of one operation, in order; each sends something and reads the answer. */
enum phase { PH_GREETING, PH_REQUEST, PH_HTTP_CONNECT, PH_ECHO, PH_DONE };

enum error_kind { ERR_CONNECT, ERR_REPLY, ERR_EOF, ERR_RESET, ERR_TIMEOUT, ERR_MISMATCH, ERR_KINDS };
static const char *error_names[ERR_KINDS] = {"connect", "reply", "eof", "reset", "timeout", "mismatch"};

struct conn {
    int fd;
    enum state state;
    enum phase phase;
    double started;  /* when the operation began */
    double deadline; /* when it times out */
    double retry_at; /* ST_PAUSED: when to start again */
    const char *out;
    size_t out_len, out_off;
    uint32_t events; /* what epoll watches for; 0 = not registered */
    char in[RECV_BUF];
    size_t in_len;
};

/* ---- settings and results ---------------------------------------------------- */

static enum mode mode = MODE_DIRECT;
static int proxy_port, echo_port, listen_port;
static int concurrency = 1;
static double duration = -1, warmup = 0.0; /* -1: the mode's default */
static long max_ops = 10000000;
static long hold_count;

static int epfd;
static char payload[PAYLOAD_SIZE];
static char socks5_request[10];
static char http_request[256];
static size_t http_request_len;

static uint32_t *latencies_us; /* of the operations counted */
static size_t latency_count, latency_cap;
static long error_counts[ERR_KINDS];
static char first_error[160];

static volatile sig_atomic_t stop_requested;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void on_signal(int sig) {
    (void)sig;
    stop_requested = 1;
}

/* Raise the soft descriptor limit to the hard one: `hold` and `echo` keep thousands open. */
static void raise_fd_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return sa;
}

static void record_error(enum error_kind kind, const char *fmt, ...) {
    error_counts[kind]++;
    if (!first_error[0]) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(first_error, sizeof first_error, fmt, ap);
        va_end(ap);
    }
}

static void record_latency(double seconds) {
    if (latency_count == latency_cap) {
        latency_cap = latency_cap ? latency_cap * 2 : 65536;
        latencies_us = realloc(latencies_us, latency_cap * sizeof *latencies_us);
        if (!latencies_us)
            die("realloc");
    }
    latencies_us[latency_count++] = (uint32_t)(seconds * 1e6);
}

/* ---- one connection's state machine ----------------------------------------------- */

/* Ask epoll for `events` on the connection, with a system call only when that changes. */
static void want(struct conn *c, uint32_t events) {
    if (c->events == events)
        return;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, c->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &ev) < 0)
        die("epoll_ctl");
    c->events = events;
}

static void close_conn(struct conn *c) {
    if (c->fd >= 0)
        close(c->fd); /* also leaves the epoll set */
    c->fd = -1;
    c->events = 0;
}

/* The operation failed: close it, and let the slot start again after a short pause. */
static void fail(struct conn *c, double t) {
    close_conn(c);
    c->state = ST_PAUSED;
    c->retry_at = t + RETRY_PAUSE;
}

/* What the current phase sends. */
static void begin_phase(struct conn *c) {
    switch (c->phase) {
    case PH_GREETING: c->out = "\x05\x01\x00"; c->out_len = 3; break;
    case PH_REQUEST: c->out = socks5_request; c->out_len = sizeof socks5_request; break;
    case PH_HTTP_CONNECT: c->out = http_request; c->out_len = http_request_len; break;
    case PH_ECHO: c->out = payload; c->out_len = PAYLOAD_SIZE; break;
    case PH_DONE: break;
    }
    c->out_off = 0;
    c->in_len = 0;
    c->state = ST_SENDING;
}

static enum phase first_phase(enum mode m) {
    return m == MODE_SOCKS5 ? PH_GREETING : m == MODE_HTTP ? PH_HTTP_CONNECT : PH_ECHO;
}

static enum phase next_phase(enum phase p) {
    return p == PH_GREETING ? PH_REQUEST : p == PH_ECHO ? PH_DONE : PH_ECHO;
}

/* Start a new operation in slot `c`: a non-blocking connect. */
static void start_op(struct conn *c, double t) {
    int port = mode == MODE_DIRECT ? echo_port : proxy_port;
    struct sockaddr_in sa = loopback(port);
    int one = 1;
    c->started = t;
    c->deadline = t + OP_TIMEOUT;
    c->phase = first_phase(mode);
    c->in_len = 0;
    c->events = 0;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        record_error(ERR_CONNECT, "socket: %s", strerror(errno));
        fail(c, t);
        return;
    }
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
        record_error(ERR_CONNECT, "connect: %s", strerror(errno));
        fail(c, t);
        return;
    }
    c->state = ST_CONNECTING;
    want(c, EPOLLOUT);
}

/* How many bytes a complete SOCKS5 reply has, or 0 when more are needed to tell. */
static size_t socks5_reply_size(const char *b, size_t n) {
    if (n < 5)
        return 0;
    switch ((unsigned char)b[3]) {
    case 1: return 4 + 4 + 2;
    case 4: return 4 + 16 + 2;
    case 3: return 4 + 1 + (unsigned char)b[4] + 2;
    default: return 4; /* bad address type: the check reports it */
    }
}

/* What the bytes received so far mean for the current phase. */
enum verdict { NEED_MORE, PHASE_OK, PHASE_BAD };

static enum verdict check_phase(struct conn *c) {
    const unsigned char *b = (const unsigned char *)c->in;
    size_t n = c->in_len;
    switch (c->phase) {
    case PH_GREETING:
        if (n < 2)
            return NEED_MORE;
        if (n == 2 && b[0] == 5 && b[1] == 0)
            return PHASE_OK;
        record_error(ERR_REPLY, "socks5 method reply %02x %02x (%zu bytes)", b[0], b[1], n);
        return PHASE_BAD;
    case PH_REQUEST: {
        size_t want_bytes = socks5_reply_size(c->in, n);
        if (want_bytes == 0 || n < want_bytes)
            return NEED_MORE;
        if (n == want_bytes && b[0] == 5 && b[1] == 0 && (b[3] == 1 || b[3] == 3 || b[3] == 4))
            return PHASE_OK;
        record_error(ERR_REPLY, "socks5 reply %02x %02x %02x %02x (%zu bytes)", b[0], b[1], b[2],
                     b[3], n);
        return PHASE_BAD;
    }
    case PH_HTTP_CONNECT: {
        char *end = memmem(c->in, n, "\r\n\r\n", 4);
        if (!end && n < sizeof c->in)
            return NEED_MORE;
        if (end && (size_t)(end + 4 - c->in) == n && n >= 12 &&
            memcmp(c->in, "HTTP/1.", 7) == 0 && memcmp(c->in + 9, "200", 3) == 0)
            return PHASE_OK;
        record_error(ERR_REPLY, "http CONNECT answer: %.*s", (int)(n < 40 ? n : 40), c->in);
        return PHASE_BAD;
    }
    case PH_ECHO:
        if (n < PAYLOAD_SIZE)
            return NEED_MORE;
        if (n == PAYLOAD_SIZE && memcmp(c->in, payload, PAYLOAD_SIZE) == 0)
            return PHASE_OK;
        record_error(ERR_MISMATCH, "echoed bytes differ (%zu bytes)", n);
        return PHASE_BAD;
    case PH_DONE:
        break;
    }
    return PHASE_BAD;
}

/* Outcome of handling one readiness event for a connection. */
enum outcome { GOING_ON, OP_DONE, OP_FAILED };

/* Advance the connection as far as the socket allows without blocking. */
static enum outcome on_event(struct conn *c, double t) {
    if (c->state == ST_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            record_error(ERR_CONNECT, "connect: %s", strerror(err));
            fail(c, t);
            return OP_FAILED;
        }
        begin_phase(c);
    }
    for (;;) {
        if (c->state == ST_SENDING) {
            while (c->out_off < c->out_len) {
                ssize_t w =
                    send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
                if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
                    want(c, EPOLLOUT);
                    return GOING_ON;
                }
                if (w < 0) {
                    record_error(ERR_RESET, "send: %s", strerror(errno));
                    fail(c, t);
                    return OP_FAILED;
                }
                c->out_off += (size_t)w;
            }
            c->state = ST_RECEIVING;
            want(c, EPOLLIN);
        }
        if (c->state != ST_RECEIVING)
            return GOING_ON;
        ssize_t r = recv(c->fd, c->in + c->in_len, sizeof c->in - c->in_len, 0);
        if (r < 0 && (errno == EAGAIN || errno == EINTR))
            return GOING_ON;
        if (r < 0) {
            record_error(ERR_RESET, "recv in phase %d: %s", c->phase, strerror(errno));
            fail(c, t);
            return OP_FAILED;
        }
        if (r == 0) {
            record_error(ERR_EOF, "closed by peer in phase %d after %zu bytes", c->phase,
                         c->in_len);
            fail(c, t);
            return OP_FAILED;
        }
        c->in_len += (size_t)r;
        switch (check_phase(c)) {
        case NEED_MORE:
            continue;
        case PHASE_BAD:
            fail(c, t);
            return OP_FAILED;
        case PHASE_OK:
            c->phase = next_phase(c->phase);
            if (c->phase == PH_DONE)
                return OP_DONE;
            begin_phase(c);
        }
    }
}

static void prepare_requests(void) {
    struct sockaddr_in target = loopback(echo_port);
    for (int i = 0; i < PAYLOAD_SIZE; i++)
        payload[i] = (char)('a' + i % 26);
    memcpy(socks5_request, "\x05\x01\x00\x01", 4);
    memcpy(socks5_request + 4, &target.sin_addr.s_addr, 4);
    memcpy(socks5_request + 8, &target.sin_port, 2);
    http_request_len = (size_t)snprintf(
        http_request, sizeof http_request,
        "CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n", echo_port, echo_port);
}

/* ---- run: operations for a while, then statistics ------------------------------------ */

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static double percentile_ms(double p) {
    if (!latency_count)
        return 0.0;
    size_t i = (size_t)(p / 100.0 * (double)(latency_count - 1) + 0.5);
    return latencies_us[i] / 1000.0;
}

static const char *mode_name(enum mode m) {
    return m == MODE_SOCKS5 ? "socks5" : m == MODE_HTTP ? "http" : "direct";
}

static long total_errors(void) {
    long sum = 0;
    for (int k = 0; k < ERR_KINDS; k++)
        sum += error_counts[k];
    return sum;
}

static void print_errors_json(void) {
    printf("\"errors\": %ld, \"error_kinds\": {", total_errors());
    for (int k = 0; k < ERR_KINDS; k++)
        printf("%s\"%s\": %ld", k ? ", " : "", error_names[k], error_counts[k]);
    printf("}, \"first_error\": \"");
    for (const char *s = first_error; *s; s++) /* JSON-safe: drop quotes and control bytes */
        if (*s != '"' && *s != '\\' && (unsigned char)*s >= 0x20)
            putchar(*s);
    printf("\"");
}

static void check_timeouts(struct conn *conns, int n, double t) {
    for (int i = 0; i < n; i++) {
        struct conn *c = &conns[i];
        if ((c->state == ST_CONNECTING || c->state == ST_SENDING || c->state == ST_RECEIVING) &&
            t > c->deadline)
        {
            record_error(ERR_TIMEOUT, "operation timed out in phase %d", c->phase);
            fail(c, t);
        }
    }
}

static int run_load(void) {
    struct conn *conns = calloc((size_t)concurrency, sizeof *conns);
    struct epoll_event events[256];
    double t0 = now(), measure_from = t0 + warmup, end = measure_from + duration;
    double last_check = t0;
    long counted = 0;
    int in_flight = 0;

    for (int i = 0; i < concurrency; i++) {
        conns[i].fd = -1;
        start_op(&conns[i], t0);
    }
    for (;;) {
        double t = now();
        int stopping = t >= end || counted >= max_ops || stop_requested;
        /* Start new operations in paused slots; count what is still in flight. */
        in_flight = 0;
        for (int i = 0; i < concurrency; i++) {
            struct conn *c = &conns[i];
            if (c->state == ST_PAUSED && !stopping && t >= c->retry_at)
                start_op(c, t);
            if (c->state != ST_PAUSED && c->state != ST_FREE)
                in_flight++;
        }
        if (stopping && (in_flight == 0 || t >= end + DRAIN_TIMEOUT))
            break;
        if (t - last_check > 0.1) {
            check_timeouts(conns, concurrency, t);
            last_check = t;
        }
        int n = epoll_wait(epfd, events, 256, 10);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        t = now();
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (on_event(c, t) != OP_DONE)
                continue;
            close_conn(c);
            if (t >= measure_from && t < end && counted < max_ops) {
                record_latency(t - c->started);
                counted++;
            }
            if (t < end && counted < max_ops && !stop_requested)
                start_op(c, t);
            else
                c->state = ST_FREE;
        }
    }
    long unfinished = 0;
    for (int i = 0; i < concurrency; i++)
        if (conns[i].fd >= 0) {
            close_conn(&conns[i]);
            unfinished++;
        }
    double window = (counted >= max_ops ? now() : end) - measure_from;
    if (window > end - measure_from)
        window = end - measure_from;
    qsort(latencies_us, latency_count, sizeof *latencies_us, cmp_u32);
    printf("{\"mode\": \"%s\", \"concurrency\": %d, \"seconds\": %.3f, \"ops\": %ld, "
           "\"ops_per_s\": %.1f, \"p50_ms\": %.3f, \"p90_ms\": %.3f, \"p99_ms\": %.3f, "
           "\"max_ms\": %.3f, \"unfinished\": %ld, ",
           mode_name(mode), concurrency, window, counted, window > 0 ? counted / window : 0.0,
           percentile_ms(50), percentile_ms(90), percentile_ms(99), percentile_ms(100), unfinished);
    print_errors_json();
    printf("}\n");
    free(conns);
    return 0;
}

/* ---- hold: many idle tunnels ----------------------------------------------------------- */

static int run_hold(void) {
    struct conn *conns = calloc((size_t)hold_count, sizeof *conns);
    struct epoll_event events[256];
    double t0 = now();
    long next = 0, held = 0, failed = 0;
    int in_setup = 0;

    raise_fd_limit();
    for (long i = 0; i < hold_count; i++)
        conns[i].fd = -1;
    /* Setup: at most `concurrency` tunnels being opened at a time; a failed one is not retried,
     * and after SETUP_GIVE_UP failures no new ones are started (the proxy is full). */
    for (;;) {
        int more = next < hold_count && failed < SETUP_GIVE_UP;
        if ((!more && held + failed == next) || stop_requested || now() - t0 > SETUP_TIMEOUT)
            break;
        double t = now();
        while (more && in_setup < concurrency && next < hold_count) {
            start_op(&conns[next++], t);
            in_setup++;
        }
        int n = epoll_wait(epfd, events, 256, 100);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        t = now();
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            enum outcome o = on_event(c, t);
            if (o == GOING_ON)
                continue;
            in_setup--;
            if (o == OP_DONE) {
                held++;
                c->state = ST_HELD;
                want(c, EPOLLIN | EPOLLRDHUP); /* to notice a dropped tunnel */
            } else {
                failed++;
                c->state = ST_FREE;
            }
        }
        for (long i = 0; i < next; i++) /* failures found by the timeout check */
            if (conns[i].state == ST_PAUSED) {
                conns[i].state = ST_FREE;
                failed++;
                in_setup--;
            } else if ((conns[i].state == ST_CONNECTING || conns[i].state == ST_SENDING ||
                        conns[i].state == ST_RECEIVING) &&
                       t > conns[i].deadline) {
                record_error(ERR_TIMEOUT, "setup timed out in phase %d", conns[i].phase);
                fail(&conns[i], t);
                conns[i].state = ST_FREE;
                failed++;
                in_setup--;
            }
    }
    for (long i = 0; i < next; i++) /* still opening after the time limit: not held */
        if (conns[i].state != ST_HELD && conns[i].fd >= 0)
            close_conn(&conns[i]);
    printf("{\"mode\": \"hold\", \"protocol\": \"%s\", \"requested\": %ld, \"attempted\": %ld, "
           "\"held\": %ld, \"setup_seconds\": %.3f, ",
           mode_name(mode), hold_count, next, held, now() - t0);
    print_errors_json();
    printf("}\n");
    fflush(stdout);

    /* Hold until stdin closes, a signal, or the time limit. */
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, STDIN_FILENO, &ev); /* fails for /dev/null: then time decides */
    double hold_until = now() + duration;
    long dropped = 0;
    while (!stop_requested && now() < hold_until) {
        int n = epoll_wait(epfd, events, 256, 200);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c == NULL) {
                char buf[256];
                ssize_t r = read(STDIN_FILENO, buf, sizeof buf);
                if (r <= 0)
                    stop_requested = 1;
                continue;
            }
            close_conn(c); /* the proxy or the echo server ended this tunnel */
            c->state = ST_FREE;
            dropped++;
        }
    }
    long closed = 0;
    for (long i = 0; i < hold_count; i++)
        if (conns[i].state == ST_HELD && conns[i].fd >= 0) {
            close_conn(&conns[i]);
            closed++;
        }
    printf("{\"mode\": \"hold\", \"closed\": %ld, \"dropped_while_held\": %ld}\n", closed, dropped);
    free(conns);
    return 0;
}

/* ---- echo server ------------------------------------------------------------------------ */

/* Bytes an echo connection could not write back yet; indexed by fd. */
struct pending {
    char *data;
    size_t len, off;
};

static int run_echo(void) {
    struct sockaddr_in sa = loopback(listen_port);
    socklen_t salen = sizeof sa;
    int one = 1;
    static char buf[65536];
    struct rlimit rl;

    raise_fd_limit();
    getrlimit(RLIMIT_NOFILE, &rl);
    size_t max_fd = rl.rlim_cur == RLIM_INFINITY ? 1048576 : (size_t)rl.rlim_cur;
    struct pending *pending = calloc(max_fd, sizeof *pending);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0)
        die("socket");
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("bind");
    if (listen(lfd, 4096) < 0)
        die("listen");
    getsockname(lfd, (struct sockaddr *)&sa, &salen);
    printf("{\"event\": \"listening\", \"port\": %d}\n", ntohs(sa.sin_port));
    fflush(stdout);

    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev);
    struct epoll_event events[256];
    double until = now() + duration;
    while (!stop_requested && now() < until) {
        int n = epoll_wait(epfd, events, 256, 500);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == lfd) {
                for (int k = 0; k < 256; k++) {
                    int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (cfd < 0)
                        break; /* EAGAIN, or EMFILE: try again on the next wake-up */
                    if ((size_t)cfd >= max_fd) {
                        close(cfd);
                        continue;
                    }
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = cfd};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, cfd, &cev);
                }
                continue;
            }
            struct pending *p = &pending[fd];
            int closing = 0;
            if (p->data) { /* writable again: finish the earlier echo first */
                ssize_t w = send(fd, p->data + p->off, p->len - p->off, MSG_NOSIGNAL);
                if (w < 0 && errno != EAGAIN)
                    closing = 1;
                else if (w > 0 && (p->off += (size_t)w) == p->len) {
                    free(p->data);
                    p->data = NULL;
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = fd};
                    epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &cev);
                }
            } else {
                ssize_t r = recv(fd, buf, sizeof buf, 0);
                if (r <= 0) {
                    closing = r == 0 || errno != EAGAIN;
                } else {
                    ssize_t w = send(fd, buf, (size_t)r, MSG_NOSIGNAL);
                    if (w < 0 && errno != EAGAIN) {
                        closing = 1;
                    } else if (w < r) { /* keep the rest; stop reading until it is out */
                        size_t done = w > 0 ? (size_t)w : 0;
                        p->len = (size_t)r - done;
                        p->off = 0;
                        p->data = malloc(p->len);
                        memcpy(p->data, buf + done, p->len);
                        struct epoll_event cev = {.events = EPOLLOUT, .data.fd = fd};
                        epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &cev);
                    }
                }
            }
            if (closing) {
                free(p->data);
                p->data = NULL;
                close(fd);
            }
        }
    }
    return 0;
}

/* ---- command line -------------------------------------------------------------------------- */

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen echo [-p PORT] [-d MAX_SECONDS]\n"
            "       loadgen direct|socks5|http [-x PROXY_PORT] -t ECHO_PORT [-c CONC] "
            "[-d SECONDS] [-w WARMUP] [-n MAX_OPS]\n"
            "       loadgen hold -x PROXY_PORT -t ECHO_PORT -N COUNT [-P socks5|http] [-c CONC] "
            "[-d MAX_SECONDS]\n");
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 2)
        usage();
    const char *command = argv[1];
    const char *hold_protocol = "socks5";
    int opt;
    optind = 2;
    while ((opt = getopt(argc, argv, "p:x:t:c:d:w:n:N:P:")) != -1) {
        switch (opt) {
        case 'p': listen_port = atoi(optarg); break;
        case 'x': proxy_port = atoi(optarg); break;
        case 't': echo_port = atoi(optarg); break;
        case 'c': concurrency = atoi(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 'n': max_ops = atol(optarg); break;
        case 'N': hold_count = atol(optarg); break;
        case 'P': hold_protocol = optarg; break;
        default: usage();
        }
    }
    struct sigaction sa = {.sa_handler = on_signal}; /* no SA_RESTART: epoll_wait returns */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");
    if (concurrency < 1 || duration == 0)
        usage();
    if (duration < 0) /* servers and holders stop on their own eventually, too */
        duration = strcmp(command, "echo") == 0 ? 3600 : strcmp(command, "hold") == 0 ? 600 : 5;

    if (strcmp(command, "echo") == 0)
        return run_echo();
    if (strcmp(command, "direct") == 0)
        mode = MODE_DIRECT;
    else if (strcmp(command, "socks5") == 0)
        mode = MODE_SOCKS5;
    else if (strcmp(command, "http") == 0)
        mode = MODE_HTTP;
    else if (strcmp(command, "hold") == 0)
        mode = strcmp(hold_protocol, "http") == 0 ? MODE_HTTP : MODE_SOCKS5;
    else
        usage();
    if (echo_port <= 0 || (mode != MODE_DIRECT && proxy_port <= 0))
        usage();
    prepare_requests();
    if (strcmp(command, "hold") == 0) {
        if (hold_count <= 0)
            usage();
        return run_hold();
    }
    return run_load();
}
