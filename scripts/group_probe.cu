// Standalone probe of expert_gemv's group kernel (kernels/expert_gemv_group.cuh,
// kernel_variant 8), no JAX: G blocks per assignment, one per SM, each reading the
// same bytes in whole rows, h shared through the scratch (L2). Does it bring the
// experts at T=1 on the narrow shapes (Gemma-4, Qwen3) towards a plain read of the
// same bytes (1.08-1.12x the floor; the stream kernel 1.4-1.5x, RESULTS.md s21)?
//
//   nvcc -std=c++17 -O3 -arch=sm_90a -Icsrc scripts/group_probe.cu -o build/group_probe
//   build/group_probe [shape,...] [T,...] [iterations]     e.g. gemma4,qwen3 1,2 200
//
// Prints, us per call, launches back to back over 32 routings (weights far larger
// than L2): lib_us the stream kernel then combine's kernel; lib_in_us the sum in the
// stream kernel's last block (the library's choice at T <= 2 on these shapes);
// grp_us the group kernel then combine's kernel; grp_in_us the group kernel with the
// sum in the last block of each row range (the library's variant 8 with the combine);
// grp_k_us the group kernel alone; g8_k_us / g12_k_us the same with 8 / 12 blocks per
// assignment instead of GroupBlocks' choice (G, printed); then the kernel alone with
// its options (kGroupOpt*, not in the library): early_k_us the first row pair's loads
// before x is staged (E), pipe_k_us phase 1 in half rows (P), pf_k_us the w_down rows
// prefetched into L2 with the gate/up loads evict-first (F), ep_k_us E+P, ef_k_us
// E+F, epf_k_us E+P+F; read_us a plain read of the same routings' distinct experts;
// floor = those experts' bytes / the 4 GiB read rate. Checks, on a fresh routing
// with ids out of range: the group kernel's y against the stream kernel's (max error
// / max |y|; both round h to bf16, so they differ by the order of the f32 sums),
// dropped ids' rows exactly zero, and two runs (and a run with G = 8, and one with
// each option set) bitwise equal with every output written (poisoned before); the
// fused sum bitwise equal to combine's kernel on the same y.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/expert_gemv.cuh"          // LaunchExpertGemv
#include "kernels/expert_gemv_group.cuh"    // LaunchGemvGroup, GroupBlocks
#include "probe_util.cuh"

using namespace jax_moe;
using namespace jax_moe::cuda;

const char* const kProbeName = "group_probe";

// The kernel's option sets timed (kGroupOpt* bits) and their columns.
struct Opt {
  int bits;
  const char* name;
};
const Opt kOpts[] = {{kGroupOptEarly, "early_k_us"},
                     {kGroupOptPipe, "pipe_k_us"},
                     {kGroupOptPrefetchDown, "pf_k_us"},
                     {kGroupOptEarly | kGroupOptPipe, "ep_k_us"},
                     {kGroupOptEarly | kGroupOptPrefetchDown, "ef_k_us"},
                     {kGroupOptEarly | kGroupOptPipe | kGroupOptPrefetchDown, "epf_k_us"}};
constexpr int kNumOpts = sizeof(kOpts) / sizeof(kOpts[0]);

// LaunchGemvGroup with the option bits known at run time.
cudaError_t launch_group_opt(const GemvGroupArgs& a, int bits) {
  switch (bits) {
    case 0: return LaunchGemvGroup<bf16, 0>(a, 0);
    case 1: return LaunchGemvGroup<bf16, 1>(a, 0);
    case 2: return LaunchGemvGroup<bf16, 2>(a, 0);
    case 3: return LaunchGemvGroup<bf16, 3>(a, 0);
    case 4: return LaunchGemvGroup<bf16, 4>(a, 0);
    case 5: return LaunchGemvGroup<bf16, 5>(a, 0);
    case 6: return LaunchGemvGroup<bf16, 6>(a, 0);
    case 7: return LaunchGemvGroup<bf16, 7>(a, 0);
    default: return cudaErrorInvalidValue;
  }
}

int main(int argc, char** argv) {
  const NarrowProbeArgs args = parse_narrow_probe_args(argc, argv, "1,2", 200);
  const int iters = args.iters;
  const ProbeDevice pd = probe_device();
  const double bw = measure_read_bw(pd.sms, pd.sink, pd.e0, pd.e1);
  printf("read bandwidth %.3f TB/s, %d SMs\n", bw * 1e-12, pd.sms);
  printf("%-8s %2s %8s %8s %9s %8s %9s %7s %8s %3s %8s %8s", "shape", "T", "floor_us",
         "lib_us", "lib_in_us", "grp_us", "grp_in_us", "grp_in_x", "grp_k_us", "G", "g8_k_us",
         "g12_k_us");
  for (const Opt& o : kOpts) printf(" %9s", o.name);
  printf(" %8s %6s %9s %6s %6s %s\n", "read_us", "read_x", "relerr", "zeros", "repeat", "fused");
  std::mt19937 rng(1234);
  for (const NarrowShape& S : args.shapes) {
    const int Tmax = kNarrowMaxT, nmax = Tmax * S.k;
    const NarrowLayer L(S);
    bf16 *y = L.y, *h, *y_ref, *out;
    CK(cudaMalloc(&h, size_t(nmax) * S.I * 2));
    CK(cudaMalloc(&y_ref, size_t(nmax) * S.H * 2));
    CK(cudaMalloc(&out, size_t(Tmax) * S.H * 2));
    for (const int T : args.ts) {
      const int R = 32, n = T * S.k;
      const NarrowRoutings rt(R, T, S, rng);
      ExpertGemvArgs la;
      set_layer_args(la, S, L, T);
      la.h = h; la.y = y_ref; la.combine_out = out;
      auto lib_with = [&](bool in_kernel) {
        return [&, in_kernel](int i) {
          la.ids = rt.d + size_t(i % R) * n;
          la.variant = kGemvStream;
          la.combine_in_kernel = in_kernel;
          CK(LaunchExpertGemv<bf16>(la, 0));
        };
      };
      GemvGroupArgs ca;
      set_layer_args(ca, S, L, T);
      ca.h = h; ca.y = y;
      CombineArgs cc;
      cc.y = y; cc.weights = L.cw; cc.out = out; cc.T = T; cc.k = S.k; cc.H = S.H;
      const int G = GroupBlocks(T, S.k, pd.sms);
      // combine: 0 none, 1 combine's kernel after, 2 fused (the last block of a row range);
      // opt: kGroupOpt* bits.
      auto group_with = [&](int g, int combine, int opt = kGroupLibraryOptions) {
        return [&, g, combine, opt](int i) {
          ca.ids = rt.d + size_t(i % R) * n;
          ca.G = g;
          ca.combine_w = combine == 2 ? L.cw : nullptr;
          ca.combine_out = combine == 2 ? out : nullptr;
          CK(launch_group_opt(ca, opt));
          if (combine == 1) CK((LaunchCombine<bf16, float, bf16>(cc, 0)));
        };
      };
      const float lib_us = back_to_back_us(5, iters, pd.e0, pd.e1, lib_with(false));
      const float lib_in_us = back_to_back_us(5, iters, pd.e0, pd.e1, lib_with(true));
      const float grp_us = back_to_back_us(5, iters, pd.e0, pd.e1, group_with(G, 1));
      const float grp_in_us = back_to_back_us(5, iters, pd.e0, pd.e1, group_with(G, 2));
      const float grp_k = back_to_back_us(5, iters, pd.e0, pd.e1, group_with(G, 0));
      const float g8_k = back_to_back_us(5, iters, pd.e0, pd.e1, group_with(8, 0));
      const float g12_k = back_to_back_us(5, iters, pd.e0, pd.e1, group_with(12, 0));
      float opt_k[kNumOpts];
      for (int o = 0; o < kNumOpts; ++o)
        opt_k[o] = back_to_back_us(5, iters, pd.e0, pd.e1, group_with(G, 0, kOpts[o].bits));
      const DistinctExpertReads reads(rt.ids, R, n, S.E, S.H, S.I, L.wgu, L.wd, pd.sms);
      const float read_us =
          back_to_back_us(5, iters, pd.e0, pd.e1, [&](int i) { reads.launch(i, 0, pd.sink); });
      // Correctness on a fresh routing with some ids out of range.
      std::vector<int32_t> fz(n);
      for (int i = 0; i < n; ++i) fz[i] = (rng() % 9 == 0) ? (rng() % 2 ? -1 : S.E) : int(rng() % S.E);
      CK(cudaMemcpy(rt.d, fz.data(), n * 4, cudaMemcpyHostToDevice));
      const size_t yn = size_t(n) * S.H;
      constexpr int kRuns = 3 + kNumOpts;
      std::vector<uint16_t> ref(yn), o[kRuns];
      CK(cudaMemset(y_ref, 0xff, yn * 2));
      lib_with(false)(0);
      CK(cudaDeviceSynchronize());
      CK(cudaMemcpy(ref.data(), y_ref, yn * 2, cudaMemcpyDeviceToHost));
      for (int rep = 0; rep < kRuns; ++rep) {  // G, G, 8, then G with each option set
        o[rep].resize(yn);
        CK(cudaMemset(y, 0xff, yn * 2));
        group_with(rep == 2 ? 8 : G, 0, rep < 3 ? kGroupLibraryOptions : kOpts[rep - 3].bits)(0);
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(o[rep].data(), y, yn * 2, cudaMemcpyDeviceToHost));
      }
      // The fused combine against combine's kernel on the same y: the same bits.
      const size_t on = size_t(T) * S.H;
      std::vector<uint16_t> o_sep(on), o_in(on);
      for (int mode = 1; mode <= 2; ++mode) {
        CK(cudaMemset(out, 0xff, on * 2));
        group_with(G, mode)(0);
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(mode == 1 ? o_sep.data() : o_in.data(), out, on * 2, cudaMemcpyDeviceToHost));
      }
      bool fused_same = o_sep == o_in;
      for (uint16_t v : o_in) fused_same &= v != 0xffff;
      auto bf = [](uint16_t b) { uint32_t u = uint32_t(b) << 16; float f; memcpy(&f, &u, 4); return f; };
      bool same = true, zeros = true;
      for (int rep = 1; rep < kRuns; ++rep) same &= o[rep] == o[0];
      double num = 0, den = 0;
      for (int rep = 0; rep < kRuns; ++rep)
        for (size_t i = 0; i < yn; ++i) {
          const bool dropped = fz[i / S.H] < 0 || fz[i / S.H] >= S.E;
          same &= o[rep][i] != 0xffff;
          if (dropped) { zeros &= o[rep][i] == 0; continue; }
          num = std::max(num, std::fabs(double(bf(o[rep][i])) - bf(ref[i])));
          den = std::max(den, double(std::fabs(bf(ref[i]))));
        }
      const double floor_us = rt.distinct * L.expert_bytes / bw * 1e6;
      printf("%-8s %2d %8.1f %8.1f %9.1f %8.1f %9.1f %8.3f %8.1f %3d %8.1f %8.1f", S.name, T,
             floor_us, lib_us, lib_in_us, grp_us, grp_in_us, grp_in_us / floor_us, grp_k, G, g8_k,
             g12_k);
      for (int o2 = 0; o2 < kNumOpts; ++o2) printf(" %9.1f", opt_k[o2]);
      printf(" %8.1f %6.3f %9.2e %6s %6s %s\n", read_us, read_us / floor_us,
             num / std::max(den, 1e-30), zeros ? "zero" : "NONZERO", same ? "equal" : "DIFFER",
             fused_same ? "equal" : "DIFFER");
    }
    CK(cudaFree(h)); CK(cudaFree(y_ref)); CK(cudaFree(out));
  }
  return 0;
}
