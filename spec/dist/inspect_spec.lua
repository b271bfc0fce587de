-- spec/dist/inspect_spec.lua: `fsdp-lua inspect` on checkpoints written by this library — a Hugging Face checkpoint
-- in one file and indexed over several, a training checkpoint saved at 2 ranks (spec/workers/inspect_ckpt_worker.lua)
-- and a lone .safetensors file — and on damaged copies of them. What it prints is checked against the models and
-- tensors the checkpoints were written from (shapes, counts, rows each rank held, values); what it reports for a
-- damaged checkpoint must name the file and the fault, in one line, with exit status 1 and no traceback.
local fsdp  = require "fsdp"
local cjson = require "cjson"
local D     = require "dist"

local q = D.quote

-- Runs `fsdp-lua inspect ARGS...`; returns {code, out, err}.
local function inspect(...)
  local args = {}
  for i, a in ipairs {...} do args[i] = q(a) end
  local dir = D.tmpdir()
  local out, err, rc = dir .. "/out", dir .. "/err", dir .. "/rc"
  os.execute(("%s inspect %s > %s 2> %s < /dev/null; echo $? > %s"):format(q(D.exe), table.concat(args, " "), q(out),
             q(err), q(rc)))
  local r = {code = tonumber((D.read_file(rc) or ""):match("%d+")), out = D.read_file(out) or "",
             err = D.read_file(err) or ""}
  D.cleanup(dir)
  return r
end

local function has(text, ...)
  for _, s in ipairs {...} do
    assert.is_truthy(text:find(s, 1, true), ("%q lacks %q"):format(text, s))
  end
end

-- A failure as the readers report it: status 1, nothing on stdout, one line on stderr naming what is wrong.
local function fails(r, ...)
  assert.equal(1, r.code, r.out .. r.err)
  assert.equal("", r.out)
  assert.is_nil(r.err:find("traceback", 1, true), r.err)
  assert.equal(1, select(2, r.err:gsub("\n", "")), r.err)
  has(r.err, "fsdp-lua inspect: ", ...)
end

local function cp(from, to) os.execute(("cp -r %s %s"):format(q(from), q(to))) end
local function write_file(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

-- A line of a table: the cells in order, separated by runs of spaces.
local function row_pattern(cells)
  local parts = {}
  for i, c in ipairs(cells) do parts[i] = c:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0") end
  return "\n%s*" .. table.concat(parts, "%s+") .. "%s"
end

local function line_of(text, cells)
  assert.is_truthy(("\n" .. text):find(row_pattern(cells)), ("no line %s in\n%s"):format(table.concat(cells, " | "), text))
end

describe("fsdp-lua inspect", function()
  local tmp = D.tmpdir()
  local cfg = fsdp.models.tiny_config("llama", {tie_word_embeddings = false})
  local model = fsdp.models.build(cfg, {seed = 7})
  local single, indexed = tmp .. "/hf", tmp .. "/hf-indexed"
  fsdp.models.save_pretrained(model, single)
  fsdp.models.save_pretrained(model, indexed, {max_shard_size = "20KB"})
  local params = {}
  for name, p in model:named_parameters() do params[#params + 1] = {name = name, t = p} end
  local train                           -- the 2-rank run, once
  local function train_run()
    if not train then
      train = D.run(2, "spec/workers/inspect_ckpt_worker.lua", {}, {timeout = 60})
      assert(train.code == 0 and not train.timed_out, train.output)
      train.ranks = D.results(train)
      train.ckpt = train.dir .. "/ckpt"
    end
    return train
  end
  teardown(function()
    D.cleanup(tmp)
    if train then D.cleanup(train) end
  end)

  it("summarises a single-file Hugging Face checkpoint: config, every tensor, totals", function()
    local r = inspect(single)
    assert.equal(0, r.code, r.err)
    has(r.out, "Hugging Face checkpoint " .. single, "config: model_type llama (LlamaForCausalLM), dtype float32",
        "vocab_size 101, hidden_size 32, intermediate_size 80, num_hidden_layers 2, num_attention_heads 4, "
        .. "num_key_value_heads 2, head_dim 8", "weights: single file model.safetensors")
    local n = 0
    for _, p in ipairs(params) do
      n = n + p.t:numel()
      line_of(r.out, {p.name, p.t:shape_str(), "F32"})
    end
    -- 35 tensors; their elements counted from the model, 4 bytes each: 28704 * 4 = 114816 B = 112.13 KiB
    has(r.out, ("%d tensors, %s parameters, 112.13 KiB of tensor data (F32 x %d)"):format(#params,
        require("fsdp.nn.module").with_commas(n), #params))
    assert.equal(28704, n)
  end)

  it("summarises an indexed checkpoint with the file of every tensor", function()
    local f = io.open(indexed .. "/model.safetensors.index.json"):read("*a")
    local map = cjson.decode(f).weight_map
    local files = {}
    for _, file in pairs(map) do files[file] = true end
    local nfiles = 0
    for _ in pairs(files) do nfiles = nfiles + 1 end
    assert.is_true(nfiles > 2)
    local r = inspect(indexed)
    assert.equal(0, r.code, r.err)
    has(r.out, ("weights: indexed, %d files (model.safetensors.index.json)"):format(nfiles))
    for _, p in ipairs(params) do line_of(r.out, {p.name, p.t:shape_str(), "F32", map[p.name]}) end
  end)

  it("groups the numbered layers of a long tensor list", function()
    -- Qwen2-MoE with 4 layers: 93 tensors; layer 0 is dense (mlp_only_layers), layers 1-3 route over 4 experts
    local d = tmp .. "/moe"
    local moe = fsdp.models.build(fsdp.models.tiny_config("qwen2_moe", {num_hidden_layers = 4}), {seed = 1})
    fsdp.models.save_pretrained(moe, d)
    local n = 0
    for _ in moe:named_parameters() do n = n + 1 end
    local r = inspect(d)
    assert.equal(0, r.code, r.err)
    has(r.out, ("%d tensors"):format(n), "numbered names with equal shapes and dtypes grouped")
    line_of(r.out, {"model.layers.{0-3}.self_attn.q_proj.weight", "[32, 32]", "F32", "x 4"})
    line_of(r.out, {"model.layers.{1-3}.mlp.experts.{0-3}.down_proj.weight", "[32, 24]", "F32", "x 12"})
    line_of(r.out, {"model.layers.0.mlp.down_proj.weight", "[32, 64]", "F32"})
  end)

  it("prints one tensor as PyTorch would and its statistics (--tensor)", function()
    local p = model.model.layers[2].mlp.down_proj.weight
    local r = inspect(indexed, "--tensor", "model.layers.1.mlp.down_proj.weight")
    assert.equal(0, r.code, r.err)
    has(r.out, "model.layers.1.mlp.down_proj.weight (", "F32 [32, 80])\n", tostring(p:detach()) .. "\n")
    -- a second computation of the statistics: one pass, E[x^2] - E[x]^2 (the tool makes two passes)
    local v = p:totable()
    local lo, hi, s, s2 = math.huge, -math.huge, 0, 0
    for _, x in ipairs(v) do lo, hi, s, s2 = math.min(lo, x), math.max(hi, x), s + x, s2 + x * x end
    local n = #v
    local mean = s / n
    local std = math.sqrt((s2 - n * mean * mean) / (n - 1))
    local pmin, pmax, pmean, pstd = r.out:match("min (%S+)  max (%S+)  mean (%S+)  std (%S+)")
    assert.equal(("%.8g"):format(lo), pmin)               -- min and max are values of the tensor: exact
    assert.equal(("%.8g"):format(hi), pmax)
    -- 8 significant digits printed; the two passes agree to ~1e-12 relative, far inside that
    assert.is_true(math.abs(tonumber(pmean) - mean) <= 1e-7 * math.abs(mean), pmean .. " vs " .. mean)
    assert.is_true(math.abs(tonumber(pstd) - std) <= 1e-7 * std, pstd .. " vs " .. std)
    has(r.out, "over the 2,560 finite values", "nan 0  +inf 0  -inf 0")
  end)

  it("counts NaN and infinities apart from the statistics of a lone .safetensors file", function()
    local path = tmp .. "/odd.safetensors"
    fsdp.safetensors.save(path, {x = fsdp.tensor({1, 0 / 0, 1 / 0, -1 / 0, 2, 0 / 0}), n = fsdp.arange(5, {dtype = "i64"})},
                          {note = "hand-made"})
    local r = inspect(path)
    assert.equal(0, r.code, r.err)
    has(r.out, "safetensors file " .. path, "metadata: note: hand-made", "2 tensors, 11 parameters")
    line_of(r.out, {"n", "[5]", "I64"})
    line_of(r.out, {"x", "[6]", "F32"})
    r = inspect(path, "--tensor", "x")
    assert.equal(0, r.code, r.err)
    -- PyTorch prints torch.tensor([1, nan, inf, -inf, 2, nan]) as tensor([1., nan, inf, -inf, 2., nan])
    has(r.out, "tensor([1., nan, inf, -inf, 2., nan], shape=[6], dtype=f32, device=cpu)",
        "min 1  max 2  mean 1.5  std 0.70710678  (over the 2 finite values", "nan 2  +inf 1  -inf 1")
  end)

  it("summarises a training checkpoint saved at 2 ranks: step, world, plan, each rank's file and rows, optimizer", function()
    local t = train_run()
    local r = inspect(t.ckpt)
    assert.equal(0, r.code, r.err)
    has(r.out, "training checkpoint " .. t.ckpt .. " (fsdp-lua training checkpoint, version 1)",
        "step 1, world size 2, mode fsdp; model llama, 35 parameter tensors",
        "plan: 4 FSDP units, sharded over 2 ranks: model.embed_tokens (1 param), model.layers.0 (16 params), "
        .. "model.layers.1 (16 params), model.norm (2 params)",
        "optimizer: AdamW, state exp_avg + exp_avg_sq for 35 of 35 parameters (step 1)", "lr = 0.01", "rng: seed 5",
        "rank-00000-of-00002.safetensors  105 tensors", "rank-00001-of-00002.safetensors  105 tensors")
    -- the rows each rank's engine held of the embedding, as the worker read them from its shard
    local e0, e1 = t.ranks[1], t.ranks[2]
    line_of(r.out, {"model.embed_tokens.weight", "[101, 32]", "f32", ("[%d, %d)"):format(e0.row0, e0.row0 + e0.rows),
                    ("[%d, %d)"):format(e1.row0, e1.row0 + e1.rows), "exp_avg, exp_avg_sq"})
    assert.same({0, 51, 51, 50}, {e0.row0, e0.rows, e1.row0, e1.rows})   -- ceil(101 / 2) = 51 rows, then 50
    -- every parameter: ceil(d0 / 2) rows on rank 0, the rest on rank 1
    for _, p in ipairs(params) do
      local d0 = p.t:size(1)
      local h = math.ceil(d0 / 2)
      line_of(r.out, {p.name, p.t:shape_str(), "f32", ("[0, %d)"):format(h), ("[%d, %d)"):format(h, d0)})
    end
  end)

  it("assembles a training checkpoint's tensor from both ranks' files (--tensor)", function()
    local t = train_run()
    local full = fsdp.safetensors.load(t.dir .. "/full.safetensors")   -- the engine's all-gather, rank 0
    local r = inspect(t.ckpt, "--tensor", "lm_head.weight")
    assert.equal(0, r.code, r.err)
    has(r.out, "model.lm_head.weight (f32 [101, 32], assembled from rank 0 rows [0, 51), rank 1 rows [51, 101))",
        tostring(full["lm_head.weight"]) .. "\n")
    -- the optimizer state: the exp_avg rows each rank held, end to end
    local v = {}
    for _, rk in ipairs(t.ranks) do for _, x in ipairs(rk.exp_avg) do v[#v + 1] = x end end
    local rows = {}
    for i = 0, 100 do rows[i + 1] = {unpack(v, i * 32 + 1, i * 32 + 32)} end
    r = inspect(t.ckpt, "--tensor", "optim.model.embed_tokens.weight.exp_avg")
    assert.equal(0, r.code, r.err)
    has(r.out, tostring(fsdp.tensor(rows)) .. "\n")
  end)

  describe("on damaged input", function()
    it("reports a truncated file, a bad header and a missing index shard", function()
      local d = tmp .. "/trunc"
      cp(single, d)
      os.execute("truncate -s 50000 " .. q(d .. "/model.safetensors"))
      fails(inspect(d), d .. "/model.safetensors", "the file is truncated")
      d = tmp .. "/badheader"
      cp(single, d)
      -- the header's first byte '{' becomes 'x' (in Lua: under make check a dd child would inherit libasan)
      local f = assert(io.open(d .. "/model.safetensors", "r+b"))
      f:seek("set", 8)
      f:write("x")
      f:close()
      fails(inspect(d), d .. "/model.safetensors", "malformed JSON header")
      fails(inspect(d .. "/model.safetensors"), "malformed JSON header")
      d = tmp .. "/noshard"
      cp(indexed, d)
      local map = cjson.decode(io.open(d .. "/model.safetensors.index.json"):read("*a")).weight_map
      local victim = map["model.norm.weight"]
      os.remove(d .. "/" .. victim)
      fails(inspect(d), "model.safetensors.index.json' maps", "to '" .. victim .. "', which is missing")
      d = tmp .. "/badconfig"
      cp(single, d)
      write_file(d .. "/config.json", "{\"model_type\": ")
      fails(inspect(d), d .. "/config.json' is not valid JSON")
    end)

    it("reports a training checkpoint without metadata, with bad metadata, or a missing or truncated rank file", function()
      local t = train_run()
      local d = tmp .. "/nometa"
      cp(t.ckpt, d)
      os.remove(d .. "/metadata.json")
      fails(inspect(d), "holds rank-00000-of-00002.safetensors, rank-00001-of-00002.safetensors but no metadata.json")
      d = tmp .. "/badmeta"
      cp(t.ckpt, d)
      write_file(d .. "/metadata.json", "{\"format\": [1, 2")
      fails(inspect(d), d .. "/metadata.json' is not valid JSON")
      d = tmp .. "/norank"
      cp(t.ckpt, d)
      os.remove(d .. "/rank-00001-of-00002.safetensors")
      fails(inspect(d), "the file of rank 1, '" .. d .. "/rank-00001-of-00002.safetensors', is missing")
      d = tmp .. "/truncrank"
      cp(t.ckpt, d)
      os.execute("truncate -s 2000 " .. q(d .. "/rank-00000-of-00002.safetensors"))
      fails(inspect(d), "the file of rank 0, '" .. d .. "/rank-00000-of-00002.safetensors', is 2000 bytes",
            "truncated or rewritten since it was saved")
    end)

    it("reports unknown tensors, missing paths and directories that are no checkpoint; usage errors exit 2", function()
      fails(inspect(single, "--tensor", "model.layers.9.mlp.up_proj.weight"),
            "has no tensor 'model.layers.9.mlp.up_proj.weight' (35 tensors; similar: model.layers.0.mlp.up_proj.weight")
      fails(inspect(train_run().ckpt, "--tensor", "nope"), "has no tensor 'nope'")
      fails(inspect(tmp .. "/absent"), tmp .. "/absent' does not exist")
      os.execute("mkdir -p " .. q(tmp .. "/empty"))
      fails(inspect(tmp .. "/empty"), "is neither a Hugging Face checkpoint")
      local r = inspect()
      assert.equal(2, r.code)
      has(r.err, "usage: fsdp-lua inspect PATH [--tensor NAME]")
      assert.equal(2, inspect(single, "--tensr", "x").code)
      r = inspect("--help")
      assert.equal(0, r.code)
      has(r.out, "usage: fsdp-lua inspect PATH")
    end)
  end)
end)
