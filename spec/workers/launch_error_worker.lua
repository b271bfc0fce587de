-- spec/workers/launch_error_worker.lua: an uncaught Lua error on rank 1 while rank 0 waits in a barrier. The job
-- must end at once, non-zero, with rank 1's traceback prefixed "[rank 1]".
-- Usage: fsdp-lua -n N launch_error_worker.lua DIR
local fsdp = require "fsdp"

fsdp.init{}
local function failing_step(r) error("boom on rank " .. r) end
if fsdp.rank() == 1 then failing_step(fsdp.rank()) end
fsdp.barrier()   -- the other ranks wait here until the abort ends them
print("rank " .. fsdp.rank() .. " finished")   -- must not be reached
