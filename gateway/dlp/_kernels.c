/* The DLP hot path's loops over a bulk export, in C: finding the words that word patterns match
 * (gateway/dlp/tokens.py) and checking fixed-form candidates (gateway/dlp/batch.py). A JSON or CSV export
 * holds an ID number and a mobile number in every record; done with numpy, each step is a pass over all
 * of them, and their fixed costs held a 1 MiB export to ~40 MB/s.
 *
 * Plain C over the buffer protocol, no numpy headers: arrays come in and go out as bytes of native
 * int64 (starts, rows) or uint8 (answers). The tables (which classes a byte is in, province codes,
 * mobile prefixes, card brands) are built in Python from the same definitions as the numpy path, which
 * stays as the fallback where this module could not be compiled; tests hold both to the same answers.
 * A word's matches are also settled here (settle_words): in a bulk export, nearly every candidate.
 * Passes that were a scan's fixed cost or grew faster than the text: GBK to UTF-8, the full-width
 * characters to fold (gateway/dlp/fold.py), a JSON or CSV text's structure and a JSON text's keys
 * (gateway/dlp/decode.py), values found more than once and the characters values are written with
 * (gateway/dlp/detections.py), a stream window's detections copied out (gateway/dlp/stream.py), and the
 * lines of the places' digest (gateway/dlp/tally.py).
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

/* Room for `more` items (0), or -1 where memory ran out. */
static int rows_room(Rows *rows, Py_ssize_t more) {
    if (rows->count + more > rows->room) {
        Py_ssize_t room = rows->room ? rows->room * 2 : 3 * 1024;
        int64_t *items = realloc(rows->items, room * sizeof(int64_t)); /* without the GIL: not PyMem */
        if (!items)
            return -1;
        rows->items = items;
        rows->room = room;
    }
    return 0;
}

static int rows_push(Rows *rows, int64_t a, int64_t b, int64_t c) {
    if (rows_room(rows, 3) < 0)
        return -1;
    rows->items[rows->count++] = a;
    rows->items[rows->count++] = b;
    rows->items[rows->count++] = c;
    return 0;
}

static int rows_push_one(Rows *rows, int64_t item) {
    if (rows_room(rows, 1) < 0)
        return -1;
    rows->items[rows->count++] = item;
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
/* Each check reads one candidate and answers 1 valid, 0 not, or UNDECIDED: a form only the detector's
 * own check (validators.py) reads, such as a grouped or +86 mobile number. */

enum { UNDECIDED = 2 };
enum { NO_CHECK, ID_CARD, USCC, MOBILE, CARD, KINDS }; /* batch.KERNEL_KINDS names them alike */

typedef struct {
    unsigned char provinces[100];       /* GB/T 2260 province-level codes */
    unsigned char mobile_prefixes[1000];
    signed char uscc_values[256];       /* a character's value in the GB 32100 alphabet, or -1 */
    unsigned char uscc_categories[256 * 256]; /* (authority, category) pairs allowed */
    Py_ssize_t brand_count;
    int64_t *brands; /* rows (low, high, prefix digits, bit mask of the allowed lengths) */
} Checks;

static void checks_capsule_free(PyObject *capsule) {
    Checks *checks = PyCapsule_GetPointer(capsule, "gateway.dlp.checks");
    if (checks) {
        PyMem_Free(checks->brands);
        PyMem_Free(checks);
    }
}

static int copy_table(Py_buffer *view, void *into, Py_ssize_t size) {
    if (view->len != size) {
        PyErr_SetString(PyExc_ValueError, "table of the wrong size");
        return -1;
    }
    memcpy(into, view->buf, size);
    return 0;
}

/* compile_checks(provinces, mobile_prefixes, uscc_values, uscc_categories, brands) */
static PyObject *compile_checks(PyObject *self, PyObject *args) {
    Py_buffer provinces, prefixes, values, categories;
    PyObject *brands;
    if (!PyArg_ParseTuple(args, "y*y*y*y*O", &provinces, &prefixes, &values, &categories, &brands))
        return NULL;
    Checks *checks = PyMem_Calloc(1, sizeof(Checks));
    PyObject *capsule = NULL;
    Py_ssize_t brand_bytes = PyObject_Length(brands);
    if (!checks)
        PyErr_NoMemory();
    else if (brand_bytes >= 0 && brand_bytes % 32)
        PyErr_SetString(PyExc_ValueError, "brands must be int64 rows of four");
    else if (brand_bytes >= 0 && copy_table(&provinces, checks->provinces, 100) == 0
             && copy_table(&prefixes, checks->mobile_prefixes, 1000) == 0
             && copy_table(&values, checks->uscc_values, 256) == 0
             && copy_table(&categories, checks->uscc_categories, 256 * 256) == 0
             && copy_items(brands, brand_bytes / 8, (void **)&checks->brands) == 0) {
        checks->brand_count = brand_bytes / 32;
        capsule = PyCapsule_New(checks, "gateway.dlp.checks", checks_capsule_free);
    }
    if (!capsule && checks) {
        PyMem_Free(checks->brands);
        PyMem_Free(checks);
    }
    PyBuffer_Release(&provinces);
    PyBuffer_Release(&prefixes);
    PyBuffer_Release(&values);
    PyBuffer_Release(&categories);
    return capsule;
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

/* GB 11643 resident ID number; `today` as yyyymmdd bounds the birth date. */
static int id_card_valid(const Checks *checks, const unsigned char *id, Py_ssize_t length, long today) {
    static const int weights[17] = {7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2};
    static const char check_chars[] = "10X98765432";
    static const int month_days[13] = {0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (length != 18)
        return UNDECIDED;
    unsigned char last = id[17] == 'x' ? 'X' : id[17];
    if (!digits(id, 17) || !(digits(&last, 1) || last == 'X') || !checks->provinces[number(id, 2)])
        return 0;
    int year = number(id + 6, 4), month = number(id + 10, 2), day = number(id + 12, 2);
    int leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    if (year < 1 || month < 1 || month > 12 || day < 1 || day > month_days[month] - (month == 2 && !leap))
        return 0;
    long born = year * 10000L + month * 100 + day;
    if (born < 19000101L || born > today)
        return 0;
    int total = 0;
    for (int k = 0; k < 17; k++)
        total += (id[k] - '0') * weights[k];
    return check_chars[total % 11] == last;
}

/* GB 32100 unified social credit code, with its embedded GB 11714 organisation code. */
static int uscc_valid(const Checks *checks, const unsigned char *code, Py_ssize_t length) {
    static const int weights[17] = {1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28};
    static const int org_weights[8] = {3, 7, 9, 10, 5, 8, 4, 2};
    static const char alphabet[] = "0123456789ABCDEFGHJKLMNPQRTUWXY";
    static const char org_check[] = "?123456789X0"; /* indexed by 11 - total % 11 */
    if (length != 18)
        return UNDECIDED;
    for (int k = 0; k < 18; k++)
        if (checks->uscc_values[code[k]] < 0)
            return 0;
    if (!checks->uscc_categories[code[0] * 256 + code[1]] || !digits(code + 2, 6) || !checks->provinces[number(code + 2, 2)])
        return 0;
    int total = 0;
    for (int k = 0; k < 8; k++)
        total += (code[8 + k] <= '9' ? code[8 + k] - '0' : code[8 + k] - 55) * org_weights[k];
    if (org_check[11 - total % 11] != code[16])
        return 0;
    total = 0;
    for (int k = 0; k < 17; k++)
        total += checks->uscc_values[code[k]] * weights[k];
    return alphabet[(31 - total % 31) % 31] == code[17];
}

/* Mainland mobile number written as 11 digits. */
static int mobile_valid(const Checks *checks, const unsigned char *mobile, Py_ssize_t length) {
    if (length != 11 || !digits(mobile, 11))
        return UNDECIDED;
    return checks->mobile_prefixes[number(mobile, 3)];
}

/* Payment card number written as 15-19 digits: a brand's prefix and length, and the Luhn checksum. */
static int card_valid(const Checks *checks, const unsigned char *card, Py_ssize_t length) {
    if (length < 15 || length > 19 || !digits(card, length))
        return UNDECIDED;
    int branded = 0;
    for (Py_ssize_t b = 0; b < checks->brand_count && !branded; b++) {
        const int64_t *row = checks->brands + 4 * b;
        int64_t prefix = number(card, row[2]);
        branded = (row[3] >> length & 1) && prefix >= row[0] && prefix <= row[1];
    }
    int total = 0;
    for (Py_ssize_t k = 0; k < length; k++) { /* Luhn: every second digit from the right doubled */
        int digit = card[length - 1 - k] - '0';
        total += k % 2 ? (digit > 4 ? digit * 2 - 9 : digit * 2) : digit;
    }
    return branded && total % 10 == 0;
}

static int valid(const Checks *checks, int kind, const unsigned char *token, Py_ssize_t length, long today) {
    switch (kind) {
    case ID_CARD: return id_card_valid(checks, token, length, today);
    case USCC: return uscc_valid(checks, token, length);
    case MOBILE: return mobile_valid(checks, token, length);
    case CARD: return card_valid(checks, token, length);
    default: return UNDECIDED;
    }
}

/* Reads an int64 array argument; -1 (with an error) when its size is not a multiple of `row` items. */
static int int64_rows(PyObject *object, Py_buffer *view, Py_ssize_t row) {
    if (PyObject_GetBuffer(object, view, PyBUF_SIMPLE) < 0)
        return -1;
    if (view->len % (8 * row)) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "expected int64 rows of %zd", row);
        return -1;
    }
    return 0;
}

/* check(checks, kind, data, starts, ends, today): one kind's check over candidates data[starts[i]:ends[i]],
 * a byte each (1, 0 or UNDECIDED). */
/* starts and ends: int64 offsets of spans of a text of `size` bytes, as many of each, each span within
 * the text; 0, or -1 with an error set and nothing held. */
static int spans_within(PyObject *starts_object, PyObject *ends_object, Py_buffer *starts, Py_buffer *ends,
                        Py_ssize_t size) {
    if (int64_rows(starts_object, starts, 1) < 0)
        return -1;
    if (int64_rows(ends_object, ends, 1) < 0) {
        PyBuffer_Release(starts);
        return -1;
    }
    const int64_t *at = starts->buf, *until = ends->buf;
    if (ends->len != starts->len)
        PyErr_SetString(PyExc_ValueError, "as many starts as ends");
    else
        for (Py_ssize_t i = 0; i < starts->len / 8; i++)
            if (at[i] < 0 || until[i] < at[i] || until[i] > size) {
                PyErr_SetString(PyExc_ValueError, "span outside the text");
                break;
            }
    if (PyErr_Occurred()) {
        PyBuffer_Release(starts);
        PyBuffer_Release(ends);
        return -1;
    }
    return 0;
}

static PyObject *check(PyObject *self, PyObject *args) {
    PyObject *capsule, *starts_object, *ends_object;
    int kind;
    Py_buffer data, starts, ends;
    long today;
    if (!PyArg_ParseTuple(args, "Oiy*OOl", &capsule, &kind, &data, &starts_object, &ends_object, &today))
        return NULL;
    const Checks *checks = PyCapsule_GetPointer(capsule, "gateway.dlp.checks");
    PyObject *answers = NULL;
    if (!checks || spans_within(starts_object, ends_object, &starts, &ends, data.len) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    Py_ssize_t count = starts.len / 8;
    const int64_t *at = starts.buf, *until = ends.buf;
    if (kind <= NO_CHECK || kind >= KINDS)
        PyErr_SetString(PyExc_ValueError, "no such check");
    else if ((answers = PyBytes_FromStringAndSize(NULL, count))) {
        char *answer = PyBytes_AS_STRING(answers);
        for (Py_ssize_t i = 0; i < count; i++)
            answer[i] = (char)valid(checks, kind, (const unsigned char *)data.buf + at[i], until[i] - at[i], today);
    }
    PyBuffer_Release(&ends);
    PyBuffer_Release(&starts);
    PyBuffer_Release(&data);
    return answers;
}

/* settle_words(checks, data, rows, patterns, today): the word matches scan_words found (rows of
 * (pattern, start, end), in text order) settled where their checks can be run here. A word is a span
 * no other word overlaps, so its matches compete only with one another: the one of the strongest
 * detector (by priority, then by the lower detector index) whose check passes takes it, as
 * engine._detector_spans decides. Matches whose word has a pattern without a check here (a rule's own
 * pattern, a detector checked in Python), or an answer left UNDECIDED, or a token a separator could
 * continue, are handed back whole.
 * patterns: int64 rows per pattern index (detector index or -1, priority, check kind, continued by a
 * separator). Returns (settled rows (start, end, detector), rows handed back (pattern, start, end)). */
static PyObject *settle_words(PyObject *self, PyObject *args) {
    PyObject *capsule, *rows_object, *patterns_object;
    Py_buffer data, rows_view, patterns_view;
    long today;
    if (!PyArg_ParseTuple(args, "Oy*OOl", &capsule, &data, &rows_object, &patterns_object, &today))
        return NULL;
    const Checks *checks = PyCapsule_GetPointer(capsule, "gateway.dlp.checks");
    if (!checks || int64_rows(rows_object, &rows_view, 3) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    if (int64_rows(patterns_object, &patterns_view, 4) < 0) {
        PyBuffer_Release(&rows_view);
        PyBuffer_Release(&data);
        return NULL;
    }
    const int64_t *row = rows_view.buf, *pattern = patterns_view.buf;
    Py_ssize_t count = rows_view.len / 24, pattern_count = patterns_view.len / 32;
    const unsigned char *text = data.buf;
    for (Py_ssize_t i = 0; i < count; i++)
        if (row[3 * i] < 0 || row[3 * i] >= pattern_count || row[3 * i + 1] < 0 || row[3 * i + 2] < row[3 * i + 1]
            || row[3 * i + 2] > data.len || (i && row[3 * i + 1] < row[3 * i - 2])) {
            PyErr_SetString(PyExc_ValueError, "rows must be words of the text, in text order");
            break;
        }
    Rows settled = {0}, handed_back = {0};
    int failed = PyErr_Occurred() != NULL;
    for (Py_ssize_t first = 0, next; first < count && !failed; first = next) {
        int64_t start = row[3 * first + 1], end = row[3 * first + 2];
        for (next = first; next < count && row[3 * next + 1] == start; next++)
            ;
        const unsigned char *token = text + start;
        Py_ssize_t length = end - start;
        int plain = digits(token, length - 1) && (digits(token + length - 1, 1) || token[length - 1] == 'X'
                                                  || token[length - 1] == 'x');
        int settles = 1;
        for (Py_ssize_t i = first; i < next && settles; i++) {
            const int64_t *info = pattern + 4 * row[3 * i];
            settles = info[0] >= 0 && info[2] > NO_CHECK && info[2] < KINDS && (plain || !info[3])
                      && row[3 * i + 2] == end;
        }
        int64_t chosen = -1, chosen_priority = 0;
        for (Py_ssize_t i = first; i < next && settles; i++) { /* strongest first: its answer decides */
            const int64_t *info = pattern + 4 * row[3 * i];
            if (chosen >= 0 && (info[1] < chosen_priority || (info[1] == chosen_priority && info[0] >= chosen)))
                continue;
            int answer = valid(checks, (int)info[2], token, length, today);
            if (answer == UNDECIDED)
                settles = 0;
            else if (answer) {
                chosen = info[0];
                chosen_priority = info[1];
            }
        }
        if (!settles) {
            for (Py_ssize_t i = first; i < next && !failed; i++)
                failed = rows_push(&handed_back, row[3 * i], row[3 * i + 1], row[3 * i + 2]) < 0;
        } else if (chosen >= 0)
            failed = rows_push(&settled, start, end, chosen) < 0;
    }
    PyBuffer_Release(&patterns_view);
    PyBuffer_Release(&rows_view);
    PyBuffer_Release(&data);
    PyObject *result = NULL;
    if (failed && !PyErr_Occurred())
        PyErr_NoMemory();
    if (!failed)
        result = Py_BuildValue("y#y#", settled.items ? (const char *)settled.items : "",
                               settled.count * (Py_ssize_t)sizeof(int64_t),
                               handed_back.items ? (const char *)handed_back.items : "",
                               handed_back.count * (Py_ssize_t)sizeof(int64_t)); /* y# makes None of NULL */
    free(settled.items);
    free(handed_back.items);
    return result;
}

/* ---- GBK text ------------------------------------------------------------------------------------ */

/* gbk_to_utf8(table, data): GBK text (ASCII and two-byte forms) as UTF-8, with no str between them (a
 * GBK export decoded by Python's codec, then encoded, cost more than scanning it); None at the first
 * byte the table does not read, for the codec to read or refuse. table: per two-byte form (lead * 256 +
 * trail), its UTF-8 (up to 3 bytes) and their count in the 4th byte, 0 for a form GBK lacks. */
static PyObject *gbk_to_utf8(PyObject *self, PyObject *args) {
    Py_buffer table, data;
    if (!PyArg_ParseTuple(args, "y*y*", &table, &data))
        return NULL;
    PyObject *out = NULL;
    if (table.len != 65536 * 4) {
        PyErr_SetString(PyExc_ValueError, "table of the wrong size");
        goto done;
    }
    if (data.len > PY_SSIZE_T_MAX / 2 - 3) {
        PyErr_NoMemory();
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, data.len / 2 * 3 + 3); /* a form: 2 bytes in, up to 3 out */
    if (!out)
        goto done;
    const unsigned char *in = data.buf, *forms = table.buf;
    unsigned char *write = (unsigned char *)PyBytes_AS_STRING(out);
    Py_ssize_t at = 0, size = data.len;
    int readable = 1;
    Py_BEGIN_ALLOW_THREADS
    while (at < size) {
        if (in[at] < 0x80) {
            *write++ = in[at++];
            continue;
        }
        if (at + 1 == size) {
            readable = 0;
            break;
        }
        const unsigned char *form = forms + 4 * (in[at] * 256 + in[at + 1]);
        if (!form[3]) {
            readable = 0;
            break;
        }
        memcpy(write, form, 3); /* the 3rd byte of a 2-byte form is written over next */
        write += form[3];
        at += 2;
    }
    Py_END_ALLOW_THREADS
    if (!readable) {
        Py_DECREF(out);
        out = Py_NewRef(Py_None);
    } else
        _PyBytes_Resize(&out, write - (unsigned char *)PyBytes_AS_STRING(out));
done:
    PyBuffer_Release(&table);
    PyBuffer_Release(&data);
    return out;
}

/* ---- full-width folding ------------------------------------------------------------------------- */

enum { FOLD_FORM = 1, FOLD_SEPARATOR = 2 }; /* gateway/dlp/fold.py: _IS_FORM, _IS_SEPARATOR */

/* The kind of the character whose 3 bytes start at `text` when its first is 0xEF or 0xE3 (fold.py
 * _kind_at: its 2nd and 3rd bytes, and one bit telling the 1st), else 0. */
static unsigned char fold_kind(const unsigned char *kinds, const unsigned char *text) {
    if (text[0] != 0xEF && text[0] != 0xE3)
        return 0;
    return kinds[(text[1] | text[2] << 8) | (text[0] & 4) << 14];
}

static int ascii_alnum(unsigned char byte) {
    return (byte >= '0' && byte <= '9') || (byte >= 'A' && byte <= 'Z') || (byte >= 'a' && byte <= 'z');
}

/* fold_starts(kinds, data): where the characters to fold start (fold.py _fold_starts), as int64 bytes,
 * rising: every full-width form, and every separator with an ASCII letter or digit, or a form, just
 * before or after it. The bytes 0xEF and 0xE3 that start them are found with memchr: Chinese text
 * holds few (its full-width punctuation), so this reads the text about as fast as memory allows. */
static PyObject *fold_starts(PyObject *self, PyObject *args) {
    Py_buffer kinds, data;
    if (!PyArg_ParseTuple(args, "y*y*", &kinds, &data))
        return NULL;
    PyObject *out = NULL;
    if (kinds.len != 2 << 16) {
        PyErr_SetString(PyExc_ValueError, "kinds table of the wrong size");
        goto done;
    }
    const unsigned char *text = data.buf, *table = kinds.buf;
    Py_ssize_t size = data.len;
    Rows starts = {0};
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t end = size - 2; /* a character to fold starts before: it has 3 bytes */
    Py_ssize_t next_ef = -1, next_e3 = -1; /* the next 0xEF, 0xE3 from `at` on (`end`: none), once searched */
    for (Py_ssize_t at = 0; at < end && !failed; at++) {
        if (next_ef < at) {
            const unsigned char *found = memchr(text + at, 0xEF, end - at);
            next_ef = found ? found - text : end;
        }
        if (next_e3 < at) {
            const unsigned char *found = memchr(text + at, 0xE3, end - at);
            next_e3 = found ? found - text : end;
        }
        at = next_ef < next_e3 ? next_ef : next_e3;
        if (at == end)
            break;
        unsigned char kind = fold_kind(table, text + at);
        int folded = kind == FOLD_FORM;
        if (kind == FOLD_SEPARATOR)
            folded = (at + 3 < size && ascii_alnum(text[at + 3])) || (at >= 1 && ascii_alnum(text[at - 1]))
                     || (at + 6 <= size && fold_kind(table, text + at + 3) == FOLD_FORM)
                     || (at >= 3 && fold_kind(table, text + at - 3) == FOLD_FORM);
        if (folded)
            failed = rows_push_one(&starts, at) < 0;
    }
    Py_END_ALLOW_THREADS
    out = failed ? PyErr_NoMemory()
                 : PyBytes_FromStringAndSize((const char *)starts.items, starts.count * sizeof(int64_t));
    free(starts.items);
done:
    PyBuffer_Release(&kinds);
    PyBuffer_Release(&data);
    return out;
}

/* ---- a JSON or CSV text's structure ------------------------------------------------------------- */

/* blank_strings(data, start, end, quoted, marks): data[start:end] with the inside of every "..." made
 * spaces (gateway/dlp/decode.py _Structure: quotes kept; `quoted` says whether start is inside a
 * string), whether end is inside one, and the offsets of the bytes of `marks` left (int64, rising):
 * one pass where numpy took eight, which made locating a few values near a large export's end cost
 * more than scanning it. */
static PyObject *blank_strings(PyObject *self, PyObject *args) {
    Py_buffer data, marks;
    Py_ssize_t start, end;
    int quoted;
    if (!PyArg_ParseTuple(args, "y*nnpy*", &data, &start, &end, &quoted, &marks))
        return NULL;
    PyObject *blanked = NULL, *found = NULL, *result = NULL;
    if (start < 0 || end < start || end > data.len) {
        PyErr_SetString(PyExc_ValueError, "start and end must lie within the data, in order");
        goto done;
    }
    blanked = PyBytes_FromStringAndSize(NULL, end - start);
    if (!blanked)
        goto done;
    unsigned char is_mark[256] = {0};
    for (Py_ssize_t i = 0; i < marks.len; i++)
        is_mark[((const unsigned char *)marks.buf)[i]] = 1;
    is_mark[' '] = 0; /* what a string's inside becomes */
    const unsigned char *text = data.buf;
    unsigned char *write = (unsigned char *)PyBytes_AS_STRING(blanked);
    Rows offsets = {0};
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t at = start; at < end && !failed; at++) {
        unsigned char byte = text[at];
        if (byte == '"')
            quoted = !quoted;
        else if (quoted)
            byte = ' ';
        *write++ = byte;
        if (is_mark[byte])
            failed = rows_push_one(&offsets, at) < 0;
    }
    Py_END_ALLOW_THREADS
    if (failed)
        PyErr_NoMemory();
    else if ((found = PyBytes_FromStringAndSize((const char *)offsets.items, offsets.count * sizeof(int64_t))))
        result = Py_BuildValue("(OOO)", blanked, quoted ? Py_True : Py_False, found);
    free(offsets.items);
done:
    Py_XDECREF(blanked);
    Py_XDECREF(found);
    PyBuffer_Release(&data);
    PyBuffer_Release(&marks);
    return result;
}


/* ---- values found more than once ---------------------------------------------------------------- */

static uint64_t span_hash(const unsigned char *bytes, Py_ssize_t length) { /* FNV-1a */
    uint64_t hash = 0xcbf29ce484222325ULL;
    for (Py_ssize_t i = 0; i < length; i++)
        hash = (hash ^ bytes[i]) * 0x100000001b3ULL;
    return hash;
}

/* An item's bytes: the span of row `item` of text, or for item < 0 the bytes of others[-item - 1]. */
static const unsigned char *item_span(Py_ssize_t item, PyObject *others, const unsigned char *text, const int64_t *at,
                                      const int64_t *until, Py_ssize_t *length) {
    if (item < 0) {
        PyObject *other = PyList_GET_ITEM(others, -item - 1);
        *length = PyBytes_GET_SIZE(other);
        return (const unsigned char *)PyBytes_AS_STRING(other);
    }
    *length = until[item] - at[item];
    return text + at[item];
}

/* repeated_spans(text, starts, ends, others): the rows (int64, rising) whose bytes text[starts[row]:
 * ends[row]] equal another row's or one of `others` (a list of bytes): the candidates for values found
 * more than once (gateway/dlp/detections.py repeated), with one hash table over every row, linear where
 * sorting a bulk export's hashes grew faster than the export. */
static PyObject *repeated_spans(PyObject *self, PyObject *args) {
    Py_buffer text, starts, ends;
    PyObject *starts_object, *ends_object, *others, *result = NULL;
    if (!PyArg_ParseTuple(args, "y*OOO!", &text, &starts_object, &ends_object, &PyList_Type, &others))
        return NULL;
    if (spans_within(starts_object, ends_object, &starts, &ends, text.len) < 0) {
        PyBuffer_Release(&text);
        return NULL;
    }
    Py_ssize_t count = starts.len / 8, other_count = PyList_GET_SIZE(others);
    const int64_t *at = starts.buf, *until = ends.buf;
    const unsigned char *bytes = text.buf;
    int64_t *table = NULL; /* per slot: 0 empty, or an item + other_count + 1 */
    unsigned char *repeated = NULL;
    Py_ssize_t size = 16;
    for (Py_ssize_t i = 0; i < other_count; i++)
        if (!PyBytes_Check(PyList_GET_ITEM(others, i))) {
            PyErr_SetString(PyExc_TypeError, "others must be bytes");
            goto done;
        }
    while (size < 2 * (count + other_count)) /* at most half full */
        size *= 2;
    table = PyMem_Calloc(size, sizeof(int64_t));
    repeated = PyMem_Calloc(count ? count : 1, 1);
    if (!table || !repeated) {
        PyErr_NoMemory();
        goto done;
    }
    /* the others first (equal to one, a row is repeated), then each row: linear probing, each slot
     * holding the first item of its bytes (as item + other_count + 1) */
    for (Py_ssize_t item = -other_count; item < count; item++) {
        Py_ssize_t length, first_length;
        const unsigned char *value = item_span(item, others, bytes, at, until, &length);
        Py_ssize_t slot = (Py_ssize_t)(span_hash(value, length) & (uint64_t)(size - 1));
        for (;; slot = (slot + 1) & (size - 1)) {
            if (!table[slot]) {
                table[slot] = item + other_count + 1;
                break;
            }
            Py_ssize_t first = table[slot] - other_count - 1;
            const unsigned char *held = item_span(first, others, bytes, at, until, &first_length);
            if (first_length == length && !memcmp(held, value, length)) {
                if (item >= 0) {
                    repeated[item] = 1;
                    if (first >= 0)
                        repeated[first] = 1;
                }
                break;
            }
        }
    }
    Rows rows = {0};
    int failed = 0;
    for (Py_ssize_t row = 0; row < count && !failed; row++)
        if (repeated[row])
            failed = rows_push_one(&rows, row) < 0;
    result = failed ? PyErr_NoMemory() : PyBytes_FromStringAndSize((const char *)rows.items, rows.count * sizeof(int64_t));
    free(rows.items);
done:
    PyMem_Free(table);
    PyMem_Free(repeated);
    PyBuffer_Release(&text);
    PyBuffer_Release(&starts);
    PyBuffer_Release(&ends);
    return result;
}

/* span_bytes(text, starts, ends): 256 bytes, 1 for each byte value found in some span: which characters
 * a bulk export's values are written with (gateway/dlp/detections.py value_lengths_and_units). */
static PyObject *span_bytes(PyObject *self, PyObject *args) {
    Py_buffer text, starts, ends;
    PyObject *starts_object, *ends_object;
    if (!PyArg_ParseTuple(args, "y*OO", &text, &starts_object, &ends_object))
        return NULL;
    if (spans_within(starts_object, ends_object, &starts, &ends, text.len) < 0) {
        PyBuffer_Release(&text);
        return NULL;
    }
    char found[256] = {0};
    const int64_t *at = starts.buf, *until = ends.buf;
    const unsigned char *bytes = text.buf;
    for (Py_ssize_t i = 0; i < starts.len / 8; i++)
        for (int64_t offset = at[i]; offset < until[i]; offset++)
            found[bytes[offset]] = 1;
    PyBuffer_Release(&text);
    PyBuffer_Release(&starts);
    PyBuffer_Release(&ends);
    return PyBytes_FromStringAndSize(found, 256);
}

/* ---- a JSON text's keys ------------------------------------------------------------------------- */

/* The keys of the objects open in a JSON text, to tell whether one names a key twice. */
enum { OBJECT_KEYS_COMPARED = 64 }; /* past this many keys in one object, repeats are not looked for */

typedef struct {
    Py_ssize_t *starts, *lengths; /* the open objects' keys, innermost last */
    Py_ssize_t *frames;           /* per open bracket: where its object's keys start, or -1 for an array */
    Py_ssize_t key_count, depth, key_room, frame_room;
} OpenObjects;

static int grow(Py_ssize_t **items, Py_ssize_t *room, Py_ssize_t need) {
    if (need <= *room)
        return 0;
    Py_ssize_t more = *room ? *room * 2 : 64;
    while (more < need)
        more *= 2;
    Py_ssize_t *grown = PyMem_Realloc(*items, more * sizeof(Py_ssize_t));
    if (!grown)
        return -1;
    *items = grown;
    *room = more;
    return 0;
}

/* A key of the innermost open object: 1 if it is new there, 0 if that object names it already or cannot
 * hold it (no object open, too many keys to compare), -1 where memory ran out. */
static int object_key(OpenObjects *open, const unsigned char *text, Py_ssize_t start, Py_ssize_t length) {
    if (!open->depth || open->frames[open->depth - 1] < 0)
        return 0;
    Py_ssize_t first = open->frames[open->depth - 1];
    if (open->key_count - first >= OBJECT_KEYS_COMPARED)
        return 0;
    for (Py_ssize_t key = first; key < open->key_count; key++)
        if (open->lengths[key] == length && !memcmp(text + open->starts[key], text + start, length))
            return 0;
    Py_ssize_t room = open->key_room;
    if (grow(&open->starts, &room, open->key_count + 1) < 0 || grow(&open->lengths, &open->key_room, open->key_count + 1) < 0)
        return -1;
    open->starts[open->key_count] = start;
    open->lengths[open->key_count++] = length;
    return 1;
}

/* json_keys(data, spaces): (the distinct keys of a JSON text without backslash escapes, as bytes, in
 * the order first found; whether no object names a key twice, its brackets matched), or None where a
 * quote is followed by a byte of `spaces` (256 flags: the first bytes of what a regex's \s matches),
 * which could put spaces between a key and its colon, for the caller's regex. Each '":' ends a key,
 * which starts after the quote before it or two bytes after the '":' before it, whichever is later
 * (gateway/dlp/decode.py _json_keys). One pass and one hash set, where numpy sorted every key of a
 * bulk export several times over; the second answer lets a locator tell two equal values apart by the
 * strings they are in (decode.py _JsonLocator.cells). */
static PyObject *json_keys(PyObject *self, PyObject *args) {
    Py_buffer data, spaces;
    if (!PyArg_ParseTuple(args, "y*y*", &data, &spaces))
        return NULL;
    PyObject *keys = NULL, *result = NULL;
    int64_t *starts = NULL; /* per distinct key: its first start; and its length */
    Py_ssize_t *lengths = NULL, *table = NULL; /* per slot: 0 empty, or a distinct key's index + 1 */
    Py_ssize_t slots = 64, distinct = 0;
    OpenObjects open = {0};
    int unique = 1, in_string = 0;
    if (spaces.len != 256) {
        PyErr_SetString(PyExc_ValueError, "spaces must be 256 flags");
        goto done;
    }
    keys = PyList_New(0);
    table = PyMem_Calloc(slots, sizeof(Py_ssize_t));
    starts = PyMem_Malloc(slots / 2 * sizeof(int64_t));
    lengths = PyMem_Malloc(slots / 2 * sizeof(Py_ssize_t));
    if (!keys || !table || !starts || !lengths)
        goto failed;
    unsigned char read[256] = {0}; /* the bytes this pass stops at */
    read['"'] = read['{'] = read['}'] = read['['] = read[']'] = 1;
    const unsigned char *text = data.buf, *space = spaces.buf;
    Py_ssize_t size = data.len, previous_quote = -1, previous_marker = -2;
    for (Py_ssize_t at = 0; at < size; at++) {
        unsigned char byte = text[at];
        if (!read[byte])
            continue;
        if (byte != '"') { /* a bracket: structure outside strings */
            if (in_string)
                continue;
            if (byte == '{' || byte == '[') {
                if (grow(&open.frames, &open.frame_room, open.depth + 1) < 0)
                    goto failed;
                open.frames[open.depth++] = byte == '{' ? open.key_count : -1;
            } else if (!open.depth || (open.frames[open.depth - 1] >= 0) != (byte == '}')) {
                unique = 0; /* a bracket closing nothing, or what it did not open */
            } else if (open.frames[--open.depth] >= 0) {
                open.key_count = open.frames[open.depth];
            }
            continue;
        }
        in_string = !in_string;
        if (at + 1 < size && space[text[at + 1]]) {
            Py_CLEAR(keys);
            result = Py_NewRef(Py_None);
            goto done;
        }
        if (at + 1 < size && text[at + 1] == ':') {
            Py_ssize_t start = previous_quote + 1 > previous_marker + 2 ? previous_quote + 1 : previous_marker + 2;
            Py_ssize_t length = at - start, slot;
            if (unique) {
                int new_key = object_key(&open, text, start, length);
                if (new_key < 0)
                    goto failed;
                unique = new_key;
            }
            uint64_t hash = span_hash(text + start, length);
            for (slot = hash & (slots - 1); table[slot]; slot = (slot + 1) & (slots - 1)) {
                Py_ssize_t key = table[slot] - 1;
                if (lengths[key] == length && !memcmp(text + starts[key], text + start, length))
                    break;
            }
            if (!table[slot]) { /* a key not seen before */
                PyObject *key = PyBytes_FromStringAndSize((const char *)text + start, length);
                if (!key || PyList_Append(keys, key) < 0) {
                    Py_XDECREF(key);
                    goto failed;
                }
                Py_DECREF(key);
                starts[distinct] = start;
                lengths[distinct] = length;
                table[slot] = ++distinct;
                if (2 * distinct == slots) { /* half full: twice the slots, the keys placed again */
                    slots *= 2;
                    PyMem_Free(table);
                    table = PyMem_Calloc(slots, sizeof(Py_ssize_t));
                    int64_t *more_starts = PyMem_Realloc(starts, slots / 2 * sizeof(int64_t));
                    starts = more_starts ? more_starts : starts;
                    Py_ssize_t *more_lengths = PyMem_Realloc(lengths, slots / 2 * sizeof(Py_ssize_t));
                    lengths = more_lengths ? more_lengths : lengths;
                    if (!table || !more_starts || !more_lengths)
                        goto failed;
                    for (Py_ssize_t key = 0; key < distinct; key++) {
                        slot = span_hash(text + starts[key], lengths[key]) & (slots - 1);
                        while (table[slot])
                            slot = (slot + 1) & (slots - 1);
                        table[slot] = key + 1;
                    }
                }
            }
            previous_marker = at;
        }
        previous_quote = at;
    }
    result = Py_BuildValue("(OO)", keys, unique && !open.depth && !in_string ? Py_True : Py_False);
    goto done;
failed:
    if (!PyErr_Occurred())
        PyErr_NoMemory();
done:
    Py_XDECREF(keys);
    PyMem_Free(table);
    PyMem_Free(starts);
    PyMem_Free(lengths);
    PyMem_Free(open.starts);
    PyMem_Free(open.lengths);
    PyMem_Free(open.frames);
    PyBuffer_Release(&data);
    PyBuffer_Release(&spaces);
    return result;
}

/* join_spans(text, starts, ends): text[starts[i]:ends[i]] + b"\n" for each span, joined: a stream's window
 * copies its detections' tokens and values out this way before it is let go (gateway/dlp/stream.py). */
static PyObject *join_spans(PyObject *self, PyObject *args) {
    Py_buffer text, starts, ends;
    PyObject *starts_object, *ends_object, *joined = NULL;
    if (!PyArg_ParseTuple(args, "y*OO", &text, &starts_object, &ends_object))
        return NULL;
    if (spans_within(starts_object, ends_object, &starts, &ends, text.len) < 0) {
        PyBuffer_Release(&text);
        return NULL;
    }
    const int64_t *at = starts.buf, *until = ends.buf;
    Py_ssize_t count = starts.len / 8, size = count;
    for (Py_ssize_t i = 0; i < count; i++)
        size += until[i] - at[i];
    if ((joined = PyBytes_FromStringAndSize(NULL, size))) {
        char *write = PyBytes_AS_STRING(joined);
        for (Py_ssize_t i = 0; i < count; i++) {
            memcpy(write, (const char *)text.buf + at[i], until[i] - at[i]);
            write += until[i] - at[i];
            *write++ = '\n';
        }
    }
    PyBuffer_Release(&text);
    PyBuffer_Release(&starts);
    PyBuffer_Release(&ends);
    return joined;
}

/* ---- the places' digest ------------------------------------------------------------------------- */

/* place_lines(prefix, offsets): for each offset (a list of ints), prefix, a space, the offset in decimal
 * and a newline: the lines a findings group's digest reads for one location (gateway/dlp/tally.py
 * lines_of), where formatting a bulk export's thousand offsets one by one cost more than its rules. */
static PyObject *place_lines(PyObject *self, PyObject *args) {
    Py_buffer prefix;
    PyObject *offsets, *fast = NULL, *out = NULL;
    if (!PyArg_ParseTuple(args, "y*O", &prefix, &offsets))
        return NULL;
    fast = PySequence_Fast(offsets, "offsets must be a sequence of ints");
    if (!fast)
        goto done;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(fast), line = prefix.len + 22; /* " ", up to 20 digits, "\n" */
    if (count && line > PY_SSIZE_T_MAX / count) {
        PyErr_NoMemory();
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, line * count);
    if (!out)
        goto done;
    char *start = PyBytes_AS_STRING(out), *write = start;
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (Py_ssize_t index = 0; index < count; index++) {
        unsigned long long offset = PyLong_AsUnsignedLongLong(items[index]);
        if (offset == (unsigned long long)-1 && PyErr_Occurred()) { /* not an int, or negative */
            Py_CLEAR(out);
            goto done;
        }
        char digits[20];
        int made = 0;
        do {
            digits[made++] = (char)('0' + offset % 10);
            offset /= 10;
        } while (offset);
        memcpy(write, prefix.buf, prefix.len);
        write += prefix.len;
        *write++ = ' ';
        while (made)
            *write++ = digits[--made];
        *write++ = '\n';
    }
    _PyBytes_Resize(&out, write - start);
done:
    Py_XDECREF(fast);
    PyBuffer_Release(&prefix);
    return out;
}

static PyMethodDef methods[] = {
    {"compile_words", compile_words, METH_VARARGS, "Word patterns' forms compiled for scan_words."},
    {"scan_words", scan_words, METH_VARARGS, "Words the compiled forms match: int64 rows (pattern, start, end)."},
    {"compile_checks", compile_checks, METH_VARARGS, "The fixed-form checks' tables, compiled."},
    {"check", check, METH_VARARGS, "One kind's check over candidates: a byte each (1, 0, 2 undecided)."},
    {"settle_words", settle_words, METH_VARARGS, "Word matches settled by their detectors' checks."},
    {"gbk_to_utf8", gbk_to_utf8, METH_VARARGS, "GBK text as UTF-8, or None where the table does not read it."},
    {"fold_starts", fold_starts, METH_VARARGS, "Where the full-width characters to fold start: int64, rising."},
    {"blank_strings", blank_strings, METH_VARARGS, "A text's strings blanked, and where the marks left are."},
    {"repeated_spans", repeated_spans, METH_VARARGS, "Rows whose bytes equal another row's or one of others."},
    {"span_bytes", span_bytes, METH_VARARGS, "Which byte values the spans hold: 256 bytes of 0 or 1."},
    {"json_keys", json_keys, METH_VARARGS, "A JSON text's distinct keys, and whether no object repeats one; None if spaces may precede a colon."},
    {"join_spans", join_spans, METH_VARARGS, "The spans of a text, each followed by a newline, joined."},
    {"place_lines", place_lines, METH_VARARGS, "Each offset's digest line: prefix, a space, the offset, a newline."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "gateway.dlp._kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    for (int byte = 0; byte < 256; byte++)
        word_byte[byte] = (byte >= '0' && byte <= '9') || (byte >= 'A' && byte <= 'Z')
                          || (byte >= 'a' && byte <= 'z') || byte == '_';
    return PyModule_Create(&module);
}
