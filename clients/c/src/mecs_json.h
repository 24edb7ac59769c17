/* A small JSON reader for the client's own needs: model metadata and infer answers.
 *
 * Not a general JSON library: it builds a tree of nodes in one malloc'd block per
 * node, bounds nesting (MJ_MAX_DEPTH) so a hostile answer cannot exhaust the stack,
 * and decodes strings (with \uXXXX escapes) to UTF-8. Private to libmecs_client. */
#ifndef MECS_JSON_H
#define MECS_JSON_H

#include <stddef.h>

#define MJ_MAX_DEPTH 64

typedef enum { MJ_NULL, MJ_BOOL, MJ_NUMBER, MJ_STRING, MJ_ARRAY, MJ_OBJECT } mj_type;

typedef struct mj_node {
    mj_type type;
    double number;        /* MJ_NUMBER; MJ_BOOL: 0 or 1 */
    char *string;         /* MJ_STRING: NUL-terminated UTF-8 */
    char *key;            /* set when the node is a member of an object */
    struct mj_node *child; /* first element or member */
    struct mj_node *next;  /* next sibling */
} mj_node;

/* Parse `len` bytes; NULL on error with a message in err (at most errlen bytes). */
mj_node *mj_parse(const char *text, size_t len, char *err, size_t errlen);
void mj_free(mj_node *node);

/* Lookups that accept NULL and answer NULL when the shape is not as asked. */
const mj_node *mj_get(const mj_node *object, const char *key);
const mj_node *mj_at(const mj_node *array, size_t index);
size_t mj_size(const mj_node *array_or_object);
const char *mj_str(const mj_node *node); /* the string, or NULL if not a string */

#endif
