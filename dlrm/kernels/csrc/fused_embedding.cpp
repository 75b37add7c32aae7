// Kernels of fused_embedding.py: lookup preparation and the in-backward sparse SGD update.
//
// Dimension vocabulary: T tables of one embedding dim D, B bags per table, N_t lookups of table t,
// N = sum of N_t, R rows of the shared weight buffer (all T tables, each starting at a row base).
//
// Exactness contract of sgd_update: it must leave the buffer bit-identical to torch.optim.SGD
// applied to the uncoalesced sparse gradient of nn.EmbeddingBag(mode="sum", sparse=True), which is
// `weight.index_add_(0, indices, per_lookup, alpha=-lr)`: lookups applied one at a time in their
// original order, each as `w = w + alpha * v` with v = grad_out[bag] (times the per-sample weight,
// rounded to float first) and alpha = (float)(-lr). torch evaluates `w + alpha * v` either as one
// fused multiply-add or as a rounded product then a rounded sum, depending on the CPU kernel it
// dispatches to; the Python side measures which, per position d of a row, and passes
// `fused_prefix`: positions d < fused_prefix use fma, the rest multiply then add. This file is
// compiled with -ffp-contract=off so the compiler never fuses the second form on its own.
//
// Threads: every row has exactly one owner thread (a hash of the row), and each thread scans all
// lookups in order and applies only those of its rows, so a row's lookups are applied in their
// original order whatever the number of threads, without sorting and without atomics.
// Only the headers needed (not <torch/extension.h>): the build takes a fraction of the time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kPrefetchDistance = 16;
constexpr int64_t kMinLookupsPerThread = 1 << 14;

// Row -> owning thread in [0, parts): a multiplicative hash, then Lemire's multiply-shift range
// reduction (no division in the scan loop).
inline int64_t owner_of(int64_t row, uint64_t parts) {
  const uint64_t h = static_cast<uint64_t>(row) * 0x9E3779B97F4A7C15ULL;
  return static_cast<int64_t>(((h >> 32) * parts) >> 32);
}

// w[0:D] += alpha * v, v = g (or g * s rounded), rounded as described at the top of the file.
template <bool kWeighted>
__attribute__((always_inline)) inline void update_row(float* __restrict__ w, const float* __restrict__ g, float s,
                                                      float alpha, int64_t dim, int64_t fused_prefix) {
  for (int64_t d = 0; d < fused_prefix; ++d) {
    const float v = kWeighted ? g[d] * s : g[d];
    w[d] = std::fma(v, alpha, w[d]);
  }
  for (int64_t d = fused_prefix; d < dim; ++d) {
    const float v = kWeighted ? g[d] * s : g[d];
    const float step = alpha * v;
    w[d] = w[d] + step;
  }
}

struct UpdateArgs {
  float* weight;
  int64_t dim;
  const int64_t* rows;         // (N,) global rows
  const int64_t* bag_starts;   // (T*B + 1,) lookup position of each bag, then N
  const float* psw;            // (N,) or nullptr
  std::vector<const float*> grad;      // per table: (B, D) rows, or nullptr (no gradient)
  std::vector<int64_t> grad_row_stride;
  int64_t bags_per_table;
  int64_t tables;
  float alpha;
  int64_t fused_prefix;
};

template <bool kWeighted>
__attribute__((always_inline)) inline void scan_and_update(const UpdateArgs& a, uint64_t parts, int64_t first,
                                                           int64_t last) {
  const int64_t n = a.bag_starts[a.tables * a.bags_per_table];
  const int64_t row_bytes = a.dim * static_cast<int64_t>(sizeof(float));
  for (int64_t t = 0; t < a.tables; ++t) {
    const float* grad = a.grad[t];
    if (grad == nullptr) continue;
    for (int64_t b = 0; b < a.bags_per_table; ++b) {
      const int64_t bag = t * a.bags_per_table + b;
      const float* g = grad + b * a.grad_row_stride[t];
      for (int64_t k = a.bag_starts[bag]; k < a.bag_starts[bag + 1]; ++k) {
        if (k + kPrefetchDistance < n) {
          const int64_t ahead = a.rows[k + kPrefetchDistance];
          const int64_t o = owner_of(ahead, parts);
          if (o >= first && o < last) {
            const char* p = reinterpret_cast<const char*>(a.weight + ahead * a.dim);
            for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(p + off, 1, 1);
          }
        }
        const int64_t row = a.rows[k];
        const int64_t o = owner_of(row, parts);
        if (o < first || o >= last) continue;
        update_row<kWeighted>(a.weight + row * a.dim, g, kWeighted ? a.psw[k] : 1.0f, a.alpha, a.dim,
                              a.fused_prefix);
      }
    }
  }
}

// The same loop compiled for AVX2+FMA (chosen at run time when the CPU has them) and for the
// baseline x86-64 target (std::fma then calls the C library, which is exact but slow).
__attribute__((target("avx2,fma"))) void update_avx2(const UpdateArgs& a, uint64_t parts, int64_t first,
                                                     int64_t last) {
  if (a.psw != nullptr) {
    scan_and_update<true>(a, parts, first, last);
  } else {
    scan_and_update<false>(a, parts, first, last);
  }
}

void update_baseline(const UpdateArgs& a, uint64_t parts, int64_t first, int64_t last) {
  if (a.psw != nullptr) {
    scan_and_update<true>(a, parts, first, last);
  } else {
    scan_and_update<false>(a, parts, first, last);
  }
}

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

void check_cpu_tensor(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

// Writes the global rows (table row base + index) of all lookups and the bag starts of all T*B
// bags, checking every index against its table's row count and every table's offsets.
//
//   src, counts: per table, its N_t int64 indices (contiguous)
//   offsets: (T, B) int64, bag starts per table (offsets[t][0] == 0, non-decreasing, <= N_t)
//   row_base, rows: per table, its first row in the buffer and its number of rows
//   out_rows: (N,) int64; out_bag_starts: (T*B + 1,) int64
void prepare_impl(const std::vector<const int64_t*>& src, const std::vector<int64_t>& counts,
                  const at::Tensor& offsets, const std::vector<int64_t>& row_base, const std::vector<int64_t>& rows,
                  at::Tensor& out_rows, at::Tensor& out_bag_starts) {
  const int64_t tables = static_cast<int64_t>(src.size());
  check_cpu_tensor(offsets, at::kLong, "offsets");
  check_cpu_tensor(out_rows, at::kLong, "out_rows");
  check_cpu_tensor(out_bag_starts, at::kLong, "out_bag_starts");
  TORCH_CHECK(offsets.dim() == 2 && offsets.size(0) == tables, "offsets must have shape (T, B) with T = ",
              tables, ", got ", offsets.sizes());
  TORCH_CHECK(static_cast<int64_t>(row_base.size()) == tables && static_cast<int64_t>(rows.size()) == tables,
              "row_base and rows need one entry per table");
  const int64_t bags = offsets.size(1);
  TORCH_CHECK(out_bag_starts.is_contiguous() && out_bag_starts.numel() == tables * bags + 1,
              "out_bag_starts must be contiguous with T*B + 1 elements");
  TORCH_CHECK(out_rows.is_contiguous(), "out_rows must be contiguous");
  std::vector<int64_t> start(tables + 1, 0);
  for (int64_t t = 0; t < tables; ++t) start[t + 1] = start[t] + counts[t];
  TORCH_CHECK(out_rows.numel() == start[tables], "out_rows must have ", start[tables], " elements");
  const auto off = offsets.accessor<int64_t, 2>();
  int64_t* bag_starts = out_bag_starts.data_ptr<int64_t>();
  for (int64_t t = 0; t < tables; ++t) {
    for (int64_t b = 0; b < bags; ++b) {
      const int64_t o = off[t][b];
      TORCH_CHECK(b > 0 || o == 0, "offsets[", t, "][0] must be 0, got ", o);
      TORCH_CHECK(b == 0 || o >= off[t][b - 1], "offsets[", t, "] must be non-decreasing (position ", b, ")");
      TORCH_CHECK(o <= counts[t], "offsets[", t, "][", b, "] = ", o, " is past the table's ", counts[t], " indices");
      bag_starts[t * bags + b] = start[t] + o;
    }
  }
  bag_starts[tables * bags] = start[tables];
  int64_t* out = out_rows.data_ptr<int64_t>();
  // One parallel region over all N lookups; a chunk may span several tables.
  at::parallel_for(0, start[tables], 1 << 15, [&](int64_t begin, int64_t end) {
    int64_t t = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (int64_t k = begin; k < end; ++t) {
      const int64_t stop = std::min(end, start[t + 1]);
      const int64_t base = row_base[t];
      const int64_t limit = rows[t];
      const int64_t* from = src[t] - start[t];
      for (; k < stop; ++k) {
        const int64_t v = from[k];
        TORCH_CHECK_INDEX(v >= 0 && v < limit, "index ", v, " is out of range for table ", t, " with ", limit,
                          " rows");
        out[k] = base + v;
      }
    }
  });
}

// prepare_impl for indices given as T tensors (N_t,).
void prepare_lookups(const std::vector<at::Tensor>& indices, const at::Tensor& offsets,
                     const std::vector<int64_t>& row_base, const std::vector<int64_t>& rows, at::Tensor out_rows,
                     at::Tensor out_bag_starts) {
  std::vector<at::Tensor> contiguous(indices.size());
  std::vector<const int64_t*> src(indices.size());
  std::vector<int64_t> counts(indices.size());
  for (size_t t = 0; t < indices.size(); ++t) {
    check_cpu_tensor(indices[t], at::kLong, "indices");
    TORCH_CHECK(indices[t].dim() == 1, "indices of table ", t, " must be 1-D, got ", indices[t].sizes());
    contiguous[t] = indices[t].contiguous();
    src[t] = contiguous[t].data_ptr<int64_t>();
    counts[t] = contiguous[t].numel();
  }
  prepare_impl(src, counts, offsets, row_base, rows, out_rows, out_bag_starts);
}

// prepare_impl for indices given as one (T, N) tensor (no per-table tensors to create).
void prepare_lookups_matrix(const at::Tensor& indices, const at::Tensor& offsets,
                            const std::vector<int64_t>& row_base, const std::vector<int64_t>& rows,
                            at::Tensor out_rows, at::Tensor out_bag_starts) {
  check_cpu_tensor(indices, at::kLong, "indices");
  TORCH_CHECK(indices.dim() == 2, "an indices tensor must be (T, N), got ", indices.sizes());
  const at::Tensor contiguous = indices.contiguous();
  const int64_t tables = contiguous.size(0), n = contiguous.size(1);
  std::vector<const int64_t*> src(tables);
  for (int64_t t = 0; t < tables; ++t) src[t] = contiguous.data_ptr<int64_t>() + t * n;
  prepare_impl(src, std::vector<int64_t>(tables, n), offsets, row_base, rows, out_rows, out_bag_starts);
}

// In-place SGD on the buffer for one batch (see the top of the file).
//
//   weight: (R, D) float32 contiguous buffer
//   rows, bag_starts: from prepare_lookups
//   grads: T tensors (B, D) (converted to float32 with unit column stride if they are not), or
//          None for "no gradient for this table" (its output was unused, or it is frozen): its rows
//          are left alone
//   psw: (N,) float32 per-sample weights, or an empty tensor for none
void sgd_update(at::Tensor weight, const at::Tensor& rows, const at::Tensor& bag_starts,
                const std::vector<std::optional<at::Tensor>>& grads, const at::Tensor& psw, double lr,
                int64_t fused_prefix) {
  check_cpu_tensor(weight, at::kFloat, "weight");
  check_cpu_tensor(rows, at::kLong, "rows");
  check_cpu_tensor(bag_starts, at::kLong, "bag_starts");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous (R, D) tensor");
  TORCH_CHECK(rows.is_contiguous() && bag_starts.is_contiguous(), "rows and bag_starts must be contiguous");
  const int64_t tables = static_cast<int64_t>(grads.size());
  TORCH_CHECK(tables > 0 && (bag_starts.numel() - 1) % tables == 0, "bag_starts must have T*B + 1 elements");
  UpdateArgs a;
  a.weight = weight.data_ptr<float>();
  a.dim = weight.size(1);
  a.rows = rows.data_ptr<int64_t>();
  a.bag_starts = bag_starts.data_ptr<int64_t>();
  a.tables = tables;
  a.bags_per_table = (bag_starts.numel() - 1) / tables;
  TORCH_CHECK(a.bag_starts[tables * a.bags_per_table] == rows.numel(), "bag_starts must end at the lookup count");
  a.psw = nullptr;
  if (psw.numel() > 0) {
    check_cpu_tensor(psw, at::kFloat, "per-sample weights");
    TORCH_CHECK(psw.is_contiguous() && psw.numel() == rows.numel(), "per-sample weights must be (N,) contiguous");
    a.psw = psw.data_ptr<float>();
  }
  std::vector<at::Tensor> held(tables);  // converted gradients live until the update is done
  for (int64_t t = 0; t < tables; ++t) {
    if (!grads[t].has_value()) {
      a.grad.push_back(nullptr);
      a.grad_row_stride.push_back(0);
      continue;
    }
    at::Tensor g = *grads[t];
    TORCH_CHECK(g.device().is_cpu(), "grad must be a CPU tensor");
    if (g.scalar_type() != at::kFloat) g = g.to(at::kFloat);
    if (g.dim() == 2 && g.stride(1) != 1) g = g.contiguous();
    held[t] = g;
    TORCH_CHECK(g.dim() == 2 && g.size(0) == a.bags_per_table && g.size(1) == a.dim && g.stride(1) == 1,
                "grad of table ", t, " must be (B, D) with unit column stride, got ", g.sizes());
    a.grad.push_back(g.data_ptr<float>());
    a.grad_row_stride.push_back(g.stride(0));
  }
  a.alpha = static_cast<float>(-lr);
  TORCH_CHECK(fused_prefix >= 0 && fused_prefix <= a.dim, "fused_prefix must be in [0, D]");
  a.fused_prefix = fused_prefix;
  // Small batches run on one thread: waking a team costs more than their few thousand updates.
  const int64_t parts =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows.numel() / kMinLookupsPerThread));
  const bool fast = cpu_has_avx2_fma();
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    if (fast) {
      update_avx2(a, static_cast<uint64_t>(parts), first, last);
    } else {
      update_baseline(a, static_cast<uint64_t>(parts), first, last);
    }
  });
}

// Asks the kernel to back the whole 2 MiB pages of a freshly allocated (not yet touched) tensor
// with huge pages: random row updates then miss the TLB far less often. Numerics are unaffected.
// Returns whether the advice was taken (false on kernels without transparent huge pages).
bool advise_huge_pages(const at::Tensor& t) {
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(t.nbytes());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = end & ~(kHuge - 1);
  if (!t.device().is_cpu() || last <= first) return false;
  return madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE) == 0;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("prepare_lookups", &prepare_lookups, "global rows and bag starts of a batch (checked)");
  m.def("prepare_lookups_matrix", &prepare_lookups_matrix, "prepare_lookups for a (T, N) indices tensor");
  m.def("advise_huge_pages", &advise_huge_pages, "madvise(MADV_HUGEPAGE) over a tensor's whole huge pages");
  m.def("sgd_update", &sgd_update, "in-place exact sparse SGD on the shared buffer");
}
