-- spec/moe_spec.lua: the sparse MoE block (lua/fsdp/nn/moe.lua) and the MoE models beyond the transformers
-- fixtures of models_spec: v5's fused expert checkpoints load as the per-expert ones, experts without tokens get
-- zero gradients, the load-balancing loss of a uniform router is exactly top_k, finite differences agree with
-- backward, FSDP plans treat the MoE block as a block inside its layer, and bad configs name the key.
local fsdp   = require "fsdp"
local ffi    = require "ffi"
local models = require "fsdp.models"
local MoE    = require "fsdp.nn.moe"
local G      = require "gradcheck"

local function bits(t)
  return ffi.string(t:data_ptr(), t:numel() * fsdp.C.fl_dtype_size(fsdp.C.fl_dtype_from_name(t.dtype)))
end

describe("MoE models", function()
  for _, name in ipairs {"mixtral_untied", "qwen2_moe_untied", "qwen3_moe_untied"} do
    it(name .. ": transformers' fused expert layout (save_original_format=False) loads as the per-expert one", function()
      local dir = "spec/fixtures/" .. name
      local per = models.from_pretrained(dir)
      local fused = models.from_pretrained(dir .. "_fused")
      local hdr = fsdp.safetensors.header(dir .. "_fused/model.safetensors")
      local has_fused = false
      for k in pairs(hdr.tensors) do if k:find("experts.gate_up_proj", 1, true) then has_fused = true end end
      assert.is_true(has_fused, "the fused fixture holds no gate_up_proj")
      local a = {}
      for n, p in per:named_parameters() do a[n] = p end
      for n, p in fused:named_parameters() do assert.is_true(bits(p) == bits(a[n]), n) end
      local ex = fsdp.safetensors.load(dir .. "/expected.safetensors")
      local l1, l2 = per(ex.input_ids).logits, fused(ex.input_ids).logits
      assert.is_true(bits(l1) == bits(l2))
    end)
  end

  it("a fused tensor of the wrong shape is named in from_pretrained's one error", function()
    local dir = os.tmpname(); os.remove(dir); os.execute("mkdir -p " .. dir)
    os.execute(("cp spec/fixtures/mixtral_untied_fused/config.json %s/"):format(dir))
    local t = fsdp.safetensors.load("spec/fixtures/mixtral_untied_fused/model.safetensors")
    t["model.layers.1.mlp.experts.down_proj"] = fsdp.zeros({4, 32, 60})
    fsdp.safetensors.save(dir .. "/model.safetensors", t)
    local ok, err = pcall(models.from_pretrained, dir)
    assert.is_false(ok)
    assert.matches("model.layers.1.mlp.experts.down_proj' has shape %[4, 32, 60%]", tostring(err))
    assert.matches("expects %[4, 32, 64%]", tostring(err))
  end)

  it("experts that get no tokens still get (zero) gradients, so every rank reduces the same tensors", function()
    local m = models.build(models.tiny_config("mixtral"), {seed = 3})
    local moe = m.model.layers[1].block_sparse_moe
    -- a router that sends every token to experts 0 and 1: expert 2 and 3 see nothing
    fsdp.no_grad(function()
      local w = moe.gate.weight
      w:zero_()
      local p = w:data_ptr("float *")
      for c = 0, 31 do p[0 * 32 + c] = 1; p[1 * 32 + c] = 0.5 end
    end)
    local ids = fsdp.tensor({{1, 2, 3, 4, 5, 6}}, {dtype = "i64"})
    local x = m.model.embed_tokens(ids)
    local ones = fsdp.no_grad(function() return fsdp.F.add_scalar(fsdp.zeros(x:shape()), 1) end)
    local out = moe(ones)   -- every token the same positive input: router logits 32 and 16 for experts 0, 1
    fsdp.F.sum(out):backward()
    for e = 3, 4 do
      for _, w in ipairs {"w1", "w2", "w3"} do
        local g = moe.experts[e][w].weight.grad
        assert.is_not_nil(g, ("expert %d %s has no gradient"):format(e - 1, w))
        assert.equal(0, fsdp.F.sum_squares(g), ("expert %d %s"):format(e - 1, w))
      end
    end
    assert.is_true(fsdp.F.sum_squares(moe.experts[1].w1.weight.grad) > 0)
  end)

  it("the load-balancing loss of a uniform router is exactly top_k (transformers' formula)", function()
    local cfg = models.tiny_config("qwen3_moe")
    local m = models.build(cfg, {seed = 3})
    local moe = m.model.layers[2].mlp
    fsdp.no_grad(function() moe.gate.weight:zero_() end)
    local ids = fsdp.tensor({{1, 2, 3, 4, 5, 6, 7}}, {dtype = "i64"})
    local out = m(ids, {labels = ids})
    -- uniform probabilities 1/E; ties pick experts 0 and 1 for every token: E * (1 * 1/E + 1 * 1/E) = 2
    assert.equal(2, out.aux_loss:item())
    local plain = m(ids, {labels = ids, output_router_logits = false})
    assert.is_nil(plain.aux_loss)
    assert.near(plain.loss:item() + 0.02 * 2, out.loss:item(), 1e-6)
  end)

  it("backward of the MoE block matches finite differences (f64)", function()
    local names = {gate = "w1", up = "w3", down = "w2", order = {"w1", "w2", "w3"}}
    local block = MoE.SparseMoE.new(6, {num_experts = 3, top_k = 2, inner = 5, renormalize = true,
                                        expert_names = names, shared_inner = 4, dtype = "f64"})
    local x = fsdp.randn({2, 4, 6}, {dtype = "f64", seed = 5})
    x.requires_grad = true
    local inputs = {x}
    for _, p in ipairs(block:parameters()) do inputs[#inputs + 1] = p end   -- router, experts, shared expert
    -- central differences in f64 (eps 1e-6): O(1e-10) apart where routing does not flip within +-eps
    local err, gmax = G.gradcheck(function(a) return block(a) end, inputs)
    assert.is_true(gmax > 0)
    assert.is_true(err < 1e-6, ("max abs error %g (max |grad| %g)"):format(err, gmax))
  end)

  it("auto plan: the MoE block (is_block) sits inside its decoder layer's unit; a manual plan can make experts units", function()
    for _, mt in ipairs {"mixtral", "qwen2_moe", "qwen3_moe"} do
      local m = models.build(models.tiny_config(mt), {device = "meta"})
      local ex = fsdp.explain(m, "auto", 3)
      local unit_names = {}
      for _, u in ipairs(ex.units) do unit_names[#unit_names + 1] = u.name end
      -- the units of a dense Llama of the same depth: the embedding, each layer (holding its MoE block), the
      -- final norm with the head; no unit of the MoE block's own
      local llama = models.build(models.tiny_config("llama"), {device = "meta"})
      local dense = {}
      for _, u in ipairs(fsdp.explain(llama, "auto", 3).units) do dense[#dense + 1] = u.name end
      assert.same(dense, unit_names, mt)
      for _, u in ipairs(ex.units) do assert.is_nil(u.name:match("mlp$") or u.name:match("moe$"), mt .. ": " .. u.name) end
      local ffn = m.model.layers[2].ffn_name
      local manual = {mode = "manual", modules = {["model.layers.*"] = "free_full_weight",
                                                  ["model.layers.1." .. ffn .. ".experts.*"] = "free_full_weight"}}
      local ex2 = fsdp.explain(m, manual, 3)
      local experts = 0
      for _, u in ipairs(ex2.units) do
        if u.name:match("%.experts%.%d+$") then
          experts = experts + 1
          for _, pn in ipairs(u.params) do assert.matches("experts%.%d+%.", pn) end
        end
      end
      assert.equal(4, experts, mt .. ": one unit per expert of layer 1")
      assert.matches("experts%.0%.", tostring(ex2))   -- the explain table shows the expert shards
    end
  end)

  it("bad MoE configs are refused, naming the key", function()
    local cases = {
      {"mixtral", {num_experts_per_tok = 5}, "num_experts_per_tok 5 exceeds num_local_experts 4"},
      {"mixtral", {router_jitter_noise = 0.1}, "router_jitter_noise"},
      {"qwen3_moe", {mlp_only_layers = {7}}, "mlp_only_layers holds 7"},
      {"qwen2_moe", {num_experts_per_tok = 0}, "num_experts_per_tok must be a positive integer"},
    }
    for _, c in ipairs(cases) do
      local ok, err = pcall(models.tiny_config, c[1], c[2])
      assert.is_false(ok, c[3])
      assert.matches(c[3], tostring(err), 1, true)
    end
    -- num_experts is Mixtral's alias of num_local_experts, as in transformers
    assert.equal(6, models.config("mixtral", {num_experts = 6}).num_local_experts)
  end)
end)
