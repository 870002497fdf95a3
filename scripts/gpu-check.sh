#!/usr/bin/env bash
# Runs ON the GPU machine, from the repo root: `bash scripts/gpu-check.sh`, with the binaries that
# scripts/gpu-prepare.sh built here carried in .gpu-carry/ (that machine has no cargo). Writes to
# $OUT (default /tmp/gpu-check-out), at most 8 files:
#   summary.txt   device, nvidia-smi, libraries found, pass/fail + exit code + seconds per step
#   kernels.txt   `lookahead kernels`: NVRTC compile of every family for this GPU, registers/spills
#   <test>.log    each test executable's output (--test-threads=1 --nocapture); folded into one
#                 tests.log if there are more than 5 of them
#   bench.json    `lookahead bench --device cuda --baseline python3 --json` (performance kernels on)
#   bench-off.json        the performance-kernel families again with those kernels switched off
#   bench-variants.jsonl  one report per kernel variant named in $VARIANTS, and one of the tuned
#                 pass (LOOKAHEAD_AUTOTUNE=1; see the bench section)
#   tuned.json    the tuned pass's choices: per device, family and shape, the variant chosen and
#                 every variant's trial time (engine/src/cuda/tune.rs)
#   bench.txt     all of them as tables, plus the bench's stderr, the fastest run of each case and
#                 the open issues' targets checked on those fastest runs
# Every step has a timeout inside one overall budget (BUDGET_S, default 330 s, so the whole run
# stays under 6 minutes on an H100); a failing or hanging step is recorded and the next one runs.
# BASELINE (default python3) is the interpreter with torch for the PyTorch baseline; when that
# pass fails, the default pass runs again without it, so the run still measures our kernels.
# BENCH_MIN_TIME, when set, is passed as the bench's --min-time (tests/gpu_check_script.rs runs
# this script on the emulated device with kernels skipped: every step but the numbers).
# Without a GPU the tests print that they skipped and the bench fails cleanly; summary.txt is
# written either way. Exit status: 0 when every step passed, 1 otherwise.
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/gpu-check-out}
CARRY=${CARRY:-.gpu-carry}
BUDGET_S=${BUDGET_S:-330}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
START=$(date +%s)
FAILED=0

say() { echo "$*" | tee -a "$SUMMARY"; }
remaining() { echo $((BUDGET_S - ($(date +%s) - START))); }

# Runs a step under `timeout` (its own limit, capped by what is left of the budget), logs its
# exit status and duration. Usage: step NAME LIMIT_S LOGFILE COMMAND...
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left
    left=$(remaining)
    if [ "$left" -lt 15 ]; then
        say "SKIP  $name (budget spent)"
        FAILED=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    local took=$(($(date +%s) - t0))
    if [ $rc -eq 0 ]; then
        say "PASS  $name (${took}s)"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        say "FAIL  $name: timed out after ${limit}s"
        FAILED=1
    else
        say "FAIL  $name: exit $rc (${took}s)"
        FAILED=1
    fi
}

say "gpu-check on $(hostname) at $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if command -v nvidia-smi > /dev/null; then
    say "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
    nvidia-smi >> "$SUMMARY" 2>&1
else
    say "device: none (nvidia-smi not found)"
fi

if [ ! -x "$CARRY/lookahead" ] || [ ! -d "$CARRY/tests" ]; then
    say "FAIL  $CARRY is missing: run scripts/gpu-prepare.sh here and carry .gpu-carry"
    exit 1
fi

# ---- libraries: NVRTC (kernels), cuBLASLt (GEMMs), cuDNN (convolutions) ----------------------
# The torch venv's wheels first (CUDA 13, matching the driver), then system CUDA installs.
SEARCH=(/opt/torch/.venv /usr/local/cuda /usr/local/cuda-* /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/lib)
find_lib() {
    timeout 60 find "${SEARCH[@]}" -name "$1" 2> /dev/null | grep -v -e builtins -e stub | sort | head -1
}
NVRTC=$(find_lib 'libnvrtc.so*')
CUBLASLT=$(find_lib 'libcublasLt.so*')
CUDNN=$(find_lib 'libcudnn.so*')
say "libnvrtc:   ${NVRTC:-not found}"
say "libcublasLt: ${CUBLASLT:-not found}"
say "libcudnn:   ${CUDNN:-not found}"
[ -n "$NVRTC" ] && export LOOKAHEAD_NVRTC_LIB="$NVRTC"
for lib in "$NVRTC" "$CUBLASLT" "$CUDNN"; do
    [ -n "$lib" ] && LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
# The kernel cache lives outside $OUT (only 8 files come back); the first test to use a family fills it for
# the device's arch, and later tests load the CUBIN instead of compiling again.
export LOOKAHEAD_KERNEL_CACHE=${LOOKAHEAD_KERNEL_CACHE:-/tmp/lookahead-kcache}
export RUST_BACKTRACE=1

# The tests were built in another folder and read kernels/cuda (and fixtures) from there.
MANIFEST=$(cat "$CARRY/manifest_dir" 2> /dev/null || true)
if [ -n "$MANIFEST" ] && [ ! -e "$MANIFEST" ] && [ "$MANIFEST" != "$PWD" ]; then
    mkdir -p "$(dirname "$MANIFEST")" && ln -s "$PWD" "$MANIFEST" && say "linked $MANIFEST -> $PWD (the tests' build folder)"
fi

# ---- kernels: every family compiled for this GPU at once (16 cores), so that the tests and the
# bench below load CUBINs from the cache instead of compiling on first use, one family at a time.
: > "$OUT/kernels.txt"
step "kernels (NVRTC, every family in parallel)" 150 "$OUT/kernels.txt" "$CARRY/lookahead" kernels
grep -a -e 'families in' "$OUT/kernels.txt" | tail -1 | sed 's/^/      /' | tee -a "$SUMMARY"

# ---- tests: the parity suites (each compiles the kernel families it uses, into the cache) -----
names=()
for t in "$CARRY"/tests/*; do
    [ -e "$t" ] || continue
    names+=("$(basename "$t")")
done
for n in "${names[@]}"; do
    limit=100
    log="$OUT/$n.log"
    : > "$log"
    step "test $n" "$limit" "$log" "$CARRY/tests/$n" --test-threads=1 --nocapture
    # libtest's own summary line, and how many tests said they skipped (no GPU, no NVRTC).
    result=$(grep -a '^test result:' "$log" | tail -1)
    skipped=$(grep -ac -e 'skipped: no CUDA device' -e 'skipped: NVRTC not found' "$log")
    say "      $n: ${result:-no test result line}; $skipped skip message(s)"
done

# ---- bench: JSON (with the PyTorch baseline timed in the same run), tables rendered from it ----
# 1. every case as dispatched by default (our performance kernels on), with --profile: each case's
#    GPU time per kernel it launches, to show which kernel of a multi-kernel op to work on;
# 2. the families with performance kernels again with them switched off (library / composed
#    paths: LOOKAHEAD_EXPERIMENTAL_KERNELS=0), for the on/off comparison;
# 3. kernel variants: VARIANTS holds entries "ENV=VALUE|filter" separated by ';' (e.g.
#    "LOOKAHEAD_VARIANT_FLASH_FWD=poly|ext attention"); each runs the bench on its filter with
#    that variable set. All of them land in bench-variants.jsonl, one JSON report per line with
#    its "variant".
BASELINE=${BASELINE-python3}
BENCH=("$CARRY/lookahead" bench --device cuda --json)
[ -n "${BENCH_MIN_TIME:-}" ] && BENCH+=(--min-time "$BENCH_MIN_TIME")
: > "$OUT/bench.txt"
if [ -n "$BASELINE" ]; then
    step "bench --device cuda --baseline $BASELINE --profile" 150 "$OUT/bench.txt" sh -c "$(printf '%q ' "${BENCH[@]}" --baseline "$BASELINE") --profile > '$OUT/bench.json'"
fi
if [ ! -s "$OUT/bench.json" ]; then
    step "bench --device cuda --profile (no baseline)" 120 "$OUT/bench.txt" sh -c "$(printf '%q ' "${BENCH[@]}") --profile > '$OUT/bench.json'"
fi
PERF_FAMILIES="copy,ext attention,ip attention,lora_linear,softmax,layer_norm,group_norm"
step "bench (performance kernels off)" 120 "$OUT/bench.txt" env LOOKAHEAD_EXPERIMENTAL_KERNELS=0 sh -c "$(printf '%q ' "${BENCH[@]}") --filter '$PERF_FAMILIES' > '$OUT/bench-off.json'"
: > "$OUT/bench-variants.jsonl"
# Without VARIANTS in the environment, the list committed in scripts/gpu-variants.txt (one entry a
# line, '#' comments). Variant passes run without the PyTorch baseline (compare with the default
# pass above, same run).
if [ -z "${VARIANTS+x}" ] && [ -f scripts/gpu-variants.txt ]; then
    VARIANTS=$(grep -v -e '^#' -e '^[[:space:]]*$' scripts/gpu-variants.txt | tr '\n' ';')
fi
# Variant passes time each case for 0.25 s (GPU time from >= 3 batches of >= 1 ms either way):
# more variants fit the budget. BENCH_MIN_TIME, when set, applies to them too.
VARIANT_TIME=()
[ -z "${BENCH_MIN_TIME:-}" ] && VARIANT_TIME=(--min-time 0.25)
# One pass labelled $1 on the cases of filter $2 with the environment assignments that follow,
# appended to bench-variants.jsonl.
variant_pass() {
    local label=$1 filter=$2 tmp
    shift 2
    tmp=$(mktemp)
    step "bench $label ($filter)" 60 "$OUT/bench.txt" env "$@" sh -c "$(printf '%q ' "${BENCH[@]}" "${VARIANT_TIME[@]}") --filter '$filter' > '$tmp'"
    [ -s "$tmp" ] && python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r["variant"]=sys.argv[2]; print(json.dumps(r))' "$tmp" "$label" >> "$OUT/bench-variants.jsonl"
    rm -f "$tmp"
}
# First the tuned pass: every tuned family (engine/src/cuda/tune.rs) times its variants on each
# case's own operands and runs the fastest; the choices, with every variant's trial time, come
# back in tuned.json.
variant_pass LOOKAHEAD_AUTOTUNE=1 "ext attention,lora_linear,group_norm" LOOKAHEAD_AUTOTUNE=1 "LOOKAHEAD_TUNE_FILE=$OUT/tuned.json"
[ -s "$OUT/tuned.json" ] && say "      tuned.json: $(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$OUT/tuned.json") choices (to make them the defaults: python3 scripts/merge-tuned.py tuned.json)"
IFS=';' read -r -a variant_list <<< "${VARIANTS:-}"
for v in "${variant_list[@]}"; do
    [ -n "$v" ] || continue
    variant_pass "${v%%|*}" "${v#*|}" "${v%%|*}"
done
python3 - "$OUT/bench.json" "$OUT/bench-off.json" "$OUT/bench-variants.jsonl" "$OUT/tuned.json" >> "$OUT/bench.txt" 2>&1 << 'EOF'
import json, os, sys
reports = []
tuned_path = sys.argv.pop()
for path in sys.argv[1:]:
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        continue
    if path.endswith(".jsonl"):
        reports += [(json.loads(line)["variant"], json.loads(line)) for line in open(path) if line.strip()]
    else:
        reports.append((os.path.basename(path), json.load(open(path))))
ms = lambda s: f"{s * 1e3:.3f}" if s else "-"
pct = lambda v: f"{v * 100:.0f}%" if v else "-"
for label, r in reports:
    print(f"\n{label} -- lookahead bench: {r.get('device')} ({r.get('device_name')}), {r.get('dtype')}, experimental {r.get('experimental_kernels')}, hopper {r.get('hopper_kernels')}")
    print("ms: GPU time (kernels queued behind a stream hold) where measured, else wall; speedup on the same clock as torch")
    print(f"{'case':<42} {'ms':>9} {'wall ms':>9} {'host ms':>9} {'throughput':>15} {'of copy':>7} {'same-size':>9} {'torch ms':>9} {'speedup':>8}")
    for row in r.get("rows", []):
        if row.get("error"):
            print(f"{row['name']:<42} error: {row['error']}")
            continue
        t = row.get("gpu_seconds") or row.get("seconds")
        bt = row.get("baseline_gpu_seconds") or row.get("baseline_seconds")
        sp = row.get("speedup")
        print(f"{row['name']:<42} {ms(t):>9} {ms(row.get('seconds')):>9} {ms(row.get('host_seconds')):>9} {row['throughput'] / 1e9:>9.1f} G{row['unit']:<5} "
              f"{pct(row.get('of_copy')):>7} {pct(row.get('of_same_size_copy')):>9} {ms(bt):>9} {(f'{sp:.2f}x' if sp else '-'):>8}")
        kernels = row.get("kernels") or []
        total = sum(k["ms"] for k in kernels) or 1e-12
        for k in kernels:
            print(f"    {k['name']:<58} {k['ms']:>9.4f} ms {100 * k['ms'] / total:>4.0f}%  x{k['launches']}")
        if row.get("profile_error"):
            print(f"    --profile: {row['profile_error']}")
    for name, d in ((r.get("baseline") or {}).get("details") or {}).items():
        print(f"  torch {name}: {d}")
# The fastest run of each case across the default pass and every variant (what to make the default).
best, default = {}, {}
for label, r in reports:
    for row in r.get("rows", []):
        t = row.get("gpu_seconds") or row.get("seconds")
        if row.get("error") or not t:
            continue
        if label == "bench.json":
            default[row["name"]] = t
        if row["name"] not in best or t < best[row["name"]][0]:
            best[row["name"]] = (t, label, row)
print("\nfastest run of each case (GPU time where measured): the default pass (bench.json), performance kernels off, variants")
print(f"{'case':<42} {'default ms':>10} {'best ms':>9}  best run")
for name, (t, label, _) in best.items():
    d = default.get(name)
    print(f"{name:<42} {ms(d):>10} {ms(t):>9}  {label}{f'  ({d / t:.2f}x)' if d and label != 'bench.json' else ''}")
# The issues' targets (#3 CUDA backend, #7 performance kernels) against the best run of each case:
# memory-bound rows by the copy of the same bytes measured in the same pass, attention by PyTorch's
# best SDPA backend timed in the default pass, LoRA by the cuBLASLt linear rows of this run.
torch = {}
for label, r in reports:
    if label == "bench.json":
        for row in r.get("rows", []):
            bt = row.get("baseline_gpu_seconds") or row.get("baseline_seconds")
            if bt:
                torch[row["name"]] = bt
checks = []
for name, (t, label, row) in best.items():
    same = row.get("of_same_size_copy")
    if name.startswith("group_norm+silu") and " bwd" not in name:
        checks.append(("#7 group norm+SiLU >= 85% of copy", name, t, label, same, 0.85))
        checks.append(("#3 group norm >= 80% of copy", name, t, label, same, 0.80))
    elif name.startswith(("layer_norm", "softmax")):
        checks.append(("#3 softmax / layer norm >= 80% of copy", name, t, label, same, 0.80))
    elif name.startswith("add "):
        checks.append(("#3 elementwise >= 85% of copy", name, t, label, same or row.get("of_copy"), 0.85))
    elif name.startswith("ext attention"):
        checks.append(("#7 attention >= 1.2x PyTorch SDPA best", name, t, label, torch[name] / t if name in torch else None, 1.2))
    elif name.startswith("lora_linear ") and name.endswith(" r0"):
        shape = name.split()[1]
        lin = best.get(f"linear {shape}")
        checks.append(("#7 LoRA base GEMM >= 95% of cuBLAS", name, t, label, lin[0] / t if lin else None, 0.95))
    elif name.startswith("lora_linear ") and " bwd" not in name:
        r0 = best.get(name.rsplit(" ", 1)[0] + " r0")
        checks.append(("#7 LoRA r <= 64 within 5% of the base (value: base / ours)", name, t, label, r0[0] / t if r0 else None, 1 / 1.05))
print("\ntargets of the open issues, on the best run of each case")
print(f"{'target':<58} {'case':<42} {'best ms':>9} {'value':>7} {'need':>6} met  run")
for target, name, t, label, value, need in sorted(checks, key=lambda c: c[0]):
    met = "-" if value is None else ("yes" if value >= need else "no")
    print(f"{target:<58} {name:<42} {ms(t):>9} {(f'{value:.2f}' if value is not None else '-'):>7} {need:>6.2f} {met:<4} {label}")
# The tuned pass's choices: per family and shape, each variant's trial time (ms), fastest first.
if os.path.exists(tuned_path) and os.path.getsize(tuned_path) > 0:
    print("\ntuned pass: the variant chosen per family and shape (trial GPU ms of every variant, fastest first)")
    for key, e in sorted(json.load(open(tuned_path)).items()):
        _, family, shape = (part.strip() for part in key.split("|", 2))
        times = sorted(((v, t) for v, t in e["ms"].items() if isinstance(t, (int, float))), key=lambda vt: vt[1])
        failed = [v for v, t in e["ms"].items() if not isinstance(t, (int, float))]
        print(f"{family.split()[0]:<11} {shape:<62} -> {e['variant']:<18} " + " ".join(f"{v} {t:.4f}" for v, t in times) + (f"  (failed: {', '.join(failed)})" if failed else ""))
EOF

# ---- at most 8 files come back: fold the test logs together if needed --------------------------
rm -f "$OUT"/tuned.json.*.tmp
count=$(find "$OUT" -maxdepth 1 -type f | wc -l)
if [ "$count" -gt 8 ]; then
    for n in "${names[@]}"; do
        { echo "==================== $n ===================="; cat "$OUT/$n.log"; } >> "$OUT/tests.log"
        rm -f "$OUT/$n.log"
    done
    say "(test logs folded into tests.log: at most 8 files come back)"
fi

say "total $(($(date +%s) - START))s; $([ $FAILED -eq 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED')"
exit $FAILED
