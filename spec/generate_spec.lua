-- spec/generate_spec.lua: model:generate (lua/fsdp/generate.lua) against transformers' greedy generate on every
-- model fixture (a left-padded batch, windows longer than Mistral's and Qwen2's sliding window), against decoding
-- without a cache, padding invariance, eos handling, sampling, and bad arguments.
local fsdp   = require "fsdp"
local models = require "fsdp.models"
local st     = require "fsdp.safetensors"

local FIXTURES = {"gpt2_tied", "gpt2_untied", "llama_untied", "llama_tied", "mistral_untied", "mistral_tied",
                  "qwen2_untied", "qwen2_tied", "qwen3_untied", "qwen3_tied", "phi3_untied", "phi3_tied",
                  "mixtral_untied", "mixtral_tied", "qwen2_moe_untied", "qwen2_moe_tied", "qwen3_moe_untied",
                  "qwen3_moe_tied"}

local function rows(t)
  local out, B, T = {}, t:size(1), t:size(2)
  local flat = t:totable()
  for b = 1, B do
    local r = {}
    for j = 1, T do r[j] = flat[(b - 1) * T + j] end
    out[b] = r
  end
  return out
end

-- Greedy decoding by recomputing the whole sequence every step: no cache, the training forward.
local function greedy_no_cache(m, prompt, n)
  local seq = {}
  for i, v in ipairs(prompt) do seq[i] = v end
  for _ = 1, n do
    local ids = fsdp.tensor({seq}, {dtype = "i64"})
    local logits = fsdp.no_grad(function() return m(ids).logits end)
    local V, T = logits:size(3), logits:size(2)
    local best, bv = 0, -math.huge
    for i = 0, V - 1 do
      local x = logits:get((T - 1) * V + i)
      if x > bv then best, bv = i, x end
    end
    seq[#seq + 1] = best
  end
  return seq
end

describe("generate", function()
  for _, name in ipairs(FIXTURES) do
    it(name .. ": greedy equals transformers' generate(do_sample=False) on a left-padded batch", function()
      local dir = "spec/fixtures/" .. name
      local g = st.load(dir .. "/generate.safetensors")
      -- the fixture's greedy choices are never near a tie (smallest top-1 / top-2 margin >= 7e-4, our logits are
      -- within 1e-5 relative of torch's): equal tokens are the expected outcome, not luck
      assert.is_true(g.min_margin:item() > 5e-4)
      local m = models.from_pretrained(dir)
      local out = m:generate(g.input_ids, {max_new_tokens = 8, attention_mask = g.attention_mask, eos_token_id = {},
                                           pad_token_id = 0})
      assert.same(rows(g.sequences), rows(out))
    end)
  end

  it("decodes with the cache what recomputing the whole sequence decodes, and padding changes nothing", function()
    for _, name in ipairs {"gpt2_untied", "mistral_untied", "qwen2_untied", "phi3_untied", "qwen3_moe_untied"} do
      local m = models.from_pretrained("spec/fixtures/" .. name)
      local prompt = {5, 9, 2, 7, 3}
      local want = greedy_no_cache(m, prompt, 9)   -- 14 tokens: past every sliding window of the fixtures
      local one = m:generate(fsdp.tensor({prompt}, {dtype = "i64"}), {max_new_tokens = 9, eos_token_id = {}})
      assert.same({want}, rows(one), name)
      -- the same prompt left-padded by 3 beside another row
      local ids = fsdp.tensor({{0, 0, 0, 5, 9, 2, 7, 3}, {4, 4, 1, 8, 6, 2, 9, 9}}, {dtype = "i64"})
      local mask = fsdp.tensor({{0, 0, 0, 1, 1, 1, 1, 1}, {1, 1, 1, 1, 1, 1, 1, 1}}, {dtype = "i64"})
      local two = rows(m:generate(ids, {max_new_tokens = 9, attention_mask = mask, eos_token_id = {}}))
      local tail = {}
      for j = 4, #two[1] do tail[#tail + 1] = two[1][j] end
      assert.same(want, tail, name .. ": left padding")
    end
  end)

  it("stops a row at eos (then pads it) and the batch when every row has stopped", function()
    local m = models.from_pretrained("spec/fixtures/llama_untied")
    local ids = fsdp.tensor({{5, 9, 2, 7}, {1, 3, 3, 8}}, {dtype = "i64"})
    local free = rows(m:generate(ids, {max_new_tokens = 6, eos_token_id = {}}))
    local eos = free[1][5]   -- row 0's first token
    local out = rows(m:generate(ids, {max_new_tokens = 6, eos_token_id = eos, pad_token_id = 99}))
    assert.equal(eos, out[1][5])
    for j = 6, #out[1] do assert.equal(99, out[1][j]) end
    for j = 5, #out[2] do
      assert.equal(free[2][j], out[2][j])
      if out[2][j] == eos then break end
    end
    -- both rows stop at their first token: one step only
    local both = rows(m:generate(ids, {max_new_tokens = 6, eos_token_id = {free[1][5], free[2][5]}}))
    assert.equal(5, #both[1])
  end)

  it("samples reproducibly from its seed; top_k = 1 and a tiny top_p are greedy", function()
    local m = models.from_pretrained("spec/fixtures/qwen3_untied")
    local ids = fsdp.tensor({{5, 9, 2, 7}, {1, 3, 3, 8}}, {dtype = "i64"})
    local greedy = rows(m:generate(ids, {max_new_tokens = 8, eos_token_id = {}}))
    local a = rows(m:generate(ids, {max_new_tokens = 8, eos_token_id = {}, temperature = 1.0, seed = 3}))
    local b = rows(m:generate(ids, {max_new_tokens = 8, eos_token_id = {}, temperature = 1.0, seed = 3}))
    local c = rows(m:generate(ids, {max_new_tokens = 8, eos_token_id = {}, temperature = 1.0, seed = 4}))
    assert.same(a, b)
    assert.are_not.same(a, c)
    assert.are_not.same(a, greedy)
    assert.same(greedy, rows(m:generate(ids, {max_new_tokens = 8, eos_token_id = {}, temperature = 0.7, top_k = 1, seed = 5})))
    assert.same(greedy, rows(m:generate(ids, {max_new_tokens = 8, eos_token_id = {}, do_sample = true, top_p = 1e-6, seed = 6})))
  end)

  it("leaves the model as it was (training mode) and refuses bad arguments", function()
    local m = models.from_pretrained("spec/fixtures/gpt2_tied")
    assert.is_true(m.training)
    m:generate(fsdp.tensor({{1, 2}}, {dtype = "i64"}), {max_new_tokens = 2})
    assert.is_true(m.training)
    local ids = fsdp.tensor({{1, 2}}, {dtype = "i64"})
    local cases = {
      {fsdp.tensor({1, 2}, {dtype = "i64"}), {}, "ids must be an i64 %(or i32%) tensor"},
      {ids, {max_new_tokens = 40}, "exceed the model's 32 positions"},
      {ids, {top_p = 0}, "top_p must be a number in"},
      {ids, {temperature = -1, do_sample = true}, "temperature must be a finite number >= 0"},
      {ids, {attention_mask = fsdp.ones({1, 3})}, "attention_mask must be %[1, 2%]"},
      {ids, {beams = 4}, "unknown option 'beams'"},
    }
    for _, c in ipairs(cases) do
      local ok, err = pcall(m.generate, m, c[1], c[2])
      assert.is_false(ok, c[3])
      assert.matches(c[3], tostring(err))
    end
  end)

  it("checks every option before any work, with the option and its valid range in the message", function()
    local m = models.from_pretrained("spec/fixtures/gpt2_tied")   -- vocab_size 101, 32 positions
    local ids = fsdp.tensor({{1, 2}, {3, 4}}, {dtype = "i64"})
    local left = fsdp.tensor({{0, 1}, {1, 1}}, {dtype = "i64"})
    local cases = {
      {{temperature = -1}, "generate: temperature must be a finite number >= 0 (0: greedy), got -1"},
      {{temperature = 0 / 0}, "generate: temperature must be a finite number >= 0 (0: greedy), got nan"},
      {{temperature = 1 / 0}, "generate: temperature must be a finite number >= 0 (0: greedy), got inf"},
      {{temperature = "0.7"}, "generate: temperature must be a finite number >= 0 (0: greedy), got string"},
      {{temperature = 0, do_sample = true},
       "generate: sampling needs a temperature > 0, got 0 (for greedy decoding leave do_sample unset or false)"},
      {{temperature = 0.7, do_sample = false},
       "generate: temperature = 0.7 needs sampling, but decoding is greedy (do_sample = false)"},
      {{do_sample = "yes"}, "generate: do_sample must be true or false, got string"},
      {{top_p = 0, temperature = 1}, "generate: top_p must be a number in (0, 1], got 0"},
      {{top_p = 1.5, temperature = 1}, "generate: top_p must be a number in (0, 1], got 1.5"},
      {{top_p = 0 / 0, temperature = 1}, "generate: top_p must be a number in (0, 1], got nan"},
      {{top_k = -1, temperature = 1}, "generate: top_k must be an integer >= 0 (0: no top-k filter), got -1"},
      {{top_k = 2.5, temperature = 1}, "generate: top_k must be an integer >= 0 (0: no top-k filter), got 2.5"},
      {{top_k = 1 / 0, temperature = 1}, "generate: top_k must be an integer >= 0 (0: no top-k filter), got inf"},
      {{top_k = 5}, "generate: top_k = 5 needs sampling (do_sample = true or a temperature > 0); decoding is greedy "
                    .. "(do_sample unset, no temperature > 0)"},
      {{top_p = 0.9, do_sample = false}, "generate: top_p = 0.9 needs sampling (do_sample = true or a temperature > 0); "
                                         .. "decoding is greedy (do_sample = false)"},
      {{max_new_tokens = 0}, "generate: max_new_tokens must be an integer >= 1, got 0"},
      {{max_new_tokens = -3}, "generate: max_new_tokens must be an integer >= 1, got -3"},
      {{max_new_tokens = 2.5}, "generate: max_new_tokens must be an integer >= 1, got 2.5"},
      {{max_new_tokens = 1 / 0}, "generate: max_new_tokens must be an integer >= 1, got inf"},
      {{max_new_tokens = "4"}, "generate: max_new_tokens must be an integer >= 1, got string"},
      {{seed = 1.5, temperature = 1}, "generate: seed must be an integer in [0, 2^53], got 1.5"},
      {{seed = -1, temperature = 1}, "generate: seed must be an integer in [0, 2^53], got -1"},
      {{seed = "7", temperature = 1}, "generate: seed must be an integer in [0, 2^53], got string"},
      {{eos_token_id = "2"}, "generate: eos_token_id must be a token id or a list of them, got string"},
      {{eos_token_id = {2, -1}}, "generate: eos_token_id must be a token id or a list of them, got -1"},
      {{eos_token_id = {first = 2}}, "generate: eos_token_id must be a token id or a list of them, got a table with keys"},
      {{pad_token_id = -1}, "generate: pad_token_id must be a token id in [0, 101), got -1"},
      {{pad_token_id = 101}, "generate: pad_token_id must be a token id in [0, 101), got 101"},
      {{pad_token_id = "0"}, "generate: pad_token_id must be a token id in [0, 101), got string"},
      {{eos_token_id = {50256, 7}},   -- gpt2 has no pad: the fallback is the first eos, which the model cannot embed
       "generate: finished rows continue with the first eos_token_id (no pad_token_id), 50256, which is not a token "
       .. "id (vocab_size 101); pass pad_token_id"},
      {{attention_mask = fsdp.tensor({{1, 0}, {1, 1}}, {dtype = "i64"})},
       "generate: attention_mask row 0 has padding at position 1 after a token; generation needs left padding "
       .. "(tokenizers: padding_side = 'left')"},
      {{attention_mask = fsdp.tensor({{1, 1}, {0, 0}}, {dtype = "i64"})},
       "generate: attention_mask row 1 has no tokens (all 0)"},
      {{attention_mask = fsdp.tensor({{1, 2}, {1, 1}}, {dtype = "i64"})},
       "generate: attention_mask[0][1] is 2, expected 0 or 1"},
      {{attention_mask = fsdp.zeros({2, 2}, {device = "meta"})}, "generate: attention_mask [2, 2] has no data (on meta)"},
      {{attention_mask = {{1, 1}, {1, 1}}}, "generate: attention_mask must be a tensor, got table"},
    }
    for _, c in ipairs(cases) do
      local ok, err = pcall(m.generate, m, ids, c[1])
      assert.is_false(ok, c[2])
      assert.matches(c[2], tostring(err), 1, true)
      assert.is_true(m.training)   -- refused before the mode switch
    end
    local ok, err = pcall(m.generate, m, fsdp.tensor({{1, 101}}, {dtype = "i64"}), {})
    assert.is_false(ok)
    assert.matches("generate: ids[0][1] = 101 is not a token id of the model (vocab_size 101)", tostring(err), 1, true)
    ok, err = pcall(m.generate, m, fsdp.zeros({0, 2}, {dtype = "i64"}), {})
    assert.is_false(ok)
    assert.matches("generate: the batch is empty (ids has no rows)", tostring(err), 1, true)

    -- the neutral spellings decode greedily, as without them: temperature 0, top_k 0, top_p 1, a seed
    local greedy = rows(m:generate(ids, {max_new_tokens = 4, eos_token_id = {}, attention_mask = left}))
    for _, o in ipairs {{temperature = 0}, {do_sample = false, temperature = 1}, {top_k = 0, top_p = 1},
                        {seed = 9}, {temperature = 0, top_k = 0}} do
      o.max_new_tokens, o.eos_token_id, o.attention_mask = 4, {}, left
      assert.same(greedy, rows(m:generate(ids, o)))
    end
    -- do_sample alone samples at temperature 1
    local s1 = rows(m:generate(ids, {max_new_tokens = 4, eos_token_id = {}, do_sample = true, seed = 2}))
    assert.same(s1, rows(m:generate(ids, {max_new_tokens = 4, eos_token_id = {}, temperature = 1, seed = 2})))
  end)

  it("reads ids and attention_mask views through their strides (a transposed prompt is its own rows)", function()
    local m = models.from_pretrained("spec/fixtures/gpt2_tied")
    local ids = fsdp.tensor({{7, 1, 3}, {8, 2, 4}}, {dtype = "i64"}):transpose(1, 2)    -- [3, 2]: rows {7, 8}, ...
    local mask = fsdp.tensor({{0, 1, 1}, {1, 1, 1}}, {dtype = "f64"}):transpose(1, 2)  -- row 0 left-padded
    local want = rows(m:generate(fsdp.tensor({{7, 8}, {1, 2}, {3, 4}}, {dtype = "i64"}),
                                 {max_new_tokens = 3, eos_token_id = {},
                                  attention_mask = fsdp.tensor({{0, 1}, {1, 1}, {1, 1}}, {dtype = "i64"})}))
    assert.same({7, 8}, {want[1][1], want[1][2]})
    assert.same(want, rows(m:generate(ids, {max_new_tokens = 3, eos_token_id = {}, attention_mask = mask})))
  end)
end)
