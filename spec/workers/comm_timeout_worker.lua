-- spec/workers/comm_timeout_worker.lua: rank 1 skips a collective that the others enter. With a timeout of
-- arg[2] seconds the waiting ranks must abort the whole job, naming the collective, the group and their rank.
-- Usage: fsdp-lua -n N comm_timeout_worker.lua DIR TIMEOUT
local ffi  = require "ffi"
local fsdp = require "fsdp"

ffi.cdef "int usleep(unsigned int usec);"
fsdp.init{timeout = tonumber(arg[2])}
local mesh = fsdp.mesh{dp_shard = -1}   -- a group named 'dp_shard' (its timeout comes from init)
if fsdp.rank() == 1 then
  for _ = 1, 300 do ffi.C.usleep(100000) end   -- 30 s without communicating: the abort must end this early
else
  fsdp.dist.all_reduce(fsdp.ones({4}), {group = mesh.dp_shard})
end
print("rank " .. fsdp.rank() .. " finished")   -- must not be reached
