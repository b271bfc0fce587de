-- spec/workers/leave_early_worker.lua: rank 1 leaves the job while the other ranks still run collectives; they
-- must fail within seconds naming rank 1 and the collective they wait in (not after the 600 s timeout).
-- Usage: fsdp-lua -n N leave_early_worker.lua DIR HOW
--   HOW = finish   rank 1's script ends after 2 training-like steps, the others run 3 (uneven step counts)
--         exit0    rank 1 calls os.exit(0) at once, the others all_reduce
--         subgroup rank 1 finishes; ranks 0 and 2 then all_reduce over a group {0, 2} without it (must work),
--                  and then over the world (must fail naming rank 1)
local fsdp = require "fsdp"
local dist = require "fsdp.dist"

fsdp.init{}
local how, rank = arg[2], fsdp.rank()
local t = fsdp.ones({1000})
if how == "finish" then
  for _ = 1, rank == 1 and 2 or 3 do dist.all_reduce(t) end
elseif how == "exit0" then
  if rank == 1 then os.exit(0) end
  dist.all_reduce(t)
elseif how == "subgroup" then
  local g = dist.world():split(rank == 1 and 1 or 0, rank, "pair")   -- collective: rank 1 takes part
  if rank ~= 1 then
    g:all_reduce(t)
    io.stdout:write(("rank %d: subgroup all_reduce gave %g\n"):format(rank, t:get(0)))
    io.stdout:flush()
    dist.all_reduce(t)
  end
end
io.stdout:write(("rank %d done\n"):format(rank))
