/* Decode-step kernels for the charlm engine, loaded with ctypes by charlm/native.py.
 *
 * Each output is computed by the same sequence of float operations however many rows are in
 * the call, so a request's text never depends on who shares its step: a product accumulates one
 * fused multiply-add per input, in input order, from zero, and adds the bias last, whether its
 * row runs alone or in a block of four; threads split output columns, never inputs. (This is also
 * the arithmetic of oneDNN's packed linear, bit for bit, on the machines we checked.)
 *
 * The AVX2 and the portable code do the same operations (fmaf is exactly rounded, like the
 * vector FMA), so they give the same bits too; the portable code is just slower.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_AVX2_CODE 1
#endif

#define PANEL 16 /* output columns per packed panel: weights are stored [panel][input][16] */
#define GROUP (4 * PANEL) /* output columns a thread takes at a time */
#define PARALLEL_MIN (1 << 18) /* multiply-adds below which a second thread costs more than it saves */
#define CELL_PARALLEL_MIN 4096 /* the same for cell units */
#define SAMPLE_PARALLEL_MIN 8  /* and for rows to sample */

static int use_avx2 = -1; /* -1: not decided yet */

static int avx2(void) {
  if (use_avx2 < 0) {
#ifdef HAVE_AVX2_CODE
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    use_avx2 = 0;
#endif
  }
  return use_avx2;
}

/* Let tests run the portable code on a machine that has AVX2. */
void charlm_force_portable(int portable) { use_avx2 = portable ? 0 : -1; }
int charlm_uses_avx2(void) { return avx2(); }

/* ---------------------------------------------------------------- products */

/* acc[0..16) = sum over inputs of x[i] * panel[i][0..16), one fma per input, in order. */
static void panel_portable(const float *x1, int k1, const float *x2, int k2, const float *w, float *acc) {
  for (int l = 0; l < PANEL; l++) acc[l] = 0.0f;
  for (int i = 0; i < k1; i++, w += PANEL)
    for (int l = 0; l < PANEL; l++) acc[l] = fmaf(x1[i], w[l], acc[l]);
  for (int i = 0; i < k2; i++, w += PANEL)
    for (int l = 0; l < PANEL; l++) acc[l] = fmaf(x2[i], w[l], acc[l]);
}

#ifdef HAVE_AVX2_CODE
/* Four panels at once: eight independent accumulator chains keep both FMA units busy. */
__attribute__((target("avx2,fma"))) static void panels4_avx2(const float *x1, int k1, const float *x2, int k2,
                                                             const float *w, size_t stride, float *acc) {
  __m256 a[8];
  for (int v = 0; v < 8; v++) a[v] = _mm256_setzero_ps();
  const float *w0 = w, *w1 = w + stride, *w2 = w + 2 * stride, *w3 = w + 3 * stride;
  for (int part = 0; part < 2; part++) {
    const float *x = part ? x2 : x1;
    int k = part ? k2 : k1;
    for (int i = 0; i < k; i++, w0 += PANEL, w1 += PANEL, w2 += PANEL, w3 += PANEL) {
      __m256 xb = _mm256_broadcast_ss(x + i);
      a[0] = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w0), a[0]);
      a[1] = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w0 + 8), a[1]);
      a[2] = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w1), a[2]);
      a[3] = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w1 + 8), a[3]);
      a[4] = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w2), a[4]);
      a[5] = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w2 + 8), a[5]);
      a[6] = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w3), a[6]);
      a[7] = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w3 + 8), a[7]);
    }
  }
  for (int v = 0; v < 8; v++) _mm256_storeu_ps(acc + 8 * v, a[v]);
}

__attribute__((target("avx2,fma"))) static void panel_avx2(const float *x1, int k1, const float *x2, int k2,
                                                           const float *w, float *acc) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (int i = 0; i < k1; i++, w += PANEL) {
    __m256 xb = _mm256_broadcast_ss(x1 + i);
    a0 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w), a0);
    a1 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w + 8), a1);
  }
  for (int i = 0; i < k2; i++, w += PANEL) {
    __m256 xb = _mm256_broadcast_ss(x2 + i);
    a0 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w), a0);
    a1 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w + 8), a1);
  }
  _mm256_storeu_ps(acc, a0);
  _mm256_storeu_ps(acc + 8, a1);
}

/* Four rows at once on one panel: each weight loaded once serves four rows (eight chains). */
__attribute__((target("avx2,fma"))) static void rows4_avx2(const float *const x1[4], int k1, const float *const x2[4],
                                                           int k2, const float *w, float *acc, int ldacc) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int part = 0; part < 2; part++) {
    const float *const *x = part ? x2 : x1;
    const float *p0 = x[0], *p1 = x[1], *p2 = x[2], *p3 = x[3];
    int k = part ? k2 : k1;
    for (int i = 0; i < k; i++, w += PANEL) {
      __m256 lo = _mm256_loadu_ps(w), hi = _mm256_loadu_ps(w + 8), xb;
      xb = _mm256_broadcast_ss(p0 + i);
      a0 = _mm256_fmadd_ps(xb, lo, a0);
      a1 = _mm256_fmadd_ps(xb, hi, a1);
      xb = _mm256_broadcast_ss(p1 + i);
      a2 = _mm256_fmadd_ps(xb, lo, a2);
      a3 = _mm256_fmadd_ps(xb, hi, a3);
      xb = _mm256_broadcast_ss(p2 + i);
      a4 = _mm256_fmadd_ps(xb, lo, a4);
      a5 = _mm256_fmadd_ps(xb, hi, a5);
      xb = _mm256_broadcast_ss(p3 + i);
      a6 = _mm256_fmadd_ps(xb, lo, a6);
      a7 = _mm256_fmadd_ps(xb, hi, a7);
    }
  }
  _mm256_storeu_ps(acc, a0);
  _mm256_storeu_ps(acc + 8, a1);
  _mm256_storeu_ps(acc + ldacc, a2);
  _mm256_storeu_ps(acc + ldacc + 8, a3);
  _mm256_storeu_ps(acc + 2 * ldacc, a4);
  _mm256_storeu_ps(acc + 2 * ldacc + 8, a5);
  _mm256_storeu_ps(acc + 3 * ldacc, a6);
  _mm256_storeu_ps(acc + 3 * ldacc + 8, a7);
}
#endif

/* y[r][j] = sum_i [x1[r], x2[r]][i] * W[j][i] + addend[j], for j < n.
 *
 * `panels` is W packed by native.pack(): ceil(n / 16) panels of (k1 + k2) x 16 floats. Row r's
 * addend is addend + add_rows[r] * n when add_rows is given (an embedding-table row), else the
 * same vector for every row (a bias); no addend when it is NULL. x2 may be NULL when k2 is 0.
 * `threads` (>= 1) caps the threads; they never change the result.
 */
void charlm_linear(int rows, const float *x1, int ldx1, int k1, const float *x2, int ldx2, int k2,
                   const float *panels, int n, const float *addend, const int64_t *add_rows, float *y, int ldy,
                   int threads) {
  int groups = (n + GROUP - 1) / GROUP;
  size_t stride = (size_t)(k1 + k2) * PANEL;
  /* Threads split the output columns, never the inputs: each output keeps its one chain. A
   * group's panels stay in cache while every row block passes over them. */
#pragma omp parallel for schedule(static) num_threads(threads) if ((size_t)rows * n * (k1 + k2) >= PARALLEL_MIN)
  for (int grp = 0; grp < groups; grp++) {
    float acc[4 * GROUP];
    int j0 = grp * GROUP, j1 = j0 + GROUP < n ? j0 + GROUP : n;
    const float *w = panels + (size_t)(j0 / PANEL) * stride;
    for (int r = 0; r < rows;) {
      int block = 1;
      const float *a = x1 + (size_t)r * ldx1, *b = x2 ? x2 + (size_t)r * ldx2 : NULL;
#ifdef HAVE_AVX2_CODE
      if (avx2() && r + 1 < rows) { /* 2 or 3 rows left: the last one is repeated and dropped */
        const float *as[4], *bs[4];
        block = rows - r < 4 ? rows - r : 4;
        for (int q = 0; q < 4; q++) {
          int row = q < block ? q : block - 1;
          as[q] = a + (size_t)row * ldx1;
          bs[q] = b ? b + (size_t)row * ldx2 : NULL;
        }
        for (int j = j0; j < j1; j += PANEL)
          rows4_avx2(as, k1, bs, k2, w + (j - j0) / PANEL * stride, acc + j - j0, GROUP);
      } else if (avx2() && j1 - j0 > 3 * PANEL) {
        panels4_avx2(a, k1, b, k2, w, stride, acc);
      } else if (avx2()) {
        for (int j = j0; j < j1; j += PANEL) panel_avx2(a, k1, b, k2, w + (j - j0) / PANEL * stride, acc + j - j0);
      } else
#endif
        for (int j = j0; j < j1; j += PANEL) panel_portable(a, k1, b, k2, w + (j - j0) / PANEL * stride, acc + j - j0);
      for (int q = 0; q < block; q++, r++) {
        const float *add = addend ? addend + (add_rows ? (size_t)add_rows[r] * n : 0) : NULL;
        float *out = y + (size_t)r * ldy;
        for (int j = j0; j < j1; j++) out[j] = add ? acc[q * GROUP + j - j0] + add[j] : acc[q * GROUP + j - j0];
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
__attribute__((target("avx2,fma"))) static __m256 exp_avx2(__m256 x) {
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

__attribute__((target("avx2,fma"))) static __m256 sigmoid_avx2(__m256 x) {
  __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

__attribute__((target("avx2,fma"))) static __m256 tanh_avx2(__m256 x) {
  __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
  __m256 e = exp_avx2(_mm256_mul_ps(_mm256_set1_ps(-2.0f), x));
  return _mm256_sub_ps(_mm256_div_ps(two, _mm256_add_ps(one, e)), one);
}

/* One row, columns [0, n8) in steps of 8; the caller finishes the rest with the portable code. */
__attribute__((target("avx2,fma"))) static int cell_avx2(const float *g, float *c, float *h, int hidden) {
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
    if (avx2()) j = cell_avx2(g, cr, hr, hidden);
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
 * preceding mass is below top_p, and take the first whose cumulative mass exceeds u times the kept
 * total. top_k >= vocab and top_p > 1 turn those filters off; top_k 1 is greedy (u is not used).
 * `work` holds 4 * vocab doubles. */
static int64_t sample_one(const float *logits, int vocab, float scale, int top_k, double top_p, double u,
                          double *work) {
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
  if (top_k < vocab || top_p <= 1.0) {
    running = 0.0;
    for (int v = 0; v < vocab; v++) {
      int keep = v < top_k && cdf[v] - probs[v] < top_p;
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
                  const double *top_p, const double *u, int64_t *out, int threads) {
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
      if (work) out[r] = sample_one(logits + (size_t)r * vocab, vocab, scale[r], top_k[r], top_p[r], u[r], work);
    free(work);
  }
  return failed ? -1 : 0;
}
