/*
 * libfusar_tiles: the C reader of the AEF tile store. docs/tilestore.md is the contract;
 * section names below ("Lookup", "Grids", ...) refer to it.
 *
 * Bit compatibility with the Python reference (fusar_edge/tiles/store.py, utm.py) rests
 * on three things: the same double operations in the same order (build with
 * -ffp-contract=off so the compiler fuses nothing), the same libm functions (sin, atanh,
 * atan2, ...), and the same de-quantisation table. Features are whole AEF pixels, so a
 * last-ulp difference (another libm, numpy's own SIMD sin/cos) could only matter for a
 * point within nanometres of a pixel edge.
 */
#define _POSIX_C_SOURCE 200809L /* mmap, strerror_r (XSI form), localtime_r, O_CLOEXEC */

#include "fusar_tiles.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define VEC_DIM FUSAR_TILES_VEC_DIM
#define HEADER_SIZE 64
#define RECORD_SIZE 256
#define PATH_BYTES 136 /* NUL-terminated relative path field of a record */
#define FORMAT_VERSION 1u
#define NODATA (-128)
#define EPSG_LONLAT 4326
#define PATH_MAX_LEN 4096
#define STACK_TILES 64 /* candidate buffers live on the stack up to this many tiles */

/* numpy's radians(x) is x * (pi / 180) with this double pi; keep the same product. */
#define DEG2RAD (3.141592653589793238462643383279502884 / 180.0)

/* ---- UTM (docs/tilestore.md, "Projection"; fusar_edge/tiles/utm.py) --------------------- */

typedef struct {
    double e;        /* first eccentricity, written through n */
    double k0a;      /* k0 times the rectifying radius */
    double alpha[6]; /* Krüger series coefficients alpha_1..alpha_6 */
} utm_consts;

/* Same expressions, same evaluation order as utm.py (Python's n**k is libm pow). */
static void utm_init(utm_consts *c)
{
    const double a = 6378137.0, f = 1.0 / 298.257223563, k0 = 0.9996;
    const double n = f / (2.0 - f);
    const double n2 = pow(n, 2.0), n3 = pow(n, 3.0), n4 = pow(n, 4.0), n5 = pow(n, 5.0), n6 = pow(n, 6.0);

    c->e = 2.0 * sqrt(n) / (1.0 + n);
    c->k0a = k0 * a / (1.0 + n) * (1.0 + n2 / 4.0 + n4 / 64.0 + n6 / 256.0);
    c->alpha[0] = n / 2.0 - 2.0 * n2 / 3.0 + 5.0 * n3 / 16.0 + 41.0 * n4 / 180.0 - 127.0 * n5 / 288.0 +
                  7891.0 * n6 / 37800.0;
    c->alpha[1] = 13.0 * n2 / 48.0 - 3.0 * n3 / 5.0 + 557.0 * n4 / 1440.0 + 281.0 * n5 / 630.0 -
                  1983433.0 * n6 / 1935360.0;
    c->alpha[2] = 61.0 * n3 / 240.0 - 103.0 * n4 / 140.0 + 15061.0 * n5 / 26880.0 + 167603.0 * n6 / 181440.0;
    c->alpha[3] = 49561.0 * n4 / 161280.0 - 179.0 * n5 / 168.0 + 6601661.0 * n6 / 7257600.0;
    c->alpha[4] = 34729.0 * n5 / 80640.0 - 3418889.0 * n6 / 1995840.0;
    c->alpha[5] = 212378941.0 * n6 / 319334400.0;
}

static double central_meridian(int zone)
{
    return 6.0 * zone - 183.0;
}

/* Tangent of the conformal latitude. It depends on the latitude alone, so a grid row (one
 * latitude) computes it once; reusing the value changes no bit of the result. */
static double conformal_tan(const utm_consts *c, double lat)
{
    const double sin_phi = sin(lat * DEG2RAD);
    return sinh(atanh(sin_phi) - c->e * atanh(c->e * sin_phi));
}

/* Easting and k0a * xi (the northing before any false northing) of one point, given
 * t = conformal_tan(lat): utm.py's lonlat_to_utm operation for operation, in real
 * arithmetic (the double angles of xi' and eta' follow algebraically from t and lambda,
 * so a point costs five transcendental calls). */
static void utm_forward(const utm_consts *c, double lon, double t, int zone, double *easting, double *k0a_xi)
{
    const double lam = (lon - central_meridian(zone)) * DEG2RAD;
    const double cos_lam = cos(lam), sin_lam = sin(lam);
    /* Gauss-Schreiber coordinates: xi' = atan2(t, cos lam), eta' = atanh(u) */
    const double xi_p = atan2(t, cos_lam);
    const double u = sin_lam / sqrt(1.0 + t * t);
    const double eta_p = atanh(u);
    /* sin/cos of 2 xi' and sinh/cosh of 2 eta' */
    const double r2 = t * t + cos_lam * cos_lam;
    const double sin2xi = 2.0 * t * cos_lam / r2;
    const double cos2xi = (cos_lam * cos_lam - t * t) / r2;
    const double d = 1.0 - u * u;
    const double sinh2eta = 2.0 * u / d;
    const double cosh2eta = (1.0 + u * u) / d;
    /* zeta = zeta' + sum_j alpha_j sin(2 j zeta') by Clenshaw's recurrence on complex values
     * written out: a = 2 cos(2 zeta') = a_r + i a_i, sin(2 zeta') = sin_r + i sin_i */
    const double sin_r = sin2xi * cosh2eta, sin_i = cos2xi * sinh2eta;
    const double a_r = 2.0 * (cos2xi * cosh2eta), a_i = -2.0 * (sin2xi * sinh2eta);
    double b1_r = 0.0, b1_i = 0.0, b2_r = 0.0, b2_i = 0.0;
    int j;

    for (j = 5; j >= 0; j--) { /* b1, b2 = a * b1 - b2 + alpha_j, b1 */
        const double n_r = a_r * b1_r - a_i * b1_i - b2_r + c->alpha[j];
        const double n_i = a_r * b1_i + a_i * b1_r - b2_i;
        b2_r = b1_r;
        b2_i = b1_i;
        b1_r = n_r;
        b1_i = n_i;
    }
    *easting = 500000.0 + c->k0a * (eta_p + (b1_r * sin_i + b1_i * sin_r));
    *k0a_xi = c->k0a * (xi_p + (b1_r * sin_r - b1_i * sin_i));
}

int fusar_tiles_lonlat_to_utm(double lon, double lat, int zone, int north, double *easting, double *northing)
{
    utm_consts c;
    double kxi;

    if (zone < 1 || zone > 60 || !easting || !northing)
        return FUSAR_TILES_EINVAL;
    utm_init(&c);
    utm_forward(&c, lon, conformal_tan(&c, lat), zone, easting, &kxi);
    *northing = kxi + (north ? 0.0 : 10000000.0);
    return 0;
}

/* ---- the handle ------------------------------------------------------------------------ */

typedef struct {
    int year, epsg, width, height;
    int zone, north; /* zone 0: EPSG:4326 (x = lon, y = lat) */
    double x0, y0, dx, dy;
    double lon_min, lat_min, lon_max, lat_max;
    double meridian;
    const signed char *data; /* the mapped tile: int8 [height][width][64] */
    size_t size;
} tile;

struct fusar_tiles {
    size_t n_tiles;
    tile *tiles;      /* index order */
    int n_years;
    int *years;       /* distinct, ascending */
    size_t *year_at;  /* n_years + 1 offsets into by_year */
    size_t *by_year;  /* tile indices grouped by year, index order within a year */
    utm_consts utm;
    float dequant[256]; /* float32 value of each int8 code, indexed by its byte */
    char generation[16];
};

const char *fusar_tiles_strerror(int code)
{
    switch (code) {
    case 0: return "success";
    case FUSAR_TILES_EINVAL: return "invalid argument";
    case FUSAR_TILES_ENOYEAR: return "the tile store has no tiles for that year";
    case FUSAR_TILES_ERANGE: return "year outside AEF's range (2017 to this year)";
    case FUSAR_TILES_ENOMEM: return "out of memory";
    case FUSAR_TILES_EOPEN: return "cannot open the tile store";
    default: return "unknown error";
    }
}

/* ---- open: helpers --------------------------------------------------------------------- */

static void set_err(char *err, size_t err_len, const char *fmt, ...)
{
    va_list ap;

    if (!err || err_len == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
}

/* errno text into a caller buffer: strerror() is not thread-safe, strerror_r (XSI) is. */
static const char *errno_text(int e, char *buf, size_t len)
{
    if (strerror_r(e, buf, len) != 0)
        snprintf(buf, len, "errno %d", e);
    return buf;
}

/* Little-endian decoding, independent of the host's byte order and alignment. */
static uint32_t rd_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int32_t rd_i32(const unsigned char *p)
{
    uint32_t u = rd_u32(p);
    int32_t v;
    memcpy(&v, &u, sizeof v); /* two's complement reinterpretation without overflow UB */
    return v;
}

static uint64_t rd_u64(const unsigned char *p)
{
    return (uint64_t)rd_u32(p) | (uint64_t)rd_u32(p + 4) << 32;
}

static double rd_f64(const unsigned char *p)
{
    uint64_t u = rd_u64(p);
    double v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* Read exactly len bytes at offset 0..; -1 with errno set on error, else bytes read. */
static ssize_t read_full(int fd, void *buf, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = read(fd, (char *)buf + done, len - done);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0)
            break;
        done += (size_t)r;
    }
    return (ssize_t)done;
}

static int join_path(char *out, const char *a, const char *b, const char *c)
{
    int n = c ? snprintf(out, PATH_MAX_LEN, "%s/%s/%s", a, b, c) : snprintf(out, PATH_MAX_LEN, "%s/%s", a, b);
    return n > 0 && n < PATH_MAX_LEN ? 0 : -1;
}

/* Printable copy of untrusted bytes for an error message. */
static void printable(char *out, size_t out_len, const char *in, size_t in_len)
{
    size_t i, k = 0;
    for (i = 0; i < in_len && k + 1 < out_len; i++)
        out[k++] = (in[i] >= 32 && in[i] < 127) ? in[i] : '?';
    out[k] = '\0';
}

/* CURRENT: "gen-" + six digits, surrounding whitespace allowed (like Python's strip()). */
static int read_current(const char *store, char *gen, char *err, size_t err_len)
{
    char path[PATH_MAX_LEN], buf[64], shown[48], why[128];
    const char *s, *e;
    ssize_t got;
    int fd, i;

    if (join_path(path, store, "CURRENT", NULL) != 0) {
        set_err(err, err_len, "tile store %s: path too long", store);
        return FUSAR_TILES_EINVAL;
    }
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT)
            set_err(err, err_len, "tile store %s: no CURRENT file; not a tile store, or an ingest never finished "
                                  "(run `fusar-edge tiles ingest ... --store` again)", store);
        else
            set_err(err, err_len, "%s: cannot open (%s)", path, errno_text(errno, why, sizeof why));
        return FUSAR_TILES_EOPEN;
    }
    got = read_full(fd, buf, sizeof buf);
    i = errno;
    close(fd);
    if (got < 0) {
        set_err(err, err_len, "%s: cannot read (%s)", path, errno_text(i, why, sizeof why));
        return FUSAR_TILES_EOPEN;
    }
    s = buf;
    e = buf + got;
    while (s < e && (*s == ' ' || (*s >= '\t' && *s <= '\r')))
        s++;
    while (e > s && (e[-1] == ' ' || (e[-1] >= '\t' && e[-1] <= '\r')))
        e--;
    if (e - s != 10 || memcmp(s, "gen-", 4) != 0)
        goto bad;
    for (i = 4; i < 10; i++)
        if (s[i] < '0' || s[i] > '9')
            goto bad;
    memcpy(gen, s, 10);
    gen[10] = '\0';
    return 0;
bad:
    printable(shown, sizeof shown, s, (size_t)(e - s) < 40 ? (size_t)(e - s) : 40);
    set_err(err, err_len, "%s: expected a generation name like gen-000001, got '%s'", path, shown);
    return FUSAR_TILES_EOPEN;
}

/* A record's path: NUL-terminated, relative, no ".." component (as TileRecord.validate). */
static int path_ok(const char *p)
{
    const char *seg = p;
    if (p[0] == '\0' || p[0] == '/')
        return 0;
    for (;;) {
        const char *slash = strchr(seg, '/');
        size_t len = slash ? (size_t)(slash - seg) : strlen(seg);
        if (len == 2 && seg[0] == '.' && seg[1] == '.')
            return 0;
        if (!slash)
            return 1;
        seg = slash + 1;
    }
}

/* Parse and check record i of index.bin (at rec) into *tl; path into path_out. */
static int parse_record(const unsigned char *rec, size_t i, const char *index_path, tile *tl, char *path_out,
                        char *err, size_t err_len)
{
    uint64_t file_size;
    const char *raw = (const char *)rec + 120;

    if (!memchr(raw, '\0', PATH_BYTES)) {
        set_err(err, err_len, "%s: record %zu: tile path is not NUL-terminated", index_path, i);
        return FUSAR_TILES_EOPEN;
    }
    memcpy(path_out, raw, PATH_BYTES);
    if (!path_ok(path_out)) {
        char shown[PATH_BYTES];
        printable(shown, sizeof shown, path_out, strlen(path_out));
        set_err(err, err_len, "%s: tile path '%s': expected a relative path under the store", index_path, shown);
        return FUSAR_TILES_EOPEN;
    }
    tl->year = rd_i32(rec + 0);
    tl->epsg = rd_i32(rec + 4);
    tl->width = rd_i32(rec + 8);
    tl->height = rd_i32(rec + 12);
    tl->x0 = rd_f64(rec + 16);
    tl->y0 = rd_f64(rec + 24);
    tl->dx = rd_f64(rec + 32);
    tl->dy = rd_f64(rec + 40);
    tl->lon_min = rd_f64(rec + 48);
    tl->lat_min = rd_f64(rec + 56);
    tl->lon_max = rd_f64(rec + 64);
    tl->lat_max = rd_f64(rec + 72);
    file_size = rd_u64(rec + 80);

    if (tl->epsg >= 32601 && tl->epsg <= 32660) {
        tl->zone = tl->epsg - 32600;
        tl->north = 1;
    } else if (tl->epsg >= 32701 && tl->epsg <= 32760) {
        tl->zone = tl->epsg - 32700;
        tl->north = 0;
    } else if (tl->epsg == EPSG_LONLAT) {
        tl->zone = 0;
        tl->north = 1;
    } else {
        set_err(err, err_len, "%s: tile %s: EPSG:%d is not a UTM zone (326xx/327xx) or EPSG:4326", index_path,
                path_out, tl->epsg);
        return FUSAR_TILES_EOPEN;
    }
    tl->meridian = tl->zone ? central_meridian(tl->zone) : 0.0;
    if (tl->width < 1 || tl->height < 1) {
        set_err(err, err_len, "%s: tile %s: size %dx%d must be positive", index_path, path_out, tl->width,
                tl->height);
        return FUSAR_TILES_EOPEN;
    }
    if (!(tl->dx > 0 && tl->dy > 0)) { /* also rejects NaN */
        set_err(err, err_len, "%s: tile %s: pixel size (%g, %g) must be positive", index_path, path_out, tl->dx,
                tl->dy);
        return FUSAR_TILES_EOPEN;
    }
    /* width, height < 2^31, so width * height * 64 < 2^68: check before multiplying by 64 */
    if ((uint64_t)tl->width * (uint64_t)tl->height > (uint64_t)SIZE_MAX / VEC_DIM ||
        file_size != (uint64_t)tl->width * (uint64_t)tl->height * VEC_DIM) {
        set_err(err, err_len, "%s: tile %s: file_size %llu != %d*%d*%d", index_path, path_out,
                (unsigned long long)file_size, tl->width, tl->height, VEC_DIM);
        return FUSAR_TILES_EOPEN;
    }
    tl->size = (size_t)file_size;
    return 0;
}

/* Map one tile file read-only after checking it is a regular file of the indexed size. */
static int map_tile(const char *store, const char *gen, const char *rel, tile *tl, char *err, size_t err_len)
{
    char path[PATH_MAX_LEN], why[128];
    struct stat st;
    void *p;
    int fd;

    if (join_path(path, store, rel, NULL) != 0) {
        set_err(err, err_len, "tile store %s: path of tile %s too long", store, rel);
        return FUSAR_TILES_EOPEN;
    }
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT)
            set_err(err, err_len, "%s: tile file missing (listed in %s/%s/index.bin); run `fusar-edge tiles "
                                  "verify --store %s`", path, store, gen, store);
        else
            set_err(err, err_len, "%s: cannot open tile file (%s)", path, errno_text(errno, why, sizeof why));
        return FUSAR_TILES_EOPEN;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        set_err(err, err_len, "%s: not a regular file", path);
        close(fd);
        return FUSAR_TILES_EOPEN;
    }
    if ((uint64_t)st.st_size != (uint64_t)tl->size) {
        set_err(err, err_len, "%s: %lld bytes, expected %llu (%dx%dx%d); truncated or corrupt", path,
                (long long)st.st_size, (unsigned long long)tl->size, tl->height, tl->width, VEC_DIM);
        close(fd);
        return FUSAR_TILES_EOPEN;
    }
    p = mmap(NULL, tl->size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd); /* the mapping keeps the file alive, even if a writer unlinks it later */
    if (p == MAP_FAILED) {
        set_err(err, err_len, "%s: cannot map %llu bytes (%s)", path, (unsigned long long)tl->size,
                errno_text(errno, why, sizeof why));
        return FUSAR_TILES_EOPEN;
    }
    /* A lookup touches one 64-byte pixel here and there: readahead would only waste I/O. */
    (void)posix_madvise(p, tl->size, POSIX_MADV_RANDOM);
    tl->data = (const signed char *)p;
    return 0;
}

static int cmp_int(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/* Distinct years and, per year, its tiles in index order (the lookup's tie-break order). */
static int group_years(fusar_tiles *t)
{
    size_t i, k = 0;
    int *sorted = malloc(t->n_tiles * sizeof *sorted);
    int y;

    if (!sorted)
        return FUSAR_TILES_ENOMEM;
    for (i = 0; i < t->n_tiles; i++)
        sorted[i] = t->tiles[i].year;
    qsort(sorted, t->n_tiles, sizeof *sorted, cmp_int);
    t->years = malloc(t->n_tiles * sizeof *t->years);
    t->year_at = malloc((t->n_tiles + 1) * sizeof *t->year_at);
    t->by_year = malloc(t->n_tiles * sizeof *t->by_year);
    if (!t->years || !t->year_at || !t->by_year) {
        free(sorted);
        return FUSAR_TILES_ENOMEM;
    }
    t->n_years = 0;
    for (i = 0; i < t->n_tiles; i++)
        if (i == 0 || sorted[i] != sorted[i - 1])
            t->years[t->n_years++] = sorted[i];
    free(sorted);
    for (y = 0; y < t->n_years; y++) {
        t->year_at[y] = k;
        for (i = 0; i < t->n_tiles; i++)
            if (t->tiles[i].year == t->years[y])
                t->by_year[k++] = i;
    }
    t->year_at[t->n_years] = k;
    return 0;
}

/* De-quantisation (docs/tilestore.md, "Tile files"): (q / 127.5)^2 * sign(q) in double,
 * rounded once to float32, as the reference's table. A table, so a lookup point costs 64
 * loads instead of 64 divisions. */
static void init_dequant(float *table)
{
    int code;
    for (code = 0; code < 256; code++) {
        const int q = code < 128 ? code : code - 256; /* the int8 whose byte is `code` */
        const double t = q / 127.5;
        double v = t * t;
        if (q < 0)
            v = -v;
        table[code] = (float)v;
    }
}

/* ---- open / close ---------------------------------------------------------------------- */

int fusar_tiles_open(const char *store_dir, fusar_tiles **out, char *err, size_t err_len)
{
    char store[PATH_MAX_LEN], index_path[PATH_MAX_LEN], why[128];
    unsigned char header[HEADER_SIZE], *records = NULL;
    fusar_tiles *t = NULL;
    struct stat st;
    uint64_t expected;
    uint32_t version, n, record_size, vec_dim;
    int32_t nodata;
    size_t len, i;
    ssize_t got;
    int fd = -1, rc, saved;

    if (err && err_len)
        err[0] = '\0';
    if (!out) {
        set_err(err, err_len, "fusar_tiles_open: out is NULL");
        return FUSAR_TILES_EINVAL;
    }
    *out = NULL;
    if (!store_dir || !*store_dir) {
        set_err(err, err_len, "fusar_tiles_open: no store directory given");
        return FUSAR_TILES_EINVAL;
    }
    len = strlen(store_dir);
    if (len >= PATH_MAX_LEN - PATH_BYTES - 32) {
        set_err(err, err_len, "tile store %.200s...: path too long", store_dir);
        return FUSAR_TILES_EINVAL;
    }
    memcpy(store, store_dir, len + 1);
    while (len > 1 && store[len - 1] == '/') /* "a/store/" -> "a/store" for tidy messages */
        store[--len] = '\0';
    if (stat(store, &st) != 0 || !S_ISDIR(st.st_mode)) {
        set_err(err, err_len, "tile store %s: no such directory", store);
        return FUSAR_TILES_EOPEN;
    }

    t = calloc(1, sizeof *t);
    if (!t) {
        set_err(err, err_len, "tile store %s: out of memory", store);
        return FUSAR_TILES_ENOMEM;
    }
    rc = read_current(store, t->generation, err, err_len);
    if (rc != 0)
        goto fail;
    if (join_path(index_path, store, t->generation, NULL) != 0 || stat(index_path, &st) != 0 ||
        !S_ISDIR(st.st_mode)) {
        set_err(err, err_len, "%s/CURRENT: names %s, which is missing", store, t->generation);
        rc = FUSAR_TILES_EOPEN;
        goto fail;
    }
    join_path(index_path, store, t->generation, "index.bin");

    /* index.bin: header first, so a bogus n_tiles is caught before anything is allocated */
    rc = FUSAR_TILES_EOPEN;
    fd = open(index_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT)
            set_err(err, err_len, "%s: missing", index_path);
        else
            set_err(err, err_len, "%s: cannot open (%s)", index_path, errno_text(errno, why, sizeof why));
        goto fail;
    }
    if (fstat(fd, &st) != 0) {
        set_err(err, err_len, "%s: cannot stat (%s)", index_path, errno_text(errno, why, sizeof why));
        goto fail;
    }
    got = read_full(fd, header, HEADER_SIZE);
    if (got < 0) {
        set_err(err, err_len, "%s: cannot read (%s)", index_path, errno_text(errno, why, sizeof why));
        goto fail;
    }
    if (got < HEADER_SIZE) {
        set_err(err, err_len, "%s: truncated (%lld bytes; the header alone is %d)", index_path, (long long)got,
                HEADER_SIZE);
        goto fail;
    }
    if (memcmp(header, "FUSARAEF", 8) != 0) {
        char shown[16];
        printable(shown, sizeof shown, (const char *)header, 8);
        set_err(err, err_len, "%s: not a fusar-edge tile index (magic '%s', expected 'FUSARAEF')", index_path,
                shown);
        goto fail;
    }
    version = rd_u32(header + 8);
    n = rd_u32(header + 12);
    record_size = rd_u32(header + 16);
    vec_dim = rd_u32(header + 20);
    nodata = rd_i32(header + 24);
    if (version != FORMAT_VERSION || record_size != RECORD_SIZE || vec_dim != VEC_DIM || nodata != NODATA) {
        set_err(err, err_len, "%s: unsupported index (version %u, record %u B, %u bands, nodata %d); this build "
                              "reads version %u", index_path, version, record_size, vec_dim, (int)nodata,
                FORMAT_VERSION);
        goto fail;
    }
    expected = HEADER_SIZE + (uint64_t)RECORD_SIZE * n;
    if ((uint64_t)st.st_size != expected) {
        set_err(err, err_len, "%s: %lld bytes, expected %llu for %u tiles (truncated or corrupt)", index_path,
                (long long)st.st_size, (unsigned long long)expected, n);
        goto fail;
    }
    if (n == 0) {
        set_err(err, err_len, "tile store %s: holds no tiles", store);
        goto fail;
    }
    if (expected > (uint64_t)SIZE_MAX || !(records = malloc((size_t)n * RECORD_SIZE)) ||
        !(t->tiles = calloc(n, sizeof *t->tiles))) {
        set_err(err, err_len, "%s: out of memory for %u tiles", index_path, n);
        rc = FUSAR_TILES_ENOMEM;
        goto fail;
    }
    got = read_full(fd, records, (size_t)n * RECORD_SIZE);
    saved = errno;
    close(fd);
    fd = -1;
    if (got != (ssize_t)((size_t)n * RECORD_SIZE)) {
        set_err(err, err_len, "%s: cannot read its %u records (%s)", index_path, n,
                got < 0 ? errno_text(saved, why, sizeof why) : "file shrank while reading");
        goto fail;
    }

    /* parse everything first, then map: a bad record fails before any mmap */
    for (i = 0; i < n; i++) {
        char rel[PATH_BYTES];
        rc = parse_record(records + i * RECORD_SIZE, i, index_path, &t->tiles[i], rel, err, err_len);
        if (rc != 0)
            goto fail;
    }
    t->n_tiles = n; /* from here on, close() unmaps whatever got mapped */
    for (i = 0; i < n; i++) {
        const char *rel = (const char *)records + i * RECORD_SIZE + 120;
        rc = map_tile(store, t->generation, rel, &t->tiles[i], err, err_len);
        if (rc != 0)
            goto fail;
    }
    free(records);
    records = NULL;

    rc = group_years(t);
    if (rc != 0) {
        set_err(err, err_len, "tile store %s: out of memory", store);
        goto fail;
    }
    utm_init(&t->utm);
    init_dequant(t->dequant);
    *out = t;
    return 0;

fail:
    if (fd >= 0)
        close(fd);
    free(records);
    fusar_tiles_close(t);
    return rc;
}

void fusar_tiles_close(fusar_tiles *t)
{
    size_t i;

    if (!t)
        return;
    if (t->tiles)
        for (i = 0; i < t->n_tiles; i++)
            if (t->tiles[i].data)
                munmap((void *)t->tiles[i].data, t->tiles[i].size);
    free(t->tiles);
    free(t->years);
    free(t->year_at);
    free(t->by_year);
    free(t);
}

/* ---- queries --------------------------------------------------------------------------- */

const char *fusar_tiles_generation(const fusar_tiles *t)
{
    return t ? t->generation : "";
}

size_t fusar_tiles_count_tiles(const fusar_tiles *t)
{
    return t ? t->n_tiles : 0;
}

int fusar_tiles_count_years(const fusar_tiles *t)
{
    return t ? t->n_years : 0;
}

int fusar_tiles_year(const fusar_tiles *t, int i)
{
    if (!t || i < 0 || i >= t->n_years)
        return FUSAR_TILES_EINVAL;
    return t->years[i];
}

int fusar_tiles_pick_year(const fusar_tiles *t, int acquisition_year)
{
    time_t now = time(NULL);
    struct tm today;
    int k, best = -1;

    if (!t || t->n_years == 0)
        return FUSAR_TILES_EINVAL;
    /* as the Python reference: AEF starts in 2017, and an acquisition cannot be in the future */
    if (acquisition_year < FUSAR_TILES_FIRST_YEAR ||
        (localtime_r(&now, &today) && acquisition_year > today.tm_year + 1900))
        return FUSAR_TILES_ERANGE;
    for (k = 0; k < t->n_years; k++) { /* ascending, strict '<': ties go to the earlier year */
        long d = labs((long)t->years[k] - acquisition_year);
        if (best < 0 || d < labs((long)t->years[best] - acquisition_year))
            best = k;
    }
    return t->years[best];
}

/* ---- lookup (docs/tilestore.md, "Lookup") ---------------------------------------------- */

static int find_year(const fusar_tiles *t, int year)
{
    int k;
    for (k = 0; k < t->n_years; k++)
        if (t->years[k] == year)
            return k;
    return -1;
}

static long lookup_core(const fusar_tiles *t, int year, size_t n, const double *lon, const double *lat,
                        float *features, unsigned char *mask)
{
    size_t stack_sel[STACK_TILES], stack_cand[STACK_TILES];
    double stack_key[STACK_TILES];
    size_t *sel = stack_sel, *cand = stack_cand;
    double *key = stack_key;
    double lo0 = INFINITY, lo1 = -INFINITY, la0 = INFINITY, la1 = -INFINITY;
    const size_t *ids;
    size_t m, n_sel = 0, i, s;
    long valid = 0;
    double t_lat = 0.0, t_conf = 0.0; /* conformal_tan(t_lat), kept across points */
    int have_t = 0, k = find_year(t, year);

    if (k < 0)
        return FUSAR_TILES_ENOYEAR;
    ids = t->by_year + t->year_at[k];
    m = t->year_at[k + 1] - t->year_at[k];

    /* Only tiles whose envelope meets the points' extent can be candidates; skipping the
     * rest up front is the same rule, just cheaper when a store holds many tiles. */
    for (s = 0; s < n; s++) {
        if (lon[s] < lo0) lo0 = lon[s];
        if (lon[s] > lo1) lo1 = lon[s];
        if (lat[s] < la0) la0 = lat[s];
        if (lat[s] > la1) la1 = lat[s];
    }
    if (m > STACK_TILES) {
        sel = malloc(m * sizeof *sel);
        cand = malloc(m * sizeof *cand);
        key = malloc(m * sizeof *key);
        if (!sel || !cand || !key) {
            free(sel);
            free(cand);
            free(key);
            return FUSAR_TILES_ENOMEM;
        }
    }
    for (i = 0; i < m; i++) {
        const tile *tl = &t->tiles[ids[i]];
        if (tl->lon_min <= lo1 && tl->lon_max >= lo0 && tl->lat_min <= la1 && tl->lat_max >= la0)
            sel[n_sel++] = ids[i];
    }

    for (s = 0; s < n; s++) {
        const double x_lon = lon[s], y_lat = lat[s];
        float *out = features + s * VEC_DIM;
        size_t n_cand = 0, c;
        int cached_zone = -1, found = 0;
        double cached_e = 0.0, cached_kxi = 0.0;

        /* 1-2. candidates (inclusive envelope), ordered by distance to the zone's central
         * meridian (lon/lat tiles: 0); insertion keeps equal keys in index order */
        for (i = 0; i < n_sel; i++) {
            const tile *tl = &t->tiles[sel[i]];
            double d;
            size_t at;
            if (!(x_lon >= tl->lon_min && x_lon <= tl->lon_max && y_lat >= tl->lat_min && y_lat <= tl->lat_max))
                continue;
            d = tl->zone ? fabs(x_lon - tl->meridian) : 0.0;
            for (at = n_cand; at > 0 && key[at - 1] > d; at--) {
                key[at] = key[at - 1];
                cand[at] = cand[at - 1];
            }
            key[at] = d;
            cand[at] = sel[i];
            n_cand++;
        }

        /* 3. first candidate whose pixel has data wins */
        for (c = 0; c < n_cand && !found; c++) {
            const tile *tl = &t->tiles[cand[c]];
            double x, y, colf, rowf;
            if (tl->zone == 0) {
                x = x_lon;
                y = y_lat;
            } else {
                /* north and south tiles of a zone share the projection; only the false
                 * northing differs, added exactly as the reference adds it */
                if (tl->zone != cached_zone) {
                    if (!have_t || memcmp(&t_lat, &y_lat, sizeof t_lat) != 0) { /* bitwise: -0.0 != 0.0 */
                        t_conf = conformal_tan(&t->utm, y_lat);
                        t_lat = y_lat;
                        have_t = 1;
                    }
                    utm_forward(&t->utm, x_lon, t_conf, tl->zone, &cached_e, &cached_kxi);
                    cached_zone = tl->zone;
                }
                x = cached_e;
                y = cached_kxi + (tl->north ? 0.0 : 10000000.0);
            }
            colf = floor((x - tl->x0) / tl->dx);
            rowf = floor((tl->y0 - y) / tl->dy);
            /* compared as doubles before any cast: NaN and far-away points fail here */
            if (colf >= 0 && colf < tl->width && rowf >= 0 && rowf < tl->height) {
                const signed char *px = tl->data + ((size_t)rowf * (size_t)tl->width + (size_t)colf) * VEC_DIM;
                if (px[0] != NODATA) {
                    int b;
                    for (b = 0; b < VEC_DIM; b++)
                        out[b] = t->dequant[(unsigned char)px[b]];
                    found = 1;
                }
            }
        }
        /* 4. nothing found */
        if (!found)
            memset(out, 0, VEC_DIM * sizeof *out);
        mask[s] = (unsigned char)found;
        valid += found;
    }

    if (sel != stack_sel) {
        free(sel);
        free(cand);
        free(key);
    }
    return valid;
}

long fusar_tiles_lookup_points(const fusar_tiles *t, int year, size_t n, const double *lon, const double *lat,
                               float *features, unsigned char *mask)
{
    if (!t || (n > 0 && (!lon || !lat || !features || !mask)))
        return FUSAR_TILES_EINVAL;
    if (n > (size_t)LONG_MAX) /* the count of valid points must fit the return value */
        return FUSAR_TILES_EINVAL;
    return lookup_core(t, year, n, lon, lat, features, mask);
}

long fusar_tiles_lookup_bbox(const fusar_tiles *t, int year, double lon_min, double lat_min, double lon_max,
                             double lat_max, int rows, int cols, float *features, float *positions,
                             unsigned char *mask)
{
    double *lon, *lat;
    size_t n;
    long valid;
    int i, j;

    if (!t || !features || !mask || rows < 1 || cols < 1)
        return FUSAR_TILES_EINVAL;
    /* the bounds Anchor enforces (written so that NaN fails) */
    if (!(lon_min >= -180.0 && lon_max <= 180.0 && lat_min >= -90.0 && lat_max <= 90.0 && lon_min < lon_max &&
          lat_min < lat_max))
        return FUSAR_TILES_EINVAL;
    n = (size_t)rows * (size_t)cols;
    if (n > SIZE_MAX / (VEC_DIM * sizeof *features)) /* the caller could not hold the output anyway */
        return FUSAR_TILES_EINVAL;
    lon = malloc(n * sizeof *lon);
    lat = malloc(n * sizeof *lat);
    if (!lon || !lat) {
        free(lon);
        free(lat);
        return FUSAR_TILES_ENOMEM;
    }
    /* "Grids": cell centres, evaluated in double in exactly the documented order */
    for (i = 0; i < rows; i++) {
        const double fy = ((double)i + 0.5) / rows;
        const double y = lat_max - (lat_max - lat_min) * fy;
        for (j = 0; j < cols; j++) {
            const double fx = ((double)j + 0.5) / cols;
            const size_t s = (size_t)i * (size_t)cols + (size_t)j;
            lon[s] = lon_min + (lon_max - lon_min) * fx;
            lat[s] = y;
            if (positions) {
                positions[2 * s] = (float)fy;
                positions[2 * s + 1] = (float)fx;
            }
        }
    }
    valid = lookup_core(t, year, n, lon, lat, features, mask);
    free(lon);
    free(lat);
    return valid;
}
