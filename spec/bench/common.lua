-- spec/bench/common.lua: what the bench scripts share: the model sizes they train, a monotonic clock, peak RSS,
-- the sgemm peak, /proc/meminfo and running a command under a wall-clock limit for its JSON line. Loaded with
-- dofile(ROOT .. "spec/bench/common.lua") (spec/bench is not on package.path); the scripts keep their own options.
local fsdp  = require "fsdp"
local ffi   = require "ffi"
local cjson = require "cjson"

local M = {}

-- The models the benches train, by --size name. spec/reference/bench_torch.py's SIZES holds the same shapes for
-- PyTorch (transformers' GPT2Config / LlamaConfig); a change here goes there too. Dropouts are 0 everywhere, so
-- every contender computes the same function. seq/batch: the defaults of bench.lua and bench_dist.lua.
M.SIZES = {
  bench = {model = "gpt2", label = "GPT-2 bench model", seq = 256, batch = 8,
           cfg = {vocab_size = 256, n_positions = 256, n_embd = 384, n_layer = 6, n_head = 6}},
  gpt2 = {model = "gpt2", label = "GPT-2 124M (gpt2)", seq = 256, batch = 4,
          cfg = {vocab_size = 50257, n_positions = 1024, n_embd = 768, n_layer = 12, n_head = 12}},
  ["gpt2-medium"] = {model = "gpt2", label = "GPT-2 350M (gpt2-medium)", seq = 256, batch = 4,
                     cfg = {vocab_size = 50257, n_positions = 1024, n_embd = 1024, n_layer = 24, n_head = 16}},
  -- Llama-shaped, TinyLlama's MLP width (5632) on 16 layers: 0.86B parameters, 13.7 GB of f32 params + grads +
  -- AdamW states, which fits this 24 GB machine once (1 process, or sharded over 2 ranks), not twice (DDP).
  -- Llama-3.2-1B's 8192 would make it 1.10B and 17.7 GB: too close to 24 GB with activations beside it.
  ["llama-1b"] = {model = "llama", label = "Llama 0.86B (2048 x 16 layers, GQA 32/8, MLP 5632)", seq = 256, batch = 2,
                  cfg = {vocab_size = 32000, hidden_size = 2048, intermediate_size = 5632, num_hidden_layers = 16,
                         num_attention_heads = 32, num_key_value_heads = 8, max_position_embeddings = 2048,
                         tie_word_embeddings = false}},
}
M.SIZE_NAMES = {"bench", "gpt2", "gpt2-medium", "llama-1b"}

-- size: the entry of M.SIZES (an error naming the valid ones otherwise).
function M.size(name)
  local s = M.SIZES[name]
  if not s then
    error(("bench: unknown size '%s' (valid: %s)"):format(tostring(name), table.concat(M.SIZE_NAMES, ", ")), 0)
  end
  return s
end

-- The model config of a size, dropouts 0 (the GPT-2 keys; Llama has attention_dropout 0 by default).
function M.model_config(name)
  local s = M.size(name)
  local o = {}
  for k, v in pairs(s.cfg) do o[k] = v end
  if s.model == "gpt2" then o.resid_pdrop, o.embd_pdrop, o.attn_pdrop = 0, 0, 0 end
  return fsdp.models.config(s.model, o)
end

-- The largest seq a size takes (its position table).
function M.max_seq(name)
  local c = M.size(name).cfg
  return c.n_positions or c.max_position_embeddings
end

-- What a size's model is, counted on a meta build (no storage): n (parameters, a tied weight once), lookup (the
-- parameters only looked up, never multiplied: GPT-2's wpe, Llama's embed_tokens when untied; GPT-2's tied wte is
-- the LM head's weight and counts), layers, width (the attention width, heads x head dim).
function M.shape(name)
  local cfg = M.model_config(name)
  local model = fsdp.models.build(cfg, {device = "meta"})
  local n, lookup = 0, 0
  for pname, p in model:named_parameters() do
    n = n + p:numel()
    if pname == "transformer.wpe.weight" or (pname == "model.embed_tokens.weight" and not cfg.tie_word_embeddings) then
      lookup = lookup + p:numel()
    end
  end
  local layers = cfg.n_layer or cfg.num_hidden_layers
  local width = cfg.n_embd or (cfg.num_attention_heads * (cfg.head_dim or cfg.hidden_size / cfg.num_attention_heads))
  return {n = n, lookup = lookup, layers = layers, width = width}
end

-- Training FLOPs per token at sequence length T: 6 per multiplied parameter (forward 2, backward 4) plus the
-- causal attention's 6 * layers * width * T (QK^T and AV over half the positions, forward and backward), as
-- bench.lua counts them.
function M.flops_per_token(shape, T)
  return 6 * (shape.n - shape.lookup) + 6 * shape.layers * shape.width * T
end

ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } fl_bench_common_timespec;
  int clock_gettime(int clk, fl_bench_common_timespec *ts);
]]
local ts = ffi.new("fl_bench_common_timespec")
function M.now() ffi.C.clock_gettime(1, ts); return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9 end

-- VmHWM of this process, MB.
function M.peak_rss_mb()
  for line in io.lines("/proc/self/status") do
    local kb = line:match("^VmHWM:%s+(%d+)")
    if kb then return tonumber(kb) / 1024 end
  end
  error("bench: no VmHWM in /proc/self/status")
end

-- MemAvailable of /proc/meminfo, bytes.
function M.mem_available()
  for line in io.lines("/proc/meminfo") do
    local kb = line:match("^MemAvailable:%s+(%d+)")
    if kb then return tonumber(kb) * 1024 end
  end
  error("bench: no MemAvailable in /proc/meminfo")
end

-- The sgemm peak in GFLOP/s at the current thread count: the best of a few large products, the same BLAS the
-- models use.
function M.sgemm_peak()
  local best = 0
  for _, s in ipairs {{2048, 1536, 384}, {2048, 384, 1536}, {1024, 1024, 1024}} do
    local m, n, k = s[1], s[2], s[3]
    local a, b = fsdp.randn({m, k}, {seed = 1}), fsdp.randn({k, n}, {seed = 2})
    fsdp.F.matmul(a, b):free()
    for _ = 1, 3 do
      local t0 = M.now()
      local reps = 5
      for _ = 1, reps do fsdp.F.matmul(a, b):free() end
      local gf = 2 * m * n * k * reps / (M.now() - t0) / 1e9
      if gf > best then best = gf end
    end
    a:free(); b:free()
  end
  return best
end

function M.quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

-- Runs cmd from root under a wall-clock limit of timeout seconds; returns the JSON object of its last line
-- `prefix {...}` (or its last {...} line when prefix is nil), or nil and what went wrong: "timed out after N s",
-- or the exit status and the end of the output.
function M.run_json(root, label, cmd, prefix, timeout, tag)
  tag = tag or "bench"
  local log = os.tmpname()
  -- (LuaJIT's popen close gives no exit status: the shell prints it last)
  local full = ("cd %s && timeout -k 10 %d %s 2>%s; echo \"BENCH_RC $?\""):format(M.quote(root), timeout, cmd,
    M.quote(log))
  io.stderr:write(("%s: running %s ...\n"):format(tag, label))
  local t0 = M.now()
  local h = io.popen(full)
  local out = h:read("*a")
  h:close()
  local took = M.now() - t0
  local code = tonumber(out:match("BENCH_RC (%d+)%s*$"))
  local f = io.open(log, "r")
  local err = f and f:read("*a") or ""
  if f then f:close() end
  os.remove(log)
  io.stderr:write(("%s: %s took %.0f s\n"):format(tag, label, took))
  local line
  for l in out:gmatch("[^\n]+") do
    if prefix then
      local rest = l:match("^" .. prefix .. " (%b{})")
      if rest then line = rest end
    elseif l:match("^%b{}$") then
      line = l
    end
  end
  if not line then
    -- timeout exits 124 after its TERM, 137 after the KILL 10 s later; 137 before the limit is another KILL
    -- (the kernel's OOM killer, most likely)
    local timed_out = code == 124 or (code == 137 and took >= timeout)
    local status = timed_out and ("timed out after " .. timeout .. " s")
                   or code == 137 and "killed (exit status 137: out of memory?)"
                   or ("exit status %s"):format(tostring(code))
    local tail = (out:gsub("BENCH_RC %d+%s*$", "") .. err):sub(-2000)
    return nil, ("%s (%s)%s"):format(label, status, tail:match("%S") and ":\n" .. tail or ""), status
  end
  local okj, res = pcall(cjson.decode, line)
  if not okj then return nil, label .. ": bad JSON: " .. line, "bad JSON" end
  return res
end

return M
