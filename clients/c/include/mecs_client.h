/* mecs_client: the C client of the mecs correction service.
 *
 * What a forecast model links to call the service at every timestep, over the Open
 * Inference Protocol (KServe v2) with the binary tensor extension, on one keep-alive
 * HTTP/1.1 connection per handle (libcurl). It behaves as the Python client
 * (service.client.CorrectionClient) does:
 *
 *   - mecs_connect reads the model's metadata and checks it against what the caller
 *     expects (state shape, dtype, dims, fields, units, time unit), so a mismatch
 *     fails at start-up, not at step 10,000; it pins the version it found, so a run
 *     started on version 3 stays on 3 across a hot reload ("follow_latest=1" not to);
 *   - mecs_correct sends a batch of states (float32 or float64) and writes the
 *     correction (a tendency, state units per unit time) into the caller's buffer;
 *   - timeouts per attempt, retries with backoff (every call is idempotent), and the
 *     degradation policies "raise", "zero" and "last" with a circuit breaker;
 *     degraded steps are counted and reported to the server with the next call;
 *   - the API key comes from the environment (MECS_API_KEY, or the variable named by
 *     "api_key_env") or from a file ("api_key_file"), never from the program.
 *
 * Every call returns a status: MECS_OK (0), MECS_DEGRADED (1, a warning: the output
 * was filled by the policy) or a negative MECS_E_* error; mecs_error_message gives
 * the text that says what was wrong. A handle is not thread-safe: one per thread.
 *
 * Layout: a state is C order [batch][...state_shape...] as the model metadata's
 * "dims" list them (e.g. [batch][k], or [batch][channel][lat][lon]). */
#ifndef MECS_CLIENT_H
#define MECS_CLIENT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MECS_CLIENT_VERSION "0.1.0"
#define MECS_MAX_RANK 8
#define MECS_MAX_ENDPOINTS 16 /* endpoints in one url option */

enum mecs_status {
    MECS_OK = 0,
    MECS_DEGRADED = 1,        /* the step was filled by the policy ("zero" or "last") */
    MECS_E_ARGUMENT = -1,     /* a bad argument or option value */
    MECS_E_UNAVAILABLE = -2,  /* unreachable, timed out, 5xx, or the circuit is open */
    MECS_E_REJECTED = -3,     /* a 4xx the caller caused (bad shape, values, ...) */
    MECS_E_UNAUTHORIZED = -4, /* 401: no API key, or a wrong one */
    MECS_E_FORBIDDEN = -5,    /* 403: the key lacks the scope */
    MECS_E_NOT_FOUND = -6,    /* 404: no such model or version */
    MECS_E_MISMATCH = -7,     /* the model's metadata is not what the caller expects */
    MECS_E_PROTOCOL = -8,     /* an answer that is not the protocol (a proxy's page?) */
    MECS_E_TLS = -9,          /* the TLS handshake failed: a configuration fault */
    MECS_E_MEMORY = -10,
    MECS_E_STATE = -11        /* a call out of order (correct before connect) */
};

enum mecs_dtype { MECS_FP32 = 1, MECS_FP64 = 2 };
enum mecs_policy { MECS_POLICY_RAISE = 0, MECS_POLICY_ZERO = 1, MECS_POLICY_LAST = 2 };

typedef struct mecs_client mecs_client;

/* A handle with the defaults; NULL only when out of memory. */
mecs_client *mecs_new(void);

/* Set one option by name (before mecs_connect, except "policy"):
 *   url               http(s)://host:port[/prefix]                     (required)
 *                     or several, comma-separated: replicas of one service; the
 *                     client keeps to the one that answers and moves to the next
 *                     on an outage (every endpoint tried once per call)
 *   model             the model's name                                 (required)
 *   version           pin this version (default: the one served at connect)
 *   follow_latest     1: do not pin; every call goes to the served default
 *   policy            raise | zero | last                              (raise)
 *   timeout           seconds per attempt                              (5)
 *   connect_timeout   seconds                                          (1)
 *   retries           extra attempts on an outage                      (2)
 *   backoff           seconds before the first retry, doubled after    (0.02)
 *   failure_threshold consecutive failures that open the circuit       (3)
 *   cooldown          seconds the open circuit stays open              (2)
 *   api_key_env       the variable holding the API key                 (MECS_API_KEY)
 *   api_key_file      a file whose first line is the API key
 *   ca_file           a PEM bundle to trust for https
 *   dt_unit           the caller's time unit (s, min, h, day, model time unit)
 *   group             timestep group: the run's name, shared by the callers that
 *                     send each step together (MPI ranks, ensemble members); the
 *                     server batches them the moment all have arrived
 *                     (default: MECS_GROUP; none: no group)
 *   group_size        callers in the group (default: MECS_GROUP_SIZE, else the MPI
 *                     job's size from OMPI_COMM_WORLD_SIZE, PMI_SIZE or SLURM_NTASKS)
 *   expect_shape      one member's state shape, "36" or "13,16,32"
 *   expect_dtype      FP32 | FP64 (what the caller will send)
 *   expect_dims       the state's dims after the batch, "k" or "channel,lat,lon"
 *   expect_fields     the model's fields in order, "X" or "t,u,v,q,ps"
 *   expect_units      field units, "X=1" or "t=K,ps=Pa"
 * Unknown names and bad values are MECS_E_ARGUMENT, with the name in the message. */
int mecs_set(mecs_client *c, const char *name, const char *value);

/* Read the metadata, check the expectations, pin the version. */
int mecs_connect(mecs_client *c);

/* mecs_new, then mecs_set for each "name=value" of `options` (separated by ';'),
 * then mecs_connect. *out is set unless out of memory, also on failure, so that the
 * message can be read: close it in every case. */
int mecs_open(mecs_client **out, const char *url, const char *model, const char *options);

/* The correction for `batch` states (dtype MECS_FP32 or MECS_FP64, C order
 * [batch][state...]) into `correction` (same size and dtype; it may not alias
 * `state`). dt > 0 is sent as the step length in dt_unit (the server converts the
 * correction to per dt_unit); dt <= 0 sends none. Under "zero" or "last" an outage
 * gives MECS_DEGRADED with the policy's answer written; a 4xx is always an error. */
int mecs_correct(mecs_client *c, const void *state, int dtype, int64_t batch, double dt,
                 void *correction);

/* 1 if the server answers /v2/health/live (ready), 0 if not. */
int mecs_live(mecs_client *c);
int mecs_ready(mecs_client *c);

/* Change the policy of a connected handle (MECS_POLICY_*). */
int mecs_set_policy(mecs_client *c, int policy);

/* What the handle knows. */
long mecs_model_version(const mecs_client *c);  /* pinned, else the last answer's; -1 */
long mecs_last_version(const mecs_client *c);   /* the version that gave the last answer */
long long mecs_degraded_steps(const mecs_client *c);
long long mecs_failures(const mecs_client *c);  /* failed calls, in all */
long long mecs_calls(const mecs_client *c);     /* infer requests sent */
long long mecs_failovers(const mecs_client *c); /* moves to another endpoint, in all */
const char *mecs_endpoint(const mecs_client *c); /* the endpoint in use (owned by c, valid
                                                   until the next mecs_connect or mecs_close) */
int mecs_circuit_open(const mecs_client *c);    /* 1 while the breaker is open */
int64_t mecs_state_size(const mecs_client *c);  /* values in one member's state */
int mecs_state_rank(const mecs_client *c);
int64_t mecs_state_dim(const mecs_client *c, int i); /* dim i of one member's state */
const char *mecs_metadata_json(const mecs_client *c); /* the raw metadata, or "" */

/* The last error's text (never NULL), and a status code's name ("MECS_E_NOT_FOUND"). */
const char *mecs_error_message(const mecs_client *c);
const char *mecs_status_name(int status);

void mecs_close(mecs_client *c);

#ifdef __cplusplus
}
#endif
#endif
