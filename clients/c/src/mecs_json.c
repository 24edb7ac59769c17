/* The client's JSON reader (see mecs_json.h): recursive descent with a depth bound. */
#include "mecs_json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *p, *end, *start;
    char *err;
    size_t errlen;
    int failed;
} mj_reader;

static void fail(mj_reader *r, const char *what) {
    if (!r->failed && r->err && r->errlen)
        snprintf(r->err, r->errlen, "%s at byte %ld", what, (long)(r->p - r->start));
    r->failed = 1;
}

static void skip_space(mj_reader *r) {
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r'))
        r->p++;
}

static mj_node *new_node(mj_reader *r, mj_type type) {
    mj_node *n = calloc(1, sizeof *n);
    if (!n) fail(r, "out of memory");
    else n->type = type;
    return n;
}

static int hex4(const char *s, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return 0;
    }
    *out = v;
    return 1;
}

static size_t put_utf8(char *dst, unsigned cp) {
    if (cp < 0x80) { dst[0] = (char)cp; return 1; }
    if (cp < 0x800) {
        dst[0] = (char)(0xC0 | (cp >> 6));
        dst[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        dst[0] = (char)(0xE0 | (cp >> 12));
        dst[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        dst[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    dst[0] = (char)(0xF0 | (cp >> 18));
    dst[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    dst[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    dst[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* A string starting at the opening quote; the decoded text is never longer than the raw. */
static char *parse_string(mj_reader *r) {
    const char *q = ++r->p;
    while (q < r->end && *q != '"') q += (*q == '\\') ? 2 : 1;
    if (q >= r->end) { fail(r, "unterminated string"); return NULL; }
    char *out = malloc((size_t)(q - r->p) + 1);
    if (!out) { fail(r, "out of memory"); return NULL; }
    size_t n = 0;
    while (r->p < q) {
        unsigned char c = (unsigned char)*r->p;
        if (c < 0x20) { fail(r, "control character in a string"); free(out); return NULL; }
        if (c != '\\') { out[n++] = (char)c; r->p++; continue; }
        char e = r->p[1];
        r->p += 2;
        switch (e) {
        case '"': out[n++] = '"'; break;
        case '\\': out[n++] = '\\'; break;
        case '/': out[n++] = '/'; break;
        case 'b': out[n++] = '\b'; break;
        case 'f': out[n++] = '\f'; break;
        case 'n': out[n++] = '\n'; break;
        case 'r': out[n++] = '\r'; break;
        case 't': out[n++] = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (q - r->p < 4 || !hex4(r->p, &cp)) { fail(r, "bad \\u escape"); free(out); return NULL; }
            r->p += 4;
            if (cp >= 0xD800 && cp < 0xDC00 && q - r->p >= 6 && r->p[0] == '\\' && r->p[1] == 'u' &&
                hex4(r->p + 2, &lo) && lo >= 0xDC00 && lo < 0xE000) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                r->p += 6;
            }
            n += put_utf8(out + n, cp); /* 6 or 12 raw bytes give at most 3 or 4 */
            break;
        }
        default: fail(r, "bad escape in a string"); free(out); return NULL;
        }
    }
    out[n] = '\0';
    r->p = q + 1;
    return out;
}

static mj_node *parse_value(mj_reader *r, int depth);

static mj_node *parse_container(mj_reader *r, int depth, int object) {
    mj_node *node = new_node(r, object ? MJ_OBJECT : MJ_ARRAY);
    if (!node) return NULL;
    char close = object ? '}' : ']';
    mj_node **tail = &node->child;
    r->p++;
    skip_space(r);
    if (r->p < r->end && *r->p == close) { r->p++; return node; }
    for (;;) {
        char *key = NULL;
        skip_space(r);
        if (object) {
            if (r->p >= r->end || *r->p != '"') { fail(r, "expected a member name"); break; }
            if (!(key = parse_string(r))) break;
            skip_space(r);
            if (r->p >= r->end || *r->p != ':') { fail(r, "expected ':'"); free(key); break; }
            r->p++;
        }
        mj_node *child = parse_value(r, depth + 1);
        if (!child) { free(key); break; }
        child->key = key;
        *tail = child;
        tail = &child->next;
        skip_space(r);
        if (r->p < r->end && *r->p == ',') { r->p++; continue; }
        if (r->p < r->end && *r->p == close) { r->p++; return node; }
        fail(r, object ? "expected ',' or '}'" : "expected ',' or ']'");
        break;
    }
    mj_free(node);
    return NULL;
}

static mj_node *parse_value(mj_reader *r, int depth) {
    if (depth > MJ_MAX_DEPTH) { fail(r, "nested too deeply"); return NULL; }
    skip_space(r);
    if (r->p >= r->end) { fail(r, "unexpected end"); return NULL; }
    char c = *r->p;
    if (c == '{' || c == '[') return parse_container(r, depth, c == '{');
    if (c == '"') {
        char *s = parse_string(r);
        if (!s) return NULL;
        mj_node *n = new_node(r, MJ_STRING);
        if (!n) { free(s); return NULL; }
        n->string = s;
        return n;
    }
    static const struct { const char *word; mj_type type; double value; } words[] = {
        {"true", MJ_BOOL, 1}, {"false", MJ_BOOL, 0}, {"null", MJ_NULL, 0}};
    for (size_t i = 0; i < 3; i++) {
        size_t len = strlen(words[i].word);
        if ((size_t)(r->end - r->p) >= len && memcmp(r->p, words[i].word, len) == 0) {
            r->p += len;
            mj_node *n = new_node(r, words[i].type);
            if (n) n->number = words[i].value;
            return n;
        }
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
        char buf[64];
        size_t len = 0;
        while (r->p + len < r->end && len < sizeof buf - 1 && strchr("+-.eE0123456789", r->p[len]))
            len++;
        memcpy(buf, r->p, len);
        buf[len] = '\0';
        char *endp;
        double v = strtod(buf, &endp);
        if (endp != buf + len) { fail(r, "bad number"); return NULL; }
        r->p += len;
        mj_node *n = new_node(r, MJ_NUMBER);
        if (n) n->number = v;
        return n;
    }
    fail(r, "unexpected character");
    return NULL;
}

mj_node *mj_parse(const char *text, size_t len, char *err, size_t errlen) {
    mj_reader r = {text, text + len, text, err, errlen, 0};
    mj_node *root = parse_value(&r, 0);
    if (root) {
        skip_space(&r);
        if (r.p != r.end) {
            fail(&r, "trailing bytes after the document");
            mj_free(root);
            return NULL;
        }
    }
    return r.failed ? (mj_free(root), NULL) : root;
}

void mj_free(mj_node *node) {
    while (node) {
        mj_node *next = node->next;
        mj_free(node->child);
        free(node->string);
        free(node->key);
        free(node);
        node = next;
    }
}

const mj_node *mj_get(const mj_node *object, const char *key) {
    if (!object || object->type != MJ_OBJECT) return NULL;
    for (const mj_node *c = object->child; c; c = c->next)
        if (c->key && strcmp(c->key, key) == 0) return c;
    return NULL;
}

const mj_node *mj_at(const mj_node *array, size_t index) {
    if (!array || array->type != MJ_ARRAY) return NULL;
    const mj_node *c = array->child;
    while (c && index--) c = c->next;
    return c;
}

size_t mj_size(const mj_node *node) {
    size_t n = 0;
    if (node && (node->type == MJ_ARRAY || node->type == MJ_OBJECT))
        for (const mj_node *c = node->child; c; c = c->next) n++;
    return n;
}

const char *mj_str(const mj_node *node) {
    return node && node->type == MJ_STRING ? node->string : NULL;
}
