#!/usr/bin/env bash
# spec/run.sh: runs every test — busted specs under LuaJIT (spec/**/*_spec.lua) and the C tests
# (spec/c/test_*.c) — and ends with one line "N passed, N failed". Exit status 1 when anything failed.
# Usage: spec/run.sh [--unit] [pattern]   (pattern filters spec file names; --unit: single-process specs only,
#        i.e. spec/c and spec/*_spec.lua, not spec/dist)
# FSDP_BUILD=<dir> tests the build in <dir> (default build): its libfsdp.so for busted, its fsdp-lua for the specs
# that start the executable (spec/support/dist.lua and spec/cli_spec.lua read the same variable).
# FSDP_SANITIZE=address,undefined: that build was made with `make SANITIZE=...` (make check-asan does both);
# the C tests are compiled with the same flags and busted's luajit preloads libasan, which must come first.
set -u
cd "$(dirname "$0")/.."
unit=0
if [ "${1:-}" = "--unit" ]; then unit=1; shift; fi
export FSDP_BUILD="${FSDP_BUILD:-build}"
export FSDP_LIB="$PWD/$FSDP_BUILD/libfsdp.so"
san="${FSDP_SANITIZE:-}"
san_cflags=""; preload=""
if [ -n "$san" ]; then
  san_cflags="-fsanitize=$san -fno-omit-frame-pointer"
  # The C tests link the runtime themselves; luajit does not, so it is preloaded for busted only.
  case "$san" in *address*) preload="$(cc -print-file-name=libasan.so)";; esac
  # detect_leaks=0: LuaJIT frees its heap only at lua_close, which busted never reaches, and Open MPI keeps its
  # allocations until exit by design, so a leak report would be theirs, not ours. Everything else aborts.
  export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
fi
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
  bin="$FSDP_BUILD/spec/$(basename "${src%.c}")"
  mkdir -p "$FSDP_BUILD/spec"
  # shellcheck disable=SC2086  # san_cflags is a list of flags
  if ! cc -O2 -std=c11 -D_GNU_SOURCE -fopenmp -Wall -Wextra -Werror $san_cflags -Iengine -o "$bin" "$src" \
       -L"$FSDP_BUILD" -lfsdp -Wl,-rpath,"$PWD/$FSDP_BUILD" -lm 2>"$log/cc.txt"; then
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
  [ "$unit" = 1 ] && [[ "$f" == spec/dist/* ]] && continue
  echo "# $f"
  LD_PRELOAD="$preload${LD_PRELOAD:+:$LD_PRELOAD}" busted --lua=luajit -o TAP "$f" > "$log/b.txt" 2>&1; rc=$?
  grep -v '^1\.\.' "$log/b.txt"
  count "$log/b.txt"
  if [ $rc -ne 0 ] && ! grep -q '^not ok ' "$log/b.txt"; then echo "not ok - $f: busted exited with $rc"; failed=$((failed + 1)); fi
done

if [ "$skipped" -gt 0 ]; then echo "$passed passed, $failed failed, $skipped skipped"; else echo "$passed passed, $failed failed"; fi
[ "$failed" -eq 0 ]
