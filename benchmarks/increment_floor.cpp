// The cost floor of the threshold histogram on a CPU: a bare loop of 16-bit increments at cells
// computed beforehand, laid out as the native pass lays out its per-thread table
// (2 x classes x (bins + 2) cells: target, class, bin), for the data of `benchmarks/run.py
// --profile hist` (256 classes, logits N(0, 3^2) row-major, 10% positive targets, bins over
// (-16, 16)). Whatever else a fused pass does, each element costs at least one such increment;
// compare the figure with the plain forward's time per element.
//
//   g++ -O3 -march=native benchmarks/increment_floor.cpp -o /tmp/increment_floor
//   /tmp/increment_floor [rows]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

int main(int argc, char** argv) {
  const int64_t rows = argc > 1 ? std::atoll(argv[1]) : 16384, classes = 256;
  const int64_t n = rows * classes;
  std::mt19937 gen(0);
  std::normal_distribution<float> logit(0.0f, 3.0f);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  std::vector<float> x(n);
  std::vector<uint8_t> pos(n);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = logit(gen);
    pos[i] = unit(gen) < 0.1f;
  }
  std::printf("%lld x %lld elements, one 16-bit increment each, best of 10\n",
              static_cast<long long>(rows), static_cast<long long>(classes));
  for (const int64_t bins : {8, 64, 1024}) {
    const int64_t nb = bins + 2;  // with the two open-ended bins
    std::vector<int32_t> cell(n);
    for (int64_t i = 0; i < n; ++i) {
      const double t = (double(x[i]) + 16.0) * double(bins) / 32.0;
      const int64_t b = std::clamp<int64_t>(int64_t(std::floor(t)) + 1, 0, bins + 1);
      cell[i] = int32_t((pos[i] * classes + i % classes) * nb + b);
    }
    std::vector<uint16_t> table(2 * classes * nb);
    double best = 1e30;
    for (int rep = 0; rep < 10; ++rep) {
      std::fill(table.begin(), table.end(), uint16_t(0));
      const auto t0 = std::chrono::steady_clock::now();
      for (int64_t i = 0; i < n; ++i) ++table[cell[i]];
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::min(best, s);
    }
    int64_t total = 0;
    for (const uint16_t v : table) total += v;
    std::printf("%5lld bins: table %7.1f KiB, %.3f ns per element (counted %lld)\n",
                static_cast<long long>(bins), double(table.size()) * 2 / 1024, best * 1e9 / n,
                static_cast<long long>(total));
  }
  return 0;
}
