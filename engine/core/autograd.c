/* engine/core/autograd.c: grad mode, graph nodes, and the backward engine.
 * Ops record nodes through fl_node_make/fl_record; backward runs ready nodes highest sequence number first
 * (reverse creation order, as PyTorch), frees each node's saved tensors once it has run, and accumulates
 * leaf gradients into .grad. The engine keeps its per-run state in a local table, so a backward called from
 * inside a node (activation checkpointing) is safe. */
#include "internal.h"

#include <stdatomic.h>

static _Thread_local bool grad_enabled = true;
static _Atomic int64_t next_seq = 1;
static _Atomic int64_t live_nodes = 0;

static _Thread_local int32_t backward_depth = 0;

enum { MAX_END_HOOKS = 16 };
static struct { fl_backward_end_fn fn; void *ctx; } end_hooks[MAX_END_HOOKS];
static int32_t n_end_hooks = 0;

int fl_autograd_add_end_hook(fl_backward_end_fn fn, void *ctx) {
    if (n_end_hooks == MAX_END_HOOKS) return fl_fail(FL_ESTATE, "autograd: more than %d end-of-backward hooks", MAX_END_HOOKS);
    end_hooks[n_end_hooks].fn = fn;
    end_hooks[n_end_hooks].ctx = ctx;
    n_end_hooks++;
    return FL_OK;
}

void fl_autograd_remove_end_hook(fl_backward_end_fn fn, void *ctx) {
    for (int32_t i = 0; i < n_end_hooks; i++)
        if (end_hooks[i].fn == fn && end_hooks[i].ctx == ctx) {
            memmove(&end_hooks[i], &end_hooks[i + 1], sizeof end_hooks[0] * (size_t)(n_end_hooks - i - 1));
            n_end_hooks--;
            return;
        }
}

int32_t fl_autograd_depth(void) { return backward_depth; }

static int run_end_hooks(void) {
    for (int32_t i = 0; i < n_end_hooks; i++) {
        int rc = end_hooks[i].fn(end_hooks[i].ctx);
        if (rc < 0) return rc;
    }
    return FL_OK;
}

void fl_grad_set_enabled(bool on) { grad_enabled = on; }
bool fl_grad_is_enabled(void) { return grad_enabled; }
int64_t fl_autograd_live_nodes(void) { return atomic_load(&live_nodes); }

/* ---- nodes ---- */

static fl_node *node_alloc(const char *name, int32_t n_in, int32_t n_out) {
    fl_node *n = calloc(1, sizeof *n + sizeof(fl_edge) * (size_t)(n_in > 0 ? n_in : 1));
    if (!n) return fl_fail_null(FL_ENOMEM, "autograd: out of memory for a node");
    n->refcount = 1;
    n->name = name;
    n->n_in = n_in;
    n->n_out = n_out;
    n->next = (fl_edge *)(n + 1);
    n->seq = atomic_fetch_add(&next_seq, 1);
    atomic_fetch_add(&live_nodes, 1);
    return n;
}

void fl_node_retain(fl_node *n) { if (n) n->refcount++; }

static void release_saved(fl_node *n) {
    for (int32_t i = 0; i < n->n_saved; i++) {
        fl_tensor_release(n->saved[i]);
        n->saved[i] = NULL;
    }
    n->released = true;
}

void fl_node_release(fl_node *n) {
    if (!n || --n->refcount > 0) return;
    release_saved(n);
    for (int32_t i = 0; i < n->n_in; i++) fl_node_release(n->next[i].node);
    if (n->destroy) n->destroy(n);
    atomic_fetch_sub(&live_nodes, 1);
    free(n);
}

static fl_node *grad_acc_of(fl_tensor *leaf) {
    if (!leaf->grad_acc) {
        fl_node *a = node_alloc("AccumulateGrad", 0, 1);
        if (!a) return NULL;
        /* Accumulation runs as soon as it is ready (as in PyTorch): gradients land early, and FSDP can
         * reduce a unit while the rest of backward runs. Ties are broken by the heap, the same on every rank. */
        a->seq = INT64_MAX;
        a->leaf = leaf;
        leaf->grad_acc = a;
    }
    return leaf->grad_acc;
}

fl_node *fl_node_make(const char *name, fl_backward_fn fn, int32_t n_in, const fl_tensor *const *ins, int32_t n_out) {
    if (!grad_enabled) return NULL;
    bool any = false;
    for (int32_t i = 0; i < n_in; i++) any |= ins[i] && ins[i]->requires_grad;
    if (!any) return NULL;
    fl_node *n = node_alloc(name, n_in, n_out);
    if (!n) return NULL;
    n->backward = fn;
    for (int32_t i = 0; i < n_in; i++) {
        const fl_tensor *t = ins[i];
        if (i < 4 && t) {
            n->in_dtype[i] = t->dtype;
            n->in_ndim[i] = t->ndim;
            memcpy(n->in_shape[i], t->shape, sizeof(int64_t) * (size_t)t->ndim);
        }
        if (!t || !t->requires_grad) continue;
        fl_node *src = t->grad_fn ? t->grad_fn : grad_acc_of((fl_tensor *)t); /* a leaf's accumulator is a cache */
        if (!src) { fl_node_release(n); return NULL; }
        fl_node_retain(src);
        n->next[i].node = src;
        n->next[i].slot = t->grad_fn ? t->out_index : 0;
    }
    return n;
}

void fl_node_set_output(fl_node *n, int32_t slot, fl_tensor *out) {
    fl_node_retain(n);
    fl_node_release(out->grad_fn);
    out->grad_fn = n;
    out->out_index = slot;
    out->requires_grad = 1;
}

int32_t fl_node_save(fl_node *n, const fl_tensor *t) {
    assert(n->n_saved < FL_NODE_MAX_SAVED);
    fl_tensor_retain((fl_tensor *)t);
    n->saved[n->n_saved] = (fl_tensor *)t;
    return n->n_saved++;
}

fl_node *fl_record(const char *name, fl_backward_fn fn, int32_t n_in, const fl_tensor *const *ins, fl_tensor *out) {
    fl_node *n = fl_node_make(name, fn, n_in, ins, 1);
    if (!n) return NULL;
    fl_node_set_output(n, 0, out);
    fl_node_release(n); /* out holds it */
    return n;
}

/* ---- leaves ---- */

int fl_tensor_set_requires_grad(fl_tensor *t, bool on) {
    if (t->grad_fn)
        return fl_fail(FL_EINVAL, "requires_grad: only leaf tensors can change it (this %s comes from %s)",
                       fl_shape_str(t), t->grad_fn->name);
    if (on && !fl_is_float_compute(t->dtype) && t->dtype != FL_BF16 && t->dtype != FL_F16)
        return fl_fail(FL_EINVAL, "requires_grad: only floating point tensors can require grad, got %s", fl_dtype_name(t->dtype));
    t->requires_grad = on;
    return FL_OK;
}

fl_tensor *fl_tensor_get_grad(const fl_tensor *t) {
    fl_tensor_retain(t->grad);
    return t->grad;
}

int fl_tensor_set_grad(fl_tensor *t, fl_tensor *g) {
    if (g && !fl_same_shape(t, g))
        return fl_fail(FL_EINVAL, "set_grad: gradient %s does not match tensor %s", fl_shape_str(g), fl_shape_str(t));
    fl_tensor_retain(g);
    fl_tensor_release(t->grad);
    t->grad = g;
    return FL_OK;
}

fl_tensor *fl_detach(const fl_tensor *t) {
    return fl_tensor_view_of(t->storage, t->dtype, t->device, t->ndim, t->shape, t->stride, t->offset);
}

const char *fl_tensor_grad_fn_name(const fl_tensor *t) { return t->grad_fn ? t->grad_fn->name : NULL; }

/* ---- the engine ---- */

typedef struct {
    fl_node *node;
    int32_t deps;        /* edges from not-yet-run nodes */
    fl_tensor **grads;   /* [n_out] accumulated output gradients */
} node_state;

typedef struct {
    node_state *slots;   /* open addressing by node pointer */
    int64_t cap, count;
    fl_node **heap;      /* ready nodes, max-heap by seq */
    int64_t heap_n, heap_cap;
} engine;

static uint64_t ptr_hash(const void *p) { uint64_t x = (uint64_t)(uintptr_t)p; x ^= x >> 33; x *= 0xff51afd7ed558ccdull; return x ^ (x >> 33); }

static node_state *lookup(engine *e, fl_node *n, bool insert) {
    if (insert && (e->count + 1) * 2 > e->cap) {
        int64_t old_cap = e->cap;
        node_state *old = e->slots;
        e->cap = old_cap ? old_cap * 2 : 256;
        e->slots = calloc((size_t)e->cap, sizeof *e->slots);
        if (!e->slots) { e->slots = old; e->cap = old_cap; return NULL; }
        e->count = 0;
        for (int64_t i = 0; i < old_cap; i++)
            if (old[i].node) { *lookup(e, old[i].node, true) = old[i]; }
        free(old);
    }
    if (!e->cap) return NULL;
    for (uint64_t i = ptr_hash(n) & (uint64_t)(e->cap - 1);; i = (i + 1) & (uint64_t)(e->cap - 1)) {
        if (e->slots[i].node == n) return &e->slots[i];
        if (!e->slots[i].node) {
            if (!insert) return NULL;
            e->slots[i].node = n;
            e->count++;
            return &e->slots[i];
        }
    }
}

static int heap_push(engine *e, fl_node *n) {
    if (e->heap_n == e->heap_cap) {
        int64_t cap = e->heap_cap ? e->heap_cap * 2 : 64;
        fl_node **h = realloc(e->heap, sizeof *h * (size_t)cap);
        if (!h) return fl_fail(FL_ENOMEM, "backward: out of memory");
        e->heap = h;
        e->heap_cap = cap;
    }
    int64_t i = e->heap_n++;
    while (i > 0 && e->heap[(i - 1) / 2]->seq < n->seq) { e->heap[i] = e->heap[(i - 1) / 2]; i = (i - 1) / 2; }
    e->heap[i] = n;
    return FL_OK;
}

static fl_node *heap_pop(engine *e) {
    fl_node *top = e->heap[0], *last = e->heap[--e->heap_n];
    int64_t i = 0;
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= e->heap_n) break;
        if (c + 1 < e->heap_n && e->heap[c + 1]->seq > e->heap[c]->seq) c++;
        if (e->heap[c]->seq <= last->seq) break;
        e->heap[i] = e->heap[c];
        i = c;
    }
    if (e->heap_n) e->heap[i] = last;
    return top;
}

/* Adds g (owned) into *slot. Reuses the buffer in place when nobody else can see it. */
static int accumulate(fl_tensor **slot, fl_tensor *g) {
    if (!*slot) { *slot = g; return FL_OK; }
    fl_tensor *s = *slot;
    if (s->refcount == 1 && s->storage->refcount == 1 && fl_tensor_is_contiguous(s) && s->dtype == g->dtype) {
        int rc = fl_add_(s, g, 1.0);   /* its own code: FL_ENOMEM stays FL_ENOMEM */
        fl_tensor_release(g);
        return rc < 0 ? rc : FL_OK;
    }
    fl_tensor *sum = fl_add(s, g);
    fl_tensor_release(g);
    if (!sum) return FL_EINVAL;
    fl_tensor_release(s);
    *slot = sum;
    return FL_OK;
}

static int accumulate_leaf(fl_tensor *leaf, fl_tensor *g) {
    if (!fl_same_shape(leaf, g)) {
        int rc = fl_fail(FL_EINVAL, "backward: gradient %s does not match leaf %s", fl_shape_str(g), fl_shape_str(leaf));
        fl_tensor_release(g);
        return rc;
    }
    if (!leaf->grad) {
        /* Steal the buffer when nothing else sees it (the common case); copy otherwise. */
        if (g->refcount == 1 && g->storage->refcount == 1 && fl_tensor_is_contiguous(g) && g->dtype == leaf->dtype && g->offset == 0) {
            leaf->grad = g;
        } else {
            leaf->grad = fl_tensor_empty(leaf->ndim, leaf->shape, leaf->dtype, FL_CPU);
            int rc = leaf->grad ? fl_tensor_copy_(leaf->grad, g) : FL_ENOMEM;
            fl_tensor_release(g);
            if (rc < 0) return rc;
        }
        fl_tensor_set_category(leaf->grad, FL_MEM_GRAD);
        return FL_OK;
    }
    int rc = fl_add_(leaf->grad, g, 1.0);
    fl_tensor_release(g);
    return rc < 0 ? rc : FL_OK;
}

static int check_grad_in(const fl_node *n, int32_t i, const fl_tensor *g) {
    if (i >= 4 || n->in_ndim[i] != g->ndim || memcmp(n->in_shape[i], g->shape, sizeof(int64_t) * (size_t)g->ndim) != 0) {
        if (i >= 4) return FL_OK;
        return fl_fail(FL_EINVAL, "backward of %s: gradient %s for input %d, expected %s", n->name, fl_shape_str(g), i,
                       fl_shape_str_n(n->in_ndim[i], n->in_shape[i]));
    }
    return FL_OK;
}

static void engine_free(engine *e) {
    for (int64_t i = 0; i < e->cap; i++) {
        node_state *s = &e->slots[i];
        if (!s->node) continue;
        if (s->grads) {
            for (int32_t j = 0; j < s->node->n_out; j++) fl_tensor_release(s->grads[j]);
            free(s->grads);
        }
    }
    free(e->slots);
    free(e->heap);
}

/* Counts, for every node reachable from root, the edges that point at it. */
static int discover(engine *e, fl_node *root) {
    int64_t cap = 256, n = 0;
    fl_node **stack = malloc(sizeof *stack * (size_t)cap);
    if (!stack || !lookup(e, root, true)) { free(stack); return fl_fail(FL_ENOMEM, "backward: out of memory"); }
    stack[n++] = root;
    while (n) {
        fl_node *x = stack[--n];
        for (int32_t i = 0; i < x->n_in; i++) {
            fl_node *y = x->next[i].node;
            if (!y) continue;
            node_state *s = lookup(e, y, false);
            if (!s) {
                s = lookup(e, y, true);
                if (!s) { free(stack); return fl_fail(FL_ENOMEM, "backward: out of memory"); }
                if (n == cap) {
                    cap *= 2;
                    fl_node **st = realloc(stack, sizeof *st * (size_t)cap);
                    if (!st) { free(stack); return fl_fail(FL_ENOMEM, "backward: out of memory"); }
                    stack = st;
                }
                stack[n++] = y;
            }
            s->deps++;
        }
    }
    for (int64_t i = 0; i < e->cap; i++) {
        fl_node *x = e->slots[i].node;
        if (x && x->leaf && x->leaf->hook) {
            fl_leaf_hook *h = x->leaf->hook;
            if (h->reachable) h->reachable(h);
        }
    }
    free(stack);
    return FL_OK;
}

static int backward_run(fl_tensor *root, const fl_tensor *grad, bool retain_graph) {
    if (!root->requires_grad)
        return fl_fail(FL_EINVAL, "backward: tensor %s does not require grad and has no grad_fn", fl_shape_str(root));
    fl_tensor *g0;
    if (grad) {
        if (!fl_same_shape(root, grad))
            return fl_fail(FL_EINVAL, "backward: gradient %s does not match output %s", fl_shape_str(grad), fl_shape_str(root));
        g0 = fl_contiguous(grad);
        if (!g0) return FL_ENOMEM;
        if (g0->requires_grad || g0->grad_fn) { fl_tensor *d = fl_detach(g0); fl_tensor_release(g0); g0 = d; }
    } else {
        if (fl_tensor_numel(root) != 1)
            return fl_fail(FL_EINVAL, "backward: output %s has %" PRId64 " elements; pass a gradient for a non-scalar",
                           fl_shape_str(root), fl_tensor_numel(root));
        g0 = fl_tensor_full(root->ndim, root->shape, root->dtype, 1.0);
        if (!g0) return FL_ENOMEM;
    }
    if (!root->grad_fn) return accumulate_leaf(root, g0);

    bool was = grad_enabled;
    grad_enabled = false;
    engine e = {0};
    int rc = discover(&e, root->grad_fn);
    if (rc == FL_OK) {
        node_state *rs = lookup(&e, root->grad_fn, false);
        rs->grads = calloc((size_t)root->grad_fn->n_out, sizeof(fl_tensor *));
        if (!rs->grads) {
            rc = fl_fail(FL_ENOMEM, "backward: out of memory");
        } else {
            rs->grads[root->out_index] = g0;
            g0 = NULL;
            rc = heap_push(&e, root->grad_fn);
        }
    }
    fl_tensor_release(g0);
    fl_tensor **gin = NULL;
    int32_t gin_cap = 0;
    while (rc == FL_OK && e.heap_n) {
        fl_node *n = heap_pop(&e);
        if (fl_interrupt_take()) {   /* Ctrl-C in the REPL: between nodes, never inside one */
            rc = fl_fail(FL_EINTERRUPTED, "interrupted (in backward, before node %s)", n->name);
            break;
        }
        node_state *st = lookup(&e, n, false);
        if (n->leaf || (!n->backward && !n->custom)) {  /* AccumulateGrad (or its leaf is gone) */
            if (n->leaf && st->grads && st->grads[0]) { rc = accumulate_leaf(n->leaf, st->grads[0]); st->grads[0] = NULL; }
            if (rc == FL_OK && n->leaf && n->leaf->hook) {
                fl_leaf_hook *h = n->leaf->hook;
                if (h->ready) rc = h->ready(h);
            }
            continue;
        }
        if (n->released) {
            rc = fl_fail(FL_ESTATE, "backward: node %s already ran and freed its saved tensors; "
                                    "pass retain_graph = true to the first backward to run it twice", n->name);
            break;
        }
        if (n->n_in > gin_cap) {
            gin_cap = n->n_in * 2;
            fl_tensor **ng = realloc(gin, sizeof *gin * (size_t)gin_cap);
            if (!ng) { rc = fl_fail(FL_ENOMEM, "backward: out of memory"); break; }
            gin = ng;
        }
        memset(gin, 0, sizeof *gin * (size_t)n->n_in);
        if (!st->grads && !(st->grads = calloc((size_t)n->n_out, sizeof(fl_tensor *)))) {
            rc = fl_fail(FL_ENOMEM, "backward of %s: out of memory", n->name);
            break;
        }
        if (n->custom) {
            grad_enabled = was;
            rc = n->custom(n->custom_id, n->n_out, st->grads, n->n_in, gin);
            grad_enabled = false;
            if (rc < 0) fl_error_prefix(n->name);
        } else {
            rc = n->backward(n, st->grads, gin);
            if (rc < 0) fl_error_prefix("backward");
        }
        for (int32_t j = 0; j < n->n_out; j++) { fl_tensor_release(st->grads[j]); st->grads[j] = NULL; }
        if (!retain_graph) release_saved(n);
        for (int32_t i = 0; i < n->n_in; i++) {
            fl_edge *ed = &n->next[i];
            if (rc == FL_OK && ed->node) {
                node_state *ns = lookup(&e, ed->node, false);
                if (gin[i]) {
                    rc = check_grad_in(n, i, gin[i]);
                    if (rc == FL_OK) {
                        if (!ns->grads && !(ns->grads = calloc((size_t)ed->node->n_out, sizeof(fl_tensor *)))) {
                            rc = fl_fail(FL_ENOMEM, "backward of %s: out of memory", n->name);  /* gin[i] released below */
                        } else {
                            rc = accumulate(&ns->grads[ed->slot], gin[i]);
                            gin[i] = NULL;
                        }
                    }
                }
                if (rc == FL_OK && --ns->deps == 0) rc = heap_push(&e, ed->node);
            }
            fl_tensor_release(gin[i]);
            gin[i] = NULL;
        }
    }
    free(gin);
    engine_free(&e);
    grad_enabled = was;
    return rc;
}

int fl_backward(fl_tensor *root, const fl_tensor *grad, bool retain_graph) {
    backward_depth++;
    int rc = backward_run(root, grad, retain_graph);
    backward_depth--;
    if (rc == FL_OK && backward_depth == 0) rc = run_end_hooks();
    return rc;
}

/* ---- custom nodes ---- */

static void free_ctx(fl_node *n) { free(n->ctx); }

static int custom_placeholder(fl_node *n, fl_tensor *const *go, fl_tensor **gi) { (void)n; (void)go; (void)gi; return FL_OK; }

int fl_custom_node(const char *name, int64_t id, fl_custom_backward_fn fn, int32_t n_in, fl_tensor *const *ins,
                   int32_t n_out, fl_tensor *const *outs) {
    for (int32_t j = 0; j < n_out; j++)
        if (outs[j]->grad_fn)
            return fl_fail(FL_EINVAL, "%s: output %d already has a grad_fn (%s); compute outputs under no_grad",
                           name, j, outs[j]->grad_fn->name);
    fl_node *n = fl_node_make("custom", custom_placeholder, n_in, (const fl_tensor *const *)ins, n_out);
    if (!n) return 0;
    /* The name outlives the call: keep our own copy in ctx. */
    char *copy = strdup(name ? name : "custom");
    if (!copy) {
        fl_node_release(n);
        return fl_fail(FL_ENOMEM, "custom_node: out of memory for the name");
    }
    n->ctx = copy;
    n->name = copy;
    n->destroy = free_ctx;
    n->custom = fn;
    n->custom_id = id;
    for (int32_t j = 0; j < n_out; j++) fl_node_set_output(n, j, outs[j]);
    fl_node_release(n);
    return 1;
}
