/* vhsm._speedups: the hot loops of the ring data path in C (optional accelerator).
 *
 * Every function here is an exact stand-in for a numpy/Python step of
 * vhsm/virtq/split.py, packed.py and vhsm/devices/net.py; the Python side
 * decides when to call it and keeps the pure path as the fallback. A function
 * either completes its whole step or returns a "fall back" answer (None or -1)
 * after writing nothing the pure path would not also write, so the pure path can
 * redo the step and raise its own, identical, errors.
 *
 * Guest memory is hostile: every index read from it is checked against the
 * queue size or the buffer it indexes before use, every address is checked
 * against the region bounds with unsigned arithmetic that cannot wrap (an
 * address below a region's start wraps above its end), and every loop is
 * bounded by a count the caller gave (never by a value read from the ring).
 *
 * Only the buffer protocol is used (memoryview, numpy arrays): no numpy headers,
 * so building needs nothing but a C compiler and the Python headers. The GIL is
 * released around walks and copies large enough to pay for it; the buffers stay
 * exported meanwhile, so the memory cannot be unmapped under us.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "vhsm._speedups reads little-endian rings natively; use the pure-Python path"
#endif

#ifndef VHSM_SOURCE_SHA256
#define VHSM_SOURCE_SHA256 ""
#endif

#define F_NEXT 0x1u
#define F_WRITE 0x2u
#define F_INDIRECT 0x4u
#define F_AVAIL 0x80u
#define F_USED 0x8000u
#define IDS 65536u
/* Release the GIL for bursts of at least this many entries / bytes. */
#define NOGIL_ENTRIES 128
#define NOGIL_BYTES (64 * 1024)
/* The largest ring size the protocol allows. It is declared in specs/ and set by
   vhsm.speedups through set_max_queue_size() when the module is loaded; until then
   it is 0 and every ring is refused here (the pure path serves it). */
static Py_ssize_t max_ring = 0;
/* Packed rings carry 15-bit ring positions (bit 15 is the wrap counter): the format's
   own bound, which the declared limit must not exceed for this code to be right. */
#define FORMAT_MAX_RING (1 << 15)

static inline uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* ------------------------------------------------------------------ buffers */

typedef struct {
    Py_buffer view;
    int held;
} buf_t;

static int get_buf(PyObject *obj, buf_t *b, int writable, Py_ssize_t need, const char *what) {
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &b->view, flags) < 0)
        return -1;
    b->held = 1;
    if (b->view.len < need) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, needs %zd", what, b->view.len, need);
        return -1;
    }
    return 0;
}

static void rel(buf_t *b) {
    if (b->held) {
        PyBuffer_Release(&b->view);
        b->held = 0;
    }
}

/* A one-dimensional integer array read through the buffer protocol: any item size,
 * signed or not, any positive stride (a field of a structured array). */
typedef struct {
    buf_t b;
    Py_ssize_t n;
    Py_ssize_t stride;
    int size;
    int is_signed;
} ints_t;

/* 1 if obj is a contiguous integer buffer (filled in), 0 if not (no error set), -1 on error. */
static int get_ints(PyObject *obj, ints_t *a) {
    memset(a, 0, sizeof(*a));
    if (!PyObject_CheckBuffer(obj))
        return 0;
    if (PyObject_GetBuffer(obj, &a->b.view, PyBUF_STRIDES | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        return 0;
    }
    a->b.held = 1;
    const char *f = a->b.view.format ? a->b.view.format : "B";
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    if (f[0] == '\0' || f[1] != '\0' || !strchr("bBhHiIlLqQ", f[0]) || a->b.view.ndim != 1) {
        rel(&a->b);
        return 0;
    }
    a->size = (int)a->b.view.itemsize;
    if (a->size != 1 && a->size != 2 && a->size != 4 && a->size != 8) {
        rel(&a->b);
        return 0;
    }
    a->is_signed = (f[0] >= 'a' && f[0] <= 'z');
    a->n = a->b.view.shape ? a->b.view.shape[0] : a->b.view.len / a->size;
    a->stride = a->b.view.strides ? a->b.view.strides[0] : a->size;
    if (a->stride < a->size) { /* negative or overlapping strides: not for us */
        rel(&a->b);
        return 0;
    }
    return 1;
}

/* Item i as a signed 128-bit-safe pair: returns 0 and sets *out, or -1 if negative. */
static inline int int_at(const ints_t *a, Py_ssize_t i, uint64_t *out) {
    const uint8_t *p = (const uint8_t *)a->b.view.buf + i * a->stride;
    switch (a->size) {
    case 1:
        if (a->is_signed && (int8_t)*p < 0) return -1;
        *out = *p;
        return 0;
    case 2: {
        uint16_t v = ld16(p);
        if (a->is_signed && (int16_t)v < 0) return -1;
        *out = v;
        return 0;
    }
    case 4: {
        uint32_t v = ld32(p);
        if (a->is_signed && (int32_t)v < 0) return -1;
        *out = v;
        return 0;
    }
    default: {
        uint64_t v = ld64(p);
        if (a->is_signed && (int64_t)v < 0) return -1;
        *out = v;
        return 0;
    }
    }
}

/* The used lengths of a completion: one int for all, or an integer array of k items.
 * Returns 1 when usable, 0 when the pure path must decide (bad type, count or range). */
typedef struct {
    ints_t arr;
    int one;
    uint32_t value;
} lens_t;

static int get_lens(PyObject *obj, Py_ssize_t k, lens_t *l) {
    memset(l, 0, sizeof(*l));
    if (PyLong_CheckExact(obj)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
        if (overflow || v < 0 || v > 0xFFFFFFFFLL) {
            PyErr_Clear();
            return 0;
        }
        l->one = 1;
        l->value = (uint32_t)v;
        return 1;
    }
    int r = get_ints(obj, &l->arr);
    if (r <= 0)
        return r;
    if (l->arr.n != k) {
        rel(&l->arr.b);
        return 0;
    }
    for (Py_ssize_t i = 0; i < k; i++) {
        uint64_t v;
        if (int_at(&l->arr, i, &v) < 0 || v > 0xFFFFFFFFu) {
            rel(&l->arr.b);
            return 0;
        }
    }
    return 1;
}

static inline uint32_t len_at(const lens_t *l, Py_ssize_t i) {
    uint64_t v = l->value;
    if (!l->one)
        (void)int_at(&l->arr, i, &v); /* checked by get_lens */
    return (uint32_t)v;
}

/* The region (index into bounds, start, end) holding addr; -1 if none. */
static Py_ssize_t region_of(const uint64_t *bounds, Py_ssize_t nreg, uint64_t addr,
                            uint64_t *start, uint64_t *end) {
    for (Py_ssize_t r = 0; r < nreg; r++) {
        uint64_t s = bounds[2 * r], e = bounds[2 * r + 1];
        if (s <= addr && addr < e) {
            *start = s;
            *end = e;
            return r;
        }
    }
    return -1;
}

/* ------------------------------------------------------------- split rings */

PyDoc_STRVAR(split_pop_doc,
"split_pop(avail, desc, bounds, next_avail, size, n, heads, words, offsets)\n"
"\n"
"The fast path of SplitQueue.pop_batch: copy the n heads from next_avail into\n"
"heads (uint16) and, when every head is below size, each head's descriptor into\n"
"words (rows of four uint32). Returns (region, shortest, longest) and fills\n"
"offsets (int64) when every descriptor is one direct non-empty buffer inside the\n"
"first one's region; None otherwise (heads still filled, for the general path).");

static PyObject *split_pop(PyObject *self, PyObject *args) {
    PyObject *o_avail, *o_desc, *o_bounds, *o_heads, *o_words, *o_offsets;
    Py_ssize_t na, size, n;
    if (!PyArg_ParseTuple(args, "OOOnnnOOO", &o_avail, &o_desc, &o_bounds, &na, &size, &n,
                          &o_heads, &o_words, &o_offsets))
        return NULL;
    if (size < 1 || size > max_ring || (size & (size - 1)) || n < 0 || n > size) {
        PyErr_SetString(PyExc_ValueError, "split_pop: bad size or count");
        return NULL;
    }
    buf_t avail = {0}, desc = {0}, bounds = {0}, heads = {0}, words = {0}, offsets = {0};
    PyObject *result = NULL;
    if (get_buf(o_avail, &avail, 0, 4 + 2 * size, "avail") < 0 ||
        get_buf(o_desc, &desc, 0, 16 * size, "desc") < 0 ||
        get_buf(o_bounds, &bounds, 0, 0, "bounds") < 0 ||
        get_buf(o_heads, &heads, 1, 2 * n, "heads") < 0 ||
        get_buf(o_words, &words, 1, 16 * n, "words") < 0 ||
        get_buf(o_offsets, &offsets, 1, 8 * n, "offsets") < 0)
        goto done;
    {
        const uint8_t *av = avail.view.buf, *dt = desc.view.buf;
        uint16_t *hd = heads.view.buf;
        uint8_t *wd = words.view.buf;
        int64_t *off = offsets.view.buf;
        const uint64_t *bd = bounds.view.buf;
        Py_ssize_t nreg = bounds.view.len / 16;
        Py_ssize_t mask = size - 1, region = -1;
        int fast = 1;
        uint32_t shortest = 0xFFFFFFFFu, longest = 0, orflags = 0;
        PyThreadState *ts = n >= NOGIL_ENTRIES ? PyEval_SaveThread() : NULL;
        __atomic_thread_fence(__ATOMIC_ACQUIRE); /* the ring after the avail index */
        for (Py_ssize_t i = 0; i < n; i++) {
            uint16_t h = ld16(av + 4 + 2 * ((na + i) & mask));
            hd[i] = h;
            if (h >= size)
                fast = 0;
        }
        if (fast) {
            for (Py_ssize_t i = 0; i < n; i++) {
                uint8_t *row = wd + 16 * i;
                memcpy(row, dt + 16 * (Py_ssize_t)hd[i], 16); /* checks hold for the copy */
                uint32_t ln = ld32(row + 8);
                orflags |= ld16(row + 12);
                if (ln < shortest) shortest = ln;
                if (ln > longest) longest = ln;
            }
            if (n == 0 || (orflags & (F_NEXT | F_INDIRECT)) || shortest == 0)
                fast = 0;
        }
        if (fast) {
            uint64_t start = 0, end = 0, maxoff = 0;
            region = region_of(bd, nreg, ld64(wd), &start, &end);
            if (region < 0) {
                fast = 0;
            } else {
                for (Py_ssize_t i = 0; i < n; i++) {
                    uint64_t o = ld64(wd + 16 * i) - start; /* below start wraps above end */
                    off[i] = (int64_t)o;
                    if (o > maxoff) maxoff = o;
                }
                uint64_t span = end - start;
                if (maxoff > span || longest > span - maxoff)
                    fast = 0;
            }
        }
        if (ts)
            PyEval_RestoreThread(ts);
        if (fast)
            result = Py_BuildValue("nkk", region, (unsigned long)shortest, (unsigned long)longest);
        else
            result = Py_NewRef(Py_None);
    }
done:
    rel(&avail); rel(&desc); rel(&bounds); rel(&heads); rel(&words); rel(&offsets);
    return result;
}

PyDoc_STRVAR(split_used_doc,
"split_used(used, size, next_used, ids, lens, trusted) -> bool\n"
"\n"
"The store of SplitQueue.add_used_batch: every used element, then (release\n"
"order) the used index. ids is an integer array, lens one int or an integer\n"
"array as long. False, with nothing written, when the pure path must decide:\n"
"an id outside the queue (unless trusted), a length that does not fit 32 bits,\n"
"counts that differ, or inputs that are not integer arrays.");

static PyObject *split_used(PyObject *self, PyObject *args) {
    PyObject *o_used, *o_ids, *o_lens;
    Py_ssize_t size, nu;
    int trusted;
    if (!PyArg_ParseTuple(args, "OnnOOp", &o_used, &size, &nu, &o_ids, &o_lens, &trusted))
        return NULL;
    if (size < 1 || size > max_ring || (size & (size - 1))) {
        PyErr_SetString(PyExc_ValueError, "split_used: bad size");
        return NULL;
    }
    buf_t used = {0};
    ints_t ids;
    lens_t lens;
    memset(&lens, 0, sizeof(lens));
    PyObject *result = NULL;
    int r = get_ints(o_ids, &ids);
    if (r <= 0) {
        if (r == 0) result = Py_NewRef(Py_False);
        return result;
    }
    Py_ssize_t k = ids.n;
    if (k > size || (r = get_lens(o_lens, k, &lens)) <= 0) {
        if (r == 0 || k > size) result = Py_NewRef(Py_False);
        goto done;
    }
    if (get_buf(o_used, &used, 1, 4 + 8 * size, "used") < 0)
        goto done;
    for (Py_ssize_t i = 0; i < k; i++) {
        uint64_t id = 0;
        if (int_at(&ids, i, &id) < 0 || (!trusted && id >= (uint64_t)size) || id > 0xFFFFFFFFu) {
            result = Py_NewRef(Py_False);
            goto done;
        }
    }
    {
        uint8_t *u = used.view.buf;
        Py_ssize_t mask = size - 1;
        for (Py_ssize_t i = 0; i < k; i++) {
            uint64_t id = 0;
            (void)int_at(&ids, i, &id);
            st64(u + 4 + 8 * ((nu + i) & mask), id | (uint64_t)len_at(&lens, i) << 32);
        }
        __atomic_store_n((uint16_t *)(u + 2), (uint16_t)(nu + k), __ATOMIC_RELEASE);
        result = Py_NewRef(Py_True);
    }
done:
    rel(&used); rel(&ids.b); rel(&lens.arr.b);
    return result;
}

/* ------------------------------------------------------------ packed rings */

PyDoc_STRVAR(packed_run_doc,
"packed_run(desc, size, pos, wrap, limit, out) -> (count, pos, wrap)\n"
"\n"
"The run of available one-descriptor buffers from pos (flags checked against\n"
"the wrap counter, then the 16 bytes copied), up to limit of them, into out;\n"
"stops before a buffer that is not available or is a longer chain.");

static PyObject *packed_run(PyObject *self, PyObject *args) {
    PyObject *o_desc, *o_out;
    Py_ssize_t size, p, limit;
    int w;
    if (!PyArg_ParseTuple(args, "OnnpnO", &o_desc, &size, &p, &w, &limit, &o_out))
        return NULL;
    if (size < 1 || size > max_ring || p < 0 || p >= size || limit < 0) {
        PyErr_SetString(PyExc_ValueError, "packed_run: bad size, position or limit");
        return NULL;
    }
    buf_t desc = {0}, out = {0};
    PyObject *result = NULL;
    if (get_buf(o_desc, &desc, 0, 16 * size, "desc") < 0 ||
        get_buf(o_out, &out, 1, 16 * limit, "out") < 0)
        goto done;
    {
        uint8_t *dt = desc.view.buf, *o = out.view.buf;
        uint16_t want = w ? F_AVAIL : F_USED;
        Py_ssize_t k = 0;
        PyThreadState *ts = limit >= NOGIL_ENTRIES ? PyEval_SaveThread() : NULL;
        while (k < limit) {
            uint8_t *d = dt + 16 * p;
            uint16_t fl = __atomic_load_n((uint16_t *)(d + 14), __ATOMIC_ACQUIRE);
            if ((fl & (F_AVAIL | F_USED | F_NEXT | F_INDIRECT)) != want)
                break;
            memcpy(o + 16 * k, d, 14);
            memcpy(o + 16 * k + 14, &fl, 2); /* the flags that were checked */
            k++;
            if (++p == size) {
                p = 0;
                w ^= 1;
                want = w ? F_AVAIL : F_USED;
            }
        }
        if (ts)
            PyEval_RestoreThread(ts);
        result = Py_BuildValue("nni", k, p, w);
    }
done:
    rel(&desc); rel(&out);
    return result;
}

PyDoc_STRVAR(packed_take_doc,
"packed_take(seg, counts, waddr, wlen, bounds, offsets) -> (region, shortest, longest, plain) | None\n"
"\n"
"The fast path of PackedQueue._simple over a run of raw descriptors seg: when no\n"
"length is 0 and no id is in flight, mark each id with its position stamp; when\n"
"no id repeats and every buffer lies in the first one's region, keep the marks\n"
"(writable buffers as one writable descriptor with its gpa and length), fill the\n"
"offsets and return. Otherwise undo the marks and return None.");

static PyObject *packed_take(PyObject *self, PyObject *args) {
    PyObject *o_seg, *o_counts, *o_waddr, *o_wlen, *o_bounds, *o_off;
    if (!PyArg_ParseTuple(args, "OOOOOO", &o_seg, &o_counts, &o_waddr, &o_wlen, &o_bounds,
                          &o_off))
        return NULL;
    buf_t seg = {0}, counts = {0}, waddr = {0}, wlen = {0}, bounds = {0}, off = {0};
    PyObject *result = NULL;
    if (get_buf(o_seg, &seg, 0, 0, "seg") < 0 ||
        get_buf(o_counts, &counts, 1, 4 * IDS, "counts") < 0 ||
        get_buf(o_waddr, &waddr, 1, 8 * IDS, "waddr") < 0 ||
        get_buf(o_wlen, &wlen, 1, 4 * IDS, "wlen") < 0 ||
        get_buf(o_bounds, &bounds, 0, 0, "bounds") < 0)
        goto done;
    {
        Py_ssize_t k = seg.view.len / 16;
        if (k > max_ring) {
            PyErr_SetString(PyExc_ValueError, "packed_take: run longer than a ring");
            goto done;
        }
        if (get_buf(o_off, &off, 1, 8 * k, "offsets") < 0)
            goto done;
        const uint8_t *s = seg.view.buf;
        uint32_t *cn = counts.view.buf, *wl = wlen.view.buf;
        uint64_t *wa = waddr.view.buf;
        int64_t *of = off.view.buf;
        const uint64_t *bd = bounds.view.buf;
        Py_ssize_t nreg = bounds.view.len / 16, region = -1;
        uint32_t shortest = 0xFFFFFFFFu, longest = 0;
        uint16_t orflags = 0;
        int fast = k > 0, stamped = 0;
        PyThreadState *ts = k >= NOGIL_ENTRIES ? PyEval_SaveThread() : NULL;
        for (Py_ssize_t i = 0; i < k; i++) {
            uint32_t ln = ld32(s + 16 * i + 8);
            if (ln < shortest) shortest = ln;
            if (ln > longest) longest = ln;
            orflags |= ld16(s + 16 * i + 14);
            if (cn[ld16(s + 16 * i + 12)])
                fast = 0;
        }
        if (fast && shortest > 0) {
            stamped = 1;
            for (Py_ssize_t i = 0; i < k; i++) /* a repeated id keeps only its last stamp */
                cn[ld16(s + 16 * i + 12)] = ((uint32_t)(i + 1) << 17) | 1;
            for (Py_ssize_t i = 0; i < k && fast; i++)
                if (cn[ld16(s + 16 * i + 12)] != (((uint32_t)(i + 1) << 17) | 1))
                    fast = 0;
        } else {
            fast = 0;
        }
        if (fast) {
            uint64_t start = 0, end = 0, maxoff = 0;
            region = region_of(bd, nreg, ld64(s), &start, &end);
            if (region < 0) {
                fast = 0;
            } else {
                for (Py_ssize_t i = 0; i < k; i++) {
                    uint64_t o = ld64(s + 16 * i) - start;
                    of[i] = (int64_t)o;
                    if (o > maxoff) maxoff = o;
                }
                uint64_t span = end - start;
                if (maxoff > span || longest > span - maxoff)
                    fast = 0;
            }
        }
        int plain = !(orflags & F_WRITE);
        if (fast && !plain) {
            for (Py_ssize_t i = 0; i < k; i++) {
                uint16_t id = ld16(s + 16 * i + 12);
                if (ld16(s + 16 * i + 14) & F_WRITE) {
                    cn[id] = 1 | (1u << 16);
                    wa[id] = ld64(s + 16 * i);
                    wl[id] = ld32(s + 16 * i + 8);
                } else {
                    cn[id] = 1;
                }
            }
        }
        if (!fast && stamped)
            for (Py_ssize_t i = 0; i < k; i++)
                cn[ld16(s + 16 * i + 12)] = 0;
        if (ts)
            PyEval_RestoreThread(ts);
        if (fast)
            result = Py_BuildValue("nkkO", region, (unsigned long)shortest,
                                   (unsigned long)longest, plain ? Py_True : Py_False);
        else
            result = Py_NewRef(Py_None);
    }
done:
    rel(&seg); rel(&counts); rel(&waddr); rel(&wlen); rel(&bounds); rel(&off);
    return result;
}

PyDoc_STRVAR(packed_used_doc,
"packed_used(desc, size, next_used, used_wrap, ids, lens, counts, scratch, mode) -> int\n"
"\n"
"The store of PackedQueue.add_used_batch: one used descriptor per id at its\n"
"chain's first slot (len, id, flags in one 8-byte word), the first one's word\n"
"last with release order; the ids' in-flight counts cleared. mode 2: the ids\n"
"are the last burst, untouched (distinct, each one descriptor); 1: the last\n"
"burst (distinct); 0: anything (repeats checked with scratch). Returns the\n"
"descriptors used, or -1 with nothing written when the pure path must decide\n"
"(an id not in flight or repeated, a bad length, inputs not integer arrays).");

static PyObject *packed_used(PyObject *self, PyObject *args) {
    PyObject *o_desc, *o_ids, *o_lens, *o_counts, *o_scratch;
    Py_ssize_t size, nu;
    int uw, mode;
    if (!PyArg_ParseTuple(args, "OnnpOOOOi", &o_desc, &size, &nu, &uw, &o_ids, &o_lens,
                          &o_counts, &o_scratch, &mode))
        return NULL;
    if (size < 1 || size > max_ring || nu < 0 || nu >= size) {
        PyErr_SetString(PyExc_ValueError, "packed_used: bad size or position");
        return NULL;
    }
    buf_t desc = {0}, counts = {0}, scratch = {0};
    ints_t ids;
    lens_t lens;
    memset(&lens, 0, sizeof(lens));
    PyObject *result = NULL;
    Py_ssize_t fallback = -1, total = 0;
    int r = get_ints(o_ids, &ids);
    if (r <= 0) {
        if (r == 0) result = PyLong_FromSsize_t(fallback);
        return result;
    }
    Py_ssize_t k = ids.n;
    if ((r = get_lens(o_lens, k, &lens)) <= 0) {
        if (r == 0) result = PyLong_FromSsize_t(fallback);
        goto done;
    }
    if (get_buf(o_desc, &desc, 1, 16 * size, "desc") < 0 ||
        get_buf(o_counts, &counts, 1, 4 * IDS, "counts") < 0 ||
        get_buf(o_scratch, &scratch, 1, 4 * IDS, "scratch") < 0)
        goto done;
    {
        uint32_t *cn = counts.view.buf, *sc = scratch.view.buf;
        uint8_t *dt = desc.view.buf;
        for (Py_ssize_t i = 0; i < k; i++) {
            uint64_t id = 0;
            if (int_at(&ids, i, &id) < 0 || id >= IDS)
                goto fall;
            if (mode != 2) {
                uint32_t c = cn[id] & 0xFFFF;
                if (!c)
                    goto fall;
                total += c;
            } else {
                total += 1;
            }
        }
        if (mode == 0) {
            for (Py_ssize_t i = 0; i < k; i++) {
                uint64_t id = 0;
                (void)int_at(&ids, i, &id);
                sc[id] = (uint32_t)(i + 1);
            }
            for (Py_ssize_t i = 0; i < k; i++) {
                uint64_t id = 0;
                (void)int_at(&ids, i, &id);
                if (sc[id] != (uint32_t)(i + 1))
                    goto fall;
            }
        }
        if (total > size)
            goto fall;
        if (k) {
            uint64_t first = 0;
            Py_ssize_t pos = nu;
            for (Py_ssize_t i = 0; i < k; i++) {
                uint64_t id = 0;
                (void)int_at(&ids, i, &id);
                uint32_t c = mode == 2 ? 1 : (cn[id] & 0xFFFF);
                Py_ssize_t at = pos >= size ? pos - size : pos;
                int wrap = uw ^ (pos >= size);
                uint32_t ln = len_at(&lens, i);
                uint64_t word = (uint64_t)ln | id << 32 |
                                (uint64_t)((wrap ? (F_AVAIL | F_USED) : 0) | (ln ? F_WRITE : 0))
                                    << 48;
                if (i == 0)
                    first = word;
                else
                    st64(dt + 16 * at + 8, word);
                cn[id] = 0;
                pos += c;
            }
            /* the first flags word last: it publishes the burst */
            __atomic_store_n((uint64_t *)(dt + 16 * nu + 8), first, __ATOMIC_RELEASE);
        }
        result = PyLong_FromSsize_t(total);
        goto done;
    fall:
        result = PyLong_FromSsize_t(fallback);
    }
done:
    rel(&desc); rel(&counts); rel(&scratch); rel(&ids.b); rel(&lens.arr.b);
    return result;
}

/* ---------------------------------------------------------------- the sink */

/* Adler-32 (RFC 1950), the value zlib.adler32 returns from its default start of 1. */
static uint32_t adler32(const uint8_t *p, size_t n) {
    uint32_t a = 1, b = 0;
    while (n) {
        size_t t = n < 5552 ? n : 5552; /* the most bytes before b can overflow 32 bits */
        n -= t;
        while (t--) {
            a += *p++;
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    return a | b << 16;
}

/* Checks every (offset, length) against the region before any byte is touched. */
static int frames_inside(const ints_t *offs, const ints_t *lens, uint32_t one_len,
                         Py_ssize_t k, Py_ssize_t skip, Py_ssize_t region_len,
                         uint64_t *bytes) {
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < k; i++) {
        uint64_t o, n = one_len;
        if (int_at(offs, i, &o) < 0 || (lens && int_at(lens, i, &n) < 0))
            return 0;
        if ((uint64_t)skip > n || o > (uint64_t)region_len || n > (uint64_t)region_len - o)
            return 0;
        total += n - skip;
    }
    *bytes = total;
    return 1;
}

PyDoc_STRVAR(gather_rows_doc,
"gather_rows(region, offsets, n, skip, out) -> bool\n"
"\n"
"Copy bytes skip..n of the n-byte buffers at offsets (an integer array) of region\n"
"into out, one row of n - skip bytes each (the sink's copy of each frame).\n"
"False, nothing copied, if a buffer is not inside the region.");

static PyObject *gather_rows(PyObject *self, PyObject *args) {
    PyObject *o_region, *o_offs, *o_out;
    Py_ssize_t n, skip;
    if (!PyArg_ParseTuple(args, "OOnnO", &o_region, &o_offs, &n, &skip, &o_out))
        return NULL;
    if (n < 0 || skip < 0 || skip > n || n > 0xFFFFFFFFLL) {
        PyErr_SetString(PyExc_ValueError, "gather_rows: bad sizes");
        return NULL;
    }
    buf_t region = {0}, out = {0};
    ints_t offs;
    PyObject *result = NULL;
    int r = get_ints(o_offs, &offs);
    if (r <= 0) {
        if (r == 0) result = Py_NewRef(Py_False);
        return result;
    }
    Py_ssize_t k = offs.n, width = n - skip;
    uint64_t bytes = 0;
    if (width && k > PY_SSIZE_T_MAX / width) {
        PyErr_SetString(PyExc_ValueError, "gather_rows: too many rows");
        goto done;
    }
    if (get_buf(o_region, &region, 0, 0, "region") < 0 ||
        get_buf(o_out, &out, 1, k * width, "out") < 0)
        goto done;
    if (!frames_inside(&offs, NULL, (uint32_t)n, k, skip, region.view.len, &bytes)) {
        result = Py_NewRef(Py_False);
        goto done;
    }
    {
        const uint8_t *src = region.view.buf;
        uint8_t *dst = out.view.buf;
        PyThreadState *ts = bytes >= NOGIL_BYTES ? PyEval_SaveThread() : NULL;
        for (Py_ssize_t i = 0; i < k; i++) {
            uint64_t o = 0;
            (void)int_at(&offs, i, &o);
            memcpy(dst + i * width, src + o + skip, width);
        }
        if (ts)
            PyEval_RestoreThread(ts);
        result = Py_NewRef(Py_True);
    }
done:
    rel(&region); rel(&out); rel(&offs.b);
    return result;
}

PyDoc_STRVAR(adler32_rows_doc,
"adler32_rows(rows, k, width) -> int\n"
"\n"
"Sum of the Adler-32 checksums (zlib.adler32 values) of the k rows of width\n"
"bytes each in rows.");

static PyObject *adler32_rows(PyObject *self, PyObject *args) {
    PyObject *o_rows;
    Py_ssize_t k, width;
    if (!PyArg_ParseTuple(args, "Onn", &o_rows, &k, &width))
        return NULL;
    if (width < 0 || k < 0 || (width && k > PY_SSIZE_T_MAX / width)) {
        PyErr_SetString(PyExc_ValueError, "adler32_rows: bad sizes");
        return NULL;
    }
    buf_t rows = {0};
    if (get_buf(o_rows, &rows, 0, k * width, "rows") < 0) {
        rel(&rows);
        return NULL;
    }
    unsigned long long sum = 0;
    const uint8_t *p = rows.view.buf;
    PyThreadState *ts = k * width >= NOGIL_BYTES ? PyEval_SaveThread() : NULL;
    for (Py_ssize_t i = 0; i < k; i++)
        sum += adler32(p + i * width, (size_t)width);
    if (ts)
        PyEval_RestoreThread(ts);
    rel(&rows);
    return PyLong_FromUnsignedLongLong(sum);
}

PyDoc_STRVAR(read_frames_doc,
"read_frames(region, offsets, lens, skip, checksum) -> int | None\n"
"\n"
"Read bytes skip..len of each buffer (offsets and lens integer arrays, in one\n"
"region): the sum of their Adler-32 checksums when checksum is true, else a copy\n"
"of each (into a scratch buffer, the work a NIC's DMA does) and 0. None, nothing\n"
"read, if a buffer is not inside the region or is shorter than skip.");

static PyObject *read_frames(PyObject *self, PyObject *args) {
    PyObject *o_region, *o_offs, *o_lens;
    Py_ssize_t skip;
    int checksum;
    if (!PyArg_ParseTuple(args, "OOOnp", &o_region, &o_offs, &o_lens, &skip, &checksum))
        return NULL;
    buf_t region = {0};
    ints_t offs, lens;
    memset(&lens, 0, sizeof(lens));
    PyObject *result = NULL;
    uint8_t *scratch = NULL;
    int r = get_ints(o_offs, &offs);
    if (r <= 0) {
        if (r == 0) result = Py_NewRef(Py_None);
        return result;
    }
    if ((r = get_ints(o_lens, &lens)) <= 0 || lens.n != offs.n || skip < 0) {
        if (r >= 0) result = Py_NewRef(Py_None);
        goto done;
    }
    if (get_buf(o_region, &region, 0, 0, "region") < 0)
        goto done;
    Py_ssize_t k = offs.n;
    uint64_t bytes = 0, longest = 0;
    if (!frames_inside(&offs, &lens, 0, k, skip, region.view.len, &bytes)) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    for (Py_ssize_t i = 0; i < k; i++) {
        uint64_t n = 0;
        (void)int_at(&lens, i, &n);
        if (n > longest) longest = n;
    }
    if (!checksum && longest && !(scratch = PyMem_RawMalloc((size_t)longest))) {
        PyErr_NoMemory();
        goto done;
    }
    {
        const uint8_t *src = region.view.buf;
        unsigned long long sum = 0;
        volatile uint8_t sink = 0;
        PyThreadState *ts = bytes >= NOGIL_BYTES ? PyEval_SaveThread() : NULL;
        for (Py_ssize_t i = 0; i < k; i++) {
            uint64_t o = 0, n = 0;
            (void)int_at(&offs, i, &o);
            (void)int_at(&lens, i, &n);
            if (checksum) {
                sum += adler32(src + o + skip, (size_t)(n - skip));
            } else if (n > (uint64_t)skip) {
                memcpy(scratch, src + o + skip, (size_t)(n - skip));
                sink ^= scratch[n - skip - 1];
            }
        }
        if (ts)
            PyEval_RestoreThread(ts);
        (void)sink;
        result = PyLong_FromUnsignedLongLong(sum);
    }
done:
    PyMem_RawFree(scratch);
    rel(&region); rel(&offs.b); rel(&lens.b);
    return result;
}

/* ========================================================= the per-chain API
 *
 * SplitQueue/PackedQueue.pop, `for chain in queue` and add_used, one chain at a
 * time. The queue's state (next avail, wrap counters, ...) stays in its own
 * Python slots, shared with the pure path: a ChainRing records where each slot
 * lives (the member descriptors' offsets) and reads and writes them in place.
 * It holds what does not change while the queue lives: its ring areas (buffer
 * exports, given back by release()), the regions' (start, span, view) and the
 * DescriptorChain class with its slots.
 *
 * Any step that is not the plain case (a broken avail index, a bad head or id,
 * a chain that must raise, a buffer across two regions, a dirty log) is handed
 * to the queue's own Python method for that step (_avail_count, _walk, _single),
 * which does it or raises exactly as the pure path does; nothing is written
 * before that hand-over that the pure path would not have written too.
 */

#if PY_VERSION_HEX >= 0x030C0000
#define CHAIN_T_OBJECT_EX Py_T_OBJECT_EX
#define CHAIN_READONLY Py_READONLY
#else
#include <structmember.h>
#define CHAIN_T_OBJECT_EX T_OBJECT_EX
#define CHAIN_READONLY READONLY
#endif

#define WSINGLE (1u << 16)  /* packed _counts: one writable descriptor, in _waddr/_wlen */
#define MAX_QSLOTS 10

/* Slots of the queue classes, in the order the Python side names them. */
enum { S_NEXT_AVAIL, S_AVAIL_SHADOW, S_NEXT_USED, S_INDIRECT, S_LOG, S_NSLOTS };
enum { P_NEXT_AVAIL, P_AVAIL_WRAP, P_NEXT_USED, P_USED_WRAP, P_SINCE_SIGNAL, P_INDIRECT, P_LOG,
       P_WLOG, P_FRESH_HEADS, P_NSLOTS };
/* Slots of DescriptorChain, in the order of its constructor. */
enum { C_HEAD, C_READABLE, C_WRITABLE, C_RLEN, C_WLEN, C_NSLOTS };

typedef struct {
    PyObject_HEAD
    int packed;
    int busy;              /* calls running: release() waits for the last one */
    int release_pending;
    int released;
    Py_ssize_t size;
    PyTypeObject *qtype;   /* the queue class whose slots qoff names */
    Py_ssize_t qoff[MAX_QSLOTS];
    PyTypeObject *ctype;   /* DescriptorChain */
    Py_ssize_t coff[C_NSLOTS];
    buf_t desc, avail, used;          /* split rings (avail, used unused when packed) */
    buf_t counts, waddr, wlen;        /* packed in-flight tables (the queue's own arrays) */
    Py_ssize_t nreg, primary;
    uint64_t *start, *span;           /* per region: first address, bytes (span < 2^63) */
    PyObject *views;                  /* tuple: per region, a 1-D byte memoryview */
} ring_t;

#define QSLOT(r, q, i) (*(PyObject **)((char *)(q) + (r)->qoff[i]))

static PyObject *str_walk, *str_buffers, *str_avail_count;

/* The offsets of the T_OBJECT_EX member descriptors ``names`` of ``cls`` into off. */
static int slot_offsets(PyTypeObject *cls, PyObject *names, Py_ssize_t *off, Py_ssize_t n) {
    if (!PyTuple_Check(names) || PyTuple_GET_SIZE(names) != n) {
        PyErr_Format(PyExc_ValueError, "%s: expected a tuple of %zd slot names", cls->tp_name, n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *d = PyObject_GetAttr((PyObject *)cls, PyTuple_GET_ITEM(names, i));
        if (!d)
            return -1;
        int ok = Py_IS_TYPE(d, &PyMemberDescr_Type) &&
                 ((PyMemberDescrObject *)d)->d_member->type == CHAIN_T_OBJECT_EX &&
                 !(((PyMemberDescrObject *)d)->d_member->flags & CHAIN_READONLY) &&
                 PyType_IsSubtype(cls, PyDescr_TYPE(d));
        if (ok)
            off[i] = ((PyMemberDescrObject *)d)->d_member->offset;
        Py_DECREF(d);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "%s.%U is not a writable object slot", cls->tp_name,
                         PyTuple_GET_ITEM(names, i));
            return -1;
        }
    }
    return 0;
}

/* A small non-negative int slot (a ring index, a flag); -1 if it is not one. */
static inline long slot_index(ring_t *r, PyObject *q, int i) {
    PyObject *v = QSLOT(r, q, i);
    if (!v || !PyLong_CheckExact(v))
        return -1;
    long x = PyLong_AsLong(v);
    if (x < 0 || x > 0xFFFF) {
        PyErr_Clear();
        return -1;
    }
    return x;
}

/* A flag slot's truth; -1 with AttributeError (as the pure path's read) if it is unset. */
static inline int slot_true(ring_t *r, PyObject *q, int i) {
    PyObject *v = QSLOT(r, q, i);
    if (!v) {
        PyErr_SetString(PyExc_AttributeError, "queue state slot is not set");
        return -1;
    }
    return PyObject_IsTrue(v);
}

static inline int slot_set(ring_t *r, PyObject *q, int i, long long v) {
    PyObject *o = PyLong_FromLongLong(v);
    if (!o)
        return -1;
    Py_XSETREF(QSLOT(r, q, i), o);
    return 0;
}

/* An int argument in [0, bound]; -1 if it is anything else (the pure path decides). */
static inline long long arg_in(PyObject *v, long long bound) {
    if (!PyLong_CheckExact(v))
        return -1;
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow || x < 0 || x > bound) {
        PyErr_Clear();
        return -1;
    }
    return x;
}

/* Whether [addr, addr+len) lies inside [start, start+span) (no arithmetic can wrap). */
static inline int fits(uint64_t start, uint64_t span, uint64_t addr, uint64_t len) {
    return addr >= start && addr - start <= span && len <= span - (addr - start);
}

/* The region holding the whole of [addr, addr+len): the largest region first (the
 * pure path's inline check), then the first region holding addr, in address order
 * (AddressSpace.pieces); -1 when the buffer is not inside one region. */
static Py_ssize_t locate_one(const ring_t *r, uint64_t addr, uint64_t len, uint64_t *off) {
    Py_ssize_t p = r->primary;
    if (p >= 0 && fits(r->start[p], r->span[p], addr, len)) {
        *off = addr - r->start[p];
        return p;
    }
    for (Py_ssize_t i = 0; i < r->nreg; i++) {
        if (addr >= r->start[i] && addr - r->start[i] < r->span[i]) {
            if (len > r->span[i] - (addr - r->start[i]))
                return -1;
            *off = addr - r->start[i];
            return i;
        }
    }
    return -1;
}

/* The first region, in address order, holding the whole of [addr, addr+len)
 * (AddressSpace.view, where indirect tables are looked up); -1 if none. */
static Py_ssize_t locate_table(const ring_t *r, uint64_t addr, uint64_t len, uint64_t *off) {
    for (Py_ssize_t i = 0; i < r->nreg; i++) {
        if (fits(r->start[i], r->span[i], addr, len)) {
            *off = addr - r->start[i];
            return i;
        }
    }
    return -1;
}

/* view[off:off+len] of region reg: a new memoryview sharing the region's buffer, as
 * slicing makes it (ValueError, like slicing, if the region's view was released). */
static PyObject *region_slice(const ring_t *r, Py_ssize_t reg, uint64_t off, uint64_t len) {
    PyObject *mv = PyMemoryView_FromObject(PyTuple_GET_ITEM(r->views, reg));
    if (!mv)
        return NULL;
    Py_buffer *b = PyMemoryView_GET_BUFFER(mv);
    /* the span never exceeds the view (checked when the ring was built) */
    b->buf = (char *)b->buf + off;
    b->len = (Py_ssize_t)len;
    b->shape[0] = (Py_ssize_t)len;
    return mv;
}

/* A DescriptorChain with its slots filled (steals every reference, NULL ones too). */
static PyObject *new_chain(const ring_t *r, PyObject *head, PyObject *readable,
                           PyObject *writable, PyObject *rlen, PyObject *wlen) {
    PyObject *parts[C_NSLOTS] = {head, readable, writable, rlen, wlen};
    PyObject *c = NULL;
    int ok = head && readable && writable && rlen && wlen;
    if (ok)
        c = r->ctype->tp_alloc(r->ctype, 0);
    for (int i = 0; i < C_NSLOTS; i++) {
        if (c)
            *(PyObject **)((char *)c + r->coff[i]) = parts[i];
        else
            Py_XDECREF(parts[i]);
    }
    return c;
}

/* One direct descriptor as a chain of one buffer: (view,) on its side, () on the other. */
static PyObject *single_chain(const ring_t *r, unsigned long id, int writable, Py_ssize_t reg,
                              uint64_t off, uint32_t len) {
    PyObject *mv = region_slice(r, reg, off, len);
    if (!mv)
        return NULL;
    PyObject *one = PyTuple_Pack(1, mv);
    Py_DECREF(mv);
    if (!one)
        return NULL;
    PyObject *empty = PyTuple_New(0);
    PyObject *zero = PyLong_FromLong(0), *n = PyLong_FromUnsignedLong(len);
    return writable ? new_chain(r, PyLong_FromUnsignedLong(id), empty, one, zero, n)
                    : new_chain(r, PyLong_FromUnsignedLong(id), one, empty, n, zero);
}

/* The buffers of a chain being walked: device-readable views, then writable ones
 * (and, for a packed ring, the (gpa, len) of each writable one, for the dirty log). */
typedef struct {
    PyObject *readable, *writable, *wgpas;
    uint64_t rlen, wlen;
    int seen_write;
} walk_t;

/* Add one direct descriptor to w: 1 done, 0 hand over to the pure walk, -1 error. */
static int walk_add(const ring_t *r, walk_t *w, uint16_t fl, uint64_t addr, uint32_t len) {
    PyObject **list;
    if (fl & F_WRITE) {
        w->seen_write = 1;
        list = &w->writable;
        w->wlen += len;
    } else {
        if (w->seen_write)
            return 0; /* device-readable after writable */
        list = &w->readable;
        w->rlen += len;
    }
    if (!len)
        return 1;
    uint64_t off = 0;
    Py_ssize_t reg = locate_one(r, addr, len, &off);
    if (reg < 0)
        return 0; /* across regions (pieces) or outside memory */
    PyObject *mv = region_slice(r, reg, off, len);
    if (!mv)
        return -1;
    int rc = PyList_Append(*list, mv);
    Py_DECREF(mv);
    if (rc == 0 && w->wgpas && (fl & F_WRITE)) {
        PyObject *gpa = Py_BuildValue("(Kk)", (unsigned long long)addr, (unsigned long)len);
        rc = gpa ? PyList_Append(w->wgpas, gpa) : -1;
        Py_XDECREF(gpa);
    }
    return rc < 0 ? -1 : 1;
}

/* The chain of w, or NULL (error set) / Py_None (hand over) when it is not plain. */
static PyObject *walk_done(const ring_t *r, walk_t *w, unsigned long id) {
    if (w->rlen + w->wlen > 0xFFFFFFFFu) {
        Py_CLEAR(w->readable);
        Py_CLEAR(w->writable);
        return Py_NewRef(Py_None);
    }
    PyObject *c = new_chain(r, PyLong_FromUnsignedLong(id), w->readable, w->writable,
                            PyLong_FromUnsignedLongLong(w->rlen),
                            PyLong_FromUnsignedLongLong(w->wlen));
    w->readable = w->writable = NULL;
    return c;
}

/* SplitQueue._walk(head) for a chain that is valid and inside memory: the chain,
 * Py_None to hand over to the pure walk (it raises or splits buffers), NULL on error.
 * Every loop is bounded by the queue size or the indirect table's entries. */
static PyObject *split_walk(const ring_t *r, PyObject *q, uint16_t head) {
    const uint8_t *table = r->desc.view.buf;
    PyObject *table_mv = NULL, *result = NULL;
    Py_ssize_t limit = r->size, idx = head, count = 0;
    int indirect = 0, indirect_ok = -1;
    walk_t w = {PyList_New(0), PyList_New(0), NULL, 0, 0, 0};
    if (!w.readable || !w.writable)
        goto done;
    for (;;) {
        if (++count > limit)
            goto hand_over; /* a loop */
        uint64_t addr = ld64(table + 16 * idx), word = ld64(table + 16 * idx + 8);
        uint32_t len = (uint32_t)word;
        uint16_t fl = (uint16_t)(word >> 32);
        if (fl & F_INDIRECT) {
            if (indirect_ok < 0 && (indirect_ok = slot_true(r, q, S_INDIRECT)) < 0)
                goto done;
            if (indirect || !indirect_ok || (fl & F_NEXT) || len == 0 || len % 16 ||
                len / 16 > (uint32_t)r->size)
                goto hand_over;
            uint64_t off = 0;
            Py_ssize_t reg = locate_table(r, addr, len, &off);
            if (reg < 0)
                goto hand_over;
            /* a view of its own keeps the table mapped while it is read */
            if (!(table_mv = region_slice(r, reg, off, len)))
                goto done;
            table = PyMemoryView_GET_BUFFER(table_mv)->buf;
            indirect = 1;
            limit = len / 16;
            idx = count = 0;
            continue;
        }
        int rc = walk_add(r, &w, fl, addr, len);
        if (rc < 0)
            goto done;
        if (rc == 0)
            goto hand_over;
        if (!(fl & F_NEXT))
            break;
        idx = (Py_ssize_t)(word >> 48);
        if (idx >= limit)
            goto hand_over;
    }
    result = walk_done(r, &w, head);
    goto done;
hand_over:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(w.readable);
    Py_XDECREF(w.writable);
    Py_XDECREF(table_mv);
    return result;
}

/* SplitQueue.pop: the next chain, NULL with no error set when the ring is empty. */
static PyObject *split_next(ring_t *r, PyObject *q) {
    long na = slot_index(r, q, S_NEXT_AVAIL), shadow = slot_index(r, q, S_AVAIL_SHADOW);
    long nu = slot_index(r, q, S_NEXT_USED);
    if (na < 0 || shadow < 0 || nu < 0) {
        PyErr_SetString(PyExc_RuntimeError, "split queue state is not a ring index");
        return NULL;
    }
    const uint8_t *av = r->avail.view.buf;
    Py_ssize_t size = r->size;
    if (na == shadow) {
        uint16_t ai = __atomic_load_n((const uint16_t *)(av + 2), __ATOMIC_ACQUIRE);
        long n = (ai - na) & 0xFFFF;
        if (n > size || ((na - nu) & 0xFFFF) > size) {
            /* a broken ring: the pure check raises (or finds it fixed meanwhile) */
            PyObject *got = PyObject_CallMethodNoArgs(q, str_avail_count);
            if (!got)
                return NULL;
            int empty = !PyObject_IsTrue(got);
            Py_DECREF(got);
            if (empty)
                return NULL;
        } else {
            if (slot_set(r, q, S_AVAIL_SHADOW, ai) < 0)
                return NULL;
            if (!n)
                return NULL;
        }
    }
    uint16_t head = ld16(av + 4 + 2 * (na & (size - 1)));
    if (slot_set(r, q, S_NEXT_AVAIL, (na + 1) & 0xFFFF) < 0)
        return NULL;
    PyObject *c = Py_NewRef(Py_None); /* a head out of range: the pure walk raises */
    if (head < size) {
        const uint8_t *d = (const uint8_t *)r->desc.view.buf + 16 * head;
        uint64_t addr = ld64(d), word = ld64(d + 8);
        uint32_t len = (uint32_t)word;
        Py_ssize_t p = r->primary;
        if (!((word >> 32) & (F_NEXT | F_INDIRECT)) && len && p >= 0 &&
            fits(r->start[p], r->span[p], addr, len))
            return single_chain(r, head, (word >> 32) & F_WRITE, p, addr - r->start[p], len);
        Py_DECREF(c);
        c = split_walk(r, q, head);
    }
    if (c != Py_None)
        return c;
    Py_DECREF(c);
    PyObject *h = PyLong_FromLong(head);
    if (!h)
        return NULL;
    c = PyObject_CallMethodOneArg(q, str_walk, h); /* raises, or splits buffers */
    Py_DECREF(h);
    return c;
}

/* One descriptor of a packed chain, as PackedQueue._walk collects them. */
typedef struct {
    uint16_t fl;
    uint64_t addr;
    uint32_t len;
} pdesc_t;

/* PackedQueue._buffers(bid, descs) for a chain that is valid and inside memory: the
 * chain (its writable buffers recorded in _wlog), Py_None to hand over, NULL on error. */
static PyObject *packed_buffers(const ring_t *r, PyObject *q, uint16_t bid, const pdesc_t *descs,
                                Py_ssize_t n) {
    PyObject *table_mv = NULL, *result = NULL;
    const uint8_t *table = NULL;
    Py_ssize_t count = n;
    walk_t w = {PyList_New(0), PyList_New(0), PyList_New(0), 0, 0, 0};
    if (!w.readable || !w.writable || !w.wgpas)
        goto done;
    if (n == 1 && (descs[0].fl & F_INDIRECT)) {
        int ok = slot_true(r, q, P_INDIRECT);
        uint32_t len = descs[0].len;
        uint64_t off = 0;
        if (ok < 0)
            goto done;
        if (!ok || (descs[0].fl & F_NEXT) || len == 0 || len % 16 || len / 16 > (uint32_t)r->size)
            goto hand_over;
        Py_ssize_t reg = locate_table(r, descs[0].addr, len, &off);
        if (reg < 0)
            goto hand_over;
        if (!(table_mv = region_slice(r, reg, off, len))) /* keeps the table mapped */
            goto done;
        table = PyMemoryView_GET_BUFFER(table_mv)->buf;
        count = len / 16;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        pdesc_t d = table ? (pdesc_t){ld16(table + 16 * i + 14), ld64(table + 16 * i),
                                      ld32(table + 16 * i + 8)}
                          : descs[i];
        if (d.fl & F_INDIRECT)
            goto hand_over; /* nested, or INDIRECT in a chain */
        if (table)
            d.fl &= (uint16_t)~F_NEXT; /* a table is read in order, whatever its links */
        int rc = walk_add(r, &w, d.fl, d.addr, d.len);
        if (rc < 0)
            goto done;
        if (rc == 0)
            goto hand_over;
    }
    PyObject *wgpas = w.wgpas;
    w.wgpas = NULL;
    result = walk_done(r, &w, bid);
    if (result && result != Py_None && PyList_GET_SIZE(wgpas)) {
        PyObject *key = PyLong_FromLong(bid), *wlog = QSLOT(r, q, P_WLOG);
        if (!wlog)
            PyErr_SetString(PyExc_AttributeError, "queue state slot is not set");
        if (!key || !wlog || PyObject_SetItem(wlog, key, wgpas) < 0)
            Py_CLEAR(result);
        Py_XDECREF(key);
    }
    Py_DECREF(wgpas);
    if (result != Py_None)
        goto done;
    Py_CLEAR(result);
hand_over: {
    PyObject *list = PyList_New(n);
    for (Py_ssize_t i = 0; list && i < n; i++) {
        PyObject *t = Py_BuildValue("(iKk)", (int)descs[i].fl, (unsigned long long)descs[i].addr,
                                    (unsigned long)descs[i].len);
        if (!t)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, i, t);
    }
    PyObject *key = list ? PyLong_FromLong(bid) : NULL;
    if (key) /* nothing written yet but the in-flight count, which the pure walk sets too */
        result = PyObject_CallMethodObjArgs(q, str_buffers, key, list, NULL);
    Py_XDECREF(key);
    Py_XDECREF(list);
}
done:
    Py_XDECREF(w.readable);
    Py_XDECREF(w.writable);
    Py_XDECREF(w.wgpas);
    Py_XDECREF(table_mv);
    return result;
}

/* PackedQueue._walk from position p under wrap counter w (the first descriptor is
 * available): the chain, or the pure walk's answer when the chain must raise. The
 * descriptors are read once, the scan bounded by the queue size. */
static PyObject *packed_walk(ring_t *r, PyObject *q, long p, long w) {
    pdesc_t stack[64], *descs = stack;
    Py_ssize_t n = 0, size = r->size;
    uint16_t bid = 0;
    const uint8_t *dt = r->desc.view.buf;
    uint32_t *cn = r->counts.view.buf;
    PyObject *result = NULL;
    for (;;) {
        const uint8_t *d = dt + 16 * p;
        uint16_t fl = __atomic_load_n((const uint16_t *)(d + 14), __ATOMIC_ACQUIRE);
        if (((fl >> 7) & 1) != w || ((fl >> 15) & 1) == w)
            goto hand_over; /* continues into a descriptor that is not available */
        if (n == 64 && descs == stack) {
            if (!(descs = PyMem_Malloc(sizeof(pdesc_t) * size)))
                return PyErr_NoMemory();
            memcpy(descs, stack, sizeof(stack));
        }
        descs[n++] = (pdesc_t){fl, ld64(d), ld32(d + 8)};
        bid = ld16(d + 12);
        if (++p == size) {
            p = 0;
            w ^= 1;
        }
        if (!(fl & F_NEXT))
            break;
        if (n >= size)
            goto hand_over; /* longer than the ring */
    }
    if (cn[bid])
        goto hand_over; /* already in flight */
    if (slot_set(r, q, P_NEXT_AVAIL, p) < 0 || slot_set(r, q, P_AVAIL_WRAP, w) < 0)
        goto done;
    cn[bid] = (uint32_t)n;
    result = packed_buffers(r, q, bid, descs, n);
    goto done;
hand_over:
    result = PyObject_CallMethodNoArgs(q, str_walk); /* nothing consumed yet: it raises */
done:
    if (descs != stack)
        PyMem_Free(descs);
    return result;
}

/* PackedQueue.pop: the next chain, NULL with no error set when none is available. */
static PyObject *packed_next(ring_t *r, PyObject *q) {
    long p = slot_index(r, q, P_NEXT_AVAIL), w = slot_index(r, q, P_AVAIL_WRAP);
    if (p < 0 || p >= r->size || w < 0 || w > 1) {
        PyErr_SetString(PyExc_RuntimeError, "packed queue state is not a ring position");
        return NULL;
    }
    uint8_t *d = (uint8_t *)r->desc.view.buf + 16 * p;
    uint16_t fl = __atomic_load_n((uint16_t *)(d + 14), __ATOMIC_ACQUIRE);
    if (((fl >> 7) & 1) != w || ((fl >> 15) & 1) == w)
        return NULL;
    if (fl & (F_NEXT | F_INDIRECT)) /* a longer chain, or an indirect table */
        return packed_walk(r, q, p, w);
    uint64_t x = ld64(d + 8), addr = ld64(d);
    if (++p == r->size) {
        p = 0;
        if (slot_set(r, q, P_AVAIL_WRAP, w ^ 1) < 0)
            return NULL;
    }
    if (slot_set(r, q, P_NEXT_AVAIL, p) < 0)
        return NULL;
    uint32_t len = (uint32_t)x;
    uint16_t bid = (uint16_t)(x >> 32);
    uint32_t *cn = r->counts.view.buf;
    Py_ssize_t reg = r->primary;
    if (cn[bid] || !len || reg < 0 || !fits(r->start[reg], r->span[reg], addr, len))
        /* in flight, empty or not in the largest region: the pure step decides */
        return PyObject_CallMethod(q, "_single", "iKkk", (int)fl, (unsigned long long)addr,
                                   (unsigned long)len, (unsigned long)bid);
    PyObject *c = single_chain(r, bid, fl & F_WRITE, reg, addr - r->start[reg], len);
    if (c) {
        if (fl & F_WRITE) {
            cn[bid] = 1 | WSINGLE;
            ((uint64_t *)r->waddr.view.buf)[bid] = addr;
            ((uint32_t *)r->wlen.view.buf)[bid] = len;
        } else {
            cn[bid] = 1;
        }
    }
    return c;
}

static void ring_release_buffers(ring_t *r) {
    rel(&r->desc); rel(&r->avail); rel(&r->used);
    rel(&r->counts); rel(&r->waddr); rel(&r->wlen);
    r->released = 1;
}

/* Start a call on queue q: 0, or -1 with an error set (q not ours, ring released). */
static int ring_enter(ring_t *r, PyObject *q) {
    if (!PyObject_TypeCheck(q, r->qtype)) {
        PyErr_Format(PyExc_TypeError, "expected a %s", r->qtype->tp_name);
        return -1;
    }
    if (r->released) {
        PyErr_SetString(PyExc_ValueError, "the queue's rings were released");
        return -1;
    }
    r->busy++;
    return 0;
}

static void ring_leave(ring_t *r) {
    if (--r->busy == 0 && r->release_pending)
        ring_release_buffers(r);
}

static PyObject *ring_next(ring_t *r, PyObject *q) {
    if (ring_enter(r, q) < 0)
        return NULL;
    PyObject *c = r->packed ? packed_next(r, q) : split_next(r, q);
    ring_leave(r);
    return c;
}

PyDoc_STRVAR(ring_pop_doc,
"pop(queue) -> DescriptorChain | None\n"
"\n"
"queue.pop(): the next available chain or None (VirtqError for a bad one, consumed).");

static PyObject *ring_pop(PyObject *self, PyObject *q) {
    PyObject *c = ring_next((ring_t *)self, q);
    if (!c && !PyErr_Occurred())
        Py_RETURN_NONE;
    return c;
}

PyDoc_STRVAR(ring_add_used_doc,
"add_used(queue, id, length) -> bool\n"
"\n"
"queue.add_used(id, length) for the plain case: an int id in range (split) or in\n"
"flight (packed), a 32-bit int length, no dirty log. False, nothing written, when\n"
"the pure path must decide.");

static PyObject *ring_add_used(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    ring_t *r = (ring_t *)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "add_used(queue, id, length)");
        return NULL;
    }
    PyObject *q = args[0];
    if (ring_enter(r, q) < 0)
        return NULL;
    PyObject *result = Py_False;
    long long id = arg_in(args[1], r->packed ? 0xFFFF : r->size - 1);
    long long len = arg_in(args[2], 0xFFFFFFFFLL);
    if (id < 0 || len < 0 || QSLOT(r, q, r->packed ? P_LOG : S_LOG) != Py_None)
        goto done;
    if (!r->packed) {
        long nu = slot_index(r, q, S_NEXT_USED);
        if (nu < 0)
            goto done;
        uint8_t *u = r->used.view.buf;
        st64(u + 4 + 8 * (nu & (r->size - 1)), (uint64_t)id | (uint64_t)len << 32);
        __atomic_store_n((uint16_t *)(u + 2), (uint16_t)(nu + 1), __ATOMIC_RELEASE);
        result = slot_set(r, q, S_NEXT_USED, (nu + 1) & 0xFFFF) < 0 ? NULL : Py_True;
        goto done;
    }
    PyObject *wlog = QSLOT(r, q, P_WLOG);
    long nu = slot_index(r, q, P_NEXT_USED), uw = slot_index(r, q, P_USED_WRAP);
    PyObject *since = QSLOT(r, q, P_SINCE_SIGNAL);
    uint32_t *cn = r->counts.view.buf;
    uint32_t c = cn[id] & 0xFFFF;
    if (!wlog || !PyDict_CheckExact(wlog) || nu < 0 || nu >= r->size ||
        uw < 0 || uw > 1 || !since || !PyLong_CheckExact(since) || !c)
        goto done;
    long long signalled = PyLong_AsLongLong(since);
    if (signalled == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        goto done;
    }
    cn[id] = 0;
    uint64_t word = (uint64_t)len | (uint64_t)id << 32 |
                    (uint64_t)((uw ? (F_AVAIL | F_USED) : 0) | (len ? F_WRITE : 0)) << 48;
    /* len, id and flags in one store: the flags word publishes the rest */
    __atomic_store_n((uint64_t *)((uint8_t *)r->desc.view.buf + 16 * nu + 8), word,
                     __ATOMIC_RELEASE);
    if (PyDict_GET_SIZE(wlog)) { /* forget what the buffer had writable (no log to mark) */
        PyObject *key = PyLong_FromLong((long)id);
        int has = key ? PyDict_Contains(wlog, key) : -1;
        if (has < 0 || (has && PyDict_DelItem(wlog, key) < 0)) {
            Py_XDECREF(key);
            result = NULL;
            goto done;
        }
        Py_DECREF(key);
    }
    long p = nu + (long)c;
    int wrapped = p >= r->size;
    if (wrapped) {
        p -= r->size;
        uw ^= 1;
    }
    result = Py_True;
    if (QSLOT(r, q, P_FRESH_HEADS) != Py_None) { /* the last burst is no longer whole */
        Py_INCREF(Py_None);
        Py_XSETREF(QSLOT(r, q, P_FRESH_HEADS), Py_None);
    }
    if (slot_set(r, q, P_NEXT_USED, p) < 0 ||
        (wrapped && slot_set(r, q, P_USED_WRAP, uw) < 0) ||
        slot_set(r, q, P_SINCE_SIGNAL, signalled + c) < 0)
        result = NULL;
done:
    ring_leave(r);
    return Py_XNewRef(result);
}

PyDoc_STRVAR(ring_release_doc,
"release()\n"
"\n"
"Give back the ring areas (queue.release()); the ring answers nothing afterwards.");

static PyObject *ring_release(PyObject *self, PyObject *unused) {
    ring_t *r = (ring_t *)self;
    if (r->busy)
        r->release_pending = 1; /* a call is running (a finalizer released the queue) */
    else
        ring_release_buffers(r);
    Py_RETURN_NONE;
}

/* `for chain in queue`: pops until the ring is empty; done after an error, as a
 * generator is. */
typedef struct {
    PyObject_HEAD
    PyObject *ring;
    PyObject *queue;
} chain_iter_t;

static PyTypeObject ChainIterType;

PyDoc_STRVAR(ring_iter_doc, "iter(queue) -> iterator of DescriptorChain (queue.__iter__).");

static PyObject *ring_iter(PyObject *self, PyObject *q) {
    ring_t *r = (ring_t *)self;
    if (!PyObject_TypeCheck(q, r->qtype)) {
        PyErr_Format(PyExc_TypeError, "expected a %s", r->qtype->tp_name);
        return NULL;
    }
    chain_iter_t *it = PyObject_New(chain_iter_t, &ChainIterType);
    if (!it)
        return NULL;
    it->ring = Py_NewRef(self);
    it->queue = Py_NewRef(q);
    return (PyObject *)it;
}

static PyObject *chain_iter_next(PyObject *self) {
    chain_iter_t *it = (chain_iter_t *)self;
    if (!it->queue)
        return NULL;
    PyObject *c = ring_next((ring_t *)it->ring, it->queue);
    if (!c)
        Py_CLEAR(it->queue); /* empty or raised: finished */
    return c;
}

static void chain_iter_dealloc(PyObject *self) {
    chain_iter_t *it = (chain_iter_t *)self;
    Py_XDECREF(it->ring);
    Py_XDECREF(it->queue);
    PyObject_Free(self);
}

static PyTypeObject ChainIterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vhsm._speedups.ChainIter",
    .tp_basicsize = sizeof(chain_iter_t),
    .tp_dealloc = chain_iter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Chains popped from a queue until it is empty.",
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = chain_iter_next,
};

static void ring_dealloc(PyObject *self) {
    ring_t *r = (ring_t *)self;
    ring_release_buffers(r);
    PyMem_Free(r->start);
    Py_XDECREF(r->views);
    Py_XDECREF(r->qtype);
    Py_XDECREF(r->ctype);
    PyObject_Free(self);
}

static PyMethodDef ring_methods[] = {
    {"pop", ring_pop, METH_O, ring_pop_doc},
    {"iter", ring_iter, METH_O, ring_iter_doc},
    {"add_used", (PyCFunction)(void (*)(void))ring_add_used, METH_FASTCALL, ring_add_used_doc},
    {"release", ring_release, METH_NOARGS, ring_release_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ChainRingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vhsm._speedups.ChainRing",
    .tp_basicsize = sizeof(ring_t),
    .tp_dealloc = ring_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The per-chain API of one split or packed queue (see chain_ring).",
    .tp_methods = ring_methods,
};

PyDoc_STRVAR(chain_ring_doc,
"chain_ring(queue, slots, chain_cls, chain_slots, size, desc, areas, regions, primary)\n"
"    -> ChainRing | None\n"
"\n"
"The per-chain API of queue (a SplitQueue or PackedQueue: slots names its state\n"
"slots, in the order this module expects). chain_cls is DescriptorChain and\n"
"chain_slots its slots in constructor order; desc the descriptor area; areas\n"
"(avail, used) for a split ring, (counts, waddr, wlen) for a packed one; regions\n"
"(start, span, view) per memory region in address order, primary the index of\n"
"the largest (-1: none). None when a region's view is not a plain byte view.");

static PyObject *chain_ring(PyObject *self, PyObject *args) {
    PyObject *q, *slots, *ccls, *cslots, *o_desc, *areas, *regions;
    Py_ssize_t size, primary;
    if (!PyArg_ParseTuple(args, "OO!O!O!nOO!O!n", &q, &PyTuple_Type, &slots, &PyType_Type, &ccls,
                          &PyTuple_Type, &cslots, &size, &o_desc, &PyTuple_Type, &areas,
                          &PyTuple_Type, &regions, &primary))
        return NULL;
    Py_ssize_t nslots = PyTuple_GET_SIZE(slots), nreg = PyTuple_GET_SIZE(regions);
    int packed = nslots == P_NSLOTS;
    if ((nslots != S_NSLOTS && !packed) || PyTuple_GET_SIZE(areas) != (packed ? 3 : 2) ||
        size < 1 || size > max_ring || (!packed && (size & (size - 1))) || primary < -1 ||
        primary >= nreg) {
        PyErr_SetString(PyExc_ValueError, "chain_ring: bad slots, areas, size or primary");
        return NULL;
    }
    ring_t *r = PyObject_New(ring_t, &ChainRingType);
    if (!r)
        return NULL;
    memset((char *)r + sizeof(PyObject), 0, sizeof(ring_t) - sizeof(PyObject));
    r->packed = packed;
    r->size = size;
    r->nreg = nreg;
    r->primary = primary;
    r->qtype = (PyTypeObject *)Py_NewRef(Py_TYPE(q));
    r->ctype = (PyTypeObject *)Py_NewRef(ccls);
    PyObject *views = PyTuple_New(nreg);
    r->views = views;
    r->start = PyMem_Calloc(2 * (nreg ? nreg : 1), sizeof(uint64_t));
    if (!views || !r->start) {
        PyErr_NoMemory();
        goto fail;
    }
    r->span = r->start + nreg;
    if (slot_offsets(r->qtype, slots, r->qoff, nslots) < 0 ||
        slot_offsets(r->ctype, cslots, r->coff, C_NSLOTS) < 0 ||
        get_buf(o_desc, &r->desc, 1, 16 * size, "desc") < 0)
        goto fail;
    if (packed ? (get_buf(PyTuple_GET_ITEM(areas, 0), &r->counts, 1, 4 * IDS, "counts") < 0 ||
                  get_buf(PyTuple_GET_ITEM(areas, 1), &r->waddr, 1, 8 * IDS, "waddr") < 0 ||
                  get_buf(PyTuple_GET_ITEM(areas, 2), &r->wlen, 1, 4 * IDS, "wlen") < 0)
               : (get_buf(PyTuple_GET_ITEM(areas, 0), &r->avail, 1, 4 + 2 * size, "avail") < 0 ||
                  get_buf(PyTuple_GET_ITEM(areas, 1), &r->used, 1, 4 + 8 * size, "used") < 0))
        goto fail;
    for (Py_ssize_t i = 0; i < nreg; i++) {
        PyObject *t = PyTuple_GET_ITEM(regions, i), *v;
        unsigned long long start, span;
        if (!PyArg_ParseTuple(t, "KKO!", &start, &span, &PyMemoryView_Type, &v))
            goto fail;
        Py_buffer *b = PyMemoryView_GET_BUFFER(v);
        const char *f = b->format ? b->format : "B";
        if (((PyMemoryViewObject *)v)->flags & _Py_MEMORYVIEW_RELEASED || b->ndim != 1 ||
            b->itemsize != 1 || strcmp(f, "B") || !b->strides || b->strides[0] != 1 ||
            b->suboffsets || span > (unsigned long long)b->len) {
            Py_DECREF(r);
            Py_RETURN_NONE; /* not a plain byte view: the pure path only */
        }
        r->start[i] = start;
        r->span[i] = span;
        PyTuple_SET_ITEM(views, i, Py_NewRef(v));
    }
    return (PyObject *)r;
fail:
    Py_DECREF(r);
    return NULL;
}

/* ------------------------------------------- the fused sink pass (split rings)
 *
 * One call does what NetBackend.handle_event does for a TX kick on an enabled
 * split ring in sink mode, on the pure path: disable kicks; pop every available
 * buffer (up to the pass budget), read each frame (copy or Adler-32), complete
 * them all with length 0; again while the ring has more; then the used-buffer
 * notification decision (event idx, flags, notify-on-empty) and the call
 * eventfd write; re-enable kicks and re-check. The GIL is released for the
 * whole pass, so queue pairs on separate workers run in parallel.
 *
 * It stops, with everything it did written back, and answers "fall back"
 * (status 2) before consuming a burst it does not handle the same way as the
 * fast pure path: an avail index too far ahead or a used ring that aliases
 * (the pure path then marks the ring broken), a head out of range, a chain or
 * an indirect descriptor, an empty or short buffer (runts are counted as
 * errors by the pure path), a buffer not inside one region. The pure loop
 * then goes on from there and does exactly what it would have done. */

enum { PASS_DONE = 0, PASS_YIELDED = 1, PASS_FALLBACK = 2, PASS_CALL_FAILED = 3 };
/* Rounds of the pass loop that take nothing (only a guest moving its avail index
 * back and forth gives those) before the pass ends as if yielded. */
#define PASS_IDLE_ROUNDS 2
#define SCRATCH_BYTES (64 * 1024)

static inline uint16_t vld16(const uint8_t *p) {
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED);
}
static inline void vst16(uint8_t *p, uint16_t v) {
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED);
}

typedef struct {
    const uint8_t *base; /* host address of the region's first byte */
    uint64_t start, span;
} region_t;

PyDoc_STRVAR(sink_split_doc,
"sink_split(avail, desc, used, bounds, views, size, next_avail, next_used,\n"
"           signalled, left, event_idx, notify_on_empty, call_fd, skip, checksum)\n"
"    -> (status, next_avail, next_used, avail_shadow, signalled, left,\n"
"        packets, bytes, checksum_sum, errno)\n"
"\n"
"The fused TX pass of the net sink on a split ring (see the section comment).\n"
"signalled is the used index of the last notification decision (-1: none).\n"
"status: 0 done, 1 stopped at the budget with work left (yielded), 2 fall back\n"
"to the pure loop from its top (state written back), 3 the call eventfd write\n"
"failed with errno (state written back, the pure path would raise OSError).\n"
"avail_shadow is -1 when no avail index was read.");

static PyObject *sink_split(PyObject *self, PyObject *args) {
    PyObject *o_avail, *o_desc, *o_used, *o_bounds, *o_views;
    Py_ssize_t size, na, nu, signalled, left, skip;
    int event_idx, notify_on_empty, call_fd, checksum;
    if (!PyArg_ParseTuple(args, "OOOOOnnnnnppinp", &o_avail, &o_desc, &o_used, &o_bounds,
                          &o_views, &size, &na, &nu, &signalled, &left, &event_idx,
                          &notify_on_empty, &call_fd, &skip, &checksum))
        return NULL;
    if (size < 1 || size > max_ring || (size & (size - 1)) || na < 0 || na > 0xFFFF || nu < 0 ||
        nu > 0xFFFF || signalled < -1 || signalled > 0xFFFF || skip < 0 || skip > 0xFFFF ||
        !PyTuple_Check(o_views)) {
        PyErr_SetString(PyExc_ValueError, "sink_split: bad size, index, skip or views");
        return NULL;
    }
    buf_t avail = {0}, desc = {0}, used = {0}, bounds = {0};
    buf_t *views = NULL;
    region_t *regs = NULL;
    uint8_t *scratch = NULL;
    uint16_t *heads = NULL;
    uint64_t *where = NULL; /* per entry: host address of the frame */
    uint32_t *lens = NULL;
    Py_ssize_t nreg = PyTuple_GET_SIZE(o_views), held = 0;
    PyObject *result = NULL;
    if (get_buf(o_avail, &avail, 0, 6 + 2 * size, "avail") < 0 ||
        get_buf(o_desc, &desc, 0, 16 * size, "desc") < 0 ||
        get_buf(o_used, &used, 1, 6 + 8 * size, "used") < 0 ||
        get_buf(o_bounds, &bounds, 0, 16 * nreg, "bounds") < 0)
        goto done;
    views = PyMem_Calloc(nreg ? nreg : 1, sizeof(buf_t));
    regs = PyMem_Calloc(nreg ? nreg : 1, sizeof(region_t));
    heads = PyMem_Malloc(sizeof(uint16_t) * size);
    where = PyMem_Malloc(sizeof(uint64_t) * size);
    lens = PyMem_Malloc(sizeof(uint32_t) * size);
    if (!checksum)
        scratch = PyMem_Malloc(SCRATCH_BYTES);
    if (!views || !regs || !heads || !where || !lens || (!checksum && !scratch)) {
        PyErr_NoMemory();
        goto done;
    }
    {
        const uint64_t *bd = bounds.view.buf;
        for (; held < nreg; held++) {
            if (get_buf(PyTuple_GET_ITEM(o_views, held), &views[held], 0, 0, "view") < 0)
                goto done;
            regs[held].base = views[held].view.buf;
            regs[held].start = bd[2 * held];
            uint64_t span = bd[2 * held + 1] - bd[2 * held];
            /* never past the view (bounds come from it; a mismatch makes the region unusable) */
            regs[held].span = bd[2 * held + 1] < bd[2 * held] ? 0
                              : span > (uint64_t)views[held].view.len ? 0 : span;
        }
    }
    {
        const uint8_t *av = avail.view.buf, *dt = desc.view.buf;
        uint8_t *us = used.view.buf;
        const Py_ssize_t mask = size - 1;
        const uint16_t nflag = 1; /* VRING_USED_F_NO_NOTIFY */
        int status = PASS_DONE, err = 0, idle = 0;
        Py_ssize_t shadow = -1, last = 0;
        unsigned long long packets = 0, bytes = 0, sum = 0;
        volatile uint8_t sink = 0;
        PyThreadState *ts = PyEval_SaveThread();
        for (;;) {
            int took = 0;
            if (!event_idx && vld16(us) != nflag) /* disable_notification */
                vst16(us, nflag);
            for (;;) { /* the sink: bursts until the ring is empty or the budget used */
                if (left <= 0) {
                    status = PASS_YIELDED;
                    break;
                }
                uint16_t ai = __atomic_load_n((const uint16_t *)(av + 2), __ATOMIC_ACQUIRE);
                Py_ssize_t n = (ai - na) & 0xFFFF;
                if (n > size || ((na - nu) & 0xFFFF) > size) {
                    status = PASS_FALLBACK; /* the pure path marks the ring broken */
                    goto out;
                }
                shadow = ai;
                if (n > left)
                    n = left;
                if (!n)
                    break;
                for (Py_ssize_t i = 0; i < n; i++) {
                    uint16_t h = ld16(av + 4 + 2 * ((na + i) & mask));
                    if (h >= size) {
                        status = PASS_FALLBACK;
                        goto out;
                    }
                    const uint8_t *d = dt + 16 * (Py_ssize_t)h;
                    uint64_t addr = ld64(d); /* each field read once: the checks hold */
                    uint32_t ln = ld32(d + 8);
                    uint16_t fl = ld16(d + 12);
                    if ((fl & (F_NEXT | F_INDIRECT)) || ln == 0 || ln < (uint64_t)skip) {
                        status = PASS_FALLBACK;
                        goto out;
                    }
                    const region_t *r = &regs[last];
                    if (last >= nreg || addr - r->start >= r->span ||
                        ln > r->span - (addr - r->start)) {
                        Py_ssize_t k = 0;
                        for (; k < nreg; k++) {
                            r = &regs[k];
                            if (addr - r->start < r->span && ln <= r->span - (addr - r->start))
                                break;
                        }
                        if (k == nreg) {
                            status = PASS_FALLBACK; /* outside memory or across regions */
                            goto out;
                        }
                        last = k;
                    }
                    heads[i] = h;
                    where[i] = (uint64_t)(uintptr_t)(r->base + (addr - r->start));
                    lens[i] = ln;
                }
                /* consumed: read every frame, then give the buffers back */
                for (Py_ssize_t i = 0; i < n; i++) {
                    const uint8_t *src = (const uint8_t *)(uintptr_t)where[i] + skip;
                    size_t m = lens[i] - (size_t)skip;
                    bytes += m;
                    if (checksum) {
                        sum += adler32(src, m);
                    } else {
                        while (m) {
                            size_t t = m < SCRATCH_BYTES ? m : SCRATCH_BYTES;
                            memcpy(scratch, src, t);
                            sink ^= scratch[t - 1];
                            src += t;
                            m -= t;
                        }
                    }
                }
                packets += (unsigned long long)n;
                for (Py_ssize_t i = 0; i < n; i++)
                    st64(us + 4 + 8 * ((nu + i) & mask), heads[i]); /* id, length 0 */
                na = (na + n) & 0xFFFF;
                nu = (nu + n) & 0xFFFF;
                __atomic_store_n((uint16_t *)(us + 2), (uint16_t)nu, __ATOMIC_RELEASE);
                left -= n;
                took = 1;
                if (__atomic_load_n((const uint16_t *)(av + 2), __ATOMIC_ACQUIRE) == na)
                    break; /* has_available */
            }
            /* signal_used_queue: the driver's suppression decides */
            int notify = 0;
            if (signalled != nu) {
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
                if (event_idx) {
                    if (signalled < 0) {
                        notify = 1;
                    } else {
                        uint16_t event = vld16(av + 4 + 2 * size);
                        notify = ((nu - event - 1) & 0xFFFF) < ((nu - signalled) & 0xFFFF);
                    }
                } else {
                    notify = !(vld16(av) & 1); /* VRING_AVAIL_F_NO_INTERRUPT */
                }
            }
            signalled = nu;
            if (!notify && notify_on_empty && vld16(av + 2) == na)
                notify = 1;
            if (notify && call_fd >= 0) {
                uint64_t one = 1;
                ssize_t w;
                do
                    w = write(call_fd, &one, 8);
                while (w < 0 && errno == EINTR);
                if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
                    err = errno;
                    status = PASS_CALL_FAILED;
                    goto out;
                }
            }
            /* enable_notification: re-arm kicks, then re-check (at the budget too) */
            if (event_idx)
                vst16(us + 4 + 8 * size, (uint16_t)na);
            else if (vld16(us) != 0)
                vst16(us, 0);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (vld16(av + 2) == na)
                break;
            if (left <= 0) {
                status = PASS_YIELDED;
                break;
            }
            if (!took && ++idle >= PASS_IDLE_ROUNDS) {
                status = PASS_YIELDED; /* come back later: the index moves back and forth */
                break;
            }
        }
    out:
        PyEval_RestoreThread(ts);
        (void)sink;
        result = Py_BuildValue("innnnnKKKi", status, na, nu, shadow, signalled, left, packets,
                               bytes, sum, err);
    }
done:
    for (Py_ssize_t i = 0; i < held; i++)
        rel(&views[i]);
    PyMem_Free(views); PyMem_Free(regs); PyMem_Free(heads); PyMem_Free(where);
    PyMem_Free(lens); PyMem_Free(scratch);
    rel(&avail); rel(&desc); rel(&used); rel(&bounds);
    return result;
}

/* ------------------------------------------ the fused sink pass (packed rings)
 *
 * The same pass on a packed ring: the run of available one-descriptor buffers
 * from the next avail position (flags against the wrap counter, as packed_run),
 * checked as PackedQueue._simple checks it (lengths, ids neither in flight nor
 * repeated, every buffer inside one region), read, and completed at once with
 * used descriptors written in ring order, the first one's flags word last. The
 * ids never become "in flight" outside the call: they are completed before the
 * lock is released, so the in-flight counts are only read. A longer chain at
 * the next position, or anything the checks refuse, ends the pass with "fall
 * back" before it is consumed. */

static inline int packed_ready(const uint8_t *dt, Py_ssize_t p, int w) {
    uint16_t fl = __atomic_load_n((const uint16_t *)(dt + 16 * p + 14), __ATOMIC_ACQUIRE);
    return ((fl >> 7) & 1) == w && ((fl >> 15) & 1) != w;
}

PyDoc_STRVAR(sink_packed_doc,
"sink_packed(desc, driver, device, counts, scratch, bounds, views, size, next_avail,\n"
"            avail_wrap, next_used, used_wrap, since_signal, left, event_idx, call_fd,\n"
"            skip, checksum)\n"
"    -> (status, next_avail, avail_wrap, next_used, used_wrap, since_signal, left,\n"
"        packets, bytes, checksum_sum, errno)\n"
"\n"
"The fused TX pass of the net sink on a packed ring (statuses as sink_split).\n"
"counts are the queue's in-flight counts (read only), scratch its 65536-entry\n"
"uint32 scratch for repeated ids.");

static PyObject *sink_packed(PyObject *self, PyObject *args) {
    PyObject *o_desc, *o_driver, *o_device, *o_counts, *o_scratch, *o_bounds, *o_views;
    Py_ssize_t size, na, nu, left, skip;
    long long since;
    int aw, uw, event_idx, call_fd, checksum;
    if (!PyArg_ParseTuple(args, "OOOOOOOnnpnpLnpinp", &o_desc, &o_driver, &o_device, &o_counts,
                          &o_scratch, &o_bounds, &o_views, &size, &na, &aw, &nu, &uw, &since,
                          &left, &event_idx, &call_fd, &skip, &checksum))
        return NULL;
    if (size < 1 || size > max_ring || na < 0 || na >= size || nu < 0 || nu >= size || skip < 0 ||
        skip > 0xFFFF || !PyTuple_Check(o_views)) {
        PyErr_SetString(PyExc_ValueError, "sink_packed: bad size, position, skip or views");
        return NULL;
    }
    buf_t desc = {0}, driver = {0}, device = {0}, counts = {0}, scr = {0}, bounds = {0};
    buf_t *views = NULL;
    region_t *regs = NULL;
    uint8_t *scratch = NULL;
    uint16_t *ids = NULL;
    uint64_t *where = NULL;
    uint32_t *lens = NULL;
    Py_ssize_t nreg = PyTuple_GET_SIZE(o_views), held = 0;
    PyObject *result = NULL;
    if (get_buf(o_desc, &desc, 1, 16 * size, "desc") < 0 ||
        get_buf(o_driver, &driver, 0, 4, "driver") < 0 ||
        get_buf(o_device, &device, 1, 4, "device") < 0 ||
        get_buf(o_counts, &counts, 0, 4 * IDS, "counts") < 0 ||
        get_buf(o_scratch, &scr, 1, 4 * IDS, "scratch") < 0 ||
        get_buf(o_bounds, &bounds, 0, 16 * nreg, "bounds") < 0)
        goto done;
    views = PyMem_Calloc(nreg ? nreg : 1, sizeof(buf_t));
    regs = PyMem_Calloc(nreg ? nreg : 1, sizeof(region_t));
    ids = PyMem_Malloc(sizeof(uint16_t) * size);
    where = PyMem_Malloc(sizeof(uint64_t) * size);
    lens = PyMem_Malloc(sizeof(uint32_t) * size);
    if (!checksum)
        scratch = PyMem_Malloc(SCRATCH_BYTES);
    if (!views || !regs || !ids || !where || !lens || (!checksum && !scratch)) {
        PyErr_NoMemory();
        goto done;
    }
    {
        const uint64_t *bd = bounds.view.buf;
        for (; held < nreg; held++) {
            if (get_buf(PyTuple_GET_ITEM(o_views, held), &views[held], 0, 0, "view") < 0)
                goto done;
            regs[held].base = views[held].view.buf;
            regs[held].start = bd[2 * held];
            uint64_t span = bd[2 * held + 1] - bd[2 * held];
            regs[held].span = bd[2 * held + 1] < bd[2 * held] ? 0
                              : span > (uint64_t)views[held].view.len ? 0 : span;
        }
    }
    {
        uint8_t *dt = desc.view.buf, *dev = device.view.buf;
        const uint8_t *drv = driver.view.buf;
        const uint32_t *cn = counts.view.buf;
        uint32_t *sc = scr.view.buf;
        int status = PASS_DONE, err = 0, idle = 0;
        Py_ssize_t last = 0;
        unsigned long long packets = 0, bytes = 0, sum = 0;
        volatile uint8_t sink = 0;
        PyThreadState *ts = PyEval_SaveThread();
        for (;;) {
            int took = 0;
            if (vld16(dev + 2) != 1) /* disable_notification: RING_EVENT_FLAGS_DISABLE */
                vst16(dev + 2, 1);
            for (;;) {
                if (left <= 0) {
                    status = PASS_YIELDED;
                    break;
                }
                Py_ssize_t limit = left < size ? left : size, k = 0, p = na;
                int w = aw;
                uint16_t want = w ? F_AVAIL : F_USED;
                while (k < limit) {
                    const uint8_t *d = dt + 16 * p;
                    uint16_t fl = __atomic_load_n((const uint16_t *)(d + 14), __ATOMIC_ACQUIRE);
                    if ((fl & (F_AVAIL | F_USED | F_NEXT | F_INDIRECT)) != want)
                        break;
                    uint64_t addr = ld64(d);
                    uint32_t ln = ld32(d + 8);
                    uint16_t id = ld16(d + 12);
                    if (ln == 0 || ln < (uint64_t)skip || (cn[id] & 0xFFFF)) {
                        status = PASS_FALLBACK; /* empty, runt or in flight: the pure path */
                        goto out;
                    }
                    const region_t *r = &regs[last];
                    if (last >= nreg || addr - r->start >= r->span ||
                        ln > r->span - (addr - r->start)) {
                        Py_ssize_t j = 0;
                        for (; j < nreg; j++) {
                            r = &regs[j];
                            if (addr - r->start < r->span && ln <= r->span - (addr - r->start))
                                break;
                        }
                        if (j == nreg) {
                            status = PASS_FALLBACK;
                            goto out;
                        }
                        last = j;
                    }
                    ids[k] = id;
                    where[k] = (uint64_t)(uintptr_t)(r->base + (addr - r->start));
                    lens[k] = ln;
                    k++;
                    if (++p == size) {
                        p = 0;
                        w ^= 1;
                        want = w ? F_AVAIL : F_USED;
                    }
                }
                if (k < limit && packed_ready(dt, p, w)) {
                    /* a longer chain: the pure path takes it in the same batch as the run
                     * (walked before the run is marked in flight), so all of it is its */
                    status = PASS_FALLBACK;
                    goto out;
                }
                if (!k)
                    break; /* nothing available */
                for (Py_ssize_t i = 0; i < k; i++) /* a repeated id keeps only its last stamp */
                    sc[ids[i]] = (uint32_t)(i + 1);
                for (Py_ssize_t i = 0; i < k; i++)
                    if (sc[ids[i]] != (uint32_t)(i + 1)) {
                        status = PASS_FALLBACK;
                        goto out;
                    }
                /* consumed: read every frame, then give the buffers back */
                for (Py_ssize_t i = 0; i < k; i++) {
                    const uint8_t *src = (const uint8_t *)(uintptr_t)where[i] + skip;
                    size_t m = lens[i] - (size_t)skip;
                    bytes += m;
                    if (checksum) {
                        sum += adler32(src, m);
                    } else {
                        while (m) {
                            size_t t = m < SCRATCH_BYTES ? m : SCRATCH_BYTES;
                            memcpy(scratch, src, t);
                            sink ^= scratch[t - 1];
                            src += t;
                            m -= t;
                        }
                    }
                }
                packets += (unsigned long long)k;
                na = p;
                aw = w;
                uint64_t first = 0;
                Py_ssize_t pos = nu;
                int wrap = uw;
                for (Py_ssize_t i = 0; i < k; i++) {
                    uint64_t word = (uint64_t)ids[i] << 32 |
                                    (uint64_t)(wrap ? (F_AVAIL | F_USED) : 0) << 48;
                    if (i == 0)
                        first = word;
                    else
                        st64(dt + 16 * pos + 8, word);
                    if (++pos == size) {
                        pos = 0;
                        wrap ^= 1;
                    }
                }
                /* the first flags word last: it publishes the burst */
                __atomic_store_n((uint64_t *)(dt + 16 * nu + 8), first, __ATOMIC_RELEASE);
                nu = pos;
                uw = wrap;
                since += k;
                left -= k;
                took = 1;
                if (!packed_ready(dt, na, aw))
                    break; /* has_available */
            }
            /* signal_used_queue: the driver event area decides */
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            uint16_t dflags = vld16(drv + 2) & 3;
            long long advanced = since;
            int notify;
            since = 0;
            if (dflags == 1 || !advanced) {
                notify = 0;
            } else if (dflags != 2 || !event_idx || advanced < 0) {
                notify = 1;
            } else {
                uint16_t off_wrap = vld16(drv);
                long long event = off_wrap & 0x7FFF, now = nu;
                if ((off_wrap >> 15) != uw)
                    event -= size;
                long long old = now - advanced;
                notify = ((now - event - 1) & 0xFFFF) < ((now - old) & 0xFFFF);
            }
            if (notify && call_fd >= 0) {
                uint64_t one = 1;
                ssize_t wr;
                do
                    wr = write(call_fd, &one, 8);
                while (wr < 0 && errno == EINTR);
                if (wr < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
                    err = errno;
                    status = PASS_CALL_FAILED;
                    goto out;
                }
            }
            /* enable_notification: re-arm kicks, then re-check (at the budget too) */
            if (event_idx) {
                vst16(dev, (uint16_t)(na | aw << 15));
                vst16(dev + 2, 2); /* RING_EVENT_FLAGS_DESC */
            } else {
                vst16(dev + 2, 0); /* RING_EVENT_FLAGS_ENABLE */
            }
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (!packed_ready(dt, na, aw))
                break;
            if (left <= 0) {
                status = PASS_YIELDED;
                break;
            }
            if (!took && ++idle >= PASS_IDLE_ROUNDS) {
                status = PASS_YIELDED;
                break;
            }
        }
    out:
        PyEval_RestoreThread(ts);
        (void)sink;
        result = Py_BuildValue("ininiLnKKKi", status, na, aw, nu, uw, since, left, packets,
                               bytes, sum, err);
    }
done:
    for (Py_ssize_t i = 0; i < held; i++)
        rel(&views[i]);
    PyMem_Free(views); PyMem_Free(regs); PyMem_Free(ids); PyMem_Free(where);
    PyMem_Free(lens); PyMem_Free(scratch);
    rel(&desc); rel(&driver); rel(&device); rel(&counts); rel(&scr); rel(&bounds);
    return result;
}

/* ------------------------------------------------------------------ module */

PyDoc_STRVAR(set_max_queue_size_doc,
"set_max_queue_size(size)\n\n"
"Set the largest ring size the compiled paths accept (the declared protocol limit).");

static PyObject *set_max_queue_size(PyObject *self, PyObject *args) {
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "n", &size))
        return NULL;
    if (size < 1 || size > FORMAT_MAX_RING) {
        PyErr_Format(PyExc_ValueError,
                     "set_max_queue_size: %zd is outside 1..%d (packed ring positions)", size,
                     FORMAT_MAX_RING);
        return NULL;
    }
    max_ring = size;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"split_pop", split_pop, METH_VARARGS, split_pop_doc},
    {"split_used", split_used, METH_VARARGS, split_used_doc},
    {"packed_run", packed_run, METH_VARARGS, packed_run_doc},
    {"packed_take", packed_take, METH_VARARGS, packed_take_doc},
    {"packed_used", packed_used, METH_VARARGS, packed_used_doc},
    {"gather_rows", gather_rows, METH_VARARGS, gather_rows_doc},
    {"adler32_rows", adler32_rows, METH_VARARGS, adler32_rows_doc},
    {"read_frames", read_frames, METH_VARARGS, read_frames_doc},
    {"chain_ring", chain_ring, METH_VARARGS, chain_ring_doc},
    {"sink_split", sink_split, METH_VARARGS, sink_split_doc},
    {"sink_packed", sink_packed, METH_VARARGS, sink_packed_doc},
    {"set_max_queue_size", set_max_queue_size, METH_VARARGS, set_max_queue_size_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vhsm._speedups",
    "The ring hot loops of vhsm in C (optional; vhsm.speedups picks the data path).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    if (PyType_Ready(&ChainRingType) < 0 || PyType_Ready(&ChainIterType) < 0 ||
        !(str_walk = PyUnicode_InternFromString("_walk")) ||
        !(str_buffers = PyUnicode_InternFromString("_buffers")) ||
        !(str_avail_count = PyUnicode_InternFromString("_avail_count")))
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddStringConstant(m, "source_sha256", VHSM_SOURCE_SHA256) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
