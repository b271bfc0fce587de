-- spec/hf_config_spec.lua: Hugging Face configs and checkpoints where the files and the config disagree or lose
-- their shape: list-valued keys written as JSON lists (empty or not) through save_pretrained and from_pretrained,
-- tie_word_embeddings over a checkpoint that stores its own head (against transformers' logits for the same files,
-- spec/fixtures/tied_head, made by spec/reference/make_tied_head_fixtures.py), MoE config errors that name the
-- key given, and out.logits of a forward that never made them.
local fsdp   = require "fsdp"
local st     = require "fsdp.safetensors"
local models = require "fsdp.models"

local function err_of(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error")
  return tostring(err)
end

local function tmpdir()
  local d = os.tmpname()
  os.remove(d)
  os.execute("mkdir -p " .. d)
  return d
end

local function slurp(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a"); f:close(); return s
end

local function spit(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s); f:close()
end

local function rel_err(a, b)
  local x, y = a:totable(), b:totable()
  assert.equal(#y, #x)
  local d, s = 0, 0
  for i = 1, #x do d = math.max(d, math.abs(x[i] - y[i])); s = math.max(s, math.abs(y[i])) end
  return d / math.max(s, 1e-30)
end

-- The line(s) of a config.json text that hold `key`, as save_pretrained writes it (2-space indent, sorted keys).
local function json_value(text, key)
  local from = text:find('\n  "' .. key .. '": ', 1, true)
  assert(from, key .. " not written in:\n" .. text)
  local v = text:sub(from + #key + 7)
  if v:sub(1, 2) == "[]" or v:sub(1, 2) == "{}" then return v:sub(1, 2) end
  if v:sub(1, 1) == "[" then return v:sub(1, (v:find("\n  ]", 1, true)) + 3) end
  return v:match("^[^,\n]*")
end

describe("list-valued config keys", function()
  -- Every registered model, with every list key it has, empty (where the key allows it) and not.
  local cases = {}
  local names = {}
  for mt in pairs(models.registry) do names[#names + 1] = mt end
  table.sort(names)
  for _, mt in ipairs(names) do
    cases[#cases + 1] = {mt, {eos_token_id = {1, 2}}, {eos_token_id = "[\n    1,\n    2\n  ]"}}
    local spec = models.registry[mt]
    if spec.schema.decoder_sparse_step then   -- Qwen2-MoE, Qwen3-MoE
      cases[#cases + 1] = {mt, {mlp_only_layers = {}}, {mlp_only_layers = "[]"}}
      cases[#cases + 1] = {mt, {mlp_only_layers = {1}}, {mlp_only_layers = "[\n    1\n  ]"}}
      cases[#cases + 1] = {mt, function() return {mlp_only_layers = models.empty_list()} end, {mlp_only_layers = "[]"}}
    end
    if spec.defaults.max_window_layers ~= nil and mt ~= "qwen3_moe" then   -- layer_types: Qwen2, Qwen3, Qwen2-MoE
      cases[#cases + 1] = {mt, {layer_types = {"full_attention", "full_attention"}},
                           {layer_types = '[\n    "full_attention",\n    "full_attention"\n  ]'}}
    end
  end

  for _, c in ipairs(cases) do
    local mt, over, want = c[1], c[2], c[3]
    local what = type(over) == "function" and "mlp_only_layers (models.empty_list())" or next(over)
    it(("%s: %s is written as a JSON list, and again after from_pretrained"):format(mt, what), function()
      local cfg = models.tiny_config(mt, type(over) == "function" and over() or over)
      local model = models.build(cfg, {seed = 7})
      local a, b = tmpdir(), tmpdir()
      models.save_pretrained(model, a)
      local text = slurp(a .. "/config.json")
      for k, v in pairs(want) do assert.equal(v, json_value(text, k), mt .. " " .. k) end
      assert.equal('[\n    "' .. model.model_spec.architectures[1] .. '"\n  ]', json_value(text, "architectures"))
      -- config.json read back and written again: the same text, list for list
      models.save_pretrained(models.from_pretrained(a), b)
      assert.equal(text, slurp(b .. "/config.json"))
      os.execute("rm -rf " .. a .. " " .. b)
    end)
  end

  it("keys this engine does not know keep [] and {} apart through from_pretrained and save_pretrained", function()
    local a, b = tmpdir(), tmpdir()
    models.save_pretrained(models.build(models.tiny_config("qwen3_moe"), {seed = 1}), a)
    local text = slurp(a .. "/config.json")
    local extra = '\n  "custom_list": [ ],\n  "custom_obj": {},\n  "custom_nested": {"x": [], "y": "[]"},'
    text = text:gsub('\n  "model_type"', extra .. '\n  "model_type"', 1)
    spit(a .. "/config.json", text)
    local m = models.from_pretrained(a)
    assert.equal(0, #m.config.custom_list)
    models.save_pretrained(m, b)
    local out = slurp(b .. "/config.json")
    assert.equal("[]", json_value(out, "custom_list"))
    assert.equal("{}", json_value(out, "custom_obj"))
    assert.truthy(out:find('"custom_nested": {\n    "x": [],\n    "y": "[]"\n  }', 1, true), out)
    os.execute("rm -rf " .. a .. " " .. b)
  end)

  it("an empty mlp_only_layers from config.json routes every layer, as transformers' []", function()
    local a = tmpdir()
    models.save_pretrained(models.build(models.tiny_config("qwen2_moe", {mlp_only_layers = {}}), {seed = 1}), a)
    local m = models.from_pretrained(a)
    assert.truthy(m.model.layers[1].mlp.experts, "layer 0 should route")
    assert.truthy(m.model.layers[2].mlp.experts, "layer 1 should route")
    os.execute("rm -rf " .. a)
  end)
end)

describe("tie_word_embeddings over a checkpoint with its own lm_head.weight (transformers 5's logits)", function()
  local ROOT = "spec/fixtures/tied_head"
  local EMB = {gpt2 = "transformer.wte", llama = "model.embed_tokens"}

  -- from_pretrained with io.stderr captured: the model and what it wrote there
  local function load_quiet(dir)
    local real, written = io.stderr, {}
    local fake = {write = function(_, ...) for _, s in ipairs{...} do written[#written + 1] = s end end,
                  flush = function() end}
    io.stderr = fake  -- luacheck: ignore 122
    local ok, m = pcall(models.from_pretrained, dir)
    io.stderr = real  -- luacheck: ignore 122
    assert(ok, m)
    return m, table.concat(written)
  end

  for _, base in ipairs {"gpt2", "llama"} do
    local function emb_of(m)
      for part in EMB[base]:gmatch("[^.]+") do m = m[part] end
      return m.weight
    end

    it(base .. ": both stored and different: loaded untied, said once on stderr, transformers' logits", function()
      local dir = ROOT .. "/" .. base .. "_tied_own_head"
      local ex = st.load(dir .. "/expected.safetensors")
      local m, err = load_quiet(dir)
      assert.is_false(m.config.tie_word_embeddings)
      assert.are_not.equal(emb_of(m), m.lm_head.weight)
      local _, n = err:gsub("from_pretrained", "")
      assert.equal(1, n, err)
      assert.truthy(err:find("lm_head.weight", 1, true), err)
      assert.truthy(err:find("untied", 1, true), err)
      -- the head is the stored one, bit for bit
      local stored = st.load(dir .. "/model.safetensors", {names = {"lm_head.weight"}})["lm_head.weight"]
      assert.equal(0, rel_err(m.lm_head.weight, stored))
      local logits = fsdp.no_grad(function() return m(ex.input_ids).logits end)
      -- f32, the same ops as torch eager: ~1e-7 apart (see models_spec); tying instead moves them by far more
      local e = rel_err(logits, ex.logits)
      assert.is_true(e < 1e-5, "logits differ from transformers' by " .. e)
      -- saved, it is an untied checkpoint that loads without a word
      local out = tmpdir()
      models.save_pretrained(m, out)
      assert.truthy(slurp(out .. "/config.json"):find('"tie_word_embeddings": false', 1, true))
      local again, err2 = load_quiet(out)
      assert.equal("", err2)
      assert.equal(0, rel_err(fsdp.no_grad(function() return again(ex.input_ids).logits end), logits))
      os.execute("rm -rf " .. out)
    end)

    it(base .. ": only the head stored: the embedding is tied to it, transformers' logits, nothing said", function()
      local dir = ROOT .. "/" .. base .. "_tied_head_only"
      local ex = st.load(dir .. "/expected.safetensors")
      local m, err = load_quiet(dir)
      assert.equal("", err)
      assert.is_true(m.config.tie_word_embeddings)
      assert.equal(emb_of(m), m.lm_head.weight)
      local e = rel_err(fsdp.no_grad(function() return m(ex.input_ids).logits end), ex.logits)
      assert.is_true(e < 1e-5, "logits differ from transformers' by " .. e)
    end)

    it(base .. ": both stored and equal: tied, nothing said", function()
      local src = "spec/fixtures/" .. base .. "_tied"
      local t = st.load(src .. "/model.safetensors")
      local key = EMB[base] .. ".weight"
      t["lm_head.weight"] = st.load(src .. "/model.safetensors", {names = {key}})[key]   -- a second copy
      local dir = tmpdir()
      st.save(dir .. "/model.safetensors", t, {format = "pt"})
      spit(dir .. "/config.json", slurp(src .. "/config.json"))
      local m, err = load_quiet(dir)
      assert.equal("", err)
      assert.is_true(m.config.tie_word_embeddings)
      assert.equal(emb_of(m), m.lm_head.weight)
      local ex = st.load(src .. "/expected.safetensors")
      local e = rel_err(fsdp.no_grad(function() return m(ex.input_ids).logits end), ex.logits)
      assert.is_true(e < 1e-5, "logits differ from transformers' by " .. e)
      os.execute("rm -rf " .. dir)
    end)
  end
end)

describe("MoE config errors name the model's own key", function()
  local CASES = {
    {"qwen3_moe", {num_experts = 0}, "qwen3_moe: num_experts must be a positive integer, got 0"},
    {"qwen3_moe", {num_experts = -2}, "qwen3_moe: num_experts must be a positive integer, got -2"},
    {"qwen3_moe", {num_experts = 2.5}, "qwen3_moe: num_experts must be a positive integer, got 2.5"},
    {"qwen3_moe", {num_experts = 2, num_experts_per_tok = 3}, "qwen3_moe: num_experts_per_tok 3 exceeds num_experts 2"},
    {"qwen3_moe", {num_experts_per_tok = 0}, "qwen3_moe: num_experts_per_tok must be a positive integer, got 0"},
    -- transformers writes Qwen3-MoE's count as num_local_experts (its attribute_map): that name is kept
    {"qwen3_moe", {num_local_experts = 0}, "qwen3_moe: num_local_experts must be a positive integer, got 0"},
    {"qwen2_moe", {num_experts = 0}, "qwen2_moe: num_experts must be a positive integer, got 0"},
    {"qwen2_moe", {num_experts = 2, num_experts_per_tok = 3}, "qwen2_moe: num_experts_per_tok 3 exceeds num_experts 2"},
    {"mixtral", {num_local_experts = 0}, "mixtral: num_local_experts must be a positive integer, got 0"},
    {"mixtral", {num_local_experts = 2, num_experts_per_tok = 3}, "mixtral: num_experts_per_tok 3 exceeds num_local_experts 2"},
    {"mixtral", {num_experts = 0}, "mixtral: num_experts must be a positive integer, got 0"},
  }
  for _, c in ipairs(CASES) do
    local mt, over, want = c[1], c[2], c[3]
    it(("%s %s"):format(mt, want:match(": (.*)$")), function()
      -- as config.json gives them (the full config: defaults elsewhere) and over the tiny test config
      local full = {}
      for k, v in pairs(over) do full[k] = v end
      assert.truthy(err_of(models.config, mt, full):find("config: " .. want, 1, true), want)
      assert.truthy(err_of(models.tiny_config, mt, over):find("config: " .. want, 1, true), want)
    end)
  end

  it("qwen3_moe: num_experts from config.json names num_experts in from_pretrained", function()
    local a = tmpdir()
    models.save_pretrained(models.build(models.tiny_config("qwen3_moe"), {seed = 1}), a)
    local text = slurp(a .. "/config.json"):gsub('"num_local_experts": 4', '"num_experts": 0')
    spit(a .. "/config.json", text)
    local err = err_of(models.from_pretrained, a)
    assert.truthy(err:find("num_experts must be a positive integer, got 0", 1, true), err)
    assert.falsy(err:find("num_local_experts", 1, true), err)
    os.execute("rm -rf " .. a)
  end)
end)

describe("out.logits of a forward with labels and no logits = true", function()
  for _, mt in ipairs {"gpt2", "llama", "qwen3_moe"} do
    it(mt .. ": reading it is an error that says to pass logits = true; loss (and aux_loss) are there", function()
      local m = models.build(models.tiny_config(mt), {seed = 3})
      local ids = fsdp.tensor({{1, 2, 3, 4, 5}}, {dtype = "i64"})
      local out = m(ids, {labels = ids})
      assert.is_true(fsdp.is_tensor(out.loss))
      if mt == "qwen3_moe" then assert.is_true(fsdp.is_tensor(out.aux_loss)) end
      local err = err_of(function() return out.logits end)
      assert.truthy(err:find("pass logits = true", 1, true), err)
      assert.truthy(err:find("hf_config_spec.lua", 1, true), "the error points at the caller: " .. err)
      assert.is_nil(out.anything_else)
      local with = m(ids, {labels = ids, logits = true})
      assert.same({1, 5, m.config.vocab_size}, with.logits:shape())
      assert.is_true(math.abs(with.loss:item() - out.loss:item()) <= 1e-5 * math.abs(out.loss:item()))
      assert.same({1, 5, m.config.vocab_size}, m(ids).logits:shape())
    end)
  end
end)
