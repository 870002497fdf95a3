#!/usr/bin/env python3
"""Merges the kernel-variant choices of a GPU run (the tuned.json scripts/gpu-check.sh brings back)
into kernels/tuned.json, the committed choices the engine runs by default on the devices, kernel
sources and shapes they name (engine/src/cuda/tune.rs). Entries of the run replace entries with
the same key; the rest stay.

Usage: python3 scripts/merge-tuned.py PATH/TO/tuned.json [more tuned.json ...]
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.path.join(ROOT, "kernels", "tuned.json")

if len(sys.argv) < 2:
    sys.exit(__doc__)
with open(TARGET) as f:
    table = json.load(f)
for path in sys.argv[1:]:
    with open(path) as f:
        run = json.load(f)
    if not isinstance(run, dict) or not all(isinstance(e, dict) and isinstance(e.get("variant"), str) for e in run.values()):
        sys.exit(f"{path}: not a table of kernel-variant choices (key -> {{variant, ms}})")
    table.update(run)
    print(f"{path}: {len(run)} choices")
tmp = TARGET + ".tmp"
with open(tmp, "w") as f:
    json.dump(table, f, indent=2, sort_keys=True)
    f.write("\n")
os.replace(tmp, TARGET)
print(f"{TARGET}: {len(table)} choices")
