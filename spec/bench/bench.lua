-- spec/bench/bench.lua: `make bench`. Measures this machine's sgemm peak, then trains the bench model
-- (GPT-2, vocab 256, n_embd 384, 6 layers, 6 heads, seq 256, batch 8: 10.8M parameters; AdamW + grad
-- clipping) and prints tokens/s, step time, peak RSS and MFU; when spec/reference/.venv exists, runs the same
-- model in PyTorch eager with the same thread count in the same run and prints our figures as ratios.
-- Usage: build/fsdp-lua spec/bench/bench.lua [--steps N] [--warmup N] [--threads N] [--no-torch]
local fsdp = require "fsdp"

local ROOT = (debug.getinfo(1, "S").source:match("^@(.*)spec/bench/bench%.lua$") or "")
if ROOT == "" then ROOT = "./" end
local bench = dofile(ROOT .. "spec/bench/common.lua")
local now, peak_rss_mb = bench.now, bench.peak_rss_mb

local opts = {steps = 10, warmup = 2, threads = 2, torch = true}
local i = 1
while arg and arg[i] do
  local a = arg[i]
  if a == "--steps" then opts.steps = tonumber(arg[i + 1]); i = i + 1
  elseif a == "--warmup" then opts.warmup = tonumber(arg[i + 1]); i = i + 1
  elseif a == "--threads" then opts.threads = tonumber(arg[i + 1]); i = i + 1
  elseif a == "--no-torch" then opts.torch = false
  else error("bench: unknown argument " .. a .. " (valid: --steps N --warmup N --threads N --no-torch)") end
  i = i + 1
end

fsdp.set_num_threads(opts.threads)

-- sgemm peak: the best of a few large products, the same BLAS the model uses.
local peak = bench.sgemm_peak()
print(("sgemm peak (%d threads): %.1f GFLOP/s"):format(opts.threads, peak))

local cfg = bench.model_config("bench")   -- spec/bench/common.lua's SIZES.bench, dropouts 0
local model = fsdp.models.build(cfg, {seed = 1234})
local nparams = 0
for _, p in ipairs(model:parameters()) do nparams = nparams + p:numel() end
local B, T = 8, 256
local opt = fsdp.optim.AdamW(model:parameters(), {lr = 3e-4, weight_decay = 0.1})

local function batch(step)
  local ids = fsdp.empty({B, T}, {dtype = "i64"})
  local p = ids:data_ptr("int64_t *")
  local x = step * 7919
  for j = 0, B * T - 1 do x = (x * 1103515245 + 12345) % 2147483648; p[j] = x % 256 end
  return ids
end

local norm_time = 0   -- get_total_norm's share of a step (the exact squared norm)
local function train_step(step)
  local ids = batch(step)
  local out = model(ids, {labels = ids})
  out.loss:backward()
  local tn = now()
  local norm = fsdp.optim.get_total_norm(model:parameters())   -- clip_grad_norm in its two halves, to time the norm
  norm_time = norm_time + (now() - tn)
  fsdp.optim.clip_grads_with_norm_(model:parameters(), 1.0, norm)
  opt:step()
  opt:zero_grad()
  return out.loss:item()
end

for s = 1, opts.warmup do train_step(s) end
norm_time = 0
local t0 = now()
local loss
for s = 1, opts.steps do loss = train_step(opts.warmup + s) end
local dt = (now() - t0) / opts.steps
local tok_s = B * T / dt
local flops_per_token = 6 * nparams + 6 * cfg.n_layer * cfg.n_embd * T
local mfu = flops_per_token * tok_s / (peak * 1e9)
local rss = peak_rss_mb()
print(("fsdp-lua  : %d params, %.0f tokens/s, %.1f ms/step, peak RSS %.0f MB, MFU %.1f%% (loss %.4f)")
  :format(nparams, tok_s, dt * 1e3, rss, mfu * 100, loss))
print(("grad norm : %.2f ms/step = %.2f%% of a step (exact sum of squares over %d parameters)")
  :format(1e3 * norm_time / opts.steps, 100 * norm_time / opts.steps / dt, nparams))

if opts.torch then
  local py = "spec/reference/.venv/bin/python"
  local f = io.open(py, "r")
  if not f then
    print("pytorch   : skipped (no spec/reference/.venv; run spec/reference/setup_venv.sh)")
  else
    f:close()
    local cmd = ("%s spec/reference/bench_torch.py --threads %d --steps %d --warmup %d 2>/dev/null")
      :format(py, opts.threads, opts.steps, opts.warmup)
    local h = io.popen(cmd)
    local out = h:read("*a")
    h:close()
    local ok, res = pcall(require("cjson").decode, out:match("(%b{})") or "")
    if not ok then
      print("pytorch   : failed: " .. out)
    else
      local tmfu = flops_per_token * res.tokens_per_s / (peak * 1e9)
      print(("pytorch   : %.0f tokens/s, %.1f ms/step, peak RSS %.0f MB, MFU %.1f%%")
        :format(res.tokens_per_s, res.step_ms, res.peak_rss_mb, tmfu * 100))
      print(("ratio     : tokens/s %.2fx PyTorch, peak RSS %.2fx PyTorch"):format(tok_s / res.tokens_per_s, rss / res.peak_rss_mb))
    end
  end
end
