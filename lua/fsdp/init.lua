-- lua/fsdp/init.lua: `require "fsdp"` — the public API (DESIGN §11). Submodules load on first use.
local core   = require "fsdp.core"
local Tensor = require "fsdp.tensor"
local basic  = require "fsdp.ops.basic"
local nnops  = require "fsdp.ops.nn"

local C = core.C
local fsdp = {}

fsdp.C = C
fsdp.Tensor = Tensor
fsdp.tensor = Tensor.new
fsdp.empty, fsdp.zeros, fsdp.ones, fsdp.full = Tensor.empty, Tensor.zeros, Tensor.ones, Tensor.full
fsdp.randn, fsdp.rand, fsdp.arange = Tensor.randn, Tensor.rand, Tensor.arange
fsdp.is_tensor = Tensor.is_tensor
-- torch.set_printoptions: precision, threshold, edgeitems, linewidth, sci_mode, profile (lua/fsdp/tensor_str.lua)
fsdp.set_printoptions, fsdp.get_printoptions = Tensor.set_printoptions, Tensor.get_printoptions
fsdp.version = function() return require("ffi").string(C.fl_version()) end

function fsdp.set_num_threads(n) C.fl_set_num_threads(n) end
function fsdp.get_num_threads() return C.fl_get_num_threads() end

local function finish_scope(was, ok, ...)
  C.fl_grad_set_enabled(was)
  if not ok then error((...), 0) end
  return ...
end

-- no_grad(fn, ...) runs fn with autograd off and returns its results; errors restore the mode.
function fsdp.no_grad(fn, ...)
  local was = C.fl_grad_is_enabled()
  C.fl_grad_set_enabled(false)
  return finish_scope(was, pcall(fn, ...))
end

function fsdp.enable_grad(fn, ...)
  local was = C.fl_grad_is_enabled()
  C.fl_grad_set_enabled(true)
  return finish_scope(was, pcall(fn, ...))
end

function fsdp.is_grad_enabled() return C.fl_grad_is_enabled() end

-- The functional namespace: elementwise/shape/matmul ops (fsdp.ops.basic) and nn ops (fsdp.ops.nn).
fsdp.F = {}
for k, v in pairs(basic) do fsdp.F[k] = v end
for k, v in pairs(nnops) do fsdp.F[k] = v end

-- Joining the job, meshes and collectives (fsdp.dist): fsdp.init{seed =, timeout =}, fsdp.world_size(),
-- fsdp.rank(), fsdp.mesh{dp_replicate = R, dp_shard = S}, fsdp.barrier(); the rest is fsdp.dist.*.
local dist = require "fsdp.dist"
fsdp.dist = dist
fsdp.init, fsdp.world_size, fsdp.rank = dist.init, dist.world_size, dist.rank
fsdp.mesh, fsdp.barrier = dist.mesh, dist.barrier

-- fsdp.repl_timeout(seconds): in the REPL (fsdp-lua -n N -i), how long a collective may wait before it fails
-- with the engine's timeout message (default 5 s, or FSDP_REPL_TIMEOUT); returns the value in force.
function fsdp.repl_timeout(seconds) return require("fsdp.repl").timeout(seconds) end

-- Global gradient-norm clipping over a list of parameters (torch.nn.utils.clip_grad_norm_); returns the norm.
-- The squared norm is summed exactly over shards and shard groups, so one process, DDP, FSDP and HSDP give the
-- same bits from the same gradients.
fsdp.clip_grad_norm = require("fsdp.optim").clip_grad_norm

-- Data parallelism (DESIGN §5, lua/fsdp/parallel/): FSDP plans, units, explain, memory; fsdp.ddp is plain DDP.
local function parallel() return require "fsdp.parallel" end
function fsdp.apply_plan(model, plan, opts) return parallel().apply_plan(model, plan, opts) end
function fsdp.fully_shard(module, opts) return parallel().fully_shard(module, opts) end
function fsdp.explain(model, plan, world_size, opts) return parallel().explain(model, plan, world_size, opts) end
-- shards(model): the shard table of a sharded model now; explain(model, plan, W, {optimizer =}) the same table for
-- any W without sharding, plus the memory per rank it implies; memory_stats(): bytes by category, current and peak.
-- All three print as tables (lua/fsdp/parallel/shard_table.lua, memory.lua).
function fsdp.shards(model) return parallel().shards(model) end
function fsdp.memory_stats() return parallel().memory_stats() end
function fsdp.reset_peak_memory() return parallel().reset_peak_memory() end
function fsdp.empty_cache() C.fl_mem_empty_cache() end   -- the caching allocator's free blocks back to the system

local lazy = {
  nn = "fsdp.nn", models = "fsdp.models", optim = "fsdp.optim", data = "fsdp.data",
  safetensors = "fsdp.safetensors", autograd = "fsdp.autograd",
  ddp = "fsdp.parallel.ddp",   -- the function itself: fsdp.ddp(model, {mesh =, bucket_cap_mb =})
  parallel = "fsdp.parallel",
  checkpoint = "fsdp.checkpoint",   -- save / load / wait (training checkpoints), save_pretrained / from_pretrained
}
setmetatable(fsdp, {__index = function(t, k)
  local mod = lazy[k]
  if mod then
    local v = require(mod)
    rawset(t, k, v)
    return v
  end
  return nil
end,
-- the REPL's TAB completion: fsdp.mo<TAB> -> fsdp.models before it is loaded
__completions = function()
  local names = {}
  for k in pairs(lazy) do names[#names + 1] = k end
  return names
end})

return fsdp
