-- .luacheckrc: luacheck's settings for `make check` (lua/ and examples/ must be clean; spec/ is checked on request).
std = "luajit"
-- The Lua code is written to 140 columns (the C to wider); past that it wraps.
max_line_length = 140
-- Methods keep the `:` signature of the interface they implement (Module:forward, an optimizer's validate and
-- check_state), whether or not their body reads self. Unused explicit arguments are still reported.
self = false
-- Generated from engine/fsdp.h by the Makefile: one long string, not code anyone writes.
exclude_files = {"lua/fsdp/_cdef.lua", "spec/reference/.venv/**"}

files["spec/**/*_spec.lua"] = {std = "+busted"}
