-- lua/fsdp/parallel/plan.lua: FSDP plans as data (DESIGN §5 "Plans"). resolve() turns a plan into the validated
-- list of units (which modules, which parameters, which policies); explain.lua adds each rank's dim-0 shard
-- ranges. Neither communicates or touches parameter data, so both work on a model built on `meta`. Sharding
-- itself is units.lua's. Exports: resolve(model, plan, opts), mixed_precision(mp, where).
--
-- PLAN FORMS
--   "auto"  (= {mode = "auto"})       units found from the module tree: the input embeddings (every module with
--                                     parameters before the first block), each outermost block (module.is_block),
--                                     and the modules after the last block (final norm + lm_head) as one unit
--                                     that keeps its full weight after forward (backward needs it at once, as in
--                                     torchtitan). A block inside a block is not a unit of its own.
--   "declared" (= {mode = "declared"}) the model's own `model.fsdp_plan`, a MODULES TABLE (below), as
--                                     transformers' base_model_fsdp_plan.
--   {mode = "manual", modules = MODULES TABLE}   (mode may be left out when modules is a table)
--   {mode = "function", modules = function(name, module) return OPTIONS | nil end}   (mode may be left out):
--                                     called for every module but the root, in pre-order; each non-nil answer
--                                     makes that module a unit (true means default options).
--   Top-level keys of a plan table, and resolve's `opts` (the same three; a key given in both must agree):
--     mixed_precision = MP      default for every unit, the root included (a module's own entry wins)
--     cpu_offload = bool        default for every unit, the root included (a module's own entry wins)
--     reshard_after_forward = false   turns every free_full_weight unit into keep_full_weight (ZeRO-2 style);
--                                     true (the default) changes nothing
--
-- MODULES TABLE (manual plans and models' fsdp_plan):
--   [pattern] = OPTIONS                    one unit per module the pattern matches
--   {group = {pattern, ...}, <OPTIONS>}     (array entry) ONE unit made of every module its patterns match
--   A pattern is a dotted module name where `*` matches exactly one name segment ("model.layers.*.mlp"). Every
--   pattern must match at least one module (the root, "", is never matched: it is always the last unit) and no
--   module may be claimed by two entries.
--   e.g. {["model.layers.*"] = "free_full_weight", {group = {"model.norm", "lm_head"}, "keep_full_weight"}}
--
-- OPTIONS: a flag string ("free_full_weight" | "keep_full_weight" | "cpu_offload"), or a table whose array part
--   holds flag strings and whose keys are free_full_weight / keep_full_weight / cpu_offload (booleans) and
--   mixed_precision (MP, or false for none). free and keep contradict each other; saying neither means free.
-- MP: {param_dtype =, reduce_dtype =, output_dtype =}, each f32 | f64 | bf16 | f16 or absent (no cast there).
--
-- UNITS. A parameter belongs to exactly one unit, the innermost one claiming a module that holds it; the root unit
-- (name "root", modules {""}, is_root) takes the rest and keeps its full weight after forward. A tied parameter
-- (one Tensor under several names) is one parameter, listed once under the name named_parameters() gives first.
-- Units that share a tied parameter are merged into one (their modules together; it keeps its full weight if
-- either did, since it runs both at the start and the end of forward; cpu_offload and mixed_precision must
-- agree). So tied GPT-2 under "auto" gets one unit {wte, wpe, ln_f, lm_head}. A tied parameter used also by a
-- module only the root claims stays in its unit, and that module is listed in the unit's extra_modules (its
-- forward must unshard the unit too). Units come bottom-up (a unit nested in another comes before it) and
-- otherwise in module order, which is forward order for the built-in models; the root is last.
local M = {}

local O = require "fsdp.parallel.plan_options"
local keys, fail, protect = O.keys, O.fail, O.protect
local parse_mp, mp_equal, mp_str, parse_options = O.parse_mp, O.mp_equal, O.mp_str, O.parse_options
local PLAN_KEYS, MODES, RESOLVE_OPTS = O.PLAN_KEYS, O.MODES, O.RESOLVE_OPTS

-- ---- the module tree ----

local function parent_of(name)
  return name:match("^(.*)%.[^.]+$") or ""
end

local function is_under(name, anc)    -- name is anc or lies inside it
  return anc == "" or name == anc or name:sub(1, #anc + 1) == anc .. "."
end

-- Pre-order module list, each entry {name, module, index, last = index of its subtree's last module}, and every
-- parameter use: tensors in named_parameters order, each {name = first name, names, modules} (all of its uses).
local function scan(model)
  if type(model) ~= "table" or type(model.named_modules) ~= "function" then
    fail("model must be an nn module, got %s", type(model))
  end
  local mods, by_name = {}, {}
  for name, m in model:named_modules() do
    local e = {name = name, module = m, index = #mods + 1}
    mods[#mods + 1] = e
    by_name[name] = e
  end
  -- subtree ends: a module's subtree is the run of following names that lie under it
  local stack = {}
  for i, e in ipairs(mods) do
    while #stack > 0 and not is_under(e.name, stack[#stack].name) do
      stack[#stack].last = i - 1
      stack[#stack] = nil
    end
    stack[#stack + 1] = e
  end
  for _, e in ipairs(stack) do e.last = #mods end

  local params, of_tensor = {}, {}
  for _, e in ipairs(mods) do
    local m = e.module
    for _, pn in ipairs(m._param_names or {}) do
      local t = m._params[pn]
      local full = e.name == "" and pn or (e.name .. "." .. pn)
      local p = of_tensor[t]
      if not p then
        p = {name = full, tensor = t, names = {}, modules = {}}
        of_tensor[t] = p
        params[#params + 1] = p
      end
      p.names[#p.names + 1] = full
      p.modules[#p.modules + 1] = e.name
    end
  end
  -- which subtrees hold parameters
  for i = #mods, 1, -1 do
    local e = mods[i]
    e.has_params = #(e.module._param_names or {}) > 0
    if not e.has_params then
      for j = i + 1, e.last do
        if #(mods[j].module._param_names or {}) > 0 then e.has_params = true; break end
      end
    end
  end
  return {mods = mods, by_name = by_name, params = params}
end

-- ---- patterns ----

local function check_pattern(p, where)
  if type(p) ~= "string" or p == "" or p:find("..", 1, true) or p:sub(1, 1) == "." or p:sub(-1) == "." then
    fail("%s: pattern %s must be a dotted module name (\"model.layers.*\"; the root is implicit)", where,
         type(p) == "string" and ("'" .. p .. "'") or tostring(p))
  end
  for seg in p:gmatch("[^.]+") do
    if seg ~= "*" and seg:find("*", 1, true) then
      fail("%s: pattern '%s': '*' must be a whole name segment", where, p)
    end
  end
end

local function split(s)
  local out = {}
  for seg in s:gmatch("[^.]+") do out[#out + 1] = seg end
  return out
end

local function matches(pattern_segs, name)
  local segs = split(name)
  if #segs ~= #pattern_segs then return false end
  for i, ps in ipairs(pattern_segs) do
    if ps ~= "*" and ps ~= segs[i] then return false end
  end
  return true
end

local function match_all(tree, pattern, where)
  check_pattern(pattern, where)
  local ps, out = split(pattern), {}
  for _, e in ipairs(tree.mods) do
    if e.name ~= "" and matches(ps, e.name) then out[#out + 1] = e.name end
  end
  if #out == 0 then fail("%s: pattern '%s' matches no module", where, pattern) end
  return out
end

-- ---- plan forms -> unit specs {modules = {names}, opts = parsed OPTIONS, origin = "..."} ----

local function specs_from_table(tree, tbl, where)
  if type(tbl) ~= "table" then fail("%s: modules must be a table of pattern = options, got %s", where, type(tbl)) end
  local specs, claimed = {}, {}
  local function claim(name, origin)
    if claimed[name] and claimed[name] ~= origin then
      fail("%s: module '%s' is claimed by both %s and %s", where, name, claimed[name], origin)
    end
    claimed[name] = origin
  end
  local strs, n = {}, 0
  for k in pairs(tbl) do
    if type(k) == "string" then strs[#strs + 1] = k
    elseif type(k) == "number" and k >= 1 and k == math.floor(k) then n = math.max(n, k)
    else fail("%s: bad key %s (expected a pattern string or an array entry {group = {...}, ...})", where, tostring(k)) end
  end
  -- array entries first (in order), then patterns sorted, so messages do not depend on hash order
  for i = 1, n do
    local e = tbl[i]
    local origin = ("entry %d"):format(i)
    if type(e) ~= "table" or e.group == nil then
      fail("%s: %s must be a table {group = {patterns...}, options...}", where, origin)
    end
    local group = type(e.group) == "string" and {e.group} or e.group
    if type(group) ~= "table" or #group == 0 then
      fail("%s: %s: group must be a non-empty list of patterns", where, origin)
    end
    local opts = parse_options(e, where .. ": " .. origin, "group")
    local mods, seen = {}, {}
    for _, pat in ipairs(group) do
      for _, name in ipairs(match_all(tree, pat, where .. ": " .. origin)) do
        if not seen[name] then
          seen[name] = true
          claim(name, ("%s (group with '%s')"):format(origin, pat))
          mods[#mods + 1] = name
        end
      end
    end
    table.sort(mods, function(a, b) return tree.by_name[a].index < tree.by_name[b].index end)
    specs[#specs + 1] = {modules = mods, opts = opts, origin = origin}
  end
  table.sort(strs)
  for _, pat in ipairs(strs) do
    local origin = ("pattern '%s'"):format(pat)
    local opts = parse_options(tbl[pat], where .. ": " .. origin)
    for _, name in ipairs(match_all(tree, pat, where)) do
      claim(name, origin)
      specs[#specs + 1] = {modules = {name}, opts = opts, origin = origin}
    end
  end
  return specs
end

local function specs_from_function(tree, fn)
  local specs = {}
  for _, e in ipairs(tree.mods) do
    if e.name ~= "" then
      local r = fn(e.name, e.module)
      if r ~= nil and r ~= false then
        local origin = ("module '%s'"):format(e.name)
        specs[#specs + 1] = {modules = {e.name}, opts = parse_options(r, "function plan: " .. origin), origin = origin}
      end
    end
  end
  return specs
end

-- auto: outermost blocks; the subtrees with parameters before the first block (input embeddings) and after the
-- last one (final norm, head); whatever lies between blocks outside them stays with the root.
local function specs_auto(tree)
  local blocks, in_block = {}, nil
  for _, e in ipairs(tree.mods) do
    if in_block and e.index > in_block.last then in_block = nil end
    if not in_block and e.module.is_block == true then
      blocks[#blocks + 1] = e
      in_block = e
    end
  end
  if #blocks == 0 then
    fail("auto: the model has no block modules (module.is_block = true); use a manual or function plan")
  end
  local holds_block = {}
  for _, b in ipairs(blocks) do
    local p = b.name
    repeat p = parent_of(p); holds_block[p] = true until p == ""
  end
  local first, last_end = blocks[1].index, blocks[#blocks].last
  local input, output = {}, {}
  local i = 1
  while i <= #tree.mods do
    local e = tree.mods[i]
    if holds_block[e.name] then
      i = i + 1                                  -- descend: its children are split around the blocks
    else
      if e.has_params and not e.module.is_block then
        if i < first then input[#input + 1] = e.name
        elseif i > last_end then output[#output + 1] = e.name end
      end
      i = e.last + 1                             -- the whole subtree is one piece
    end
  end
  local specs = {}
  if #input > 0 then specs[#specs + 1] = {modules = input, opts = {}, origin = "auto input embeddings"} end
  for _, b in ipairs(blocks) do
    specs[#specs + 1] = {modules = {b.name}, opts = {}, origin = ("auto block '%s'"):format(b.name)}
  end
  if #output > 0 then
    specs[#specs + 1] = {modules = output, opts = {reshard = false}, origin = "auto final norm and head"}
  end
  return specs
end

-- ---- plan value -> (mode, plan table) ----

local function normalize_plan(plan)
  if plan == "auto" or plan == "declared" then return plan, {} end
  if type(plan) == "table" then
    for k in pairs(plan) do
      if not PLAN_KEYS[k] then fail("unknown key '%s' (valid: %s)", tostring(k), keys(PLAN_KEYS)) end
    end
    local mode = plan.mode
    if mode == nil then
      if type(plan.modules) == "function" then mode = "function"
      elseif type(plan.modules) == "table" then mode = "manual"
      else fail("a plan table needs mode (%s) or modules (a table or a function)", keys(MODES)) end
    end
    if not MODES[mode] then fail("unknown mode '%s' (valid: %s)", tostring(mode), keys(MODES)) end
    if (mode == "auto" or mode == "declared") and plan.modules ~= nil then
      fail("%s: takes no modules (use mode = \"manual\" or \"function\")", mode)
    end
    if mode == "manual" and type(plan.modules) ~= "table" then
      fail("manual: modules must be a table of pattern = options, got %s", type(plan.modules))
    end
    if mode == "function" and type(plan.modules) ~= "function" then
      fail("function: modules must be a function(name, module), got %s", type(plan.modules))
    end
    return mode, plan
  end
  fail("a plan must be \"auto\", \"declared\" or a table {mode = %s, modules = ...}, got %s",
       "auto|declared|manual|function", type(plan) == "string" and ("'" .. plan .. "'") or type(plan))
end

-- Plan-wide defaults from the plan table and resolve's opts.
local function defaults(plan, opts)
  if opts ~= nil and type(opts) ~= "table" then fail("options must be a table, got %s", type(opts)) end
  opts = opts or {}
  for k in pairs(opts) do
    if not RESOLVE_OPTS[k] then fail("unknown option '%s' (valid: %s)", tostring(k), keys(RESOLVE_OPTS)) end
  end
  local d = {}
  for k in pairs(RESOLVE_OPTS) do
    local a, b = plan[k], opts[k]
    if k == "mixed_precision" then
      a, b = parse_mp(a, "plan"), parse_mp(b, "options")
      if a ~= nil and b ~= nil and not mp_equal(a, b) then
        fail("mixed_precision is %s in the plan but %s in the options", mp_str(a), mp_str(b))
      end
    else
      if a ~= nil and type(a) ~= "boolean" then fail("%s must be a boolean, got %s", k, type(a)) end
      if b ~= nil and type(b) ~= "boolean" then fail("option %s must be a boolean, got %s", k, type(b)) end
      if a ~= nil and b ~= nil and a ~= b then
        fail("%s is %s in the plan but %s in the options", k, tostring(a), tostring(b))
      end
    end
    if a ~= nil then d[k] = a else d[k] = b end
  end
  return d
end

-- ---- specs -> units ----

local function build_units(tree, specs, d)
  local mods_index = tree.by_name
  -- each spec's final policies
  for _, s in ipairs(specs) do
    local o = s.opts
    local reshard = o.reshard
    if reshard == nil then reshard = true end
    if d.reshard_after_forward == false then reshard = false end
    s.reshard = reshard
    if o.cpu_offload ~= nil then s.cpu_offload = o.cpu_offload else s.cpu_offload = d.cpu_offload or false end
    local mp = o.mixed_precision
    if mp == nil then mp = d.mixed_precision end
    s.mp = mp or nil
  end
  local unit_of = {}
  for i, s in ipairs(specs) do
    for _, n in ipairs(s.modules) do unit_of[n] = i end
  end
  local function innermost(name)           -- spec index, or nil for the root
    local p = name
    while true do
      if unit_of[p] then return unit_of[p] end
      if p == "" then return nil end
      p = parent_of(p)
    end
  end

  -- union-find: units sharing a tied parameter merge
  local up = {}
  for i in ipairs(specs) do up[i] = i end
  local function find(i)
    while up[i] ~= i do up[i] = up[up[i]]; i = up[i] end
    return i
  end
  for _, p in ipairs(tree.params) do
    local first
    for _, mn in ipairs(p.modules) do
      local u = innermost(mn)
      if u then
        if not first then first = u
        else
          local a, b = find(first), find(u)
          if a ~= b then
            local sa, sb = specs[a], specs[b]
            if sa.cpu_offload ~= sb.cpu_offload then
              fail("tied parameter '%s' joins %s and %s, whose cpu_offload differ (%s vs %s)", p.name, sa.origin,
                   sb.origin, tostring(sa.cpu_offload), tostring(sb.cpu_offload))
            end
            if not mp_equal(sa.mp, sb.mp) then
              fail("tied parameter '%s' joins %s and %s, whose mixed_precision differ (%s vs %s)", p.name, sa.origin,
                   sb.origin, mp_str(sa.mp), mp_str(sb.mp))
            end
            if a > b then a, b = b, a end
            up[b] = a
            sa, sb = specs[a], specs[b]
            sa.reshard = sa.reshard and sb.reshard
          end
        end
      end
    end
  end

  local groups, group_of = {}, {}
  for i, s in ipairs(specs) do
    local r = find(i)
    if not group_of[r] then
      local g = {modules = {}, reshard = specs[r].reshard, cpu_offload = specs[r].cpu_offload, mp = specs[r].mp,
                 params = {}, tied = {}, extra = {}, extra_seen = {}, origin = specs[r].origin}
      group_of[r] = g
      groups[#groups + 1] = g
    end
    local g = group_of[r]
    for _, n in ipairs(s.modules) do g.modules[#g.modules + 1] = n end
    group_of[i] = g
  end
  for _, g in ipairs(groups) do
    table.sort(g.modules, function(a, b) return mods_index[a].index < mods_index[b].index end)
    g.anchor = mods_index[g.modules[1]].index
  end

  -- parameters: innermost claiming unit of any use (merged units make that unique); else the root
  local root = {params = {}, tied = {}}
  for _, p in ipairs(tree.params) do
    local g
    for _, mn in ipairs(p.modules) do
      local u = innermost(mn)
      if u then g = group_of[u]; break end
    end
    local owner = g or root
    owner.params[#owner.params + 1] = p.name
    if #p.names > 1 then
      owner.tied[p.name] = {names = {unpack(p.names)}, modules = {unpack(p.modules)}}
      if g then
        for _, mn in ipairs(p.modules) do
          if not innermost(mn) and not g.extra_seen[mn] then
            g.extra_seen[mn] = true
            g.extra[#g.extra + 1] = mn
          end
        end
      end
    end
  end

  -- order: bottom-up (a unit nested in another first), otherwise by first module; cycles are errors
  local inner_of = {}                      -- g -> set of groups nested in it
  for _, g in ipairs(groups) do inner_of[g] = {} end
  for _, g in ipairs(groups) do
    for _, mn in ipairs(g.modules) do
      local p = mn
      while p ~= "" do
        p = parent_of(p)
        local u = unit_of[p]
        if u and group_of[u] ~= g then inner_of[group_of[u]][g] = true end
      end
    end
  end
  local placed, order = {}, {}
  for _ = 1, #groups do
    local best
    for _, g in ipairs(groups) do
      if not placed[g] then
        local ready = true
        for h in pairs(inner_of[g]) do if not placed[h] then ready = false; break end end
        if ready and (not best or g.anchor < best.anchor) then best = g end
      end
    end
    if not best then
      local a, b
      for _, g in ipairs(groups) do
        if not placed[g] then
          for h in pairs(inner_of[g]) do if not placed[h] and inner_of[h][g] then a, b = g, h end end
        end
      end
      a, b = a or groups[1], b or groups[1]
      fail("units '%s' and '%s' nest inside each other; a unit must lie inside another or apart from it",
           a.modules[1], b.modules[1])
    end
    placed[best] = true
    order[#order + 1] = best
  end

  local function copy_mp(mp)
    if not mp then return nil end
    local out = {}
    for k, v in pairs(mp) do out[k] = v end
    return out
  end
  local units = {}
  for _, g in ipairs(order) do
    units[#units + 1] = {name = g.modules[1], modules = g.modules, params = g.params,
                         reshard_after_forward = g.reshard, cpu_offload = g.cpu_offload,
                         mixed_precision = copy_mp(g.mp), is_root = false, tied = g.tied, extra_modules = g.extra}
  end
  units[#units + 1] = {name = "root", modules = {""}, params = root.params, reshard_after_forward = false,
                       cpu_offload = d.cpu_offload or false, mixed_precision = copy_mp(d.mixed_precision or nil),
                       is_root = true, tied = root.tied, extra_modules = {}}
  return units
end

local function resolve(model, plan, opts)
  local tree = scan(model)
  local mode, ptable = normalize_plan(plan)
  local d = defaults(ptable, opts)
  local specs
  if mode == "auto" then
    specs = specs_auto(tree)
  elseif mode == "declared" then
    local declared = model.fsdp_plan
    if declared == nil then
      fail("declared: the model declares no fsdp_plan (use \"auto\" or a manual plan)")
    end
    specs = specs_from_table(tree, declared, "declared")
  elseif mode == "manual" then
    specs = specs_from_table(tree, ptable.modules, "manual")
  else
    specs = specs_from_function(tree, ptable.modules)
  end
  return build_units(tree, specs, d), tree
end

-- mixed_precision(mp, where) -> a checked copy of a {param_dtype =, reduce_dtype =, output_dtype =} table (nil
-- and false pass through): the one check apply_plan, explain and fully_shard share.
function M.mixed_precision(mp, where)
  local out = protect(parse_mp, mp, where)
  return out
end

-- resolve(model, plan, opts) -> list of units (see the top of this file), bottom-up, the root last. Each unit:
-- {name, modules, params, reshard_after_forward, cpu_offload, mixed_precision, is_root,
--  tied = {[param] = {names = {every name}, modules = {every module holding it}}},
--  extra_modules = {modules outside the unit that use one of its tied parameters}}.
function M.resolve(model, plan, opts)
  local units = protect(resolve, model, plan, opts)   -- not a tail call: errors point at our caller
  return units
end

-- For explain.lua: the unprotected resolve (units and the scanned tree), the error helpers and mp_str.
M.resolve_tree, M.fail, M.protect, M.mp_str = resolve, fail, protect, mp_str

return M
