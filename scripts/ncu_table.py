"""Turns ncu --csv output of scripts/profile_kernels.py into a per-configuration
table: kernel time (second call, summed over the call's kernels), DRAM bytes read,
and the achieved rate against the bytes the configuration must move.

python scripts/ncu_table.py NCU.csv MANIFEST.json OUT.json
"""

from __future__ import annotations

import csv
import json
import sys
from collections import OrderedDict

csv_path, manifest_path, out_path = sys.argv[1:4]
rows = []
with open(csv_path) as f:
  lines = [l for l in f if l.startswith('"')]
kernels = OrderedDict()
for rec in csv.DictReader(lines):
  kid = rec["ID"]
  d = kernels.setdefault(kid, {"name": rec["Kernel Name"]})
  try:
    d[rec["Metric Name"]] = float(rec["Metric Value"].replace(",", ""))
  except ValueError:
    pass
kernels = list(kernels.values())
manifest = json.load(open(manifest_path))
expected = sum(m["kernels"] * m["calls"] for m in manifest)
if expected != len(kernels):
  print(f"warning: {len(kernels)} kernels profiled, manifest expects {expected}")
i = 0
table = []
for m in manifest:
  per_call = []
  for _ in range(m["calls"]):
    ks = kernels[i:i + m["kernels"]]
    i += m["kernels"]
    per_call.append(ks)
  last = per_call[-1]
  t_ns = sum(k.get("gpu__time_duration.sum", 0) for k in last)
  rd = sum(k.get("dram__bytes_read.sum", 0) for k in last)
  parts = " + ".join(f"{k.get('gpu__time_duration.sum', 0) / 1e3:.1f}" for k in last)
  table.append(dict(config=m["name"], us=t_ns / 1e3, parts_us=parts,
                    dram_read_MB=rd / 1e6, min_MB=m["bytes_min"] / 1e6,
                    TBps_min=m["bytes_min"] / max(t_ns, 1) / 1e3))
json.dump(table, open(out_path, "w"), indent=1)
w = max(len(t["config"]) for t in table)
print(f"{'config':<{w}}  {'us':>9}  {'kernels (us)':>22}  {'DRAM rd MB':>10}  {'min MB':>9}  {'TB/s':>5}")
for t in table:
  print(f"{t['config']:<{w}}  {t['us']:9.1f}  {t['parts_us']:>22}  {t['dram_read_MB']:10.1f}  "
        f"{t['min_MB']:9.1f}  {t['TBps_min']:5.2f}")
