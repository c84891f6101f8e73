/* Decode-step kernels for the charlm engine, loaded with ctypes by charlm/native.py.
 *
 * Each output is computed by the same sequence of operations however many rows are in the call,
 * so a request's text never depends on who shares its step:
 *   - fp32 and bf16 weights: one fused multiply-add per input, in input order, from zero, and the
 *     addend (bias or table row) last, whether a row runs alone or in a block of four; bf16 weights
 *     are widened to fp32 exactly, so they give the fp32 kernel's bits for the rounded weights.
 *     (This is also the arithmetic of oneDNN's packed linear, bit for bit, on the machines we checked.)
 *   - int8 weights (per-output-row scales): each row's inputs are rounded to int8 with a scale of its
 *     own (scalar code, the same on every path), the dot products are exact 32-bit integer sums, so
 *     their order cannot matter, and one scalar epilogue turns them into floats.
 * Threads split output columns, never inputs. The AVX-512, AVX2 and portable code do the same
 * arithmetic (fmaf is exactly rounded, like the vector FMA; integer sums are exact), so they give
 * the same bits; `charlm_set_isa` forces one of them so that tests can compare them all.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_AVX2_CODE 1
#endif
#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 8)
#define HAVE_AVX512_CODE 1
#endif

#define PANEL 16 /* output columns per packed panel: weights are stored [panel][input][16] */
#define GROUP (4 * PANEL) /* output columns a thread takes at a time */
/* Multiply-adds (fp32's; an int8 one costs about a sixth) below which a second thread costs more
 * than it saves: waking a team costs tens of microseconds on the engine's worker thread, about what
 * a million fp32 multiply-adds take on one core. */
#define PARALLEL_MIN (1 << 20)
#define INT8_COST_DIVISOR 6
#define CELL_PARALLEL_MIN 4096 /* the same for cell units */
#define SAMPLE_PARALLEL_MIN 8  /* and for rows to sample */

/* ---------------------------------------------------------------- which code runs */

enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
/* What the CPU reports, as bits: what charlm_set_isa needs for each level. */
enum { HAS_AVX2 = 1, HAS_FMA = 2, HAS_AVX512F = 4, HAS_AVX512BW = 8, HAS_AVX512VNNI = 16 };
#define NEEDS_AVX2 (HAS_AVX2 | HAS_FMA)
#define NEEDS_AVX512 (NEEDS_AVX2 | HAS_AVX512F | HAS_AVX512BW | HAS_AVX512VNNI)

static int chosen_isa = -1; /* -1: not decided yet */

int charlm_cpu_features(void) {
  int bits = 0;
#ifdef HAVE_AVX2_CODE
  __builtin_cpu_init();
  bits |= __builtin_cpu_supports("avx2") ? HAS_AVX2 : 0;
  bits |= __builtin_cpu_supports("fma") ? HAS_FMA : 0;
#endif
#ifdef HAVE_AVX512_CODE
  bits |= __builtin_cpu_supports("avx512f") ? HAS_AVX512F : 0;
  bits |= __builtin_cpu_supports("avx512bw") ? HAS_AVX512BW : 0;
  bits |= __builtin_cpu_supports("avx512vnni") ? HAS_AVX512VNNI : 0;
#endif
  return bits;
}

/* The best level this build and CPU can run. */
static int best_isa(void) {
  int bits = charlm_cpu_features();
  if ((bits & NEEDS_AVX512) == NEEDS_AVX512) return ISA_AVX512;
  if ((bits & NEEDS_AVX2) == NEEDS_AVX2) return ISA_AVX2;
  return ISA_PORTABLE;
}

static int isa(void) {
  if (chosen_isa < 0) chosen_isa = best_isa();
  return chosen_isa;
}

/* Run `level` from now on (-1: the best there is). Returns the level now in use, or -1 (and
 * changes nothing) when the CPU or this build cannot run it. */
int charlm_set_isa(int level) {
  if (level < 0) return chosen_isa = best_isa();
  if (level > best_isa()) return -1;
  return chosen_isa = level;
}

int charlm_isa(void) { return isa(); }

/* ---------------------------------------------------------------- weights */

enum { FMT_FP32 = 0, FMT_BF16 = 1, FMT_INT8 = 2 };

/* A linear layer's weight packed by native.pack(), for y = x @ W.T + addend.
 * fp32 / bf16: ceil(outputs / 16) panels of inputs x 16 values.
 * int8: panels of (padded_inputs / 4) x 16 x 4 bytes (four consecutive inputs of one output
 * together, as VNNI's dot product takes them), `scale` per output row, `colsum` the sum of each
 * output's int8 weights (the inputs are stored as unsigned, offset by 128; see quantize_row). */
typedef struct {
  const void *panels;
  int format, outputs, inputs, padded_inputs;
  const float *scale;
  const int32_t *colsum;
} charlm_weights;

static inline float bf16_to_float(uint16_t b) {
  uint32_t bits = (uint32_t)b << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* ---------------------------------------------------------------- fp32 and bf16 products */

/* acc[0..16) = sum over inputs of x[i] * panel[i][0..16), one fma per input, in order. */
static void panel_portable(const float *x1, int k1, const float *x2, int k2, const void *w, int bf16,
                           float *acc) {
  const float *wf = w;
  const uint16_t *wb = w;
  for (int l = 0; l < PANEL; l++) acc[l] = 0.0f;
  for (int part = 0; part < 2; part++) {
    const float *x = part ? x2 : x1;
    int k = part ? k2 : k1;
    for (int i = 0; i < k; i++, wf += PANEL, wb += PANEL)
      for (int l = 0; l < PANEL; l++) acc[l] = fmaf(x[i], bf16 ? bf16_to_float(wb[l]) : wf[l], acc[l]);
  }
}

#ifdef HAVE_AVX2_CODE
#define T_AVX2 __attribute__((target("avx2,fma")))

/* Eight weights of a panel (from element `at`) as floats. */
T_AVX2 static inline __m256 load8(const void *w, size_t at, int bf16) {
  if (bf16) {
    __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + at));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
  }
  return _mm256_loadu_ps((const float *)w + at);
}

/* Four panels at once: eight independent accumulator chains keep both FMA units busy. */
T_AVX2 static void panels4_avx2(const float *x1, int k1, const float *x2, int k2, const void *w, size_t stride,
                                int bf16, float *acc) {
  __m256 a[8];
  for (int v = 0; v < 8; v++) a[v] = _mm256_setzero_ps();
  size_t at = 0;
  for (int part = 0; part < 2; part++) {
    const float *x = part ? x2 : x1;
    int k = part ? k2 : k1;
    for (int i = 0; i < k; i++, at += PANEL) {
      __m256 xb = _mm256_broadcast_ss(x + i);
      for (int p = 0; p < 4; p++) {
        a[2 * p] = _mm256_fmadd_ps(xb, load8(w, p * stride + at, bf16), a[2 * p]);
        a[2 * p + 1] = _mm256_fmadd_ps(xb, load8(w, p * stride + at + 8, bf16), a[2 * p + 1]);
      }
    }
  }
  for (int v = 0; v < 8; v++) _mm256_storeu_ps(acc + 8 * v, a[v]);
}

T_AVX2 static void panel_avx2(const float *x1, int k1, const float *x2, int k2, const void *w, int bf16,
                              float *acc) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  size_t at = 0;
  for (int part = 0; part < 2; part++) {
    const float *x = part ? x2 : x1;
    int k = part ? k2 : k1;
    for (int i = 0; i < k; i++, at += PANEL) {
      __m256 xb = _mm256_broadcast_ss(x + i);
      a0 = _mm256_fmadd_ps(xb, load8(w, at, bf16), a0);
      a1 = _mm256_fmadd_ps(xb, load8(w, at + 8, bf16), a1);
    }
  }
  _mm256_storeu_ps(acc, a0);
  _mm256_storeu_ps(acc + 8, a1);
}

/* Four rows at once on one panel: each weight loaded once serves four rows (eight chains). */
T_AVX2 static void rows4_avx2(const float *const x1[4], int k1, const float *const x2[4], int k2, const void *w,
                              int bf16, float *acc, int ldacc) {
  __m256 a[8];
  for (int v = 0; v < 8; v++) a[v] = _mm256_setzero_ps();
  size_t at = 0;
  for (int part = 0; part < 2; part++) {
    const float *const *x = part ? x2 : x1;
    int k = part ? k2 : k1;
    for (int i = 0; i < k; i++, at += PANEL) {
      __m256 lo = load8(w, at, bf16), hi = load8(w, at + 8, bf16);
      for (int q = 0; q < 4; q++) {
        __m256 xb = _mm256_broadcast_ss(x[q] + i);
        a[2 * q] = _mm256_fmadd_ps(xb, lo, a[2 * q]);
        a[2 * q + 1] = _mm256_fmadd_ps(xb, hi, a[2 * q + 1]);
      }
    }
  }
  for (int q = 0; q < 4; q++) {
    _mm256_storeu_ps(acc + q * ldacc, a[2 * q]);
    _mm256_storeu_ps(acc + q * ldacc + 8, a[2 * q + 1]);
  }
}
#endif

#ifdef HAVE_AVX512_CODE
#define T_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))

/* Sixteen weights (a panel's row) as floats. */
T_AVX512 static inline __m512 load16(const void *w, size_t at, int bf16) {
  if (bf16) {
    __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + at));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
  }
  return _mm512_loadu_ps((const float *)w + at);
}

/* `panels` (1..4) panels of one row, one 16-wide chain each. */
T_AVX512 static void panels_avx512(const float *x1, int k1, const float *x2, int k2, const void *w, size_t stride,
                                   int panels, int bf16, float *acc) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  size_t at = 0;
  for (int part = 0; part < 2; part++) {
    const float *x = part ? x2 : x1;
    int k = part ? k2 : k1;
    if (panels == 4)
      for (int i = 0; i < k; i++, at += PANEL) {
        __m512 xb = _mm512_set1_ps(x[i]);
        for (int p = 0; p < 4; p++) a[p] = _mm512_fmadd_ps(xb, load16(w, p * stride + at, bf16), a[p]);
      }
    else
      for (int i = 0; i < k; i++, at += PANEL) {
        __m512 xb = _mm512_set1_ps(x[i]);
        for (int p = 0; p < panels; p++) a[p] = _mm512_fmadd_ps(xb, load16(w, p * stride + at, bf16), a[p]);
      }
  }
  for (int p = 0; p < panels; p++) _mm512_storeu_ps(acc + p * PANEL, a[p]);
}

/* Four rows on two panels (eight chains): each weight loaded once serves four rows. */
T_AVX512 static void rows4_avx512(const float *const x1[4], int k1, const float *const x2[4], int k2,
                                  const void *w, size_t stride, int panels, int bf16, float *acc, int ldacc) {
  __m512 a[8];
  for (int v = 0; v < 8; v++) a[v] = _mm512_setzero_ps();
  size_t at = 0;
  for (int part = 0; part < 2; part++) {
    const float *const *x = part ? x2 : x1;
    int k = part ? k2 : k1;
    for (int i = 0; i < k; i++, at += PANEL) {
      __m512 w0 = load16(w, at, bf16), w1 = panels > 1 ? load16(w, stride + at, bf16) : w0;
      for (int q = 0; q < 4; q++) {
        __m512 xb = _mm512_set1_ps(x[q][i]);
        a[2 * q] = _mm512_fmadd_ps(xb, w0, a[2 * q]);
        a[2 * q + 1] = _mm512_fmadd_ps(xb, w1, a[2 * q + 1]);
      }
    }
  }
  for (int q = 0; q < 4; q++) {
    _mm512_storeu_ps(acc + q * ldacc, a[2 * q]);
    if (panels > 1) _mm512_storeu_ps(acc + q * ldacc + PANEL, a[2 * q + 1]);
  }
}
#endif

/* Rows [r, r + block) of group [j0, j1) of a fp32 or bf16 product into acc (block rows of GROUP);
 * returns block, the rows done (1 to 4). */
static int float_block(int rows, int r, const float *x1, int ldx1, int k1, const float *x2, int ldx2, int k2,
                       const charlm_weights *wt, int j0, int j1, float *acc) {
  int bf16 = wt->format == FMT_BF16, esize = bf16 ? 2 : 4;
  size_t stride = (size_t)wt->inputs * PANEL;
  const char *w = (const char *)wt->panels + (size_t)(j0 / PANEL) * stride * esize;
  const float *a = x1 + (size_t)r * ldx1, *b = x2 ? x2 + (size_t)r * ldx2 : NULL;
  int panels = (j1 - j0 + PANEL - 1) / PANEL, level = isa();
  if (level >= ISA_AVX2 && r + 1 < rows) { /* 2 or 3 rows left: the last one is repeated and dropped */
    const float *as[4], *bs[4];
    int block = rows - r < 4 ? rows - r : 4;
    for (int q = 0; q < 4; q++) {
      int row = q < block ? q : block - 1;
      as[q] = a + (size_t)row * ldx1;
      bs[q] = b ? b + (size_t)row * ldx2 : NULL;
    }
#ifdef HAVE_AVX512_CODE
    if (level >= ISA_AVX512) {
      for (int p = 0; p < panels; p += 2)
        rows4_avx512(as, k1, bs, k2, w + p * stride * esize, stride, panels - p < 2 ? 1 : 2, bf16, acc + p * PANEL,
                     GROUP);
      return block;
    }
#endif
#ifdef HAVE_AVX2_CODE
    for (int p = 0; p < panels; p++) rows4_avx2(as, k1, bs, k2, w + p * stride * esize, bf16, acc + p * PANEL, GROUP);
#endif
    return block;
  }
#ifdef HAVE_AVX512_CODE
  if (level >= ISA_AVX512) {
    panels_avx512(a, k1, b, k2, w, stride, panels, bf16, acc);
    return 1;
  }
#endif
#ifdef HAVE_AVX2_CODE
  if (level >= ISA_AVX2 && panels == 4) {
    panels4_avx2(a, k1, b, k2, w, stride, bf16, acc);
    return 1;
  }
  if (level >= ISA_AVX2) {
    for (int p = 0; p < panels; p++) panel_avx2(a, k1, b, k2, w + p * stride * esize, bf16, acc + p * PANEL);
    return 1;
  }
#endif
  for (int p = 0; p < panels; p++) panel_portable(a, k1, b, k2, w + p * stride * esize, bf16, acc + p * PANEL);
  return 1;
}

/* ---------------------------------------------------------------- int8 products */

/* Row r's inputs [x1, x2] as bytes q + 128, where q = round(x * 127 / max|x|) in [-127, 127], and
 * the scale max|x| / 127 that turns q back into x; padding inputs get q = 0. Scalar on every path,
 * so every path multiplies the same integers. A row of zeros gets scale 0; a NaN or infinity makes
 * the scale NaN, so the row's outputs are NaN rather than quietly finite. */
static void quantize_row(const float *x1, int k1, const float *x2, int k2, int padded, uint8_t *q, float *scale) {
  float most = 0.0f;
  for (int i = 0; i < k1; i++) most = fmaxf(most, fabsf(x1[i]));
  for (int i = 0; i < k2; i++) most = fmaxf(most, fabsf(x2[i]));
  int finite = 1;
  for (int i = 0; i < k1; i++) finite &= isfinite(x1[i]);
  for (int i = 0; i < k2; i++) finite &= isfinite(x2[i]);
  float inv = most > 0.0f && finite ? 127.0f / most : 0.0f;
  *scale = finite ? most / 127.0f : NAN;
  for (int i = 0; i < k1 + k2; i++) {
    long v = lrintf((i < k1 ? x1[i] : x2[i - k1]) * inv);
    q[i] = (uint8_t)(128 + (v > 127 ? 127 : v < -127 ? -127 : v));
  }
  for (int i = k1 + k2; i < padded; i++) q[i] = 128;
}

/* acc[0..16) = sum over inputs of q[i] * w[i] for one panel (q unsigned, w signed): exact. */
static void int8_panel_portable(const uint8_t *q, int groups, const int8_t *w, int32_t *acc) {
  for (int l = 0; l < PANEL; l++) acc[l] = 0;
  for (int g = 0; g < groups; g++, w += 4 * PANEL)
    for (int l = 0; l < PANEL; l++)
      for (int t = 0; t < 4; t++) acc[l] += (int32_t)q[4 * g + t] * w[4 * l + t];
}

#ifdef HAVE_AVX2_CODE
/* The same with 16-bit products summed in pairs (vpmaddwd: 255 * 127 * 2 fits, nothing saturates),
 * two rows at a time so a widened weight serves both. */
T_AVX2 static void int8_rows2_avx2(const uint8_t *const q[2], int groups, const int8_t *w, int32_t *acc,
                                   int ldacc) {
  __m256i a[8];
  for (int v = 0; v < 8; v++) a[v] = _mm256_setzero_si256();
  for (int g = 0; g < groups; g++, w += 4 * PANEL) {
    __m256i wv[4];
    for (int p = 0; p < 4; p++) wv[p] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16 * p)));
    for (int s = 0; s < 2; s++) {
      int32_t four;
      memcpy(&four, q[s] + 4 * g, 4);
      __m256i xs = _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(four)));
      for (int p = 0; p < 4; p++) a[4 * s + p] = _mm256_add_epi32(a[4 * s + p], _mm256_madd_epi16(xs, wv[p]));
    }
  }
  for (int s = 0; s < 2; s++) /* lanes hold each output's two half sums: add them */
    for (int p = 0; p < 4; p++) {
      int32_t lanes[8];
      _mm256_storeu_si256((__m256i *)lanes, a[4 * s + p]);
      for (int l = 0; l < 4; l++) acc[s * ldacc + 4 * p + l] = lanes[2 * l] + lanes[2 * l + 1];
    }
}
#endif

#ifdef HAVE_AVX512_CODE
/* VNNI: vpdpbusd adds four u8 x s8 products to each 32-bit lane; four rows on two panels. */
T_AVX512 static void int8_rows4_vnni(const uint8_t *const q[4], int groups, const int8_t *w, size_t stride,
                                     int panels, int32_t *acc, int ldacc) {
  __m512i a[8];
  for (int v = 0; v < 8; v++) a[v] = _mm512_setzero_si512();
  for (int g = 0; g < groups; g++, w += 4 * PANEL) {
    __m512i w0 = _mm512_loadu_si512(w), w1 = panels > 1 ? _mm512_loadu_si512(w + stride) : w0;
    for (int s = 0; s < 4; s++) {
      int32_t four;
      memcpy(&four, q[s] + 4 * g, 4);
      __m512i xb = _mm512_set1_epi32(four);
      a[2 * s] = _mm512_dpbusd_epi32(a[2 * s], xb, w0);
      a[2 * s + 1] = _mm512_dpbusd_epi32(a[2 * s + 1], xb, w1);
    }
  }
  for (int s = 0; s < 4; s++) {
    _mm512_storeu_si512(acc + s * ldacc, a[2 * s]);
    if (panels > 1) _mm512_storeu_si512(acc + s * ldacc + PANEL, a[2 * s + 1]);
  }
}

/* One row on up to four panels, one chain each. */
T_AVX512 static void int8_panels_vnni(const uint8_t *q, int groups, const int8_t *w, size_t stride, int panels,
                                      int32_t *acc) {
  __m512i a[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
  for (int g = 0; g < groups; g++, w += 4 * PANEL) {
    int32_t four;
    memcpy(&four, q + 4 * g, 4);
    __m512i xb = _mm512_set1_epi32(four);
    for (int p = 0; p < panels; p++) a[p] = _mm512_dpbusd_epi32(a[p], xb, _mm512_loadu_si512(w + p * stride));
  }
  for (int p = 0; p < panels; p++) _mm512_storeu_si512(acc + p * PANEL, a[p]);
}
#endif

/* Rows [r, r + block) of group [j0, j1) of an int8 product: integer sums into iacc (block rows of
 * GROUP); returns block. `quant` holds each row's quantized inputs (padded_inputs bytes a row). */
static int int8_block(int rows, int r, const uint8_t *quant, const charlm_weights *wt, int j0, int j1,
                      int32_t *iacc) {
  int groups = wt->padded_inputs / 4, panels = (j1 - j0 + PANEL - 1) / PANEL, level = isa();
  size_t stride = (size_t)wt->padded_inputs * PANEL;
  const int8_t *w = (const int8_t *)wt->panels + (size_t)(j0 / PANEL) * stride;
  const uint8_t *q = quant + (size_t)r * wt->padded_inputs;
#ifdef HAVE_AVX512_CODE
  if (level >= ISA_AVX512 && r + 1 < rows) {
    const uint8_t *qs[4];
    int block = rows - r < 4 ? rows - r : 4;
    for (int s = 0; s < 4; s++) qs[s] = q + (size_t)(s < block ? s : block - 1) * wt->padded_inputs;
    for (int p = 0; p < panels; p += 2)
      int8_rows4_vnni(qs, groups, w + p * stride, stride, panels - p < 2 ? 1 : 2, iacc + p * PANEL, GROUP);
    return block;
  }
  if (level >= ISA_AVX512) {
    int8_panels_vnni(q, groups, w, stride, panels, iacc);
    return 1;
  }
#endif
#ifdef HAVE_AVX2_CODE
  if (level >= ISA_AVX2) {
    const uint8_t *qs[2] = {q, r + 1 < rows ? q + wt->padded_inputs : q};
    for (int p = 0; p < panels; p++) int8_rows2_avx2(qs, groups, w + p * stride, iacc + p * PANEL, GROUP);
    return r + 1 < rows ? 2 : 1;
  }
#endif
  for (int p = 0; p < panels; p++) int8_panel_portable(q, groups, w + p * stride, iacc + p * PANEL);
  return 1;
}

/* ---------------------------------------------------------------- the product */

/* y[r][j] = sum_i [x1[r], x2[r]][i] * W[j][i] + addend[j], for j < n = wt->outputs.
 *
 * Row r's addend is addend + add_rows[r] * n when add_rows is given (an embedding-table row), else
 * the same vector for every row (a bias); no addend when it is NULL. x2 may be NULL when k2 is 0.
 * `scratch` (int8 weights only) holds rows * (padded_inputs + 4) bytes. `threads` (>= 1) caps the
 * threads; they never change the result.
 */
void charlm_linear(int rows, const float *x1, int ldx1, int k1, const float *x2, int ldx2, int k2,
                   const charlm_weights *wt, const float *addend, const int64_t *add_rows, float *y, int ldy,
                   uint8_t *scratch, int threads) {
  int n = wt->outputs, groups = (n + GROUP - 1) / GROUP, int8 = wt->format == FMT_INT8;
  float *xscale = (float *)scratch;
  uint8_t *quant = int8 ? scratch + sizeof(float) * (size_t)rows : NULL;
  if (int8)
    for (int r = 0; r < rows; r++)
      quantize_row(x1 + (size_t)r * ldx1, k1, x2 ? x2 + (size_t)r * ldx2 : NULL, k2, wt->padded_inputs,
                   quant + (size_t)r * wt->padded_inputs, xscale + r);
  size_t work = (size_t)rows * n * (k1 + k2) / (int8 ? INT8_COST_DIVISOR : 1);
  /* Threads split the output columns, never the inputs: each output keeps its one chain. A
   * group's panels stay in cache while every row block passes over them. */
#pragma omp parallel for schedule(static) num_threads(threads) if (work >= PARALLEL_MIN)
  for (int grp = 0; grp < groups; grp++) {
    float acc[4 * GROUP];
    int32_t iacc[4 * GROUP];
    int j0 = grp * GROUP, j1 = j0 + GROUP < n ? j0 + GROUP : n;
    for (int r = 0; r < rows;) {
      int block = int8 ? int8_block(rows, r, quant, wt, j0, j1, iacc)
                       : float_block(rows, r, x1, ldx1, k1, x2, ldx2, k2, wt, j0, j1, acc);
      for (int s = 0; s < block; s++, r++) {
        const float *add = addend ? addend + (add_rows ? (size_t)add_rows[r] * n : 0) : NULL;
        float *out = y + (size_t)r * ldy;
        for (int j = j0; j < j1; j++) {
          float v = acc[s * GROUP + j - j0];
          if (int8) /* the offset of 128 on every input comes off exactly, in integers */
            v = (float)(iacc[s * GROUP + j - j0] - 128 * wt->colsum[j]) * (xscale[r] * wt->scale[j]);
          out[j] = add ? v + add[j] : v;
        }
      }
    }
  }
}

/* ---------------------------------------------------------------- the LSTM cell */

/* exp(x) the Cephes way: x = m ln2 + r, |r| <= ln2 / 2, e^r by a degree-7 polynomial, times 2^m.
 * Written once for 8 lanes and once for one, with the same operations (relative error ~1e-7). */
#define EXP_HI 88.3762626647949f
#define EXP_LO -87.3365447504f
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f
static const float EXP_P[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

static float exp_portable(float x) {
  x = fminf(fmaxf(x, EXP_LO), EXP_HI);
  float m = floorf(fmaf(x, LOG2E, 0.5f));
  float r = fmaf(m, -LN2_HI, x);
  r = fmaf(m, -LN2_LO, r);
  float p = EXP_P[0];
  for (int i = 1; i < 6; i++) p = fmaf(p, r, EXP_P[i]);
  float y = fmaf(p, r * r, r) + 1.0f;
  int32_t bits;
  memcpy(&bits, &y, 4);
  bits += (int32_t)m * (1 << 23);
  memcpy(&y, &bits, 4);
  return y;
}

static float sigmoid_portable(float x) { return 1.0f / (1.0f + exp_portable(-x)); }
static float tanh_portable(float x) { return 2.0f / (1.0f + exp_portable(-2.0f * x)) - 1.0f; }

#ifdef HAVE_AVX2_CODE
T_AVX2 static __m256 exp_avx2(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_LO)), _mm256_set1_ps(EXP_HI));
  __m256 m = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fmadd_ps(m, _mm256_set1_ps(-LN2_HI), x);
  r = _mm256_fmadd_ps(m, _mm256_set1_ps(-LN2_LO), r);
  __m256 p = _mm256_set1_ps(EXP_P[0]);
  for (int i = 1; i < 6; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P[i]));
  __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(m), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(y), e));
}

T_AVX2 static __m256 sigmoid_avx2(__m256 x) {
  __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

T_AVX2 static __m256 tanh_avx2(__m256 x) {
  __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
  __m256 e = exp_avx2(_mm256_mul_ps(_mm256_set1_ps(-2.0f), x));
  return _mm256_sub_ps(_mm256_div_ps(two, _mm256_add_ps(one, e)), one);
}

/* One row, columns [0, n8) in steps of 8; the caller finishes the rest with the portable code. */
T_AVX2 static int cell_avx2(const float *g, float *c, float *h, int hidden) {
  int j = 0;
  for (; j + 8 <= hidden; j += 8) {
    __m256 i = sigmoid_avx2(_mm256_loadu_ps(g + j));
    __m256 f = sigmoid_avx2(_mm256_loadu_ps(g + hidden + j));
    __m256 o = sigmoid_avx2(_mm256_loadu_ps(g + 2 * hidden + j));
    __m256 z = tanh_avx2(_mm256_loadu_ps(g + 3 * hidden + j));
    __m256 cn = _mm256_fmadd_ps(i, z, _mm256_mul_ps(f, _mm256_loadu_ps(c + j)));
    _mm256_storeu_ps(c + j, cn);
    _mm256_storeu_ps(h + j, _mm256_mul_ps(o, tanh_avx2(cn)));
  }
  return j;
}
#endif

/* The LSTM cell on gate pre-activations in the order (input, forget, output, cell):
 * c = f * c + i * tanh(g), h = o * tanh(c), row by row; row r's gates start at gates + r * ldg,
 * its c and h at c + r * ldch and h + r * ldch. Rows are independent: threads split them. */
void charlm_lstm_cell(int rows, const float *gates, int ldg, float *c, float *h, int ldch, int hidden, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * hidden >= CELL_PARALLEL_MIN)
  for (int r = 0; r < rows; r++) {
    const float *g = gates + (size_t)r * ldg;
    float *cr = c + (size_t)r * ldch, *hr = h + (size_t)r * ldch;
    int j = 0;
#ifdef HAVE_AVX2_CODE
    if (isa() >= ISA_AVX2) j = cell_avx2(g, cr, hr, hidden);
#endif
    for (; j < hidden; j++) {
      float i = sigmoid_portable(g[j]), f = sigmoid_portable(g[hidden + j]);
      float o = sigmoid_portable(g[2 * hidden + j]), z = tanh_portable(g[3 * hidden + j]);
      cr[j] = fmaf(i, z, f * cr[j]);
      hr[j] = o * tanh_portable(cr[j]);
    }
  }
}

/* ---------------------------------------------------------------- sampling */

/* A key whose ascending order is descending z, then ascending id: the order a stable descending
 * sort gives. (-0 and +0 compare equal, as they do for the sort.) */
static uint64_t sort_key(float z, int id) {
  uint32_t bits;
  z += 0.0f;  /* -0 becomes +0 */
  memcpy(&bits, &z, 4);
  bits = bits & 0x80000000u ? ~bits : bits | 0x80000000u; /* ascending in z */
  return (uint64_t)~bits << 32 | (uint32_t)id;
}

/* Sort keys[0..n) ascending; tmp holds n more. Bottom-up merge sort: no comparator calls. */
static void sort_keys(uint64_t *keys, uint64_t *tmp, int n) {
  for (int width = 1; width < n; width *= 2) {
    for (int lo = 0; lo < n; lo += 2 * width) {
      int mid = lo + width < n ? lo + width : n, hi = lo + 2 * width < n ? lo + 2 * width : n;
      int i = lo, j = mid, k = lo;
      while (i < mid && j < hi) tmp[k++] = keys[i] <= keys[j] ? keys[i++] : keys[j++];
      while (i < mid) tmp[k++] = keys[i++];
      while (j < hi) tmp[k++] = keys[j++];
    }
    memcpy(keys, tmp, sizeof *keys * n);
  }
}

/* Greedy decoding (top_k 1): the id that sorts first, the largest z with ties to the lowest id, found
 * in one pass instead of a sort. It compares the same keys as the sort, so it is the same id. */
static int64_t argmax_one(const float *logits, int vocab, float scale) {
  uint64_t best = sort_key(logits[0] * scale, 0);
  for (int v = 1; v < vocab; v++) {
    uint64_t key = sort_key(logits[v] * scale, v);
    if (key < best) best = key;
  }
  return (uint32_t)best;
}

/* One id from logits (vocab floats), as charlm.sampling.sample_rows draws it: z = logits * scale
 * (in float), softmax in double over z sorted high to low, keep the top_k most likely whose
 * preceding mass is below top_p and whose probability is at least min_p times the top one, and take the first whose cumulative mass exceeds u times the kept
 * total. top_k >= vocab and top_p > 1 turn those filters off; top_k 1 is greedy (u is not used).
 * `work` holds 4 * vocab doubles. */
static int64_t sample_one(const float *logits, int vocab, float scale, int top_k, double top_p, double min_p,
                          double u, double *work) {
  if (top_k == 1) return argmax_one(logits, vocab, scale);
  uint64_t *keys = (uint64_t *)work, *tmp = keys + vocab;
  double *probs = work + 2 * vocab, *cdf = work + 3 * vocab;
  for (int v = 0; v < vocab; v++) keys[v] = sort_key(logits[v] * scale, v);
  sort_keys(keys, tmp, vocab);
  double top = (double)(logits[(uint32_t)keys[0]] * scale), total = 0.0;
  for (int v = 0; v < vocab; v++) total += probs[v] = exp((double)(logits[(uint32_t)keys[v]] * scale) - top);
  double running = 0.0;
  for (int v = 0; v < vocab; v++) {
    probs[v] /= total;
    cdf[v] = running += probs[v];
  }
  if (top_k < vocab || top_p <= 1.0 || min_p > 0.0) {
    running = 0.0;
    for (int v = 0; v < vocab; v++) {
      int keep = v < top_k && cdf[v] - probs[v] < top_p && probs[v] >= min_p * probs[0];
      cdf[v] = running += keep ? probs[v] : 0.0;
    }
  }
  double target = u * cdf[vocab - 1];
  int choice = 0;
  while (choice < vocab - 1 && cdf[choice] <= target) choice++;
  return (uint32_t)keys[choice];
}

/* Row r of logits (rows x vocab) gets id out[r], drawn with its own settings and uniform u[r].
 * Rows are independent: threads split them. Returns 0, or -1 when scratch memory could not be had. */
int charlm_sample(int rows, const float *logits, int vocab, const float *scale, const int32_t *top_k,
                  const double *top_p, const double *min_p, const double *u, int64_t *out, int threads) {
  int failed = 0;
#pragma omp parallel num_threads(threads) if (rows >= SAMPLE_PARALLEL_MIN)
  {
    double *work = malloc(sizeof(double) * 4 * vocab);
    if (!work) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int r = 0; r < rows; r++)
      if (work) out[r] = sample_one(logits + (size_t)r * vocab, vocab, scale[r], top_k[r], top_p[r], min_p[r], u[r],
                                  work);
    free(work);
  }
  return failed ? -1 : 0;
}
