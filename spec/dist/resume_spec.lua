-- spec/dist/resume_spec.lua: training checkpoints on real ranks (fsdp.checkpoint.save / load). The second code path
-- is always another run: N/2 steps + save + a FRESH process that loads + N/2 steps must equal N steps
-- uninterrupted, bit for bit (losses, weights, optimizer state), with dropout on, at 1 process, 2 ranks FSDP (auto
-- plan) and 2 ranks DDP, GPT-2 and Llama; a checkpoint saved at 4 ranks loads at 2 and 3 ranks into the same bits
-- and trains on as the 4 ranks did; an async save writes the same files as a sync one while training goes on; a
-- save killed midway leaves the previous checkpoint; bad checkpoints fail with errors naming file, tensor and rank.
-- Workers (spec/workers/resume_worker.lua) dump their local tensors; the spec assembles whole tensors from the
-- ranks' dumps itself, so the comparison does not go through the checkpoint code.
local ffi  = require "ffi"
local fsdp = require "fsdp"
local D    = require "dist"

local WORKER = "spec/workers/resume_worker.lua"
local STEPS, SAVE_AT = 6, 3
local MODELS = {"gpt2", "llama"}

local function run(n, dir, args, env)
  local res = D.run(n, WORKER, args, {dir = dir, timeout = 60, env = env})
  assert(res.code == 0 and not res.timed_out, res.output)
  return D.results(res), res
end

-- Whole tensors from every rank's dump of (kind, tag): {key = bytes}, and the optimizer steps by name.
local function assemble(dir, ranks, kind, tag)
  local parts, steps = {}, {}
  for i, rep in ipairs(ranks) do
    local d = assert(rep[kind .. "-" .. tag], ("rank %d has no dump %s-%s"):format(i - 1, kind, tag))
    local bin = assert(D.read_file(("%s/%s-%s-rank%d.bin"):format(dir, kind, tag, i - 1)))
    for _, e in ipairs(d.index) do
      parts[e.key] = parts[e.key] or {}
      table.insert(parts[e.key], {start = e.start, bytes = bin:sub(e.at + 1, e.at + e.count * 4)})
    end
    for name, s in pairs(d.steps) do
      assert(steps[name] == nil or steps[name] == s, name)
      steps[name] = s
    end
  end
  local full = {}
  for key, list in pairs(parts) do
    table.sort(list, function(a, b) return a.start < b.start end)
    local at, out = 0, {}
    for _, p in ipairs(list) do
      if #p.bytes > 0 then
        assert(p.start == at, ("%s %s: the ranks' pieces of %s do not tile it (%d vs %d)"):format(kind, tag, key, p.start, at))
        out[#out + 1] = p.bytes
        at = at + #p.bytes / 4
      end
    end
    full[key] = table.concat(out)
  end
  return full, steps
end

local function floats(s) return ffi.cast("const float *", s), #s / 4 end

-- Bit equality of two assembled states, naming the first tensor and element that differ.
local function same_state(a, b, what)
  local n = 0
  for key, bytes in pairs(a) do
    n = n + 1
    assert(b[key] ~= nil, ("%s: %s is missing"):format(what, key))
    if bytes ~= b[key] then
      local pa, na = floats(bytes)
      local pb, nb = floats(b[key])
      assert.equal(na, nb, ("%s: %s has %d elements vs %d"):format(what, key, na, nb))
      for i = 0, na - 1 do
        assert(pa[i] == pb[i], ("%s: %s differs at element %d: %.9g vs %.9g"):format(what, key, i, pa[i], pb[i]))
      end
      error(("%s: %s differs in its bytes (NaN payloads?)"):format(what, key))
    end
  end
  for key in pairs(b) do assert(a[key] ~= nil, ("%s: %s is unexpected"):format(what, key)) end
  assert.is_true(n > 0, what .. ": empty state")
end

local function file_bytes(path) return (assert(D.read_file(path), path)) end

-- (a) resume is bit-identical at the same world size; for FSDP also (c) async saves.
local CONFIGS = {
  {name = "1 process", n = 1, mode = "plain"},
  {name = "2 ranks FSDP (auto plan)", n = 2, mode = "fsdp", async = true},
  {name = "2 ranks DDP", n = 2, mode = "ddp"},
}

local fsdp_first   -- the 2-rank FSDP run, reused for the bad-input cases

-- Every other registered model joins by its tiny config: resumed at 2 ranks (FSDP, auto plan, dropout on) it ends
-- in the uninterrupted run's bits.
local OTHERS = {}
for mt in pairs(require("fsdp.models").registry) do
  if mt ~= "gpt2" and mt ~= "llama" then OTHERS[#OTHERS + 1] = mt end
end
table.sort(OTHERS)
describe("a training checkpoint resumed in a fresh process", function()
  it(("equals the uninterrupted run bit for bit for every other registered model (%s), 2 ranks FSDP"):format(
     table.concat(OTHERS, ", ")), function()
    local first, second = D.tmpdir(), D.tmpdir()
    local args = {"mode=fsdp", "models=" .. table.concat(OTHERS, ","), "steps=" .. STEPS, "save_at=" .. SAVE_AT, "batch=2"}
    local a = run(2, first, args)
    local b = run(2, second, {"phase=resume", "ckpt=" .. first .. "/ckpt", unpack(args)})
    for _, kind in ipairs(OTHERS) do
      for step = SAVE_AT + 1, STEPS do
        assert.equal(a[1][kind .. "-losses"][step], b[1][kind .. "-losses"][step], ("%s: loss at step %d"):format(kind, step))
      end
      local saved = assemble(first, a, kind, "saved")
      same_state(saved, assemble(second, b, kind, "loaded"), kind .. " loaded vs saved")
      same_state(assemble(first, a, kind, "final"), assemble(second, b, kind, "final"), kind .. " final")
    end
  end)

  for _, c in ipairs(CONFIGS) do
    it(("equals the uninterrupted run bit for bit: %s, GPT-2 and Llama, dropout on"):format(c.name), function()
      local first, second = D.tmpdir(), D.tmpdir()
      local args = {"mode=" .. c.mode, "models=gpt2,llama", "steps=" .. STEPS, "save_at=" .. SAVE_AT, "batch=2"}
      local fargs = {unpack(args)}
      if c.async then fargs[#fargs + 1] = "async=1" end
      -- the async writer is held back 1 s, so the training step after the save provably runs during the write
      local a = run(c.n, first, fargs, c.async and {FSDP_CHECKPOINT_TEST_WRITE_DELAY = "1"} or nil)
      local rargs = {"phase=resume", "ckpt=" .. first .. "/ckpt", unpack(args)}
      if c.async then rargs[#rargs + 1] = "suffix=-async" end   -- resume from the async checkpoint
      local b = run(c.n, second, rargs)
      for _, kind in ipairs(MODELS) do
        local what = ("%s %s"):format(c.name, kind)
        -- the same losses at steps 4..6, exactly
        for step = SAVE_AT + 1, STEPS do
          assert.equal(a[1][kind .. "-losses"][step], b[1][kind .. "-losses"][step], ("%s: loss at step %d"):format(what, step))
        end
        -- the loaded state is the saved one, and the final state (weights, exp_avg, exp_avg_sq, steps) the same
        local saved, saved_steps = assemble(first, a, kind, "saved")
        local loaded, loaded_steps = assemble(second, b, kind, "loaded")
        same_state(saved, loaded, what .. " loaded vs saved")
        assert.same(saved_steps, loaded_steps)
        local fa, fsteps_a = assemble(first, a, kind, "final")
        local fb, fsteps_b = assemble(second, b, kind, "final")
        same_state(fa, fb, what .. " final")
        assert.same(fsteps_a, fsteps_b)
        for _, st in pairs(fsteps_b) do assert.equal(STEPS, st) end
        assert.equal(b[1][kind .. "-loaded-meta"].step, SAVE_AT)
        assert.same({model = kind, note = "first run", list = {1, 2.5}}, b[1][kind .. "-loaded-meta"].extra)
        -- dropout was on: the key counter had moved (a run without dropout draws no keys)
        local meta = require("cjson").decode(file_bytes(("%s/ckpt/%s/metadata.json"):format(first, kind)))
        assert.is_true(meta.rng.dropout_counter[1] > 0, what)
        assert.equal(c.n, #meta.files)
      end
      if c.async then
        for _, kind in ipairs(MODELS) do
          local s = a[1][kind .. "-async"]
          assert.is_true(s.in_flight_at_return, "save(async) returned before its write finished")
          assert.is_true(s.in_flight_after_step, "a training step ran while the write was in flight")
          assert.is_true(s.bytes > 0)
          -- the same files, byte for byte, as the sync save of the same state
          for _, f in ipairs {"metadata.json", "rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"} do
            assert.is_true(file_bytes(("%s/ckpt/%s/%s"):format(first, kind, f)) ==
                           file_bytes(("%s/ckpt/%s-async/%s"):format(first, kind, f)), kind .. " " .. f)
          end
        end
        -- the last async save was still in flight when the script ended: the exit hook published it (above)
        assert.is_true(a[1].pending_at_end)
        fsdp_first = first
      else
        D.cleanup(first)
      end
      D.cleanup(second)
    end)
  end
end)

-- (b) A checkpoint saved at 4 ranks (B = 3 per rank) loads at 2 (B = 6) and 3 ranks (B = 4): the same global batch
-- of 12, so the distributed loader hands out the same global samples. Dropout is off here: a mask is keyed by the
-- rank and the position in the rank's local batch, which moves with the world size.
describe("a checkpoint saved at 4 ranks", function()
  local first = D.tmpdir()
  local common = {"mode=fsdp", "models=gpt2,llama", "steps=" .. STEPS, "save_at=" .. SAVE_AT, "dropout=0"}
  local a

  for _, c in ipairs {{n = 2, batch = 6}, {n = 3, batch = 4}} do
    it(("loads at %d ranks into the same bits and trains on as the 4 ranks did (within 1e-6)"):format(c.n), function()
      if not a then a = run(4, first, {"batch=3", unpack(common)}) end
      local second = D.tmpdir()
      local b = run(c.n, second, {"phase=resume", "ckpt=" .. first .. "/ckpt", "batch=" .. c.batch, unpack(common)})
      for _, kind in ipairs(MODELS) do
        local what = ("%s at %d ranks"):format(kind, c.n)
        local saved, saved_steps = assemble(first, a, kind, "saved")
        local loaded, loaded_steps = assemble(second, b, kind, "loaded")
        same_state(saved, loaded, what .. ": loaded vs saved at 4 ranks")   -- resharded model and optimizer state
        assert.same(saved_steps, loaded_steps)
        -- The steps after the load are the 4-rank steps with the reduction order changed: the loss is a mean over
        -- 2 or 3 local means instead of 4, and the gradients are reduce-scattered over other ranks, so f32 sums
        -- round differently (relative 1e-7 per sum; observed below 1e-7 on the loss). 1e-6 relative bounds that.
        for step = SAVE_AT + 1, STEPS do
          local x, y = a[1][kind .. "-losses"][step], b[1][kind .. "-losses"][step]
          assert.is_true(math.abs(x - y) <= 1e-6 * math.abs(x), ("%s: loss at step %d: %.17g vs %.17g"):format(what, step, x, y))
        end
        local fa = assemble(first, a, kind, "final")
        local fb = assemble(second, b, kind, "final")
        -- Weights and optimizer state: the same relative 1e-6 where the gradient is signal. Adam divides by
        -- sqrt(v), so an element whose gradient is only rounding noise (the attention key biases: softmax is blind
        -- to them; their exact gradient is 0) moves by lr * noise / (|noise| + eps) per step, and the noise is not
        -- the same at 3 or 2 ranks as at 4: those elements get an absolute 1e-5 (lr <= 1e-2 and noise ~1e-10 against
        -- eps = 1e-8 give ~1e-4 lr per step; observed below 1e-6).
        for key, bytes in pairs(fa) do
          local pa, n = floats(bytes)
          local pb = floats(fb[key])
          for i = 0, n - 1 do
            local x, y = pa[i], pb[i]
            assert(math.abs(x - y) <= 1e-6 * math.abs(x) + 1e-5,
                   ("%s: final %s[%d]: %.9g vs %.9g"):format(what, key, i, x, y))
          end
        end
      end
      D.cleanup(second)
      if c.n == 3 then D.cleanup(first) end
    end)
  end
end)

-- What a checkpoint loads into one process (a plain model: the 2-rank pieces are resharded into whole tensors),
-- in the keys of assemble(): model.<name>, exp_avg.<name>, exp_avg_sq.<name>.
local function build_plain(kind, seed)
  local cfg = fsdp.models.tiny_config(kind, kind == "gpt2" and {resid_pdrop = 0.1, embd_pdrop = 0.1, attn_pdrop = 0.1}
                                      or {attention_dropout = 0.1})
  local model = fsdp.models.build(cfg, {seed = seed})
  local opt = fsdp.optim.AdamW(fsdp.optim.param_groups(model, {weight_decay = 0.1}), {lr = 1e-3, betas = {0.9, 0.95}})
  return model, opt
end

local function state_of(model, opt)
  local out, steps, id_of = {}, {}, {}
  opt:each_param(function(id, p) id_of[p] = id end)
  for name, p in model:named_parameters() do
    out["model." .. name] = ffi.string(p:data_ptr(), p:numel() * 4)
    local st = opt.state[id_of[p]]
    if st then
      steps[name] = st.step
      for _, sn in ipairs {"exp_avg", "exp_avg_sq"} do out[sn .. "." .. name] = ffi.string(st[sn]:data_ptr(), p:numel() * 4) end
    end
  end
  return out, steps
end

local function load_plain(ckpt, kind)
  local model, opt = build_plain(kind, 5)
  local res = fsdp.checkpoint.load(ckpt, {model = model, optimizer = opt})
  local s, steps = state_of(model, opt)
  return s, steps, res
end

-- (d) The second save of a run is killed (SIGKILL of rank 1): the directory still holds the first, loadable and
-- bit-exact, whether the kill came between writing and agreeing (sync) or during a background write (async).
describe("a save killed midway", function()
  for _, c in ipairs {
    {kill = "sync", env = {FSDP_CHECKPOINT_TEST_KILL = "1:2"}},          -- rank 1, at its second sync save
    {kill = "async", env = {FSDP_CHECKPOINT_TEST_WRITE_DELAY = "2"}},    -- the write held back: rank 1 dies during it
  } do
    it(("(%s) leaves the previous checkpoint loadable and bit-exact"):format(c.kill), function()
      local dir = D.tmpdir()
      local res = D.run(2, WORKER, {"phase=kill", "kill=" .. c.kill, "mode=fsdp", "models=gpt2"},
                        {dir = dir, timeout = 60, env = c.env})
      -- the job died with its rank (mpirun exits 137 = 128 + SIGKILL, which D.run also reports for a timeout:
      -- the elapsed time tells them apart)
      assert.are_not.equal(0, res.code, res.output)
      assert.is_true(res.elapsed < 50, res.output)
      assert.matches("signal 9", res.output, 1, true)
      local ranks = D.results(dir, 2)                         -- written after the first save, before the kill
      assert.is_nil(ranks[1].survived)
      local ckpt = dir .. "/ckpt/gpt2"
      local meta = require("cjson").decode(file_bytes(ckpt .. "/metadata.json"))
      assert.equal(2, meta.step)                              -- the first save's, not the killed one's (3)
      -- the killed save got as far as its staging directory: (sync) rank 1's file, written just before the kill;
      -- (async) no rank file yet, the writer being held back; never metadata.json, written last with the files'
      -- checksums
      local p = io.popen(("ls -d %s/ckpt/.gpt2.tmp.*"):format(D.quote(dir)))
      local stage = p:read("*l")
      p:close()
      assert.is_string(stage, "no staging directory left by the killed save")
      assert.is_nil(io.open(stage .. "/metadata.json", "rb"))
      local f = io.open(stage .. "/rank-00001-of-00002.safetensors", "rb")
      if f then f:close() end
      assert.equal(c.kill == "sync", f ~= nil)
      local saved, saved_steps = assemble(dir, ranks, "gpt2", "saved")
      local loaded, loaded_steps, lres = load_plain(ckpt, "gpt2")
      same_state(saved, loaded, "after the killed save (" .. c.kill .. ")")
      assert.same(saved_steps, loaded_steps)
      assert.equal(2, lres.step)
      D.cleanup(dir)
    end)
  end
end)

-- (e) Bad checkpoints: each fails with an error that names what is wrong, on every rank, never a hang.
describe("loading a bad checkpoint", function()
  local base
  local function fresh_copy()
    if not fsdp_first then fsdp_first = D.tmpdir(); run(2, fsdp_first, {"mode=fsdp", "models=gpt2"}) end
    base = base or fsdp_first .. "/ckpt/gpt2"
    local d = D.tmpdir()
    os.execute(("cp -r %s/. %s"):format(D.quote(base), D.quote(d)))
    return d
  end
  local function load_error(dir, kind, build_opts)
    local model, opt = build_plain(kind or "gpt2", 5)
    if build_opts then model, opt = build_opts() end
    local ok, err = pcall(fsdp.checkpoint.load, dir, {model = model, optimizer = opt})
    assert.is_false(ok, "the load succeeded")
    return tostring(err)
  end
  local function edit_metadata(dir, fn)
    local cjson = require "cjson"
    local meta = cjson.decode(file_bytes(dir .. "/metadata.json"))
    fn(meta)
    local f = assert(io.open(dir .. "/metadata.json", "wb"))
    f:write(require("fsdp.checkpoint.hf").encode_json(meta, "", {}, nil))
    f:close()
  end

  it("with a missing rank file names the file and the rank", function()
    local d = fresh_copy()
    os.remove(d .. "/rank-00001-of-00002.safetensors")
    local err = load_error(d)
    assert.matches("the file of rank 1", err, 1, true)
    assert.matches(d .. "/rank-00001-of-00002.safetensors", err, 1, true)
    assert.matches("is missing or damaged", err, 1, true)
    D.cleanup(d)
  end)

  it("with a corrupt or truncated rank file names the file and the rank", function()
    local d = fresh_copy()
    local f = assert(io.open(d .. "/rank-00000-of-00002.safetensors", "r+b"))
    f:write("\255\255\255\255\255\255\255\127")   -- the header length: 2^63
    f:close()
    local err = load_error(d)
    assert.matches("the file of rank 0", err, 1, true)
    assert.matches("rank-00000-of-00002.safetensors", err, 1, true)
    assert.matches("fails its checksum", err, 1, true)
    -- saved before checksums were recorded (files by name only): the header itself is found damaged
    edit_metadata(d, function(m) for i, e in ipairs(m.files) do m.files[i] = e.name end end)
    err = load_error(d)
    assert.matches("the file of rank 0", err, 1, true)
    assert.matches("declares a header of", err, 1, true)
    os.execute(("cp %s/metadata.json %s/"):format(D.quote(base), D.quote(d)))
    local path = d .. "/rank-00001-of-00002.safetensors"
    local bytes = file_bytes(path)
    f = assert(io.open(path, "wb")); f:write(bytes:sub(1, #bytes - 100)); f:close()
    os.execute(("cp %s/rank-00000-of-00002.safetensors %s/"):format(D.quote(base), D.quote(d)))
    err = load_error(d)
    assert.matches("the file of rank 1", err, 1, true)
    assert.matches("truncated", err, 1, true)
    D.cleanup(d)
  end)

  it("whose metadata.json names other shapes or pieces names the tensor", function()
    local d = fresh_copy()
    edit_metadata(d, function(m) m.tensors["model.transformer.wte.weight"].shape = {99, 32} end)
    local err = load_error(d)
    assert.matches("'transformer.wte.weight' is [99, 32] in the checkpoint, [101, 32] in the model", err, 1, true)
    os.execute(("cp %s/metadata.json %s/"):format(D.quote(base), D.quote(d)))
    edit_metadata(d, function(m)
      local p = m.tensors["model.transformer.h.0.mlp.c_fc.weight"].pieces
      p[#p].count = p[#p].count - 32   -- metadata.json and the rank file disagree
    end)
    err = load_error(d)
    assert.matches("tensor 'model.transformer.h.0.mlp.c_fc.weight'", err, 1, true)
    assert.matches("its pieces cover", err, 1, true)
    D.cleanup(d)
  end)

  it("into a model of another architecture or size names the tensors", function()
    local d = fresh_copy()
    local err = load_error(d, "llama")
    assert.matches("holds a gpt2 model, this one is llama", err, 1, true)
    assert.matches("lacks %d+ parameter%(s%) of the model: model%.embed_tokens%.weight", err)
    err = load_error(d, nil, function()
      local model = fsdp.models.build(fsdp.models.tiny_config("gpt2", {n_embd = 48}), {seed = 1})
      return model, fsdp.optim.AdamW(model:parameters())
    end)
    assert.matches("'transformer.wte.weight' is [101, 32] in the checkpoint, [101, 48] in the model", err, 1, true)
    -- an optimizer over other parameters: named, not silently dropped
    err = load_error(d, nil, function()
      local model = build_plain("gpt2", 5)
      return model, fsdp.optim.AdamW({model.transformer.wte.weight})
    end)
    assert.matches("the checkpoint has optimizer parameters this optimizer lacks: transformer.h.0", err, 1, true)
    D.cleanup(d)
  end)

  it("fails on every rank of a job, naming the rank and file, without hanging", function()
    local d = fresh_copy()
    os.remove(d .. "/rank-00001-of-00002.safetensors")
    local dir = D.tmpdir()
    local ranks = run(2, dir, {"phase=badload", "mode=fsdp", "models=gpt2", "ckpt=" .. D.tmpdir()})
    -- the checkpoint path is a fresh empty dir: metadata.json is missing on both ranks
    for _, r in ipairs(ranks) do
      assert.is_false(r.ok)
      assert.matches("metadata.json", r.err, 1, true)
    end
    -- a file only rank 1 needs: rank 1 raises its own error, rank 0 learns it from rank 1
    os.execute(("mkdir -p %s/ckpt && cp -r %s %s/ckpt/gpt2"):format(D.quote(dir), D.quote(d), D.quote(dir)))
    ranks = run(2, dir, {"phase=badload", "mode=fsdp", "models=gpt2"})
    assert.is_false(ranks[2].ok)
    assert.matches("the file of rank 1, '[^']*rank%-00001%-of%-00002%.safetensors', is missing", ranks[2].err)
    assert.is_false(ranks[1].ok)
    assert.matches("checkpoint.load: rank 1 failed: ", ranks[1].err, 1, true)
    assert.matches("rank-00001-of-00002.safetensors", ranks[1].err, 1, true)
    D.cleanup(d); D.cleanup(dir)
    if fsdp_first then D.cleanup(fsdp_first) end
  end)
end)

-- Other plans and HSDP: saved at 4 ranks as HSDP (dp_replicate 2 x dp_shard 2, the declared plan), where the two
-- replicas of each shard split its writing, loaded at 2 ranks under a manual plan and into one process.
describe("a checkpoint of an HSDP model (declared plan)", function()
  it("loads into a manual plan at 2 ranks and into one process, bit for bit", function()
    local first, second = D.tmpdir(), D.tmpdir()
    local common = {"mode=fsdp", "models=gpt2,llama", "steps=4", "save_at=2"}
    local a = run(4, first, {"plan=declared", "mesh=hsdp", "batch=2", unpack(common)})
    local b = run(2, second, {"phase=resume", "plan=manual", "ckpt=" .. first .. "/ckpt", "batch=4", unpack(common)})
    for _, kind in ipairs(MODELS) do
      local saved, saved_steps = assemble(first, a, kind, "saved")
      local loaded = assemble(second, b, kind, "loaded")
      same_state(saved, loaded, kind .. ": HSDP at 4 ranks -> manual plan at 2")
      local plain, plain_steps = load_plain(first .. "/ckpt/" .. kind, kind)
      same_state(saved, plain, kind .. ": HSDP at 4 ranks -> one process")
      assert.same(saved_steps, plain_steps)
      -- every rank wrote: the replicas of a shard split its rows
      local meta = require("cjson").decode(file_bytes(("%s/ckpt/%s/metadata.json"):format(first, kind)))
      local writers = {}
      for _, rec in pairs(meta.tensors) do for _, p in ipairs(rec.pieces) do writers[p.rank] = true end end
      for r = 0, 3 do assert.is_true(writers[r], ("rank %d wrote no piece"):format(r)) end
      assert.same({names = {"dp_replicate", "dp_shard"}, sizes = {2, 2}}, meta.mesh)
    end
    D.cleanup(first); D.cleanup(second)
  end)
end)
