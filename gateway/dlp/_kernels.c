/* The DLP hot path's two loops over a bulk export, in C: finding the words that word patterns match
 * (gateway/dlp/tokens.py) and checking fixed-form candidates (gateway/dlp/batch.py). A JSON or CSV export
 * holds an ID number and a mobile number in every record; done with numpy, each step is a pass over all
 * of them, and their fixed costs held a 1 MiB export to ~40 MB/s.
 *
 * Plain C over the buffer protocol, no numpy headers: arrays come in and go out as bytes of native
 * int64 (starts, rows) or uint8 (answers). The tables (which classes a byte is in, province codes,
 * mobile prefixes, card brands) are built in Python from the same definitions as the numpy path, which
 * stays as the fallback where this module could not be compiled; tests hold both to the same answers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static unsigned char word_byte[256]; /* [0-9A-Za-z_]: what \b bounds over bytes */

/* ---- word patterns ------------------------------------------------------------------------------ */

typedef struct {
    Py_ssize_t position, width; /* an alternation of literals: `width` bytes from `position` */
    Py_ssize_t count;
    int64_t *codes; /* the literals' bytes as big-endian numbers, rising */
} Alternation;

typedef struct {
    int64_t pattern;    /* the pattern's index in the matcher */
    Py_ssize_t length;  /* the word length this form matches */
    uint64_t *bits;     /* per position: the class bit the byte there must be in */
    Py_ssize_t alternation_count;
    Alternation *alternations;
} Form;

typedef struct {
    uint64_t class_bits[256]; /* per byte: the bits of the classes it is in */
    Py_ssize_t shortest, longest;
    Py_ssize_t form_count;
    Form *forms; /* by pattern index, then length */
} Words;

static void words_free(Words *words) {
    for (Py_ssize_t i = 0; i < words->form_count; i++) {
        Form *form = &words->forms[i];
        for (Py_ssize_t a = 0; a < form->alternation_count; a++)
            PyMem_Free(form->alternations[a].codes);
        PyMem_Free(form->alternations);
        PyMem_Free(form->bits);
    }
    PyMem_Free(words->forms);
    PyMem_Free(words);
}

static void words_capsule_free(PyObject *capsule) {
    Words *words = PyCapsule_GetPointer(capsule, "gateway.dlp.words");
    if (words)
        words_free(words);
}

/* Copies a bytes-like object of `count` int64/uint64 items into fresh memory; -1 on a wrong size. */
static int copy_items(PyObject *object, Py_ssize_t count, void **out) {
    Py_buffer view;
    if (PyObject_GetBuffer(object, &view, PyBUF_SIMPLE) < 0)
        return -1;
    if (view.len != count * 8) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "table of the wrong size");
        return -1;
    }
    *out = PyMem_Malloc(count ? count * 8 : 1);
    if (!*out) {
        PyBuffer_Release(&view);
        PyErr_NoMemory();
        return -1;
    }
    memcpy(*out, view.buf, count * 8);
    PyBuffer_Release(&view);
    return 0;
}

/* compile_words(class_bits, forms): class_bits is 256 uint64; forms a sequence of
 * (pattern index, length, bits (length uint64), ((position, width, codes (int64, rising)), ...)). */
static PyObject *compile_words(PyObject *self, PyObject *args) {
    PyObject *class_bits, *forms;
    if (!PyArg_ParseTuple(args, "OO", &class_bits, &forms))
        return NULL;
    PyObject *sequence = PySequence_Fast(forms, "forms must be a sequence");
    if (!sequence)
        return NULL;
    Words *words = PyMem_Calloc(1, sizeof(Words));
    Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
    if (!words || !(words->forms = PyMem_Calloc(count ? count : 1, sizeof(Form)))) {
        PyMem_Free(words);
        Py_DECREF(sequence);
        return PyErr_NoMemory();
    }
    void *table = NULL;
    if (copy_items(class_bits, 256, &table) < 0)
        goto fail;
    memcpy(words->class_bits, table, sizeof words->class_bits);
    PyMem_Free(table);
    words->shortest = PY_SSIZE_T_MAX;
    for (Py_ssize_t i = 0; i < count; i++) {
        Form *form = &words->forms[i];
        PyObject *bits, *alternations;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(sequence, i), "LnOO", &form->pattern, &form->length,
                              &bits, &alternations))
            goto fail;
        words->form_count = i + 1; /* freed from here on */
        if (form->length < 1 || copy_items(bits, form->length, (void **)&form->bits) < 0)
            goto fail;
        Py_ssize_t alternation_count = PySequence_Size(alternations);
        if (alternation_count < 0)
            goto fail;
        form->alternations = PyMem_Calloc(alternation_count ? alternation_count : 1, sizeof(Alternation));
        if (!form->alternations) {
            PyErr_NoMemory();
            goto fail;
        }
        for (Py_ssize_t a = 0; a < alternation_count; a++) {
            Alternation *alternation = &form->alternations[a];
            PyObject *item = PySequence_GetItem(alternations, a), *codes;
            if (!item)
                goto fail;
            int ok = PyArg_ParseTuple(item, "nnO", &alternation->position, &alternation->width, &codes);
            if (ok) {
                Py_ssize_t size = PyObject_Length(codes);
                ok = size >= 0 && size % 8 == 0;
                if (ok) {
                    alternation->count = size / 8;
                    ok = copy_items(codes, alternation->count, (void **)&alternation->codes) == 0;
                } else if (size >= 0)
                    PyErr_SetString(PyExc_ValueError, "codes must be int64");
            }
            Py_DECREF(item);
            form->alternation_count = a + (ok ? 1 : 0);
            if (!ok)
                goto fail;
            if (alternation->position < 0 || alternation->width < 1 || alternation->width > 7
                || alternation->position + alternation->width > form->length) {
                PyErr_SetString(PyExc_ValueError, "alternation outside the word");
                goto fail;
            }
        }
        if (form->length < words->shortest)
            words->shortest = form->length;
        if (form->length > words->longest)
            words->longest = form->length;
    }
    Py_DECREF(sequence);
    PyObject *capsule = PyCapsule_New(words, "gateway.dlp.words", words_capsule_free);
    if (!capsule)
        words_free(words);
    return capsule;
fail:
    Py_DECREF(sequence);
    words_free(words);
    return NULL;
}

static int code_among(const Alternation *alternation, int64_t code) {
    Py_ssize_t low = 0, high = alternation->count;
    while (low < high) {
        Py_ssize_t middle = low + (high - low) / 2;
        if (alternation->codes[middle] < code)
            low = middle + 1;
        else
            high = middle;
    }
    return low < alternation->count && alternation->codes[low] == code;
}

static int form_matches(const Words *words, const Form *form, const unsigned char *word) {
    for (Py_ssize_t i = 0; i < form->length; i++)
        if (!(words->class_bits[word[i]] & form->bits[i]))
            return 0;
    for (Py_ssize_t a = 0; a < form->alternation_count; a++) {
        const Alternation *alternation = &form->alternations[a];
        int64_t code = 0;
        for (Py_ssize_t i = 0; i < alternation->width; i++)
            code = code * 256 + word[alternation->position + i];
        if (!code_among(alternation, code))
            return 0;
    }
    return 1;
}

/* Growable output of int64 items. */
typedef struct {
    int64_t *items;
    Py_ssize_t count, room;
} Rows;

static int rows_push(Rows *rows, int64_t a, int64_t b, int64_t c) {
    if (rows->count + 3 > rows->room) {
        Py_ssize_t room = rows->room ? rows->room * 2 : 3 * 1024;
        int64_t *items = realloc(rows->items, room * sizeof(int64_t)); /* without the GIL: not PyMem */
        if (!items)
            return -1;
        rows->items = items;
        rows->room = room;
    }
    rows->items[rows->count++] = a;
    rows->items[rows->count++] = b;
    rows->items[rows->count++] = c;
    return 0;
}

/* scan_words(words, data, start): every word of data[start:] (a maximal run of [0-9A-Za-z_]) that a
 * form matches, as int64 rows (pattern index, start, end), in text order, patterns in index order.
 * `start` must not be inside a word (the caller's first word long enough starts there). */
static PyObject *scan_words(PyObject *self, PyObject *args) {
    PyObject *capsule;
    Py_buffer view;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "Oy*n", &capsule, &view, &start))
        return NULL;
    Words *words = PyCapsule_GetPointer(capsule, "gateway.dlp.words");
    if (!words) {
        PyBuffer_Release(&view);
        return NULL;
    }
    const unsigned char *data = view.buf;
    Py_ssize_t size = view.len, at = start < 0 ? 0 : start;
    Rows rows = {0};
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    while (at < size && !failed) {
        while (at < size && !word_byte[data[at]])
            at++;
        Py_ssize_t begin = at;
        while (at < size && word_byte[data[at]])
            at++;
        Py_ssize_t length = at - begin;
        if (length < words->shortest || length > words->longest)
            continue;
        for (Py_ssize_t i = 0; i < words->form_count && !failed; i++) {
            const Form *form = &words->forms[i];
            if (form->length == length && form_matches(words, form, data + begin))
                failed = rows_push(&rows, form->pattern, begin, at) < 0;
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    PyObject *result = failed ? PyErr_NoMemory()
                              : PyBytes_FromStringAndSize((const char *)rows.items, rows.count * sizeof(int64_t));
    free(rows.items);
    return result;
}

/* ---- fixed-form checks -------------------------------------------------------------------------- */
/* Each takes the text and the candidates' starts (int64; `length` bytes each, or to their ends) and
 * answers a byte per candidate: 1 valid, 0 not, 2 undecided (a form only the detector's own check reads). */

typedef struct {
    Py_buffer data, starts, ends;
    Py_ssize_t count;
    PyObject *answers;
} Candidates;

static int candidates_open(Candidates *c, PyObject *data, PyObject *starts, PyObject *ends,
                           Py_ssize_t length) {
    memset(c, 0, sizeof *c);
    if (PyObject_GetBuffer(data, &c->data, PyBUF_SIMPLE) < 0)
        return -1;
    if (PyObject_GetBuffer(starts, &c->starts, PyBUF_SIMPLE) < 0)
        goto fail;
    c->count = c->starts.len / 8;
    if (ends && PyObject_GetBuffer(ends, &c->ends, PyBUF_SIMPLE) < 0)
        goto fail;
    if (c->starts.len % 8 || (ends && c->ends.len != c->starts.len)) {
        PyErr_SetString(PyExc_ValueError, "starts and ends must be int64 of one length");
        goto fail;
    }
    const int64_t *at = c->starts.buf, *until = ends ? c->ends.buf : NULL;
    for (Py_ssize_t i = 0; i < c->count; i++) { /* every candidate inside the text */
        int64_t end = until ? until[i] : at[i] + length;
        if (at[i] < 0 || end < at[i] || end > c->data.len) {
            PyErr_SetString(PyExc_ValueError, "candidate outside the text");
            goto fail;
        }
    }
    if (!(c->answers = PyBytes_FromStringAndSize(NULL, c->count)))
        goto fail;
    return 0;
fail:
    PyBuffer_Release(&c->data);
    if (c->starts.obj)
        PyBuffer_Release(&c->starts);
    if (c->ends.obj)
        PyBuffer_Release(&c->ends);
    return -1;
}

static PyObject *candidates_close(Candidates *c) {
    PyBuffer_Release(&c->data);
    PyBuffer_Release(&c->starts);
    if (c->ends.obj)
        PyBuffer_Release(&c->ends);
    return c->answers;
}

static int digits(const unsigned char *text, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++)
        if (text[i] < '0' || text[i] > '9')
            return 0;
    return 1;
}

static int number(const unsigned char *text, Py_ssize_t count) {
    int value = 0;
    for (Py_ssize_t i = 0; i < count; i++)
        value = value * 10 + (text[i] - '0');
    return value;
}

static int table_byte(Py_buffer *table, Py_ssize_t index) {
    return index >= 0 && index < table->len && ((const unsigned char *)table->buf)[index];
}

/* id_cards(data, starts, provinces (100 flags), today as yyyymmdd): GB 11643, 18 characters each. */
static PyObject *id_cards(PyObject *self, PyObject *args) {
    PyObject *data, *starts;
    Py_buffer provinces;
    long today;
    if (!PyArg_ParseTuple(args, "OOy*l", &data, &starts, &provinces, &today))
        return NULL;
    Candidates c;
    if (candidates_open(&c, data, starts, NULL, 18) < 0) {
        PyBuffer_Release(&provinces);
        return NULL;
    }
    static const int weights[17] = {7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2};
    static const char check_chars[] = "10X98765432";
    static const int month_days[13] = {0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    char *answers = PyBytes_AS_STRING(c.answers);
    const int64_t *at = c.starts.buf;
    for (Py_ssize_t i = 0; i < c.count; i++) {
        const unsigned char *id = (const unsigned char *)c.data.buf + at[i];
        unsigned char last = id[17] == 'x' ? 'X' : id[17];
        int ok = digits(id, 17) && (digits(&last, 1) || last == 'X') && table_byte(&provinces, number(id, 2));
        if (ok) {
            int year = number(id + 6, 4), month = number(id + 10, 2), day = number(id + 12, 2);
            int leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
            ok = year >= 1 && month >= 1 && month <= 12 && day >= 1
                 && day <= month_days[month] - (month == 2 && !leap);
            long born = year * 10000L + month * 100 + day;
            ok = ok && born >= 19000101L && born <= today;
        }
        if (ok) {
            int total = 0;
            for (int k = 0; k < 17; k++)
                total += (id[k] - '0') * weights[k];
            ok = check_chars[total % 11] == last;
        }
        answers[i] = (char)ok;
    }
    PyBuffer_Release(&provinces);
    return candidates_close(&c);
}

/* mobiles(data, starts, prefixes (1000 flags)): 11 characters each; all digits is decided here. */
static PyObject *mobiles(PyObject *self, PyObject *args) {
    PyObject *data, *starts;
    Py_buffer prefixes;
    if (!PyArg_ParseTuple(args, "OOy*", &data, &starts, &prefixes))
        return NULL;
    Candidates c;
    if (candidates_open(&c, data, starts, NULL, 11) < 0) {
        PyBuffer_Release(&prefixes);
        return NULL;
    }
    char *answers = PyBytes_AS_STRING(c.answers);
    const int64_t *at = c.starts.buf;
    for (Py_ssize_t i = 0; i < c.count; i++) {
        const unsigned char *mobile = (const unsigned char *)c.data.buf + at[i];
        answers[i] = digits(mobile, 11) ? (char)table_byte(&prefixes, number(mobile, 3)) : 2;
    }
    PyBuffer_Release(&prefixes);
    return candidates_close(&c);
}

/* usccs(data, starts, values (256 int8, -1 outside the alphabet), categories (256x256 flags),
 * provinces (100 flags)): GB 32100 with its embedded GB 11714 code, 18 characters each. */
static PyObject *usccs(PyObject *self, PyObject *args) {
    PyObject *data, *starts;
    Py_buffer values, categories, provinces;
    if (!PyArg_ParseTuple(args, "OOy*y*y*", &data, &starts, &values, &categories, &provinces))
        return NULL;
    Candidates c;
    int opened = values.len == 256 && categories.len == 256 * 256
                 && candidates_open(&c, data, starts, NULL, 18) == 0;
    if (!opened) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "tables of the wrong size");
        PyBuffer_Release(&values);
        PyBuffer_Release(&categories);
        PyBuffer_Release(&provinces);
        return NULL;
    }
    static const int weights[17] = {1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28};
    static const int org_weights[8] = {3, 7, 9, 10, 5, 8, 4, 2};
    static const char alphabet[] = "0123456789ABCDEFGHJKLMNPQRTUWXY";
    static const char org_check[] = "?123456789X0"; /* indexed by 11 - total % 11 */
    const signed char *value = values.buf;
    const unsigned char *category = categories.buf;
    char *answers = PyBytes_AS_STRING(c.answers);
    const int64_t *at = c.starts.buf;
    for (Py_ssize_t i = 0; i < c.count; i++) {
        const unsigned char *code = (const unsigned char *)c.data.buf + at[i];
        int ok = 1;
        for (int k = 0; k < 18 && ok; k++)
            ok = value[code[k]] >= 0;
        ok = ok && category[code[0] * 256 + code[1]] && digits(code + 2, 6)
             && table_byte(&provinces, number(code + 2, 2));
        if (ok) {
            int total = 0;
            for (int k = 0; k < 8; k++)
                total += (code[8 + k] <= '9' ? code[8 + k] - '0' : code[8 + k] - 55) * org_weights[k];
            ok = org_check[11 - total % 11] == code[16];
        }
        if (ok) {
            int total = 0;
            for (int k = 0; k < 17; k++)
                total += value[code[k]] * weights[k];
            ok = alphabet[(31 - total % 31) % 31] == code[17];
        }
        answers[i] = (char)ok;
    }
    PyBuffer_Release(&values);
    PyBuffer_Release(&categories);
    PyBuffer_Release(&provinces);
    return candidates_close(&c);
}

/* cards(data, starts, ends, brands): payment card numbers of 15-19 characters; runs of digits are
 * decided here. brands: int64 rows (low, high, prefix digits, bit mask of the allowed lengths). */
static PyObject *cards(PyObject *self, PyObject *args) {
    PyObject *data, *starts, *ends;
    Py_buffer brands;
    if (!PyArg_ParseTuple(args, "OOOy*", &data, &starts, &ends, &brands))
        return NULL;
    Candidates c;
    if (brands.len % 32 || candidates_open(&c, data, starts, ends, 0) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "brands must be int64 rows of four");
        PyBuffer_Release(&brands);
        return NULL;
    }
    const int64_t *brand = brands.buf;
    Py_ssize_t brand_count = brands.len / 32;
    char *answers = PyBytes_AS_STRING(c.answers);
    const int64_t *at = c.starts.buf, *until = c.ends.buf;
    for (Py_ssize_t i = 0; i < c.count; i++) {
        const unsigned char *card = (const unsigned char *)c.data.buf + at[i];
        Py_ssize_t length = until[i] - at[i];
        if (length < 15 || length > 19 || !digits(card, length)) {
            answers[i] = 2;
            continue;
        }
        int branded = 0;
        for (Py_ssize_t b = 0; b < brand_count && !branded; b++) {
            const int64_t *row = brand + 4 * b;
            int64_t prefix = number(card, row[2]);
            branded = (row[3] >> length & 1) && prefix >= row[0] && prefix <= row[1];
        }
        int total = 0;
        for (Py_ssize_t k = 0; k < length; k++) { /* Luhn: every second digit from the right doubled */
            int digit = card[length - 1 - k] - '0';
            total += k % 2 ? (digit > 4 ? digit * 2 - 9 : digit * 2) : digit;
        }
        answers[i] = (char)(branded && total % 10 == 0);
    }
    PyBuffer_Release(&brands);
    return candidates_close(&c);
}

static PyMethodDef methods[] = {
    {"compile_words", compile_words, METH_VARARGS, "Word patterns' forms compiled for scan_words."},
    {"scan_words", scan_words, METH_VARARGS, "Words the compiled forms match: int64 rows (pattern, start, end)."},
    {"id_cards", id_cards, METH_VARARGS, "GB 11643 checks over 18-character candidates."},
    {"mobiles", mobiles, METH_VARARGS, "Mobile prefix checks over 11-character candidates."},
    {"usccs", usccs, METH_VARARGS, "GB 32100 checks over 18-character candidates."},
    {"cards", cards, METH_VARARGS, "Card brand and Luhn checks over runs of 15-19 digits."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "gateway.dlp._kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    for (int byte = 0; byte < 256; byte++)
        word_byte[byte] = (byte >= '0' && byte <= '9') || (byte >= 'A' && byte <= 'Z')
                          || (byte >= 'a' && byte <= 'z') || byte == '_';
    return PyModule_Create(&module);
}
