// NumPy's legacy uniform draws (np.random.RandomState.uniform, MT19937) written straight into a
// float32 buffer, bit-identical to rng.uniform(low, high, n).astype(np.float32), and the generator
// left where NumPy leaves it.
//
// What NumPy computes, per value (checked bit for bit against NumPy by tests/test_fast_draw.py):
//   a, b   = the next two tempered MT19937 outputs (32 bits each)
//   u      = ((a >> 5) * 67108864.0 + (b >> 6)) / 9007199254740992.0     (a double in [0, 1))
//   value  = low + range * u   with range = high - low: one rounded product, one rounded sum
//   float  = (float)value      (round to nearest even)
// The integer part of u is exact (< 2^53) and the scaling by 2^-53 is exact, so only the product,
// the sum and the cast round; the file is built with -ffp-contract=off and the AVX2 path is
// compiled for "avx2" without "fma", so no multiply-add is ever fused.
//
// State: the 624-word key and the position (0..624) of NumPy's mt19937_state; position 624 means
// the next output needs a twist first. The caller reads them with rng.get_state() and writes them
// back with rng.set_state(); this file only advances them.
//
// No torch headers: the functions take raw addresses (checked by fast_draw.py), which keeps the
// first build to a few seconds.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MT_X86 1
#else
#define MT_X86 0
#endif

namespace {

constexpr int N = 624;
constexpr int M = 397;
constexpr uint32_t MATRIX_A = 0x9908b0dfu;
constexpr uint32_t UPPER = 0x80000000u;
constexpr uint32_t LOWER = 0x7fffffffu;

// ------------------------------------------------------------------------------------------------
// Scalar reference (portable; also the tail of every vector loop)
// ------------------------------------------------------------------------------------------------

inline uint32_t twist_one(uint32_t cur, uint32_t next, uint32_t far) {
  uint32_t y = (cur & UPPER) | (next & LOWER);
  return far ^ (y >> 1) ^ ((0u - (y & 1u)) & MATRIX_A);
}

// next block: dst[i] from src (the previous block); dst may equal src (in place).
void twist_scalar(const uint32_t* src, uint32_t* dst) {
  int i = 0;
  for (; i < N - M; ++i) dst[i] = twist_one(src[i], src[i + 1], src[i + M]);
  for (; i < N - 1; ++i) dst[i] = twist_one(src[i], src[i + 1], dst[i + M - N]);
  dst[N - 1] = twist_one(src[N - 1], dst[0], dst[M - 1]);
}

inline uint32_t temper(uint32_t y) {
  y ^= y >> 11;
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  y ^= y >> 18;
  return y;
}

inline float uniform_value(uint32_t a, uint32_t b, double low, double range) {
  double u = ((double)(a >> 5) * 67108864.0 + (double)(b >> 6)) / 9007199254740992.0;
  double product = range * u;
  double value = low + product;
  return (float)value;
}

// pairs of consecutive raw (untempered) words -> floats
void convert_scalar(const uint32_t* raw, float* out, int64_t pairs, double low, double range) {
  for (int64_t k = 0; k < pairs; ++k) out[k] = uniform_value(temper(raw[2 * k]), temper(raw[2 * k + 1]), low, range);
}

// ------------------------------------------------------------------------------------------------
// AVX2 (no FMA)
// ------------------------------------------------------------------------------------------------

#if MT_X86
__attribute__((target("avx2"))) inline __m256i twist8(__m256i cur, __m256i next, __m256i far) {
  const __m256i upper = _mm256_set1_epi32((int)UPPER);
  const __m256i lower = _mm256_set1_epi32((int)LOWER);
  const __m256i matrix = _mm256_set1_epi32((int)MATRIX_A);
  __m256i y = _mm256_or_si256(_mm256_and_si256(cur, upper), _mm256_and_si256(next, lower));
  __m256i odd = _mm256_srai_epi32(_mm256_slli_epi32(y, 31), 31);  // all ones where y is odd
  return _mm256_xor_si256(_mm256_xor_si256(far, _mm256_srli_epi32(y, 1)), _mm256_and_si256(odd, matrix));
}

// Same result as twist_scalar. In place (dst == src) works: every vector reads its src words
// before any later vector overwrites them, and reads dst words only where already written.
__attribute__((target("avx2"))) void twist_avx2(const uint32_t* src, uint32_t* dst) {
  int i = 0;
  for (; i + 8 <= N - M; i += 8) {
    __m256i cur = _mm256_loadu_si256((const __m256i*)(src + i));
    __m256i next = _mm256_loadu_si256((const __m256i*)(src + i + 1));
    __m256i far = _mm256_loadu_si256((const __m256i*)(src + i + M));
    _mm256_storeu_si256((__m256i*)(dst + i), twist8(cur, next, far));
  }
  for (; i < N - M; ++i) dst[i] = twist_one(src[i], src[i + 1], src[i + M]);
  for (; i + 8 <= N - 1; i += 8) {  // dst[i + M - N .. +7] are below i: written already
    __m256i cur = _mm256_loadu_si256((const __m256i*)(src + i));
    __m256i next = _mm256_loadu_si256((const __m256i*)(src + i + 1));
    __m256i far = _mm256_loadu_si256((const __m256i*)(dst + i + M - N));
    _mm256_storeu_si256((__m256i*)(dst + i), twist8(cur, next, far));
  }
  for (; i < N - 1; ++i) dst[i] = twist_one(src[i], src[i + 1], dst[i + M - N]);
  dst[N - 1] = twist_one(src[N - 1], dst[0], dst[M - 1]);
}

__attribute__((target("avx2"))) inline __m256i temper8(__m256i y) {
  y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 11));
  y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 7), _mm256_set1_epi32((int)0x9d2c5680u)));
  y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 15), _mm256_set1_epi32((int)0xefc60000u)));
  return _mm256_xor_si256(y, _mm256_srli_epi32(y, 18));
}

// 8 raw words (4 pairs) -> 4 floats. Each 64-bit lane holds one pair, a in its low half, b in its
// high half. m = (a >> 5) * 2^26 + (b >> 6) < 2^53 is built with 64-bit shifts, and u = m / 2^53
// without an integer conversion: with the exponent of 0.5 over m's low 52 bits the double is
// z = 0.5 + (m mod 2^52) / 2^53, which is u when m's bit 52 is set, and u + 0.5 otherwise
// (then z - 0.5 is exact: both lie in [0.5, 1)).
__attribute__((target("avx2"))) inline __m128 convert4(__m256i raw, __m256d low, __m256d range) {
  const __m256i mid_bits = _mm256_set1_epi64x(((1LL << 52) - 1) & ~((1LL << 26) - 1));  // bits 26..51
  const __m256i half_bits = _mm256_set1_epi64x(0x3FE0000000000000LL);
  __m256i y = temper8(raw);
  __m256i hi = _mm256_and_si256(_mm256_srli_epi64(_mm256_slli_epi64(y, 32), 11), mid_bits);  // (a >> 5) << 26, bit 52 dropped
  __m256i lo = _mm256_srli_epi64(y, 38);                                                   // b >> 6
  __m256d z = _mm256_castsi256_pd(_mm256_or_si256(_mm256_or_si256(hi, lo), half_bits));
  __m256d top = _mm256_castsi256_pd(_mm256_slli_epi64(y, 32));  // sign bit: a's bit 31 = m's bit 52
  __m256d u = _mm256_sub_pd(z, _mm256_blendv_pd(_mm256_set1_pd(0.5), _mm256_setzero_pd(), top));
  return _mm256_cvtpd_ps(_mm256_add_pd(low, _mm256_mul_pd(range, u)));
}

__attribute__((target("avx2"))) void convert_avx2(const uint32_t* raw, float* out, int64_t pairs, double low_s,
                                                  double range_s) {
  const __m256d low = _mm256_set1_pd(low_s);
  const __m256d range = _mm256_set1_pd(range_s);
  int64_t k = 0;
  for (; k + 8 <= pairs; k += 8) {
    __m128 lo = convert4(_mm256_loadu_si256((const __m256i*)(raw + 2 * k)), low, range);
    __m128 hi = convert4(_mm256_loadu_si256((const __m256i*)(raw + 2 * k + 8)), low, range);
    _mm256_storeu_ps(out + k, _mm256_set_m128(hi, lo));
  }
  for (; k + 4 <= pairs; k += 4) _mm_storeu_ps(out + k, convert4(_mm256_loadu_si256((const __m256i*)(raw + 2 * k)), low, range));
  convert_scalar(raw + 2 * k, out + k, pairs - k, low_s, range_s);
}

bool cpu_has_avx2() { return __builtin_cpu_supports("avx2"); }
#else
bool cpu_has_avx2() { return false; }
#endif

struct Kernels {
  void (*twist)(const uint32_t*, uint32_t*);
  void (*convert)(const uint32_t*, float*, int64_t, double, double);
};

Kernels kernels(bool vector) {
#if MT_X86
  if (vector && cpu_has_avx2()) return {twist_avx2, convert_avx2};
#endif
  (void)vector;
  return {twist_scalar, convert_scalar};
}

// ------------------------------------------------------------------------------------------------
// One thread: twist in place, convert each block as it comes
// ------------------------------------------------------------------------------------------------

int fill_one_thread(uint32_t* key, int pos, float* out, int64_t n, double low, double range, Kernels k) {
  int64_t i = 0;
  while (i < n) {
    if (pos >= N) {
      k.twist(key, key);
      pos = 0;
    }
    if (pos == N - 1) {  // the pair straddles two blocks
      uint32_t a = temper(key[N - 1]);
      k.twist(key, key);
      out[i++] = uniform_value(a, temper(key[0]), low, range);
      pos = 1;
      continue;
    }
    int64_t pairs = std::min<int64_t>((N - pos) / 2, n - i);
    k.convert(key + pos, out + i, pairs, low, range);
    pos += (int)(2 * pairs);
    i += pairs;
  }
  return pos;
}

// ------------------------------------------------------------------------------------------------
// Two threads: the twist (the only sequential part) runs on the calling thread into a ring of
// blocks, kept about half full; both threads convert blocks, claimed in order by an atomic counter.
//
// Words are numbered along the stream: block 0 is the key as passed (its words pos..623 unused
// yet), block b > 0 the b-th twist after it, word w lies in block w / 624. Output element j takes
// words pos + 2j and pos + 2j + 1. A block's job converts the pairs that start in it; the last one
// may end in the next block, so each slot holds its block and the next block's first word.
// ------------------------------------------------------------------------------------------------

constexpr int64_t RING = 32;  // slots of 625 words: 80 KB, in L2

inline void wait_a_little(int& spins) {
  if (++spins < 256) {
#if MT_X86
    _mm_pause();
#endif
  } else {
    std::this_thread::yield();  // the other thread may not be running: a shared, busy machine
  }
}

int fill_two_threads(uint32_t* key, int pos, float* out, int64_t n, double low, double range, Kernels k) {
  const int64_t end_word = pos + 2 * n;  // one past the last word used
  const int64_t last_block = (end_word - 1) / N;
  std::vector<uint32_t> ring((size_t)RING * (N + 1));
  auto slot = [&](int64_t b) { return ring.data() + (size_t)(b % RING) * (N + 1); };
  std::atomic<int64_t> ready{0};    // blocks below this are complete in the ring
  std::atomic<int64_t> claimed{0};  // the next block to convert
  std::atomic<int64_t> done[RING];  // per slot: 1 + the last block converted there
  for (auto& d : done) d.store(0, std::memory_order_relaxed);

  auto convert_block = [&](int64_t b) {
    const int64_t first = b * N;
    int64_t start = std::max<int64_t>(first, pos);
    start += (start - pos) & 1;
    const int64_t stop = std::min<int64_t>(first + N, end_word);
    if (start < stop) k.convert(slot(b) + (start - first), out + (start - pos) / 2, (stop - start + 1) / 2, low, range);
    done[b % RING].store(b + 1, std::memory_order_release);
  };
  // claim and convert one ready block; false if none is ready (or none is left)
  auto convert_one = [&]() {
    int64_t b = claimed.load(std::memory_order_relaxed);
    while (b <= last_block && b < ready.load(std::memory_order_acquire)) {
      if (claimed.compare_exchange_weak(b, b + 1, std::memory_order_relaxed)) {
        convert_block(b);
        return true;
      }
    }
    return false;
  };

  std::thread helper([&] {
    int spins = 0;
    while (claimed.load(std::memory_order_relaxed) <= last_block) {
      if (convert_one()) spins = 0;
      else wait_a_little(spins);
    }
  });

  std::memcpy(slot(0), key, sizeof(uint32_t) * N);
  for (int64_t b = 1; b <= last_block; ++b) {
    // keep the ring about half full; convert when ahead, and wait for block b - RING's slot
    int spins = 0;
    while (b - claimed.load(std::memory_order_relaxed) >= RING / 2 ||
           (b >= RING && done[b % RING].load(std::memory_order_acquire) < b - RING + 1)) {
      if (!convert_one()) wait_a_little(spins);
    }
    k.twist(slot(b - 1), slot(b));
    slot(b - 1)[N] = slot(b)[0];
    ready.store(b, std::memory_order_release);
  }
  ready.store(last_block + 1, std::memory_order_release);
  while (claimed.load(std::memory_order_relaxed) <= last_block) convert_one();
  helper.join();  // every block converted
  std::memcpy(key, slot(last_block), sizeof(uint32_t) * N);
  return (int)(end_word - last_block * N);
}

// ------------------------------------------------------------------------------------------------
// Entry points (addresses and sizes checked by fast_draw.py)
// ------------------------------------------------------------------------------------------------

int fill_uniform(uintptr_t key_address, int pos, uintptr_t out_address, int64_t n, double low, double range,
                 int threads, bool vector) {
  if (pos < 0 || pos > N) throw std::invalid_argument("MT19937 position must be in 0..624");
  if (n < 0) throw std::invalid_argument("negative count");
  auto* key = reinterpret_cast<uint32_t*>(key_address);
  auto* out = reinterpret_cast<float*>(out_address);
  Kernels k = kernels(vector);
  pybind11::gil_scoped_release no_gil;
  if (n == 0) return pos;
  if (threads >= 2 && n >= 4 * N) return fill_two_threads(key, pos, out, n, low, range, k);
  return fill_one_thread(key, pos, out, n, low, range, k);
}

// advance by `words` 32-bit outputs (two per uniform draw): twists only
int skip_words(uintptr_t key_address, int pos, int64_t words, bool vector) {
  if (pos < 0 || pos > N) throw std::invalid_argument("MT19937 position must be in 0..624");
  if (words < 0) throw std::invalid_argument("negative count");
  auto* key = reinterpret_cast<uint32_t*>(key_address);
  Kernels k = kernels(vector);
  pybind11::gil_scoped_release no_gil;
  while (words > 0) {
    if (pos >= N) {
      k.twist(key, key);
      pos = 0;
    }
    int64_t take = std::min<int64_t>(N - pos, words);
    pos += (int)take;
    words -= take;
  }
  return pos;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fill_uniform", &fill_uniform,
        "fill n float32 values at out_address with NumPy's legacy uniform draws; advances the key in place, "
        "returns the new position");
  m.def("skip_words", &skip_words, "advance the key by a number of 32-bit outputs; returns the new position");
  m.def("has_avx2", &cpu_has_avx2, "whether the AVX2 kernels run on this CPU");
}
