-- lua/fsdp/optim.lua: optimizers (AdamW, SGD) over param groups, their state dicts, the warmup + cosine
-- schedule and global grad-norm clipping. The per-parameter math is one fused C loop (engine/ops/optim.c) that
-- reproduces torch.optim's f32 operations; sharding (FSDP) only changes which tensors are passed in.
local ffi    = require "ffi"
local core   = require "fsdp.core"
local Tensor = require "fsdp.tensor"
local basic  = require "fsdp.ops.basic"   -- also installs the tensor methods used here

local C, ptr, is_tensor = core.C, Tensor.ptr, Tensor.is_tensor
local MEM_OPTIM = core.mem_categories.optim

local M = {}

-- ---- param groups ----

-- Accepts a list of tensors or a list of groups ({params = {...}, <hyper-parameter> = ...}) and returns
-- groups with every hyper-parameter filled from `defaults`. Unknown group keys are errors.
local function make_groups(what, params, defaults, valid)
  if type(params) ~= "table" then
    core.raise(("%s: expected a list of parameters or of param groups, got %s"):format(what, type(params)))
  end
  local raw
  if is_tensor(params[1]) then raw = {{params = params}}        -- a list of tensors
  elseif params.params ~= nil then raw = {params}               -- a single group
  else raw = params end                                         -- a list of groups
  if #raw == 0 then core.raise(what .. ": got an empty parameter list") end
  local groups, seen, count = {}, {}, 0
  for gi, g in ipairs(raw) do
    if type(g) ~= "table" or type(g.params) ~= "table" then
      core.raise(("%s: param group %d must be a table with a list `params`"):format(what, gi))
    end
    local group = {params = {}}
    for k, v in pairs(g) do
      if k ~= "params" then
        if not valid[k] then
          local names = {}
          for n in pairs(valid) do names[#names + 1] = n end
          table.sort(names)
          core.raise(("%s: param group %d has unknown option '%s' (valid: params, %s)")
                :format(what, gi, tostring(k), table.concat(names, ", ")))
        end
        group[k] = v
      end
    end
    for k, v in pairs(defaults) do if group[k] == nil then group[k] = v end end
    for pi, p in ipairs(g.params) do
      if not is_tensor(p) then
        core.raise(("%s: param group %d entry %d is %s, expected a tensor"):format(what, gi, pi, type(p)))
      end
      if seen[p] then core.raise(("%s: a parameter appears twice (group %d entry %d)"):format(what, gi, pi)) end
      seen[p] = true
      group.params[pi] = p
      count = count + 1
    end
    groups[gi] = group
  end
  if count == 0 then core.raise(what .. ": got an empty parameter list") end
  return groups
end

-- Splits a model's parameters into {decayed, not decayed} groups. By default 1-D parameters (biases, norm
-- weights) get no weight decay; opts.no_decay(name, p) -> bool overrides that. Empty groups are left out.
function M.param_groups(model, opts)
  opts = core.check_opts("param_groups", opts, {weight_decay = true, no_decay = true}, 2)
  local wd = opts.weight_decay or 0.01
  local no_decay = opts.no_decay or function(_, p) return p:dim() <= 1 end
  local named = model:named_parameters()
  local decay, rest = {}, {}
  local function add(name, p)
    if no_decay(name, p) then rest[#rest + 1] = p else decay[#decay + 1] = p end
  end
  if type(named) == "function" then   -- fsdp.nn.Module: an iterator of (name, tensor)
    for name, p in named do add(name, p) end
  elseif #named > 0 then   -- an ordered list of {name, tensor} pairs
    for _, np in ipairs(named) do add(np[1], np[2]) end
  else                 -- a name -> tensor map: sorted for a stable order
    local names = {}
    for name in pairs(named) do names[#names + 1] = name end
    table.sort(names)
    for _, name in ipairs(names) do add(name, named[name]) end
  end
  local groups = {}
  if #decay > 0 then groups[#groups + 1] = {params = decay, weight_decay = wd} end
  if #rest > 0 then groups[#groups + 1] = {params = rest, weight_decay = 0} end
  return groups
end

-- ---- the optimizer base ----

local Optimizer = {}
Optimizer.__index = Optimizer

local function new_optimizer(cls, what, params, opts, defaults)
  local valid = {}
  for k in pairs(defaults) do valid[k] = true end
  opts = core.check_opts(what, opts, valid, 3)
  local d = {}
  for k, v in pairs(defaults) do d[k] = v end
  for k, v in pairs(opts) do d[k] = v end
  local self = setmetatable({what = what, defaults = d, state = {}}, cls)
  self.param_groups = make_groups(what, params, d, valid)
  for gi, g in ipairs(self.param_groups) do cls.validate(self, g, gi) end
  return self
end

-- Calls fn(id, p, group) for every parameter; ids are 0-based over all groups, as torch's state_dict.
function Optimizer:each_param(fn)
  local id = 0
  for _, g in ipairs(self.param_groups) do
    for _, p in ipairs(g.params) do
      fn(id, p, g)
      id = id + 1
    end
  end
end

-- Sets .grad = nil on every parameter (torch's set_to_none=True).
function Optimizer:zero_grad()
  self:each_param(function(_, p) p.grad = nil end)
end

function Optimizer:set_lr(lr)
  if type(lr) ~= "number" or lr < 0 then error(("%s: set_lr expects a number >= 0, got %s"):format(self.what, tostring(lr)), 2) end
  for _, g in ipairs(self.param_groups) do g.lr = lr end
end

function Optimizer:get_lr() return self.param_groups[1].lr end

local function state_zeros(p)
  local t = Tensor.zeros(p:shape(), {dtype = p.dtype})
  C.fl_tensor_set_category(t._p, MEM_OPTIM)
  return t
end

-- Grads from autograd are contiguous; a user-set strided grad is made contiguous for the fused loop.
local function grad_of(p)
  local g = p.grad
  if g == nil then return nil end
  if not g:is_contiguous() then g = g:contiguous() end
  return g
end

-- {state = {[id] = {step = n, <name> = tensor, ...}}, param_groups = {{<hyper-parameters>, params = {ids}}}}.
-- The tensors are the live state (as torch's state_dict); load_state_dict copies.
function Optimizer:state_dict()
  local groups, state = {}, {}
  local id = 0
  for gi, g in ipairs(self.param_groups) do
    local ids, copy = {}, {}
    for k, v in pairs(g) do if k ~= "params" then copy[k] = v end end
    for _ = 1, #g.params do ids[#ids + 1] = id; id = id + 1 end
    copy.params = ids
    groups[gi] = copy
  end
  for k, st in pairs(self.state) do
    local s = {}
    for name, v in pairs(st) do s[name] = v end
    state[k] = s
  end
  return {state = state, param_groups = groups}
end

function Optimizer:load_state_dict(sd)
  local what = self.what .. ".load_state_dict"
  if type(sd) ~= "table" or type(sd.param_groups) ~= "table" or type(sd.state) ~= "table" then
    error(what .. ": expected a table with `state` and `param_groups`", 2)
  end
  if #sd.param_groups ~= #self.param_groups then
    error(("%s: the state dict has %d param groups, the optimizer %d"):format(what, #sd.param_groups, #self.param_groups), 2)
  end
  local params = {}
  self:each_param(function(id, p) params[id] = p end)
  for gi, g in ipairs(sd.param_groups) do
    local mine = self.param_groups[gi]
    if type(g.params) ~= "table" or #g.params ~= #mine.params then
      error(("%s: param group %d has %d parameters in the state dict, %d in the optimizer")
            :format(what, gi, type(g.params) == "table" and #g.params or 0, #mine.params), 2)
    end
  end
  local new_state = {}
  for id, st in pairs(sd.state) do
    local p = params[id]
    if p == nil then error(("%s: state for parameter id %s, which the optimizer does not have"):format(what, tostring(id)), 2) end
    local s = {}
    for name, v in pairs(st) do
      if is_tensor(v) then
        if v:numel() ~= p:numel() then
          error(("%s: state '%s' of parameter %d has shape %s, the parameter %s"):format(what, name, id, v:shape_str(), p:shape_str()), 2)
        end
        local t = state_zeros(p)
        basic.copy_(t, v:numel() == 0 and v or v:view(p:shape()))
        s[name] = t
      else
        s[name] = v
      end
    end
    self:check_state(s, id, p, what)
    new_state[id] = s
  end
  for gi, g in ipairs(sd.param_groups) do
    for k, v in pairs(g) do if k ~= "params" then self.param_groups[gi][k] = v end end
  end
  self.state = new_state
end

-- ---- AdamW ----

local AdamW = setmetatable({}, {__index = Optimizer})
AdamW.__index = AdamW
M.AdamW_class = AdamW

-- AdamW(params_or_groups, {lr = 1e-3, betas = {0.9, 0.999}, eps = 1e-8, weight_decay = 1e-2}): torch's
-- defaults. Weight decay is decoupled (p *= 1 - lr*wd before the Adam update).
function M.AdamW(params, opts)
  return new_optimizer(AdamW, "AdamW", params, opts, {lr = 1e-3, betas = {0.9, 0.999}, eps = 1e-8, weight_decay = 1e-2})
end

function AdamW:validate(g, gi)
  local b = g.betas
  if type(b) ~= "table" or type(b[1]) ~= "number" or type(b[2]) ~= "number" or b[1] < 0 or b[1] >= 1 or b[2] < 0 or b[2] >= 1 then
    core.raise(("AdamW: param group %d: betas must be two numbers in [0, 1), got %s"):format(gi, tostring(b)))
  end
  for _, k in ipairs {"lr", "eps", "weight_decay"} do
    if type(g[k]) ~= "number" or g[k] < 0 then
      core.raise(("AdamW: param group %d: %s must be a number >= 0, got %s"):format(gi, k, tostring(g[k])))
    end
  end
end

function AdamW:check_state(s, id, _p, what)
  if type(s.step) ~= "number" or not is_tensor(s.exp_avg) or not is_tensor(s.exp_avg_sq) then
    core.raise(("%s: state of parameter %d needs step, exp_avg and exp_avg_sq"):format(what, id))
  end
end

function AdamW:step()
  local state = self.state
  self:each_param(function(id, p, g)
    local grad = grad_of(p)
    if grad == nil then return end
    local st = state[id]
    if st == nil then
      st = {step = 0, exp_avg = state_zeros(p), exp_avg_sq = state_zeros(p)}
      state[id] = st
    end
    st.step = st.step + 1
    local where = Tensor.shard_info(p)
    local rc = C.fl_adamw_step(ptr(p, "AdamW.step"), grad._p, st.exp_avg._p, st.exp_avg_sq._p, st.step, g.lr,
                               g.betas[1], g.betas[2], g.eps, g.weight_decay, where and where.offset or 0,
                               where and where.numel or 0)
    if rc < 0 then st.step = st.step - 1; core.fail("AdamW.step: parameter " .. id, 3) end
    grad:free()
  end)
end

-- ---- SGD ----

local SGD = setmetatable({}, {__index = Optimizer})
SGD.__index = SGD
M.SGD_class = SGD

-- SGD(params_or_groups, {lr = 1e-3, momentum = 0, dampening = 0, weight_decay = 0, nesterov = false}).
function M.SGD(params, opts)
  return new_optimizer(SGD, "SGD", params, opts, {lr = 1e-3, momentum = 0, dampening = 0, weight_decay = 0, nesterov = false})
end

function SGD:validate(g, gi)
  for _, k in ipairs {"lr", "momentum", "weight_decay"} do
    if type(g[k]) ~= "number" or g[k] < 0 then
      core.raise(("SGD: param group %d: %s must be a number >= 0, got %s"):format(gi, k, tostring(g[k])))
    end
  end
  if type(g.dampening) ~= "number" then core.raise(("SGD: param group %d: dampening must be a number"):format(gi)) end
  if g.nesterov and (g.momentum <= 0 or g.dampening ~= 0) then
    core.raise(("SGD: param group %d: nesterov needs momentum > 0 and dampening 0"):format(gi))
  end
end

function SGD:check_state(s, id, _p, what)
  if type(s.step) ~= "number" or (s.momentum_buffer ~= nil and not is_tensor(s.momentum_buffer)) then
    core.raise(("%s: state of parameter %d needs step (and a tensor momentum_buffer)"):format(what, id))
  end
end

function SGD:step()
  local state = self.state
  self:each_param(function(id, p, g)
    local grad = grad_of(p)
    if grad == nil then return end
    local st = state[id]
    if st == nil then
      st = {step = 0}
      if g.momentum ~= 0 then st.momentum_buffer = state_zeros(p) end
      state[id] = st
    end
    if g.momentum ~= 0 and st.momentum_buffer == nil then st.momentum_buffer = state_zeros(p); st.step = 0 end
    st.step = st.step + 1
    local buf = g.momentum ~= 0 and st.momentum_buffer._p or nil
    local rc = C.fl_sgd_step(ptr(p, "SGD.step"), grad._p, buf, st.step, g.lr, g.momentum, g.dampening,
                             g.weight_decay, g.nesterov and true or false)
    if rc < 0 then st.step = st.step - 1; core.fail("SGD.step: parameter " .. id, 3) end
    grad:free()
  end)
end

-- ---- schedules ----

-- cosine_schedule{warmup = W, total = N, lr = peak, min_lr = 0} returns a schedule f, called as f(step) -> lr for
-- 1-based steps: linear warmup lr * step / W for step <= W, then min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2 with
-- t = (step - W) / (N - W), and min_lr after step N. The lr is a pure function of the step, so the schedule's state
-- is its four numbers: f:state_dict() -> {kind = "cosine", warmup =, total =, lr =, min_lr =} and
-- f:load_state_dict(s) takes them back (training checkpoints save and restore them; the step is saved beside).
local COSINE_OPTS = {warmup = true, total = true, lr = true, min_lr = true}
local Cosine = {}
Cosine.__index = Cosine

local function cosine_check(what, warmup, total, lr, min_lr)
  if type(total) ~= "number" or total < 1 then core.raise(what .. ": total must be a number >= 1") end
  if type(lr) ~= "number" then core.raise(what .. ": lr must be a number") end
  if type(min_lr) ~= "number" then core.raise(what .. ": min_lr must be a number") end
  if type(warmup) ~= "number" or warmup < 0 or warmup > total then
    core.raise(("%s: warmup must be in [0, total=%d], got %s"):format(what, total, tostring(warmup)))
  end
end

function M.cosine_schedule(opts)
  opts = core.check_opts("cosine_schedule", opts, COSINE_OPTS, 2)
  local warmup, min_lr = opts.warmup or 0, opts.min_lr or 0
  cosine_check("cosine_schedule", warmup, opts.total, opts.lr, min_lr)
  return setmetatable({warmup = warmup, total = opts.total, lr = opts.lr, min_lr = min_lr}, Cosine)
end

function Cosine.__call(self, step)
  local warmup, total, lr, min_lr = self.warmup, self.total, self.lr, self.min_lr
  if warmup > 0 and step <= warmup then return lr * step / warmup end
  if step >= total then return min_lr end
  local t = (step - warmup) / (total - warmup)
  return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))
end

function Cosine:state_dict()
  return {kind = "cosine", warmup = self.warmup, total = self.total, lr = self.lr, min_lr = self.min_lr}
end

function Cosine:load_state_dict(s)
  if type(s) ~= "table" or s.kind ~= "cosine" then
    core.raise(("cosine_schedule.load_state_dict: expected the state of a cosine schedule, got %s")
               :format(type(s) == "table" and ("kind " .. tostring(s.kind)) or type(s)))
  end
  cosine_check("cosine_schedule.load_state_dict", s.warmup, s.total, s.lr, s.min_lr)
  self.warmup, self.total, self.lr, self.min_lr = s.warmup, s.total, s.lr, s.min_lr
end

-- ---- clipping ----

-- The squared gradient norm, summed exactly (engine/core/exact_sum.c). Each gradient's squares go into the
-- accumulator of its parameter's shard group (Tensor.shard_group: FSDP shards) or replica group
-- (Tensor.replica_group: DDP, each replica summing its slice); plain parameters sum locally. Each group's
-- accumulator is summed over that group's ranks, then all are added and rounded once. Integer sums do not depend
-- on order or split, so one process, DDP and FSDP with any plan, mesh or world size give the same bits from the
-- same gradients. The groups are visited in the order the parameter list first names them, which every rank
-- shares, so every rank runs the same collectives.
local slice_lo, slice_len, flat_shape = ffi.new("int64_t[1]"), ffi.new("int64_t[1]"), ffi.new("int64_t[1]")
local function grad_sum_squares(list)
  local order, acc_of = {}, {}
  local function acc_for(group)
    local key = group or false
    local acc = acc_of[key]
    if not acc then
      acc = Tensor.zeros({C.FL_EXACT_SUM_SIZE}, {dtype = "i64"})
      acc_of[key] = acc
      order[#order + 1] = key
    end
    return acc
  end
  acc_for(nil)
  for _, p in ipairs(list) do
    local group, replicas = Tensor.shard_group(p), Tensor.replica_group(p)
    local acc = acc_for(group or replicas)
    local g = C.fl_tensor_get_grad(p._p)
    if g ~= nil then
      local part = g
      if replicas then
        -- a DDP gradient is the same on every replica: each sums its slice of it (fl_shard_rows over the
        -- flattened tensor) and the group's all-gather adds the slices, exactly, to the whole's sum
        local n = tonumber(C.fl_tensor_numel(g))
        C.fl_shard_rows(n, C.fl_comm_size(replicas), C.fl_comm_rank(replicas), slice_lo, slice_len)
        flat_shape[0] = n
        local flat = C.fl_view(g, 1, flat_shape)
        part = flat ~= nil and C.fl_narrow(flat, 0, slice_lo[0], slice_len[0]) or nil
        C.fl_tensor_release(flat)
        C.fl_tensor_release(g)
        if part == nil then core.raise("clip_grad_norm: " .. core.last_error()) end
      end
      local rc = C.fl_exact_sum_add_squares(acc._p, part)
      C.fl_tensor_release(part)
      core.check(rc, nil, 3)
    end
  end
  local total = acc_of[false]
  for i = 2, #order do
    local acc = acc_of[order[i]]
    core.check(C.fl_exact_sum_all_reduce(order[i], acc._p), "clip_grad_norm", 3)
    C.fl_exact_sum_merge(total._p, acc._p)
    acc:free()
  end
  local ss = tonumber(C.fl_exact_sum_value(total._p))
  total:free()
  return ss
end
M.grad_sum_squares = grad_sum_squares

local function param_list(what, params)
  if type(params) ~= "table" then core.raise(what .. ": expected a list of parameters") end
  local list = params
  if #params > 0 and not is_tensor(params[1]) then   -- param groups
    list = {}
    for _, g in ipairs(params) do for _, p in ipairs(g.params) do list[#list + 1] = p end end
  end
  for i, p in ipairs(list) do
    if not is_tensor(p) then core.raise(("%s: entry %d is %s, expected a tensor"):format(what, i, type(p))) end
  end
  return list
end

-- get_total_norm(params) -> the L2 norm of all grads together (torch.nn.utils.get_total_norm over the grads):
-- plain, DDP and FSDP-sharded parameters alike, summed exactly (see grad_sum_squares). Collective over every
-- shard group the parameters name.
function M.get_total_norm(params)
  return math.sqrt(grad_sum_squares(param_list("get_total_norm", params)))
end

-- clip_grads_with_norm_(params, max_norm, total_norm): scales every grad in place by max_norm / (total_norm +
-- 1e-6) when that is below 1, as torch.nn.utils.clip_grads_with_norm_.
function M.clip_grads_with_norm_(params, max_norm, total_norm)
  if type(max_norm) ~= "number" or max_norm < 0 then
    error(("clip_grads_with_norm_: max_norm must be a number >= 0, got %s"):format(tostring(max_norm)), 2)
  end
  if type(total_norm) ~= "number" then
    error(("clip_grads_with_norm_: total_norm must be a number, got %s"):format(type(total_norm)), 2)
  end
  local coef = max_norm / (total_norm + 1e-6)
  if not (coef < 1) then return end  -- luacheck: ignore 581 (written so that a NaN coef also returns)
  for _, p in ipairs(param_list("clip_grads_with_norm_", params)) do
    local g = C.fl_tensor_get_grad(p._p)
    if g ~= nil then
      local rc = C.fl_scale_(g, coef)
      C.fl_tensor_release(g)
      core.check(rc, "clip_grads_with_norm_", 2)
    end
  end
end

-- clip_grad_norm(params, max_norm) -> total norm (a number), as torch.nn.utils.clip_grad_norm_: get_total_norm,
-- then clip_grads_with_norm_.
function M.clip_grad_norm(params, max_norm, opts)
  core.check_opts("clip_grad_norm", opts, {}, 2)
  if type(max_norm) ~= "number" or max_norm < 0 then
    error(("clip_grad_norm: max_norm must be a number >= 0, got %s"):format(tostring(max_norm)), 2)
  end
  local list = param_list("clip_grad_norm", params)
  local norm = math.sqrt(grad_sum_squares(list))
  M.clip_grads_with_norm_(list, max_norm, norm)
  return norm
end

return M
