/* The client's checks that need no server: the JSON reader and option validation. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mecs_client.h"
#include "mecs_json.h"

static int failures = 0;
#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            failures++;                                                      \
        }                                                                    \
    } while (0)

static mj_node *parse(const char *s, char *err) { return mj_parse(s, strlen(s), err, 128); }

static void test_json(void) {
    char err[128];
    mj_node *root = parse(" {\"a\": [1, -2.5e1, true, null], \"s\": \"x\\u00e9\\ud83d\\ude00\\n\", \"o\": {}} ", err);
    CHECK(root && root->type == MJ_OBJECT);
    CHECK(mj_size(mj_get(root, "a")) == 4);
    CHECK(mj_at(mj_get(root, "a"), 1)->number == -25.0);
    CHECK(mj_at(mj_get(root, "a"), 2)->type == MJ_BOOL);
    CHECK(strcmp(mj_str(mj_get(root, "s")), "x\xc3\xa9\xf0\x9f\x98\x80\n") == 0);
    CHECK(mj_get(root, "o") && mj_size(mj_get(root, "o")) == 0);
    CHECK(mj_get(root, "missing") == NULL && mj_at(mj_get(root, "a"), 9) == NULL);
    mj_free(root);
    const char *bad[] = {"", "{", "[1,]", "{\"a\" 1}", "[1] x", "\"abc", "tru", "[\"\x01\"]", "{1: 2}"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = '\0';
        root = parse(bad[i], err);
        CHECK(root == NULL && err[0] != '\0');
    }
    char deep[400];
    memset(deep, '[', sizeof deep - 1);
    deep[sizeof deep - 1] = '\0';
    CHECK(parse(deep, err) == NULL && strstr(err, "nested too deeply"));
}

static void test_options(void) {
    mecs_client *c = mecs_new();
    CHECK(mecs_set(c, "policy", "last") == MECS_OK);
    CHECK(mecs_set(c, "policy", "sometimes") == MECS_E_ARGUMENT && strstr(mecs_error_message(c), "policy"));
    CHECK(mecs_set(c, "timeout", "-1") == MECS_E_ARGUMENT && strstr(mecs_error_message(c), "timeout"));
    CHECK(mecs_set(c, "expect_shape", "3,16,32") == MECS_OK);
    CHECK(mecs_set(c, "expect_shape", "3,x") == MECS_E_ARGUMENT);
    CHECK(mecs_set(c, "expect_dtype", "INT8") == MECS_E_ARGUMENT);
    CHECK(mecs_set(c, "dt_unit", "fortnight") == MECS_E_ARGUMENT && strstr(mecs_error_message(c), "fortnight"));
    CHECK(mecs_set(c, "dt_unit", "Hours") == MECS_OK);
    /* a unit that would write JSON of its own into the request is refused */
    CHECK(mecs_set(c, "dt_unit", "mtu                                                              \",\"x\":\"y") ==
          MECS_E_ARGUMENT);
    CHECK(mecs_set(c, "version", "0") == MECS_E_ARGUMENT);
    CHECK(mecs_set(c, "colour", "blue") == MECS_E_ARGUMENT && strstr(mecs_error_message(c), "colour"));
    CHECK(mecs_correct(c, "", MECS_FP32, 1, 0, (void *)"") == MECS_E_STATE);
    CHECK(mecs_connect(c) == MECS_E_ARGUMENT && strstr(mecs_error_message(c), "url"));
    CHECK(mecs_set(c, "url", "ftp://x") == MECS_OK && mecs_set(c, "model", "m") == MECS_OK);
    CHECK(mecs_connect(c) == MECS_E_ARGUMENT && strstr(mecs_error_message(c), "http"));
    mecs_close(c);
    c = NULL;
    CHECK(mecs_open(&c, "http://127.0.0.1:9", "m", "retries=0;connect_timeout=0.2") == MECS_E_UNAVAILABLE);
    CHECK(strstr(mecs_error_message(c), "unreachable") != NULL);
    mecs_close(c);
    c = NULL;
    CHECK(mecs_open(&c, "http://127.0.0.1:9", "m", "retries") == MECS_E_ARGUMENT);
    mecs_close(c);
    c = mecs_new(); /* connecting again after a failure (a service still starting) */
    mecs_set(c, "url", "http://127.0.0.1:9");
    mecs_set(c, "model", "m");
    mecs_set(c, "retries", "0");
    setenv("MECS_API_KEY", "k", 1);
    CHECK(mecs_connect(c) == MECS_E_UNAVAILABLE && mecs_connect(c) == MECS_E_UNAVAILABLE);
    mecs_close(c);
    CHECK(strcmp(mecs_status_name(MECS_E_NOT_FOUND), "MECS_E_NOT_FOUND") == 0);
}

int main(void) {
    test_json();
    test_options();
    if (failures) fprintf(stderr, "%d checks failed\n", failures);
    else printf("all offline checks passed\n");
    return failures != 0;
}
