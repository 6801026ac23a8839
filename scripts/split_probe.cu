// Standalone probe of expert_gemv's split kernels (kernels/expert_gemv_split.cuh,
// kernel_variant 7), no JAX: does taking away the stream kernel's phase-1 -> phase-2
// dependency bring expert_gemv + combine at T=1 on the narrow shapes (Gemma-4,
// Qwen3; 1.4-1.5x the floor through JAX) towards a plain read of the same bytes
// (1.08-1.11x, RESULTS.md session 12)?
//
//   nvcc -std=c++17 -O3 -arch=sm_90a -Icsrc scripts/split_probe.cu -o build/split_probe
//   build/split_probe [shape,...] [T,...] [iterations]     e.g. gemma4,qwen3 1,2 200
//
// Prints, us per call, launches back to back: the library's launcher with the combine
// (LaunchExpertGemv as expert_gemv_combine's FFI call runs it): lib_us the stream
// kernel then combine's kernel, lib_in_us the sum in the stream kernel's last block
// (the library's choice at T <= 2 on these shapes), lib7_us the split kernels (their
// sum kernel does the combine); s32_k_us the split experts kernel alone; c64_us /
// c64_k_us the same kernels with 64 intermediate columns per block instead of 32;
// g7_us lib7 replayed from a CUDA graph (as XLA's command buffers run it); read_us a
// plain read of the same routings' distinct experts. floor = those experts' bytes /
// the 4 GiB read rate. Checks, on a fresh routing with ids out of range: the split
// outputs against the stream kernel's (max error / max |out|; both round y to bf16
// before the weighted sum, so they differ by the order of the f32 sums only), and
// two runs of each bitwise equal with every output written (poisoned before).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/expert_gemv.cuh"  // LaunchExpertGemv, LaunchGemvSplit
#include "probe_util.cuh"

using namespace jax_moe;
using namespace jax_moe::cuda;

const char* const kProbeName = "split_probe";

int main(int argc, char** argv) {
  const NarrowProbeArgs args = parse_narrow_probe_args(argc, argv, "1,2", 200);
  const int iters = args.iters;
  const ProbeDevice pd = probe_device();
  const int sms = pd.sms;
  unsigned int* const sink = pd.sink;
  const cudaEvent_t e0 = pd.e0, e1 = pd.e1;
  const double bw = measure_read_bw(sms, sink, e0, e1);
  printf("read bandwidth %.3f TB/s, %d SMs\n", bw * 1e-12, sms);
  printf("%-8s %2s %8s %8s %9s %8s %6s %8s %8s %8s %8s %8s %6s %9s %9s %s\n", "shape", "T",
         "floor_us", "lib_us", "lib_in_us", "lib7_us", "lib7_x", "s32_k_us", "c64_us",
         "c64_k_us", "g7_us", "read_us", "read_x", "relerr7", "relerr64", "repeat");
  std::mt19937 rng(1234);
  for (const NarrowShape& S : args.shapes) {
    const int Tmax = kNarrowMaxT, nmax = Tmax * S.k;
    const size_t part_bytes = size_t(nmax) * (S.I / 32) * S.H * 4;  // the most (C = 32)
    const NarrowLayer L(S);
    bf16 *y = L.y, *out_lib, *out_split;
    float* h;  // the stream kernel's intermediate, or the split kernels' partials
    CK(cudaMalloc(&h, part_bytes));
    CK(cudaMalloc(&out_lib, size_t(Tmax) * S.H * 2));
    CK(cudaMalloc(&out_split, size_t(Tmax) * S.H * 2));
    for (const int T : args.ts) {
      const int R = 32, n = T * S.k;
      const NarrowRoutings rt(R, T, S, rng);
      ExpertGemvArgs la;
      set_layer_args(la, S, L, T);
      la.h = h; la.y = y; la.combine_out = out_lib;
      auto lib_with = [&](int variant, bool in_kernel, cudaStream_t st) {
        return [&, variant, in_kernel, st](int i) {
          la.ids = rt.d + size_t(i % R) * n;
          la.variant = variant;
          la.combine_in_kernel = in_kernel;
          CK(LaunchExpertGemv<bf16>(la, st));
        };
      };
      const float lib_us = back_to_back_us(5, iters, e0, e1, lib_with(kGemvStream, false, 0));
      const float lib_in_us = back_to_back_us(5, iters, e0, e1, lib_with(kGemvStream, true, 0));
      const float lib7_us = back_to_back_us(5, iters, e0, e1, lib_with(kGemvSplit, false, 0));
      GemvSplitArgs sa;
      set_layer_args(sa, S, L, T);
      sa.part = h; sa.y = y; sa.combine_out = out_split;
      auto split_with = [&](int C, bool sum) {
        return [&, C, sum](int i) {
          sa.ids = rt.d + size_t(i % R) * n;
          const cudaError_t err =
              C == 64 ? LaunchGemvSplit<bf16, 64>(sa, 0, sum) : LaunchGemvSplit<bf16, 32>(sa, 0, sum);
          CK(err);
        };
      };
      const float s32_k = back_to_back_us(5, iters, e0, e1, split_with(32, false));
      const float c64_us = back_to_back_us(5, iters, e0, e1, split_with(64, true));
      const float c64_k = back_to_back_us(5, iters, e0, e1, split_with(64, false));
      cudaStream_t st;
      CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
      const std::vector<float> g7 =
          graph_replay_us(st, std::min(iters, 64), 5, e0, e1, lib_with(kGemvSplit, false, st));
      CK(cudaStreamDestroy(st));
      // Plain read of the same routings' distinct experts.
      const DistinctExpertReads reads(rt.ids, R, n, S.E, S.H, S.I, L.wgu, L.wd, sms);
      const float read_us =
          back_to_back_us(5, iters, e0, e1, [&](int i) { reads.launch(i, 0, sink); });
      // Correctness on a fresh routing with some ids out of range.
      std::vector<int32_t> fz(n);
      for (int i = 0; i < n; ++i) fz[i] = (rng() % 9 == 0) ? -1 : int(rng() % S.E);
      CK(cudaMemcpy(rt.d, fz.data(), n * 4, cudaMemcpyHostToDevice));
      const size_t on = size_t(T) * S.H;
      std::vector<uint16_t> ref(on), o1(on), o2(on);
      CK(cudaMemset(out_lib, 0xff, on * 2));
      lib_with(kGemvStream, false, 0)(0);
      CK(cudaDeviceSynchronize());
      CK(cudaMemcpy(ref.data(), out_lib, on * 2, cudaMemcpyDeviceToHost));
      auto bf = [](uint16_t b) { uint32_t u = uint32_t(b) << 16; float f; memcpy(&f, &u, 4); return f; };
      double relerr[2] = {0, 0};
      bool same = true;
      for (int ci = 0; ci < 2; ++ci) {  // the library's variant 7 (C = 32); C = 64
        for (int rep = 0; rep < 2; ++rep) {
          bf16* dst = ci == 0 ? out_lib : out_split;
          CK(cudaMemset(dst, 0xff, on * 2));
          CK(cudaMemset(h, 0xff, part_bytes));
          if (ci == 0) lib_with(kGemvSplit, false, 0)(0);
          else split_with(64, true)(0);
          CK(cudaDeviceSynchronize());
          CK(cudaMemcpy(rep ? o2.data() : o1.data(), dst, on * 2, cudaMemcpyDeviceToHost));
        }
        same &= o1 == o2;
        double num = 0, den = 0;
        for (size_t i = 0; i < on; ++i) {
          same &= o1[i] != 0xffff;
          num = std::max(num, std::fabs(double(bf(o1[i])) - bf(ref[i])));
          den = std::max(den, double(std::fabs(bf(ref[i]))));
        }
        relerr[ci] = num / std::max(den, 1e-30);
      }
      const double floor_us = rt.distinct * L.expert_bytes / bw * 1e6;
      printf("%-8s %2d %8.1f %8.1f %9.1f %8.1f %6.3f %8.1f %8.1f %8.1f %8.1f %8.1f %6.3f %9.2e "
             "%9.2e %s\n",
             S.name, T, floor_us, lib_us, lib_in_us, lib7_us, lib7_us / floor_us, s32_k, c64_us,
             c64_k, g7[g7.size() / 2], read_us, read_us / floor_us, relerr[0], relerr[1],
             same ? "equal" : "DIFFER");
    }
    CK(cudaFree(h)); CK(cudaFree(out_lib)); CK(cudaFree(out_split));
  }
  return 0;
}
