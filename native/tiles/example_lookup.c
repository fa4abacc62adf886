/*
 * example_lookup: look up one footprint in an AEF tile store with libfusar_tiles, print
 * what came back, then time the lookup (this is the C latency benchmark).
 *
 *   example_lookup STORE YEAR LON_MIN LAT_MIN LON_MAX LAT_MAX [ROWS COLS [RUNS]]
 *
 * YEAR is the acquisition year; the store's nearest year is used (docs/tilestore.md).
 * Timings are of warm lookups (tile pages already in the page cache after the first run).
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */

#include "fusar_tiles.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static int parse_int(const char *s, const char *what, int lo, int hi, int *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < lo || v > hi) {
        fprintf(stderr, "example_lookup: %s: expected an integer in %d..%d, got '%s'\n", what, lo, hi, s);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int parse_double(const char *s, const char *what, double *out)
{
    char *end;
    *out = strtod(s, &end);
    if (*s == '\0' || *end != '\0') {
        fprintf(stderr, "example_lookup: %s: expected a number, got '%s'\n", what, s);
        return -1;
    }
    return 0;
}

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    static const char *names[] = {"LON_MIN", "LAT_MIN", "LON_MAX", "LAT_MAX"};
    char err[1024];
    double box[4], *times, total = 0.0;
    float *features, *positions;
    unsigned char *mask;
    fusar_tiles *t;
    int asked, year, rows = 16, cols = 16, runs = 5000, i, first = -1;
    long valid = 0;
    size_t n;

    if (argc != 7 && argc != 9 && argc != 10) {
        fprintf(stderr, "usage: %s STORE YEAR LON_MIN LAT_MIN LON_MAX LAT_MAX [ROWS COLS [RUNS]]\n", argv[0]);
        return 2;
    }
    if (parse_int(argv[2], "YEAR", 0, 9999, &asked) != 0)
        return 2;
    for (i = 0; i < 4; i++)
        if (parse_double(argv[3 + i], names[i], &box[i]) != 0)
            return 2;
    if (argc >= 9 && (parse_int(argv[7], "ROWS", 1, 4096, &rows) != 0 ||
                      parse_int(argv[8], "COLS", 1, 4096, &cols) != 0))
        return 2;
    if (argc == 10 && parse_int(argv[9], "RUNS", 1, 10000000, &runs) != 0)
        return 2;

    if (fusar_tiles_open(argv[1], &t, err, sizeof err) != 0) {
        fprintf(stderr, "example_lookup: %s\n", err);
        return 1;
    }
    printf("store: %s (%s, %zu tiles, years", argv[1], fusar_tiles_generation(t), fusar_tiles_count_tiles(t));
    for (i = 0; i < fusar_tiles_count_years(t); i++)
        printf(" %d", fusar_tiles_year(t, i));
    printf(")\n");

    year = fusar_tiles_pick_year(t, asked);
    if (year < 0) {
        fprintf(stderr, "example_lookup: year %d: %s\n", asked, fusar_tiles_strerror(year));
        fusar_tiles_close(t);
        return 1;
    }
    printf("year: asked %d, used %d\n", asked, year);

    n = (size_t)rows * (size_t)cols;
    features = malloc(n * FUSAR_TILES_VEC_DIM * sizeof *features);
    positions = malloc(n * 2 * sizeof *positions);
    mask = malloc(n);
    times = malloc((size_t)runs * sizeof *times);
    if (!features || !positions || !mask || !times) {
        fprintf(stderr, "example_lookup: out of memory\n");
        return 1;
    }

    /* the first run also faults the touched tile pages in; it is reported, not timed */
    for (i = -1; i < runs; i++) {
        double t0 = now_us();
        valid = fusar_tiles_lookup_bbox(t, year, box[0], box[1], box[2], box[3], rows, cols, features, positions,
                                        mask);
        double dt = now_us() - t0;
        if (valid < 0) {
            fprintf(stderr, "example_lookup: lookup failed: %s\n", fusar_tiles_strerror((int)valid));
            return 1;
        }
        if (i < 0)
            printf("first lookup (maps the touched tile pages in): %.1f us\n", dt);
        else
            total += (times[i] = dt);
    }

    printf("grid: %d x %d over [%.6f, %.6f, %.6f, %.6f]; coverage %ld/%zu (%.1f%%)\n", rows, cols, box[0], box[1],
           box[2], box[3], valid, n, 100.0 * (double)valid / (double)n);
    for (i = 0; (size_t)i < n; i++)
        if (mask[i]) {
            first = i;
            break;
        }
    if (first >= 0) {
        printf("point %d at (y %.5f, x %.5f):", first, positions[2 * first], positions[2 * first + 1]);
        for (i = 0; i < 8; i++)
            printf(" %.6f", features[(size_t)first * FUSAR_TILES_VEC_DIM + (size_t)i]);
        printf(" ...\n");
    }

    qsort(times, (size_t)runs, sizeof *times, cmp_double);
    printf("lookup of %zu points, %d warm runs: mean %.2f us, p50 %.2f us, p99 %.2f us, min %.2f us "
           "(%.3f us per point)\n", n, runs, total / runs, times[runs / 2], times[(size_t)(runs * 0.99)],
           times[0], total / runs / (double)n);

    free(features);
    free(positions);
    free(mask);
    free(times);
    fusar_tiles_close(t);
    return 0;
}
