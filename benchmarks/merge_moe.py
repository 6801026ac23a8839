"""Merge bench_moe.py results from several runs (one shape per run, as a GPU time
limit forces) into one JSON, one summary table and one plot.

  python benchmarks/merge_moe.py OUT_DIR run1/moe.json run2/moe.json ...

Rows are taken as measured (a later file's row replaces an earlier one for the same
shape, T and implementation); "auto" rows are re-derived from the measured rows of the
implementation that heuristics.moe_implementation picks today (the same program),
so a heuristic changed after a run is reported as it now behaves. Where auto is
"priced" (gemv or a grouped branch chosen per call) it is its own program: its
measured auto row is kept, and none is derived.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_moe  # noqa: E402
import harness  # noqa: E402

from jax_moe import moe as moe_lib  # noqa: E402
from jax_moe.moe import MoEConfig  # noqa: E402
from jax_moe.shapes import SHAPES  # noqa: E402


def main(argv):
  out_dir, paths = argv[0], argv[1:]
  rows, devices, bws = [], set(), []
  for p in paths:
    with open(p) as f:
      d = json.load(f)
    devices.add(d.get("device"))
    bws.append(d.get("read_bandwidth_Bps") or 0)
    new = [r for r in d["rows"] if r.get("T") is not None and (
        r["impl"] != "auto" or str(r.get("resolved", "")).startswith("priced"))]
    keys = {(r["shape"], r["T"], r["impl"]) for r in new}
    rows = [r for r in rows if (r["shape"], r["T"], r["impl"]) not in keys] + new
  for key in sorted({(r["shape"], r["T"]) for r in rows}, key=lambda k: (k[0], k[1])):
    shape = SHAPES[key[0]]
    impl, method = moe_lib.resolve(MoEConfig.from_shape(shape), key[1], shape.hidden,
                                   shape.intermediate)
    pick = {"gemv": "gemv", "priced": f"priced:{method}"}.get(impl, f"grouped:{method}")
    measured_auto = [r for r in rows if (r["shape"], r["T"]) == key and r["impl"] == "auto"]
    rows = [r for r in rows if r not in measured_auto]
    if impl == "priced":  # its own program: only a measured auto row stands for it
      src = next((r for r in measured_auto if r.get("resolved") == pick), None)
    else:
      src = next((r for r in rows if (r["shape"], r["T"]) == key and r["impl"] == pick), None)
    auto = dict(shape=key[0], T=key[1], impl="auto", resolved=pick,
                floor_us=next(r["floor_us"] for r in rows + measured_auto
                              if (r["shape"], r["T"]) == key))
    if src and src.get("us"):
      auto.update(us=src["us"], x_floor=src["us"] / auto["floor_us"])
    else:
      auto["skipped"] = f"resolves to {pick}, not measured"
    rows.append(auto)
  order = {n: i for i, n in enumerate(bench_moe.DEFAULT_SHAPES)}
  rows.sort(key=lambda r: (order.get(r["shape"], 99), r["T"]))
  summary = bench_moe.summarize(rows)
  os.makedirs(out_dir, exist_ok=True)
  harness.write_json(os.path.join(out_dir, "moe.json"),
                     dict(devices=sorted(d for d in devices if d), sources=paths, rows=rows,
                          summary=summary))
  shapes = [n for n in bench_moe.DEFAULT_SHAPES if any(r["shape"] == n for r in rows)]
  print(bench_moe.plot([r for r in rows if r.get("us")], shapes,
                       os.path.join(out_dir, "moe.png"), min(b for b in bws if b),
                       device=" + ".join(sorted(d for d in devices if d)) or None))
  harness.print_table(summary, [("shape", "{}"), ("T", "{}"), ("floor_us", "{:.1f}"),
                                ("auto_us", "{:.1f}"), ("auto_impl", "{}"),
                                ("gemv_us", "{:.1f}"), ("grouped_us", "{:.1f}"),
                                ("xla_us", "{:.1f}"), ("xla_best", "{}"),
                                ("auto_x_floor", "{:.2f}"), ("xla_x_floor", "{:.2f}"),
                                ("speedup", "{:.2f}")])
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
