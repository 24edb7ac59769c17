/* mecs_client: the C client of the mecs correction service (see mecs_client.h).
 *
 * One libcurl easy handle per client is one keep-alive connection: libcurl keeps the
 * connection of a handle open between transfers and reconnects by itself when the
 * server closed it while idle. Requests are the Open Inference Protocol's binary
 * form: a JSON header of Inference-Header-Content-Length bytes, then the state's raw
 * little-endian bytes; the answer has the same form with the correction. */
#define _POSIX_C_SOURCE 200809L
#include "mecs_client.h"

#include <ctype.h>
#include <curl/curl.h>
#include <errno.h>
#include <locale.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mecs_json.h"

#define ERR_LEN 1024
#define SMALL_BODY 65536
/* as the server's MAX_DEGRADED_STEPS_PER_CALL: the most one call may report */
#define MAX_REPORTED 1000

typedef struct {
    char *data;
    size_t len, cap;
} buffer;

typedef struct { /* a request body sent from the caller's memory (large states) */
    const char *head;
    size_t head_len;
    const char *data;
    size_t data_len, pos;
} upload;

struct mecs_client {
    /* options */
    char *url, *model, *api_key_env, *api_key_file, *ca_file, *dt_unit;
    char *expect_dims, *expect_fields, *expect_units;
    char *group; /* timestep group: the run's name; group_size callers send each step */
    long group_size;
    long version_opt;
    int follow_latest, policy, retries, failure_threshold, expect_dtype, expect_rank;
    double timeout, connect_timeout, backoff, cooldown;
    int64_t expect_shape[MECS_MAX_RANK];
    /* connection and model */
    CURL *curl;
    struct curl_slist *get_headers, *post_headers; /* post_headers: for post_header_len */
    size_t post_header_len;
    char *auth_header, *infer_url, *metadata; /* infer_url: the path, /v2/... */
    /* endpoints: the url option split at commas (replicas of one service) */
    char *bases[MECS_MAX_ENDPOINTS];
    int n_bases, active;
    long long failovers;
    char url_buf[2048];
    int connected, accepts_fp32, accepts_fp64, rank;
    int64_t shape[MECS_MAX_RANK], size;
    long pinned, last_version;
    /* degradation */
    long long calls, degraded, unreported, failures, consecutive;
    double open_until;
    int answered; /* the model answered once: a later 404 is an unload, an outage */
    void *last;
    size_t last_cap;
    int64_t last_batch;
    int last_dtype;
    /* per-call buffers */
    buffer request, response;
    long header_length;
    locale_t c_locale; /* numbers are parsed and printed in the C locale, whatever the host's */
    char curl_err[CURL_ERROR_SIZE];
    char err[ERR_LEN];
};

/* -- small helpers -------------------------------------------------------------- */

static int fail(mecs_client *c, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
    return code;
}

/* Append to a fixed buffer; 0 once it is full (the caller then refuses the request). */
static int append(char *buf, size_t cap, size_t *off, const char *fmt, ...) {
    if (*off >= cap) return 0;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf + *off, cap - *off, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= cap - *off) {
        *off = cap;
        return 0;
    }
    *off += (size_t)n;
    return 1;
}

/* A JSON number that is a whole count in [lo, hi]. */
static int whole(const mj_node *n, double lo, double hi) {
    return n && n->type == MJ_NUMBER && n->number >= lo && n->number <= hi &&
           n->number == floor(n->number);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void sleep_s(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

static char *dup_str(const char *s) {
    if (!s) return NULL;
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

static int reserve(buffer *b, size_t need) {
    if (need <= b->cap) return 1;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < need) cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p) return 0;
    b->data = p;
    b->cap = cap;
    return 1;
}

static size_t dtype_size(int dtype) { return dtype == MECS_FP64 ? 8 : 4; }
static const char *dtype_name(int dtype) { return dtype == MECS_FP64 ? "FP64" : "FP32"; }

static int parse_double(const char *v, double lo, double *out) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || end == v || *end || !isfinite(x) || x < lo) return 0;
    *out = x;
    return 1;
}

static int parse_long(const char *v, long lo, long *out) {
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < lo) return 0;
    *out = x;
    return 1;
}

/* "a, b ,c" -> compare item by item with a JSON array of strings; 1 when equal. */
static int same_list(const char *csv, const mj_node *array, char *got, size_t got_len) {
    size_t n = 0, off = 0;
    got[0] = '\0';
    for (const mj_node *e = array ? array->child : NULL; e; e = e->next) {
        const char *s = mj_str(e);
        off += (size_t)snprintf(got + off, off < got_len ? got_len - off : 0, "%s%s",
                                n++ ? "," : "", s ? s : "?");
        if (off >= got_len) off = got_len - 1;
    }
    const char *p = csv;
    const mj_node *e = array ? array->child : NULL;
    for (;;) {
        while (*p == ' ') p++;
        const char *q = p;
        while (*q && *q != ',') q++;
        const char *r = q;
        while (r > p && r[-1] == ' ') r--;
        const char *s = e ? mj_str(e) : NULL;
        if (!s || strlen(s) != (size_t)(r - p) || strncmp(s, p, (size_t)(r - p)) != 0) return 0;
        e = e->next;
        if (!*q) break;
        p = q + 1;
    }
    return e == NULL;
}

/* The time units the service converts between (facts of correction/timeunits.py). */
static const char *canonical_unit(const char *text) {
    static const char *table[][2] = {
        {"s", "second"},    {"sec", "second"},    {"secs", "second"},  {"second", "second"},
        {"seconds", "second"}, {"min", "minute"}, {"mins", "minute"},  {"minute", "minute"},
        {"minutes", "minute"}, {"h", "hour"},     {"hr", "hour"},      {"hrs", "hour"},
        {"hour", "hour"},   {"hours", "hour"},    {"d", "day"},        {"day", "day"},
        {"days", "day"},    {"model time unit", "model time unit"},
        {"model time units", "model time unit"}, {"mtu", "model time unit"},
        {"1", "model time unit"}};
    char low[64];
    size_t n = 0;
    while (*text == ' ') text++;
    for (; text[n] && n < sizeof low - 1; n++) low[n] = (char)tolower((unsigned char)text[n]);
    while (n && low[n - 1] == ' ') n--;
    low[n] = '\0';
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (strcmp(low, table[i][0]) == 0) return table[i][1];
    return NULL;
}

/* -- options -------------------------------------------------------------------- */

mecs_client *mecs_new(void) {
    mecs_client *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->version_opt = -1;
    c->policy = MECS_POLICY_RAISE;
    c->timeout = 5.0;
    c->connect_timeout = 1.0;
    c->retries = 2;
    c->backoff = 0.02;
    c->failure_threshold = 3;
    c->cooldown = 2.0;
    c->pinned = c->last_version = -1;
    c->api_key_env = dup_str("MECS_API_KEY");
    return c;
}

static int set_string(mecs_client *c, char **slot, const char *value) {
    char *copy = dup_str(value);
    if (!copy) return fail(c, MECS_E_MEMORY, "out of memory");
    free(*slot);
    *slot = copy;
    return MECS_OK;
}

static int parse_policy(const char *v) {
    if (strcmp(v, "raise") == 0) return MECS_POLICY_RAISE;
    if (strcmp(v, "zero") == 0) return MECS_POLICY_ZERO;
    if (strcmp(v, "last") == 0) return MECS_POLICY_LAST;
    return -1;
}

/* A group name goes into the JSON header as it is: plain characters only. */
static int group_name_ok(const char *v) {
    size_t n = strlen(v);
    if (n < 1 || n > 128) return 0;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)v[i]) && !strchr("._:-", v[i])) return 0;
    return 1;
}

/* The timestep group from the options, else MECS_GROUP and MECS_GROUP_SIZE, the size
 * else the MPI job's (OMPI_COMM_WORLD_SIZE, PMI_SIZE, SLURM_NTASKS). */
static int resolve_group(mecs_client *c) {
    const char *env = getenv("MECS_GROUP");
    if (!c->group && env && *env) {
        int rc = mecs_set(c, "group", env);
        if (rc != MECS_OK) return fail(c, rc, "MECS_GROUP: %s", c->err);
    }
    if (!c->group) {
        if (c->group_size) return fail(c, MECS_E_ARGUMENT, "option group_size needs a group (the run's name)");
        return MECS_OK;
    }
    if (c->group_size) return MECS_OK;
    const char *vars[] = {"MECS_GROUP_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *v = getenv(vars[i]);
        if (v && *v) {
            int rc = mecs_set(c, "group_size", v);
            if (rc != MECS_OK) return fail(c, rc, "%s: %s", vars[i], c->err);
            return MECS_OK;
        }
    }
    return fail(c, MECS_E_ARGUMENT, "group '%s' has no size: set option group_size or MECS_GROUP_SIZE",
                c->group);
}

int mecs_set(mecs_client *c, const char *name, const char *value) {
    if (!c) return MECS_E_ARGUMENT;
    if (!name || !value) return fail(c, MECS_E_ARGUMENT, "mecs_set: name and value are needed");
    if (strcmp(name, "policy") == 0) {
        int p = parse_policy(value);
        if (p < 0) return fail(c, MECS_E_ARGUMENT, "option policy: '%s' is not raise, zero or last", value);
        c->policy = p;
        return MECS_OK;
    }
    if (c->connected)
        return fail(c, MECS_E_STATE, "option %s: set it before mecs_connect", name);
    double d;
    long l;
    struct { const char *name; char **slot; } strings[] = {
        {"url", &c->url},           {"model", &c->model},
        {"api_key_env", &c->api_key_env}, {"api_key_file", &c->api_key_file},
        {"ca_file", &c->ca_file},   {"expect_dims", &c->expect_dims},
        {"expect_fields", &c->expect_fields}, {"expect_units", &c->expect_units}};
    for (size_t i = 0; i < sizeof strings / sizeof strings[0]; i++)
        if (strcmp(name, strings[i].name) == 0) return set_string(c, strings[i].slot, value);
    if (strcmp(name, "dt_unit") == 0) {
        const char *unit = strlen(value) < 64 ? canonical_unit(value) : NULL;
        if (!unit)
            return fail(c, MECS_E_ARGUMENT,
                        "option dt_unit: unknown time unit '%.64s'; use s, min, h, day or 'model time unit'",
                        value);
        return set_string(c, &c->dt_unit, unit); /* the canonical name: plain words only */
    }
    if (strcmp(name, "group") == 0) {
        if (!group_name_ok(value))
            return fail(c, MECS_E_ARGUMENT,
                        "option group: '%.64s' must be 1 to 128 letters, digits, '.', '_', ':' or '-'",
                        value);
        return set_string(c, &c->group, value);
    }
    if (strcmp(name, "group_size") == 0) {
        if (!parse_long(value, 1, &l) || l > 65536)
            return fail(c, MECS_E_ARGUMENT, "option group_size: '%s' is not an integer from 1 to 65536",
                        value);
        c->group_size = l;
        return MECS_OK;
    }
    if (strcmp(name, "version") == 0) {
        if (!parse_long(value, 1, &l))
            return fail(c, MECS_E_ARGUMENT, "option version: '%s' is not a version (1, 2, ...)", value);
        c->version_opt = l;
        return MECS_OK;
    }
    if (strcmp(name, "follow_latest") == 0 || strcmp(name, "retries") == 0 ||
        strcmp(name, "failure_threshold") == 0) {
        long lo = strcmp(name, "failure_threshold") == 0 ? 1 : 0;
        if (!parse_long(value, lo, &l) || l > 1000000)
            return fail(c, MECS_E_ARGUMENT, "option %s: '%s' is not an integer >= %ld", name, value, lo);
        if (name[0] == 'f' && name[1] == 'o') c->follow_latest = l != 0;
        else if (name[0] == 'r') c->retries = (int)l;
        else c->failure_threshold = (int)l;
        return MECS_OK;
    }
    struct { const char *name; double *slot; double lo; } numbers[] = {
        {"timeout", &c->timeout, 1e-3}, {"connect_timeout", &c->connect_timeout, 1e-3},
        {"backoff", &c->backoff, 0},    {"cooldown", &c->cooldown, 0}};
    for (size_t i = 0; i < sizeof numbers / sizeof numbers[0]; i++)
        if (strcmp(name, numbers[i].name) == 0) {
            if (!parse_double(value, numbers[i].lo, &d))
                return fail(c, MECS_E_ARGUMENT, "option %s: '%s' is not a number >= %g", name, value,
                            numbers[i].lo);
            *numbers[i].slot = d;
            return MECS_OK;
        }
    if (strcmp(name, "expect_dtype") == 0) {
        if (strcmp(value, "FP32") == 0) c->expect_dtype = MECS_FP32;
        else if (strcmp(value, "FP64") == 0) c->expect_dtype = MECS_FP64;
        else return fail(c, MECS_E_ARGUMENT, "option expect_dtype: '%s' is not FP32 or FP64", value);
        return MECS_OK;
    }
    if (strcmp(name, "expect_shape") == 0) {
        int rank = 0;
        const char *p = value;
        while (*p) {
            char *end;
            errno = 0;
            long long v = strtoll(p, &end, 10);
            if (end == p || errno || v < 1 || rank == MECS_MAX_RANK)
                return fail(c, MECS_E_ARGUMENT,
                            "option expect_shape: '%s' is not 1 to %d positive sizes such as 36 or 3,16,32",
                            value, MECS_MAX_RANK);
            c->expect_shape[rank++] = (int64_t)v;
            p = end;
            while (*p == ' ') p++;
            if (*p == ',') p++;
        }
        if (!rank) return fail(c, MECS_E_ARGUMENT, "option expect_shape: empty");
        c->expect_rank = rank;
        return MECS_OK;
    }
    return fail(c, MECS_E_ARGUMENT, "unknown option '%s'", name);
}

/* -- HTTP ----------------------------------------------------------------------- */

static size_t on_body(char *ptr, size_t size, size_t n, void *userdata) {
    buffer *b = userdata;
    size_t len = size * n;
    if (!reserve(b, b->len + len + 1)) return 0; /* libcurl then fails the transfer */
    memcpy(b->data + b->len, ptr, len);
    b->len += len;
    b->data[b->len] = '\0';
    return len;
}

static size_t on_header(char *ptr, size_t size, size_t n, void *userdata) {
    mecs_client *c = userdata;
    size_t len = size * n;
    static const char name[] = "inference-header-content-length:";
    size_t k = sizeof name - 1;
    if (len > k) {
        size_t i = 0;
        while (i < k && tolower((unsigned char)ptr[i]) == name[i]) i++;
        if (i == k) {
            char num[32];
            size_t m = len - k < sizeof num - 1 ? len - k : sizeof num - 1;
            memcpy(num, ptr + k, m);
            num[m] = '\0';
            c->header_length = strtol(num, NULL, 10);
        }
    }
    return len;
}

static int on_seek(void *userdata, curl_off_t offset, int origin) {
    upload *u = userdata; /* libcurl rewinds to resend on a connection it had to reopen */
    if (origin != SEEK_SET || offset < 0 || (size_t)offset > u->head_len + u->data_len)
        return CURL_SEEKFUNC_CANTSEEK;
    u->pos = (size_t)offset;
    return CURL_SEEKFUNC_OK;
}

static size_t on_upload(char *dst, size_t size, size_t n, void *userdata) {
    upload *u = userdata;
    size_t room = size * n, done = 0;
    while (room && u->pos < u->head_len + u->data_len) {
        const char *src;
        size_t avail;
        if (u->pos < u->head_len) {
            src = u->head + u->pos;
            avail = u->head_len - u->pos;
        } else {
            src = u->data + (u->pos - u->head_len);
            avail = u->data_len - (u->pos - u->head_len);
        }
        size_t take = avail < room ? avail : room;
        memcpy(dst + done, src, take);
        done += take;
        room -= take;
        u->pos += take;
    }
    return done;
}

/* The "error" text of a JSON error body, else its first bytes. */
static void error_text(const buffer *b, char *out, size_t len) {
    char jerr[64];
    mj_node *root = b->len ? mj_parse(b->data, b->len, jerr, sizeof jerr) : NULL;
    const char *s = mj_str(mj_get(root, "error"));
    if (s) snprintf(out, len, "%s", s);
    else snprintf(out, len, "%.200s", b->len ? b->data : "(empty body)");
    mj_free(root);
}

/* One request with retries, on the endpoint in use and then the others.
 * path: /v2/...; head == NULL: GET. On success *status is 2xx/3xx. */
static int http(mecs_client *c, const char *path, const char *head, size_t head_len,
                const void *data, size_t data_len, long *status) {
    CURL *h = c->curl;
    upload up = {head, head_len, data, data_len, 0};
    int post = head != NULL;
    const char *url = c->url_buf;
    if (post) {
        /* the header list changes only with the JSON header's length: kept between calls */
        if (!c->post_headers || c->post_header_len != head_len) {
            char line[80];
            struct curl_slist *headers;
            snprintf(line, sizeof line, "Inference-Header-Content-Length: %zu", head_len);
            headers = curl_slist_append(NULL, "Content-Type: application/octet-stream");
            if (headers) headers = curl_slist_append(headers, "Expect:");
            if (headers) headers = curl_slist_append(headers, line);
            if (headers && c->auth_header) headers = curl_slist_append(headers, c->auth_header);
            if (!headers) return fail(c, MECS_E_MEMORY, "out of memory");
            curl_slist_free_all(c->post_headers);
            c->post_headers = headers;
            c->post_header_len = head_len;
        }
        curl_easy_setopt(h, CURLOPT_POST, 1L);
        curl_easy_setopt(h, CURLOPT_HTTPHEADER, c->post_headers);
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)(head_len + data_len));
    } else {
        curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
        curl_easy_setopt(h, CURLOPT_HTTPHEADER, c->get_headers);
    }
    int code = MECS_E_UNAVAILABLE;
    double delay = c->backoff;
    /* every endpoint is tried at least once; a request that failed moves to the next */
    int attempts = c->retries + 1 > c->n_bases ? c->retries + 1 : c->n_bases;
    for (int attempt = 0; attempt < attempts; attempt++) {
        if (attempt) {
            if (c->n_bases > 1) {
                c->active = (c->active + 1) % c->n_bases;
                c->failovers++;
            }
            if (attempt % c->n_bases == 0) { /* back off once a whole round failed */
                sleep_s(delay);
                delay *= 2;
            }
        }
        snprintf(c->url_buf, sizeof c->url_buf, "%s%s", c->bases[c->active], path);
        curl_easy_setopt(h, CURLOPT_URL, url);
        if (post) {
            if (head_len + data_len <= SMALL_BODY) { /* one contiguous small body */
                if (!reserve(&c->request, head_len + data_len)) {
                    code = fail(c, MECS_E_MEMORY, "out of memory");
                    break;
                }
                memcpy(c->request.data, head, head_len);
                if (data_len) memcpy(c->request.data + head_len, data, data_len);
                curl_easy_setopt(h, CURLOPT_POSTFIELDS, c->request.data);
            } else {
                up.pos = 0;
                curl_easy_setopt(h, CURLOPT_POSTFIELDS, NULL);
                curl_easy_setopt(h, CURLOPT_READFUNCTION, on_upload);
                curl_easy_setopt(h, CURLOPT_READDATA, &up);
                curl_easy_setopt(h, CURLOPT_SEEKFUNCTION, on_seek);
                curl_easy_setopt(h, CURLOPT_SEEKDATA, &up);
            }
        }
        c->response.len = 0;
        c->header_length = -1;
        c->curl_err[0] = '\0';
        CURLcode rc = curl_easy_perform(h);
        curl_easy_setopt(h, CURLOPT_READDATA, NULL); /* `up` lives on this stack frame */
        curl_easy_setopt(h, CURLOPT_SEEKDATA, NULL);
        if (rc != CURLE_OK) {
            const char *what = c->curl_err[0] ? c->curl_err : curl_easy_strerror(rc);
            long os_errno = 0;
            curl_easy_getinfo(h, CURLINFO_OS_ERRNO, &os_errno);
            /* a handshake the peer cut short (reset, EOF: a restarting proxy) is an outage;
             * a certificate or protocol mismatch is configuration, never degraded */
            int cut_short = rc == CURLE_SSL_CONNECT_ERROR &&
                            (os_errno != 0 || strstr(what, "SYSCALL") || strstr(what, "eof") ||
                             strstr(what, "EOF"));
            if (!cut_short && (rc == CURLE_SSL_CONNECT_ERROR || rc == CURLE_PEER_FAILED_VERIFICATION ||
                               rc == CURLE_SSL_CACERT_BADFILE || rc == CURLE_SSL_CERTPROBLEM)) {
                code = fail(c, MECS_E_TLS,
                            "%s: TLS handshake failed: %s (check the URL's scheme and ca_file)", url, what);
                break;
            }
            if (rc == CURLE_UNSUPPORTED_PROTOCOL || rc == CURLE_WEIRD_SERVER_REPLY) {
                /* the URL was checked at connect: this is an answer that is not HTTP */
                code = fail(c, MECS_E_PROTOCOL, "%s: an answer that is not HTTP: %s", url, what);
                continue;
            }
            if (rc == CURLE_URL_MALFORMAT) {
                code = fail(c, MECS_E_ARGUMENT, "url '%s': %s", c->url, what);
                break;
            }
            code = fail(c, MECS_E_UNAVAILABLE, "%s: service %s: %s", url,
                        rc == CURLE_OPERATION_TIMEDOUT ? "timed out" : "unreachable", what);
            continue;
        }
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, status);
        if (*status < 400) {
            code = MECS_OK;
            break;
        }
        char msg[512];
        error_text(&c->response, msg, sizeof msg);
        if (*status == 502 || *status == 503 || *status == 504) {
            code = fail(c, MECS_E_UNAVAILABLE, "%s: %ld %s", url, *status, msg);
            continue;
        }
        if (*status >= 500) code = MECS_E_UNAVAILABLE;
        else if (*status == 401) code = MECS_E_UNAUTHORIZED;
        else if (*status == 403) code = MECS_E_FORBIDDEN;
        else if (*status == 404) code = MECS_E_NOT_FOUND;
        else code = MECS_E_REJECTED;
        fail(c, code, "%s: %ld %s%s", url, *status, msg,
             code == MECS_E_UNAUTHORIZED ? " (set the API key: the variable named by api_key_env, "
                                           "MECS_API_KEY by default, or api_key_file)"
             : code == MECS_E_FORBIDDEN  ? " (the API key lacks the scope this call needs)"
                                         : "");
        break;
    }
    return code;
}

/* -- connect: metadata and the caller's expectations ---------------------------- */

static char *read_key_file(mecs_client *c, const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fail(c, MECS_E_ARGUMENT, "api_key_file %s: cannot read it: %s", path, strerror(errno));
        return NULL;
    }
    char line[1024];
    char *got = fgets(line, sizeof line, f);
    fclose(f);
    if (got && !strchr(line, '\n') && strlen(line) == sizeof line - 1) {
        fail(c, MECS_E_ARGUMENT, "api_key_file %s: the key is longer than %zu bytes", path,
             sizeof line - 2);
        return NULL;
    }
    size_t n = got ? strcspn(line, "\r\n") : 0;
    line[n] = '\0';
    while (n && isspace((unsigned char)line[n - 1])) line[--n] = '\0';
    if (!n) {
        fail(c, MECS_E_ARGUMENT, "api_key_file %s: the first line is empty", path);
        return NULL;
    }
    return dup_str(line);
}

static int check_expectations(mecs_client *c, const mj_node *meta) {
    const char *model = c->model;
    const mj_node *params = mj_get(meta, "parameters");
    const mj_node *input = NULL;
    for (const mj_node *e = mj_get(meta, "inputs") ? mj_get(meta, "inputs")->child : NULL; e; e = e->next)
        if (mj_str(mj_get(e, "name")) && strcmp(mj_str(mj_get(e, "name")), "state") == 0) input = e;
    const mj_node *shape = mj_get(input, "shape");
    size_t rank = mj_size(shape);
    if (!input || rank < 2 || rank > MECS_MAX_RANK + 1)
        return fail(c, MECS_E_PROTOCOL, "model '%s': the metadata has no 'state' input with a shape", model);
    c->rank = (int)rank - 1;
    c->size = 1;
    char got[512];
    size_t off = 0;
    got[0] = '\0';
    for (int i = 0; i < c->rank; i++) {
        const mj_node *d = mj_at(shape, (size_t)i + 1);
        if (!whole(d, 1, 1e12) || (double)c->size * d->number > 1e12)
            return fail(c, MECS_E_PROTOCOL, "model '%s': the state shape in the metadata is not sizes", model);
        c->shape[i] = (int64_t)d->number;
        c->size *= c->shape[i];
        off += (size_t)snprintf(got + off, sizeof got - off, "%s%lld", i ? "," : "", (long long)c->shape[i]);
    }
    if (c->expect_rank) {
        int same = c->expect_rank == c->rank;
        for (int i = 0; same && i < c->rank; i++) same = c->expect_shape[i] == c->shape[i];
        if (!same) {
            char want[256];
            size_t w = 0;
            for (int i = 0; i < c->expect_rank; i++)
                w += (size_t)snprintf(want + w, sizeof want - w, "%s%lld", i ? "," : "",
                                      (long long)c->expect_shape[i]);
            return fail(c, MECS_E_MISMATCH,
                        "shape mismatch: model '%s' takes states of shape [%s] per member, "
                        "the caller's are [%s]", model, got, want);
        }
    }
    const mj_node *accepted = mj_get(params, "accepted_datatypes");
    if (!accepted) accepted = NULL;
    c->accepts_fp32 = c->accepts_fp64 = 0;
    for (const mj_node *e = accepted ? accepted->child : NULL; e; e = e->next) {
        if (mj_str(e) && strcmp(mj_str(e), "FP32") == 0) c->accepts_fp32 = 1;
        if (mj_str(e) && strcmp(mj_str(e), "FP64") == 0) c->accepts_fp64 = 1;
    }
    if (!accepted) { /* only the declared datatype */
        const char *dt = mj_str(mj_get(input, "datatype"));
        c->accepts_fp32 = dt && strcmp(dt, "FP32") == 0;
        c->accepts_fp64 = dt && strcmp(dt, "FP64") == 0;
    }
    if (c->expect_dtype && !(c->expect_dtype == MECS_FP32 ? c->accepts_fp32 : c->accepts_fp64))
        return fail(c, MECS_E_MISMATCH, "dtype mismatch: model '%s' does not accept %s states",
                    model, dtype_name(c->expect_dtype));
    if (c->expect_dims) {
        const mj_node *dims = mj_get(params, "dims");
        /* the metadata's dims start with "batch"; compare the rest */
        mj_node tail = {MJ_ARRAY, 0, NULL, NULL, dims && dims->child ? dims->child->next : NULL, NULL};
        if (!same_list(c->expect_dims, &tail, got, sizeof got))
            return fail(c, MECS_E_MISMATCH,
                        "layout mismatch: model '%s' has state dims [%s] after the batch, the caller "
                        "expects [%s]", model, got, c->expect_dims);
    }
    const mj_node *layout = mj_get(params, "layout");
    if (c->expect_fields && !same_list(c->expect_fields, mj_get(layout, "fields"), got, sizeof got))
        return fail(c, MECS_E_MISMATCH,
                    "layout mismatch: model '%s' has fields [%s], the caller expects [%s]", model, got,
                    c->expect_fields);
    if (c->expect_units) {
        const mj_node *units = mj_get(layout, "units");
        const char *p = c->expect_units;
        while (*p) {
            char item[256];
            size_t n = strcspn(p, ",");
            snprintf(item, sizeof item, "%.*s", (int)n, p);
            p += n + (p[n] == ',');
            char *eq = strchr(item, '=');
            if (!eq)
                return fail(c, MECS_E_ARGUMENT, "option expect_units: '%s' is not field=unit", item);
            *eq = '\0';
            const char *have = mj_str(mj_get(units, item));
            if (!have)
                return fail(c, MECS_E_MISMATCH, "units mismatch: model '%s' has no field '%s'", model, item);
            if (strcmp(have, eq + 1) != 0)
                return fail(c, MECS_E_MISMATCH,
                            "units mismatch: model '%s' has field '%s' in '%s', the caller's is in '%s'",
                            model, item, have, eq + 1);
        }
    }
    const char *tu = mj_str(mj_get(params, "time_unit"));
    if (c->dt_unit && tu) {
        const char *a = canonical_unit(c->dt_unit), *b = canonical_unit(tu);
        if (!b || (strcmp(a, b) != 0 && (strcmp(a, "model time unit") == 0 ||
                                         strcmp(b, "model time unit") == 0)))
            return fail(c, MECS_E_MISMATCH,
                        "units mismatch: model '%s' gives corrections per %s, which does not convert "
                        "to the caller's dt_unit '%s'", model, tu, c->dt_unit);
    }
    return MECS_OK;
}

static pthread_once_t global_once = PTHREAD_ONCE_INIT;
static void global_init(void) { curl_global_init(CURL_GLOBAL_DEFAULT); }

/* What a failed mecs_connect left behind, so that connecting again does not leak. */
static void drop_connection(mecs_client *c) {
    if (c->curl) curl_easy_cleanup(c->curl);
    c->curl = NULL;
    curl_slist_free_all(c->get_headers);
    curl_slist_free_all(c->post_headers);
    c->get_headers = c->post_headers = NULL;
    if (c->auth_header) memset(c->auth_header, 0, strlen(c->auth_header));
    free(c->auth_header);
    free(c->infer_url);
    free(c->metadata);
    c->auth_header = c->infer_url = c->metadata = NULL;
}

static int connect_in_c_locale(mecs_client *c);

int mecs_connect(mecs_client *c) {
    if (!c) return MECS_E_ARGUMENT;
    if (c->connected) return fail(c, MECS_E_STATE, "already connected");
    drop_connection(c);
    if (!c->c_locale) c->c_locale = newlocale(LC_ALL_MASK, "C", (locale_t)0);
    if (!c->c_locale) return fail(c, MECS_E_MEMORY, "cannot create the C locale");
    int rc = resolve_group(c);
    if (rc != MECS_OK) return rc;
    locale_t previous = uselocale(c->c_locale);
    rc = connect_in_c_locale(c);
    uselocale(previous);
    return rc;
}

/* Split the url option at commas into the endpoints, each checked and stripped of '/'. */
static int split_endpoints(mecs_client *c) {
    int keep = c->active; /* a reconnect stays on the endpoint that answered last */
    for (int i = 0; i < c->n_bases; i++) free(c->bases[i]);
    c->n_bases = c->active = 0;
    const char *p = c->url;
    while (*p) {
        size_t n = strcspn(p, ",");
        const char *q = p;
        while (n && *q == ' ') q++, n--;
        while (n && q[n - 1] == ' ') n--;
        while (n && q[n - 1] == '/') n--;
        if (n) {
            if (c->n_bases == MECS_MAX_ENDPOINTS)
                return fail(c, MECS_E_ARGUMENT, "url: more than %d endpoints", MECS_MAX_ENDPOINTS);
            if (n > 1024) return fail(c, MECS_E_ARGUMENT, "url: an endpoint longer than 1024 bytes");
            char *b = malloc(n + 1);
            if (!b) return fail(c, MECS_E_MEMORY, "out of memory");
            memcpy(b, q, n);
            b[n] = '\0';
            c->bases[c->n_bases++] = b;
            size_t scheme = strncmp(b, "http://", 7) == 0 ? 7 : strncmp(b, "https://", 8) == 0 ? 8 : 0;
            if (!scheme || !b[scheme] || b[scheme] == '/' || b[scheme] == ':')
                return fail(c, MECS_E_ARGUMENT, "url must be http(s)://host[:port], got '%s'", b);
        }
        p += strcspn(p, ",");
        if (*p == ',') p++;
    }
    if (!c->n_bases) return fail(c, MECS_E_ARGUMENT, "options url and model are needed");
    if (keep < c->n_bases) c->active = keep;
    return MECS_OK;
}

static int connect_in_c_locale(mecs_client *c) {
    if (!c->url || !c->model || !*c->model)
        return fail(c, MECS_E_ARGUMENT, "options url and model are needed");
    int split = split_endpoints(c);
    if (split != MECS_OK) return split;
    char *key = NULL;
    if (c->api_key_file) {
        if (!(key = read_key_file(c, c->api_key_file))) return MECS_E_ARGUMENT;
    } else if (c->api_key_env && getenv(c->api_key_env) && *getenv(c->api_key_env)) {
        key = dup_str(getenv(c->api_key_env));
    }
    if (key) {
        size_t n = strlen(key) + 32;
        c->auth_header = malloc(n);
        if (c->auth_header) snprintf(c->auth_header, n, "Authorization: Bearer %s", key);
        memset(key, 0, strlen(key));
        free(key);
        if (!c->auth_header) return fail(c, MECS_E_MEMORY, "out of memory");
        c->get_headers = curl_slist_append(NULL, c->auth_header);
    }
    pthread_once(&global_once, global_init); /* once per process, whichever thread is first */
    CURL *h = c->curl = curl_easy_init();
    if (!h) return fail(c, MECS_E_MEMORY, "cannot create a libcurl handle");
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)(c->timeout * 1000));
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, (long)(c->connect_timeout * 1000));
    curl_easy_setopt(h, CURLOPT_USERAGENT, "mecs-client-c/" MECS_CLIENT_VERSION);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &c->response);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, c);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, c->curl_err);
    if (c->ca_file) curl_easy_setopt(h, CURLOPT_CAINFO, c->ca_file);
    char *name = curl_easy_escape(h, c->model, 0);
    if (!name) return fail(c, MECS_E_MEMORY, "out of memory");
    size_t n = strlen(name) + 64;
    char *meta_url = malloc(n);
    c->infer_url = malloc(n);
    if (!meta_url || !c->infer_url) {
        free(meta_url);
        curl_free(name);
        return fail(c, MECS_E_MEMORY, "out of memory");
    }
    if (c->version_opt > 0)
        snprintf(meta_url, n, "/v2/models/%s/versions/%ld", name, c->version_opt);
    else
        snprintf(meta_url, n, "/v2/models/%s", name);
    long status = 0;
    int rc = http(c, meta_url, NULL, 0, NULL, 0, &status);
    free(meta_url);
    if (rc == MECS_E_NOT_FOUND) {
        if (c->version_opt > 0)
            fail(c, rc, "model '%s' has no version %ld at %s", c->model, c->version_opt, c->url);
        else
            fail(c, rc, "model '%s' is not served at %s", c->model, c->url);
    }
    if (rc != MECS_OK) {
        curl_free(name);
        return rc;
    }
    char jerr[128];
    mj_node *meta = c->response.len ? mj_parse(c->response.data, c->response.len, jerr, sizeof jerr)
                                    : (snprintf(jerr, sizeof jerr, "an empty body"), NULL);
    if (!meta || meta->type != MJ_OBJECT) {
        mj_free(meta);
        curl_free(name);
        return fail(c, MECS_E_PROTOCOL, "model '%s': the metadata answer is not a JSON object (%s)",
                    c->model, meta ? "not an object" : jerr);
    }
    rc = check_expectations(c, meta);
    long version = -1;
    const char *vs = mj_str(mj_get(meta, "version"));
    if (rc == MECS_OK && (!vs || !parse_long(vs, 1, &version)))
        rc = fail(c, MECS_E_PROTOCOL, "model '%s': the metadata names no version", c->model);
    mj_free(meta);
    if (rc == MECS_OK) {
        c->metadata = malloc(c->response.len + 1);
        if (c->metadata) memcpy(c->metadata, c->response.data, c->response.len + 1);
        if (c->follow_latest) {
            snprintf(c->infer_url, n, "/v2/models/%s/infer", name);
        } else {
            c->pinned = version;
            snprintf(c->infer_url, n, "/v2/models/%s/versions/%ld/infer", name, version);
        }
        c->connected = 1;
    }
    curl_free(name);
    return rc;
}

int mecs_open(mecs_client **out, const char *url, const char *model, const char *options) {
    if (!out) return MECS_E_ARGUMENT;
    mecs_client *c = *out = mecs_new();
    if (!c) return MECS_E_MEMORY;
    int rc = mecs_set(c, "url", url ? url : "");
    if (rc == MECS_OK) rc = mecs_set(c, "model", model ? model : "");
    const char *p = options ? options : "";
    while (rc == MECS_OK && *p) {
        size_t n = strcspn(p, ";");
        char item[1024];
        if (n >= sizeof item) return fail(c, MECS_E_ARGUMENT, "an option longer than %zu bytes", sizeof item);
        memcpy(item, p, n);
        item[n] = '\0';
        p += n + (p[n] == ';');
        char *s = item;
        while (*s == ' ') s++;
        if (!*s) continue;
        char *eq = strchr(s, '=');
        if (!eq) return fail(c, MECS_E_ARGUMENT, "option '%s' is not name=value", s);
        *eq = '\0';
        rc = mecs_set(c, s, eq + 1);
    }
    return rc == MECS_OK ? mecs_connect(c) : rc;
}

/* -- infer and the degradation policy ------------------------------------------- */

static int decode(mecs_client *c, int dtype, int64_t batch, void *correction) {
    long hlen = c->header_length;
    if (hlen <= 0 || (size_t)hlen > c->response.len)
        return fail(c, MECS_E_PROTOCOL,
                    "POST %s: a 200 answer without a binary infer response (is a proxy answering "
                    "for the service?)", c->infer_url);
    char jerr[128];
    mj_node *root = mj_parse(c->response.data, (size_t)hlen, jerr, sizeof jerr);
    int rc = MECS_OK;
    size_t offset = (size_t)hlen, want = (size_t)batch * (size_t)c->size * dtype_size(dtype);
    const mj_node *found = NULL;
    for (const mj_node *o = mj_get(root, "outputs") ? mj_get(root, "outputs")->child : NULL; o; o = o->next) {
        const mj_node *size = mj_get(mj_get(o, "parameters"), "binary_data_size");
        const char *oname = mj_str(mj_get(o, "name"));
        if (oname && strcmp(oname, "correction") == 0) {
            found = o;
            break;
        }
        if (whole(size, 0, 1e15)) offset += (size_t)size->number;
    }
    const mj_node *size = mj_get(mj_get(found, "parameters"), "binary_data_size");
    const char *dt = mj_str(mj_get(found, "datatype"));
    const char *vs = mj_str(mj_get(root, "model_version"));
    long version = -1;
    if (!root) {
        rc = fail(c, MECS_E_PROTOCOL, "POST %s: the answer's JSON header is not JSON: %s", c->infer_url, jerr);
    } else if (!found || !whole(size, 0, 1e15) || !dt) {
        rc = fail(c, MECS_E_PROTOCOL, "POST %s: the answer has no binary 'correction' output", c->infer_url);
    } else if (strcmp(dt, dtype_name(dtype)) != 0 || (size_t)size->number != want ||
               offset + want > c->response.len) {
        rc = fail(c, MECS_E_PROTOCOL,
                  "POST %s: the correction is %s of %.0f bytes, the state %s of %zu bytes",
                  c->infer_url, dt, size->number, dtype_name(dtype), want);
    } else if (!vs || !parse_long(vs, 0, &version)) {
        rc = fail(c, MECS_E_PROTOCOL, "POST %s: the answer names no model version", c->infer_url);
    } else {
        memcpy(correction, c->response.data + offset, want);
        c->last_version = version;
    }
    mj_free(root);
    return rc;
}

static int infer(mecs_client *c, const void *state, int dtype, int64_t batch, double dt,
                 void *correction) {
    char head[1024];
    size_t off = 0, cap = sizeof head;
    size_t bytes = (size_t)batch * (size_t)c->size * dtype_size(dtype);
    int ok = append(head, cap, &off,
                    "{\"inputs\":[{\"name\":\"state\",\"datatype\":\"%s\",\"shape\":[%lld",
                    dtype_name(dtype), (long long)batch);
    for (int i = 0; i < c->rank; i++) ok = ok && append(head, cap, &off, ",%lld", (long long)c->shape[i]);
    ok = ok && append(head, cap, &off,
                      "],\"parameters\":{\"binary_data_size\":%zu}}],"
                      "\"outputs\":[{\"name\":\"correction\",\"parameters\":{\"binary_data\":true}}]",
                      bytes);
    long long reported = c->unreported < MAX_REPORTED ? c->unreported : MAX_REPORTED;
    if (dt > 0 || c->dt_unit || reported || c->group) {
        const char *sep = "";
        ok = ok && append(head, cap, &off, ",\"parameters\":{");
        if (dt > 0) { /* %.17g in the C locale (set by mecs_correct): a JSON number */
            ok = ok && append(head, cap, &off, "\"dt\":%.17g", dt);
            sep = ",";
        }
        if (c->dt_unit) { /* a canonical unit name: plain words */
            ok = ok && append(head, cap, &off, "%s\"dt_unit\":\"%s\"", sep, c->dt_unit);
            sep = ",";
        }
        if (reported) {
            ok = ok && append(head, cap, &off, "%s\"degraded_steps\":%lld", sep, reported);
            sep = ",";
        }
        if (c->group) /* checked plain characters: no escaping needed */
            ok = ok && append(head, cap, &off, "%s\"group\":\"%s\",\"group_size\":%ld", sep, c->group,
                              c->group_size);
        ok = ok && append(head, cap, &off, "}");
    }
    ok = ok && append(head, cap, &off, "}");
    if (!ok) return fail(c, MECS_E_ARGUMENT, "the request header does not fit in %zu bytes", cap);
    long status = 0;
    c->calls++;
    int rc = http(c, c->infer_url, head, off, state, bytes, &status);
    if (rc == MECS_OK) rc = decode(c, dtype, batch, correction);
    if (rc == MECS_OK) c->unreported -= reported;
    return rc;
}

static void convert(const void *src, int from, void *dst, int to, size_t n) {
    if (from == to) {
        memcpy(dst, src, n * dtype_size(to));
    } else if (to == MECS_FP64) {
        for (size_t i = 0; i < n; i++) ((double *)dst)[i] = ((const float *)src)[i];
    } else {
        for (size_t i = 0; i < n; i++) ((float *)dst)[i] = (float)((const double *)src)[i];
    }
}

static int degraded(mecs_client *c, int code, int dtype, int64_t batch, void *correction) {
    if (c->policy == MECS_POLICY_RAISE) return code;
    c->degraded++;
    c->unreported++;
    size_t n = (size_t)batch * (size_t)c->size;
    if (c->policy == MECS_POLICY_LAST && c->last && c->last_batch == batch)
        convert(c->last, c->last_dtype, correction, dtype, n);
    else
        memset(correction, 0, n * dtype_size(dtype));
    return MECS_DEGRADED;
}

static int correct_in_c_locale(mecs_client *c, const void *state, int dtype, int64_t batch,
                               double dt, void *correction);

int mecs_correct(mecs_client *c, const void *state, int dtype, int64_t batch, double dt,
                 void *correction) {
    if (!c) return MECS_E_ARGUMENT;
    if (!c->connected || !c->c_locale) return correct_in_c_locale(c, state, dtype, batch, dt, correction);
    locale_t previous = uselocale(c->c_locale);
    int rc = correct_in_c_locale(c, state, dtype, batch, dt, correction);
    uselocale(previous);
    return rc;
}

static int correct_in_c_locale(mecs_client *c, const void *state, int dtype, int64_t batch,
                               double dt, void *correction) {
    if (!c->connected) return fail(c, MECS_E_STATE, "mecs_correct before a successful mecs_connect");
    if (!state || !correction || batch < 1)
        return fail(c, MECS_E_ARGUMENT, "mecs_correct: a state, a correction buffer and batch >= 1 are needed");
    if (dtype != MECS_FP32 && dtype != MECS_FP64)
        return fail(c, MECS_E_ARGUMENT, "mecs_correct: dtype %d is not MECS_FP32 or MECS_FP64", dtype);
    if (!(dtype == MECS_FP32 ? c->accepts_fp32 : c->accepts_fp64))
        return fail(c, MECS_E_MISMATCH, "model '%s' does not accept %s states", c->model, dtype_name(dtype));
    if (!isfinite(dt)) return fail(c, MECS_E_ARGUMENT, "mecs_correct: dt is not finite");
    if (now_s() < c->open_until) {
        fail(c, MECS_E_UNAVAILABLE, "circuit open after %lld consecutive failures; not calling",
             c->consecutive);
        return degraded(c, MECS_E_UNAVAILABLE, dtype, batch, correction);
    }
    int rc = infer(c, state, dtype, batch, dt, correction);
    if (rc == MECS_OK) {
        c->consecutive = 0;
        c->open_until = 0;
        c->answered = 1;
        if (c->policy == MECS_POLICY_LAST) {
            size_t bytes = (size_t)batch * (size_t)c->size * dtype_size(dtype);
            if (bytes > c->last_cap) {
                void *p = realloc(c->last, bytes);
                if (!p) return MECS_OK; /* "last" then degrades to zero; the step is fine */
                c->last = p;
                c->last_cap = bytes;
            }
            memcpy(c->last, correction, bytes);
            c->last_batch = batch;
            c->last_dtype = dtype;
        }
        return MECS_OK;
    }
    /* a 4xx is the caller's fault and never degrades, except a 404 for a model that
     * answered before (it was unloaded: an outage like any other) */
    int outage = rc == MECS_E_UNAVAILABLE || rc == MECS_E_PROTOCOL ||
                 (rc == MECS_E_NOT_FOUND && c->answered);
    if (!outage) return rc;
    c->failures++;
    if (++c->consecutive >= c->failure_threshold) c->open_until = now_s() + c->cooldown;
    return degraded(c, rc, dtype, batch, correction);
}

static int answers(mecs_client *c, const char *path) {
    if (!c || !c->curl) return 0;
    long status = 0;
    return http(c, path, NULL, 0, NULL, 0, &status) == MECS_OK;
}

int mecs_live(mecs_client *c) { return answers(c, "/v2/health/live"); }
int mecs_ready(mecs_client *c) { return answers(c, "/v2/health/ready"); }

int mecs_set_policy(mecs_client *c, int policy) {
    if (!c) return MECS_E_ARGUMENT;
    if (policy != MECS_POLICY_RAISE && policy != MECS_POLICY_ZERO && policy != MECS_POLICY_LAST)
        return fail(c, MECS_E_ARGUMENT, "policy %d is not MECS_POLICY_RAISE, _ZERO or _LAST", policy);
    c->policy = policy;
    return MECS_OK;
}

long mecs_model_version(const mecs_client *c) { return !c ? -1 : c->pinned > 0 ? c->pinned : c->last_version; }
long mecs_last_version(const mecs_client *c) { return c ? c->last_version : -1; }
long long mecs_degraded_steps(const mecs_client *c) { return c ? c->degraded : 0; }
long long mecs_failures(const mecs_client *c) { return c ? c->failures : 0; }
long long mecs_calls(const mecs_client *c) { return c ? c->calls : 0; }
long long mecs_failovers(const mecs_client *c) { return c ? c->failovers : 0; }
const char *mecs_endpoint(const mecs_client *c) {
    return c && c->n_bases ? c->bases[c->active] : "";
}
int mecs_circuit_open(const mecs_client *c) { return c && now_s() < c->open_until; }
int64_t mecs_state_size(const mecs_client *c) { return c && c->connected ? c->size : 0; }
int mecs_state_rank(const mecs_client *c) { return c && c->connected ? c->rank : 0; }
int64_t mecs_state_dim(const mecs_client *c, int i) {
    return c && c->connected && i >= 0 && i < c->rank ? c->shape[i] : 0;
}
const char *mecs_metadata_json(const mecs_client *c) { return c && c->metadata ? c->metadata : ""; }
const char *mecs_error_message(const mecs_client *c) {
    return !c ? "no client (out of memory?)" : c->err[0] ? c->err : "no error";
}

const char *mecs_status_name(int status) {
    switch (status) {
    case MECS_OK: return "MECS_OK";
    case MECS_DEGRADED: return "MECS_DEGRADED";
    case MECS_E_ARGUMENT: return "MECS_E_ARGUMENT";
    case MECS_E_UNAVAILABLE: return "MECS_E_UNAVAILABLE";
    case MECS_E_REJECTED: return "MECS_E_REJECTED";
    case MECS_E_UNAUTHORIZED: return "MECS_E_UNAUTHORIZED";
    case MECS_E_FORBIDDEN: return "MECS_E_FORBIDDEN";
    case MECS_E_NOT_FOUND: return "MECS_E_NOT_FOUND";
    case MECS_E_MISMATCH: return "MECS_E_MISMATCH";
    case MECS_E_PROTOCOL: return "MECS_E_PROTOCOL";
    case MECS_E_TLS: return "MECS_E_TLS";
    case MECS_E_MEMORY: return "MECS_E_MEMORY";
    case MECS_E_STATE: return "MECS_E_STATE";
    default: return "MECS_E_UNKNOWN";
    }
}

void mecs_close(mecs_client *c) {
    if (!c) return;
    drop_connection(c);
    if (c->c_locale) freelocale(c->c_locale);
    char *strings[] = {c->url,         c->model,         c->api_key_env, c->api_key_file,
                       c->ca_file,     c->dt_unit,       c->expect_dims, c->expect_fields,
                       c->expect_units, c->group};
    for (size_t i = 0; i < sizeof strings / sizeof strings[0]; i++) free(strings[i]);
    for (int i = 0; i < c->n_bases; i++) free(c->bases[i]);
    free(c->last);
    free(c->request.data);
    free(c->response.data);
    free(c);
}
