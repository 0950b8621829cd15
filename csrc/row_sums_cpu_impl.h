// Row sums shared by the CPU row kernels (csrc/mp_cpu_impl.h, csrc/multi_weight_cpu_impl.h):
// included inside their anonymous namespace, once per instruction set, so that each variant
// vectorises them for its own target. Eight partial sums: vectorisable, and more accurate than
// one running sum. Uses to_f from csrc/cpu_common.h. No include guard on purpose.

// Sum of squares of a unit-stride row.
template <typename T>
inline float sumsq(const T* p, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) {
      const float v = to_f(p[i + j]);
      acc[j] += v * v;
    }
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) {
    const float v = to_f(p[i]);
    s += v * v;
  }
  return s;
}

// Dot product of two unit-stride rows.
template <typename TA, typename TB>
inline float dot(const TA* a, const TB* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += to_f(a[i + j]) * to_f(b[i + j]);
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += to_f(a[i]) * to_f(b[i]);
  return s;
}
