// Launching ce_kernel: the row layout (warp / block / cluster rows / streaming, see
// ce_kernel.cuh), chosen at run time from the device (its compute capability decides whether
// clusters exist, its opt-in shared memory how much of a row a block can stage).
#pragma once

#include <algorithm>
#include <atomic>

#include <c10/cuda/CUDAGraphsC10Utils.h>

#include "cuda/ce_kernel.cuh"
#include "cuda/common.cuh"

namespace fusedloss {
namespace cuda {

// Tuning constants. None was measured on a GPU yet; each states what it assumes about an
// H100/H200 (sm_90: 228 KiB shared memory per SM, up to 227 KiB per block, 2048 threads per SM,
// clusters of up to 8 blocks portable).
//
// Warp rows for rows of at most this many 16-byte chunks (4 per lane): enough independent
// loads per lane to cover latency with 8 warps per block, and no block barriers at all.
constexpr int64_t kWarpRowMaxChunks = 4 * kWarp;
// Block rows: aim at ~4 chunks (64 bytes) in flight per thread, between 64 and 512 threads.
// 512 threads x 4 chunks = 32 KiB of a row in flight per block.
constexpr int kChunksPerThread = 4;
constexpr int kMinBlock = 64;
// Shared memory staged per block when choosing the cluster size: 64 KiB leaves room for 3
// blocks per SM, so one block's loads overlap another's reduction and gradient writes.
constexpr int64_t kCtaStageBytes = 64 * 1024;
constexpr int kMaxCluster = 8;  // portable cluster size limit on sm_90
constexpr int kMinClusterArch = 9;  // thread-block clusters exist from compute capability 9.0
// Rows handled by one launch's grid before the blocks loop (keeps gridDim.x < 2^31).
constexpr int64_t kMaxGridRows = int64_t(1) << 24;
// Bytes of one chunk.
constexpr int64_t kChunkBytes = 16;
// Shared memory kept free of staging for the kernel's static shared memory (CeShared: 34 x 64
// bytes = 2.2 KiB for fp64), so staging + static always fits under the opt-in limit.
constexpr int64_t kStaticSmemReserve = 4096;
// Dynamic shared memory a kernel may use without raising its limit (every CUDA GPU).
constexpr size_t kDefaultSmemLimit = 48 * 1024;
// Devices whose per-device settings are cached (more are served, uncached).
constexpr int kMaxDevices = 64;

struct Layout {
  bool warp_rows;
  int threads;
  int cluster;
  bool stage;
  int64_t cta_chunks;
  size_t smem;
};

inline int max_smem_optin(int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return v;
}

inline int compute_major(int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, device));
  return v;
}

inline int block_threads_for(int64_t chunks) {
  const int64_t want = (chunks + kChunksPerThread - 1) / kChunksPerThread;
  int t = kMinBlock;
  while (t < kMaxBlock && t < want) t *= 2;
  return t;
}

// Raise the kernel's dynamic shared memory limit once per device to the opt-in maximum minus
// its static shared memory (the sum may not exceed the opt-in limit).
template <typename T, bool kWarpRow>
void raise_smem_limit(int device) {
  static std::atomic<bool> done[kMaxDevices];
  const bool cached = device < kMaxDevices;
  if (cached && done[device].load()) return;
  // One-time host queries; relaxed so that a first call under graph capture stays legal.
  c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
  cudaFuncAttributes fa;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&fa, ce_kernel<T, kWarpRow>));
  C10_CUDA_CHECK(cudaFuncSetAttribute(
      ce_kernel<T, kWarpRow>, cudaFuncAttributeMaxDynamicSharedMemorySize,
      max_smem_optin(device) - static_cast<int>(fa.sharedSizeBytes)));
  if (cached) done[device].store(true);
}

template <typename T, bool kWarpRow>
void set_smem_attr(int device, size_t smem) {
  if (smem > kDefaultSmemLimit) raise_smem_limit<T, kWarpRow>(device);
}

// A launch configuration with a cluster dimension: the one place clusters are set up (the
// occupancy probe and the launch use it). Not copyable: cfg.attrs points into the object.
struct ClusterConfig {
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr = {};
  ClusterConfig(unsigned blocks, int threads, size_t smem, cudaStream_t stream, int cluster) {
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = cluster;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
  }
  ClusterConfig(const ClusterConfig&) = delete;
  ClusterConfig& operator=(const ClusterConfig&) = delete;
};

// Can at least one cluster of n blocks with the largest staging we would use be resident?
// (Fails under some MIG/MPS partitions.) Cached per device and cluster size.
template <typename T>
bool cluster_schedulable(int device, int n) {
  static std::atomic<int> cache[kMaxDevices][3];  // n = 2, 4, 8; 0 unknown, 1 yes, 2 no
  const int slot = n == 2 ? 0 : n == 4 ? 1 : 2;
  const bool cached = device < kMaxDevices;
  if (cached && cache[device][slot].load() != 0) return cache[device][slot].load() == 1;
  raise_smem_limit<T, false>(device);
  c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
  const size_t probe_smem = static_cast<size_t>(max_smem_optin(device) - kStaticSmemReserve);
  ClusterConfig cc(static_cast<unsigned>(n), kMaxBlock, probe_smem, nullptr, n);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, ce_kernel<T, false>, &cc.cfg) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the (non-sticky) error; treat as "not schedulable"
    clusters = 0;
  }
  if (cached) cache[device][slot].store(clusters > 0 ? 1 : 2);
  return clusters > 0;
}

// The row layout for C classes of T on `device` (see ce_kernel.cuh).
template <typename T>
Layout choose_layout(int64_t C, bool want_grad, int device) {
  const int64_t chunks = max_row_chunks<T>(C);
  if (chunks <= kWarpRowMaxChunks) {
    return {true, kWarpRowBlock, 1, want_grad, chunks,
            want_grad ? static_cast<size_t>(kWarpRowsPerBlock * chunks * kChunkBytes) : 0};
  }
  if (!want_grad) {  // one pass: nothing to keep
    return {false, block_threads_for(chunks), 1, false, chunks, 0};
  }
  const int64_t optin = max_smem_optin(device) - kStaticSmemReserve;
  const int max_cluster = compute_major(device) >= kMinClusterArch ? kMaxCluster : 1;
  for (int pass = 0; pass < 2; ++pass) {
    // pass 0: slices of <= kCtaStageBytes (3 blocks per SM) plus the one chunk a row that does
    // not start 16-byte aligned needs (so 32k bf16 / 256k bf16 rows still take 1 / 8 blocks);
    // pass 1: up to the opt-in maximum (one block per SM).
    const int64_t limit = pass == 0 ? kCtaStageBytes + kChunkBytes : optin;
    for (int n = 1; n <= max_cluster; n *= 2) {
      const int64_t cta_chunks = (chunks + n - 1) / n;
      const int64_t bytes = cta_chunks * kChunkBytes;
      if (bytes > limit) continue;
      if (n > 1 && !cluster_schedulable<T>(device, n)) break;
      return {false, block_threads_for(cta_chunks), n, true, cta_chunks,
              static_cast<size_t>(bytes)};
    }
  }
  return {false, kMaxBlock, 1, false, chunks, 0};  // streaming fallback
}

template <typename T>
void launch_ce(CeArgs args, int device, bool want_grad) {
  if (args.R == 0 || args.C == 0) return;
  const Layout L = choose_layout<T>(args.C, want_grad, device);
  args.cluster = L.cluster;
  args.stage = L.stage;
  args.cta_chunks = L.cta_chunks;
  args.mailbox = args.target != nullptr ? bad_target_mailbox() : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  if (L.warp_rows) {
    set_smem_attr<T, true>(device, L.smem);
    const int64_t blocks = std::min<int64_t>((args.R + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock,
                                             kMaxGridRows);
    ce_kernel<T, true><<<static_cast<unsigned>(blocks), L.threads, L.smem, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  set_smem_attr<T, false>(device, L.smem);
  const int64_t rows = std::min<int64_t>(args.R, kMaxGridRows);
  if (L.cluster == 1) {
    ce_kernel<T, false><<<static_cast<unsigned>(rows), L.threads, L.smem, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  ClusterConfig cc(static_cast<unsigned>(rows * L.cluster), L.threads, L.smem, stream, L.cluster);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cc.cfg, ce_kernel<T, false>, args));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fusedloss
