/* mecs-probe: open a model with the C client, check it, and time corrections.
 *
 *   mecs-probe URL MODEL [OPTIONS] [--calls N] [--batch B] [--dtype FP32|FP64]
 *
 * OPTIONS is the "name=value;..." string of mecs_open. It prints one JSON line:
 * the version, the state shape, and p50/p99 of N corrections in microseconds (wall
 * time of mecs_correct: the whole client, JSON and HTTP included). Exit status 0,
 * 2 when the open fails (the message on stderr names the status and the cause),
 * 1 when a correction fails. The tests use it for the open-time checks, the bench
 * (bench/clients.py) for the C client's latency. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mecs_client.h"

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e6 * (double)ts.tv_sec + 1e-3 * (double)ts.tv_nsec;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double percentile(double *sorted, long n, double q) {
    double pos = q / 100.0 * (double)(n - 1);
    long i = (long)pos;
    double f = pos - (double)i;
    return i + 1 < n ? sorted[i] * (1 - f) + sorted[i + 1] * f : sorted[n - 1];
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s URL MODEL [OPTIONS] [--calls N] [--batch B] [--dtype FP32|FP64]\n", argv[0]);
        return 64;
    }
    const char *options = "";
    long calls = 0, batch = 1;
    int dtype = MECS_FP32;
    for (int i = 3; i < argc; i++) {
        if (strcmp(argv[i], "--calls") == 0 && i + 1 < argc) calls = atol(argv[++i]);
        else if (strcmp(argv[i], "--batch") == 0 && i + 1 < argc) batch = atol(argv[++i]);
        else if (strcmp(argv[i], "--dtype") == 0 && i + 1 < argc)
            dtype = strcmp(argv[++i], "FP64") == 0 ? MECS_FP64 : MECS_FP32;
        else options = argv[i];
    }
    mecs_client *c = NULL;
    int rc = mecs_open(&c, argv[1], argv[2], options);
    if (rc != MECS_OK) {
        fprintf(stderr, "mecs-probe: open failed: %s: %s\n", mecs_status_name(rc), mecs_error_message(c));
        mecs_close(c);
        return 2;
    }
    int64_t n = mecs_state_size(c) * batch;
    size_t elem = dtype == MECS_FP64 ? 8 : 4;
    char *state = malloc((size_t)n * elem), *corr = malloc((size_t)n * elem);
    double *times = malloc(sizeof(double) * (size_t)(calls > 0 ? calls : 1));
    if (!state || !corr || !times) return 1;
    for (int64_t i = 0; i < n; i++) { /* an in-range l96-like state */
        double v = 2.5 + 3.0 * sin(0.7 * (double)i);
        if (dtype == MECS_FP64) ((double *)state)[i] = v;
        else ((float *)state)[i] = (float)v;
    }
    long warm = calls / 10 + 2;
    for (long i = -warm; i < calls; i++) {
        double t0 = now_us();
        rc = mecs_correct(c, state, dtype, batch, 0.0, corr);
        double t1 = now_us();
        if (rc < 0) {
            fprintf(stderr, "mecs-probe: correction failed: %s: %s\n", mecs_status_name(rc), mecs_error_message(c));
            return 1;
        }
        if (i >= 0) times[i] = t1 - t0;
    }
    double sum = 0;
    for (int64_t i = 0; i < n; i++) sum += dtype == MECS_FP64 ? ((double *)corr)[i] : ((float *)corr)[i];
    printf("{\"version\": %ld, \"state_size\": %lld, \"rank\": %d", mecs_model_version(c),
           (long long)mecs_state_size(c), mecs_state_rank(c));
    if (calls > 0) {
        qsort(times, (size_t)calls, sizeof(double), by_value);
        printf(", \"calls\": %ld, \"p50_us\": %.1f, \"p99_us\": %.1f, \"correction_sum\": %.9g",
               calls, percentile(times, calls, 50), percentile(times, calls, 99), sum);
    }
    printf(", \"failovers\": %lld, \"endpoint\": \"%s\"", mecs_failovers(c), mecs_endpoint(c));
    printf(", \"degraded_steps\": %lld}\n", mecs_degraded_steps(c));
    free(state);
    free(corr);
    free(times);
    mecs_close(c);
    return 0;
}
