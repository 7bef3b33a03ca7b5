/*
 * Native CPU kernels of the grouped rational function (kat_timm).
 *
 *   F(x) = (a0 + a1 x + ... + a5 x^5) / (1 + |b1||x| + |b2||x|^2 + |b3||x|^3 + |b4||x|^4)
 *
 * The input is the canonical (M, G, L) array (see kat_timm/ops/layout.py): M*G contiguous segments of L elements,
 * segment s using the coefficients of group s % G. The flat array is cut into fixed-size chunks that OpenMP
 * threads take in a static schedule; inside a chunk, each piece that stays within one segment is a plain loop with
 * scalar coefficients that the compiler vectorises (one clone per instruction set through target_clones, so the
 * binary runs on any x86-64 CPU without -march=native).
 *
 * Backward with short groups (L < KAT_ROW_MODE_MAX_L, e.g. 24 channels a group in KAT-T's act1) instead takes
 * chunks of whole rows and keeps per-column accumulators, folded into the group sums at the end of each chunk: the
 * fixed cost of a per-piece reduction would otherwise dominate. (Thresholds measured on a 2-core x86-64 VM.)
 *
 * Math is float32 whatever the storage type (float32, bfloat16, float16). The backward pass writes dx and the ten
 * coefficient sums per group (S_i = sum g x^i / Q, T_j = sum g P / Q^2 |x|^j): float32 inside a piece, float64
 * per chunk, and the chunk partials are added in chunk order at the end, so the result does not depend on the
 * number of threads and two calls give bitwise-identical sums. No atomics.
 *
 * Built and loaded with ctypes by kat_timm/ops/rational_cpu.py; plain C, no PyTorch headers.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(KAT_NO_CLONES)
#define KAT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KAT_CLONES
#endif

enum { KAT_F32 = 0, KAT_BF16 = 1, KAT_F16 = 2 };
enum { KAT_OK = 0, KAT_BAD_DTYPE = 1, KAT_NO_MEMORY = 2 };

/* Elements per chunk: big enough to amortise scheduling, small enough for a good spread over threads. */
#ifndef KAT_CHUNK
#define KAT_CHUNK 32768
#endif
/* Backward switches to whole-row chunks when groups are shorter than this and rows no wider than that. */
#ifndef KAT_ROW_MODE_MAX_L
#define KAT_ROW_MODE_MAX_L 64
#endif
#define KAT_ROW_MODE_MAX_K 4096
#ifndef KAT_COL_BLOCK
#define KAT_COL_BLOCK 128
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;      /* round to nearest even */
    uint32_t quiet_nan = (u >> 16) | 0x40u;                           /* keep NaN a NaN */
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? quiet_nan : rounded);
}

static inline float load_f32(const float *p, int64_t i) { return p[i]; }
static inline void store_f32(float *p, int64_t i, float v) { p[i] = v; }
static inline float load_bf16(const uint16_t *p, int64_t i) { return bf16_to_f32(p[i]); }
static inline void store_bf16(uint16_t *p, int64_t i, float v) { p[i] = f32_to_bf16(v); }
#ifdef __FLT16_MAX__
#define KAT_HAVE_F16 1
static inline float load_f16(const _Float16 *p, int64_t i) { return (float)p[i]; }
static inline void store_f16(_Float16 *p, int64_t i, float v) { p[i] = (_Float16)v; }
#else
#define KAT_HAVE_F16 0
#endif

/* Coefficients of one group, float32, |b| already taken. */
typedef struct {
    float a[6];
    float b[4];
} kat_coeffs;

static void load_coeffs(kat_coeffs *c, int64_t groups, const float *num, int64_t num_row_stride, const float *den) {
    for (int64_t g = 0; g < groups; ++g) {
        for (int i = 0; i < 6; ++i) c[g].a[i] = num[g * num_row_stride + i];
        for (int j = 0; j < 4; ++j) c[g].b[j] = fabsf(den[g * 4 + j]);
    }
}

/*
 * The per-element math shared by every loop below; a0..a5 and b1..b4 (= |b_j|) must be in scope.
 * KAT_P_Q defines ax = |x|, p = P(x), q = Q(|x|) (Horner). KAT_BACKWARD_TERMS also defines dxv = g dF/dx,
 * gq = g / Q, gf = g P / Q^2 and the powers x2 = x^2, x4 = x^4: the ten coefficient terms are
 * gq * x^i (i = 0..5) and gf * |x|^j (j = 1..4). sign(0) = +1 in dQ/dx.
 */
#define KAT_P_Q(xv)                                                                                               \
    const float ax = fabsf(xv);                                                                                   \
    const float p = a0 + (xv) * (a1 + (xv) * (a2 + (xv) * (a3 + (xv) * (a4 + (xv) * a5))));                       \
    const float q = 1.0f + ax * (b1 + ax * (b2 + ax * (b3 + ax * b4)));

#define KAT_BACKWARD_TERMS(xv, gv)                                                                                \
    KAT_P_Q(xv)                                                                                                   \
    const float sx = (xv) < 0.0f ? -1.0f : 1.0f;                                                                  \
    const float dp = a1 + (xv) * (2.0f * a2 + (xv) * (3.0f * a3 + (xv) * (4.0f * a4 + (xv) * 5.0f * a5)));       \
    const float dq = b1 + ax * (2.0f * b2 + ax * (3.0f * b3 + ax * 4.0f * b4));                                   \
    const float rq = 1.0f / q;                                                                                    \
    const float f = p * rq;                                                                                       \
    const float dxv = (gv) * (dp - f * sx * dq) * rq;                                                             \
    const float gq = (gv) * rq;                                                                                   \
    const float gf = gq * f;                                                                                      \
    const float x2 = (xv) * (xv), x4 = x2 * x2;

/* One piece [begin, end) inside a segment: forward; XV is the input of F at i (x, or x plus the column's bias). */
#define KAT_FORWARD_PIECE_BODY(SUFFIX, XV)                                                                        \
    const float a0 = c->a[0], a1 = c->a[1], a2 = c->a[2], a3 = c->a[3], a4 = c->a[4], a5 = c->a[5];               \
    const float b1 = c->b[0], b2 = c->b[1], b3 = c->b[2], b4 = c->b[3];                                           \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) {                                                        \
        const float xv = XV;                                                                                      \
        KAT_P_Q(xv)                                                                                               \
        store_##SUFFIX(y, i, p / q);                                                                              \
    }

#define KAT_DEFINE_FORWARD_PIECE(SUFFIX, T)                                                                       \
    KAT_CLONES static void forward_piece_##SUFFIX(const T *restrict x, T *restrict y, int64_t n,                 \
                                                  const kat_coeffs *c) {                                          \
        KAT_FORWARD_PIECE_BODY(SUFFIX, load_##SUFFIX(x, i))                                                       \
    }                                                                                                             \
    /* bias: the piece's columns' input biases (float32), added before F. */                                      \
    KAT_CLONES static void forward_piece_bias_##SUFFIX(const T *restrict x, T *restrict y, int64_t n,            \
                                                       const kat_coeffs *c, const float *restrict bias) {         \
        KAT_FORWARD_PIECE_BODY(SUFFIX, load_##SUFFIX(x, i) + bias[i])                                             \
    }

/*
 * One piece inside a segment: backward. Adds this piece's ten sums to acc (float64). The bias variant reads x plus
 * the columns' biases and adds each dx (float32, before the cast to the storage type) to its column's bias_acc.
 */
#define KAT_BACKWARD_PIECE_BODY(SUFFIX, XV, BIAS_STEP)                                                            \
    const float a0 = c->a[0], a1 = c->a[1], a2 = c->a[2], a3 = c->a[3], a4 = c->a[4], a5 = c->a[5];               \
    const float b1 = c->b[0], b2 = c->b[1], b3 = c->b[2], b4 = c->b[3];                                           \
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, t1 = 0, t2 = 0, t3 = 0, t4 = 0;                         \
    _Pragma("omp simd reduction(+ : s0, s1, s2, s3, s4, s5, t1, t2, t3, t4)") for (int64_t i = 0; i < n; ++i) {   \
        const float xv = XV;                                                                                      \
        const float gv = load_##SUFFIX(grad, i);                                                                  \
        KAT_BACKWARD_TERMS(xv, gv)                                                                                \
        store_##SUFFIX(dx, i, dxv);                                                                               \
        BIAS_STEP;                                                                                                \
        s0 += gq;                                                                                                 \
        s1 += gq * xv;                                                                                            \
        s2 += gq * x2;                                                                                            \
        s3 += gq * x2 * xv;                                                                                       \
        s4 += gq * x4;                                                                                            \
        s5 += gq * x4 * xv;                                                                                       \
        t1 += gf * ax;                                                                                            \
        t2 += gf * x2;                                                                                            \
        t3 += gf * x2 * ax;                                                                                       \
        t4 += gf * x4;                                                                                            \
    }                                                                                                             \
    acc[0] += s0; acc[1] += s1; acc[2] += s2; acc[3] += s3; acc[4] += s4; acc[5] += s5;                           \
    acc[6] += t1; acc[7] += t2; acc[8] += t3; acc[9] += t4;

#define KAT_DEFINE_BACKWARD_PIECE(SUFFIX, T)                                                                      \
    KAT_CLONES static void backward_piece_##SUFFIX(const T *restrict grad, const T *restrict x, T *restrict dx,  \
                                                   int64_t n, const kat_coeffs *c, double *acc) {                 \
        KAT_BACKWARD_PIECE_BODY(SUFFIX, load_##SUFFIX(x, i), (void)0)                                             \
    }                                                                                                             \
    KAT_CLONES static void backward_piece_bias_##SUFFIX(const T *restrict grad, const T *restrict x,             \
                                                        T *restrict dx, int64_t n, const kat_coeffs *c,           \
                                                        double *acc, const float *restrict bias,                  \
                                                        float *restrict bias_acc) {                               \
        KAT_BACKWARD_PIECE_BODY(SUFFIX, load_##SUFFIX(x, i) + bias[i], bias_acc[i] += dxv)                        \
    }

/*
 * Backward of n columns of one row (row stride K = G * L) for short groups (small L): per-column coefficients
 * (cc[i * K + k]) and per-column float accumulators (acc[i * KAT_COL_BLOCK + k]) instead of per-piece reductions,
 * whose fixed cost dominates when a piece is only a few dozen elements long.
 */
#define KAT_BACKWARD_ROW_BODY(SUFFIX, XV, BIAS_STEP)                                                             \
    _Pragma("omp simd") for (int64_t k = 0; k < n; ++k) {                                                        \
        const float a0 = cc[k], a1 = cc[K + k], a2 = cc[2 * K + k], a3 = cc[3 * K + k], a4 = cc[4 * K + k];       \
        const float a5 = cc[5 * K + k], b1 = cc[6 * K + k], b2 = cc[7 * K + k], b3 = cc[8 * K + k];               \
        const float b4 = cc[9 * K + k];                                                                           \
        const float xv = XV;                                                                                      \
        const float gv = load_##SUFFIX(grad, k);                                                                  \
        KAT_BACKWARD_TERMS(xv, gv)                                                                                \
        store_##SUFFIX(dx, k, dxv);                                                                               \
        BIAS_STEP;                                                                                                \
        acc[k] += gq;                                                                                             \
        acc[1 * KAT_COL_BLOCK + k] += gq * xv;                                                                    \
        acc[2 * KAT_COL_BLOCK + k] += gq * x2;                                                                    \
        acc[3 * KAT_COL_BLOCK + k] += gq * x2 * xv;                                                               \
        acc[4 * KAT_COL_BLOCK + k] += gq * x4;                                                                    \
        acc[5 * KAT_COL_BLOCK + k] += gq * x4 * xv;                                                               \
        acc[6 * KAT_COL_BLOCK + k] += gf * ax;                                                                    \
        acc[7 * KAT_COL_BLOCK + k] += gf * x2;                                                                    \
        acc[8 * KAT_COL_BLOCK + k] += gf * x2 * ax;                                                               \
        acc[9 * KAT_COL_BLOCK + k] += gf * x4;                                                                    \
    }

/*
 * Backward of n columns of one row (row stride K = G * L) for short groups (small L): per-column coefficients
 * (cc[i * K + k]) and per-column float accumulators (acc[i * KAT_COL_BLOCK + k]) instead of per-piece reductions,
 * whose fixed cost dominates when a piece is only a few dozen elements long. The bias variant adds the columns'
 * biases to x and accumulates dx per column in an eleventh row of acc.
 */
#define KAT_DEFINE_BACKWARD_ROW(SUFFIX, T)                                                                        \
    KAT_CLONES static void backward_row_##SUFFIX(const T *restrict grad, const T *restrict x, T *restrict dx,    \
                                                 int64_t n, int64_t K, const float *restrict cc,                 \
                                                 float *restrict acc) {                                          \
        KAT_BACKWARD_ROW_BODY(SUFFIX, load_##SUFFIX(x, k), (void)0)                                               \
    }                                                                                                             \
    KAT_CLONES static void backward_row_bias_##SUFFIX(const T *restrict grad, const T *restrict x,               \
                                                      T *restrict dx, int64_t n, int64_t K,                       \
                                                      const float *restrict cc, float *restrict acc,              \
                                                      const float *restrict bias) {                               \
        KAT_BACKWARD_ROW_BODY(SUFFIX, load_##SUFFIX(x, k) + bias[k], acc[10 * KAT_COL_BLOCK + k] += dxv)          \
    }

#define KAT_DEFINE_DRIVERS(SUFFIX, T)                                                                             \
    KAT_DEFINE_FORWARD_PIECE(SUFFIX, T)                                                                           \
    KAT_DEFINE_BACKWARD_PIECE(SUFFIX, T)                                                                          \
    KAT_DEFINE_BACKWARD_ROW(SUFFIX, T)                                                                            \
    /* Chunks of whole rows; the per-column sums of a chunk are folded into its group partials at its end. */    \
    static int backward_rows_##SUFFIX(const T *grad, const T *x, T *dx, int64_t rows, int64_t groups,            \
                                      int64_t seg_len, const kat_coeffs *c, double *partials, int64_t rows_per_chunk, \
                                      const float *bias, float *bias_partials, int nthreads) {                    \
        const int64_t K = groups * seg_len;                                                                       \
        const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;                                      \
        float *cc = (float *)malloc(sizeof(float) * (size_t)(10 * K));                                            \
        if (!cc) return KAT_NO_MEMORY;                                                                            \
        for (int64_t k = 0; k < K; ++k) {                                                                         \
            const kat_coeffs *ck = &c[k / seg_len];                                                               \
            for (int i = 0; i < 6; ++i) cc[i * K + k] = ck->a[i];                                                 \
            for (int j = 0; j < 4; ++j) cc[(6 + j) * K + k] = ck->b[j];                                           \
        }                                                                                                         \
        int status = KAT_OK;                                                                                      \
        _Pragma("omp parallel num_threads(nthreads)") {                                                           \
            float *acc = (float *)malloc(sizeof(float) * 11 * KAT_COL_BLOCK);                                     \
            if (!acc) {                                                                                           \
                _Pragma("omp atomic write") status = KAT_NO_MEMORY;                                               \
            }                                                                                                     \
            _Pragma("omp for schedule(static)") for (int64_t chunk = 0; chunk < chunks; ++chunk) {                \
                if (!acc) continue;                                                                               \
                const int64_t r0 = chunk * rows_per_chunk;                                                        \
                const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;                       \
                double *part = partials + chunk * groups * 10;                                                    \
                /* Column blocks keep the block's accumulators and coefficients in L1. */                        \
                for (int64_t k0 = 0; k0 < K; k0 += KAT_COL_BLOCK) {                                               \
                    const int64_t n = K - k0 < KAT_COL_BLOCK ? K - k0 : KAT_COL_BLOCK;                            \
                    memset(acc, 0, sizeof(float) * 11 * KAT_COL_BLOCK);                                           \
                    if (bias) {                                                                                   \
                        for (int64_t r = r0; r < r1; ++r)                                                         \
                            backward_row_bias_##SUFFIX(grad + r * K + k0, x + r * K + k0, dx + r * K + k0, n, K,  \
                                                       cc + k0, acc, bias + k0);                                  \
                        memcpy(bias_partials + chunk * K + k0, acc + 10 * KAT_COL_BLOCK, sizeof(float) * n);      \
                    } else {                                                                                      \
                        for (int64_t r = r0; r < r1; ++r)                                                         \
                            backward_row_##SUFFIX(grad + r * K + k0, x + r * K + k0, dx + r * K + k0, n, K,       \
                                                  cc + k0, acc);                                                  \
                    }                                                                                             \
                    /* Fold columns into their groups, walking the group boundaries (no division per column). */ \
                    for (int64_t k = 0, g = k0 / seg_len; k < n; ++g) {                                           \
                        const int64_t stop = (g + 1) * seg_len - k0 < n ? (g + 1) * seg_len - k0 : n;             \
                        for (int i = 0; i < 10; ++i) {                                                            \
                            double sum = 0.0;                                                                     \
                            for (int64_t kk = k; kk < stop; ++kk) sum += acc[i * KAT_COL_BLOCK + kk];             \
                            part[g * 10 + i] += sum;                                                              \
                        }                                                                                         \
                        k = stop;                                                                                 \
                    }                                                                                             \
                }                                                                                                 \
            }                                                                                                     \
            free(acc);                                                                                            \
        }                                                                                                         \
        free(cc);                                                                                                 \
        return status;                                                                                            \
    }                                                                                                             \
    /*                                                                                                            \
     * Backward with a bias and long groups: tiles of whole rows, at most KAT_MAX_ROW_TILES of them, so the       \
     * per-tile, per-column bias sums (bias_partials[tile * K + k]) stay small whatever the shape.                \
     */                                                                                                           \
    static void backward_tiles_##SUFFIX(const T *grad, const T *x, T *dx, int64_t rows, int64_t groups,          \
                                        int64_t seg_len, const kat_coeffs *c, double *partials,                   \
                                        int64_t rows_per_tile, const float *bias, float *bias_partials,           \
                                        int nthreads) {                                                           \
        const int64_t K = groups * seg_len;                                                                       \
        const int64_t tiles = (rows + rows_per_tile - 1) / rows_per_tile;                                         \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)") for (int64_t t = 0; t < tiles; ++t) {  \
            const int64_t r1 = (t + 1) * rows_per_tile < rows ? (t + 1) * rows_per_tile : rows;                   \
            for (int64_t r = t * rows_per_tile; r < r1; ++r)                                                      \
                for (int64_t g = 0; g < groups; ++g) {                                                            \
                    const int64_t off = r * K + g * seg_len;                                                      \
                    backward_piece_bias_##SUFFIX(grad + off, x + off, dx + off, seg_len, &c[g],                   \
                                                 partials + (t * groups + g) * 10, bias + g * seg_len,            \
                                                 bias_partials + t * K + g * seg_len);                            \
                }                                                                                                 \
        }                                                                                                         \
    }                                                                                                             \
    static void forward_##SUFFIX(const T *x, T *y, int64_t total, int64_t groups, int64_t seg_len,               \
                                 const kat_coeffs *c, const float *bias, int nthreads) {                          \
        const int64_t K = groups * seg_len;                                                                       \
        const int64_t chunks = (total + KAT_CHUNK - 1) / KAT_CHUNK;                                               \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)") for (int64_t k = 0; k < chunks; ++k) { \
            int64_t i = k * KAT_CHUNK;                                                                            \
            const int64_t stop = i + KAT_CHUNK < total ? i + KAT_CHUNK : total;                                   \
            while (i < stop) {                                                                                    \
                const int64_t seg = i / seg_len;                                                                  \
                const int64_t seg_end = (seg + 1) * seg_len;                                                      \
                const int64_t end = seg_end < stop ? seg_end : stop;                                              \
                if (bias)                                                                                         \
                    forward_piece_bias_##SUFFIX(x + i, y + i, end - i, &c[seg % groups], bias + i % K);           \
                else                                                                                              \
                    forward_piece_##SUFFIX(x + i, y + i, end - i, &c[seg % groups]);                              \
                i = end;                                                                                          \
            }                                                                                                     \
        }                                                                                                         \
    }                                                                                                             \
    static void backward_##SUFFIX(const T *grad, const T *x, T *dx, int64_t total, int64_t groups,               \
                                  int64_t seg_len, const kat_coeffs *c, double *partials, int nthreads) {         \
        const int64_t chunks = (total + KAT_CHUNK - 1) / KAT_CHUNK;                                               \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)") for (int64_t k = 0; k < chunks; ++k) { \
            double *part = partials + k * groups * 10;                                                            \
            int64_t i = k * KAT_CHUNK;                                                                            \
            const int64_t stop = i + KAT_CHUNK < total ? i + KAT_CHUNK : total;                                   \
            while (i < stop) {                                                                                    \
                const int64_t seg = i / seg_len;                                                                  \
                const int64_t seg_end = (seg + 1) * seg_len;                                                      \
                const int64_t end = seg_end < stop ? seg_end : stop;                                              \
                const int64_t g = seg % groups;                                                                   \
                backward_piece_##SUFFIX(grad + i, x + i, dx + i, end - i, &c[g], part + g * 10);                  \
                i = end;                                                                                          \
            }                                                                                                     \
        }                                                                                                         \
    }

KAT_DEFINE_DRIVERS(f32, float)
KAT_DEFINE_DRIVERS(bf16, uint16_t)
#if KAT_HAVE_F16
KAT_DEFINE_DRIVERS(f16, _Float16)
#endif

/* 1 if the storage type is supported by this build. */
int kat_rational_supports(int dtype) {
    return dtype == KAT_F32 || dtype == KAT_BF16 || (dtype == KAT_F16 && KAT_HAVE_F16);
}

/*
 * x, y: (M, G, L) contiguous, total = M * G * L elements of the storage type `dtype`.
 * num: float32, row g at num + g * num_row_stride (stride 0 for one shared row); den: float32 (G, 4).
 * bias: NULL, or float32 (G * L): one value per column of the (M, K = G * L) matrix, added to x before F.
 */
int kat_rational_forward(int dtype, const void *x, void *y, int64_t total, int64_t groups, int64_t seg_len,
                         const float *num, int64_t num_row_stride, const float *den, const float *bias,
                         int nthreads) {
    if (!kat_rational_supports(dtype)) return KAT_BAD_DTYPE;
    kat_coeffs *c = (kat_coeffs *)malloc(sizeof(kat_coeffs) * (size_t)groups);
    if (!c) return KAT_NO_MEMORY;
    load_coeffs(c, groups, num, num_row_stride, den);
    if (dtype == KAT_F32) forward_f32((const float *)x, (float *)y, total, groups, seg_len, c, bias, nthreads);
    else if (dtype == KAT_BF16)
        forward_bf16((const uint16_t *)x, (uint16_t *)y, total, groups, seg_len, c, bias, nthreads);
#if KAT_HAVE_F16
    else forward_f16((const _Float16 *)x, (_Float16 *)y, total, groups, seg_len, c, bias, nthreads);
#endif
    free(c);
    return KAT_OK;
}

/* Bias tiles of the long-group path: enough for any thread count, few enough to keep the partials small. */
#ifndef KAT_MAX_ROW_TILES
#define KAT_MAX_ROW_TILES 256
#endif

/*
 * grad, x, dx: (M, G, L) contiguous of the storage type. sums: float64 (G, 10), overwritten with
 * [S0..S5, T1..T4] per group. bias: as in kat_rational_forward; with a bias, bias_sums (float32, G * L) is
 * overwritten with the per-column sums of dx (float32 dx, before the cast to the storage type).
 */
int kat_rational_backward(int dtype, const void *grad, const void *x, void *dx, int64_t total, int64_t groups,
                          int64_t seg_len, const float *num, int64_t num_row_stride, const float *den,
                          const float *bias, double *sums, float *bias_sums, int nthreads) {
    if (!kat_rational_supports(dtype)) return KAT_BAD_DTYPE;
    const int64_t row_len = groups * seg_len;
    const int64_t rows = total / row_len;
    /* Short groups with not-too-wide rows: whole-row chunks with per-column accumulators (see backward_row). */
    const int row_mode = seg_len < KAT_ROW_MODE_MAX_L && row_len <= KAT_ROW_MODE_MAX_K;
    const int tile_mode = !row_mode && bias != NULL;
    int64_t rows_per_chunk = 0, chunks;
    if (row_mode) {
        rows_per_chunk = (KAT_CHUNK + row_len - 1) / row_len;
        chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
    } else if (tile_mode) {
        rows_per_chunk = (KAT_CHUNK + row_len - 1) / row_len;
        const int64_t at_most = (rows + KAT_MAX_ROW_TILES - 1) / KAT_MAX_ROW_TILES;
        if (rows_per_chunk < at_most) rows_per_chunk = at_most;
        chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
    } else {
        chunks = (total + KAT_CHUNK - 1) / KAT_CHUNK;
    }
    kat_coeffs *c = (kat_coeffs *)malloc(sizeof(kat_coeffs) * (size_t)groups);
    double *partials = (double *)calloc((size_t)(chunks * groups * 10), sizeof(double));
    float *bias_partials = bias ? (float *)calloc((size_t)(chunks * row_len), sizeof(float)) : NULL;
    if (!c || !partials || (bias && !bias_partials)) {
        free(c);
        free(partials);
        free(bias_partials);
        return KAT_NO_MEMORY;
    }
    load_coeffs(c, groups, num, num_row_stride, den);
    int status = KAT_OK;
    if (row_mode) {
        if (dtype == KAT_F32)
            status = backward_rows_f32((const float *)grad, (const float *)x, (float *)dx, rows, groups, seg_len, c,
                                       partials, rows_per_chunk, bias, bias_partials, nthreads);
        else if (dtype == KAT_BF16)
            status = backward_rows_bf16((const uint16_t *)grad, (const uint16_t *)x, (uint16_t *)dx, rows, groups,
                                        seg_len, c, partials, rows_per_chunk, bias, bias_partials, nthreads);
#if KAT_HAVE_F16
        else
            status = backward_rows_f16((const _Float16 *)grad, (const _Float16 *)x, (_Float16 *)dx, rows, groups,
                                       seg_len, c, partials, rows_per_chunk, bias, bias_partials, nthreads);
#endif
    } else if (tile_mode) {
        if (dtype == KAT_F32)
            backward_tiles_f32((const float *)grad, (const float *)x, (float *)dx, rows, groups, seg_len, c, partials,
                               rows_per_chunk, bias, bias_partials, nthreads);
        else if (dtype == KAT_BF16)
            backward_tiles_bf16((const uint16_t *)grad, (const uint16_t *)x, (uint16_t *)dx, rows, groups, seg_len,
                                c, partials, rows_per_chunk, bias, bias_partials, nthreads);
#if KAT_HAVE_F16
        else
            backward_tiles_f16((const _Float16 *)grad, (const _Float16 *)x, (_Float16 *)dx, rows, groups, seg_len,
                               c, partials, rows_per_chunk, bias, bias_partials, nthreads);
#endif
    } else if (dtype == KAT_F32)
        backward_f32((const float *)grad, (const float *)x, (float *)dx, total, groups, seg_len, c, partials, nthreads);
    else if (dtype == KAT_BF16)
        backward_bf16((const uint16_t *)grad, (const uint16_t *)x, (uint16_t *)dx, total, groups, seg_len, c, partials,
                      nthreads);
#if KAT_HAVE_F16
    else
        backward_f16((const _Float16 *)grad, (const _Float16 *)x, (_Float16 *)dx, total, groups, seg_len, c, partials,
                     nthreads);
#endif
    if (status == KAT_OK) {
        /* Fixed-order second stage: chunk 0, 1, 2, ... whatever thread computed them. */
        memset(sums, 0, sizeof(double) * (size_t)(groups * 10));
        for (int64_t k = 0; k < chunks; ++k)
            for (int64_t j = 0; j < groups * 10; ++j) sums[j] += partials[k * groups * 10 + j];
        if (bias) {
            /* Per column, chunks in order (the split over threads is by column, so the order never changes). */
            const int64_t blocks = (row_len + KAT_COL_BLOCK - 1) / KAT_COL_BLOCK;
#pragma omp parallel for schedule(static) num_threads(nthreads)
            for (int64_t blk = 0; blk < blocks; ++blk) {
                const int64_t k0 = blk * KAT_COL_BLOCK;
                const int64_t k1 = k0 + KAT_COL_BLOCK < row_len ? k0 + KAT_COL_BLOCK : row_len;
                for (int64_t k = k0; k < k1; ++k) bias_sums[k] = 0.0f;
                for (int64_t t = 0; t < chunks; ++t)
                    for (int64_t k = k0; k < k1; ++k) bias_sums[k] += bias_partials[t * row_len + k];
            }
        }
    }
    free(c);
    free(partials);
    free(bias_partials);
    return status;
}

/*
 * Coefficient gradients from the (G, 10) sums [S0..S5, T1..T4]: grad_num (1, 6) summed over the groups when the
 * numerator is one shared row (shared != 0), else (G, 6); grad_den (G, 4) = -sign(b) * T with sign(0) = +1 (an
 * identity-initialised, all-zero denominator must still learn). float32 out, summed in float64 in group order.
 */
void kat_rational_coefficient_grads(const double *sums, int64_t groups, const float *den, int shared,
                                    float *grad_num, float *grad_den) {
    double shared_sums[6] = {0, 0, 0, 0, 0, 0};
    for (int64_t g = 0; g < groups; ++g) {
        for (int i = 0; i < 6; ++i) {
            if (shared) shared_sums[i] += sums[g * 10 + i];
            else grad_num[g * 6 + i] = (float)sums[g * 10 + i];
        }
        for (int j = 0; j < 4; ++j) {
            const double t = sums[g * 10 + 6 + j];
            grad_den[g * 4 + j] = (float)(den[g * 4 + j] < 0.0f ? t : -t);
        }
    }
    if (shared)
        for (int i = 0; i < 6; ++i) grad_num[i] = (float)shared_sums[i];
}

/*
 * kat_rational_backward followed by kat_rational_coefficient_grads: one call from Python instead of two, and no
 * (G, 10) tensor for the sums.
 */
int kat_rational_backward_grads(int dtype, const void *grad, const void *x, void *dx, int64_t total, int64_t groups,
                                int64_t seg_len, const float *num, int64_t num_row_stride, const float *den,
                                const float *bias, float *grad_num, float *grad_den, float *bias_sums, int nthreads) {
    double *sums = (double *)malloc(sizeof(double) * (size_t)(groups * 10));
    if (!sums) return KAT_NO_MEMORY;
    int status = kat_rational_backward(dtype, grad, x, dx, total, groups, seg_len, num, num_row_stride, den, bias,
                                       sums, bias_sums, nthreads);
    if (status == KAT_OK) kat_rational_coefficient_grads(sums, groups, den, num_row_stride == 0, grad_num, grad_den);
    free(sums);
    return status;
}
