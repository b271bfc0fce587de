-- spec/dist/hf_tied_head_spec.lua: the checkpoints of spec/fixtures/tied_head (tie_word_embeddings set, files that
-- disagree) loaded sharded at 2 ranks under every plan of spec/workers/hf_interop_worker.lua: transformers' logits
-- on every rank, a stored head kept (untied, said once per load, by rank 0 only) or the embedding read from the
-- head's key (tied), and the model saved back as what it now is.
local ffi   = require "ffi"
local cjson = require "cjson"
local st    = require "fsdp.safetensors"
local D     = require "dist"

local ROOT   = "spec/fixtures/tied_head"
local NAMES  = {"gpt2_tied_own_head", "gpt2_tied_head_only", "llama_tied_own_head", "llama_tied_head_only"}
local PLANS  = {"auto", "declared", "manual"}

local function rel_err(a, b, what)
  assert.same(b:shape(), a:shape(), what)
  local x = ffi.cast("const float *", a:data_ptr())
  local y = ffi.cast("const float *", b:data_ptr())
  local d, s = 0, 0
  for i = 0, a:numel() - 1 do
    d = math.max(d, math.abs(x[i] - y[i]))
    s = math.max(s, math.abs(y[i]))
  end
  return d / math.max(s, 1e-30)
end

describe("tied configs over checkpoints that disagree, sharded at 2 ranks", function()
  local run
  local function launch()
    if not run then
      local args = {"spec"}
      for _, n in ipairs(NAMES) do args[#args + 1] = ROOT .. "/" .. n end
      run = D.run(2, "spec/workers/hf_interop_worker.lua", args, {timeout = 180})
    end
    assert(run.code == 0 and not run.timed_out, ("worker failed (exit %d):\n%s"):format(run.code, run.output))
    return run
  end

  for _, name in ipairs(NAMES) do
    local own = name:find("own_head", 1, true) ~= nil
    it(("%s: transformers' logits on both ranks under %s, %s"):format(name, table.concat(PLANS, ", "),
       own and "untied and said once per load" or "tied, nothing said"), function()
      local r = launch()
      local expected = st.load(ROOT .. "/" .. name .. "/expected.safetensors").logits
      for _, plan in ipairs(PLANS) do
        for rank = 0, 1 do
          local what = ("%s, plan %s, rank %d"):format(name, plan, rank)
          local logits = st.load(("%s/%s.%s.r%d.safetensors"):format(r.dir, name, plan, rank)).logits
          -- f32, the same ops as torch eager: see hf_interop_spec (measured < 4e-7); tying the wrong way is ~1
          local e = rel_err(logits, expected, what)
          assert.is_true(e < 1e-5, ("%s: logits differ from transformers' by %g relative"):format(what, e))
        end
        local out = ("%s/%s.%s.f32"):format(r.dir, name, plan)
        local cfg = cjson.decode(D.read_file(out .. "/config.json"))
        assert.equal(not own, cfg.tie_word_embeddings, out)
        local hdr = st.header(out .. "/model.safetensors")
        assert.equal(own, hdr.tensors["lm_head.weight"] ~= nil, out .. ": lm_head.weight")
      end
      -- one line per load (three plans), from rank 0 alone
      local dir_text = ROOT .. "/" .. name .. "/config.json' sets tie_word_embeddings"
      local _, n = r.output:gsub(dir_text:gsub("%p", "%%%0"), "")
      assert.equal(own and #PLANS or 0, n, r.output)
    end)
  end

  teardown(function() if run then D.cleanup(run) end end)
end)
