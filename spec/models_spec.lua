-- spec/models_spec.lua: GPT-2 and Llama against transformers' fixtures (logits, loss, every parameter gradient),
-- HF names and shapes, meta builds, tying, configs, and save_pretrained/from_pretrained round trips.
local fsdp = require "fsdp"
local st = require "fsdp.safetensors"
local models = require "fsdp.models"
local cjson = require "cjson"

local FIXTURES = {"gpt2_tied", "gpt2_untied", "llama_untied", "llama_tied", "mistral_untied", "mistral_tied",
                  "qwen2_untied", "qwen2_tied", "qwen3_untied", "qwen3_tied", "phi3_untied", "phi3_tied",
                  "mixtral_untied", "mixtral_tied", "qwen2_moe_untied", "qwen2_moe_tied", "qwen3_moe_untied",
                  "qwen3_moe_tied"}

local function err_of(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error")
  return tostring(err)
end

-- max |a - b| / max |b|: relative to the tensor's scale, so near-zero entries do not dominate.
local function rel_err(a, b)
  local x, y = a:totable(), b:totable()
  assert.equal(#y, #x)
  local d, s = 0, 0
  for i = 1, #x do d = math.max(d, math.abs(x[i] - y[i])); s = math.max(s, math.abs(y[i])) end
  return d / math.max(s, 1e-30)
end

local function tmpdir()
  local d = os.tmpname()
  os.remove(d)
  os.execute("mkdir -p " .. d)
  return d
end

local function slurp(path)
  local f = io.open(path, "rb"); if not f then return nil end
  local s = f:read("*a"); f:close(); return s
end

local function meta_of(name)
  return cjson.decode(slurp("spec/fixtures/" .. name .. "/meta.json"))
end

for _, name in ipairs(FIXTURES) do
  describe("models on fixture " .. name, function()
    local dir = "spec/fixtures/" .. name
    local ex = st.load(dir .. "/expected.safetensors")

    it("has exactly the HF parameter names (in order) and the file's shapes", function()
      local m = models.from_pretrained(dir)
      local hdr = st.header(dir .. "/model.safetensors")
      local names = {}
      for n, p in m:named_parameters() do
        names[#names + 1] = n
        assert.same(hdr.tensors[n].shape, p:shape(), n)
      end
      assert.same(meta_of(name).param_names, names)
      -- every key of the file is a parameter, and tied files have no lm_head.weight
      assert.equal(#hdr.names, #names)
    end)

    it("matches transformers' logits, loss and every gradient", function()
      local m = models.from_pretrained(dir)
      local out = m(ex.input_ids, {labels = ex.labels, logits = true})
      -- f32 forward of a 2-layer model, same op order as torch eager: 1e-5 relative covers reassociation in the
      -- blocked matmul and reductions (measured ~3e-7)
      assert.is_true(rel_err(out.logits, ex.logits) < 1e-5, "logits " .. rel_err(out.logits, ex.logits))
      assert.is_true(math.abs(out.loss:item() - ex.loss:item()) <= 1e-5 * math.abs(ex.loss:item()), "loss")
      if ex.aux_loss then   -- MoE: the router load-balancing loss (already inside loss, times the coefficient)
        assert.is_not_nil(out.aux_loss, "aux_loss")
        assert.is_true(math.abs(out.aux_loss:item() - ex.aux_loss:item()) <= 1e-5 * math.abs(ex.aux_loss:item()),
                       ("aux_loss %.9g vs %.9g"):format(out.aux_loss:item(), ex.aux_loss:item()))
      end
      out.loss:backward()
      local unfused = {}
      local n = 0
      for pname, p in m:named_parameters() do
        local g = ex["grad." .. pname]
        assert.is_not_nil(g, pname)
        -- gradients go through two more layers of f32 sums than logits: 1e-4 relative (measured < 1e-6)
        local e = rel_err(p.grad, g)
        assert.is_true(e < 1e-4, ("grad.%s: relative error %g"):format(pname, e))
        unfused[pname] = p.grad
        p.grad = nil
        n = n + 1
      end
      assert.equal(#meta_of(name).param_names, n)
      -- the fused head + loss (no logits): the same loss and gradients within the same tolerances (its row sums of
      -- the head's weight gradient run chunk by chunk, so the bits differ from the unfused head's)
      local fused = m(ex.input_ids, {labels = ex.labels})
      assert.is_nil(rawget(fused, "logits"))
      assert.is_true(math.abs(fused.loss:item() - ex.loss:item()) <= 1e-5 * math.abs(ex.loss:item()), "fused loss")
      fused.loss:backward()
      for pname, p in m:named_parameters() do
        local e = rel_err(p.grad, ex["grad." .. pname])
        assert.is_true(e < 1e-4, ("fused grad.%s: relative error %g"):format(pname, e))
      end
    end)

    it("round-trips save_pretrained -> from_pretrained bit-exactly", function()
      local m = models.from_pretrained(dir)
      local out = tmpdir()
      models.save_pretrained(m, out)
      local hdr = st.header(out .. "/model.safetensors")
      local tied = m.config.tie_word_embeddings
      assert.equal(tied, hdr.tensors["lm_head.weight"] == nil)
      -- the weights are the fixture's, so the file must be byte-identical to the one transformers wrote
      assert.is_true(slurp(out .. "/model.safetensors") == slurp(dir .. "/model.safetensors"))
      local cfg = cjson.decode(slurp(out .. "/config.json"))
      assert.equal(m.config.model_type, cfg.model_type)
      assert.equal("float32", cfg.dtype)
      assert.same(m.model_spec.architectures, cfg.architectures)
      local m2 = models.from_pretrained(out)
      local ps = m:parameters()
      for i, p in ipairs(m2:parameters()) do assert.same(ps[i]:totable(), p:totable()) end
      assert.is_nil(slurp(out .. "/config.json.tmp"))
      os.execute("rm -rf " .. out)
    end)
  end)
end

describe("models", function()
  it("build on meta without allocating, for every registered model", function()
    for mt in pairs(models.registry) do
      for _, tie in ipairs({true, false}) do
        -- The engine's allocation counter must not move (a collection during the build may free old
        -- garbage, so "current" alone could go down and hide an allocation).
        local before = fsdp.C.fl_mem_total_current()
        fsdp.C.fl_alloc_reset_pending()
        local m = models.build(models.tiny_config(mt, {tie_word_embeddings = tie}), {device = "meta"})
        assert.equal(0, tonumber(fsdp.C.fl_alloc_bytes_pending()))
        assert.is_true(fsdp.C.fl_mem_total_current() <= before)
        for _, p in ipairs(m:parameters()) do assert.equal("meta", p.device) end
        -- two outermost blocks (the decoder layers); an MoE block inside a layer is a block of its own
        local names = {}
        for name, mod in m:named_modules() do if mod.is_block then names[#names + 1] = name end end
        local outermost = 0
        for _, a in ipairs(names) do
          local inner = false
          for _, b in ipairs(names) do if a ~= b and a:sub(1, #b + 1) == b .. "." then inner = true end end
          if not inner then outermost = outermost + 1 end
        end
        assert.equal(2, outermost, mt)
        assert.is_table(m.fsdp_plan)
      end
    end
  end)

  it("ties the head to the embedding both ways", function()
    for _, mt in ipairs({"gpt2", "llama"}) do
      local m = models.build(models.tiny_config(mt, {tie_word_embeddings = true}), {seed = 3})
      local emb = mt == "gpt2" and m.transformer.wte or m.model.embed_tokens
      assert.is_true(m.lm_head.weight == emb.weight)
      emb.weight:set(0, 42)                      -- writing through the embedding shows in the head ...
      assert.equal(42, m.lm_head.weight:get(0))
      m.lm_head.weight:set(1, -3)                -- ... and the other way
      assert.equal(-3, emb.weight:get(1))
      local u = models.build(models.tiny_config(mt, {tie_word_embeddings = false}), {seed = 3})
      local uemb = mt == "gpt2" and u.transformer.wte or u.model.embed_tokens
      assert.is_false(u.lm_head.weight == uemb.weight)
    end
  end)

  it("initialise as transformers does: normal(0.02), GPT-2 c_proj scaled, zero biases, unit norms", function()
    local cfg = models.tiny_config("gpt2")
    local m = models.build(cfg, {seed = 11})
    -- second path: the counter-based RNG drawn directly under the HF name
    local w = fsdp.randn({32, 32}, {seed = 11, name = "transformer.h.1.attn.c_proj.weight", std = 0.02 / math.sqrt(4)})
    assert.equal(0, rel_err(m.transformer.h[2].attn.c_proj.weight, w))
    local fc = fsdp.randn({32, 128}, {seed = 11, name = "transformer.h.0.mlp.c_fc.weight", std = 0.02})
    assert.equal(0, rel_err(m.transformer.h[1].mlp.c_fc.weight, fc))
    for _, v in ipairs(m.transformer.h[1].attn.c_attn.bias:totable()) do assert.equal(0, v) end
    for _, v in ipairs(m.transformer.ln_f.weight:totable()) do assert.equal(1, v) end
    local l = models.build(models.tiny_config("llama"), {seed = 11})
    for _, v in ipairs(l.model.norm.weight:totable()) do assert.equal(1, v) end
    for _, v in ipairs(l.model.layers[1].self_attn.q_proj.bias:totable()) do assert.equal(0, v) end
  end)

  it("run a tiny model forward and backward from a fresh build", function()
    local m = models.build(models.tiny_config("llama"), {seed = 1})
    local ids = fsdp.tensor({{1, 5, 7, 9}, {3, 3, 2, 100}}, {dtype = "i64"})
    local out = m(ids, {labels = ids})
    -- an untrained model predicts roughly uniformly: loss near log(V)
    assert.is_true(math.abs(out.loss:item() - math.log(101)) < 0.1)
    out.loss:backward()
    for n, p in m:named_parameters() do assert.is_not_nil(p.grad, n) end
    assert.matches("unknown option 'label'", err_of(function() return m(ids, {label = ids}) end))
  end)

  it("read configs: HF defaults, aliases, v4 and v5 RoPE keys, and refuse what they cannot run", function()
    local g = models.config("gpt2", {hidden_size = 48})
    assert.equal(48, g.n_embd)
    assert.equal(12, g.n_layer)
    assert.equal("gelu_new", g.activation_function)
    local v4 = models.config("llama", {rope_theta = 500000, rope_scaling = cjson.null})
    assert.same({rope_type = "default", rope_theta = 500000}, v4.rope_parameters)
    local v5 = models.config("llama", {rope_parameters = {rope_type = "default", rope_theta = 5000}})
    assert.equal(5000, v5.rope_parameters.rope_theta)
    assert.equal(10000, models.config("llama").rope_parameters.rope_theta)
    assert.equal(128, models.config("llama").head_dim)
    assert.equal(32, models.config("llama").num_key_value_heads)
    assert.matches("rope_type 'llama3' needs rope parameter '%a+_freq_factor'",
      err_of(models.config, "llama", {rope_scaling = {rope_type = "llama3", factor = 8}}))
    assert.matches("rope_type 'yarn' needs rope parameter 'factor'", err_of(models.config, "llama", {rope_parameters = {type = "yarn"}}))
    assert.matches("rope_type 'su' is not supported", err_of(models.config, "llama", {rope_parameters = {type = "su"}}))
    assert.matches("unsupported hidden_act 'quick_gelu'", err_of(models.config, "llama", {hidden_act = "quick_gelu"}))
    assert.matches("unsupported activation_function 'gelu_fast'", err_of(models.config, "gpt2", {activation_function = "gelu_fast"}))
    assert.matches("not a multiple of num_key_value_heads", err_of(models.config, "llama", {num_key_value_heads = 5}))
    assert.matches("unknown model_type 'bert'", err_of(models.config, "bert"))
  end)

  it("load GPT-2 files without the transformer. prefix, and sharded checkpoints", function()
    local src = "spec/fixtures/gpt2_untied"
    local ref = models.from_pretrained(src)
    local all = st.load(src .. "/model.safetensors")
    -- openai-community/gpt2 layout: no prefix, plus the old attn.bias buffers
    local out = tmpdir()
    local stripped = {}
    for k, v in pairs(all) do stripped[(k:gsub("^transformer%.", ""))] = v end
    stripped["h.0.attn.bias"] = fsdp.ones({1, 1, 4, 4})
    st.save(out .. "/model.safetensors", stripped, {format = "pt"})
    os.execute(("cp %s/config.json %s/"):format(src, out))
    local m = models.from_pretrained(out)
    local rp = ref:parameters()
    for i, p in ipairs(m:parameters()) do assert.same(rp[i]:totable(), p:totable()) end
    os.execute("rm -rf " .. out)
    -- two shards and an index, as transformers writes them
    out = tmpdir()
    local a, b, map, i = {}, {}, {}, 0
    for _, k in ipairs(st.header(src .. "/model.safetensors").names) do
      i = i + 1
      local file = i % 2 == 0 and "model-00001-of-00002.safetensors" or "model-00002-of-00002.safetensors"
      if i % 2 == 0 then a[k] = all[k] else b[k] = all[k] end
      map[k] = file
    end
    st.save(out .. "/model-00001-of-00002.safetensors", a)
    st.save(out .. "/model-00002-of-00002.safetensors", b)
    local f = io.open(out .. "/model.safetensors.index.json", "w")
    f:write(cjson.encode({metadata = {total_size = 1}, weight_map = map})); f:close()
    os.execute(("cp %s/config.json %s/"):format(src, out))
    m = models.from_pretrained(out)
    for j, p in ipairs(m:parameters()) do assert.same(rp[j]:totable(), p:totable()) end
    os.execute("rm -rf " .. out)
  end)

  it("require lm_head.weight when untied, and reject unknown tensors", function()
    local src = "spec/fixtures/llama_untied"
    local all = st.load(src .. "/model.safetensors")
    local out = tmpdir()
    os.execute(("cp %s/config.json %s/"):format(src, out))
    all["lm_head.weight"] = nil
    st.save(out .. "/model.safetensors", all)
    assert.matches("lacks 1 parameter%(s%): lm_head.weight", err_of(models.from_pretrained, out))
    all["lm_head.weight"] = fsdp.zeros({101, 32})
    all["model.extra.weight"] = fsdp.zeros({2})
    st.save(out .. "/model.safetensors", all)
    assert.matches("does not have: model.extra.weight", err_of(models.from_pretrained, out))
    all["model.extra.weight"] = nil
    all["model.norm.weight"] = fsdp.zeros({31})
    st.save(out .. "/model.safetensors", all)
    assert.matches("'model.norm.weight' has shape %[31%]", err_of(models.from_pretrained, out))
    -- every problem at once, in one error
    all["lm_head.weight"] = nil
    all["model.extra.weight"] = fsdp.zeros({2})
    st.save(out .. "/model.safetensors", all)
    local e = err_of(models.from_pretrained, out)
    assert.matches("lacks 1 parameter%(s%): lm_head.weight", e)
    assert.matches("does not have: model.extra.weight", e)
    assert.matches("'model.norm.weight' has shape %[31%]", e)
    os.execute("rm -rf " .. out)
  end)
end)
