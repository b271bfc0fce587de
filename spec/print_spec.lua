-- spec/print_spec.lua: how tensors, modules, shard tables and memory print. Tensor values are compared with PyTorch's
-- own repr of the same values: the expected strings below are what torch 2.x printed for torch.tensor(<the same
-- numbers>) (the f64 and bf16 cases made in float64 and cast, as here), pasted from the reference venv; the spec
-- needs no Python. For f64 and bf16 PyTorch appends ", dtype=torch.float64" (bfloat16) after the values, left out
-- here. Module trees, shard tables and byte counts are checked against numbers worked out by hand.
local fsdp   = require "fsdp"
local Tensor = fsdp.Tensor

-- ((37 i) mod 101 - 50) / 7 in double, rounded once to f32 on both sides
local function f(i) return ((i * 37) % 101 - 50) / 7.0 end
local function seq(n, fn)
  local t = {}
  for i = 0, n - 1 do t[#t + 1] = fn(i) end
  return t
end
local function reshape(flat, shape)
  local function build(d, off)
    if d > #shape then return flat[off + 1] end
    local stride = 1
    for k = d + 1, #shape do stride = stride * shape[k] end
    local r = {}
    for i = 0, shape[d] - 1 do r[#r + 1] = build(d + 1, off + i * stride) end
    return r
  end
  return build(1, 0)
end
local T = fsdp.tensor

local function err_of(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error")
  return tostring(err)
end

local function has(text, ...)
  for _, s in ipairs {...} do
    assert.is_truthy(text:find(s, 1, true), ("%q lacks %q"):format(text, s))
  end
end

-- PyTorch's repr of each case
local TORCH = {
  vec = [==[
tensor([ 1.5000, -2.2500,  3.0000])]==],
  ints = [==[
tensor([1., 2., 3.])]==],
  sci = [==[
tensor([1.0000e-05, 1.0000e+00, 1.2346e+04])]==],
  big = [==[
tensor([1.0000e+09, 2.5000e+00])]==],
  mat = [==[
tensor([[-7.1429, -1.8571,  3.4286, -5.7143],
        [-0.4286,  4.8571, -4.2857,  1.0000],
        [ 6.2857, -2.8571,  2.4286, -6.7143]])]==],
  summ2d = [==[
tensor([[-7.1429, -1.8571,  3.4286,  ..., -4.0000,  1.2857,  6.5714],
        [-2.5714,  2.7143, -6.4286,  ...,  0.5714,  5.8571, -3.2857],
        [ 2.0000, -7.1429, -1.8571,  ...,  5.1429, -4.0000,  1.2857],
        ...,
        [ 3.2857, -5.8571, -0.5714,  ...,  6.4286, -2.7143,  2.5714],
        [-6.5714, -1.2857,  4.0000,  ..., -3.4286,  1.8571,  7.1429],
        [-2.0000,  3.2857, -5.8571,  ...,  1.1429,  6.4286, -2.7143]])]==],
  summ1d = [==[
tensor([0.0000e+00, 1.0000e-03, 2.0000e-03,  ..., 1.9970e+00, 1.9980e+00,
        1.9990e+00])]==],
  i64 = [==[
tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])]==],
  i64big = [==[
tensor([   0,    1,    2,  ..., 1197, 1198, 1199])]==],
  bool = [==[
tensor([ True, False,  True])]==],
  nonfinite = [==[
tensor([1., nan, inf, -inf])]==],
  nonfinite2 = [==[
tensor([1.2500,    nan,   -inf])]==],
  scalar = [==[
tensor(3.5000)]==],
  scalar_int = [==[
tensor(3.)]==],
  t3 = [==[
tensor([[[-7.1429, -1.8571,  3.4286, -5.7143],
         [-0.4286,  4.8571, -4.2857,  1.0000],
         [ 6.2857, -2.8571,  2.4286, -6.7143]],

        [[-1.4286,  3.8571, -5.2857,  0.0000],
         [ 5.2857, -3.8571,  1.4286,  6.7143],
         [-2.4286,  2.8571, -6.2857, -1.0000]]])]==],
  wrap = [==[
tensor([-7.1429, -1.8571,  3.4286, -5.7143, -0.4286,  4.8571, -4.2857,  1.0000,
         6.2857, -2.8571,  2.4286, -6.7143, -1.4286,  3.8571, -5.2857,  0.0000,
         5.2857, -3.8571,  1.4286,  6.7143, -2.4286,  2.8571, -6.2857, -1.0000,
         4.2857, -4.8571,  0.4286,  5.7143, -3.4286,  1.8571])]==],
  f64 = [==[
tensor([0.1000, 0.2000, 0.3333])]==],
  bf16 = [==[
tensor([  0.1001,   0.2002,   0.3340, 100.0000])]==],
  zeros = [==[
tensor([[0., 0., 0.],
        [0., 0., 0.]])]==],
  negzero = [==[
tensor([-0.0000, 1.5000])]==],
  empty = [==[
tensor([])]==],
  small = [==[
tensor([1.0000e-05, 2.0000e-05])]==],
  summ3d = [==[
tensor([[[-7.1429, -1.8571,  3.4286,  ..., -2.8571,  2.4286, -6.7143],
         [-1.4286,  3.8571, -5.2857,  ...,  2.8571, -6.2857, -1.0000],
         [ 4.2857, -4.8571,  0.4286,  ..., -5.8571, -0.5714,  4.7143],
         ...,
         [ 4.0000, -5.1429,  0.1429,  ..., -6.1429, -0.8571,  4.4286],
         [-4.7143,  0.5714,  5.8571,  ..., -0.4286,  4.8571, -4.2857],
         [ 1.0000,  6.2857, -2.8571,  ...,  5.2857, -3.8571,  1.4286]],

        [[ 6.7143, -2.4286,  2.8571,  ..., -3.4286,  1.8571,  7.1429],
         [-2.0000,  3.2857, -5.8571,  ...,  2.2857, -6.8571, -1.5714],
         [ 3.7143, -5.4286, -0.1429,  ..., -6.4286, -1.1429,  4.1429],
         ...,
         [ 3.4286, -5.7143, -0.4286,  ..., -6.7143, -1.4286,  3.8571],
         [-5.2857,  0.0000,  5.2857,  ..., -1.0000,  4.2857, -4.8571],
         [ 0.4286,  5.7143, -3.4286,  ...,  4.7143, -4.4286,  0.8571]],

        [[ 6.1429, -3.0000,  2.2857,  ..., -4.0000,  1.2857,  6.5714],
         [-2.5714,  2.7143, -6.4286,  ...,  1.7143,  7.0000, -2.1429],
         [ 3.1429, -6.0000, -0.7143,  ..., -7.0000, -1.7143,  3.5714],
         ...,
         [ 2.8571, -6.2857, -1.0000,  ...,  7.1429, -2.0000,  3.2857],
         [-5.8571, -0.5714,  4.7143,  ..., -1.5714,  3.7143, -5.4286],
         [-0.1429,  5.1429, -4.0000,  ...,  4.1429, -5.0000,  0.2857]],

        ...,

        [[ 3.2857, -5.8571, -0.5714,  ..., -6.8571, -1.5714,  3.7143],
         [-5.4286, -0.1429,  5.1429,  ..., -1.1429,  4.1429, -5.0000],
         [ 0.2857,  5.5714, -3.5714,  ...,  4.5714, -4.5714,  0.7143],
         ...,
         [ 0.0000,  5.2857, -3.8571,  ...,  4.2857, -4.8571,  0.4286],
         [ 5.7143, -3.4286,  1.8571,  ..., -4.4286,  0.8571,  6.1429],
         [-3.0000,  2.2857, -6.8571,  ...,  1.2857,  6.5714, -2.5714]],

        [[ 2.7143, -6.4286, -1.1429,  ...,  7.0000, -2.1429,  3.1429],
         [-6.0000, -0.7143,  4.5714,  ..., -1.7143,  3.5714, -5.5714],
         [-0.2857,  5.0000, -4.1429,  ...,  4.0000, -5.1429,  0.1429],
         ...,
         [-0.5714,  4.7143, -4.4286,  ...,  3.7143, -5.4286, -0.1429],
         [ 5.1429, -4.0000,  1.2857,  ..., -5.0000,  0.2857,  5.5714],
         [-3.5714,  1.7143,  7.0000,  ...,  0.7143,  6.0000, -3.1429]],

        [[ 2.1429, -7.0000, -1.7143,  ...,  6.4286, -2.7143,  2.5714],
         [-6.5714, -1.2857,  4.0000,  ..., -2.2857,  3.0000, -6.1429],
         [-0.8571,  4.4286, -4.7143,  ...,  3.4286, -5.7143, -0.4286],
         ...,
         [-1.1429,  4.1429, -5.0000,  ...,  3.1429, -6.0000, -0.7143],
         [ 4.5714, -4.5714,  0.7143,  ..., -5.5714, -0.2857,  5.0000],
         [-4.1429,  1.1429,  6.4286,  ...,  0.1429,  5.4286, -3.7143]]])]==],
}

local CASES = {
  vec = function() return T({1.5, -2.25, 3.0}) end,
  ints = function() return T({1, 2, 3}) end,                                -- all integers: "1." (int mode)
  sci = function() return T({1e-5, 1.0, 12345.678}) end,                    -- magnitudes span > 1000: scientific
  big = function() return T({1e9, 2.5}) end,                                -- past 1e8: scientific
  mat = function() return T(reshape(seq(12, f), {3, 4})) end,
  summ2d = function() return T(reshape(seq(2000, f), {40, 50})) end,        -- > 1000 elements: 3 edge items
  summ1d = function() return T(seq(2000, function(i) return i / 1000 end)) end,
  i64 = function() return fsdp.arange(10, {dtype = "i64"}) end,
  i64big = function() return fsdp.arange(1200, {dtype = "i64"}) end,
  bool = function() return T({1, 0, 1}, {dtype = "bool"}) end,
  nonfinite = function() return T({1, 0 / 0, 1 / 0, -1 / 0}) end,          -- non-finite values do not widen
  nonfinite2 = function() return T({1.25, 0 / 0, -1 / 0}) end,
  scalar = function() return T(3.5) end,
  scalar_int = function() return T(3.0) end,
  t3 = function() return T(reshape(seq(24, f), {2, 3, 4})) end,            -- a blank line between 2-d slices
  wrap = function() return T(seq(30, f)) end,                               -- 80 columns: 8 values a line
  f64 = function() return T({0.1, 0.2, 1 / 3}, {dtype = "f64"}) end,
  bf16 = function() return T({0.1, 0.2, 1 / 3, 100}, {dtype = "bf16"}) end,  -- the bf16-rounded values print
  zeros = function() return fsdp.zeros({2, 3}) end,
  negzero = function() return T({-0.0, 1.5}) end,
  empty = function() return fsdp.zeros({0}) end,
  small = function() return T({1e-5, 2e-5}) end,                           -- below 1e-4: scientific
  summ3d = function() return T(reshape(seq(1200, f), {10, 10, 12})) end,   -- "..." slices in every dim
}
local ORDER = {"vec", "ints", "sci", "big", "mat", "summ2d", "summ1d", "i64", "i64big", "bool", "nonfinite",
               "nonfinite2", "scalar", "scalar_int", "t3", "wrap", "f64", "bf16", "zeros", "negzero", "empty", "small",
               "summ3d"}

describe("tensor printing", function()
  after_each(function() Tensor.set_printoptions{profile = "default"} end)

  for _, name in ipairs(ORDER) do
    it(("prints the values of '%s' exactly as PyTorch"):format(name), function()
      assert.equal(TORCH[name], CASES[name]():format{info = false})
    end)
  end

  it("follows set_printoptions as torch.set_printoptions does", function()
    -- torch.set_printoptions(precision=2), then (precision=4, sci_mode=True), on the same values
    Tensor.set_printoptions{precision = 2}
    assert.equal(table.concat({
      "tensor([[-7.14, -1.86,  3.43, -5.71],",
      "        [-0.43,  4.86, -4.29,  1.00],",
      "        [ 6.29, -2.86,  2.43, -6.71]])"}, "\n"), CASES.mat():format{info = false})
    Tensor.set_printoptions{precision = 4, sci_mode = true}
    assert.equal("tensor([ 1.5000e+00, -2.2500e+00,  3.0000e+00])", CASES.vec():format{info = false})
    Tensor.set_printoptions{profile = "default", threshold = 5}      -- summarises past 5 elements, 3 edge items
    assert.equal("tensor([1., 2., 3.,  ..., 5., 6., 7.])", T({1, 2, 3, 4, 5, 6, 7}):format{info = false})
    assert.matches("precision must be an integer >= 0, got %-1", err_of(Tensor.set_printoptions, {precision = -1}))
    assert.matches("unknown option 'precison'", err_of(Tensor.set_printoptions, {precison = 2}))
    assert.matches("unknown profile 'long'", err_of(Tensor.set_printoptions, {profile = "long"}))
  end)

  it("adds shape, dtype, device and autograd after the values, wrapping at 80 columns as PyTorch's suffixes", function()
    assert.equal("tensor([ 1.5000, -2.2500,  3.0000], shape=[3], dtype=f32, device=cpu)", tostring(CASES.vec()))
    local w = T({{1, 2}, {3, 4}}, {requires_grad = true})
    assert.equal("tensor([[1., 2.],\n        [3., 4.]], shape=[2, 2], dtype=f32, device=cpu, requires_grad=True)",
                 tostring(w))
    -- a result of autograd names its node; past 80 columns a suffix goes on a new line indented by 7
    assert.equal("tensor([[2., 4.],\n        [6., 8.]], shape=[2, 2], dtype=f32, device=cpu, grad_fn=<mul>)",
                 tostring(w * 2))
    local long = tostring(CASES.summ2d())
    assert.equal(TORCH.summ2d:sub(1, -2) .. ",\n       shape=[40, 50], dtype=f32, device=cpu)", long)
    assert.equal("tensor(..., shape=[2, 3], dtype=bf16, device=meta)", tostring(fsdp.empty({2, 3}, {device = "meta",
                 dtype = "bf16"})))
    assert.equal("tensor([], shape=[0, 4], dtype=i64, device=cpu)", tostring(fsdp.zeros({0, 4}, {dtype = "i64"})))
  end)
end)

describe("module printing", function()
  it("prints a model as transformers names its classes, each module with its parameter count", function()
    -- counts by hand for tiny Llama (hidden 32, 4 heads x 8, 2 kv heads, intermediate 80, vocab 101, biases on):
    -- q/o 32*32 + 32 = 1056, k/v 16*32 + 16 = 528 -> attention 3168; gate/up 80*32 + 80 = 2640, down 32*80 + 32 =
    -- 2592 -> MLP 7872; a layer 3168 + 7872 + 2 * 32 = 11104; embed and head 101*32 = 3232; the model 28704
    local m = fsdp.models.build(fsdp.models.tiny_config("llama", {tie_word_embeddings = false}), {device = "meta"})
    assert.equal(table.concat({
      "LlamaForCausalLM(  # 28,704 params",
      "  (model): LlamaModel(  # 25,472 params",
      "    (embed_tokens): Embedding(101, 32)  # 3,232 params",
      "    (layers): ModuleList(  # 22,208 params",
      "      (0-1): 2 x LlamaDecoderLayer(  # 11,104 params",
      "        (self_attn): LlamaAttention(  # 3,168 params",
      "          num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=5000",
      "          (q_proj): Linear(in_features=32, out_features=32, bias=True)  # 1,056 params",
      "          (k_proj): Linear(in_features=32, out_features=16, bias=True)  # 528 params",
      "          (v_proj): Linear(in_features=32, out_features=16, bias=True)  # 528 params",
      "          (o_proj): Linear(in_features=32, out_features=32, bias=True)  # 1,056 params",
      "        )",
      "        (mlp): LlamaMLP(  # 7,872 params",
      "          act=silu",
      "          (gate_proj): Linear(in_features=32, out_features=80, bias=True)  # 2,640 params",
      "          (up_proj): Linear(in_features=32, out_features=80, bias=True)  # 2,640 params",
      "          (down_proj): Linear(in_features=80, out_features=32, bias=True)  # 2,592 params",
      "        )",
      "        (input_layernorm): LlamaRMSNorm((32,), eps=1e-06)  # 32 params",
      "        (post_attention_layernorm): LlamaRMSNorm((32,), eps=1e-06)  # 32 params",
      "      )",
      "    )",
      "    (norm): LlamaRMSNorm((32,), eps=1e-06)  # 32 params",
      "  )",
      "  (lm_head): Linear(in_features=32, out_features=101, bias=False)  # 3,232 params",
      ")"}, "\n"), tostring(m))
    -- GPT-2 as transformers prints it: Conv1D(nf, nx), LayerNorm with elementwise_affine, Dropout(p=0.1, ...)
    local g = tostring(fsdp.models.build(fsdp.models.tiny_config("gpt2", {resid_pdrop = 0.1}), {device = "meta"}))
    has(g, "GPT2LMHeadModel(  # ", "(c_attn): Conv1D(nf=96, nx=32)  # 3,168 params",
        "(ln_1): LayerNorm((32,), eps=1e-05, elementwise_affine=True, bias=True)  # 64 params",
        "(resid_dropout): Dropout(p=0.1, inplace=False)\n", "(0-1): 2 x GPT2Block(")
    local q = tostring(fsdp.models.build(fsdp.models.tiny_config("qwen2_moe"), {device = "meta"}))
    has(q, "Qwen2MoeForCausalLM(", "(mlp): Qwen2MoeSparseMoeBlock(", "(0-3): 4 x Qwen2MoeMLP(",
        "(input_layernorm): Qwen2MoeRMSNorm((32,), eps=1e-06)")
  end)

  it("marks each module's FSDP unit and policy on a sharded model, and each parameter's state", function()
    -- one rank (no MPI): every unit holds all rows; the {norm, lm_head} unit keeps its weights after forward
    local m = fsdp.models.build(fsdp.models.tiny_config("llama", {tie_word_embeddings = false}), {device = "meta"})
    fsdp.apply_plan(m, "auto", {seed = 1})
    local s = tostring(m)
    has(s, "FSDPLlamaForCausalLM(  # 28,704 params\n",
        "(embed_tokens): Embedding(101, 32)  # 3,232 params; FSDP unit model.embed_tokens [free_full_weight] sharded",
        "(0-1): 2 x LlamaDecoderLayer(  # 11,104 params; FSDP unit model.layers.{0-1} [free_full_weight] sharded",
        "(norm): LlamaRMSNorm((32,), eps=1e-06)  # 32 params; FSDP unit model.norm [keep_full_weight] sharded",
        "(lm_head): Linear(in_features=32, out_features=101, bias=False)  # 3,232 params; FSDP unit model.norm")
    -- a sharded parameter prints this rank's rows; a gathered one its full values
    local w = m.model.layers[1].self_attn.k_proj.weight
    local p = tostring(w)
    has(p, "shape=[16, 32], dtype=f32, device=cpu,", "requires_grad=True, fsdp=sharded, unit=model.layers.0,",
        "rows=[0, 16) of 16)")
    local ids = fsdp.tensor({{1, 2, 3}}, {dtype = "i64"})
    m(ids)
    has(tostring(m.lm_head.weight), "shape=[101, 32]", "fsdp=gathered,", "unit=model.norm)")
    has(tostring(m), "FSDP unit model.norm [keep_full_weight] gathered")
    -- the values printed are the shard's own (as PyTorch prints them), then the suffixes
    local v = Tensor.local_of(w):format{info = false}
    assert.equal(v:sub(1, -2) .. ", ", p:sub(1, #v + 1))
  end)
end)

describe("shard tables and memory", function()
  local function model()
    return fsdp.models.build(fsdp.models.tiny_config("llama", {tie_word_embeddings = false}), {device = "meta"})
  end

  it("explain prints the same table fsdp.shards prints once the plan is applied (one rank)", function()
    local ex = fsdp.explain(model(), "auto", 1)
    local m = model()
    fsdp.apply_plan(m, "auto", {seed = 1})
    local sh = fsdp.shards(m)
    assert.equal(4, #sh)                       -- the root holds nothing: no unit of its own
    assert.equal("model.embed_tokens", sh[1].name)
    local a = tostring(ex):gsub("\n\nmemory per rank.*$", "")
    local b = tostring(sh)
    -- the first lines differ by what they are, shards gives each unit its state (explain's are all sharded, as
    -- apply_plan leaves them); every other unit and parameter line is the same
    has(b, "\nunit 1  model.embed_tokens  [free_full_weight]  sharded\n")
    assert.equal(a:gsub("^[^\n]*\n", ""):gsub("\n\n%(root: no parameters left, so no unit%)", ""),
                 (b:gsub("^[^\n]*\n", ""):gsub("(\nunit %d+  [^\n]-%])  sharded\n", "%1\n")))
    has(b, "FSDP shards: 4 units over 1 rank, 28,704 parameters; f32 shards per rank: 112.13 KiB (this is rank 0)",
        "  model.embed_tokens.weight  [101, 32]  f32    [0, 101)  12.63 KiB")   -- 101 * 32 * 4 = 12928 B
  end)

  it("estimates memory for the optimizer it is told, 2 f32 states per parameter for AdamW by default", function()
    local m = model()
    local n = 28704 * 4                        -- every f32 shard at one rank
    local adam = fsdp.explain(m, "auto", 1).memory[0]
    assert.same({n, n, 2 * n}, {adam.param, adam.grad, adam.optim})
    assert.equal(n, fsdp.explain(m, "auto", 1, {optimizer = "sgd_momentum"}).memory[0].optim)
    assert.equal(0, fsdp.explain(m, "auto", 1, {optimizer = "sgd"}).memory[0].optim)
    assert.equal(3 * n, fsdp.explain(m, "auto", 1, {optimizer = {states = 3, name = "Adam3"}}).memory[0].optim)
    has(tostring(fsdp.explain(m, "auto", 1, {optimizer = "sgd_momentum"})), "optim (SGD with momentum: momentum_buffer)")
    assert.matches("optimizer must be \"adamw\"", err_of(fsdp.explain, m, "auto", 1, {optimizer = "lion"}))
    assert.matches("unknown option 'optimiser'", err_of(fsdp.explain, m, "auto", 1, {optimiser = "sgd"}))
    -- one rank gathers nothing in flight twice: the peak is the largest unit's full weights plus its all-gather
    -- buffer (a layer: 11104 elements * 4 B, twice) while the previous unit is resharded
    local e = fsdp.explain(m, "auto", 1).memory
    assert.equal(11104 * 4 * 2, e.step_peaks[1])
  end)

  it("prints memory_stats as a table of categories, current and peak", function()
    local s = fsdp.memory_stats()
    local text = tostring(s)
    for _, k in ipairs {"param", "param_unsharded", "grad", "optim", "activation", "other", "total"} do
      assert.is_number(s[k].current); assert.is_number(s[k].peak)
      has(text, "\n  " .. k .. " ")
    end
    assert.equal("memory (this process)", text:match("^(memory %(this process%))"))
  end)
end)
