/* The CPU products of a decode step: y = x W^T for a few rows of x, in fp32 and in int8.
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
 * scale a block (max |x| / 127), and the dot products run on int8 pairs (AVX2's maddubs).
 * Rows of x loop inside the rows of w, so that w is read from memory once.
 * Without AVX2 and FMA the same sums run as plain loops that the compiler vectorizes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define QBLOCK 32 /* inputs that share one int8 scale of x */

/* One row of w over inputs from..k, in plain C: the inputs beyond the vector loop's last
 * step, and without AVX2 every input. */
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

#if defined(__AVX2__) && defined(__FMA__)
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

/* out[0..3] = the sums over blocks b of xs[b] * (xq . row, over block b), for the rows wa, wa + k,
 * wb and wb + k: two pairs of rows far apart. Inputs 0..kv, a multiple of 32. */
static void dot4_int8(const int8_t *wa, const int8_t *wb, const int8_t *xq, const float *xs, int64_t kv,
                      int64_t k, float *out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < kv; j += QBLOCK) {
        if (j % 64 == 0) { /* each pair's next two rows, same inputs: memory works ahead of the sums */
            _mm_prefetch((const char *)(wa + 2 * k + j), _MM_HINT_T0);
            _mm_prefetch((const char *)(wa + 3 * k + j), _MM_HINT_T0);
            _mm_prefetch((const char *)(wb + 2 * k + j), _MM_HINT_T0);
            _mm_prefetch((const char *)(wb + 3 * k + j), _MM_HINT_T0);
        }
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + j));
        __m256i ax = _mm256_sign_epi8(xv, xv);
        __m256 s = _mm256_broadcast_ss(xs + j / QBLOCK);
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block(_mm256_loadu_si256((const __m256i *)(wa + j)), xv, ax)), s, a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block(_mm256_loadu_si256((const __m256i *)(wa + k + j)), xv, ax)), s, a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block(_mm256_loadu_si256((const __m256i *)(wb + j)), xv, ax)), s, a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block(_mm256_loadu_si256((const __m256i *)(wb + k + j)), xv, ax)), s, a3);
    }
    out[0] = hsum(a0), out[1] = hsum(a1), out[2] = hsum(a2), out[3] = hsum(a3);
}
#else /* plain loops (tail_f32 and tail_int8 over every input): the compiler vectorizes them */

static void dot2_f32(const float *w0, const float *w1, const float *x, int64_t kv, float *s0, float *s1) {
    *s0 = tail_f32(w0, x, 0, kv), *s1 = tail_f32(w1, x, 0, kv);
}
#define F32_STEP 1

static void dot4_int8(const int8_t *wa, const int8_t *wb, const int8_t *xq, const float *xs, int64_t kv,
                      int64_t k, float *out) {
    const int8_t *rows[4] = {wa, wa + k, wb, wb + k};
    for (int r = 0; r < 4; r++) out[r] = tail_int8(rows[r], xq, xs, 0, kv);
}

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
#if defined(__AVX2__) && defined(__FMA__)
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

int p3_linear_int8(const float *x, const int8_t *w, const float *scale, float *y, int64_t m, int64_t n,
                   int64_t k) {
    const int64_t blocks = (k + QBLOCK - 1) / QBLOCK, kv = k - k % QBLOCK; /* inputs the vector loop takes */
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
        const int64_t half = (hi - lo) / 4 * 2; /* rows r, r + 1 go with rows r + half, r + half + 1 */
        for (int64_t r = lo; r < lo + half; r += 2) {
            const int8_t *wa = w + r * k, *wb = w + (r + half) * k;
            const int64_t at[4] = {r, r + 1, r + half, r + half + 1};
            for (int64_t i = 0; i < m; i++) {
                const int8_t *qi = xq + i * k;
                const float *si = xs + i * blocks;
                float sums[4];
                dot4_int8(wa, wb, qi, si, kv, k, sums);
                for (int q = 0; q < 4; q++)
                    y[i * n + at[q]] = (sums[q] + tail_int8(w + at[q] * k, qi, si, kv, k)) * scale[at[q]];
            }
        }
        for (int64_t r = lo + 2 * half; r < hi; r++) /* the rows left over, one at a time */
            for (int64_t i = 0; i < m; i++)
                y[i * n + r] = tail_int8(w + r * k, xq + i * k, xs + i * blocks, 0, k) * scale[r];
    }
    if (on_heap) free(xq), free(xs);
    return 0;
}
