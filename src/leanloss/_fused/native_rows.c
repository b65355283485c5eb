/* Native CPU forms of row kernels, for float32 and bfloat16 blocks.

   The math is stated once, in the torch functions each part names: leanloss/_fused/distill_rows.py
   (distill_block) and leanloss/_fused/logp_rows.py (row_sums and the maxima is_top1 reads; the
   gradient from the per-row coefficients A, B, G, K, which cross entropy's block in
   leanloss/_fused/ce_rows.py also uses). This file is a hand-compiled form of them,
   and the tests hold it to their values. Built at run time by leanloss/_fused/native.py with the
   system C compiler and called through ctypes (which releases the interpreter lock).

   The distillation block takes four passes per row; the first reads the row from memory
   (prefetched ahead), the others find it in the core's cache (a row of 32000 classes is 125 KiB
   of float32 scratch per operand):
     1. the row maxima of a (student) and b (teacher);
     2. e_a = exp(a - max a) and e_b = exp(b - max b) into scratch, and their sums S_a, S_b:
        lse = max + log S;
     3. q = e_a / S_a, p = e_b / S_b (no second exponential), the divergence's row sums; for the
        JSD the term s = lambda - log q overwrites e_b (the gradient needs q and s only);
     4. with an upstream gradient g, the gradient written over a, rounded to a's dtype.
   Two exponentials and (JSD) one logarithm per element. The log-prob statistics take two passes
   (maxima, then one exponential and the sums), their gradient one; under a softcap each also
   takes a tanh. exp, log and tanh are inline polynomials (exp_inline, log_inline, tanh_inline),
   so the loops vectorize with no calls and no spills. */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bits_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t float_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* exp(x) within 1 ulp of the exact value (x <= 88), written so that the loops that call it stay
   vectorized with no call: x = n ln 2 + r with |r| <= ln(2)/2, e^r = 1 + r + r^2 P(r) (Cephes'
   degree-5 minimax P), 2^n added to the exponent bits. Below -87.34, where the result would be
   subnormal, it is 0; a NaN stays a NaN. */
static inline float exp_inline(float x) {
    const float round = 12582912.0f; /* 1.5 * 2^23: t's low bits hold n = round(x / ln 2) */
    const float t = x * 1.44269504088896341f + round, n = t - round;
    const float r = n * 2.12194440e-4f + (n * -0.693359375f + x); /* ln 2 in two parts */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const float y = bits_float(float_bits(p) + (float_bits(t) << 23));
    return x < -87.33654f ? 0.0f : (float_bits(x) & 0x7fffffffu) > 0x7f800000u ? x : y;
}

/* log(v) within 1 ulp for a positive normal v (+inf and NaN are returned as they are): v = 2^e m
   with m in [sqrt(1/2), sqrt(2)), f = m - 1, log(1 + f) = f - f^2/2 + f^3 P(f) (Cephes' degree-8
   minimax P), e ln 2 added in two parts. */
static inline float log_inline(float v) {
    const int32_t e = (int32_t)(float_bits(v) - 0x3f3504f3u) >> 23; /* 0x3f3504f3: sqrt(1/2) */
    const float f = bits_float(float_bits(v) - ((uint32_t)e << 23)) - 1.0f, fe = (float)e, z = f * f;
    float p = 7.0376836292e-2f;
    p = p * f - 1.1514610310e-1f;
    p = p * f + 1.1676998740e-1f;
    p = p * f - 1.2420140846e-1f;
    p = p * f + 1.4249322787e-1f;
    p = p * f - 1.6668057665e-1f;
    p = p * f + 2.0000714765e-1f;
    p = p * f - 2.4999993993e-1f;
    p = p * f + 3.3333331174e-1f;
    const float l = fe * 0.693359375f + (f + (z * -0.5f + (fe * -2.12194440e-4f + f * z * p)));
    return (float_bits(v) & 0x7fffffffu) < 0x7f800000u ? l : v;
}

/* tanh(x) within 2 ulp: x + x^3 P(x^2) for |x| < 0.625 (Cephes' degree-4 minimax P), else
   1 - 2 / (e^{2|x|} + 1) with x's sign (|x| capped at 20, where it is 1 in float32); a NaN stays
   a NaN. Both are computed and one is selected, so loops that call it stay vectorized. */
static inline float tanh_inline(float x) {
    const float a = fabsf(x), a2 = 2.0f * a > 40.0f ? 40.0f : 2.0f * a; /* a NaN passes */
    const float big = 1.0f - 2.0f / (exp_inline(a2) + 1.0f);
    const float z = x * x;
    float p = -5.70498872745e-3f;
    p = p * z + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    return a < 0.625f ? p * z * x + x : copysignf(big, x);
}

enum { KIND_FORWARD = 0, KIND_REVERSE = 1, KIND_JSD = 2 };
enum { CHUNK = 1024 }; /* classes per partial row sum: rounding grows with a sum's length */

typedef struct {
    void *a;            /* (n, V) student logits / T; the gradient is written over it */
    const void *b;      /* (n, V) teacher logits / T */
    const float *a_y;   /* (n,) a at each row's target, or NULL (no hard term) */
    const float *g;     /* (n,) upstream gradient, or NULL (no gradient) */
    float *loss;        /* (n,) out */
    long n, V;
    int kind;
    float beta, soft, hard_weight;
} distill_args;

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#define LOAD_f32(p, j) ((p)[j])
#define LOAD_bf16(p, j) from_bf16((p)[j])
#define STORE_f32(p, j, v) ((p)[j] = (v))
#define STORE_bf16(p, j, v) ((p)[j] = to_bf16(v))
/* not fmaxf, which the vectorizer leaves as a call; FLOOR_TINY keeps a NaN, as clamp_min does */
#define MAX(u, v) ((v) > (u) ? (v) : (u))
#define FLOOR_TINY(v) ((v) < FLT_MIN ? FLT_MIN : (v))
#define CTYPE_f32 float
#define CTYPE_bf16 uint16_t

/* The cache lines AHEAD bytes past [j0, j1) of p, requested before they are read: the hardware
   prefetchers stop at each 4 KiB page, and a row read once from memory then waits on every page
   (the log-prob gradient's one pass: 31 -> 15 ms on a 256 x 131072 bfloat16 block, one thread). */
enum { AHEAD = 4096 };
#define PREFETCH(p, j0, j1, T, write)                                                                 \
    for (long jp = (j0) + AHEAD / (long)sizeof(T); jp < (j1) + AHEAD / (long)sizeof(T); jp += 64 / (long)sizeof(T)) \
        __builtin_prefetch((p) + jp, write, 3)

/* The next row's cache lines in [j0, j1), requested into L2 while this row is computed, so that
   its first pass finds them there. */
#define PREFETCH_NEXT(p, j0, j1, T)                                                                   \
    for (long jn = (j0); jn < (j1); jn += 64 / (long)sizeof(T)) __builtin_prefetch((p) + jn, 0, 2)

/* max over [lo, hi) of scale * p[j] (-inf when empty), prefetched ahead */
#define ROW_MAX(T)                                                                                    \
static inline float row_max_##T(const CTYPE_##T *p, long lo, long hi, float scale) {                  \
    float m = -INFINITY;                                                                              \
    for (long j0 = lo; j0 < hi; j0 += CHUNK) {                                                        \
        const long j1 = j0 + CHUNK < hi ? j0 + CHUNK : hi;                                            \
        float cm = -INFINITY;                                                                         \
        PREFETCH(p, j0, j1, CTYPE_##T, 0);                                                            \
        _Pragma("omp simd reduction(max:cm)")                                                        \
        for (long j = j0; j < j1; j++) cm = MAX(cm, LOAD_##T(p, j) * scale);                          \
        m = MAX(m, cm);                                                                               \
    }                                                                                                 \
    return m;                                                                                         \
}
ROW_MAX(f32)
ROW_MAX(bf16)

#define DISTILL_ROWS(TA, TB)                                                                         \
static void distill_rows_##TA##_##TB(const void *args, long r0, long r1, float *ea) {               \
    const distill_args *s = (const distill_args *)args;                                               \
    const long V = s->V;                                                                              \
    float *eb = ea + (V + 15) / 16 * 16;                                                              \
    const float beta = s->beta, r = beta / (1.0f - beta), soft = s->soft, hw = s->hard_weight;        \
    for (long i = r0; i < r1; i++) {                                                                  \
        CTYPE_##TA *x = (CTYPE_##TA *)s->a + i * V;                                                   \
        const CTYPE_##TB *y = (const CTYPE_##TB *)s->b + i * V;                                       \
        const float ma = row_max_##TA(x, 0, V, 1.0f), mb = row_max_##TB(y, 0, V, 1.0f);              \
        float sa = 0.0f, sb = 0.0f;                                                                   \
        for (long j0 = 0; j0 < V; j0 += CHUNK) {                                                      \
            const long j1 = j0 + CHUNK < V ? j0 + CHUNK : V;                                          \
            float ca = 0.0f, cb = 0.0f;                                                               \
            if (i + 1 < r1) { PREFETCH_NEXT(x + V, j0, j1, CTYPE_##TA); PREFETCH_NEXT(y + V, j0, j1, CTYPE_##TB); } \
            _Pragma("omp simd reduction(+:ca,cb)")                                                   \
            for (long j = j0; j < j1; j++) {                                                          \
                float e1 = exp_inline(LOAD_##TA(x, j) - ma), e2 = exp_inline(LOAD_##TB(y, j) - mb);               \
                ea[j] = e1; eb[j] = e2; ca += e1; cb += e2;                                           \
            }                                                                                         \
            sa += ca; sb += cb;                                                                       \
        }                                                                                             \
        const float la = ma + log_inline(sa), lb = mb + log_inline(sb), ia = 1.0f / sa, ib = 1.0f / sb;            \
        float s1 = 0.0f, s2 = 0.0f;                                                                   \
        for (long j0 = 0; j0 < V; j0 += CHUNK) {                                                      \
            const long j1 = j0 + CHUNK < V ? j0 + CHUNK : V;                                          \
            float c1 = 0.0f, c2 = 0.0f;                                                               \
            if (s->kind == KIND_FORWARD) {                                                            \
                _Pragma("omp simd reduction(+:c1)")                                                   \
                for (long j = j0; j < j1; j++) c1 += eb[j] * ib * (LOAD_##TB(y, j) - LOAD_##TA(x, j));\
            } else if (s->kind == KIND_REVERSE) {                                                     \
                _Pragma("omp simd reduction(+:c1)")                                                   \
                for (long j = j0; j < j1; j++) c1 += ea[j] * ia * (LOAD_##TA(x, j) - LOAD_##TB(y, j));\
            } else {                                                                                  \
                _Pragma("omp simd reduction(+:c1,c2)")                                                \
                for (long j = j0; j < j1; j++) {                                                      \
                    float q = ea[j] * ia, p = eb[j] * ib, lq = LOAD_##TA(x, j) - la;                  \
                    float lam = log_inline(FLOOR_TINY(q + p * r)), st = lam - lq;                           \
                    c1 += p * (LOAD_##TB(y, j) - lb - lam); c2 += q * st; eb[j] = st;                 \
                }                                                                                     \
            }                                                                                         \
            s1 += c1; s2 += c2;                                                                       \
        }                                                                                             \
        float div = s->kind == KIND_FORWARD ? s1 + (la - lb) : s->kind == KIND_REVERSE ? s1 - la + lb \
                  : beta * s1 - (1.0f - beta) * s2 - log1pf(-beta);                                   \
        float loss = div * soft;                                                                      \
        if (s->a_y != NULL) loss += hw * (la - s->a_y[i]);                                            \
        s->loss[i] = loss;                                                                            \
        if (s->g == NULL) continue;                                                                   \
        const float g = s->g[i], cq = g * hw;                                                         \
        if (s->kind == KIND_FORWARD) {                                                                \
            const float c = g * soft;                                                                 \
            _Pragma("omp simd")                                                                      \
            for (long j = 0; j < V; j++) {                                                            \
                float q = ea[j] * ia;                                                                 \
                STORE_##TA(x, j, (q - eb[j] * ib) * c + q * cq);                                      \
            }                                                                                         \
        } else if (s->kind == KIND_REVERSE) {                                                         \
            const float c = g * soft;                                                                 \
            _Pragma("omp simd")                                                                       \
            for (long j = 0; j < V; j++) {                                                            \
                float q = ea[j] * ia, e = LOAD_##TA(x, j) - LOAD_##TB(y, j);                          \
                STORE_##TA(x, j, q * (e - s1) * c + q * cq);                                          \
            }                                                                                         \
        } else {                                                                                      \
            const float c = g * soft * (1.0f - beta);                                                 \
            _Pragma("omp simd")                                                                       \
            for (long j = 0; j < V; j++) {                                                            \
                float q = ea[j] * ia;                                                                 \
                STORE_##TA(x, j, q * (s2 - eb[j]) * c + q * cq);                                      \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
}

DISTILL_ROWS(f32, f32)
DISTILL_ROWS(f32, bf16)
DISTILL_ROWS(bf16, f32)
DISTILL_ROWS(bf16, bf16)

/* The logits y of the raw z that the log-prob kernels read (leanloss/_fused/ce_rows.py:
   transform): y = mul z, or with a softcap c (capped: c > 0), y = c tanh(mul z) (mul is then
   scale / c); the maxima of mul z are mapped with mul = 1. `capped` is a constant in the loops. */
static inline __attribute__((always_inline)) float logit_of(float x, float mul, float cap, const int capped) {
    return capped ? cap * tanh_inline(x * mul) : x * mul;
}

/* The log-probabilities' row sums (leanloss/_fused/logp_rows.py: row_sums, and the maxima that
   is_top1 reads) of the logits y, and their gradient's dense part written over z. */
enum { SUM_U = 1, SUM_Q = 2, SUM_Y = 4 }; /* the sums asked for besides S */
typedef struct {
    const void *z;
    const int64_t *t; /* (n,) targets, or NULL: no maximum before the target */
    long V;
    float mul, cap;   /* logit_of's (cap 0: no softcap) */
    int sums;         /* SUM_U | SUM_Q | SUM_Y, as compiled_sums gives them */
    float *m, *S, *U, *Q, *Y, *before, *y_t;
} logp_sums_args;

/* S, U, Q and Y of y = mul z over [j0, j1), added to acc[0..3]; `sums` is a constant at every
   call (logp_sums' switch), so each combination compiles to a loop with only its own work. */
#define LOGP_CHUNK(TZ)                                                                                \
static inline __attribute__((always_inline)) void logp_chunk_##TZ(                                    \
        const CTYPE_##TZ *z, long j0, long j1, float mul, float m, const int sums, double *acc) {     \
    float cs = 0.0f, cu = 0.0f, cq = 0.0f, cy = 0.0f;                                                 \
    _Pragma("omp simd reduction(+:cs,cu,cq,cy)")                                                      \
    for (long j = j0; j < j1; j++) {                                                                  \
        const float y = LOAD_##TZ(z, j) * mul, d = y - m, e = exp_inline(d);                          \
        cs += e;                                                                                      \
        if (sums & SUM_U) cu += e > 0.0f ? e * d : 0.0f;                                              \
        if (sums & SUM_Q) cq += e * e;                                                                \
        if (sums & SUM_Y) cy += y;                                                                    \
    }                                                                                                 \
    acc[0] += cs; acc[1] += cu; acc[2] += cq; acc[3] += cy;                                           \
}                                                                                                     \
/* the softcapped logits c tanh(mul z) over [j0, j1), into y[0 .. j1 - j0) */                        \
static inline void capped_logits_##TZ(const CTYPE_##TZ *z, long j0, long j1, float mul, float cap,   \
                                      float *y) {                                                     \
    _Pragma("omp simd")                                                                               \
    for (long j = j0; j < j1; j++) y[j - j0] = logit_of(LOAD_##TZ(z, j), mul, cap, 1);                \
}

/* The combinations of sums compiled apart: none besides S (log-probs, cross entropy), U alone (the
   entropy) and all three. Each is a loop of its own per dtype, about 0.07 s of build time, so
   any other request is computed as all three (the caller reads only the sums it asked for).
   Under a softcap a chunk's logits are mapped into a buffer first (in L1) and summed by the
   float32 loops, so the softcap adds one loop per dtype, not three. */
static int compiled_sums(int sums) {
    sums &= SUM_U | SUM_Q | SUM_Y;
    return sums == 0 || sums == SUM_U ? sums : SUM_U | SUM_Q | SUM_Y;
}
/* each compiled combination once (not inlined: the plain and the softcapped path share it) */
#define LOGP_CHUNK_AS(TZ, K)                                                                          \
static __attribute__((noinline)) void logp_chunk_##TZ##_##K(const CTYPE_##TZ *z, long j0, long j1,    \
                                                            float mul, float m, double *acc) {        \
    logp_chunk_##TZ(z, j0, j1, mul, m, K, acc);                                                       \
}
#define SUMS_SWITCH(TZ, P, J0, J1, MUL)                                                              \
    switch (s->sums) {                                                                                \
        case 0: logp_chunk_##TZ##_0(P, J0, J1, MUL, m, acc); break;                                   \
        case SUM_U: logp_chunk_##TZ##_1(P, J0, J1, MUL, m, acc); break;                               \
        default: logp_chunk_##TZ##_7(P, J0, J1, MUL, m, acc); break;                                  \
    }

/* The logit maxima are taken of mul z and then mapped (tanh is increasing); y_t, the target's
   logit, is mapped by the same code, so that is_top1 compares like with like. */
#define LOGP_SUMS(TZ)                                                                                 \
static void logp_sums_##TZ(const void *args, long r0, long r1, float *unused) {                      \
    const logp_sums_args *s = (const logp_sums_args *)args;                                           \
    const long V = s->V;                                                                              \
    const int capped = s->cap > 0.0f;                                                                 \
    float y[CHUNK] __attribute__((aligned(64))); /* a chunk's softcapped logits */                   \
    (void)unused;                                                                                     \
    for (long i = r0; i < r1; i++) {                                                                  \
        const CTYPE_##TZ *z = (const CTYPE_##TZ *)s->z + i * V;                                       \
        long t = s->t == NULL ? 0 : s->t[i] < 0 ? 0 : s->t[i] > V ? V : s->t[i];                      \
        const float mb = row_max_##TZ(z, 0, t, s->mul), ma = row_max_##TZ(z, t, V, s->mul);          \
        const float m = logit_of(MAX(ma, mb), 1.0f, s->cap, capped);                                  \
        double acc[4] = {0.0, 0.0, 0.0, 0.0}; /* S, U, Q, Y */                                        \
        for (long j0 = 0; j0 < V; j0 += CHUNK) {                                                      \
            const long j1 = j0 + CHUNK < V ? j0 + CHUNK : V;                                          \
            if (i + 1 < r1) PREFETCH_NEXT(z + V, j0, j1, CTYPE_##TZ);                                 \
            if (capped) {                                                                             \
                capped_logits_##TZ(z, j0, j1, s->mul, s->cap, y);                                     \
                SUMS_SWITCH(f32, y, 0, j1 - j0, 1.0f)                                                 \
            } else {                                                                                  \
                SUMS_SWITCH(TZ, z, j0, j1, s->mul)                                                    \
            }                                                                                         \
        }                                                                                             \
        s->m[i] = m; s->S[i] = (float)acc[0];                                                         \
        if (s->sums & SUM_U) s->U[i] = (float)acc[1];                                                 \
        if (s->sums & SUM_Q) s->Q[i] = (float)acc[2];                                                 \
        if (s->sums & SUM_Y) s->Y[i] = (float)acc[3];                                                 \
        if (s->t != NULL) {                                                                           \
            s->before[i] = t == 0 ? mb : logit_of(mb, 1.0f, s->cap, capped); /* -inf: none */       \
            s->y_t[i] = t < V ? logit_of(LOAD_##TZ(z, t), s->mul, s->cap, capped) : -INFINITY;        \
        }                                                                                             \
    }                                                                                                 \
}

/* The gradient of logp_rows' module docstring (and cross entropy's a p - s, ce_rows) from
   per-row coefficients: out_scale ((p > 0 ? p (B log p + G p + A) : 0) + K) dy/dz, log p = y - lse,
   with dy/dz = 1 or, under a softcap, 1 - (y / c)^2 (ce_rows.softcap_slope; out_scale carries
   the scale). */
typedef struct {
    void *z;
    long V;
    float mul, cap, inv_cap, out_scale; /* logit_of's; 1 / cap; the gradient's factor */
    const float *lse, *A, *B, *G, *K;
} logp_grad_args;

#define LOGP_GRAD_ROWS(TZ, CAPPED_)                                                                   \
static void logp_grad_##TZ##_##CAPPED_(const void *args, long r0, long r1, float *unused) {          \
    const logp_grad_args *s = (const logp_grad_args *)args;                                           \
    const long V = s->V;                                                                              \
    const float mul = s->mul, cap = s->cap, inv_cap = s->inv_cap, out_scale = s->out_scale;           \
    (void)unused;                                                                                     \
    for (long i = r0; i < r1; i++) {                                                                  \
        CTYPE_##TZ *z = (CTYPE_##TZ *)s->z + i * V;                                                   \
        const float lse = s->lse[i], A = s->A[i], B = s->B[i], G = s->G[i], K = s->K[i];              \
        for (long j0 = 0; j0 < V; j0 += CHUNK) {                                                      \
            const long j1 = j0 + CHUNK < V ? j0 + CHUNK : V;                                          \
            PREFETCH(z, j0, j1, CTYPE_##TZ, 1);                                                       \
            if (i + 1 < r1) PREFETCH_NEXT(z + V, j0, j1, CTYPE_##TZ);                                 \
            _Pragma("omp simd")                                                                       \
            for (long j = j0; j < j1; j++) {                                                          \
                const float y = logit_of(LOAD_##TZ(z, j), mul, cap, CAPPED_);                         \
                const float lp = y - lse, p = exp_inline(lp);                                         \
                float grad = ((p > 0.0f ? p * (B * lp + G * p + A) : 0.0f) + K) * out_scale;          \
                if (CAPPED_) { const float r = y * inv_cap; grad *= 1.0f - r * r; }                  \
                STORE_##TZ(z, j, grad);                                                               \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
}

LOGP_CHUNK(f32)
LOGP_CHUNK(bf16)
LOGP_CHUNK_AS(f32, 0)
LOGP_CHUNK_AS(f32, 1)
LOGP_CHUNK_AS(f32, 7)
LOGP_CHUNK_AS(bf16, 0)
LOGP_CHUNK_AS(bf16, 1)
LOGP_CHUNK_AS(bf16, 7)
LOGP_SUMS(f32)
LOGP_SUMS(bf16)
LOGP_GRAD_ROWS(f32, 0)
LOGP_GRAD_ROWS(f32, 1)
LOGP_GRAD_ROWS(bf16, 0)
LOGP_GRAD_ROWS(bf16, 1)

/* Rows split evenly over `threads` threads (the caller's included), each with `scratch` floats
   of its own: OpenMP's threads where the build has it (torch's own pool: the loader finds the
   libgomp that torch loaded, whose threads are still awake from its last op), else pthreads.
   Returns 0, or -1, having run nothing, when the scratch memory could not be had (the caller
   then runs the torch form). */
typedef void (*rows_fn)(const void *args, long r0, long r1, float *scratch);

typedef struct {
    rows_fn fn;
    const void *args;
    long r0, r1;
    float *scratch;
} part;

static void *run_part(void *arg) {
    part *pt = (part *)arg;
    pt->fn(pt->args, pt->r0, pt->r1, pt->scratch);
    return NULL;
}

static int split_rows(rows_fn fn, const void *args, long n, size_t scratch, int threads) {
    enum { MAX_THREADS = 256 };
    part parts[MAX_THREADS];
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = (int)n;
    if (threads < 1) threads = 1;
    size_t bytes = (scratch * sizeof(float) + 63) / 64 * 64;
    char *memory = bytes ? aligned_alloc(64, bytes * (size_t)threads) : NULL;
    if (bytes && memory == NULL) return -1;
    for (int k = 0; k < threads; k++)
        parts[k] = (part){fn, args, n * k / threads, n * (k + 1) / threads,
                          bytes ? (float *)(memory + bytes * (size_t)k) : NULL};
#ifdef _OPENMP
    #pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int k = 0; k < threads; k++) run_part(&parts[k]);
#else
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int k = 1; k < threads; k++)
        if (!(started[k] = pthread_create(&ids[k], NULL, run_part, &parts[k]) == 0)) run_part(&parts[k]);
    run_part(&parts[0]);
    for (int k = 1; k < threads; k++)
        if (started[k]) pthread_join(ids[k], NULL);
#endif
    free(memory);
    return 0;
}

int leanloss_distill(void *a, const void *b, const float *a_y, const float *g, float *loss, long n,
                     long V, int kind, float beta, float soft, float hard_weight, int a_bf16,
                     int b_bf16, int threads) {
    static const rows_fn fns[2][2] = {{distill_rows_f32_f32, distill_rows_f32_bf16},
                                      {distill_rows_bf16_f32, distill_rows_bf16_bf16}};
    distill_args args = {a, b, a_y, g, loss, n, V, kind, beta, soft, hard_weight};
    /* two scratch rows a thread, each padded to a cache line */
    size_t row = ((size_t)V + 15) / 16 * 16;
    return split_rows(fns[a_bf16 != 0][b_bf16 != 0], &args, n, 2 * row, threads);
}

int leanloss_logp_sums(const void *z, const int64_t *t, long n, long V, float mul, float cap, int sums,
                       float *m, float *S, float *U, float *Q, float *Y, float *before, float *y_t,
                       int z_bf16, int threads) {
    logp_sums_args args = {z, t, V, mul, cap, compiled_sums(sums), m, S, U, Q, Y, before, y_t};
    return split_rows(z_bf16 ? logp_sums_bf16 : logp_sums_f32, &args, n, 0, threads);
}

int leanloss_logp_grad(void *z, long n, long V, float mul, float cap, float inv_cap, float out_scale, const float *lse, const float *A, const float *B, const float *G,
                       const float *K, int z_bf16, int threads) {
    static const rows_fn fns[2][2] = {{logp_grad_f32_0, logp_grad_f32_1}, {logp_grad_bf16_0, logp_grad_bf16_1}};
    logp_grad_args args = {z, V, mul, cap, inv_cap, out_scale, lse, A, B, G, K};
    return split_rows(fns[z_bf16 != 0][cap > 0.0f], &args, n, 0, threads);
}
