/* The CPU products of a decode step: y = x W^T for a few rows of x, in fp32 and in int8
 * (and, with AVX-512 VNNI, a prompt's many rows in int8).
 *
 * Why: at batch 1 a decode step is one matrix-vector product per weight matrix, and its speed is
 * the memory bandwidth. torch's one-row product (MKL) leaves the second core idle; here each
 * matrix is split between the threads by output rows (OpenMP, the pool torch itself uses).
 * cpu_kernels.py compiles this file on first use; docs/SPEED.md has the measurements.
 *
 *   p3_linear_f32   x (m, k) fp32, w (n, k) fp32                      -> y (m, n) = x w^T
 *   p3_linear_int8  x (m, k) fp32, w (n, k) int8, scale (n,) fp32     -> y (m, n) = (xq w^T) * scale
 *
 * int8 does what llama.cpp's Q8_0 does: each row of x is rounded to int8 in blocks of 32, one
 * scale a block (max |x| / 127), and the dot products run on int8 pairs.
 * Rows of x loop inside the rows of w, so that w is read from memory once.
 * Three branches, by what the compiler may use (-march=native: what this CPU has):
 * - AVX-512 with VNNI: vpdpbusd sums four byte products into each int32 lane, one instruction.
 *   A prompt's int8 product is then a GEMM (gemm_int8) that beats MKL's fp32 one.
 * - AVX2 and FMA: maddubs and madd, two instructions for what vpdpbusd does.
 * - Neither: plain loops that the compiler vectorizes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define QBLOCK 32 /* inputs that share one int8 scale of x */

/* One row of w over inputs from..k, in plain C: the inputs beyond the vector loop's last
 * step, and without AVX2 every input. from is a multiple of QBLOCK. */
static float tail_f32(const float *w, const float *x, int64_t from, int64_t k) {
    float s = 0;
    for (int64_t j = from; j < k; j++) s += w[j] * x[j];
    return s;
}

static float tail_int8(const int8_t *w, const int8_t *xq, const float *xs, int64_t from, int64_t k) {
    float s = 0;
    for (int64_t j = from; j < k; j += QBLOCK) {
        int32_t t = 0;
        for (int64_t i = j; i < k && i < j + QBLOCK; i++) t += (int16_t)w[i] * (int16_t)xq[i];
        s += xs[j / QBLOCK] * (float)t;
    }
    return s;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define HAVE_VNNI 1

/* w0 . x and w1 . x over inputs 0..kv (a multiple of 32): two rows far apart, two memory streams */
static void dot2_f32(const float *w0, const float *w1, const float *x, int64_t kv, float *s0, float *s1) {
    __m512 a0 = _mm512_setzero_ps(), b0 = a0, a1 = a0, b1 = a0;
    for (int64_t j = 0; j < kv; j += 32) {
        __m512 x0 = _mm512_loadu_ps(x + j), x1 = _mm512_loadu_ps(x + j + 16);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + j), x0, a0);
        b0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + j + 16), x1, b0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + j), x0, a1);
        b1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + j + 16), x1, b1);
    }
    *s0 = _mm512_reduce_add_ps(_mm512_add_ps(a0, b0)), *s1 = _mm512_reduce_add_ps(_mm512_add_ps(a1, b1));
}
#define F32_STEP 32

/* The int8 dot products of two 32-byte blocks, as 16 int32 sums (lanes 0-7 the first block).
 * vpdpbusd multiplies unsigned by signed bytes, so |x| is the unsigned side, and w is negated
 * where x is negative. */
static inline __m512i dot_blocks(__m512i w, __m512i ax, __mmask64 negative) {
    const __m512i zero = _mm512_setzero_si512();
    return _mm512_dpbusd_epi32(zero, ax, _mm512_mask_sub_epi8(w, negative, zero, w));
}

/* The scales of blocks b and b + 1 of x, for the 16 lanes dot_blocks gives: 8 each. */
static inline __m512 two_scales(const float *xs, int64_t b) {
    return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(xs[b]), _mm512_set1_ps(xs[b + 1]));
}

/* One 64-input step of dot2_int8: rows wa and wb at inputs j..j+63, added into *a and *b. */
static inline void step2_int8(const int8_t *wa, const int8_t *wb, const int8_t *xq, const float *xs, int64_t j,
                              __m512 *a, __m512 *b) {
    __m512i x = _mm512_loadu_si512(xq + j), ax = _mm512_abs_epi8(x);
    __mmask64 negative = _mm512_movepi8_mask(x);
    __m512 s = two_scales(xs, j / QBLOCK);
    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_blocks(_mm512_loadu_si512(wa + j), ax, negative)), s, *a);
    *b = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_blocks(_mm512_loadu_si512(wb + j), ax, negative)), s, *b);
}

/* out[0], out[1] = the sums over blocks b of xs[b] * (xq . row, over block b), for the rows wa and
 * wb: two rows far apart, as in dot2_f32. Inputs 0..kv, a multiple of 64. */
static void dot2_int8(const int8_t *wa, const int8_t *wb, const int8_t *xq, const float *xs, int64_t kv,
                      float *out) {
    __m512 a0 = _mm512_setzero_ps(), b0 = a0, a1 = a0, b1 = a0;
    int64_t j = 0;
    for (; j + 128 <= kv; j += 128) { /* two steps at a time: two sums a row in flight */
        step2_int8(wa, wb, xq, xs, j, &a0, &a1);
        step2_int8(wa, wb, xq, xs, j + 64, &b0, &b1);
    }
    for (; j < kv; j += 64) step2_int8(wa, wb, xq, xs, j, &a0, &a1);
    out[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, b0)), out[1] = _mm512_reduce_add_ps(_mm512_add_ps(a1, b1));
}
#define INT8_STEP 64

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a);
    a = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(a);
}

/* w0 . x and w1 . x over inputs 0..kv (a multiple of 16): two rows far apart, two memory streams */
static void dot2_f32(const float *w0, const float *w1, const float *x, int64_t kv, float *s0, float *s1) {
    __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0;
    for (int64_t j = 0; j < kv; j += 16) {
        __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + j), x0, a0);
        b0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + j + 8), x1, b0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + j), x0, a1);
        b1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + j + 8), x1, b1);
    }
    *s0 = hsum(_mm256_add_ps(a0, b0)), *s1 = hsum(_mm256_add_ps(a1, b1));
}
#define F32_STEP 16

/* The int8 dot product of one 32-byte block, as 8 int32 partial sums. maddubs multiplies
 * unsigned by signed bytes, so |x| is the unsigned side and w takes x's sign. */
static inline __m256i dot_block(__m256i w, __m256i x, __m256i ax) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w, x)), _mm256_set1_epi16(1));
}

/* One 32-input step (a block) of dot2_int8: rows wa and wb at inputs j..j+31, added into *a and *b. */
static inline void step2_int8(const int8_t *wa, const int8_t *wb, const int8_t *xq, const float *xs, int64_t j,
                              __m256 *a, __m256 *b) {
    __m256i x = _mm256_loadu_si256((const __m256i *)(xq + j)), ax = _mm256_sign_epi8(x, x);
    __m256 s = _mm256_broadcast_ss(xs + j / QBLOCK);
    *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block(_mm256_loadu_si256((const __m256i *)(wa + j)), x, ax)), s, *a);
    *b = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block(_mm256_loadu_si256((const __m256i *)(wb + j)), x, ax)), s, *b);
}

/* out[0], out[1] = the sums over blocks b of xs[b] * (xq . row, over block b), for the rows wa and
 * wb: two rows far apart, as in dot2_f32. Inputs 0..kv, a multiple of 32. */
static void dot2_int8(const int8_t *wa, const int8_t *wb, const int8_t *xq, const float *xs, int64_t kv,
                      float *out) {
    __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0;
    int64_t j = 0;
    for (; j + 64 <= kv; j += 64) { /* two steps at a time: two sums a row in flight */
        step2_int8(wa, wb, xq, xs, j, &a0, &a1);
        step2_int8(wa, wb, xq, xs, j + 32, &b0, &b1);
    }
    for (; j < kv; j += QBLOCK) step2_int8(wa, wb, xq, xs, j, &a0, &a1);
    out[0] = hsum(_mm256_add_ps(a0, b0)), out[1] = hsum(_mm256_add_ps(a1, b1));
}
#define INT8_STEP QBLOCK
#else /* plain loops (tail_f32 and tail_int8 over every input): the compiler vectorizes them */

static void dot2_f32(const float *w0, const float *w1, const float *x, int64_t kv, float *s0, float *s1) {
    *s0 = tail_f32(w0, x, 0, kv), *s1 = tail_f32(w1, x, 0, kv);
}
#define F32_STEP 1

static void dot2_int8(const int8_t *wa, const int8_t *wb, const int8_t *xq, const float *xs, int64_t kv,
                      float *out) {
    out[0] = tail_int8(wa, xq, xs, 0, kv), out[1] = tail_int8(wb, xq, xs, 0, kv);
}
#define INT8_STEP QBLOCK

#endif

/* Rows lo..hi of w are this thread's: a contiguous share (the whole matrix without OpenMP). */
static void share(int64_t n, int64_t *lo, int64_t *hi) {
#ifdef _OPENMP
    int64_t t = omp_get_thread_num(), threads = omp_get_num_threads();
#else
    int64_t t = 0, threads = 1;
#endif
    *lo = n * t / threads, *hi = n * (t + 1) / threads;
}

/* Each thread walks the two halves of its rows side by side: row r with row r + half. Two
 * streams a core keep more of memory's requests in flight than one, and than four interleaved
 * rows (a 65 MB head of 512-wide rows: 32 against 27 GB/s here). */
void p3_linear_f32(const float *x, const float *w, float *y, int64_t m, int64_t n, int64_t k) {
    const int64_t kv = k - k % F32_STEP; /* inputs the vector loop takes */
#pragma omp parallel
    {
        int64_t lo, hi;
        share(n, &lo, &hi);
        const int64_t half = (hi - lo) / 2;
        for (int64_t r = lo; r < lo + half; r++) {
            const float *w0 = w + r * k, *w1 = w + (r + half) * k;
            for (int64_t i = 0; i < m; i++) {
                const float *xi = x + i * k;
                float s0, s1;
                dot2_f32(w0, w1, xi, kv, &s0, &s1);
                y[i * n + r] = s0 + tail_f32(w0, xi, kv, k);
                y[i * n + r + half] = s1 + tail_f32(w1, xi, kv, k);
            }
        }
        if ((hi - lo) % 2) /* the odd row out */
            for (int64_t i = 0; i < m; i++) y[i * n + hi - 1] = tail_f32(w + (hi - 1) * k, x + i * k, 0, k);
    }
}

/* Row i of x as int8 in blocks of 32: xq (k,), and xs (blocks,), max |x| / 127 of each block.
 * Rounding is to the nearest, ties to even, in both branches (lrintf and cvtps, by default). */
static void quantize_row(const float *x, int64_t k, int8_t *xq, float *xs) {
    int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)  /* AVX-512 CPUs have AVX2 too */
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (; j + QBLOCK <= k; j += QBLOCK) {
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(x + j + 8 * i);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float s = _mm_cvtss_f32(m4) / 127, inv = s > 0 ? 1 / s : 0;
        xs[j / QBLOCK] = s;
        __m256 vinv = _mm256_set1_ps(inv);
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vinv));
        /* packs work within 128-bit lanes: the permute puts the 32 bytes back in order */
        __m256i q16 = _mm256_packs_epi32(q[0], q[1]), q16b = _mm256_packs_epi32(q[2], q[3]);
        __m256i q8 = _mm256_packs_epi16(q16, q16b);
        q8 = _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(xq + j), q8);
    }
#endif
    for (; j < k; j += QBLOCK) {
        int64_t end = j + QBLOCK < k ? j + QBLOCK : k;
        float amax = 0;
        for (int64_t i = j; i < end; i++) amax = fmaxf(amax, fabsf(x[i]));
        float s = amax / 127, inv = s > 0 ? 1 / s : 0;
        xs[j / QBLOCK] = s;
        for (int64_t i = j; i < end; i++) xq[i] = (int8_t)lrintf(x[i] * inv);
    }
}

#ifdef HAVE_VNNI
/* A prompt's int8 product, y = (xq w^T) * scale for many rows of x, as a GEMM.
 *
 * For one row at a time, each vpdpbusd above sums inputs of one row of w, and its 16 lanes are
 * added up at the end. Here the lanes are 16 rows of w instead: w is copied into panels of 16
 * rows, where the 64 bytes at 4-input step q hold inputs 4q..4q+3 of each of the 16 rows. One
 * vpdpbusd multiplies them by 4 inputs of one row of x, broadcast to every lane: 64 products
 * into 16 outputs, against 16 for an fp32 FMA. A block's sums are turned to floats once per 16
 * outputs. vpdpbusd wants one side unsigned: the panels hold w + 128 (w ^ 0x80), and the sums
 * lose 128 * (the sum of the block's xq) again. */
#define PANEL 16      /* rows of w a panel holds: one int32 lane each */
#define TILE_ROWS 4   /* rows of x a tile takes at once: 2 panels x 4 rows = 8 independent sums */
#define GEMM_ROWS 8   /* from this many rows on, the GEMM: below, packing the panels costs more than it saves */

/* The 16 x 16 transpose of 4-byte steps: r[i] holds steps 0..15 of row i; afterwards r[j] holds
 * step j of rows 0..15. Three rounds: 4-byte pairs, 8-byte pairs, then 16-byte quarters. */
static void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) { /* in each 16-byte quarter: rows i, i + 1 interleaved */
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* quarter L of r[i + e]: step 4L + e of rows i..i + 3 */
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int e = 0; e < 4; e++) { /* quarter L of r[e], r[4 + e], r[8 + e], r[12 + e] -> step 4L + e */
        __m512i a01 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x44), a23 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xEE);
        __m512i c01 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x44), c23 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xEE);
        t[e] = _mm512_shuffle_i32x4(a01, c01, 0x88), t[4 + e] = _mm512_shuffle_i32x4(a01, c01, 0xDD);
        t[8 + e] = _mm512_shuffle_i32x4(a23, c23, 0x88), t[12 + e] = _mm512_shuffle_i32x4(a23, c23, 0xDD);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* rows (0..16) rows of w, from w, into one panel of kp / 4 steps of 64 bytes: w + 128 as bytes,
 * and 128 (a weight of 0) past row `rows` and input k. 16 steps at a time by a transpose, the
 * steps left by gathers, the last partial step byte by byte. */
static void pack_panel(const int8_t *w, int64_t rows, int64_t k, int64_t kp, uint8_t *panel) {
    memset(panel, 0x80, PANEL * kp);
    if (rows <= 0) return;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    int64_t q = 0;
    for (; 4 * q + 64 <= k; q += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; i++)
            r[i] = i < rows ? _mm512_loadu_si512(w + i * k + 4 * q) : _mm512_setzero_si512();
        transpose16(r);
        for (int j = 0; j < 16; j++) _mm512_storeu_si512(panel + 64 * (q + j), _mm512_xor_si512(r[j], flip));
    }
    const __mmask16 live = (__mmask16)((1u << rows) - 1);
    const __m512i row_starts = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32((int)k));
    for (; 4 * q + 4 <= k; q++) { /* a gather takes 4 bytes of each row */
        __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, row_starts, w + 4 * q, 1);
        _mm512_storeu_si512(panel + 64 * q, _mm512_xor_si512(v, flip));
    }
    for (int64_t r = 0; r < rows; r++) /* inputs of the last, partial step */
        for (int64_t j = 4 * q; j < k; j++) panel[64 * q + 4 * r + (j - 4 * q)] = (uint8_t)(w[r * k + j] ^ 0x80);
}

/* acc[i][h] = outputs of x row i against panel h (16 floats each), for mr (1..4) rows of x:
 * xq (mr, kp) with its blocks' scales xs and corrections corr, (mr, kp / 32) each. */
static inline __attribute__((always_inline)) void tile(const int mr, const int8_t *xq, const float *xs,
                                                        const int32_t *corr, int64_t kp,
                                                        const uint8_t *panels, __m512 acc[TILE_ROWS][2]) {
    const int64_t blocks = kp / QBLOCK, steps = kp / 4;
    for (int i = 0; i < mr; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m512i sum[TILE_ROWS][2];
        for (int i = 0; i < mr; i++) sum[i][0] = sum[i][1] = _mm512_setzero_si512();
        for (int64_t q = b * QBLOCK / 4; q < (b + 1) * QBLOCK / 4; q++) {
            __m512i w0 = _mm512_loadu_si512(panels + 64 * q), w1 = _mm512_loadu_si512(panels + 64 * (steps + q));
            for (int i = 0; i < mr; i++) {
                int32_t four; /* inputs 4q..4q+3 of x row i */
                memcpy(&four, xq + i * kp + 4 * q, 4);
                __m512i xb = _mm512_set1_epi32(four);
                sum[i][0] = _mm512_dpbusd_epi32(sum[i][0], w0, xb);
                sum[i][1] = _mm512_dpbusd_epi32(sum[i][1], w1, xb);
            }
        }
        for (int i = 0; i < mr; i++) {
            __m512i c = _mm512_set1_epi32(corr[i * blocks + b]);
            __m512 s = _mm512_set1_ps(xs[i * blocks + b]);
            acc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sum[i][0], c)), s, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sum[i][1], c)), s, acc[i][1]);
        }
    }
}

static int gemm_int8(const float *x, const int8_t *w, const float *scale, float *y, int64_t m, int64_t n,
                     int64_t k) {
    const int64_t kp = (k + QBLOCK - 1) / QBLOCK * QBLOCK, blocks = kp / QBLOCK; /* inputs padded with 0 */
#ifdef _OPENMP
    const int threads = omp_get_max_threads();
#else
    const int threads = 1;
#endif
    int8_t *xq = calloc(m * kp, 1);
    float *xs = malloc(m * blocks * sizeof(float));
    int32_t *corr = malloc(m * blocks * sizeof(int32_t));
    uint8_t *panels = malloc(threads * 2 * PANEL * kp); /* two panels a thread */
    int ok = xq && xs && corr && panels;
    if (ok) {
#pragma omp parallel for
        for (int64_t i = 0; i < m; i++) {
            quantize_row(x + i * k, k, xq + i * kp, xs + i * blocks);
            for (int64_t b = 0; b < blocks; b++) {
                int32_t t = 0;
                for (int64_t j = b * QBLOCK; j < (b + 1) * QBLOCK; j++) t += xq[i * kp + j];
                corr[i * blocks + b] = 128 * t;
            }
        }
#pragma omp parallel for schedule(static)
        for (int64_t r0 = 0; r0 < n; r0 += 2 * PANEL) {
#ifdef _OPENMP
            uint8_t *mine = panels + omp_get_thread_num() * 2 * PANEL * kp;
#else
            uint8_t *mine = panels;
#endif
            const int64_t rows0 = n - r0 < PANEL ? n - r0 : PANEL, rows1 = n - r0 - PANEL < PANEL ? n - r0 - PANEL : PANEL;
            pack_panel(w + r0 * k, rows0, k, kp, mine);
            pack_panel(w + (r0 + rows0) * k, rows1, k, kp, mine + PANEL * kp);
            for (int64_t i = 0; i < m; i += TILE_ROWS) {
                __m512 acc[TILE_ROWS][2];
                const int8_t *qi = xq + i * kp;
                const float *si = xs + i * blocks;
                const int32_t *ci = corr + i * blocks;
                const int mr = m - i < TILE_ROWS ? (int)(m - i) : TILE_ROWS;
                switch (mr) { /* each a copy of tile() with its loops over rows unrolled */
                case 4: tile(4, qi, si, ci, kp, mine, acc); break;
                case 3: tile(3, qi, si, ci, kp, mine, acc); break;
                case 2: tile(2, qi, si, ci, kp, mine, acc); break;
                default: tile(1, qi, si, ci, kp, mine, acc); break;
                }
                for (int h = 0; h < 2; h++) {
                    const int64_t live = h ? rows1 : rows0, first = r0 + h * PANEL;
                    if (live <= 0) continue;
                    const __mmask16 mask = (__mmask16)((1u << live) - 1);
                    const __m512 sc = _mm512_maskz_loadu_ps(mask, scale + first);
                    for (int ii = 0; ii < mr; ii++)
                        _mm512_mask_storeu_ps(y + (i + ii) * n + first, mask, _mm512_mul_ps(acc[ii][h], sc));
                }
            }
        }
    }
    free(xq), free(xs), free(corr), free(panels);
    return ok ? 0 : -1;
}
#endif

/* 1 where p3_linear_int8 runs a GEMM for many rows of x (AVX-512 VNNI): a prompt's product is
 * then faster in int8 than in fp32. */
int p3_int8_gemm(void) {
#ifdef HAVE_VNNI
    return 1;
#else
    return 0;
#endif
}

int p3_linear_int8(const float *x, const int8_t *w, const float *scale, float *y, int64_t m, int64_t n,
                   int64_t k) {
#ifdef HAVE_VNNI
    if (m >= GEMM_ROWS) return gemm_int8(x, w, scale, y, m, n, k);
#endif
    const int64_t blocks = (k + QBLOCK - 1) / QBLOCK, kv = k - k % INT8_STEP; /* inputs the vector loop takes */
    int8_t stack_q[16384]; /* a decode step's x fits here: no malloc per product */
    float stack_s[16384 / QBLOCK + 1];
    int on_heap = m * k > 16384;
    int8_t *xq = on_heap ? malloc(m * k) : stack_q;
    float *xs = on_heap ? malloc(m * blocks * sizeof(float)) : stack_s;
    if (!xq || !xs) {
        if (on_heap) free(xq), free(xs);
        return -1;
    }
    for (int64_t i = 0; i < m; i++) quantize_row(x + i * k, k, xq + i * k, xs + i * blocks);
#pragma omp parallel
    {
        int64_t lo, hi;
        share(n, &lo, &hi);
        const int64_t half = (hi - lo) / 2; /* row r goes with row r + half, as in p3_linear_f32 */
        for (int64_t r = lo; r < lo + half; r++) {
            const int8_t *wa = w + r * k, *wb = w + (r + half) * k;
            for (int64_t i = 0; i < m; i++) {
                const int8_t *qi = xq + i * k;
                const float *si = xs + i * blocks;
                float s[2];
                dot2_int8(wa, wb, qi, si, kv, s);
                y[i * n + r] = (s[0] + tail_int8(wa, qi, si, kv, k)) * scale[r];
                y[i * n + r + half] = (s[1] + tail_int8(wb, qi, si, kv, k)) * scale[r + half];
            }
        }
        if ((hi - lo) % 2) /* the odd row out */
            for (int64_t i = 0; i < m; i++)
                y[i * n + hi - 1] = tail_int8(w + (hi - 1) * k, xq + i * k, xs + i * blocks, 0, k) * scale[hi - 1];
    }
    if (on_heap) free(xq), free(xs);
    return 0;
}
