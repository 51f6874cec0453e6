// Bit packing of low-bit integer codes into 32-bit words, for the .p4q artifact format (docs/format.md).
//
// A b-bit code is stored as one or more bit planes (widths 1, 2, 4 or 8, which divide 32). In a plane of width w,
// code k of a row lands in word k / (32 / w) at bit offset (k % (32 / w)) * w, little-endian: the layout the Triton
// GEMM unpacks along K with one shift and one mask per element. 3-bit codes are a 2-bit plane (bits 0-1) plus a
// 1-bit plane (bit 2), so every plane has a power-of-two number of codes per word.
//
// The work is split over rows across std::threads; the GIL is released while packing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

void check_width(int w) {
  if (w != 1 && w != 2 && w != 4 && w != 8) {
    throw std::invalid_argument("plane width must be 1, 2, 4 or 8, got " + std::to_string(w));
  }
}

int resolve_threads(int threads, int64_t rows) {
  int hw = static_cast<int>(std::thread::hardware_concurrency());
  int t = threads > 0 ? threads : std::max(1, hw);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(t, rows)));
}

template <typename F>
void parallel_rows(int64_t rows, int threads, F fn) {
  int t = resolve_threads(threads, rows);
  if (t == 1) {
    fn(0, rows);
    return;
  }
  std::vector<std::thread> pool;
  int64_t chunk = (rows + t - 1) / t;
  for (int i = 0; i < t; ++i) {
    int64_t lo = i * chunk, hi = std::min(rows, lo + chunk);
    if (lo >= hi) break;
    pool.emplace_back(fn, lo, hi);
  }
  for (auto& th : pool) th.join();
}

int total_bits(const std::vector<int>& widths) {
  int b = 0;
  for (int w : widths) {
    check_width(w);
    b += w;
  }
  if (b < 1 || b > 8) throw std::invalid_argument("plane widths must add up to 1..8 bits");
  return b;
}

}  // namespace

// codes: uint8 [rows, K], every value < 2^sum(widths). Returns one int32 [rows, ceil(K / (32 / w))] array per plane.
std::vector<py::array_t<int32_t>> pack_planes(py::array_t<uint8_t, py::array::c_style | py::array::forcecast> codes,
                                              std::vector<int> widths, int threads) {
  if (codes.ndim() != 2) throw std::invalid_argument("codes must be a 2-D array [rows, K]");
  const int bits = total_bits(widths);
  const int64_t rows = codes.shape(0), K = codes.shape(1);
  const uint8_t* src = codes.data();
  const uint8_t limit = static_cast<uint8_t>((1u << bits) - 1u);
  for (int64_t i = 0; i < rows * K; ++i) {
    if (src[i] > limit) {
      throw std::invalid_argument("code " + std::to_string(src[i]) + " does not fit in " + std::to_string(bits) +
                                  " bits");
    }
  }
  std::vector<py::array_t<int32_t>> out;
  std::vector<int32_t*> dst;
  std::vector<int64_t> nwords;
  for (int w : widths) {
    int64_t per = 32 / w, nw = (K + per - 1) / per;
    out.emplace_back(py::array_t<int32_t>({rows, nw}));
    dst.push_back(out.back().mutable_data());
    nwords.push_back(nw);
  }
  {
    py::gil_scoped_release release;
    parallel_rows(rows, threads, [&](int64_t lo, int64_t hi) {
      int shift = 0;
      for (size_t p = 0; p < widths.size(); ++p) {
        const int w = widths[p];
        const int64_t per = 32 / w, nw = nwords[p];
        const uint32_t mask = (1u << w) - 1u;
        for (int64_t r = lo; r < hi; ++r) {
          const uint8_t* row = src + r * K;
          int32_t* orow = dst[p] + r * nw;
          for (int64_t j = 0; j < nw; ++j) {
            uint32_t word = 0;
            const int64_t k0 = j * per, k1 = std::min(K, k0 + per);
            for (int64_t k = k0; k < k1; ++k) {
              word |= ((static_cast<uint32_t>(row[k]) >> shift) & mask) << ((k - k0) * w);
            }
            orow[j] = static_cast<int32_t>(word);
          }
        }
        shift += w;
      }
    });
  }
  return out;
}

// Inverse of pack_planes: returns uint8 [rows, K].
py::array_t<uint8_t> unpack_planes(std::vector<py::array_t<int32_t, py::array::c_style | py::array::forcecast>> planes,
                                   std::vector<int> widths, int64_t K, int threads) {
  total_bits(widths);
  if (planes.size() != widths.size()) throw std::invalid_argument("need one packed array per plane width");
  if (K < 0) throw std::invalid_argument("K must be non-negative");
  const int64_t rows = planes.empty() ? 0 : planes[0].shape(0);
  std::vector<const int32_t*> src;
  for (size_t p = 0; p < planes.size(); ++p) {
    const int64_t per = 32 / widths[p], nw = (K + per - 1) / per;
    if (planes[p].ndim() != 2 || planes[p].shape(0) != rows || planes[p].shape(1) != nw) {
      throw std::invalid_argument("plane " + std::to_string(p) + " has the wrong shape for K=" + std::to_string(K));
    }
    src.push_back(planes[p].data());
  }
  py::array_t<uint8_t> out({rows, K});
  uint8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    parallel_rows(rows, threads, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        uint8_t* orow = dst + r * K;
        std::fill(orow, orow + K, 0);
        int shift = 0;
        for (size_t p = 0; p < widths.size(); ++p) {
          const int w = widths[p];
          const int64_t per = 32 / w, nw = (K + per - 1) / per;
          const uint32_t mask = (1u << w) - 1u;
          const int32_t* row = src[p] + r * nw;
          for (int64_t k = 0; k < K; ++k) {
            const uint32_t word = static_cast<uint32_t>(row[k / per]);
            orow[k] |= static_cast<uint8_t>(((word >> ((k % per) * w)) & mask) << shift);
          }
          shift += w;
        }
      }
    });
  }
  return out;
}

PYBIND11_MODULE(_bitpack, m) {
  m.doc() = "Multi-threaded bit packing of low-bit integer codes (p4q-engine artifact format)";
  m.def("pack_planes", &pack_planes, py::arg("codes"), py::arg("widths"), py::arg("threads") = 0,
        "Pack uint8 codes [rows, K] into one int32 array per bit plane.");
  m.def("unpack_planes", &unpack_planes, py::arg("planes"), py::arg("widths"), py::arg("K"), py::arg("threads") = 0,
        "Unpack bit planes back to uint8 codes [rows, K].");
}
