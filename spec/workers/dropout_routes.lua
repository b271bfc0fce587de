-- spec/workers/dropout_routes.lua: one rank of spec/dist/dropout_routes_spec.lua. Started by
-- `fsdp-lua -n N spec/workers/dropout_routes.lua DIR route=fsdp|ddp kind=gpt2|llama [run_seed=S]`: trains the
-- route's model (spec/support/dropout_routes.lua) and writes the losses, norms and dropout calls; rank 0 saves
-- the final weights (DIR/weights.safetensors).
local fsdp   = require "fsdp"
local D      = require "dist"
local routes = require "dropout_routes"

local opt = {route = "fsdp", kind = "gpt2", run_seed = ""}
for i = 2, #arg do
  local k, v = arg[i]:match("^([%w_]+)=(.*)$")
  assert(k and opt[k] ~= nil, "bad option " .. arg[i])
  opt[k] = v
end
fsdp.init{seed = tonumber(opt.run_seed)}
local r = routes.train(opt.route, opt.kind, 4)
if fsdp.rank() == 0 then fsdp.safetensors.save(arg[1] .. "/weights.safetensors", r.weights) end
D.write(arg[1], fsdp.rank(), {losses = r.losses, norms = r.norms, counter = r.counter})
