-- lua/fsdp/checkpoint/publish.lua: writing a checkpoint directory so that a save killed at any point leaves the
-- previous one intact. Everything is written into a staging directory beside the target (`.NAME.tmp.PID`, PID being
-- rank 0's), every rank fsyncs what it wrote, all ranks agree that all succeeded, and only then rank 0 swaps the
-- staging directory with the target in one atomic exchange (renameat2). A reader sees the old checkpoint or the new
-- one, never a mix. Files in the old directory that the checkpoint does not own (a tokenizer, a README) are carried
-- over by hard links before the swap; the checkpoint's own old files (stale model-0000i-of-0000n shards) are not.
-- A save killed before its swap leaves its staging directory behind; the next successful save to the same parent
-- removes those whose process has ended (never one whose process still runs: a save in progress).
local ffi  = require "ffi"
local core = require "fsdp.core"

local C = core.C
local M = {}

local function dist() return require "fsdp.dist" end

local function split_path(dir)
  local d = dir:gsub("/+$", "")
  if d == "" then d = "/" end
  local parent, base = d:match("^(.*)/([^/]+)$")
  if not parent then parent, base = ".", d end
  if parent == "" then parent = "/" end
  return parent, base, d
end

local function check(rc, what)
  if rc < 0 then core.raise(("%s: %s"):format(what, core.last_error())) end
  return rc
end

-- The names in a directory.
function M.list(path, what)
  local raw = C.fl_dir_list(path)
  if raw == nil then core.raise(("%s: %s"):format(what, core.last_error())) end
  local s = ffi.string(raw)
  C.fl_free(raw)
  local out = {}
  for name in s:gmatch("([^\n]+)\n") do out[#out + 1] = name end
  table.sort(out)
  return out
end

-- Every rank says whether its part succeeded; all learn the first rank that failed (or nil). Not collective
-- when `collective` is false (one process writing alone).
local function first_failure(ok, collective)
  if not collective then return not ok and 0 or nil end
  local D = dist()
  local T = require "fsdp.tensor"
  local n = D.world_size()
  -- the lowest failing rank: max over ranks of (n - rank) for those that failed
  local flag = T.new({ok and 0 or (n - D.rank())}, {dtype = "i64"})
  D.all_reduce(flag, {op = "max"})
  local v = flag:get(0)
  return v > 0 and (n - v) or nil
end

-- Raises on every rank when some rank failed: that rank re-raises its own error; the others name it. `cleanup`
-- runs first on every rank when there was a failure.
local function agree(ok, err, collective, what, target, cleanup)
  local bad = first_failure(ok, collective)
  if bad == nil then return end
  if cleanup then cleanup() end
  if not ok then error(err, 0) end
  core.raise(("%s: rank %d failed (its error is printed by it); '%s' is unchanged"):format(what, bad, target))
end

local function stage_path(parent, base, pid) return ("%s/.%s.tmp.%d"):format(parent, base, pid) end

local function stage_name(parent, base, collective)
  local pid = core.pid()
  if collective then
    local T = require "fsdp.tensor"
    local t = T.new({pid}, {dtype = "i64"})
    dist().broadcast(t, 0)
    pid = t:get(0)
  end
  return stage_path(parent, base, pid)
end

-- Removes `.BASE.tmp.PID` staging directories in `parent` left by saves killed before their swap: those whose PID
-- runs no process on this host. The save itself has succeeded; a directory that cannot be removed stays, said on
-- stderr.
local function remove_stale_stages(parent, base, what)
  local prefix = "." .. base .. ".tmp."
  for _, name in ipairs(M.list(parent, what)) do
    local pid = name:sub(1, #prefix) == prefix and name:sub(#prefix + 1):match("^%d+$") and tonumber(name:sub(#prefix + 1))
    if pid and C.fl_process_alive(pid) == 0 then
      local path = stage_path(parent, base, pid)
      if C.fl_is_dir(path) == 1 and C.fl_remove_tree(path) < 0 then
        io.stderr:write(("%s: cannot remove the stale staging directory '%s': %s\n"):format(what, path,
                        core.last_error()))
      end
    end
  end
end

-- Swaps stage into place: after it, `target` is the new checkpoint and `stage` holds the old one (or nothing).
local function swap_in(stage, target, owns, what)
  local exists = check(C.fl_is_dir(target), what)
  if exists == 0 then
    local ok, err = os.rename(stage, target)
    if not ok then core.raise(("%s: cannot rename '%s' to '%s': %s"):format(what, stage, target, tostring(err))) end
    return
  end
  local have = {}
  for _, name in ipairs(M.list(stage, what)) do have[name] = true end
  local subdirs = {}
  for _, name in ipairs(M.list(target, what)) do
    if not have[name] and not owns(name) then
      local full = target .. "/" .. name
      if C.fl_is_dir(full) == 1 then
        subdirs[#subdirs + 1] = name   -- a directory cannot be hard-linked: moved after the swap
      else
        check(C.fl_link(full, stage .. "/" .. name), what)
      end
    end
  end
  if C.fl_path_exchange(stage, target) < 0 then
    -- a filesystem without RENAME_EXCHANGE: two renames, with a moment in which `target` is absent
    local old = stage .. ".old"
    local ok, err = os.rename(target, old)
    if not ok then core.raise(("%s: cannot rename '%s': %s"):format(what, target, tostring(err))) end
    ok, err = os.rename(stage, target)
    if not ok then
      os.rename(old, target)
      core.raise(("%s: cannot rename '%s' to '%s': %s"):format(what, stage, target, tostring(err)))
    end
    check(C.fl_remove_tree(old), what)
  end
  for _, name in ipairs(subdirs) do os.rename(stage .. "/" .. name, target .. "/" .. name) end
end

-- begin(dir, {what =, collective =, owns = function(name) -> bool}) -> a transaction: rank 0 (the only process
-- when not collective) makes the staging directory txn.stage and all ranks agree that it exists. Then, in order:
--   txn:phase(fn)     every rank runs fn(stage), which writes files into the staging directory and returns the paths
--                     this rank wrote; they are fsynced and the ranks agree that all succeeded;
--   txn:agree(ok, err) the agreement alone, for work done elsewhere (a background writer that fsynced itself);
--   txn:commit()      rank 0 publishes (atomic swap), and the ranks agree that it did.
-- Each step is collective (all ranks of the job when collective) and runs on the caller's thread. If any rank
-- fails, every rank raises (the failing one its own error), `dir` is unchanged and the staging directory removed.
-- `owns(name)` says which names of an existing `dir` belong to the checkpoint (replaced); the rest are kept.
local Txn = {}
Txn.__index = Txn

function M.begin(dir, opts)
  local what, collective = opts.what, opts.collective and true or false
  local parent, base, target = split_path(dir)
  local leader = not collective or dist().rank() == 0
  local stage = stage_name(parent, base, collective)
  local ok, err = true, nil
  if leader then
    ok, err = pcall(function()
      check(C.fl_is_dir(target), what)   -- a file under the target name is an error before anything is written
      check(C.fl_mkdir_p(parent), what)
      check(C.fl_remove_tree(stage), what)
      check(C.fl_mkdir_p(stage), what)
    end)
  end
  agree(ok, err, collective, what, target)
  return setmetatable({what = what, collective = collective, owns = opts.owns or function() return true end,
                       parent = parent, base = base, target = target, stage = stage, leader = leader}, Txn)
end

function Txn:agree(ok, err)
  agree(ok, err, self.collective, self.what, self.target, function()
    if self.leader then C.fl_remove_tree(self.stage) end
  end)
end

function Txn:phase(fn)
  local ok, err = pcall(function()
    for _, path in ipairs(fn(self.stage) or {}) do check(C.fl_file_sync(path), self.what) end
  end)
  self:agree(ok, err)
end

function Txn:commit()
  local ok, err = true, nil
  if self.leader then
    ok, err = pcall(function()
      check(C.fl_dir_sync(self.stage), self.what)
      swap_in(self.stage, self.target, self.owns, self.what)
      check(C.fl_remove_tree(self.stage), self.what)   -- the old checkpoint, now at the staging name
      remove_stale_stages(self.parent, self.base, self.what)
      check(C.fl_dir_sync(self.parent), self.what)
    end)
    if not ok then C.fl_remove_tree(self.stage) end
  end
  agree(ok, err, self.collective, self.what, self.target)
end

-- write_dir(dir, {what =, collective =, owns =}, phases): begin, each phase(stage) in turn (between phases the
-- ranks agree that all succeeded, so rank 0 can create the files that the others then write rows into), commit.
function M.write_dir(dir, opts, phases)
  local txn = M.begin(dir, opts)
  for _, phase in ipairs(phases) do txn:phase(phase) end
  txn:commit()
end

return M
