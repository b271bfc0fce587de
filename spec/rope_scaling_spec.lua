-- spec/rope_scaling_spec.lua: scaled RoPE (rope_type linear, dynamic, yarn, llama3, longrope) against transformers'
-- own models (spec/reference/make_rope_fixtures.py -> spec/fixtures/rope): logits at 40 positions, past every
-- original_max_position_embeddings, and inside it; dynamic's state across forwards; greedy generate with the KV
-- cache against transformers' generate and against recomputing every step without a cache; v4 rope_scaling +
-- rope_theta configs folded into v5 rope_parameters; the engine op's gradient; refusals of bad rope configs.
local fsdp = require "fsdp"
local st = require "fsdp.safetensors"
local models = require "fsdp.models"
local ops = require "fsdp.nn.ops"
local gradcheck = require("gradcheck").gradcheck

local ROOT = "spec/fixtures/rope/"
local CASES = {"llama_linear", "llama_dynamic_v4", "llama_llama3", "qwen2_yarn_v4", "qwen3_yarn_mscale",
               "mistral_dynamic", "phi3_longrope_v4"}

-- max |a - b| / max |b|: relative to the tensor's scale, so near-zero entries do not dominate.
local function rel_err(a, b)
  local x, y = a:totable(), b:totable()
  assert.equal(#y, #x)
  local d, s = 0, 0
  for i = 1, #x do d = math.max(d, math.abs(x[i] - y[i])); s = math.max(s, math.abs(y[i])) end
  return d / math.max(s, 1e-30)
end

local function prefix(ids, n)
  local v = ids:narrow(2, 1, n)
  local c = v:contiguous(); v:free()
  return c
end

local function flat(t)
  local out = {}
  for i, v in ipairs(t:totable()) do out[i] = v end
  return out
end

-- f32 forward of a one-layer model in torch's op order; 1e-5 relative as models_spec (measured below 1e-6)
local TOL = 1e-5

for _, name in ipairs(CASES) do
  describe("scaled RoPE fixture " .. name, function()
    local dir = ROOT .. name
    local ex = st.load(dir .. "/expected.safetensors")

    it("matches transformers' logits past and inside the original length", function()
      local m = models.from_pretrained(dir)
      local out = m(ex.input_ids, {logits = true})
      local e = rel_err(out.logits, ex.logits)
      assert.is_true(e < TOL, "logits (40 positions) " .. e)
      local m2 = models.from_pretrained(dir)
      local short = prefix(ex.input_ids, 12)
      e = rel_err(m2(short, {logits = true}).logits, ex.logits_short)
      assert.is_true(e < TOL, "logits (12 positions) " .. e)
    end)

    it("keeps transformers' state across forwards (dynamic: the longest length seen)", function()
      local m = models.from_pretrained(dir)
      m(ex.input_ids, {logits = true})
      local e = rel_err(m(prefix(ex.input_ids, 20), {logits = true}).logits, ex.logits_after)
      assert.is_true(e < TOL, "logits after a longer forward " .. e)
    end)

    -- generate with each step's logits and input width recorded by a forward hook on the model
    local function generate(m)
      local steps, widths = {}, {}
      m:register_forward_hook(function(_, args, out)
        widths[#widths + 1] = args[1]:size(2)
        steps[#steps + 1] = out.logits:contiguous()
      end)
      local got = m:generate(prefix(ex.input_ids, 12), {max_new_tokens = 20, eos_token_id = {}})
      return got, steps, widths
    end

    it("generates transformers' tokens and step logits with the KV cache", function()
      local got, steps, widths = generate(models.from_pretrained(dir))
      assert.same(flat(ex.gen_tokens), flat(got))
      local V = ex.gen_logits:size(2)
      for i, lg in ipairs(steps) do
        local want = ex.gen_logits:narrow(1, i, 1):contiguous()
        local e = rel_err(lg:view({1, V}), want)
        assert.is_true(e < TOL, ("step %d logits %g"):format(i, e))
      end
      -- Phi-3 recomputes the whole sequence once, at its first forward past original_max_position_embeddings
      -- (16): transformers' Phi3ForCausalLM.prepare_inputs_for_generation
      local want_widths = {12}
      for i = 2, 20 do want_widths[i] = (name:find("phi3") and i == 6) and 17 or 1 end
      assert.same(want_widths, widths)
    end)

    if not name:find("dynamic") then
      -- dynamic differs by design: with a cache transformers rotates each new token with the frequencies of its
      -- own length while the cached keys keep theirs; a recompute rotates everything with the final length's
      it("gives with the KV cache the logits of recomputing every step without a cache", function()
        local got, steps = generate(models.from_pretrained(dir))
        local fresh = models.from_pretrained(dir)
        for i, lg in ipairs(steps) do
          local ids = prefix(got, 11 + i)
          local all = fresh(ids, {logits = true}).logits
          local last = all:narrow(2, 11 + i, 1):contiguous()
          local e = rel_err(lg, last)
          assert.is_true(e < TOL, ("step %d: cached vs recomputed logits %g"):format(i, e))
        end
      end)
    end
  end)
end

describe("scaled RoPE configs", function()
  local function err_of(fn, ...)
    local ok, err = pcall(fn, ...)
    assert.is_false(ok, "expected an error")
    return tostring(err)
  end

  it("folds v4 rope_scaling and rope_theta into v5 rope_parameters", function()
    local cfg = models.config("llama", {max_position_embeddings = 16, rope_theta = 5000.0,
                                        rope_scaling = {type = "dynamic", factor = 3.0}})
    assert.same({rope_type = "dynamic", factor = 3.0, rope_theta = 5000.0}, cfg.rope_parameters)
    assert.is_nil(cfg.rope_theta); assert.is_nil(cfg.rope_scaling)
    -- Phi-3: su and yarn are longrope there; original_max_position_embeddings comes from the top-level key
    local p = models.config("phi3", {hidden_size = 64, num_attention_heads = 4, max_position_embeddings = 64,
      original_max_position_embeddings = 16, partial_rotary_factor = 0.5, rope_theta = 10000.0,
      rope_scaling = {type = "su", short_factor = {1, 1, 1, 1}, long_factor = {2, 2, 2, 2},
                      original_max_position_embeddings = 99}})
    assert.same({rope_type = "longrope", rope_theta = 10000.0, partial_rotary_factor = 0.5,
                 short_factor = {1, 1, 1, 1}, long_factor = {2, 2, 2, 2}, original_max_position_embeddings = 16},
                p.rope_parameters)
    -- llama3 without the key takes max_position_embeddings, as transformers' standardize_rope_params
    local l3 = models.config("llama", {max_position_embeddings = 128, rope_parameters = {rope_type = "llama3",
      factor = 8.0, low_freq_factor = 1.0, high_freq_factor = 4.0}})
    assert.equal(128, l3.rope_parameters.original_max_position_embeddings)
  end)

  it("refuses rope configs transformers refuses, naming the key", function()
    local cases = {
      {"llama", {rope_parameters = {rope_type = "linear"}}, "rope_type 'linear' needs rope parameter 'factor'"},
      {"llama", {rope_parameters = {rope_type = "dynamic", factor = 2, low_freq_factor = 1}},
       "rope parameter 'low_freq_factor' is not supported with rope_type 'dynamic'"},
      {"llama", {rope_parameters = {rope_type = "ntk", factor = 2}},
       "rope_type 'ntk' is not supported %(valid: default, dynamic, linear, llama3, longrope, yarn%)"},
      {"llama", {rope_parameters = {rope_type = "linear", factor = -1}}, "'factor' must be a number > 0, got %-1"},
      {"phi3", {rope_parameters = {rope_type = "linear", factor = 2}},
       "rope_type 'linear' is not supported %(valid: default, longrope%)"},
      {"phi3", {hidden_size = 64, num_attention_heads = 4, rope_parameters = {rope_type = "longrope",
        short_factor = {1, 1}, long_factor = {1, 1}}}, "longrope short_factor must list 8 positive numbers"},
      {"llama", {rope_parameters = {rope_type = "llama3", factor = 8, low_freq_factor = 4, high_freq_factor = 1,
        original_max_position_embeddings = 8}}, "high_freq_factor 1 must exceed low_freq_factor 4"},
    }
    for _, c in ipairs(cases) do
      local e = err_of(models.config, c[1], c[2])
      assert.truthy(e:find(c[3]), e)
    end
  end)
end)

describe("rope_freqs (the engine op)", function()
  local function x64(seed)
    local t = fsdp.randn({1, 3, 2, 8}, {dtype = "f64", seed = seed, name = "rope"})
    t.requires_grad = true
    return t
  end
  local pos = fsdp.tensor({5, 17, 40}, {dtype = "i64"})

  it("equals fl_rope with theta's frequencies, times the scaling", function()
    local inv = fsdp.tensor({1, 10000 ^ -0.25, 10000 ^ -0.5, 10000 ^ -0.75}, {dtype = "f32"})
    local x = fsdp.randn({1, 3, 2, 8}, {seed = 3, name = "rope"})
    assert.is_true(rel_err(ops.rope_freqs(x, pos, inv, 1.0), ops.rope(x, pos, 10000, 8)) < 1e-6)
    local scaled = ops.rope(x, pos, 10000, 8):totable()
    for i, v in ipairs(ops.rope_freqs(x, pos, inv, 1.25):totable()) do
      assert.is_true(math.abs(v - 1.25 * scaled[i]) < 1e-5, "element " .. i)
    end
  end)

  it("has the gradient of central differences", function()
    local inv = fsdp.tensor({0.9, 0.3, 0.05, 0.001}, {dtype = "f32"})
    local err, gmax = gradcheck(function(x) return ops.rope_freqs(x, pos, inv, 1.3) end, {x64(4)})
    assert.is_true(gmax > 0)
    assert.is_true(err < 1e-6, "max abs error " .. err)
  end)

  it("refuses a table of the wrong size or dtype", function()
    local x = fsdp.randn({1, 3, 2, 8}, {seed = 3, name = "rope"})
    local ok, e = pcall(ops.rope_freqs, x, pos, fsdp.tensor({1, 2, 3, 4, 5}, {dtype = "f32"}), 1.0)
    assert.is_false(ok); assert.truthy(tostring(e):find("rot_dim 10 must be even and in %(0, 8%]"), tostring(e))
    ok, e = pcall(ops.rope_freqs, x, pos, fsdp.tensor({1, 2}, {dtype = "f64"}), 1.0)
    assert.is_false(ok); assert.truthy(tostring(e):find("inv_freq must be f32 %[2%]"), tostring(e))
  end)
end)
