-- spec/plan_spec.lua: FSDP plans (fsdp.plan): the units "auto" finds on every tiny model, written out by hand from
-- Hugging Face's module layout; "declared" == "auto" for every registered model; manual and function plans; every
-- validation error; explain()'s dim-0 row ranges against hand-computed numbers. All on meta: no data is needed.
local fsdp   = require "fsdp"
local plan   = require "fsdp.parallel"
local Module = require "fsdp.nn.module"
local ModuleList = require "fsdp.nn.module_list"

local function build(mt, tied, overrides)
  local o = {tie_word_embeddings = tied}
  for k, v in pairs(overrides or {}) do o[k] = v end
  return fsdp.models.build(fsdp.models.tiny_config(mt, o), {device = "meta"})
end

local function err_of(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error")
  return tostring(err)
end

local function has(msg, ...)
  for _, s in ipairs {...} do
    assert.is_truthy(msg:find(s, 1, true), ("message %q lacks %q"):format(msg, s))
  end
end

local function prefixed(prefix, suffixes)
  local out = {}
  for i, s in ipairs(suffixes) do out[i] = prefix .. s end
  return out
end

-- Hugging Face's parameter names of one block, in registration order (hf-models.md §1, §2).
local GPT2_BLOCK = {"ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                    "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                    "mlp.c_proj.weight", "mlp.c_proj.bias"}
local LLAMA_ATTN = {"self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
                    "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
                    "self_attn.o_proj.weight", "self_attn.o_proj.bias"}
local LLAMA_MLP = {"mlp.gate_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.weight", "mlp.up_proj.bias",
                   "mlp.down_proj.weight", "mlp.down_proj.bias"}
local LLAMA_NORMS = {"input_layernorm.weight", "post_attention_layernorm.weight"}
local LLAMA_LAYER = {}
for _, l in ipairs {LLAMA_ATTN, LLAMA_MLP, LLAMA_NORMS} do for _, s in ipairs(l) do LLAMA_LAYER[#LLAMA_LAYER + 1] = s end end

local function unit(name, modules, params, reshard, extra)
  local u = {name = name, modules = modules, params = params, reshard_after_forward = reshard, cpu_offload = false,
             mixed_precision = nil, is_root = name == "root", tied = {}, extra_modules = {}}
  for k, v in pairs(extra or {}) do u[k] = v end
  return u
end

local ROOT_EMPTY = unit("root", {""}, {}, false)

-- auto's units, by hand: embeddings (free), each block (free), {final norm, head} (keep); tied, the embeddings join
-- the norm/head unit, which keeps its weight, and the tied weight is listed once under its first name.
local EXPECTED_AUTO = {
  gpt2_tied = {
    unit("transformer.wte", {"transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head"},
         {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"},
         false, {tied = {["transformer.wte.weight"] = {names = {"transformer.wte.weight", "lm_head.weight"},
                                                       modules = {"transformer.wte", "lm_head"}}}}),
    unit("transformer.h.0", {"transformer.h.0"}, prefixed("transformer.h.0.", GPT2_BLOCK), true),
    unit("transformer.h.1", {"transformer.h.1"}, prefixed("transformer.h.1.", GPT2_BLOCK), true),
    ROOT_EMPTY,
  },
  gpt2_untied = {
    unit("transformer.wte", {"transformer.wte", "transformer.wpe"}, {"transformer.wte.weight", "transformer.wpe.weight"},
         true),
    unit("transformer.h.0", {"transformer.h.0"}, prefixed("transformer.h.0.", GPT2_BLOCK), true),
    unit("transformer.h.1", {"transformer.h.1"}, prefixed("transformer.h.1.", GPT2_BLOCK), true),
    unit("transformer.ln_f", {"transformer.ln_f", "lm_head"},
         {"transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"}, false),
    ROOT_EMPTY,
  },
  llama_untied = {
    unit("model.embed_tokens", {"model.embed_tokens"}, {"model.embed_tokens.weight"}, true),
    unit("model.layers.0", {"model.layers.0"}, prefixed("model.layers.0.", LLAMA_LAYER), true),
    unit("model.layers.1", {"model.layers.1"}, prefixed("model.layers.1.", LLAMA_LAYER), true),
    unit("model.norm", {"model.norm", "lm_head"}, {"model.norm.weight", "lm_head.weight"}, false),
    ROOT_EMPTY,
  },
  llama_tied = {
    unit("model.embed_tokens", {"model.embed_tokens", "model.norm", "lm_head"},
         {"model.embed_tokens.weight", "model.norm.weight"}, false,
         {tied = {["model.embed_tokens.weight"] = {names = {"model.embed_tokens.weight", "lm_head.weight"},
                                                   modules = {"model.embed_tokens", "lm_head"}}}}),
    unit("model.layers.0", {"model.layers.0"}, prefixed("model.layers.0.", LLAMA_LAYER), true),
    unit("model.layers.1", {"model.layers.1"}, prefixed("model.layers.1.", LLAMA_LAYER), true),
    ROOT_EMPTY,
  },
}

describe("plan auto", function()
  for _, case in ipairs {{"gpt2", true}, {"gpt2", false}, {"llama", false}, {"llama", true}} do
    local mt, tied = case[1], case[2]
    local key = mt .. (tied and "_tied" or "_untied")
    it("gives the hand-written units on " .. key, function()
      local m = build(mt, tied)
      assert.same(EXPECTED_AUTO[key], plan.resolve(m, "auto"))
      assert.same(EXPECTED_AUTO[key], plan.resolve(m, {mode = "auto"}))
    end)
  end

  it("puts every parameter in exactly one unit, the tied weight once", function()
    for _, tied in ipairs {true, false} do
      local m = build("gpt2", tied)
      local count = {}
      for _, u in ipairs(plan.resolve(m, "auto")) do
        for _, p in ipairs(u.params) do count[p] = (count[p] or 0) + 1 end
      end
      local n = 0
      for name in m:named_parameters() do
        assert.equal(1, count[name], name)
        n = n + 1
      end
      local listed = 0
      for _ in pairs(count) do listed = listed + 1 end
      assert.equal(n, listed)
      if tied then assert.is_nil(count["lm_head.weight"]) end   -- tied: only under its first name
    end
  end)

  it("applies mixed_precision and cpu_offload to every unit, reshard_after_forward = false to blocks and embeddings",
     function()
    local m = build("llama", false)
    local mp = {param_dtype = "bf16", reduce_dtype = "f32"}
    local units = plan.resolve(m, {mode = "auto", mixed_precision = mp, cpu_offload = true})
    assert.equal(5, #units)
    for _, u in ipairs(units) do
      assert.same(mp, u.mixed_precision)
      assert.is_true(u.cpu_offload)
    end
    -- the same through resolve's options, and ZeRO-2 style: nothing is freed after forward
    units = plan.resolve(m, "auto", {reshard_after_forward = false, mixed_precision = mp})
    for _, u in ipairs(units) do
      assert.is_false(u.reshard_after_forward, u.name)
      assert.same(mp, u.mixed_precision)
      assert.is_false(u.cpu_offload)
    end
    -- the result holds copies: changing one unit's policy does not change another's
    units[1].mixed_precision.param_dtype = "f16"
    assert.equal("bf16", units[2].mixed_precision.param_dtype)
  end)

  -- A hand-made tree: an embedding, two blocks each holding an inner block (an MoE-like expert), a module with
  -- parameters between the blocks (stays with the root), and a final norm.
  local Leaf = Module.class("Leaf")
  function Leaf.new(rows, cols)
    local self = Module.init(setmetatable({}, Leaf))
    self:register_parameter("weight", fsdp.empty(cols and {rows, cols} or {rows}, {device = "meta"}))
    return self
  end
  local Blk = Module.class("Blk")
  function Blk.new(with_inner)
    local self = Module.init(setmetatable({}, Blk))
    self.is_block = true
    self:register_module("proj", Leaf.new(4, 4))
    if with_inner then self:register_module("expert", Blk.new(false)) end
    return self
  end
  local Net = Module.class("Net")
  local function net()
    local self = Module.init(setmetatable({}, Net))
    self:register_module("emb", Leaf.new(1, 4))
    self:register_module("a", Blk.new(true))
    self:register_module("mid", Leaf.new(3))
    local more = ModuleList.new()
    more:append(Blk.new(true))
    self:register_module("more", more)
    self:register_module("norm", Leaf.new(2))
    return self
  end

  it("keeps only the outermost blocks: a block inside a block is not a unit", function()
    local units = plan.resolve(net(), "auto")
    assert.same({
      unit("emb", {"emb"}, {"emb.weight"}, true),
      unit("a", {"a"}, {"a.proj.weight", "a.expert.proj.weight"}, true),
      unit("more.0", {"more.0"}, {"more.0.proj.weight", "more.0.expert.proj.weight"}, true),
      unit("norm", {"norm"}, {"norm.weight"}, false),
      unit("root", {""}, {"mid.weight"}, false),
    }, units)
  end)

  it("shards a 1-row and a 2-row parameter over 3 ranks with empty last chunks", function()
    local ex = plan.explain(net(), "auto", 3)
    -- emb.weight [1, 4]: ceil(1/3) = 1 row per rank -> rows 0..0 on rank 0, nothing on ranks 1 and 2
    local s = ex.units[1].shards["emb.weight"]
    assert.equal(1, s.rows_per_rank)
    assert.same({[0] = {0, 1}, {1, 0}, {1, 0}}, s.ranges)
    assert.same({[0] = 4, 0, 0}, s.numel_per_rank)
    -- norm.weight [2]: 1 row per rank -> ranks 0 and 1 one each, rank 2 none
    s = ex.units[4].shards["norm.weight"]
    assert.same({[0] = {0, 1}, {1, 1}, {2, 0}}, s.ranges)
    -- mid.weight [3] in the root: exactly one row each
    assert.same({[0] = {0, 1}, {1, 1}, {2, 1}}, ex.units[5].shards["mid.weight"].ranges)
  end)

  it("refuses a model without blocks", function()
    local m = Module.init(setmetatable({}, Net))
    m:register_module("emb", Leaf.new(2, 2))
    has(err_of(plan.resolve, m, "auto"), "plan: auto", "no block modules")
  end)
end)

describe("plan declared", function()
  local names = {}
  for k in pairs(fsdp.models.registry) do names[#names + 1] = k end
  table.sort(names)
  for _, mt in ipairs(names) do
    for _, tied in ipairs {false, true} do
      it(("gives the same units as auto on %s (%s)"):format(mt, tied and "tied" or "untied"), function()
        local m = build(mt, tied)
        assert.same(plan.resolve(m, "auto"), plan.resolve(m, "declared"))
        assert.same(plan.resolve(m, "auto"), plan.resolve(m, {mode = "declared"}))
        -- options act the same on both
        local o = {reshard_after_forward = false, mixed_precision = {param_dtype = "bf16"}}
        assert.same(plan.resolve(m, "auto", o), plan.resolve(m, "declared", o))
      end)
    end
  end

  it("is an error on a model that declares no plan", function()
    local m = build("llama", false)
    m.fsdp_plan = nil
    has(err_of(plan.resolve, m, "declared"), "plan: declared", "no fsdp_plan")
  end)
end)

describe("plan manual", function()
  it("makes one unit per match, one per group, nested units bottom-up, the rest in the root", function()
    local m = build("llama", false)
    local units = plan.resolve(m, {mode = "manual", mixed_precision = {param_dtype = "bf16"}, modules = {
      ["model.layers.*.mlp"] = {"free_full_weight", cpu_offload = true},
      ["model.layers.*"] = "keep_full_weight",
      {group = {"model.embed_tokens", "lm_head"}, mixed_precision = {param_dtype = "f32", reduce_dtype = "f32"}},
    }})
    local bf16 = {mixed_precision = {param_dtype = "bf16"}}
    local mlp_opts = {mixed_precision = {param_dtype = "bf16"}, cpu_offload = true}
    assert.same({
      unit("model.embed_tokens", {"model.embed_tokens", "lm_head"}, {"model.embed_tokens.weight", "lm_head.weight"},
           true, {mixed_precision = {param_dtype = "f32", reduce_dtype = "f32"}}),
      unit("model.layers.0.mlp", {"model.layers.0.mlp"}, prefixed("model.layers.0.", LLAMA_MLP), true, mlp_opts),
      unit("model.layers.0", {"model.layers.0"}, prefixed("model.layers.0.", {LLAMA_ATTN[1], LLAMA_ATTN[2],
           LLAMA_ATTN[3], LLAMA_ATTN[4], LLAMA_ATTN[5], LLAMA_ATTN[6], LLAMA_ATTN[7], LLAMA_ATTN[8],
           LLAMA_NORMS[1], LLAMA_NORMS[2]}), false, bf16),
      unit("model.layers.1.mlp", {"model.layers.1.mlp"}, prefixed("model.layers.1.", LLAMA_MLP), true, mlp_opts),
      unit("model.layers.1", {"model.layers.1"}, prefixed("model.layers.1.", {LLAMA_ATTN[1], LLAMA_ATTN[2],
           LLAMA_ATTN[3], LLAMA_ATTN[4], LLAMA_ATTN[5], LLAMA_ATTN[6], LLAMA_ATTN[7], LLAMA_ATTN[8],
           LLAMA_NORMS[1], LLAMA_NORMS[2]}), false, bf16),
      unit("root", {""}, {"model.norm.weight"}, false, bf16),
    }, units)
    -- mode may be left out when modules is a table; keyed options and flag strings mean the same
    assert.same(plan.resolve(m, {modules = {["model.layers.*"] = {keep_full_weight = true}}}),
                plan.resolve(m, {mode = "manual", modules = {["model.layers.*"] = "keep_full_weight"}}))
  end)

  it("merges units that share a tied weight (keeping the full weight) and lists root users as extra modules",
     function()
    local m = build("gpt2", true)
    local tied = {["transformer.wte.weight"] = {names = {"transformer.wte.weight", "lm_head.weight"},
                                                modules = {"transformer.wte", "lm_head"}}}
    local units = plan.resolve(m, {modules = {["transformer.wte"] = "free_full_weight", ["lm_head"] = {},
                                              ["transformer.h.*"] = {}}})
    assert.same(unit("transformer.wte", {"transformer.wte", "lm_head"}, {"transformer.wte.weight"}, true,
                     {tied = tied}), units[1])
    units = plan.resolve(m, {modules = {["transformer.wte"] = "free_full_weight", ["lm_head"] = "keep_full_weight"}})
    assert.is_false(units[1].reshard_after_forward)
    -- lm_head left to the root: the weight stays in wte's unit, and lm_head must unshard that unit too
    units = plan.resolve(m, {modules = {["transformer.wte"] = {}}})
    assert.same(unit("transformer.wte", {"transformer.wte"}, {"transformer.wte.weight"}, true,
                     {tied = tied, extra_modules = {"lm_head"}}), units[1])
    assert.equal("root", units[2].name)
    for _, p in ipairs(units[2].params) do assert.are_not.equal("transformer.wte.weight", p) end
    -- merged units must agree on offload
    has(err_of(plan.resolve, m, {modules = {["transformer.wte"] = "cpu_offload", ["lm_head"] = {}}}),
        "tied parameter 'transformer.wte.weight'", "cpu_offload differ")
  end)
end)

describe("plan function", function()
  local function blocks_and_head(name, mod)
    if mod.is_block then return {"free_full_weight"} end
    if name == "lm_head" then return "keep_full_weight" end
    return nil
  end

  it("makes a unit of every module the function answers for", function()
    local m = build("llama", false)
    local expected = {
      unit("model.layers.0", {"model.layers.0"}, prefixed("model.layers.0.", LLAMA_LAYER), true),
      unit("model.layers.1", {"model.layers.1"}, prefixed("model.layers.1.", LLAMA_LAYER), true),
      unit("lm_head", {"lm_head"}, {"lm_head.weight"}, false),
      unit("root", {""}, {"model.embed_tokens.weight", "model.norm.weight"}, false),
    }
    assert.same(expected, plan.resolve(m, {mode = "function", modules = blocks_and_head}))
    assert.same(expected, plan.resolve(m, {modules = blocks_and_head}))
  end)

  it("sees every module but the root, in pre-order", function()
    local m = build("gpt2", false)
    local seen = {}
    plan.resolve(m, {modules = function(name) seen[#seen + 1] = name end})
    local expected = {}
    for name in m:named_modules() do if name ~= "" then expected[#expected + 1] = name end end
    assert.same(expected, seen)
    assert.equal("transformer", seen[1])
  end)

  it("validates what the function returns, naming the module", function()
    local m = build("gpt2", false)
    has(err_of(plan.resolve, m, {modules = function(name) if name == "lm_head" then return {fast = true} end end}),
        "function plan: module 'lm_head'", "unknown option 'fast'")
    -- the function's own errors pass through unchanged
    has(err_of(plan.resolve, m, {modules = function() error("boom from the plan") end}), "boom from the plan")
  end)
end)

describe("plan validation", function()
  local m = build("llama", false)

  it("names a pattern that matches nothing", function()
    has(err_of(plan.resolve, m, {modules = {["model.layer.*"] = {}}}), "pattern 'model.layer.*' matches no module")
    -- `*` is exactly one segment: it neither matches zero segments nor two
    has(err_of(plan.resolve, m, {modules = {["model.*.mlp"] = {}}}), "'model.*.mlp' matches no module")
    has(err_of(plan.resolve, m, {modules = {{group = {"lm_head", "model.nrom"}}}}), "entry 1",
        "'model.nrom' matches no module")
    has(err_of(plan.resolve, m, {modules = {["model.lay*"] = {}}}), "'*' must be a whole name segment")
  end)

  it("names an unknown option and lists the valid ones", function()
    has(err_of(plan.resolve, m, {modules = {["model.layers.*"] = {reshard = true}}}), "pattern 'model.layers.*'",
        "unknown option 'reshard'", "valid: cpu_offload, free_full_weight, keep_full_weight, mixed_precision")
    has(err_of(plan.resolve, m, {modules = {["lm_head"] = "free_weight"}}), "pattern 'lm_head'",
        "unknown option 'free_weight'")
    has(err_of(plan.resolve, m, {modules = {["lm_head"] = {cpu_offload = "yes"}}}),
        "option 'cpu_offload' must be a boolean")
  end)

  it("rejects contradictory options", function()
    has(err_of(plan.resolve, m, {modules = {["lm_head"] = {"free_full_weight", "keep_full_weight"}}}),
        "pattern 'lm_head'", "contradictory options free_full_weight", "keep_full_weight")
    has(err_of(plan.resolve, m, {modules = {["lm_head"] = {free_full_weight = false, keep_full_weight = false}}}),
        "contradictory options")
    has(err_of(plan.resolve, m, {modules = {["lm_head"] = {"free_full_weight", free_full_weight = false}}}),
        "'free_full_weight' is given twice")
  end)

  it("names a module claimed by two patterns", function()
    local msg = err_of(plan.resolve, m, {modules = {["model.layers.*"] = {}, ["model.layers.1"] = {}}})
    has(msg, "module 'model.layers.1' is claimed by both", "pattern 'model.layers.*'", "pattern 'model.layers.1'")
    msg = err_of(plan.resolve, m, {modules = {["lm_head"] = {}, {group = {"model.norm", "lm_head"}}}})
    has(msg, "module 'lm_head' is claimed by both", "pattern 'lm_head'", "entry 1")
  end)

  it("checks mixed_precision keys and dtypes", function()
    has(err_of(plan.resolve, m, {modules = {["lm_head"] = {mixed_precision = {param_type = "bf16"}}}}),
        "unknown key 'param_type'", "valid: output_dtype, param_dtype, reduce_dtype")
    has(err_of(plan.resolve, m, {modules = {["lm_head"] = {mixed_precision = {param_dtype = "bfloat16"}}}}),
        "mixed_precision.param_dtype: unknown dtype 'bfloat16'", "valid: bf16, f16, f32, f64")
    has(err_of(plan.resolve, m, {mode = "auto", mixed_precision = {reduce_dtype = "i32"}}), "unknown dtype 'i32'")
  end)

  it("rejects bad plan values, keys, modes and options, listing the valid ones", function()
    has(err_of(plan.resolve, m, 42), "plan: a plan must be \"auto\", \"declared\" or a table", "got number")
    has(err_of(plan.resolve, m, "fast"), "got 'fast'")
    has(err_of(plan.resolve, m, {mode = "auto", reshard = false}), "unknown key 'reshard'",
        "valid: cpu_offload, mixed_precision, mode, modules, reshard_after_forward")
    has(err_of(plan.resolve, m, {mode = "greedy"}), "unknown mode 'greedy'", "valid: auto, declared, function, manual")
    has(err_of(plan.resolve, m, {}), "needs mode")
    has(err_of(plan.resolve, m, {mode = "auto", modules = {}}), "auto: takes no modules")
    has(err_of(plan.resolve, m, {mode = "manual", modules = function() end}),
        "manual: modules must be a table")
    has(err_of(plan.resolve, m, {mode = "function", modules = {}}), "function: modules must be a function")
    has(err_of(plan.resolve, m, "auto", {mesh = 1}), "unknown option 'mesh'",
        "valid: cpu_offload, mixed_precision, reshard_after_forward")
    has(err_of(plan.resolve, m, {mode = "auto", cpu_offload = true}, {cpu_offload = false}),
        "cpu_offload is true in the plan but false in the options")
    has(err_of(plan.explain, m, "auto", 0), "world_size must be a positive integer")
  end)

  it("raises at the caller's line", function()
    local ok, e = pcall(function() plan.resolve(m, {modules = {["nothing"] = {}}}) end)
    assert.is_false(ok)
    has(e, "plan_spec.lua:")
  end)
end)

describe("plan explain", function()
  it("gives dim-0 row ranges per rank for uneven shapes (W = 2 and 3)", function()
    -- GPT-2 untied with n_positions = 2 so that wpe has 2 rows
    local m = build("gpt2", false, {n_positions = 2})
    local ex3 = plan.explain(m, "auto", 3)
    assert.equal(3, ex3.world_size)
    local emb = ex3.units[1]
    assert.same({"transformer.wte", "transformer.wpe"}, emb.modules)
    -- wte [101, 32]: ceil(101/3) = 34 rows per rank -> 34, 34, 33
    local s = emb.shards["transformer.wte.weight"]
    assert.same({101, 32}, s.shape)
    assert.equal(34, s.rows_per_rank)
    assert.equal(102, s.padded_rows)
    assert.same({[0] = {0, 34}, {34, 34}, {68, 33}}, s.ranges)
    assert.same({[0] = 34 * 32, 34 * 32, 33 * 32}, s.numel_per_rank)
    -- wpe [2, 32]: ceil(2/3) = 1 -> 1, 1, 0
    s = emb.shards["transformer.wpe.weight"]
    assert.equal(1, s.rows_per_rank)
    assert.same({[0] = {0, 1}, {1, 1}, {2, 0}}, s.ranges)
    -- the unit: 34*32 + 1*32 = 1120 elements per rank before padding on ranks 0 and 1, 33*32 + 0 = 1056 on rank 2;
    -- its all-gather buffer holds (34 + 1) * 32 = 1120 per rank
    assert.same({[0] = 1120, 1120, 1056}, emb.numel_per_rank)
    assert.equal(1120, emb.padded_numel_per_rank)
    assert.equal(3360, emb.padded_numel)
    assert.equal(101 * 32 + 2 * 32, emb.numel)
    -- a block's 1-D c_fc bias [128]: ceil(128/3) = 43 -> 43, 43, 42
    assert.same({[0] = {0, 43}, {43, 43}, {86, 42}}, ex3.units[2].shards["transformer.h.0.mlp.c_fc.bias"].ranges)

    local ex2 = plan.explain(m, "auto", 2)
    s = ex2.units[1].shards["transformer.wte.weight"]
    -- ceil(101/2) = 51 -> 51, 50
    assert.equal(51, s.rows_per_rank)
    assert.same({[0] = {0, 51}, {51, 50}}, s.ranges)
    assert.same({[0] = {0, 1}, {1, 1}}, ex2.units[1].shards["transformer.wpe.weight"].ranges)
    -- the per-rank totals add up to the model's size, which named_parameters counts another way
    local total = 0
    for _, p in ipairs(m:parameters()) do total = total + p:numel() end
    for _, ex in ipairs {ex2, ex3} do
      local sum = 0
      for r = 0, ex.world_size - 1 do sum = sum + ex.numel_per_rank[r] end
      assert.equal(total, sum)
      assert.equal(total, ex.numel)
    end
  end)

  it("shards Llama's k_proj [16, 32] as 6, 6, 4 rows over 3 ranks and keeps a tied weight once", function()
    local m = build("llama", true)
    local ex = plan.explain(m, "auto", 3)
    local s = ex.units[2].shards["model.layers.0.self_attn.k_proj.weight"]
    assert.equal(6, s.rows_per_rank)
    assert.same({[0] = {0, 6}, {6, 6}, {12, 4}}, s.ranges)
    assert.same({[0] = 192, 192, 128}, s.numel_per_rank)
    assert.is_nil(ex.units[1].shards["lm_head.weight"])
    assert.same({[0] = {0, 34}, {34, 34}, {68, 33}}, ex.units[1].shards["model.embed_tokens.weight"].ranges)
  end)

  it("exports the same row math for plain shapes (dim0_shard)", function()
    -- 5 rows over 4 ranks: ceil(5/4) = 2 -> 2, 2, 1, 0; rows of 3 elements
    local s = plan.dim0_shard({5, 3}, 4)
    assert.same({[0] = {0, 2}, {2, 2}, {4, 1}, {5, 0}}, s.ranges)
    assert.same({[0] = 6, 6, 3, 0}, s.numel_per_rank)
    assert.equal(6, s.padded_numel_per_rank)
    assert.equal(8, s.padded_rows)
    -- one rank holds everything
    assert.same({[0] = {0, 5}}, plan.dim0_shard({5, 3}, 1).ranges)
  end)

  it("prints a readable table", function()
    local ex = plan.explain(build("gpt2", true), "auto", 2)
    local text = tostring(ex)
    assert.equal(text, plan.format(ex))
    -- the table fsdp.shards prints (spec/dist/explain_memory_spec.lua checks it against real shards): the root
    -- holds nothing here, so it makes no unit; wte [101, 32] f32 is 51 rows (6528 B = 6.38 KiB) on rank 0, 50 on 1
    has(text, "FSDP plan: 3 units over 2 ranks, 29,728 parameters",
        "unit 1  transformer.wte  [keep_full_weight]\n",
        "modules: transformer.wte, transformer.wpe, transformer.ln_f, lm_head",
        "transformer.wte.weight", "[101, 32]", "[0, 51)  6.38 KiB  [51, 101)  6.25 KiB",
        "(tied: transformer.wte.weight = lm_head.weight)",
        "unit 2  transformer.h.0  [free_full_weight]\n",
        "(root: no parameters left, so no unit)",
        "memory per rank (estimated)", "optim (AdamW: exp_avg + exp_avg_sq)")
  end)
end)
