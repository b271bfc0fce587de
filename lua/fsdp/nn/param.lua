-- lua/fsdp/nn/param.lua: creates a module's parameter on the requested device. On `cpu` it is initialised at once
-- from its spec, keyed by its local name (a standalone layer); models build on `meta` and materialise later with
-- full dotted names (Module:materialize).
local core   = require "fsdp.core"
local Tensor = require "fsdp.tensor"
local Module = require "fsdp.nn.module"

local C = core.C
local M = {}

-- Options every layer constructor accepts.
M.OPTS = {device = true, dtype = true, seed = true}

function M.new(mod, name, shape, init, opts)
  local device, dtype = opts.device or "cpu", opts.dtype or "f32"
  local t = Tensor.empty(shape, {dtype = dtype, device = device})
  if device ~= "meta" then
    C.fl_tensor_set_category(t._p, core.mem_categories.param)
    if init[1] == "keep" then t:fill_(0) else Module.init_values(t, init, opts.seed or 0, name, 0) end
  end
  return mod:register_parameter(name, t, init)
end

return M
