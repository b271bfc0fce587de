-- lua/fsdp/parallel/memory.lua: FSDP memory, predicted and measured. estimate() is the memory a plan implies per
-- rank (what torchtitan's estimator reports): f32 parameter and gradient shards, optimizer state, and the peak of
-- gathered weights, found by replaying the engine's unshard / prefetch / reshard schedule (engine/dist/fsdp.c)
-- over the model's forward and backward without running it. memory_stats() is what the engine's allocation
-- counters measured (engine/core/storage.c), as a table that prints. The shard table itself is shard_table.lua's.
-- The replay assumes what holds for the built-in causal LMs: modules run in registration order, the root returns a
-- table (no pre-backward node), no activation checkpointing; W is the shard group's size (HSDP replicas hold the
-- same). spec/dist/explain_memory_spec.lua checks it against the counters, to the byte.
local core = require "fsdp.core"
local ST   = require "fsdp.parallel.shard_table"

local C = core.C
local M = {}
local bytes_str = ST.bytes_str

-- ---- the optimizer's state per parameter shard ----

-- f32 tensors of the shard's shape an optimizer keeps per parameter (lua/fsdp/optim.lua).
local OPTIMIZERS = {
  adamw = {name = "AdamW", states = 2, what = "exp_avg + exp_avg_sq"},
  sgd = {name = "SGD", states = 0, what = "no state (momentum = 0)"},
  sgd_momentum = {name = "SGD with momentum", states = 1, what = "momentum_buffer"},
  none = {name = "no optimizer", states = 0, what = "nothing"},
}

local function optimizer_of(v)
  if v == nil then return OPTIMIZERS.adamw end
  if type(v) == "string" and OPTIMIZERS[v] then return OPTIMIZERS[v] end
  if type(v) == "table" and type(v.states) == "number" and v.states >= 0 and v.states == math.floor(v.states) then
    return {name = tostring(v.name or "custom optimizer"), states = v.states,
            what = ("%d f32 tensor%s"):format(v.states, v.states == 1 and "" or "s")}
  end
  core.raise(("explain: optimizer must be \"adamw\", \"sgd\", \"sgd_momentum\", \"none\" or {states = n, name = ...}, "
              .. "got %s"):format(type(v) == "string" and ("'" .. v .. "'") or tostring(v)))
end
M.optimizer_of = optimizer_of

-- ---- replaying the engine's schedule ----

-- The forward as the engine sees it, a list of events: {kind = "pre" | "post", unit} entering and leaving every
-- module a unit hooks (its modules and extra_modules), and {kind = "use", param} where a module holding a parameter
-- runs: a pre-order walk of the module tree in registration order (the order the built-in models call their modules
-- in; inside a block the order of its norms does not matter, only where its parameters stand against nested units).
-- The root returns a table (loss, logits), so it has no post-forward and no pre-backward node.
local function forward_events(model, unit_of_module, name_of_tensor)
  local events = {}
  local function walk(m, path, seen)
    if seen[m] then return end
    seen[m] = true
    local u = unit_of_module[path]
    if u then events[#events + 1] = {kind = "pre", unit = u} end
    for _, pn in ipairs(m._param_names) do
      local name = name_of_tensor[m._params[pn]]
      if name then events[#events + 1] = {kind = "use", param = name} end
    end
    for _, n in ipairs(m._module_names) do walk(m._modules[n], path == "" and n or (path .. "." .. n), seen) end
    if u and path ~= "" then events[#events + 1] = {kind = "post", unit = u} end
  end
  walk(model, "", {})
  return events
end

-- replay{units = {{name, full_bytes, gather_bytes, reshard_after_forward, params = {names}}}, events, steps = n}
-- -> {peak = bytes, at = {phase, step, held}, step_peaks = {[step] = bytes}}. The engine's rules, unit by unit
-- (fsdp.c): pre-forward reshards the units forward is done with, unshards this one (gathering: full storages + the
-- all-gather buffer; then the buffer goes) and, once the order is recorded (after the first step), starts gathering
-- the next unit; post-forward marks a free_full_weight unit to reshard. Pre-backward unshards its unit and starts
-- gathering the previous one unless reduced; a unit reshards when the last gradient of its parameters has landed
-- (the backward of the first module, in forward order, that uses each); the end of backward reshards everything.
local function replay(plan)
  local units, events = plan.units, plan.events
  local state, pending, reduced, order_of = {}, {}, {}, {}
  local order, recorded = {}, false
  local cur, peak, at = 0, 0, nil
  local phase, step = "forward", 1
  local step_peaks = {}
  local unit_of_param, uses = {}, {}
  for _, u in ipairs(units) do
    state[u] = "sharded"
    for _, pn in ipairs(u.params) do unit_of_param[pn] = u end
  end
  for _, ev in ipairs(events) do
    if ev.kind == "use" then uses[ev.param] = (uses[ev.param] or 0) + 1 end
  end
  local function note()
    if cur > peak then
      peak = cur
      local held = {}
      for _, u in ipairs(units) do
        if state[u] ~= "sharded" then held[#held + 1] = u.name .. (state[u] == "gathering" and " (gathering)" or "") end
      end
      at = {phase = phase, step = step, held = held}
    end
    if cur > (step_peaks[step] or 0) then step_peaks[step] = cur end
  end
  local function start_gather(u)
    if state[u] ~= "sharded" then return end
    cur = cur + u.full_bytes + u.gather_bytes
    state[u] = "gathering"
    note()
  end
  local function finish_gather(u)
    if state[u] ~= "gathering" then return end
    cur = cur - u.gather_bytes
    state[u] = "unsharded"
  end
  local function reshard(u)
    finish_gather(u)
    if state[u] == "unsharded" then cur = cur - u.full_bytes end
    state[u] = "sharded"
    pending[u] = false
  end
  local function neighbour(u, d) return recorded and order_of[u] and order[order_of[u] + d] or nil end
  for s = 1, plan.steps do
    step, phase = s, "forward"
    for _, ev in ipairs(events) do
      local u = ev.unit
      if ev.kind == "pre" then
        for _, v in ipairs(units) do if v ~= u and pending[v] then reshard(v) end end
        if not recorded and not order_of[u] then order[#order + 1] = u; order_of[u] = #order end
        pending[u] = false
        start_gather(u); finish_gather(u)
        local nxt = neighbour(u, 1)
        if nxt then start_gather(nxt) end
      elseif ev.kind == "post" and u.reshard_after_forward then
        pending[u] = true
      end
    end
    phase = "backward"
    local left_uses, left_params = {}, {}
    for pn, n in pairs(uses) do left_uses[pn] = n end
    for _, u in ipairs(units) do left_params[u] = #u.params end
    for i = #events, 1, -1 do
      local ev = events[i]
      local u = ev.unit
      if ev.kind == "post" then
        start_gather(u); finish_gather(u)
        local prev = neighbour(u, -1)
        if prev and not reduced[prev] then start_gather(prev) end
      elseif ev.kind == "use" then
        left_uses[ev.param] = left_uses[ev.param] - 1
        local pu = unit_of_param[ev.param]
        if left_uses[ev.param] == 0 and pu then
          left_params[pu] = left_params[pu] - 1
          if left_params[pu] == 0 then reduced[pu] = true; reshard(pu) end
        end
      end
    end
    for _, u in ipairs(units) do finish_gather(u) end
    for _, u in ipairs(units) do reshard(u); reduced[u] = false end
    recorded = #order > 0
  end
  return {peak = peak, at = at, step_peaks = step_peaks}
end

-- ---- the estimate ----

local Estimate = {}
Estimate.__index = Estimate

-- Rows of cells as lines: the first column left-aligned, the others right-aligned, two spaces apart.
local function aligned(rows)
  local w = {}
  for _, r in ipairs(rows) do for c, cell in ipairs(r) do w[c] = math.max(w[c] or 0, #cell) end end
  local lines = {}
  for i, r in ipairs(rows) do
    local cells = {}
    for c, cell in ipairs(r) do
      cells[c] = c == 1 and (cell .. (" "):rep(w[c] - #cell)) or ((" "):rep(w[c] - #cell) .. cell)
    end
    lines[i] = table.concat(cells, "  ")
  end
  return lines
end

-- estimate(model, shard_table, tree, {optimizer =}) -> per-rank bytes {[r] = {param, grad, optim, param_unsharded,
-- total}} for r = 0..W-1, plus optimizer (what was assumed), peak (when the replay peaked: phase, step and the
-- units held then), step_peaks = {step 1, step 2} (step 1 records the order: no prefetch) and first_step_peak.
-- `shard_table` is explain's (shard_table.from_plan), `tree` the plan's scan of the model (each parameter's
-- tensor and name). param_unsharded is the larger step peak; it is the same on every rank (full sizes and padded
-- all-gather buffers do not depend on the rank).
function M.estimate(model, tbl, tree, opts)
  local opt = optimizer_of(opts.optimizer)
  local W = tbl.world_size
  local name_of_tensor = {}
  for _, p in ipairs(tree.params) do name_of_tensor[p.tensor] = p.name end
  local units, unit_of_module = {}, {}
  for _, u in ipairs(tbl.units) do
    local es = ST.dtype_size(u.param_dtype)
    local names = {}
    for j, p in ipairs(u.params) do names[j] = p.name end
    local r = {name = u.name, full_bytes = u.numel * es, gather_bytes = W * u.padded_numel_per_rank * es,
               reshard_after_forward = u.reshard_after_forward, params = names}
    units[#units + 1] = r
    for _, mn in ipairs(u.modules or {}) do unit_of_module[mn] = r end
    for _, mn in ipairs(u.extra_modules or {}) do unit_of_module[mn] = r end
  end
  local plan = {units = units, events = forward_events(model, unit_of_module, name_of_tensor), steps = 2}
  local sim = replay(plan)
  local out = setmetatable({world_size = W, optimizer = opt, peak = sim.at, first_step_peak = sim.step_peaks[1] or 0,
                            step_peaks = sim.step_peaks}, Estimate)
  for r = 0, W - 1 do
    local shard = tbl.bytes[r]   -- f32 bytes of this rank's shards
    local e = {param = shard, grad = shard, optim = opt.states * shard, param_unsharded = sim.peak}
    e.total = e.param + e.grad + e.optim + e.param_unsharded
    out[r] = e
  end
  return out
end

function Estimate.__tostring(e)
  local W = e.world_size
  local head = {"memory per rank (estimated)"}
  for r = 0, W - 1 do head[#head + 1] = "rank " .. r end
  local rows = {head}
  local function row(label, key)
    local cells = {label}
    for r = 0, W - 1 do cells[#cells + 1] = bytes_str(e[r][key]) end
    rows[#rows + 1] = cells
  end
  row("  param (f32 shards)", "param")
  row("  grad (f32 shards)", "grad")
  row(("  optim (%s: %s)"):format(e.optimizer.name, e.optimizer.what), "optim")
  row("  param_unsharded peak", "param_unsharded")
  row("  total", "total")
  local lines = aligned(rows)
  local p = e.peak
  if p then
    lines[#lines + 1] = ("  peak gathered weights: %s, in the %s of step %d (from step 2 the next unit is prefetched; "
                         .. "step 1: %s)"):format(table.concat(p.held, " + "), p.phase, p.step,
                         bytes_str(e.first_step_peak))
  end
  lines[#lines + 1] = "  not estimated: activations, unsharded gradients and reduce-scatter buffers during backward"
  return table.concat(lines, "\n")
end

-- ---- measured ----

local CATEGORIES = {"param", "param_unsharded", "grad", "optim", "activation", "other"}

local Stats = {}
Stats.__index = Stats
function Stats.__tostring(s)
  local rows = {{"memory (this process)", "current", "peak"}}
  for _, k in ipairs(CATEGORIES) do rows[#rows + 1] = {"  " .. k, bytes_str(s[k].current), bytes_str(s[k].peak)} end
  rows[#rows + 1] = {"  total", bytes_str(s.total.current), bytes_str(s.total.peak)}
  rows[#rows + 1] = {"  cached (free, kept)", bytes_str(s.cached), ""}
  return table.concat(aligned(rows), "\n")
end

-- memory_stats() -> {param =, param_unsharded =, grad =, optim =, activation =, other =, total = {current =, peak
-- =}, cached =} in bytes, this process's engine allocations by category (peaks since the start or
-- reset_peak_memory()), and the freed blocks the caching allocator keeps for reuse (engine/core/storage.c;
-- fsdp.empty_cache() gives them back); tostring() prints it as a table.
function M.memory_stats()
  local out = {}
  for name, id in pairs(core.mem_categories) do
    out[name] = {current = tonumber(C.fl_mem_current(id)), peak = tonumber(C.fl_mem_peak(id))}
  end
  out.total = {current = tonumber(C.fl_mem_total_current()), peak = tonumber(C.fl_mem_total_peak())}
  out.cached = tonumber(C.fl_mem_cached())
  return setmetatable(out, Stats)
end

function M.empty_cache() C.fl_mem_empty_cache() end

function M.reset_peak_memory() C.fl_mem_reset_peak() end

return M
