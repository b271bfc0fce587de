-- lua/fsdp/nn/module_list.lua: an ordered list of modules named "0", "1", ... (HF's `layers.{i}`); list[i] is the
-- i-th (1-based) for Lua loops.
local Module = require "fsdp.nn.module"

local ModuleList = Module.class("ModuleList")
ModuleList.fold_repeats = true   -- prints runs of identical children once, "(0-31): 32 x Layer(...)", as PyTorch

function ModuleList.new(mods)
  local self = Module.init(setmetatable({}, ModuleList))
  self.n = 0
  for _, m in ipairs(mods or {}) do self:append(m) end
  return self
end

function ModuleList:append(m)
  self:register_module(tostring(self.n), m)
  self.n = self.n + 1
  rawset(self, self.n, m)
  return self
end

function ModuleList:forward()
  error("ModuleList: has no forward; iterate over its modules", 2)
end

return ModuleList
