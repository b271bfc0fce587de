-- spec/workers/launch_exit_worker.lua: os.exit(arg[2]) on rank 1 (every rank with arg[3] == "all"), the others
-- wait in a barrier. The job's exit status must be that code, at once.
-- Usage: fsdp-lua -n N launch_exit_worker.lua DIR CODE [all]
local fsdp = require "fsdp"

fsdp.init{}
local code = tonumber(arg[2])
print("rank " .. fsdp.rank() .. " up")
if arg[3] == "all" or fsdp.rank() == 1 then os.exit(code) end
fsdp.barrier()
print("rank " .. fsdp.rank() .. " finished")
