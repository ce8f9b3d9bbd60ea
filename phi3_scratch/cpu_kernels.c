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
 * Four rows of w at a time share every load of x; rows of x loop inside, so w is read once.
 * Without AVX2 and FMA the same sums run as plain loops that the compiler vectorizes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define QBLOCK 32 /* inputs that share one int8 scale of x */

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a);
    a = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(a);
}

/* out[r] = w[r] . x over inputs 0..kv for the four rows r of w (row stride k); kv a multiple of 16 */
static void dot4_f32(const float *w, const float *x, int64_t kv, int64_t k, float *out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < kv; j += 16) {
        __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), x0, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + j), x0, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 2 * k + j), x0, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 3 * k + j), x0, a3);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 8), x1, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + j + 8), x1, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 2 * k + j + 8), x1, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 3 * k + j + 8), x1, a3);
    }
    out[0] = hsum(a0), out[1] = hsum(a1), out[2] = hsum(a2), out[3] = hsum(a3);
}
#define F32_STEP 16

/* The int8 dot product of one 32-byte block, as 8 int32 partial sums. maddubs multiplies
 * unsigned by signed bytes, so |x| is the unsigned side and w takes x's sign. */
static inline __m256i dot_block(__m256i w, __m256i x, __m256i ax) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w, x)), _mm256_set1_epi16(1));
}

/* out[r] = the sum over blocks b of xs[b] * (xq . w[r] over block b), for the four rows r of w
 * (row stride k), over inputs 0..kv; kv a multiple of 32 */
static void dot4_int8(const int8_t *w, const int8_t *xq, const float *xs, int64_t kv, int64_t k, float *out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < kv; j += QBLOCK) {
        if (j % 64 == 0) { /* the next four rows, same inputs: the memory works ahead of the sums */
            const char *next = (const char *)(w + 4 * k + j);
            _mm_prefetch(next, _MM_HINT_T0), _mm_prefetch(next + k, _MM_HINT_T0);
            _mm_prefetch(next + 2 * k, _MM_HINT_T0), _mm_prefetch(next + 3 * k, _MM_HINT_T0);
        }
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + j));
        __m256i ax = _mm256_sign_epi8(xv, xv);
        __m256 s = _mm256_broadcast_ss(xs + j / QBLOCK);
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block(_mm256_loadu_si256((const __m256i *)(w + j)), xv, ax)), s, a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block(_mm256_loadu_si256((const __m256i *)(w + k + j)), xv, ax)), s, a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block(_mm256_loadu_si256((const __m256i *)(w + 2 * k + j)), xv, ax)), s, a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block(_mm256_loadu_si256((const __m256i *)(w + 3 * k + j)), xv, ax)), s, a3);
    }
    out[0] = hsum(a0), out[1] = hsum(a1), out[2] = hsum(a2), out[3] = hsum(a3);
}
#define INT8_STEP QBLOCK

#else /* plain loops: the compiler vectorizes them for the CPU it builds for */

static void dot4_f32(const float *w, const float *x, int64_t kv, int64_t k, float *out) {
    for (int r = 0; r < 4; r++) {
        float s = 0;
        for (int64_t j = 0; j < kv; j++) s += w[r * k + j] * x[j];
        out[r] = s;
    }
}
#define F32_STEP 1

static void dot4_int8(const int8_t *w, const int8_t *xq, const float *xs, int64_t kv, int64_t k, float *out) {
    for (int r = 0; r < 4; r++) {
        float s = 0;
        for (int64_t j = 0; j < kv; j += QBLOCK) {
            int32_t t = 0;
            for (int64_t i = j; i < j + QBLOCK; i++) t += (int16_t)w[r * k + i] * (int16_t)xq[i];
            s += xs[j / QBLOCK] * (float)t;
        }
        out[r] = s;
    }
}
#define INT8_STEP QBLOCK

#endif

/* The inputs beyond the last full step, one row of w at a time, in plain C. */
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

void p3_linear_f32(const float *x, const float *w, float *y, int64_t m, int64_t n, int64_t k) {
    const int64_t kv = k - k % F32_STEP; /* inputs the vector loop takes */
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n; r += 4) {
        for (int64_t i = 0; i < m; i++) {
            const float *xi = x + i * k;
            float sums[4] = {0, 0, 0, 0};
            if (r + 4 <= n) dot4_f32(w + r * k, xi, kv, k, sums);
            for (int64_t q = 0; q < 4 && r + q < n; q++) {
                if (r + 4 > n) sums[q] = tail_f32(w + (r + q) * k, xi, 0, kv);
                y[i * n + r + q] = sums[q] + tail_f32(w + (r + q) * k, xi, kv, k);
            }
        }
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
    const int64_t blocks = (k + QBLOCK - 1) / QBLOCK, kv = k - k % INT8_STEP;
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
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n; r += 4) {
        for (int64_t i = 0; i < m; i++) {
            const int8_t *qi = xq + i * k;
            const float *si = xs + i * blocks;
            float sums[4] = {0, 0, 0, 0};
            if (r + 4 <= n) dot4_int8(w + r * k, qi, si, kv, k, sums);
            for (int64_t q = 0; q < 4 && r + q < n; q++) {
                if (r + 4 > n) sums[q] = tail_int8(w + (r + q) * k, qi, si, 0, kv);
                y[i * n + r + q] = (sums[q] + tail_int8(w + (r + q) * k, qi, si, kv, k)) * scale[r + q];
            }
        }
    }
    if (on_heap) free(xq), free(xs);
    return 0;
}
