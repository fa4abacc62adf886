/*
 * libfusar_tiles: read-only C reader of the fusar-edge AEF tile store.
 *
 * The on-disk format and the lookup rules are normative in docs/tilestore.md; this reader
 * follows them so that it returns the same float32 bytes as the Python reference
 * (fusar_edge/tiles/store.py). C99, libc + libm + POSIX mmap only.
 *
 * Thread safety: a fusar_tiles handle is immutable after fusar_tiles_open() returns, and
 * the library keeps no global state, so any number of threads may call the lookup and
 * query functions on one handle at once. fusar_tiles_close() must not race with them.
 *
 * Typical use:
 *
 *     char err[512];
 *     fusar_tiles *t;
 *     if (fusar_tiles_open("/data/aef-store", &t, err, sizeof err) != 0) { puts(err); ... }
 *     int year = fusar_tiles_pick_year(t, 2023);            // nearest stored year
 *     float feat[256 * 64], pos[256 * 2]; unsigned char mask[256];
 *     long valid = fusar_tiles_lookup_bbox(t, year, 11.50, 48.10, 11.57, 48.15, 16, 16,
 *                                          feat, pos, mask);
 *     fusar_tiles_close(t);
 */
#ifndef FUSAR_TILES_H
#define FUSAR_TILES_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__) && defined(FUSAR_TILES_BUILDING)
#define FUSAR_TILES_API __attribute__((visibility("default")))
#else
#define FUSAR_TILES_API
#endif

/* Features per lookup point (AEF embedding dimension). */
#define FUSAR_TILES_VEC_DIM 64
/* AEF begins in 2017; fusar_tiles_pick_year() refuses earlier years. */
#define FUSAR_TILES_FIRST_YEAR 2017

/* Error codes: every function that can fail returns one of these (< 0). */
#define FUSAR_TILES_EINVAL (-1)  /* bad argument: NULL pointer, empty grid, bad box */
#define FUSAR_TILES_ENOYEAR (-2) /* the store has no tiles for the year asked */
#define FUSAR_TILES_ERANGE (-3)  /* year before 2017 or after the current year */
#define FUSAR_TILES_ENOMEM (-4)  /* out of memory */
#define FUSAR_TILES_EOPEN (-5)   /* fusar_tiles_open() failed; the message is in err */

typedef struct fusar_tiles fusar_tiles;

/* A static, human-readable description of an error code (never NULL, thread-safe). */
FUSAR_TILES_API const char *fusar_tiles_strerror(int code);

/*
 * Open the generation named by STORE/CURRENT: read and validate index.bin (magic, version,
 * sizes, every record) and memory-map every tile file it names, checking each file's size.
 * Tile contents are not hashed (that is `fusar-edge tiles verify`).
 * Returns 0 and sets *out, or FUSAR_TILES_EOPEN / EINVAL / ENOMEM with *out = NULL and a
 * one-line message naming the file and the problem in err (truncated to err_len bytes,
 * always NUL-terminated when err_len > 0; err may be NULL).
 */
FUSAR_TILES_API int fusar_tiles_open(const char *store_dir, fusar_tiles **out, char *err, size_t err_len);

/* Unmap and free everything. NULL is allowed. */
FUSAR_TILES_API void fusar_tiles_close(fusar_tiles *t);

/* The generation in force when the store was opened, e.g. "gen-000003". */
FUSAR_TILES_API const char *fusar_tiles_generation(const fusar_tiles *t);

/* Number of tile records in the index. */
FUSAR_TILES_API size_t fusar_tiles_count_tiles(const fusar_tiles *t);

/* The distinct years held, ascending: fusar_tiles_year(t, i) for 0 <= i < count_years. */
FUSAR_TILES_API int fusar_tiles_count_years(const fusar_tiles *t);
FUSAR_TILES_API int fusar_tiles_year(const fusar_tiles *t, int i); /* EINVAL when i is out of range */

/*
 * The year to use for an image acquired in acquisition_year: that year if stored, else the
 * nearest stored year (ties: the earlier). ERANGE when acquisition_year is before 2017 or
 * after the current (local) year, EINVAL when t is NULL.
 */
FUSAR_TILES_API int fusar_tiles_pick_year(const fusar_tiles *t, int acquisition_year);

/*
 * Look up n WGS84 points (degrees) in the tiles of `year` (docs/tilestore.md, "Lookup").
 * features: n * 64 floats, row-major; mask: n bytes, 1 where a pixel with data was found,
 * else 0 (and the point's 64 features are 0). Points are independent: a NaN point simply
 * finds nothing. Returns the number of points with mask 1, or ENOYEAR / EINVAL / ENOMEM.
 */
FUSAR_TILES_API long fusar_tiles_lookup_points(const fusar_tiles *t, int year, size_t n, const double *lon,
                                               const double *lat, float *features, unsigned char *mask);

/*
 * Look up a rows x cols grid laid over the lon/lat box (docs/tilestore.md, "Grids"):
 * point s = i * cols + j sits at the centre of cell (i, j), row 0 in the north.
 * features: rows*cols*64 floats; positions (may be NULL): rows*cols*2 floats, the
 * normalised (y, x) = ((i + 0.5) / rows, (j + 0.5) / cols); mask: rows*cols bytes.
 * The box must satisfy -180 <= lon_min < lon_max <= 180, -90 <= lat_min < lat_max <= 90
 * (no antimeridian crossing), else EINVAL. Returns the number of valid points, or < 0.
 */
FUSAR_TILES_API long fusar_tiles_lookup_bbox(const fusar_tiles *t, int year, double lon_min, double lat_min,
                                             double lon_max, double lat_max, int rows, int cols, float *features,
                                             float *positions, unsigned char *mask);

/*
 * WGS84 lon/lat (degrees) -> UTM easting/northing (metres) in `zone` (1..60), the series
 * the lookup uses (Krüger / Karney 6th order, same operations as fusar_edge/tiles/utm.py).
 * Exposed for tests and tools; returns EINVAL for a bad zone or NULL outputs.
 */
FUSAR_TILES_API int fusar_tiles_lonlat_to_utm(double lon, double lat, int zone, int north, double *easting,
                                              double *northing);

#ifdef __cplusplus
}
#endif

#endif /* FUSAR_TILES_H */
