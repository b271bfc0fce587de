-- spec/hardening_spec.lua: bad input a new user may pass gets a clear error naming what was wrong, or torch's
-- result, never a crash, a hang or memory corruption (issue: "no crash, no hang, no silent wrong answer").
-- Multi-rank failures are in spec/dist/; sharded-model misuse in spec/plan_spec.lua.
local fsdp = require "fsdp"

local function err_of(f, ...)
  local ok, e = pcall(f, ...)
  assert.is_false(ok, "expected an error")
  return tostring(e)
end

describe("shapes", function()
  it("overflowing element counts and byte sizes are errors naming the shape", function()
    assert.matches("shape [4611686018427387904, 4] has more than 2^63 elements",
                   err_of(fsdp.zeros, {2 ^ 62, 4}), 1, true)
    assert.matches("shape [1099511627776, 1073741824] has more than 2^63 elements",
                   err_of(fsdp.zeros, {2 ^ 40, 2 ^ 30}), 1, true)
    -- fits in elements, not in bytes; meta allocates nothing and is still checked
    assert.matches("shape [2147483648, 2147483648] of f32 is more than 2^63 bytes",
                   err_of(fsdp.zeros, {2 ^ 31, 2 ^ 31}, {device = "meta"}), 1, true)
    assert.matches("negative size -1 in dim 0 of [-1, 4]", err_of(fsdp.zeros, {-1, 4}), 1, true)
    assert.matches("size 1 is 1.1805916207174e+21, more than an int64 holds", err_of(fsdp.zeros, {2 ^ 70, 4}), 1, true)
    assert.matches("size 2 is inf", err_of(fsdp.zeros, {2, 1 / 0}), 1, true)
    local t = fsdp.zeros({2, 3})
    assert.matches("view: shape [4611686018427387904, 4] has more than 2^63 elements",
                   err_of(function() return t:view(2 ^ 62, 4) end), 1, true)
    assert.matches("expand: cannot expand [2, 3] to [4611686018427387904, 3]",
                   err_of(function() return t:expand(2 ^ 62, 3) end), 1, true)
    assert.matches("expand: bad size -5", err_of(function() return fsdp.zeros({1, 3}):expand(-5, 3) end), 1, true)
    assert.matches("narrow: rows [1, 6) out of range for dim 0 of [2, 3]",
                   err_of(function() return t:narrow(1, 2, 5) end), 1, true)
    assert.matches("narrow", err_of(function() return t:narrow(1, 2, 2 ^ 62) end), 1, true)
  end)

  it("out-of-range and non-integer get errors like set", function()
    local t = fsdp.zeros({2, 3})
    for _, i in ipairs {6, -1, 2 ^ 62, 1 / 0} do
      assert.matches(("get: index %s out of range for [2, 3] (6 elements; indices are 0-based)"):format(tostring(i)),
                     err_of(function() return t:get(i) end), 1, true)
      assert.matches(("set: index %s out of range for [2, 3]"):format(tostring(i)),
                     err_of(function() return t:set(i, 1) end), 1, true)
    end
    assert.matches("get: index must be an integer, got 1.5", err_of(function() return t:get(1.5) end), 1, true)
    assert.matches("set: index must be an integer, got nan", err_of(function() return t:set(0 / 0, 1) end), 1, true)
    assert.matches("get: index must be an integer, got nil", err_of(function() return t:get(nil) end), 1, true)
    assert.matches("set: value must be a number or a boolean, got string", err_of(function() return t:set(0, "x") end),
                   1, true)
    assert.matches("get: tensor [2] is on meta (materialise it first)",
                   err_of(function() return fsdp.zeros({2}, {device = "meta"}):get(0) end), 1, true)
    t:set(5, 7)
    assert.equal(7, t:get(5))
  end)
end)

describe("empty batches and sequences", function()
  for _, mt in ipairs {"gpt2", "llama"} do
    it(mt .. " gives torch's result: empty logits, a NaN loss (a mean over no targets) and zero gradients", function()
      local model = fsdp.models.build(fsdp.models.tiny_config(mt), {seed = 1})
      -- T = 0 once wrote the shifted label of position -1 (heap corruption); T = 1 has no next token either
      for _, shape in ipairs {{1, 0}, {3, 0}, {0, 5}, {0, 0}, {2, 1}} do
        local ids = fsdp.zeros(shape, {dtype = "i64"})
        local fused = model(ids, {labels = ids})   -- the head and the loss in one op: NaN too
        assert.is_true(fused.loss:item() ~= fused.loss:item(), "fused loss of an empty target set must be NaN")
        local out = model(ids, {labels = ids, logits = true})
        assert.same({shape[1], shape[2], 101}, out.logits:shape())
        local loss = out.loss:item()
        assert.is_true(loss ~= loss, "loss of an empty target set must be NaN")
        out.loss:backward()
        for name, p in model:named_parameters() do
          local g = p.grad
          if g then assert.equal(0, fsdp.F.sum_squares(g), name) end
        end
        model:zero_grad()
      end
    end)
  end
end)

describe("configs", function()
  local cases = {
    {"gpt2", {n_layer = -2}, "n_layer must be a positive integer, got -2"},
    {"gpt2", {n_layer = 0}, "n_layer must be a positive integer, got 0"},
    {"gpt2", {n_embd = 32.5}, "n_embd must be a positive integer, got 32.5"},
    {"gpt2", {n_head = "4"}, "n_head must be a positive integer, got '4'"},
    {"gpt2", {layer_norm_epsilon = -1e-5}, "layer_norm_epsilon must be a positive number, got -1e-05"},
    {"gpt2", {attn_pdrop = 1}, "attn_pdrop must be a number in [0, 1), got 1"},
    {"gpt2", {resid_pdrop = -0.1}, "resid_pdrop must be a number in [0, 1), got -0.1"},
    {"gpt2", {activation_function = 3}, "activation_function must be a string, got 3"},
    {"gpt2", {tie_word_embeddings = 1}, "tie_word_embeddings must be a boolean, got 1"},
    {"gpt2", {vocab_size = 1 / 0}, "vocab_size must be a positive integer, got inf"},
    {"llama", {rms_norm_eps = 0}, "rms_norm_eps must be a positive number, got 0"},
    {"llama", {num_key_value_heads = 0}, "num_key_value_heads must be a positive integer, got 0"},
    {"llama", {intermediate_size = -1}, "intermediate_size must be a positive integer, got -1"},
    {"llama", {attention_dropout = 2}, "attention_dropout must be a number in [0, 1), got 2"},
    {"llama", {eos_token_id = {2, -1}}, "eos_token_id must be a token id"},
    {"llama", {hidden_act = true}, "hidden_act must be a string, got true"},
  }
  it("are validated when made, naming the key", function()
    for _, c in ipairs(cases) do
      assert.matches("config: " .. c[1] .. ": " .. c[3], err_of(fsdp.models.config, c[1], c[2]), 1, true)
    end
    assert.is_table(fsdp.models.config("llama", {eos_token_id = {2, 3}}))   -- HF allows a list of eos ids
  end)
  it("and again when built, after edits", function()
    local cfg = fsdp.models.tiny_config("gpt2")
    cfg.n_layer = -1
    assert.matches("config: gpt2: n_layer must be a positive integer, got -1", err_of(fsdp.models.build, cfg), 1, true)
  end)
end)

describe("sharding a model", function()
  local function meta_model() return fsdp.models.build(fsdp.models.tiny_config("gpt2"), {device = "meta", seed = 3}) end
  local ids = fsdp.tensor({{1, 2, 3, 4}}, {dtype = "i64"})

  it("apply_plan is atomic: a failing plan leaves the model as it was and a retry works", function()
    local model = meta_model()
    local before = {}
    for name, p in model:named_parameters() do before[name] = p end
    local bad = {
      {mode = "manual", modules = {["transformer.h.*"] = "free_full_weight", ["nope.*"] = "free_full_weight"}},
      {mode = "manual", modules = {["transformer.h.*"] = {"free_full_weight", mixed_precision = {param_dtype = "f8"}}}},
    }
    for _, plan in ipairs(bad) do
      assert.is_false(pcall(fsdp.apply_plan, model, plan, {seed = 3}))
      assert.is_nil(require("fsdp.parallel").group(model))
      for name, p in model:named_parameters() do
        assert.equal(before[name], p, name)            -- the same tensor objects, none replaced by a shard
        assert.equal("meta", p.device, name)
      end
    end
    assert.is_false(pcall(fsdp.apply_plan, model, "auto", {seed = 3, mixed_precision = {param_dtype = "f8"}}))
    fsdp.apply_plan(model, "auto", {seed = 3})
    local ref = fsdp.models.build(fsdp.models.tiny_config("gpt2"), {seed = 3})
    assert.equal(ref(ids, {labels = ids}).loss:item(), model(ids, {labels = ids}).loss:item())
  end)

  it("explain and apply_plan accept the same options (f16 included) and reject the same ones", function()
    for _, dt in ipairs {"f16", "bf16"} do
      local opts = {mixed_precision = {param_dtype = dt, reduce_dtype = dt}}
      local ex = fsdp.explain(meta_model(), "auto", 2, opts)
      assert.equal(dt, ex.units[1].mixed_precision.param_dtype)
      local model = meta_model()
      fsdp.apply_plan(model, "auto", {seed = 3, mixed_precision = opts.mixed_precision})
      local loss = model(ids, {labels = ids}).loss
      loss:backward()
      assert.is_true(loss:item() > 0)
    end
    local bad = {mixed_precision = {param_dtype = "f8"}}
    local e1 = err_of(fsdp.explain, meta_model(), "auto", 2, bad)
    local e2 = err_of(fsdp.apply_plan, meta_model(), "auto", bad)
    assert.matches("mixed_precision.param_dtype: unknown dtype 'f8'", e1, 1, true)
    assert.equal(e1:gsub("^.-:%d+: ", ""), (e2:gsub("^.-:%d+: ", "")))
  end)

  it("plan errors point at the user's line", function()
    local e = err_of(fsdp.apply_plan, meta_model(), {mode = "manual", modules = {["nope.*"] = "free_full_weight"}})
    -- pcall calls apply_plan directly, so the error points at the first frame outside the library: none, or ours
    assert.is_nil(e:find("lua/fsdp/", 1, true), e)
    local line
    local ok, e2 = pcall(function()
      line = debug.getinfo(1, "l").currentline + 1
      fsdp.explain(meta_model(), {mode = "manual", modules = {["nope.*"] = "free_full_weight"}}, 2)
    end)
    assert.is_false(ok)
    assert.matches("hardening_spec.lua:" .. line .. ": plan: manual: pattern 'nope.*' matches no module", e2, 1, true)
    local ok3, e3 = pcall(function() fsdp.fully_shard(meta_model(), {mp_policy = {param_dtype = 1}}) end)
    assert.is_false(ok3)
    assert.matches("hardening_spec.lua:%d+: plan: fully_shard: mixed_precision.param_dtype: unknown dtype '1'", e3)
  end)

  it("fully_shard on meta without materialize errors at the first forward instead of training from zeros", function()
    local model = meta_model()
    for _, m in model:named_modules() do if m.is_block then fsdp.fully_shard(m) end end
    fsdp.fully_shard(model)
    local e = err_of(function() return model(ids, {labels = ids}) end)
    assert.matches("was sharded on meta and is not initialised: call model:materialize{seed = ...}", e, 1, true)
    assert.matches("hardening_spec.lua:%d+:", e)
    model:materialize{seed = 3}
    local ref = fsdp.models.build(fsdp.models.tiny_config("gpt2"), {seed = 3})
    assert.equal(ref(ids, {labels = ids}).loss:item(), model(ids, {labels = ids}).loss:item())
  end)
end)
