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
 * Short groups (e.g. 24 channels a group in KAT-T's act1) instead take chunks of whole rows with per-column
 * coefficients: forward below KAT_FORWARD_ROW_MODE_MAX_L, where one short piece per group vectorises poorly, and
 * backward below KAT_ROW_MODE_MAX_L, with per-column accumulators folded into the group sums at the end of each
 * chunk: the fixed cost of a per-piece reduction would otherwise dominate. (Thresholds measured on a 2-core x86-64
 * VM.)
 *
 * Math is float32 whatever the storage type (float32, bfloat16, float16). The backward pass writes dx and the ten
 * coefficient sums per group (S_i = sum g x^i / Q, T_j = sum g P / Q^2 |x|^j): float32 inside a piece, float64
 * per chunk, and the chunk partials are added in chunk order at the end, so the result does not depend on the
 * number of threads and two calls give bitwise-identical sums. No atomics.
 *
 * Built and loaded with ctypes by kat_timm/ops/rational_cpu.py; plain C, no PyTorch headers.
 */
#include <float.h>
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
#define KAT_ROW_MODE_MAX_L 32
#endif
#define KAT_ROW_MODE_MAX_K 4096
/* Forward switches to whole rows (per-column coefficients) when groups are shorter than this. */
#ifndef KAT_FORWARD_ROW_MODE_MAX_L
#define KAT_FORWARD_ROW_MODE_MAX_L 32
#endif
#ifndef KAT_TILE_MODE_MAX_L
#define KAT_TILE_MODE_MAX_L 1024
#endif
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

/* The coefficients per column of the (M, K = G * L) matrix: ten arrays of K floats (a0..a5, |b1|..|b4|), for the
 * row-mode loops of short groups. NULL when out of memory; the caller frees it. */
static float *column_coeffs(const kat_coeffs *c, int64_t groups, int64_t seg_len) {
    const int64_t K = groups * seg_len;
    float *cc = (float *)malloc(sizeof(float) * (size_t)(10 * K));
    if (!cc) return NULL;
    for (int64_t k = 0; k < K; ++k) {
        const kat_coeffs *ck = &c[k / seg_len];
        for (int i = 0; i < 6; ++i) cc[i * K + k] = ck->a[i];
        for (int j = 0; j < 4; ++j) cc[(6 + j) * K + k] = ck->b[j];
    }
    return cc;
}

/* Column k's coefficients from column_coeffs' table cc (K columns), for the row-mode loops. */
#define KAT_COLUMN_COEFFS(k)                                                                                      \
    const float a0 = cc[k], a1 = cc[K + (k)], a2 = cc[2 * K + (k)], a3 = cc[3 * K + (k)], a4 = cc[4 * K + (k)];   \
    const float a5 = cc[5 * K + (k)], b1 = cc[6 * K + (k)], b2 = cc[7 * K + (k)], b3 = cc[8 * K + (k)];           \
    const float b4 = cc[9 * K + (k)];

/*
 * The per-element math shared by every loop below; a0..a5 and b1..b4 (= |b_j|) must be in scope.
 * KAT_VALUE(xv) defines yv = F(x). KAT_BACKWARD_TERMS(xv, gv) defines dxv = g dF/dx and the ten coefficient terms
 * e0..e9 = g x^i / Q (i = 0..5), g F |x|^j / Q (j = 1..4). sign(0) = +1 in dQ/dx.
 *
 * Plain form (KAT_VALUE, KAT_BACKWARD_TERMS): Horner in x and |x|. Safe form (the _SAFE macros) for pieces that
 * hold an |x| above KAT_LARGE: there, per element, the reciprocal form in u = 1 / x, with the reversed polynomials
 * P(x) = x^5 P~(u), Q(|x|) = |x|^4 Q~(|u|):
 *     F = x P~ / Q~,  dF/dx = (P'~ - (P~ / Q~) Q'~) / Q~,
 *     x^i / Q = u^(4-i) / Q~ (i <= 4),  x^5 / Q = x / Q~,  |x|^j / Q = |u|^(4-j) / Q~,
 * so no power of a large x is formed and F is finite wherever its true value is. Where Q~ is not a normal float
 * (the top b's are 0, e.g. the identity init) the plain form is exact and is kept. The same split as
 * kat_timm/ops/rational_torch.py (LARGE_INPUT), so every backend picks the same form for an element.
 */
#define KAT_LARGE 1e3f

#define KAT_P_Q(xv)                                                                                               \
    const float ax = fabsf(xv);                                                                                   \
    const float p = a0 + (xv) * (a1 + (xv) * (a2 + (xv) * (a3 + (xv) * (a4 + (xv) * a5))));                       \
    const float q = 1.0f + ax * (b1 + ax * (b2 + ax * (b3 + ax * b4)));

#define KAT_VALUE(xv)                                                                                             \
    KAT_P_Q(xv)                                                                                                   \
    const float yv = p / q;

#define KAT_BACKWARD_TERMS(xv, gv)                                                                                \
    KAT_P_Q(xv)                                                                                                   \
    const float sx = (xv) < 0.0f ? -1.0f : 1.0f;                                                                  \
    const float dp = a1 + (xv) * (2.0f * a2 + (xv) * (3.0f * a3 + (xv) * (4.0f * a4 + (xv) * (5.0f * a5))));      \
    const float dq = b1 + ax * (2.0f * b2 + ax * (3.0f * b3 + ax * (4.0f * b4)));                                 \
    const float rq = 1.0f / q;                                                                                    \
    const float f = p * rq;                                                                                       \
    const float dxv = (gv) * (dp - f * sx * dq) * rq;                                                             \
    const float gq = (gv) * rq;                                                                                   \
    const float gf = gq * f;                                                                                      \
    const float x2 = (xv) * (xv), x4 = x2 * x2;                                                                   \
    const float e0 = gq, e1 = gq * (xv), e2 = gq * x2, e3 = gq * x2 * (xv), e4 = gq * x4, e5 = gq * x4 * (xv);    \
    const float e6 = gf * ax, e7 = gf * x2, e8 = gf * x2 * ax, e9 = gf * x4;

/* Which form, and safe inputs for each: xr (the reciprocal form's x, 2 where unused), xp (the plain form's, 0 where
 * unused), u = 1 / xr, au = |u|, qt = Q~(au), use = 1 where the reciprocal form applies. */
#define KAT_SPLIT(xv)                                                                                             \
    const int big = fabsf(xv) > KAT_LARGE;                                                                        \
    const float xr = big ? (xv) : 2.0f;                                                                           \
    const float u = 1.0f / xr, au = fabsf(u);                                                                     \
    const float qt = b4 + au * (b3 + au * (b2 + au * (b1 + au)));                                                 \
    const int use = big && qt >= FLT_MIN;                                                                         \
    const float xp = use ? 0.0f : (xv);                                                                           \
    const float pt = a5 + u * (a4 + u * (a3 + u * (a2 + u * (a1 + u * a0))));

#define KAT_VALUE_SAFE(xv)                                                                                        \
    KAT_SPLIT(xv)                                                                                                 \
    KAT_P_Q(xp)                                                                                                   \
    const float yv = use ? xr * (pt / qt) : p / q;

#define KAT_BACKWARD_TERMS_SAFE(xv, gv)                                                                           \
    KAT_SPLIT(xv)                                                                                                 \
    KAT_P_Q(xp)                                                                                                   \
    const float sx = (xv) < 0.0f ? -1.0f : 1.0f;                                                                  \
    const float dp = a1 + xp * (2.0f * a2 + xp * (3.0f * a3 + xp * (4.0f * a4 + xp * (5.0f * a5))));              \
    const float dq = b1 + ax * (2.0f * b2 + ax * (3.0f * b3 + ax * (4.0f * b4)));                                 \
    const float dpt = 5.0f * a5 + u * (4.0f * a4 + u * (3.0f * a3 + u * (2.0f * a2 + u * a1)));                   \
    const float dqt = 4.0f * b4 + au * (3.0f * b3 + au * (2.0f * b2 + au * b1));                                  \
    const float rq = use ? 1.0f / qt : 1.0f / q;                                                                  \
    /* h = F / x in the reciprocal form: F sign(x) |u| = h, so no F (which may overflow on its own) is needed. */ \
    const float h = pt * rq;                                                                                      \
    const float f = use ? xr * h : p * rq;                                                                        \
    const float dxv = (gv) * (use ? (dpt - h * dqt) : (dp - f * sx * dq)) * rq;                                   \
    const float gq = (gv) * rq;                                                                                   \
    const float gf = gq * f, gh = gq * h;                                                                         \
    const float x2 = xp * xp, x4 = x2 * x2, u2 = u * u, au2 = au * au;                                            \
    const float e0 = use ? gq * u2 * u2 : gq, e1 = use ? gq * u2 * u : gq * xp;                                   \
    const float e2 = use ? gq * u2 : gq * x2, e3 = use ? gq * u : gq * x2 * xp;                                   \
    const float e4 = use ? gq : gq * x4, e5 = use ? gq * xr : gq * x4 * xp;                                       \
    /* g F |x|^j / Q = g h sign(x) |u|^(3-j) / Q~ (j <= 3), g h x / Q~ (j = 4). */                                \
    const float e6 = use ? gh * sx * au2 : gf * ax, e7 = use ? gh * sx * au : gf * x2;                            \
    const float e8 = use ? gh * sx : gf * x2 * ax, e9 = use ? gh * xr : gf * x4;

/* max |XV| over a piece (NaN ignored): whether it needs the safe form. A compare-select, not fmaxf, which gcc
 * does not vectorise. */
#define KAT_DEFINE_MAX_ABS(SUFFIX, T)                                                                             \
    KAT_CLONES static float max_abs_##SUFFIX(const T *restrict x, int64_t n, const float *restrict bias) {        \
        float m = 0.0f;                                                                                           \
        if (bias) {                                                                                               \
            _Pragma("omp simd reduction(max : m)") for (int64_t i = 0; i < n; ++i)                                \
                m = fabsf(load_##SUFFIX(x, i) + bias[i]) > m ? fabsf(load_##SUFFIX(x, i) + bias[i]) : m;          \
        } else {                                                                                                  \
            _Pragma("omp simd reduction(max : m)") for (int64_t i = 0; i < n; ++i)                                \
                m = fabsf(load_##SUFFIX(x, i)) > m ? fabsf(load_##SUFFIX(x, i)) : m;                              \
        }                                                                                                         \
        return m;                                                                                                 \
    }

/* Forward over [0, n): XV is the input of F at i (x, or x plus the column's bias); COEFFS declares a0..a5, b1..b4
 * for element i where they vary per column (empty where the caller holds them). The plain pass also finds max |x|;
 * a range with a large input is computed again in the safe form (so y must not be x). */
#define KAT_FORWARD_TWO_PASS(SUFFIX, XV, COEFFS)                                                                  \
    float m = 0.0f;                                                                                               \
    _Pragma("omp simd reduction(max : m)") for (int64_t i = 0; i < n; ++i) {                                      \
        COEFFS                                                                                                    \
        const float xv = XV;                                                                                      \
        KAT_VALUE(xv)                                                                                             \
        m = ax > m ? ax : m;                                                                                      \
        store_##SUFFIX(y, i, yv);                                                                                 \
    }                                                                                                             \
    if (m > KAT_LARGE) {                                                                                          \
        _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) {                                                     \
            COEFFS                                                                                                \
            const float xv = XV;                                                                                  \
            KAT_VALUE_SAFE(xv)                                                                                    \
            store_##SUFFIX(y, i, yv);                                                                             \
        }                                                                                                         \
    }

/* One piece inside a segment: forward, with the segment's group's coefficients. */
#define KAT_FORWARD_PIECE_BODY(SUFFIX, XV)                                                                        \
    const float a0 = c->a[0], a1 = c->a[1], a2 = c->a[2], a3 = c->a[3], a4 = c->a[4], a5 = c->a[5];               \
    const float b1 = c->b[0], b2 = c->b[1], b3 = c->b[2], b4 = c->b[3];                                           \
    KAT_FORWARD_TWO_PASS(SUFFIX, XV, )

#define KAT_DEFINE_FORWARD_PIECE(SUFFIX, T)                                                                       \
    KAT_CLONES static void forward_piece_##SUFFIX(const T *restrict x, T *restrict y, int64_t n,                  \
                                                  const kat_coeffs *c) {                                          \
        KAT_FORWARD_PIECE_BODY(SUFFIX, load_##SUFFIX(x, i))                                                       \
    }                                                                                                             \
    /* bias: the piece's columns' input biases (float32), added before F. */                                      \
    KAT_CLONES static void forward_piece_bias_##SUFFIX(const T *restrict x, T *restrict y, int64_t n,             \
                                                       const kat_coeffs *c, const float *restrict bias) {         \
        KAT_FORWARD_PIECE_BODY(SUFFIX, load_##SUFFIX(x, i) + bias[i])                                             \
    }

/* In place (y == x): the pieces read x again for the safe form, so each block of the piece goes through a buffer
 * that stays in L1, and only then over x. */
#ifndef KAT_IN_PLACE_BLOCK
#define KAT_IN_PLACE_BLOCK 256
#endif
#define KAT_DEFINE_FORWARD_IN_PLACE(SUFFIX, T)                                                                    \
    static void forward_piece_in_place_##SUFFIX(T *y, int64_t n, const kat_coeffs *c, const float *bias) {        \
        T block[KAT_IN_PLACE_BLOCK];                                                                              \
        for (int64_t j = 0; j < n; j += KAT_IN_PLACE_BLOCK) {                                                     \
            const int64_t m = n - j < KAT_IN_PLACE_BLOCK ? n - j : KAT_IN_PLACE_BLOCK;                            \
            if (bias)                                                                                             \
                forward_piece_bias_##SUFFIX(y + j, block, m, c, bias + j);                                        \
            else                                                                                                  \
                forward_piece_##SUFFIX(y + j, block, m, c);                                                       \
            memcpy(y + j, block, (size_t)m * sizeof(T));                                                          \
        }                                                                                                         \
    }

/*
 * Forward of short groups (row mode): one row's columns [0, n) of the (M, K) matrix with per-column coefficients
 * cc (ten arrays of K floats: a0..a5, |b1|..|b4|, each offset to the first column), so the loop runs over whole
 * rows instead of one short piece per group. The plain pass finds max |x|; a row with a large input is computed
 * again in the safe form (y must not be x: the caller goes through a buffer when writing in place).
 */
#define KAT_FORWARD_ROW_BODY(SUFFIX, XV) KAT_FORWARD_TWO_PASS(SUFFIX, XV, KAT_COLUMN_COEFFS(i))

#define KAT_DEFINE_FORWARD_ROW(SUFFIX, T)                                                                         \
    KAT_CLONES static void forward_row_##SUFFIX(const T *restrict x, T *restrict y, int64_t n, int64_t K,         \
                                                const float *restrict cc) {                                       \
        KAT_FORWARD_ROW_BODY(SUFFIX, load_##SUFFIX(x, i))                                                         \
    }                                                                                                             \
    KAT_CLONES static void forward_row_bias_##SUFFIX(const T *restrict x, T *restrict y, int64_t n, int64_t K,    \
                                                     const float *restrict cc, const float *restrict bias) {      \
        KAT_FORWARD_ROW_BODY(SUFFIX, load_##SUFFIX(x, i) + bias[i])                                               \
    }

/*
 * One piece inside a segment: backward. Adds this piece's ten sums to acc (float64). The bias variant reads x plus
 * the columns' biases and adds each dx (float32, before the cast to the storage type) to its column's bias_acc.
 * TERMS is KAT_BACKWARD_TERMS or, for a piece holding a large input, KAT_BACKWARD_TERMS_SAFE.
 */
#define KAT_BACKWARD_PIECE_LOOP(SUFFIX, XV, BIAS_STEP, TERMS)                                                     \
    {                                                                                                             \
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, t1 = 0, t2 = 0, t3 = 0, t4 = 0;                     \
        _Pragma("omp simd reduction(+ : s0, s1, s2, s3, s4, s5, t1, t2, t3, t4)") for (int64_t i = 0; i < n; ++i) { \
            const float xv = XV;                                                                                  \
            const float gv = load_##SUFFIX(grad, i);                                                              \
            TERMS(xv, gv)                                                                                         \
            store_##SUFFIX(dx, i, dxv);                                                                           \
            BIAS_STEP;                                                                                            \
            s0 += e0; s1 += e1; s2 += e2; s3 += e3; s4 += e4; s5 += e5;                                           \
            t1 += e6; t2 += e7; t3 += e8; t4 += e9;                                                               \
        }                                                                                                         \
        acc[0] += s0; acc[1] += s1; acc[2] += s2; acc[3] += s3; acc[4] += s4; acc[5] += s5;                       \
        acc[6] += t1; acc[7] += t2; acc[8] += t3; acc[9] += t4;                                                   \
    }

#define KAT_BACKWARD_PIECE_BODY(SUFFIX, XV, BIAS_STEP, BIAS)                                                      \
    const float a0 = c->a[0], a1 = c->a[1], a2 = c->a[2], a3 = c->a[3], a4 = c->a[4], a5 = c->a[5];               \
    const float b1 = c->b[0], b2 = c->b[1], b3 = c->b[2], b4 = c->b[3];                                           \
    if (max_abs_##SUFFIX(x, n, BIAS) > KAT_LARGE)                                                                 \
        KAT_BACKWARD_PIECE_LOOP(SUFFIX, XV, BIAS_STEP, KAT_BACKWARD_TERMS_SAFE)                                   \
    else                                                                                                          \
        KAT_BACKWARD_PIECE_LOOP(SUFFIX, XV, BIAS_STEP, KAT_BACKWARD_TERMS)

#define KAT_DEFINE_BACKWARD_PIECE(SUFFIX, T)                                                                      \
    KAT_CLONES static void backward_piece_##SUFFIX(const T *restrict grad, const T *restrict x, T *restrict dx,   \
                                                   int64_t n, const kat_coeffs *c, double *acc) {                 \
        KAT_BACKWARD_PIECE_BODY(SUFFIX, load_##SUFFIX(x, i), (void)0, NULL)                                       \
    }                                                                                                             \
    KAT_CLONES static void backward_piece_bias_##SUFFIX(const T *restrict grad, const T *restrict x,              \
                                                        T *restrict dx, int64_t n, const kat_coeffs *c,           \
                                                        double *acc, const float *restrict bias,                  \
                                                        float *restrict bias_acc) {                               \
        KAT_BACKWARD_PIECE_BODY(SUFFIX, load_##SUFFIX(x, i) + bias[i], bias_acc[i] += dxv, bias)                  \
    }

/*
 * Backward with a bias over the same segment of KAT_QUAD_ROWS consecutive rows (row stride K) at once: the ten
 * vector sums are reduced once per KAT_QUAD_ROWS * n elements instead of once per n. Short segments (KAT-T's 96
 * hidden channels per group) otherwise spend as long in those horizontal reductions as in the math. The rows'
 * dx of a column are added together before they reach that column's bias sum.
 */
#define KAT_QUAD_ROWS 4
#define KAT_QUAD_ROW(SUFFIX, R, TERMS)                                                                            \
    {                                                                                                             \
        const float xv = load_##SUFFIX(x, (R) * K + i) + bv;                                                      \
        const float gv = load_##SUFFIX(grad, (R) * K + i);                                                        \
        TERMS(xv, gv)                                                                                             \
        store_##SUFFIX(dx, (R) * K + i, dxv);                                                                     \
        column += dxv;                                                                                            \
        s0 += e0; s1 += e1; s2 += e2; s3 += e3; s4 += e4; s5 += e5;                                               \
        t1 += e6; t2 += e7; t3 += e8; t4 += e9;                                                                   \
    }
#define KAT_BACKWARD_QUAD_LOOP(SUFFIX, TERMS, BV, BIAS_STEP)                                                      \
    {                                                                                                             \
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, t1 = 0, t2 = 0, t3 = 0, t4 = 0;                     \
        _Pragma("omp simd reduction(+ : s0, s1, s2, s3, s4, s5, t1, t2, t3, t4)") for (int64_t i = 0; i < n; ++i) { \
            const float bv = BV;                                                                                  \
            float column = 0.0f;                                                                                  \
            KAT_QUAD_ROW(SUFFIX, 0, TERMS)                                                                        \
            KAT_QUAD_ROW(SUFFIX, 1, TERMS)                                                                        \
            KAT_QUAD_ROW(SUFFIX, 2, TERMS)                                                                        \
            KAT_QUAD_ROW(SUFFIX, 3, TERMS)                                                                        \
            BIAS_STEP;                                                                                            \
        }                                                                                                         \
        acc[0] += s0; acc[1] += s1; acc[2] += s2; acc[3] += s3; acc[4] += s4; acc[5] += s5;                       \
        acc[6] += t1; acc[7] += t2; acc[8] += t3; acc[9] += t4;                                                   \
    }
#define KAT_BACKWARD_QUAD_BODY(SUFFIX, BV, BIAS_STEP, BIAS)                                                       \
    const float a0 = c->a[0], a1 = c->a[1], a2 = c->a[2], a3 = c->a[3], a4 = c->a[4], a5 = c->a[5];               \
    const float b1 = c->b[0], b2 = c->b[1], b3 = c->b[2], b4 = c->b[3];                                           \
    float m = 0.0f;                                                                                               \
    for (int r = 0; r < KAT_QUAD_ROWS; ++r) {                                                                     \
        const float mr = max_abs_##SUFFIX(x + r * K, n, BIAS);                                                    \
        m = mr > m ? mr : m;                                                                                      \
    }                                                                                                             \
    if (m > KAT_LARGE)                                                                                            \
        KAT_BACKWARD_QUAD_LOOP(SUFFIX, KAT_BACKWARD_TERMS_SAFE, BV, BIAS_STEP)                                    \
    else                                                                                                          \
        KAT_BACKWARD_QUAD_LOOP(SUFFIX, KAT_BACKWARD_TERMS, BV, BIAS_STEP)

#define KAT_DEFINE_BACKWARD_QUAD(SUFFIX, T)                                                                       \
    KAT_CLONES static void backward_quad_##SUFFIX(const T *restrict grad, const T *restrict x, T *restrict dx,    \
                                                  int64_t n, int64_t K, const kat_coeffs *c, double *acc) {       \
        KAT_BACKWARD_QUAD_BODY(SUFFIX, 0.0f, (void)column, NULL)                                                  \
    }                                                                                                             \
    KAT_CLONES static void backward_quad_bias_##SUFFIX(const T *restrict grad, const T *restrict x,               \
                                                       T *restrict dx, int64_t n, int64_t K, const kat_coeffs *c, \
                                                       double *acc, const float *restrict bias,                   \
                                                       float *restrict bias_acc) {                                \
        KAT_BACKWARD_QUAD_BODY(SUFFIX, bias[i], bias_acc[i] += column, bias)                                      \
    }

#define KAT_BACKWARD_ROW_LOOP(SUFFIX, XV, BIAS_STEP, TERMS)                                                       \
    _Pragma("omp simd") for (int64_t k = 0; k < n; ++k) {                                                         \
        KAT_COLUMN_COEFFS(k)                                                                                      \
        const float xv = XV;                                                                                      \
        const float gv = load_##SUFFIX(grad, k);                                                                  \
        TERMS(xv, gv)                                                                                             \
        store_##SUFFIX(dx, k, dxv);                                                                               \
        BIAS_STEP;                                                                                                \
        acc[k] += e0;                                                                                             \
        acc[1 * KAT_COL_BLOCK + k] += e1;                                                                         \
        acc[2 * KAT_COL_BLOCK + k] += e2;                                                                         \
        acc[3 * KAT_COL_BLOCK + k] += e3;                                                                         \
        acc[4 * KAT_COL_BLOCK + k] += e4;                                                                         \
        acc[5 * KAT_COL_BLOCK + k] += e5;                                                                         \
        acc[6 * KAT_COL_BLOCK + k] += e6;                                                                         \
        acc[7 * KAT_COL_BLOCK + k] += e7;                                                                         \
        acc[8 * KAT_COL_BLOCK + k] += e8;                                                                         \
        acc[9 * KAT_COL_BLOCK + k] += e9;                                                                         \
    }

#define KAT_BACKWARD_ROW_BODY(SUFFIX, XV, BIAS_STEP, BIAS)                                                        \
    if (max_abs_##SUFFIX(x, n, BIAS) > KAT_LARGE) {                                                               \
        KAT_BACKWARD_ROW_LOOP(SUFFIX, XV, BIAS_STEP, KAT_BACKWARD_TERMS_SAFE)                                     \
    } else {                                                                                                      \
        KAT_BACKWARD_ROW_LOOP(SUFFIX, XV, BIAS_STEP, KAT_BACKWARD_TERMS)                                          \
    }

/*
 * Backward of n columns of one row (row stride K = G * L) for short groups (small L): per-column coefficients
 * (cc[i * K + k]) and per-column float accumulators (acc[i * KAT_COL_BLOCK + k]) instead of per-piece reductions,
 * whose fixed cost dominates when a piece is only a few dozen elements long. The bias variant adds the columns'
 * biases to x and accumulates dx per column in an eleventh row of acc.
 */
#define KAT_DEFINE_BACKWARD_ROW(SUFFIX, T)                                                                        \
    KAT_CLONES static void backward_row_##SUFFIX(const T *restrict grad, const T *restrict x, T *restrict dx,     \
                                                 int64_t n, int64_t K, const float *restrict cc,                  \
                                                 float *restrict acc) {                                           \
        KAT_BACKWARD_ROW_BODY(SUFFIX, load_##SUFFIX(x, k), (void)0, NULL)                                         \
    }                                                                                                             \
    KAT_CLONES static void backward_row_bias_##SUFFIX(const T *restrict grad, const T *restrict x,                \
                                                      T *restrict dx, int64_t n, int64_t K,                       \
                                                      const float *restrict cc, float *restrict acc,              \
                                                      const float *restrict bias) {                               \
        KAT_BACKWARD_ROW_BODY(SUFFIX, load_##SUFFIX(x, k) + bias[k], acc[10 * KAT_COL_BLOCK + k] += dxv, bias)    \
    }

#define KAT_DEFINE_DRIVERS(SUFFIX, T)                                                                             \
    KAT_DEFINE_MAX_ABS(SUFFIX, T)                                                                                 \
    KAT_DEFINE_FORWARD_PIECE(SUFFIX, T)                                                                           \
    KAT_DEFINE_FORWARD_IN_PLACE(SUFFIX, T)                                                                        \
    KAT_DEFINE_FORWARD_ROW(SUFFIX, T)                                                                             \
    KAT_DEFINE_BACKWARD_PIECE(SUFFIX, T)                                                                          \
    KAT_DEFINE_BACKWARD_QUAD(SUFFIX, T)                                                                           \
    KAT_DEFINE_BACKWARD_ROW(SUFFIX, T)                                                                            \
    /* Chunks of whole rows; the per-column sums of a chunk are folded into its group partials at its end. */     \
    static int backward_rows_##SUFFIX(const T *grad, const T *x, T *dx, int64_t rows, int64_t groups,             \
                                      int64_t seg_len, const kat_coeffs *c, double *partials, int64_t rows_per_chunk, \
                                      const float *bias, float *bias_partials, int nthreads) {                    \
        const int64_t K = groups * seg_len;                                                                       \
        const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;                                      \
        float *cc = column_coeffs(c, groups, seg_len);                                                            \
        if (!cc) return KAT_NO_MEMORY;                                                                            \
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
                /* Column blocks keep the block's accumulators and coefficients in L1. */                         \
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
                    /* Fold columns into their groups, walking the group boundaries (no division per column). */  \
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
     * Backward of groups too long for row mode: tiles of whole rows, at most KAT_MAX_ROW_TILES of them, so the   \
     * per-tile, per-column bias sums (bias_partials[tile * K + k]) stay small whatever the shape. Rows go four at \
     * a time through backward_quad, the rest one by one.                                                         \
     */                                                                                                           \
    static void backward_tiles_##SUFFIX(const T *grad, const T *x, T *dx, int64_t rows, int64_t groups,           \
                                        int64_t seg_len, const kat_coeffs *c, double *partials,                   \
                                        int64_t rows_per_tile, const float *bias, float *bias_partials,           \
                                        int nthreads) {                                                           \
        const int64_t K = groups * seg_len;                                                                       \
        const int64_t tiles = (rows + rows_per_tile - 1) / rows_per_tile;                                         \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)") for (int64_t t = 0; t < tiles; ++t) {  \
            const int64_t r1 = (t + 1) * rows_per_tile < rows ? (t + 1) * rows_per_tile : rows;                   \
            int64_t r = t * rows_per_tile;                                                                        \
            for (; r < r1; r += (r + KAT_QUAD_ROWS <= r1 ? KAT_QUAD_ROWS : 1)) {                                  \
                const int quad = r + KAT_QUAD_ROWS <= r1;                                                         \
                for (int64_t g = 0; g < groups; ++g) {                                                            \
                    const int64_t off = r * K + g * seg_len;                                                      \
                    double *part = partials + (t * groups + g) * 10;                                              \
                    if (bias && quad)                                                                             \
                        backward_quad_bias_##SUFFIX(grad + off, x + off, dx + off, seg_len, K, &c[g], part,       \
                                                    bias + g * seg_len, bias_partials + t * K + g * seg_len);     \
                    else if (bias)                                                                                \
                        backward_piece_bias_##SUFFIX(grad + off, x + off, dx + off, seg_len, &c[g], part,         \
                                                     bias + g * seg_len, bias_partials + t * K + g * seg_len);    \
                    else if (quad)                                                                                \
                        backward_quad_##SUFFIX(grad + off, x + off, dx + off, seg_len, K, &c[g], part);           \
                    else                                                                                          \
                        backward_piece_##SUFFIX(grad + off, x + off, dx + off, seg_len, &c[g], part);             \
                }                                                                                                 \
            }                                                                                                     \
        }                                                                                                         \
    }                                                                                                             \
    /* Forward of short groups: chunks of whole rows, column blocks through an L1 buffer when in place. */       \
    static void forward_rows_##SUFFIX(const T *x, T *y, int64_t rows, int64_t K, const float *cc,                 \
                                      const float *bias, int nthreads) {                                          \
        const int64_t rows_per_chunk = (KAT_CHUNK + K - 1) / K;                                                   \
        const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;                                      \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)") for (int64_t k = 0; k < chunks; ++k) { \
            T block[KAT_IN_PLACE_BLOCK];                                                                          \
            const int64_t r1 = (k + 1) * rows_per_chunk < rows ? (k + 1) * rows_per_chunk : rows;                 \
            for (int64_t r = k * rows_per_chunk; r < r1; ++r) {                                                   \
                for (int64_t k0 = 0; k0 < K; k0 += KAT_IN_PLACE_BLOCK) {                                          \
                    const int64_t n = K - k0 < KAT_IN_PLACE_BLOCK ? K - k0 : KAT_IN_PLACE_BLOCK;                  \
                    T *out = x == y ? block : y + r * K + k0;                                                      \
                    if (bias)                                                                                     \
                        forward_row_bias_##SUFFIX(x + r * K + k0, out, n, K, cc + k0, bias + k0);                 \
                    else                                                                                          \
                        forward_row_##SUFFIX(x + r * K + k0, out, n, K, cc + k0);                                 \
                    if (x == y) memcpy(y + r * K + k0, block, (size_t)n * sizeof(T));                             \
                }                                                                                                 \
            }                                                                                                     \
        }                                                                                                         \
    }                                                                                                             \
    static void forward_##SUFFIX(const T *x, T *y, int64_t total, int64_t groups, int64_t seg_len,                \
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
                if (x == y)                                                                                       \
                    forward_piece_in_place_##SUFFIX(y + i, end - i, &c[seg % groups], bias ? bias + i % K : NULL); \
                else if (bias)                                                                                    \
                    forward_piece_bias_##SUFFIX(x + i, y + i, end - i, &c[seg % groups], bias + i % K);           \
                else                                                                                              \
                    forward_piece_##SUFFIX(x + i, y + i, end - i, &c[seg % groups]);                              \
                i = end;                                                                                          \
            }                                                                                                     \
        }                                                                                                         \
    }                                                                                                             \
    static void backward_##SUFFIX(const T *grad, const T *x, T *dx, int64_t total, int64_t groups,                \
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
 * x, y: (M, G, L) contiguous, total = M * G * L elements of the storage type `dtype`; y == x computes in place
 * (any other overlap is not allowed).
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
    const int64_t row_len = groups * seg_len;
    if (seg_len < KAT_FORWARD_ROW_MODE_MAX_L && row_len <= KAT_ROW_MODE_MAX_K) {
        /* Short groups: a piece per group would be too short to vectorise well; whole rows instead. */
        float *cc = column_coeffs(c, groups, seg_len);
        free(c);
        if (!cc) return KAT_NO_MEMORY;
        const int64_t rows = total / row_len;
        if (dtype == KAT_F32) forward_rows_f32((const float *)x, (float *)y, rows, row_len, cc, bias, nthreads);
        else if (dtype == KAT_BF16)
            forward_rows_bf16((const uint16_t *)x, (uint16_t *)y, rows, row_len, cc, bias, nthreads);
#if KAT_HAVE_F16
        else forward_rows_f16((const _Float16 *)x, (_Float16 *)y, rows, row_len, cc, bias, nthreads);
#endif
        free(cc);
        return KAT_OK;
    }
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
    /* Groups of up to KAT_TILE_MODE_MAX_L (and any group with a bias): tiles of rows, four rows per reduction. */
    const int tile_mode = !row_mode && (bias != NULL || seg_len <= KAT_TILE_MODE_MAX_L);
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
            /* Per column, chunks in order (the split over threads is by column, so the order never changes). Small
             * folds (KAT's act2 at batch 8: 3e4 to 5e5 adds) stay on this thread: a parallel region's barrier
             * would cost more than they do. */
            const int64_t blocks = (row_len + KAT_COL_BLOCK - 1) / KAT_COL_BLOCK;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks * row_len > (1 << 20))
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
