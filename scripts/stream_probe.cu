// Standalone probe of the stream kernel (kernels/expert_gemv_stream.cuh), no JAX:
// times back-to-back launches, checks that a repeated call on fuzzed ids (some out
// of range) writes every output and agrees bitwise, and prints a per-block timeline
// of one call (%globaltimer events). For quick device runs; the numbers we report
// come from benchmarks/ (jitted loops through the primitives).
//
//   nvcc -std=c++17 -O3 -arch=sm_90a -Icsrc -DJAX_MOE_STREAM_TRACE \
//        scripts/stream_probe.cu -o build/stream_probe
//   build/stream_probe [shape,...] [T,...] [iterations] [ring]   e.g. gemma4 1,8 200 0
//     T in [1, 64]; ring 0 the library's geometry, 1-10 the variants of kRings
//   build/stream_probe --read-bw                  only the read bandwidth (GB/s)
//   build/stream_probe --self-test                the unit order on the host (no GPU)
//
// Environment: STREAM_PROBE_BW_GBPS skips the 4 GiB read (a fixed floor rate);
// STREAM_PROBE_QUICK=1 skips warm-up and timeline (under compute-sanitizer; 0 or
// unset: the full run). STREAM_PROBE_ZIPF=p (percent, e.g. 100): skewed routings,
// expert e of a random order drawn with weight 1 / (rank + 1)^(p / 100) (k distinct
// per token), so that some experts get more than 8 assignments as in real routings;
// unset or 0: uniform. All are checked before any CUDA call.
// -DJAX_MOE_STREAM_SEG_MAJOR: segment-major unit order on every ring (the kernel's
// RUNS = false; the library runs the wide ring in run order).
// Timing-only builds (wrong results, for diagnosis): -DJAX_MOE_STREAM_EXP_FAKEB (no
// B loads), -DJAX_MOE_STREAM_EXP_NOMMA (no shared-memory reads or mma); both
// together give the "hollow consumer" of RESULTS.md session 5.
//
// Weights: every expert random (bf16, O(1) outputs); each timed call uses the next
// of 32 random routings, so consecutive calls read mostly different experts.
// Floor: distinct experts' weight bytes / read bandwidth of a 4 GiB reduction.
// read_us / read_x: the same routings' distinct experts only read, by the simplest
// good read kernel (read_pieces_kernel), launched the same way: what one launch pays
// for ramp and tail on these bytes, with no work and no dependencies. graph_us /
// graph_x / read_g_us: the same launches (64 at most) captured into a CUDA graph and
// replayed, as XLA's command buffers run our custom calls. lib_us / lib_x: the
// library's launcher with the combine (LaunchExpertGemv, as expert_gemv_combine's FFI
// call runs it: the stream kernel, then combine's kernel), back to back; lib_in_us:
// the same with the combine summed by the stream kernel's last block.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>
#include <algorithm>
#include <cmath>

#include "kernels/expert_gemv.cuh"  // the stream kernel, the library launcher, combine
#include "probe_util.cuh"

using namespace jax_moe;
using namespace jax_moe::cuda;

const char* const kProbeName = "stream_probe";

struct Shape { const char* name; int H, I, E, k; };
static const Shape kShapes[] = {{"gemma4", 2816, 704, 128, 8}, {"qwen3", 2048, 768, 128, 8},
                                {"mixtral", 4096, 14336, 8, 2}, {"deepseek_v3", 7168, 2048, 256, 8}};


// Ring geometry (4th argument): slots per consumer group x columns per slot (the
// kernel's template), and the columns per stage actually used (0: the slot's, -1:
// 1024 where H >= 4096, else 768). 0 is the library's choice (expert_gemv variants
// 5 / 6 as heuristics.gemv_kernel_variant picks them: kStreamColsWide from H = 4096).
struct Ring { int slots, cols, run_cols; };
// Ring 10: the narrow ring in run order (kStreamRunsNarrow's A/B).
static const Ring kRings[] = {{kStreamStages, 0, -1}, {3, 1024, 0}, {4, 768, 0},
                              {2, 768, 0}, {6, 512, 0}, {7, 384, 0}, {3, 768, 0}, {4, 512, 0},
                              {3, 1024, 768}, {3, 1024, -1}, {kStreamStages, kStreamCols, 0}};
constexpr int kNumRings = sizeof(kRings) / sizeof(kRings[0]);
static int g_ring = 0;
static cudaStream_t g_stream = 0;  // the stream launch() uses (graph capture)
static void launch(const GemvStreamArgs& a, int sms) {
  constexpr bool kRN = kStreamRunsNarrow, kRW = kStreamRunsWide;  // the library's unit orders
  switch (g_ring) {
    case 1: case 8: case 9: CK((LaunchGemvStreamNS<bf16, 3, 1024, kRW>(a, sms, g_stream))); break;
    case 2: CK((LaunchGemvStreamNS<bf16, 4, 768, kRN>(a, sms, g_stream))); break;
    case 3: CK((LaunchGemvStreamNS<bf16, 2, 768, kRN>(a, sms, g_stream))); break;
    case 4: CK((LaunchGemvStreamNS<bf16, 6, 512, kRN>(a, sms, g_stream))); break;
    case 5: CK((LaunchGemvStreamNS<bf16, 7, 384, kRN>(a, sms, g_stream))); break;
    case 6: CK((LaunchGemvStreamNS<bf16, 3, 768, kRN>(a, sms, g_stream))); break;
    case 7: CK((LaunchGemvStreamNS<bf16, 4, 512, kRN>(a, sms, g_stream))); break;
    case 10: CK((LaunchGemvStreamNS<bf16, kStreamStages, kStreamCols, true>(a, sms, g_stream))); break;
    default:
      if (a.p2.rows >= 4096)
        CK((LaunchGemvStreamNS<bf16, kStreamStages, kStreamColsWide, kRW>(a, sms, g_stream)));
      else CK((LaunchGemvStreamNS<bf16, kStreamStages, kStreamCols, kRN>(a, sms, g_stream)));
  }
}


// Median us per launch of n launches of body(i) replayed from a CUDA graph on st.
template <typename F>
static float graph_median_us(cudaStream_t st, int n, cudaEvent_t e0, cudaEvent_t e1, F body) {
  const std::vector<float> us = graph_replay_us(st, n, 5, e0, e1, body);
  return us[us.size() / 2];
}

#ifdef JAX_MOE_STREAM_TRACE
static void trace_summary(const char* label, int G, float kernel_us) {
  static unsigned long long tr[1024][kStreamTraceEvents];
  CK(cudaMemcpyFromSymbol(tr, g_stream_trace, sizeof(tr)));
  unsigned long long t0 = ~0ull;
  for (int b = 0; b < G; ++b) t0 = std::min(t0, tr[b][0]);
  static const char* names[kStreamTraceEvents] = {
      "entry", "prologue", "group-0", "group-1", "block-end", "producer",
      "w:p-empty", "w:g0-full", "w:g0-seg", "g0-units", "w:g0-peek", "-"};
  printf("    timeline %s(us from first entry, totals in us; min / median / max over %d "
         "blocks; kernel %.1f)\n", label, G, kernel_us);
  for (int ev : {0, 1, 5, 2, 3, 4, 6, 7, 8, 10, 9}) {
    std::vector<double> v;
    for (int b = 0; b < G; ++b)
      v.push_back(ev == 9 ? double(tr[b][ev]) : ev >= 6 ? tr[b][ev] * 1e-3 : (tr[b][ev] - t0) * 1e-3);
    std::sort(v.begin(), v.end());
    printf("      %-10s %8.2f %8.2f %8.2f\n", names[ev], v[0], v[G / 2], v[G - 1]);
  }
}

#else
static void trace_summary(const char*, int, float) {}
#endif


// One routing of T tokens, k distinct experts of E each, into ids [T * k]; returns
// the assignments per expert. zipf > 0: expert of Zipf rank q (a random order, fresh
// per routing) drawn with weight 1 / (q + 1)^zipf; else uniform.
static std::vector<int> draw_routing(int E, int k, int T, double zipf, std::mt19937& rng,
                                     int32_t* ids) {
  std::vector<int> count(E, 0);
  std::vector<int> order(E);  // Zipf rank -> expert
  for (int e = 0; e < E; ++e) order[e] = e;
  std::shuffle(order.begin(), order.end(), rng);
  for (int t = 0; t < T; ++t) {
    std::vector<int> perm(E);
    if (zipf > 0) {  // k distinct draws
      std::vector<double> wgt(E);
      for (int q = 0; q < E; ++q) wgt[q] = 1.0 / std::pow(q + 1.0, zipf);
      for (int j = 0; j < k; ++j) {
        std::discrete_distribution<int> pick(wgt.begin(), wgt.end());
        const int q = pick(rng);
        perm[j] = order[q];
        wgt[q] = 0.0;
      }
    } else {
      for (int e = 0; e < E; ++e) perm[e] = e;
      std::shuffle(perm.begin(), perm.end(), rng);
    }
    for (int j = 0; j < k; ++j) { ids[t * k + j] = perm[j]; ++count[perm[j]]; }
  }
  return count;
}

// --self-test: on the host, for random expert loads (some of more than 64
// assignments, so runs are capped at 8 segments), segments cut as the kernel's
// prologue cuts them, and each order (segment-major, run order): every unit number
// of a phase decodes to a distinct (segment, tile) in range; segment-major is
// s * tiles + tile; in run order, the segments of a run on the same tile are
// consecutive units, and a run's units are the run's block of numbers. Also the
// routings that STREAM_PROBE_ZIPF asks for (draw_routing).
static int self_test() {
  std::mt19937 rng(99);
  int layouts = 0;
  for (int trial = 0; trial < 600; ++trial) {
    const int E = 1 + int(rng() % 40);
    const int S = trial % 2 ? 16 : 8;  // assignments per segment: narrow / wide ring
    std::vector<int> segs;
    int pos = 0;
    for (int e = 0; e < E; ++e) {
      const int pick = int(rng() % 10);
      const int c = pick < 3 ? 0 : pick < 8 ? 1 + int(rng() % S) : S + 1 + int(rng() % 150);
      for (int j = 0; S * j < c; ++j) segs.push_back(seg_record(e, pos, c, j, S));
      pos += c;
    }
    if (pos > kStreamMaxAssign || segs.empty()) continue;
    const int nseg = int(segs.size());
    for (const int tiles : {1, 2, 3, 7, 16}) {
      const int n = nseg * tiles;  // one phase: n1 = n, no phase-2 units
      for (const bool runs : {false, true}) {
        std::vector<int> seen(size_t(n), 0);
        for (int u = 0; u < n; ++u) {
          const StreamUnit d = decode_unit<true>(u, n, tiles, tiles, segs.data(), runs);
          if (!d.p1 || d.seg < 0 || d.seg >= nseg || d.tile < 0 || d.tile >= tiles) {
            printf("self-test FAILED: unit %d -> seg %d tile %d (%d segments, %d tiles)\n", u,
                   d.seg, d.tile, nseg, tiles);
            return 1;
          }
          if (seen[size_t(d.seg) * tiles + d.tile]++) {
            printf("self-test FAILED: (seg %d, tile %d) decoded twice\n", d.seg, d.tile);
            return 1;
          }
          const int rec = segs[size_t(d.seg)];
          const int first = d.seg - seg_run_pos(rec), c = seg_run_len(rec);
          const int want = runs ? first * tiles + d.tile * c + seg_run_pos(rec)
                                : d.seg * tiles + d.tile;
          const StreamUnit s2 = decode_unit<false>(u, n, tiles, tiles, segs.data(), true);
          if (u != want || (!runs && (s2.seg != d.seg || s2.tile != d.tile))) {
            printf("self-test FAILED: unit %d decodes to seg %d tile %d, order wants %d\n", u,
                   d.seg, d.tile, want);
            return 1;
          }
        }
      }
      ++layouts;
    }
    // Records: runs of at most 8 segments of one expert, places 0 .. len - 1.
    for (int i = 0; i < nseg; ++i) {
      const int rec = segs[size_t(i)], f = i - seg_run_pos(rec);
      if (f < 0 || f + seg_run_len(rec) > nseg || seg_expert(segs[size_t(f)]) != seg_expert(rec) ||
          seg_run_pos(segs[size_t(f)]) != 0 || seg_tokens(rec) < 1 || seg_tokens(rec) > S ||
          seg_start(rec) != seg_start(segs[size_t(f)]) + S * seg_run_pos(rec)) {
        printf("self-test FAILED: segment record %d\n", i);
        return 1;
      }
    }
  }
  // Routings: k distinct experts in range per token; the skewed ones put many more
  // assignments on the busiest expert than uniform ones (Gemma-4 sizes, T = 64).
  int busiest[2] = {0, 0};
  for (int skew = 0; skew < 2; ++skew)
    for (int rep = 0; rep < 8; ++rep) {
      std::vector<int32_t> ids(64 * 8);
      const std::vector<int> count = draw_routing(128, 8, 64, skew ? 1.0 : 0.0, rng, ids.data());
      for (int t = 0; t < 64; ++t)
        for (int j = 0; j < 8; ++j) {
          const int e = ids[size_t(t) * 8 + j];
          bool dup = false;
          for (int i = 0; i < j; ++i) dup |= ids[size_t(t) * 8 + i] == e;
          if (e < 0 || e >= 128 || dup) {
            printf("self-test FAILED: routing token %d slot %d expert %d\n", t, j, e);
            return 1;
          }
        }
      busiest[skew] = std::max(busiest[skew], *std::max_element(count.begin(), count.end()));
    }
  if (busiest[1] < 2 * busiest[0]) {
    printf("self-test FAILED: skewed routing's busiest expert %d vs uniform %d\n", busiest[1],
           busiest[0]);
    return 1;
  }
  printf("self-test ok (%d layouts; busiest expert of 512 assignments: uniform %d, skewed %d)\n",
         layouts, busiest[0], busiest[1]);
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 1 && strcmp(argv[1], "--self-test") == 0) {
    if (argc > 2) {
      fprintf(stderr, "stream_probe: --self-test takes no other arguments\n");
      return 2;
    }
    return self_test();
  }
  const bool read_only = argc > 1 && strcmp(argv[1], "--read-bw") == 0;
  if (read_only && argc > 2) {
    fprintf(stderr, "stream_probe: --read-bw takes no other arguments\n");
    return 2;
  }
  std::vector<std::string> shapes =
      split_list(argc > 1 && !read_only ? argv[1] : "gemma4,qwen3,mixtral,deepseek_v3");
  for (const std::string& sn : shapes) {
    bool known = false;
    for (const Shape& s : kShapes) known |= sn == s.name;
    if (!known) {
      fprintf(stderr, "stream_probe: unknown shape '%s' (gemma4, qwen3, mixtral, deepseek_v3)\n",
              sn.c_str());
      return 2;
    }
  }
  std::vector<int> ts;
  for (const std::string& t : split_list(argc > 2 ? argv[2] : "1,2,8"))
    ts.push_back(parse_int(t, "T (2nd argument)", 1, 64));
  const int iters = argc > 3 ? parse_int(argv[3], "iterations (3rd argument)", 1, 1000000) : 200;
  g_ring = argc > 4 ? parse_int(argv[4], "ring (4th argument)", 0, kNumRings - 1) : 0;
  if (argc > 5) {
    fprintf(stderr, "stream_probe: at most 4 arguments\n");
    return 2;
  }
  const int max_cols = kRings[g_ring].cols;
  const char* bw_env = getenv("STREAM_PROBE_BW_GBPS");  // checked before any CUDA call
  const double bw_fixed =
      (bw_env != nullptr) ? parse_int(bw_env, "STREAM_PROBE_BW_GBPS", 1, 100000) * 1e9 : 0.0;
  // STREAM_PROBE_QUICK=1 (e.g. under compute-sanitizer): no warm-up, no timeline.
  const char* quick_env = getenv("STREAM_PROBE_QUICK");
  const bool quick = quick_env != nullptr && parse_int(quick_env, "STREAM_PROBE_QUICK", 0, 1) == 1;
  const char* zipf_env = getenv("STREAM_PROBE_ZIPF");
  const double zipf =
      zipf_env != nullptr ? parse_int(zipf_env, "STREAM_PROBE_ZIPF", 0, 1000) / 100.0 : 0.0;
  const ProbeDevice pd = probe_device();
  const int sms = pd.sms;
  unsigned int* const sink = pd.sink;
  const cudaEvent_t e0 = pd.e0, e1 = pd.e1;

  // Read bandwidth: 4 GiB streamed once per pass, best of 5 (STREAM_PROBE_BW_GBPS
  // instead, e.g. under compute-sanitizer).
  const double bw = bw_fixed > 0 ? bw_fixed : measure_read_bw(sms, sink, e0, e1);
  if (read_only) {
    printf("%.1f\n", bw * 1e-9);
    return 0;
  }
  printf("read bandwidth %.3f TB/s, %d SMs; ring %d: %d slots x %d columns per consumer group\n",
         bw * 1e-12, sms, g_ring, kRings[g_ring].slots, max_cols);
  if (zipf > 0) printf("skewed routings: Zipf exponent %.2f\n", zipf);
  printf("%-12s %4s %9s %9s %7s %9s %7s %9s %7s %9s %9s %7s %9s %s %s\n", "shape", "T",
         "floor_us", "us", "x", "read_us", "read_x", "graph_us", "graph_x", "read_g_us",
         "lib_us", "lib_x", "lib_in_us", "repeat", "experts/segments");

  std::mt19937 rng(1234);
  for (const std::string& sn : shapes) {
    const Shape* sp = nullptr;
    for (const Shape& s : kShapes) if (sn == s.name) sp = &s;
    const Shape S = *sp;  // names checked above
    const size_t ngu = size_t(S.E) * 2 * S.I * S.H, nd = size_t(S.E) * S.H * S.I;
    bf16 *wgu, *wd, *x, *h, *y, *y2;
    CK(cudaMalloc(&wgu, ngu * 2));
    CK(cudaMalloc(&wd, nd * 2));
    const int Tmax = 64;
    CK(cudaMalloc(&x, size_t(Tmax) * S.H * 2));
    CK(cudaMalloc(&h, size_t(Tmax) * S.k * S.I * 2));
    CK(cudaMalloc(&y, size_t(Tmax) * S.k * S.H * 2));
    CK(cudaMalloc(&y2, size_t(Tmax) * S.k * S.H * 2));
    bf16* cout;  // combine: out [T, H], weights cw [T, k] f32 (random, positive)
    float* cw;
    CK(cudaMalloc(&cout, size_t(Tmax) * S.H * 2));
    CK(cudaMalloc(&cw, size_t(Tmax) * S.k * 4));
    fill_layer_inputs(wgu, ngu, wd, nd, x, size_t(Tmax) * S.H, S.H, S.I, cw, size_t(Tmax) * S.k);
    const double expert_bytes = (3.0 * S.I * S.H) * 2;
    for (const int T : ts) {
      if (T * S.k > kStreamMaxAssign) {
        printf("%-12s %4d skipped: T*k > %d (the kernel falls back there)\n", S.name, T,
               kStreamMaxAssign);
        continue;
      }
      const int R = 32, n = T * S.k;
      std::vector<int32_t> ids(size_t(R) * n);
      double distinct = 0, segments = 0;
      for (int r = 0; r < R; ++r) {
        const std::vector<int> count = draw_routing(S.E, S.k, T, zipf, rng, &ids[size_t(r) * n]);
        for (int c : count) { distinct += c > 0; segments += (c + 7) / 8; }
      }
      distinct /= R;
      segments /= R;
      int32_t* dids;
      CK(cudaMalloc(&dids, ids.size() * 4));
      CK(cudaMemcpy(dids, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
      GemvStreamArgs a;
      a.num_assign = n; a.activation = kSilu;
      a.assign.k = S.k; a.assign.num_shared = 0; a.assign.num_experts = S.E;
      a.p1.src = x; a.p1.w = wgu; a.p1.out = h; a.p1.rows = S.I; a.p1.K = S.H;
      const int rc = kRings[g_ring].run_cols;
      const int run_cols = rc > 0 ? rc : rc < 0 ? (S.H >= 4096 ? 1024 : 768) : max_cols;
      StreamStageGeometry(a.p1.K, &a.p1.stage_cols, &a.p1.stages, run_cols);
      a.p2.src = h; a.p2.w = wd; a.p2.out = y; a.p2.rows = S.H; a.p2.K = S.I;
      StreamStageGeometry(a.p2.K, &a.p2.stage_cols, &a.p2.stages, run_cols);
      // Back to back on the default stream, then replayed from a CUDA graph on st.
      auto run_stream = [&](int i) {
        a.assign.ids = dids + size_t(i % R) * n;
        launch(a, sms);
      };
      const int warm = quick ? 0 : 5, glaunches = std::min(iters, 64);
      const float us = back_to_back_us(warm, iters, e0, e1, run_stream);
      // The library's launcher as expert_gemv_combine's FFI call runs it (the stream
      // kernel of heuristics' ring, then combine's kernel with PDL), back to back.
      ExpertGemvArgs la;
      la.x = x; la.w_gate_up = wgu; la.w_down = wd; la.h = h; la.y = y;
      la.T = T; la.k = S.k; la.H = S.H; la.I = S.I; la.E = S.E; la.activation = kSilu;
      la.variant = S.H >= 4096 ? kGemvStreamWide : kGemvStream;
      la.combine_w = cw; la.combine_out = cout;
      auto run_lib = [&](int i) {
        la.ids = dids + size_t(i % R) * n;
        CK(LaunchExpertGemv<bf16>(la, 0));
      };
      const float lib_us = back_to_back_us(warm, iters, e0, e1, run_lib);
      la.combine_in_kernel = true;  // the sum in the stream kernel's last block
      const float lib_in_us = back_to_back_us(warm, iters, e0, e1, run_lib);
      la.combine_in_kernel = false;
      cudaStream_t st;
      CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
      g_stream = st;
      const float us_graph = graph_median_us(st, glaunches, e0, e1, run_stream);
      g_stream = 0;
      // The same routings' distinct experts read by read_pieces_kernel (3 pieces of
      // I*H per expert), timed the same two ways.
      float read_us = 0, read_graph = 0;
      {
        const DistinctExpertReads reads(ids, R, n, S.E, S.H, S.I, wgu, wd, sms);
        cudaStream_t read_st = 0;
        auto run_read = [&](int i) { reads.launch(i, read_st, sink); };
        read_us = back_to_back_us(warm, iters, e0, e1, run_read);
        read_st = st;
        read_graph = graph_median_us(st, glaunches, e0, e1, run_read);
      }
      CK(cudaStreamDestroy(st));
      // Repeat on a fresh routing with some ids out of range: every output written
      // (poisoned before), both calls bitwise equal.
      std::vector<int32_t> fz(n);
      for (int i = 0; i < n; ++i) fz[i] = (rng() % 9 == 0) ? -1 : int(rng() % S.E);
      CK(cudaMemcpy(dids, fz.data(), n * 4, cudaMemcpyHostToDevice));
      a.assign.ids = dids;
      const size_t ybytes = size_t(n) * S.H * 2;
      CK(cudaMemset(y, 0xff, ybytes));
      a.p2.out = y; launch(a, sms);
      CK(cudaMemset(y2, 0xff, ybytes));
      a.p2.out = y2; launch(a, sms);
      CK(cudaDeviceSynchronize());
      std::vector<uint16_t> hy(ybytes / 2), hy2(ybytes / 2);
      CK(cudaMemcpy(hy.data(), y, ybytes, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(hy2.data(), y2, ybytes, cudaMemcpyDeviceToHost));
      size_t poisoned = 0;
      for (size_t i = 0; i < hy.size(); ++i) poisoned += (hy2[i] == 0xffff);
      // The combine, by combine's kernel and by the last block (out poisoned before
      // each): the same bits.
      const size_t obytes = size_t(T) * S.H * 2;
      std::vector<uint16_t> ho(obytes / 2), ho2(obytes / 2);
      la.ids = dids; la.y = y;
      for (int in_kernel = 0; in_kernel < 2; ++in_kernel) {
        CK(cudaMemset(cout, 0xff, obytes));
        la.combine_in_kernel = in_kernel == 1;
        CK(LaunchExpertGemv<bf16>(la, 0));
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(in_kernel ? ho2.data() : ho.data(), cout, obytes, cudaMemcpyDeviceToHost));
      }
      la.combine_in_kernel = false;
      for (size_t i = 0; i < ho.size(); ++i) poisoned += (ho2[i] == 0xffff);
      const bool same = hy == hy2 && ho == ho2 && poisoned == 0;
      const double floor_us = distinct * expert_bytes / bw * 1e6;
      printf("%-12s %4d %9.1f %9.1f %7.3f %9.1f %7.3f %9.1f %7.3f %9.1f %9.1f %7.3f %9.1f %s "
             "%.1f/%.1f\n",
             S.name, T, floor_us, us, us / floor_us, read_us, read_us / floor_us, us_graph,
             us_graph / floor_us, read_graph, lib_us, lib_us / floor_us, lib_in_us,
             same ? "equal" : "DIFFER", distinct, segments);
      if (quick) { CK(cudaFree(dids)); continue; }
      // Timeline of one call, inputs as in the timed loop.
      CK(cudaMemcpy(dids, ids.data(), size_t(n) * 4, cudaMemcpyHostToDevice));
      a.p2.out = y;
      CK(cudaDeviceSynchronize());
      trace_summary("", sms, back_to_back_us(0, 1, e0, e1, [&](int) { launch(a, sms); }));
      CK(cudaFree(dids));
    }
    CK(cudaFree(wgu)); CK(cudaFree(wd)); CK(cudaFree(x)); CK(cudaFree(h)); CK(cudaFree(y));
    CK(cudaFree(y2)); CK(cudaFree(cout)); CK(cudaFree(cw));
  }
  return 0;
}
