#!/usr/bin/env bash
# spec/run.sh: runs every test — busted specs under LuaJIT (spec/**/*_spec.lua) and the C tests
# (spec/c/test_*.c) — and ends with one line "N passed, N failed". Exit status 1 when anything failed.
# Usage: spec/run.sh [pattern]   (pattern filters spec file names)
set -u
cd "$(dirname "$0")/.."
export FSDP_LIB="$PWD/build/libfsdp.so"
export LUA_PATH="$PWD/lua/?.lua;$PWD/lua/?/init.lua;$PWD/spec/support/?.lua;;"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
pattern="${1:-}"
passed=0; failed=0; skipped=0
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

count() {   # counts TAP lines of a file into passed/failed/skipped; a skipped test is not a pass
  local f="$1" p n s
  p=$(grep '^ok ' "$f" | grep -vc '# SKIP' || true)
  s=$(grep '^ok ' "$f" | grep -c '# SKIP' || true)
  n=$(grep -c '^not ok ' "$f" || true)
  passed=$((passed + p)); failed=$((failed + n)); skipped=$((skipped + s))
}

# C tests: small mains printing TAP-style ok / not ok lines.
for src in spec/c/test_*.c; do
  [ -e "$src" ] || continue
  [ -n "$pattern" ] && [[ "$src" != *"$pattern"* ]] && continue
  bin="build/spec/$(basename "${src%.c}")"
  mkdir -p build/spec
  if ! cc -O2 -std=c11 -D_GNU_SOURCE -fopenmp -Iengine -o "$bin" "$src" -Lbuild -lfsdp -Wl,-rpath,"$PWD/build" -lm 2>"$log/cc.txt"; then
    echo "not ok - $src does not compile"; cat "$log/cc.txt"; failed=$((failed + 1)); continue
  fi
  "$bin" > "$log/c.txt" 2>&1; rc=$?
  cat "$log/c.txt"
  count "$log/c.txt"
  if [ $rc -ne 0 ] && ! grep -q '^not ok ' "$log/c.txt"; then echo "not ok - $src exited with $rc"; failed=$((failed + 1)); fi
done

# busted specs, one process per file so that a crash in one file cannot hide the others.
files=$(find spec -path spec/reference/.venv -prune -o -name '*_spec.lua' -print | sort)  # the venv is GBs: skip it
for f in $files; do
  [ -n "$pattern" ] && [[ "$f" != *"$pattern"* ]] && continue
  echo "# $f"
  busted --lua=luajit -o TAP "$f" > "$log/b.txt" 2>&1; rc=$?
  grep -v '^1\.\.' "$log/b.txt"
  count "$log/b.txt"
  if [ $rc -ne 0 ] && ! grep -q '^not ok ' "$log/b.txt"; then echo "not ok - $f: busted exited with $rc"; failed=$((failed + 1)); fi
done

if [ "$skipped" -gt 0 ]; then echo "$passed passed, $failed failed, $skipped skipped"; else echo "$passed passed, $failed failed"; fi
[ "$failed" -eq 0 ]
