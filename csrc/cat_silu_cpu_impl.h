// Row kernels of the CPU twin of mp_cat_mp_silu (csrc/cat_cpu.cpp), included there once per
// instruction set (inside a namespace such as mpk::cpu::cs_avx2, under a matching `#pragma GCC
// target`) so that the fp32 loops around mp_silu_f vectorise like the single-op twins
// (csrc/mp_cpu_impl.h). Uses to_f / from_f from csrc/cpu_common.h. No include guard on purpose.
namespace {

// x = src * scale rounded to T; y = mp_silu of that rounded x.
template <typename T>
inline void scale_silu_row(const T* __restrict src, T* __restrict x, T* __restrict y, int64_t k, float scale) {
  for (int64_t i = 0; i < k; ++i) {
    const float xv = to_f(from_f<T>(to_f(src[i]) * scale));
    x[i] = from_f<T>(xv);
    y[i] = from_f<T>(mp_silu_f(xv));
  }
}

// d = (gx + gy * mp_silu'(x)) * scale in fp32; kGx / kGy: which gradients exist.
template <typename T, bool kGx, bool kGy>
inline void silu_grad_row(const T* __restrict gx, const T* __restrict gy, const T* __restrict x, T* __restrict d,
                          int64_t k, float scale) {
  for (int64_t i = 0; i < k; ++i) {
    float g = 0.0f;
    if constexpr (kGx) g = to_f(gx[i]);
    if constexpr (kGy) g += to_f(gy[i]) * mp_silu_grad_f(to_f(x[i]));
    d[i] = from_f<T>(g * scale);
  }
}

}  // namespace

template <typename T>
void cat_silu_rows(int64_t m0, int64_t m1, int64_t Ka, int64_t Kb, const T* a, const T* b, T* x, T* y, float ca,
                   float cb) {
  const int64_t K = Ka + Kb;
  for (int64_t m = m0; m < m1; ++m) {
    scale_silu_row(a + m * Ka, x + m * K, y + m * K, Ka, ca);
    scale_silu_row(b + m * Kb, x + m * K + Ka, y + m * K + Ka, Kb, cb);
  }
}

template <typename T, bool kGx, bool kGy>
void cat_silu_grad_rows(int64_t m0, int64_t m1, int64_t Ka, int64_t Kb, const T* gx, const T* gy, const T* x, T* ga,
                        T* gb, float ca, float cb) {
  const int64_t K = Ka + Kb;
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t o = m * K;
    silu_grad_row<T, kGx, kGy>(kGx ? gx + o : nullptr, kGy ? gy + o : nullptr, x + o, ga + m * Ka, Ka, ca);
    silu_grad_row<T, kGx, kGy>(kGx ? gx + o + Ka : nullptr, kGy ? gy + o + Ka : nullptr, x + o + Ka, gb + m * Kb, Kb,
                               cb);
  }
}
