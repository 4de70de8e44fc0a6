#!/usr/bin/env bash
# Downloads exactly the wheels of bench/device_wheels.txt (Python 3.12, manylinux x86-64) into .whl/ for
# bench/device_check.sh to carry to a GPU machine that reaches no registry (the device tool: carry=[".whl"]).
#
#   bash bench/fetch_wheels.sh [DEST]      # DEST defaults to .whl/ in the repository root (ignored by git)
#
# Fails if DEST then holds any other wheel (two versions of one package stop the install there) or if the wheels
# together exceed 16 MiB (the tool carries 64 MiB of working tree in all).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$ROOT/.whl}
PY=${PYTHON:-python3}
LIMIT=$((16 * 1024 * 1024))
mapfile -t PINS < <(grep -v '^\s*#' "$ROOT/bench/device_wheels.txt" | grep -v '^\s*$')
mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${PINS[@]}"
"$PY" - "$DEST" "$LIMIT" "${PINS[@]}" <<'PYEOF'
import sys
from pathlib import Path

dest, limit, pins = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
wanted = {p.split("==")[0].lower().replace("-", "_"): p.split("==")[1] for p in pins}
found = {w.name.split("-")[0].lower(): w for w in dest.glob("*.whl")}
extra = sorted(w.name for name, w in found.items() if name not in wanted or f"-{wanted[name]}-" not in w.name)
missing = sorted(set(wanted) - set(found))
total = sum(w.stat().st_size for w in found.values())
for w in sorted(found.values()):
    print(f"{w.stat().st_size / 2**20:6.2f} MiB  {w.name}")
print(f"{total / 2**20:6.2f} MiB  total ({len(found)} wheels)")
if extra or missing:
    sys.exit(f"error: {dest} must hold exactly bench/device_wheels.txt: extra {extra}, missing {missing}")
if total > limit:
    sys.exit(f"error: the wheels take {total / 2**20:.1f} MiB, above {limit / 2**20:.0f} MiB")
PYEOF
