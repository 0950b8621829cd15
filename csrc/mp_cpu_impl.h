// Body of the CPU twins, included by mp_cpu.cpp once per instruction set (inside a namespace such
// as mpk::cpu::isa_avx2, under a matching `#pragma GCC target`), so that the same source is
// auto-vectorised for SSE2, AVX2+FMA and AVX-512 and picked at run time. No include guard on
// purpose. Uses to_f / from_f / load_any / store_any / grain_for from csrc/cpu_common.h.
namespace {

#include "row_sums_cpu_impl.h"

// Walks consecutive pixels of an [N, C, L] view: offset of each pixel's first channel, without
// a division per pixel.
struct PixelWalker {
  const NCL& s;
  int64_t n, l;
  PixelWalker(const NCL& view, int64_t pix) : s(view), n(pix / view.L), l(pix % view.L) {}
  int64_t offset() const { return n * s.sN + l * s.sL; }
  void next() {
    if (++l == s.L) {
      l = 0;
      ++n;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Element-wise ops over flat, identically laid out arrays.

template <typename T>
void mp_silu_fwd_t(int64_t n, const T* x, T* y) {
  at::parallel_for(0, n, kGrain, [=](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) y[i] = from_f<T>(mp_silu_f(to_f(x[i])));
  });
}

template <typename T>
void mp_silu_bwd_t(int64_t n, const T* g, const T* x, T* gx) {
  at::parallel_for(0, n, kGrain, [=](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) gx[i] = from_f<T>(to_f(g[i]) * mp_silu_grad_f(to_f(x[i])));
  });
}

template <typename T>
void mp_sum_clip_fwd_t(int64_t n, const T* a, const T* b, T* y, float t, float scale, float clip) {
  at::parallel_for(0, n, kGrain, [=](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) y[i] = from_f<T>(clip_f(lerp_f(to_f(a[i]), to_f(b[i]), t) * scale, clip));
  });
}

template <typename T>
void mp_sum_clip_bwd_t(int64_t n, const T* g, const T* a, const T* b, T* ga, T* gb, float t, float scale,
                       float clip) {
  const float wa = (1.0f - t) * scale, wb = t * scale;
  at::parallel_for(0, n, kGrain, [=](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) {
      float pre = lerp_f(to_f(a[i]), to_f(b[i]), t) * scale;
      float gm = clip_grad_f(to_f(g[i]), pre, clip);
      ga[i] = from_f<T>(gm * wa);
      gb[i] = from_f<T>(gm * wb);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// modulated_mp_silu: out = mp_silu(y * c[n, ch]).

template <typename T>
void modulated_fwd_t(const NCL& s, const T* y, const void* c, DType cdt, int64_t csN, int64_t csC, T* out) {
  if (s.sC != 1) {  // NCHW (sL == 1): one scale per unit-stride row of L pixels
    at::parallel_for(0, s.N * s.C, grain_for(s.L), [=](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        const int64_t n = row / s.C, ch = row % s.C;
        const float sc = load_any(c, cdt, n * csN + ch * csC);
        const int64_t off = n * s.sN + ch * s.sC;
        for (int64_t l = 0; l < s.L; ++l) out[off + l] = from_f<T>(mp_silu_f(to_f(y[off + l]) * sc));
      }
    });
  } else {  // channels_last (sC == 1): a unit-stride row of C channels per pixel
    at::parallel_for(0, s.N * s.L, grain_for(s.C), [=](int64_t b, int64_t e) {
      std::vector<float> sc(s.C);
      int64_t cur_n = -1;
      PixelWalker walk(s, b);
      for (int64_t pix = b; pix < e; ++pix, walk.next()) {
        const int64_t n = walk.n;
        if (n != cur_n) {
          for (int64_t ch = 0; ch < s.C; ++ch) sc[ch] = load_any(c, cdt, n * csN + ch * csC);
          cur_n = n;
        }
        const int64_t off = walk.offset();
        const float* scp = sc.data();
        for (int64_t ch = 0; ch < s.C; ++ch) out[off + ch] = from_f<T>(mp_silu_f(to_f(y[off + ch]) * scp[ch]));
      }
    });
  }
}

template <typename T>
void modulated_bwd_t(const NCL& s, const T* g, const T* y, const void* c, DType cdt, int64_t csN, int64_t csC,
                     T* gy, void* gc, int64_t gcsN, int64_t gcsC) {
  if (s.sC != 1) {
    at::parallel_for(0, s.N * s.C, grain_for(s.L), [=](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        const int64_t n = row / s.C, ch = row % s.C;
        const float sc = load_any(c, cdt, n * csN + ch * csC);
        const int64_t off = n * s.sN + ch * s.sC;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t l = 0;
        for (; l + 8 <= s.L; l += 8)
          for (int j = 0; j < 8; ++j) {
            const float yv = to_f(y[off + l + j]);
            const float gs = to_f(g[off + l + j]) * mp_silu_grad_f(yv * sc);
            gy[off + l + j] = from_f<T>(gs * sc);
            acc[j] += gs * yv;
          }
        float tot = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for (; l < s.L; ++l) {
          const float yv = to_f(y[off + l]);
          const float gs = to_f(g[off + l]) * mp_silu_grad_f(yv * sc);
          gy[off + l] = from_f<T>(gs * sc);
          tot += gs * yv;
        }
        store_any(gc, cdt, n * gcsN + ch * gcsC, tot);
      }
    });
    return;
  }
  // channels_last: per (image, chunk of pixels) partial sums over pixels, reduced afterwards in
  // a fixed order (deterministic, whatever the thread count).
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(s.L, grain_for(s.C)));
  const int64_t chunks = (s.L + chunk - 1) / chunk;
  std::vector<float> partial(static_cast<size_t>(s.N * chunks * s.C));
  float* const partial_base = partial.data();
  at::parallel_for(0, s.N * chunks, 1, [=](int64_t b, int64_t e) {
    std::vector<float> sc(s.C);
    for (int64_t task = b; task < e; ++task) {
      const int64_t n = task / chunks, l0 = (task % chunks) * chunk, l1 = std::min(s.L, l0 + chunk);
      for (int64_t ch = 0; ch < s.C; ++ch) sc[ch] = load_any(c, cdt, n * csN + ch * csC);
      float* acc = partial_base + task * s.C;
      const float* scp = sc.data();
      for (int64_t l = l0; l < l1; ++l) {
        const int64_t off = n * s.sN + l * s.sL;
        for (int64_t ch = 0; ch < s.C; ++ch) {
          const float yv = to_f(y[off + ch]);
          const float gs = to_f(g[off + ch]) * mp_silu_grad_f(yv * scp[ch]);
          gy[off + ch] = from_f<T>(gs * scp[ch]);
          acc[ch] += gs * yv;
        }
      }
    }
  });
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t ch = 0; ch < s.C; ++ch) {
      float tot = 0.0f;
      for (int64_t k = 0; k < chunks; ++k) tot += partial[(n * chunks + k) * s.C + ch];
      store_any(gc, cdt, n * gcsN + ch * gcsC, tot);
    }
}

// ---------------------------------------------------------------------------------------------
// Pixel norm (and pixel norm + mp_silu): normalize over C per (n, pixel).

constexpr int64_t kPixBlock = 128;  // pixels per task on the NCHW path

template <typename T>
void pixel_norm_fwd_t(const NCL& s, const T* x, T* xn, T* y, float* rms, float eps) {
  const float inv_c = 1.0f / static_cast<float>(s.C);
  if (s.sC == 1) {  // channels_last: channels of a pixel are contiguous; blocks of kPixBlock pixels
    const int64_t pixels = s.N * s.L, blocks = (pixels + kPixBlock - 1) / kPixBlock;
    at::parallel_for(0, blocks, grain_for(kPixBlock * s.C), [=](int64_t b, int64_t e) {
      float r[kPixBlock];
      int64_t offs[kPixBlock];
      for (int64_t blk = b; blk < e; ++blk) {
        const int64_t p0 = blk * kPixBlock, np = std::min(kPixBlock, pixels - p0);
        // statistics of the whole block first: independent reductions, vectorised sqrt / division
        PixelWalker walk(s, p0);
        for (int64_t p = 0; p < np; ++p, walk.next()) {
          offs[p] = walk.offset();
          r[p] = sumsq(x + offs[p], s.C);
        }
        for (int64_t p = 0; p < np; ++p) {
          const float rv = rms_from_sumsq(r[p], inv_c);
          rms[p0 + p] = rv;
          r[p] = inv_denom(rv, eps);
        }
        for (int64_t p = 0; p < np; ++p) {
          const int64_t off = offs[p];
          const float rp = r[p];
          const T* xp = x + off;
          T* xnp = xn + off;
          if (y) {
            T* yp = y + off;
            for (int64_t ch = 0; ch < s.C; ++ch) {
              const float v = to_f(xp[ch]) * rp;
              xnp[ch] = from_f<T>(v);
              yp[ch] = from_f<T>(mp_silu_f(v));
            }
          } else {
            for (int64_t ch = 0; ch < s.C; ++ch) xnp[ch] = from_f<T>(to_f(xp[ch]) * rp);
          }
        }
      }
    });
    return;
  }
  // NCHW (sL == 1): a block of pixels at a time, inner loops along the unit-stride pixels.
  const int64_t tiles = (s.L + kPixBlock - 1) / kPixBlock;
  at::parallel_for(0, s.N * tiles, grain_for(kPixBlock * s.C), [=](int64_t b, int64_t e) {
    float acc[kPixBlock], r[kPixBlock];
    for (int64_t task = b; task < e; ++task) {
      const int64_t n = task / tiles, l0 = (task % tiles) * kPixBlock, len = std::min(kPixBlock, s.L - l0);
      const int64_t base = n * s.sN + l0;
      for (int64_t p = 0; p < len; ++p) acc[p] = 0.0f;
      for (int64_t ch = 0; ch < s.C; ++ch) {
        const T* xr = x + base + ch * s.sC;
        for (int64_t p = 0; p < len; ++p) {
          const float v = to_f(xr[p]);
          acc[p] += v * v;
        }
      }
      for (int64_t p = 0; p < len; ++p) {
        const float rv = rms_from_sumsq(acc[p], inv_c);
        rms[n * s.L + l0 + p] = rv;
        r[p] = inv_denom(rv, eps);
      }
      for (int64_t ch = 0; ch < s.C; ++ch) {
        const int64_t o = base + ch * s.sC;
        if (y) {
          for (int64_t p = 0; p < len; ++p) {
            const float v = to_f(x[o + p]) * r[p];
            xn[o + p] = from_f<T>(v);
            y[o + p] = from_f<T>(mp_silu_f(v));
          }
        } else {
          for (int64_t p = 0; p < len; ++p) xn[o + p] = from_f<T>(to_f(x[o + p]) * r[p]);
        }
      }
    }
  });
}

// Total gradient reaching xn: gxn + gy * mp_silu'(xn). Which gradients exist is a template
// argument, so that the loops below have no branches (and vectorise).
template <bool G1, bool G2, typename T>
inline float pn_total_grad(const T* gxn, const T* gy, int64_t i, float xnv) {
  float gt = G1 ? to_f(gxn[i]) : 0.0f;
  if (G2) gt += to_f(gy[i]) * mp_silu_grad_f(xnv);
  return gt;
}

template <typename T, bool G1, bool G2>
void pixel_norm_bwd_g(const NCL& s, const T* gxn, const T* gy, const T* x, const float* rms, T* gx, float eps) {
  const float inv_c = 1.0f / static_cast<float>(s.C);
  if (s.sC == 1) {
    at::parallel_for(0, s.N * s.L, grain_for(s.C), [=](int64_t b, int64_t e) {
      std::vector<float> gt(s.C);
      PixelWalker walk(s, b);
      for (int64_t pix = b; pix < e; ++pix, walk.next()) {
        const int64_t off = walk.offset();
        const float rv = rms[pix], r = inv_denom(rv, eps);
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t ch = 0;
        for (; ch + 8 <= s.C; ch += 8)
          for (int j = 0; j < 8; ++j) {
            const float xv = to_f(x[off + ch + j]);
            const float g = pn_total_grad<G1, G2>(gxn, gy, off + ch + j, xv * r);
            gt[ch + j] = g;
            acc[j] += g * xv;
          }
        float d = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for (; ch < s.C; ++ch) {
          const float xv = to_f(x[off + ch]);
          const float g = pn_total_grad<G1, G2>(gxn, gy, off + ch, xv * r);
          gt[ch] = g;
          d += g * xv;
        }
        const float cd = norm_grad_coef(r, rv, inv_c) * d;
        for (ch = 0; ch < s.C; ++ch) gx[off + ch] = from_f<T>(gt[ch] * r - cd * to_f(x[off + ch]));
      }
    });
    return;
  }
  const int64_t tiles = (s.L + kPixBlock - 1) / kPixBlock;
  at::parallel_for(0, s.N * tiles, grain_for(kPixBlock * s.C), [=](int64_t b, int64_t e) {
    std::vector<float> gt(static_cast<size_t>(s.C * kPixBlock));
    float r[kPixBlock], d[kPixBlock];
    for (int64_t task = b; task < e; ++task) {
      const int64_t n = task / tiles, l0 = (task % tiles) * kPixBlock, len = std::min(kPixBlock, s.L - l0);
      const int64_t base = n * s.sN + l0;
      for (int64_t p = 0; p < len; ++p) {
        r[p] = inv_denom(rms[n * s.L + l0 + p], eps);
        d[p] = 0.0f;
      }
      for (int64_t ch = 0; ch < s.C; ++ch) {
        const int64_t o = base + ch * s.sC;
        float* gtr = gt.data() + ch * kPixBlock;
        for (int64_t p = 0; p < len; ++p) {
          const float xv = to_f(x[o + p]);
          const float g = pn_total_grad<G1, G2>(gxn, gy, o + p, xv * r[p]);
          gtr[p] = g;
          d[p] += g * xv;
        }
      }
      for (int64_t p = 0; p < len; ++p) d[p] *= norm_grad_coef(r[p], rms[n * s.L + l0 + p], inv_c);
      for (int64_t ch = 0; ch < s.C; ++ch) {
        const int64_t o = base + ch * s.sC;
        const float* gtr = gt.data() + ch * kPixBlock;
        for (int64_t p = 0; p < len; ++p) gx[o + p] = from_f<T>(gtr[p] * r[p] - d[p] * to_f(x[o + p]));
      }
    }
  });
}

template <typename T>
void pixel_norm_bwd_t(const NCL& s, const T* gxn, const T* gy, const T* x, const float* rms, T* gx, float eps) {
  if (gxn && gy)
    pixel_norm_bwd_g<T, true, true>(s, gxn, gy, x, rms, gx, eps);
  else if (gxn)
    pixel_norm_bwd_g<T, true, false>(s, gxn, gy, x, rms, gx, eps);
  else
    pixel_norm_bwd_g<T, false, true>(s, gxn, gy, x, rms, gx, eps);
}

// ---------------------------------------------------------------------------------------------
// Rows of weights: mp_weight and force_normalize_.

template <typename T>
void mp_weight_fwd_t(int64_t rows, int64_t len, const T* w, float k, float eps, float* out, float* rms) {
  const float inv_len = 1.0f / static_cast<float>(len);
  at::parallel_for(0, rows, grain_for(len), [=](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) {
      const T* wr = w + o * len;
      float* orow = out + o * len;
      const float rv = rms_from_sumsq(sumsq(wr, len), inv_len);
      rms[o] = rv;
      const float sc = inv_denom(rv, eps) * k;
      for (int64_t i = 0; i < len; ++i) orow[i] = to_f(wr[i]) * sc;
    }
  });
}

template <typename T>
void mp_weight_bwd_t(int64_t rows, int64_t len, const float* g, const T* w, float k, const float* rms, float eps,
                     T* gw, float* partial) {
  const float inv_len = 1.0f / static_cast<float>(len);
  at::parallel_for(0, rows, grain_for(len), [=](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) {
      const T* wr = w + o * len;
      const float* gr = g + o * len;
      T* gwr = gw + o * len;
      const float rv = rms[o], r = inv_denom(rv, eps);
      const float d = dot(gr, wr, len);
      const float a = r * k, cd = norm_grad_coef(r, rv, inv_len) * d * k;
      for (int64_t i = 0; i < len; ++i) gwr[i] = from_f<T>(gr[i] * a - cd * to_f(wr[i]));
      if (partial) partial[o] = r * d;  // sum_i g_i * w_i * r: d out / d gain, times sqrt(len)
    }
  });
}

template <typename T>
void force_normalize_rows(T* w, int64_t rows, int64_t len, float eps) {
  const float inv_len = 1.0f / static_cast<float>(len);
  for (int64_t o = 0; o < rows; ++o) {
    T* wr = w + o * len;
    const float r = inv_denom(rms_from_sumsq(sumsq(wr, len), inv_len), eps);
    for (int64_t i = 0; i < len; ++i) wr[i] = from_f<T>(to_f(wr[i]) * r);
  }
}

template <typename TE, typename TS>
void ema_lerp_span(TE* e, const TS* src, int64_t n, float weight) {
  for (int64_t i = 0; i < n; ++i) e[i] = from_f<TE>(lerp_f(to_f(e[i]), to_f(src[i]), weight));
}

// force_finite_: an element whose exponent bits are all ones (inf or NaN) becomes +0, every other
// keeps its bits. A bit test: exact in every dtype, and it vectorises (std::isfinite does not
// without -ffinite-math). memcpy keeps the type punning defined; it compiles to plain moves.
template <typename T>
struct FiniteBits;
template <>
struct FiniteBits<float> {
  using U = uint32_t;
  static constexpr U kExp = 0x7F800000u;
};
template <>
struct FiniteBits<c10::Half> {
  using U = uint16_t;
  static constexpr U kExp = 0x7C00u;
};
template <>
struct FiniteBits<c10::BFloat16> {
  using U = uint16_t;
  static constexpr U kExp = 0x7F80u;
};

template <typename T>
void force_finite_span(T* p, int64_t n) {
  using U = typename FiniteBits<T>::U;
  constexpr U kExp = FiniteBits<T>::kExp;
  static_assert(sizeof(U) == sizeof(T), "FiniteBits: size mismatch");
  for (int64_t i = 0; i < n; ++i) {
    U u;
    std::memcpy(&u, p + i, sizeof(U));
    u = (u & kExp) == kExp ? U(0) : u;
    std::memcpy(p + i, &u, sizeof(U));
  }
}

// Runs span(t, first, count) over the concatenated elements (or rows) of `count` items, whose sizes
// are size(t): one parallel region for the whole list, split by `grain`, a task crossing item
// boundaries (a list of many small tensors costs one region, not one per tensor).
template <typename Size, typename Span>
void for_spans(int64_t count, int64_t grain, Size size, Span span) {
  std::vector<int64_t> start(count + 1, 0);
  for (int64_t t = 0; t < count; ++t) start[t + 1] = start[t] + size(t);
  const int64_t total = start[count];
  if (total == 0) return;
  const int64_t* s = start.data();
  at::parallel_for(0, total, grain, [=](int64_t b, int64_t e) {
    int64_t t = std::upper_bound(s, s + count + 1, b) - s - 1;  // last item starting at or before b
    while (b < e) {
      const int64_t stop = std::min(e, s[t + 1]);
      if (stop > b) span(t, b - s[t], stop - b);
      b = stop;
      ++t;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Launchers (dtype dispatch of the templates above).

void mp_silu_fwd(DType dt, int64_t n, const void* x, void* y) {
  MPK_CPU_DISPATCH(dt, T, mp_silu_fwd_t<T>(n, static_cast<const T*>(x), static_cast<T*>(y)));
}

void mp_silu_bwd(DType dt, int64_t n, const void* g, const void* x, void* gx) {
  MPK_CPU_DISPATCH(dt, T, mp_silu_bwd_t<T>(n, static_cast<const T*>(g), static_cast<const T*>(x),
                                           static_cast<T*>(gx)));
}

void mp_sum_clip_fwd(DType dt, int64_t n, const void* a, const void* b, void* y, float t, float scale,
                     float clip) {
  MPK_CPU_DISPATCH(dt, T, mp_sum_clip_fwd_t<T>(n, static_cast<const T*>(a), static_cast<const T*>(b),
                                               static_cast<T*>(y), t, scale, clip));
}

void mp_sum_clip_bwd(DType dt, int64_t n, const void* g, const void* a, const void* b, void* ga, void* gb,
                     float t, float scale, float clip) {
  MPK_CPU_DISPATCH(dt, T, mp_sum_clip_bwd_t<T>(n, static_cast<const T*>(g), static_cast<const T*>(a),
                                               static_cast<const T*>(b), static_cast<T*>(ga),
                                               static_cast<T*>(gb), t, scale, clip));
}

void modulated_mp_silu_fwd(DType dt, const NCL& s, const void* y, const void* c, DType cdt, int64_t csN,
                           int64_t csC, void* out) {
  MPK_CPU_DISPATCH(dt, T, modulated_fwd_t<T>(s, static_cast<const T*>(y), c, cdt, csN, csC, static_cast<T*>(out)));
}

void modulated_mp_silu_bwd(DType dt, const NCL& s, const void* g, const void* y, const void* c, DType cdt,
                           int64_t csN, int64_t csC, void* gy, void* gc, int64_t gcsN, int64_t gcsC,
                           float* /*workspace*/) {
  MPK_CPU_DISPATCH(dt, T, modulated_bwd_t<T>(s, static_cast<const T*>(g), static_cast<const T*>(y), c, cdt, csN,
                                             csC, static_cast<T*>(gy), gc, gcsN, gcsC));
}

void pixel_norm_fwd(DType dt, const NCL& s, const void* x, void* xn, void* y, float* rms, float eps,
                    float* /*workspace*/) {
  MPK_CPU_DISPATCH(dt, T, pixel_norm_fwd_t<T>(s, static_cast<const T*>(x), static_cast<T*>(xn),
                                              static_cast<T*>(y), rms, eps));
}

void pixel_norm_bwd(DType dt, const NCL& s, const void* gxn, const void* gy, const void* x, const float* rms,
                    void* gx, float eps, float* /*workspace*/) {
  MPK_CPU_DISPATCH(dt, T, pixel_norm_bwd_t<T>(s, static_cast<const T*>(gxn), static_cast<const T*>(gy),
                                              static_cast<const T*>(x), rms, static_cast<T*>(gx), eps));
}

void mp_weight_fwd(DType dt, int64_t rows, int64_t len, const void* w, const void* gain_ptr, DType gdt, float gain,
                   float eps, float* out, float* rms) {
  if (gain_ptr) gain = load_any(gain_ptr, gdt, 0);
  const float k = gain / std::sqrt(static_cast<float>(len));
  MPK_CPU_DISPATCH(dt, T, mp_weight_fwd_t<T>(rows, len, static_cast<const T*>(w), k, eps, out, rms));
}

void mp_weight_bwd(DType dt, int64_t rows, int64_t len, const float* g, const void* w, const void* gain_ptr,
                   DType gdt, float gain, const float* rms, float eps, void* gw, void* ggain, float* workspace) {
  if (gain_ptr) gain = load_any(gain_ptr, gdt, 0);
  const float inv_sqrt_len = 1.0f / std::sqrt(static_cast<float>(len));
  std::vector<float> partial(ggain ? static_cast<size_t>(rows) : 0);
  float* part = ggain ? (workspace ? workspace : partial.data()) : nullptr;
  MPK_CPU_DISPATCH(dt, T, mp_weight_bwd_t<T>(rows, len, g, static_cast<const T*>(w), gain * inv_sqrt_len, rms, eps,
                                             static_cast<T*>(gw), part));
  if (ggain) {
    float tot = 0.0f;
    for (int64_t o = 0; o < rows; ++o) tot += part[o];
    store_any(ggain, gdt, 0, tot * inv_sqrt_len);
  }
}

void force_normalize(const RowTensor* tensors, int64_t count, float eps) {
  int64_t elems = 0, rows = 0;
  for (int64_t i = 0; i < count; ++i) {
    elems += tensors[i].rows * tensors[i].len;
    rows += tensors[i].rows;
  }
  if (rows == 0) return;
  for_spans(
      count, grain_for(elems / rows), [=](int64_t i) { return tensors[i].rows; },
      [=](int64_t i, int64_t first, int64_t n) {
        const RowTensor& t = tensors[i];
        MPK_CPU_DISPATCH(t.dtype, T,
                         force_normalize_rows<T>(static_cast<T*>(t.ptr) + first * t.len, n, t.len, eps));
      });
}

void ema_lerp(const LerpPair* pairs, int64_t count, float weight) {
  for_spans(
      count, kGrain, [=](int64_t i) { return pairs[i].numel; },
      [=](int64_t i, int64_t first, int64_t n) {
        const LerpPair& p = pairs[i];
        MPK_CPU_DISPATCH(p.ema_dtype, TE,
                         MPK_CPU_DISPATCH(p.src_dtype, TS,
                                          ema_lerp_span<TE, TS>(static_cast<TE*>(p.ema) + first,
                                                                static_cast<const TS*>(p.src) + first, n, weight)));
      });
}

void force_finite(const FlatTensor* tensors, int64_t count) {
  for_spans(
      count, kGrain, [=](int64_t i) { return tensors[i].numel; },
      [=](int64_t i, int64_t first, int64_t n) {
        const FlatTensor& t = tensors[i];
        MPK_CPU_DISPATCH(t.dtype, T, force_finite_span<T>(static_cast<T*>(t.ptr) + first, n));
      });
}

}  // namespace
