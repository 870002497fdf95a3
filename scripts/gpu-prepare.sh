#!/usr/bin/env bash
# Runs HERE (the build machine), before a device run: the GPU machine has no Rust toolchain, so
# everything scripts/gpu-check.sh runs there is built here as x86-64 release binaries and copied
# with stable names into the git-ignored folder .gpu-carry/:
#   .gpu-carry/lookahead            the CLI (for `lookahead bench --device cuda`)
#   .gpu-carry/tests/<name>         the CUDA parity test executables
#   .gpu-carry/baseline_torch.py    the PyTorch baseline (also embedded in the CLI)
#   .gpu-carry/manifest_dir         the path the tests were built in (they read kernels/cuda there)
# Debug info is stripped (function names stay) so that the folder stays well under the device
# tool's 64 MiB carry limit. Then run on the device (see scripts/gpu-check.sh):
#   run(command="bash scripts/gpu-check.sh", carry=[".gpu-carry"], timeout_s=420)
set -euo pipefail
cd "$(dirname "$0")/.."

CARRY=.gpu-carry
LIMIT_MIB=50

if [ "$(uname -m)" != "x86_64" ]; then
    echo "gpu-prepare: this machine is $(uname -m); the GPU machine needs x86-64 binaries" >&2
    exit 1
fi
if ! git check-ignore -q "$CARRY/x"; then
    echo "gpu-prepare: $CARRY/ is not git-ignored (add /$CARRY/ to .gitignore)" >&2
    exit 1
fi

tests=()
# Every CUDA parity suite (tests/cuda_parity*.rs). Not the compile check (CI runs it, and each
# parity test compiles the families it uses for the device's own arch) nor the emulator tests.
for f in tests/cuda_parity*.rs; do
    tests+=("$(basename "$f" .rs)")
done
test_args=()
for t in "${tests[@]}"; do test_args+=(--test "$t"); done

echo "gpu-prepare: building the CLI and ${#tests[@]} test executables (${tests[*]}) in release"
nice -n 5 cargo build --release -p cli
json=$(nice -n 5 cargo test --release --no-run "${test_args[@]}" --message-format=json)

rm -rf "$CARRY"
mkdir -p "$CARRY/tests"
cp target/release/lookahead "$CARRY/lookahead"
cp benches/baseline_torch.py "$CARRY/baseline_torch.py"
pwd > "$CARRY/manifest_dir"

# One compiler-artifact line per test target; "executable" is the binary to run.
printf '%s\n' "$json" | python3 -c '
import json, sys
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("{"):
        continue
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
    cp "$exe" "$CARRY/tests/$name"
done

for t in "${tests[@]}"; do
    [ -x "$CARRY/tests/$t" ] || { echo "gpu-prepare: no executable for test $t" >&2; exit 1; }
done

# One file at a time: a failed strip only costs size (checked below), not the run.
for f in "$CARRY/lookahead" "$CARRY"/tests/*; do
    strip --strip-debug "$f" || echo "gpu-prepare: warning: could not strip $f" >&2
done
total=$(du -sm "$CARRY" | cut -f1)
ls -l "$CARRY" "$CARRY/tests"
echo "gpu-prepare: $CARRY holds ${total} MiB"
if [ "$total" -gt "$LIMIT_MIB" ]; then
    echo "gpu-prepare: over ${LIMIT_MIB} MiB; the device tool carries at most 64 MiB with the working tree" >&2
    exit 1
fi
echo 'gpu-prepare: ready. Device run: command "bash scripts/gpu-check.sh", carry [".gpu-carry"], timeout_s 420'
