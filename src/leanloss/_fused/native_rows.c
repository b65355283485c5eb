/* Native CPU forms of row kernels: the distillation divergence of one block, forward and gradient.

   The math is stated once, in leanloss/_fused/distill_rows.py (distill_block); this file is a
   hand-compiled form of it for float32 and bfloat16 blocks on CPU, and the tests hold it to that
   function's values. Built at run time by leanloss/_fused/native.py with the system C compiler
   and called through ctypes (which releases the interpreter lock).

   Per row, four passes over data that stays in the core's cache (a row of 32000 classes is
   125 KiB of float32 scratch per operand):
     1. the row maxima of a (student) and b (teacher);
     2. e_a = exp(a - max a) and e_b = exp(b - max b) into scratch, and their sums S_a, S_b:
        lse = max + log S;
     3. q = e_a / S_a, p = e_b / S_b (no second exponential), the divergence's row sums; for the
        JSD the term s = lambda - log q overwrites e_b (the gradient needs q and s only);
     4. with an upstream gradient g, the gradient written over a, rounded to a's dtype.
   Two exponentials and (JSD) one logarithm per element. The loops are vectorized with glibc's
   vector math (libmvec) where the compiler finds it. */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
/* libmvec's vector variants, declared as glibc's own headers do under -ffast-math. */
__attribute__((__simd__("notinbranch"))) extern float expf(float);
__attribute__((__simd__("notinbranch"))) extern float logf(float);
#endif

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

#define DISTILL_ROWS(TA, TB)                                                                         \
static void distill_rows_##TA##_##TB(const distill_args *s, long r0, long r1, float *ea, float *eb) { \
    const long V = s->V;                                                                              \
    const float beta = s->beta, r = beta / (1.0f - beta), soft = s->soft, hw = s->hard_weight;        \
    for (long i = r0; i < r1; i++) {                                                                  \
        CTYPE_##TA *x = (CTYPE_##TA *)s->a + i * V;                                                   \
        const CTYPE_##TB *y = (const CTYPE_##TB *)s->b + i * V;                                       \
        float ma = -INFINITY, mb = -INFINITY;                                                         \
        _Pragma("omp simd reduction(max:ma,mb)")                                                     \
        for (long j = 0; j < V; j++) { ma = MAX(ma, LOAD_##TA(x, j)); mb = MAX(mb, LOAD_##TB(y, j)); } \
        float sa = 0.0f, sb = 0.0f;                                                                   \
        for (long j0 = 0; j0 < V; j0 += CHUNK) {                                                      \
            const long j1 = j0 + CHUNK < V ? j0 + CHUNK : V;                                          \
            float ca = 0.0f, cb = 0.0f;                                                               \
            _Pragma("omp simd reduction(+:ca,cb)")                                                   \
            for (long j = j0; j < j1; j++) {                                                          \
                float e1 = expf(LOAD_##TA(x, j) - ma), e2 = expf(LOAD_##TB(y, j) - mb);               \
                ea[j] = e1; eb[j] = e2; ca += e1; cb += e2;                                           \
            }                                                                                         \
            sa += ca; sb += cb;                                                                       \
        }                                                                                             \
        const float la = ma + logf(sa), lb = mb + logf(sb), ia = 1.0f / sa, ib = 1.0f / sb;            \
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
                    float lam = logf(FLOOR_TINY(q + p * r)), st = lam - lq;                           \
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

typedef void (*rows_fn)(const distill_args *, long, long, float *, float *);

typedef struct {
    const distill_args *args;
    rows_fn fn;
    long r0, r1;
    float *ea, *eb;
} part;

static void *run_part(void *arg) {
    part *pt = (part *)arg;
    pt->fn(pt->args, pt->r0, pt->r1, pt->ea, pt->eb);
    return NULL;
}

/* Rows split evenly over `threads` threads (the caller's included). Returns 0, or -1, having
   written nothing, when the scratch memory could not be had (the caller then runs the torch form). */
int leanloss_distill(void *a, const void *b, const float *a_y, const float *g, float *loss, long n,
                     long V, int kind, float beta, float soft, float hard_weight, int a_bf16,
                     int b_bf16, int threads) {
    static const rows_fn fns[2][2] = {{distill_rows_f32_f32, distill_rows_f32_bf16},
                                      {distill_rows_bf16_f32, distill_rows_bf16_bf16}};
    enum { MAX_THREADS = 256 };
    distill_args args = {a, b, a_y, g, loss, n, V, kind, beta, soft, hard_weight};
    part parts[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = (int)n;
    if (threads < 1) threads = 1;
    size_t row = ((size_t)V * sizeof(float) + 63) / 64 * 64; /* one operand's scratch row */
    float *scratch = aligned_alloc(64, row * 2 * (size_t)threads);
    if (scratch == NULL) return -1;
    for (int k = 0; k < threads; k++) {
        float *ea = (float *)((char *)scratch + row * 2 * (size_t)k);
        parts[k] = (part){&args, fns[a_bf16 != 0][b_bf16 != 0], n * k / threads, n * (k + 1) / threads,
                          ea, (float *)((char *)ea + row)};
        started[k] = k > 0 && pthread_create(&ids[k], NULL, run_part, &parts[k]) == 0;
        if (k > 0 && !started[k]) run_part(&parts[k]);
    }
    run_part(&parts[0]);
    for (int k = 1; k < threads; k++)
        if (started[k]) pthread_join(ids[k], NULL);
    free(scratch);
    return 0;
}
