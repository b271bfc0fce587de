-- spec/support/pty.lua: runs a command on a pseudo-terminal (forkpty through the FFI), so that specs can type at
-- the REPL as a user does — keys, TAB, Ctrl-C, Ctrl-D — and read what the terminal shows. Every read has a
-- deadline and the whole run has one more (opts.limit): past it the command's process group is killed, so a
-- spec never hangs.
--
--   local pty = require "pty"
--   local p = pty.spawn({"build/fsdp-lua"}, {env = {HOME = dir}, limit = 20})
--   p:expect("> ")                 -- reads until the screen shows the text; returns the screen since the last expect
--   p:type("1 + 1\r")             -- once the program reads keys (send: at once, e.g. Ctrl-C while it runs)
--   local seen = p:expect("\n2\n")  -- the screen's lines end in "\n"
--   p:send("\4")                   -- Ctrl-D
--   assert.equal(0, p:wait())      -- exit status
--   p:close()                      -- kills what is left (always call it, e.g. in a finally)
local ffi = require "ffi"

-- One declaration at a time, each allowed to exist already (another module may have declared kill or waitpid).
for _, decl in ipairs {
  "struct fl_pty_winsize { unsigned short ws_row, ws_col, ws_xpixel, ws_ypixel; };",
  "struct fl_pty_pollfd { int fd; short events; short revents; };",
  "struct fl_pty_timespec { long tv_sec; long tv_nsec; };",
  "int forkpty(int *amaster, char *name, const void *termp, const struct fl_pty_winsize *winp);",
  "int execvp(const char *file, char *const argv[]);",
  "void _exit(int status);",
  "long read(int fd, void *buf, size_t n);",
  "long write(int fd, const void *buf, size_t n);",
  "int close(int fd);",
  "int poll(struct fl_pty_pollfd *fds, unsigned long nfds, int timeout);",
  "int kill(int pid, int sig);",
  "int waitpid(int pid, int *status, int options);",
  "int chdir(const char *path);",
  "int clock_gettime(int clk, struct fl_pty_timespec *ts);",
  -- Linux's struct termios (x86_64 and aarch64 alike); only c_lflag is read
  "struct fl_pty_termios { unsigned int c_iflag, c_oflag, c_cflag, c_lflag; unsigned char c_line, c_cc[32]; "
    .. "unsigned int c_ispeed, c_ospeed; };",
  "int tcgetattr(int fd, struct fl_pty_termios *t);",
} do pcall(ffi.cdef, decl) end
local C = ffi.C

local SIGKILL, WNOHANG, POLLIN, CLOCK_MONOTONIC, ICANON = 9, 1, 1, 1, 2

-- ---- a minimal terminal: what the screen shows, as lines ----
-- libedit redraws a line with carriage returns, cursor moves (ESC[nG, ESC[nC/D), erases (ESC[K) and bells;
-- matching the raw bytes would miss a completed word drawn in two pieces. This applies them to lines of text.
local Screen = {}
Screen.__index = Screen

local function new_screen() return setmetatable({lines = {""}, row = 1, col = 0}, Screen) end

function Screen:put(ch)
  local line = self.lines[self.row]
  if #line < self.col then line = line .. (" "):rep(self.col - #line) end
  self.lines[self.row] = line:sub(1, self.col) .. ch .. line:sub(self.col + 2)
  self.col = self.col + 1
end

function Screen:feed(s)
  local i, n = 1, #s
  while i <= n do
    local c = s:sub(i, i)
    if c == "\27" then
      local params, final = s:match("^%[([%d;?]*)([%a@])", i + 1)
      if params then
        local k = tonumber(params:match("^%d+")) or 1
        local line = self.lines[self.row]
        if final == "G" then self.col = k - 1
        elseif final == "C" then self.col = self.col + k
        elseif final == "D" then self.col = math.max(0, self.col - k)
        elseif final == "A" then self.row = math.max(1, self.row - k)
        elseif final == "B" then self.row = math.min(#self.lines, self.row + k)
        elseif final == "K" then
          if params == "2" then self.lines[self.row] = ""
          elseif params == "1" then self.lines[self.row] = (" "):rep(self.col) .. line:sub(self.col + 1)
          else self.lines[self.row] = line:sub(1, self.col) end
        elseif final == "J" then
          self.lines[self.row] = line:sub(1, self.col)
          for r = #self.lines, self.row + 1, -1 do self.lines[r] = nil end
        end
        i = i + 1 + #params + 2
      else
        i = i + 2   -- ESC and one more (charset selection and the like)
        if s:sub(i - 1, i - 1) == "(" or s:sub(i - 1, i - 1) == ")" then i = i + 1 end
      end
    else
      if c == "\r" then self.col = 0
      elseif c == "\n" then
        self.row = self.row + 1
        self.col = 0
        if not self.lines[self.row] then self.lines[self.row] = "" end
      elseif c == "\b" then self.col = math.max(0, self.col - 1)
      elseif c == "\t" then repeat self:put(" ") until self.col % 8 == 0
      elseif c:byte() >= 32 then self:put(c) end
      i = i + 1
    end
  end
end

-- The text from (row, col) to the end of the screen, lines joined by "\n".
function Screen:text_from(row, col)
  local parts = {(self.lines[row] or ""):sub(col + 1)}
  for r = row + 1, #self.lines do parts[#parts + 1] = self.lines[r] end
  return table.concat(parts, "\n")
end

-- (row, col) of byte offset k of text_from(row, col).
function Screen:advance(row, col, k)
  local text = self:text_from(row, col)
  local before = text:sub(1, k)
  local nl = select(2, before:gsub("\n", ""))
  if nl == 0 then return row, col + k end
  return row + nl, #before:match("[^\n]*$")
end

local M = {}
local Pty = {}
Pty.__index = Pty

local ts = ffi.new("struct fl_pty_timespec")
local function now()
  C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end
M.now = now

function M.sleep(seconds) C.poll(nil, 0, math.floor(seconds * 1000)) end


-- spawn(argv, {env = {NAME = value}, cwd = dir, limit = seconds (default 30), cols = 200})
function M.spawn(argv, opts)
  opts = opts or {}
  for k in pairs(opts) do
    if k ~= "env" and k ~= "cwd" and k ~= "limit" and k ~= "cols" then
      error(("pty.spawn: unknown option '%s' (valid: cols, cwd, env, limit)"):format(tostring(k)), 2)
    end
  end
  -- Through env(1): the child then sets nothing itself between fork and exec.
  local env = {}
  for k, v in pairs(opts.env or {}) do env[k] = v end
  -- Under make check-asan busted's luajit preloads libasan; the sanitized fsdp-lua links it itself (as in
  -- spec/support/dist.lua).
  if (os.getenv("FSDP_SANITIZE") or "") ~= "" and env.LD_PRELOAD == nil then env.LD_PRELOAD = false end
  local args, unset, set = {"env"}, {}, {}
  local names = {}
  for k in pairs(env) do names[#names + 1] = k end
  table.sort(names)
  for _, k in ipairs(names) do
    if env[k] == false then unset[#unset + 1] = k else set[#set + 1] = k .. "=" .. tostring(env[k]) end
  end
  for _, k in ipairs(unset) do args[#args + 1] = "-u"; args[#args + 1] = k end   -- options before assignments
  for _, a in ipairs(set) do args[#args + 1] = a end
  for _, a in ipairs(argv) do args[#args + 1] = a end
  local cargv = ffi.new("char *[?]", #args + 1)
  local keep = {}
  for i, a in ipairs(args) do
    keep[i] = ffi.new("char[?]", #a + 1, a)
    cargv[i - 1] = keep[i]
  end
  cargv[#args] = nil
  local cwd = opts.cwd and ffi.new("char[?]", #opts.cwd + 1, opts.cwd)
  local ws = ffi.new("struct fl_pty_winsize", {24, opts.cols or 200, 0, 0})
  local master = ffi.new("int[1]")
  io.stdout:flush()
  local pid = C.forkpty(master, nil, nil, ws)
  if pid < 0 then error("pty.spawn: forkpty failed: " .. ffi.errno(), 2) end
  if pid == 0 then
    if cwd then C.chdir(cwd) end
    C.execvp("env", cargv)
    C._exit(127)
  end
  -- all: every byte the program wrote, as written (for a failing spec's own debugging)
  return setmetatable({pid = pid, fd = master[0], all = "", keep = keep, screen = new_screen(), mrow = 1, mcol = 0,
                       deadline = now() + (opts.limit or 30), status = nil}, Pty)
end

-- Reads what is available within `ms` milliseconds; false at end of file (the child closed the terminal).
function Pty:pump(ms)
  local pfd = ffi.new("struct fl_pty_pollfd[1]")
  pfd[0].fd, pfd[0].events = self.fd, POLLIN
  if C.poll(pfd, 1, ms) <= 0 then return true end
  local buf = ffi.new("char[4096]")
  local n = C.read(self.fd, buf, 4096)
  if n <= 0 then return false end
  local s = ffi.string(buf, n)
  self.all = self.all .. s
  self.screen:feed(s)
  return true
end

function Pty:send(s)
  local off = 0
  while off < #s do
    local n = C.write(self.fd, ffi.cast("const char *", s) + off, #s - off)
    if n <= 0 then error("pty: cannot write to the terminal", 2) end
    off = off + n
  end
end

-- Waits until the program reads the terminal key by key (libedit's raw mode: ICANON off), then types s. A key
-- typed while the terminal is still in line mode is the kernel's to handle: it echoes it before libedit echoes it
-- again, and Ctrl-D there is an end of file that the switch to raw mode drops. A person is never that fast; a
-- spec is, after the prompt appears and before libedit has switched (it prints the prompt first when input is
-- already waiting). On Linux the master's termios are the line's.
function Pty:type(s, timeout)
  local t_end = math.min(now() + (timeout or 10), self.deadline)
  local tm = ffi.new("struct fl_pty_termios")
  while not (C.tcgetattr(self.fd, tm) == 0 and bit.band(tm.c_lflag, ICANON) == 0) do
    if now() > t_end or not self:pump(10) then
      self:close()
      error(("pty: the program did not start reading keys within %gs; the screen shows:\n%s")
            :format(timeout or 10, self:seen()), 2)
    end
  end
  self:send(s)
end

-- What the screen shows after the last expect (see Screen).
function Pty:seen() return self.screen:text_from(self.mrow, self.mcol) end

-- Reads until `text` (plain) appears on the screen after what the last expect matched; returns the screen's
-- text up to and including it, which the next expect does not see again. Fails after `timeout` seconds
-- (default 10), at end of file or past the run's limit, quoting what the screen shows.
function Pty:expect(text, timeout)
  local t_end = math.min(now() + (timeout or 10), self.deadline)
  while true do
    local seen = self:seen()
    local s, e = seen:find(text, 1, true)
    if s then
      self.mrow, self.mcol = self.screen:advance(self.mrow, self.mcol, e)
      return seen:sub(1, e)
    end
    if now() > t_end then
      self:close()
      error(("pty: %q did not appear within %gs; the screen shows:\n%s"):format(text, timeout or 10, seen), 2)
    end
    if not self:pump(100) then
      self:close()
      error(("pty: the program ended before %q appeared; the screen shows:\n%s"):format(text, seen), 2)
    end
  end
end

-- Like expect, for a line the program redraws in place (libedit recalling history overwrites only what
-- changed): waits until the line under the cursor contains `text`; the next expect starts after that line.
function Pty:expect_line(text, timeout)
  local t_end = math.min(now() + (timeout or 10), self.deadline)
  while true do
    local line = self.screen.lines[self.screen.row] or ""
    if line:find(text, 1, true) then
      self.mrow, self.mcol = self.screen.row, #line
      return line
    end
    if now() > t_end or not self:pump(100) then
      self:close()
      error(("pty: the line under the cursor did not show %q within %gs; it shows:\n%s")
            :format(text, timeout or 10, line), 2)
    end
  end
end

-- Everything the screen shows after the last expect once the program ends (or after `timeout` seconds).
function Pty:drain(timeout)
  local t_end = math.min(now() + (timeout or 10), self.deadline)
  while now() < t_end and self:pump(100) do
    if self:wait(0) then
      while self:pump(50) do end   -- what the program wrote just before it ended
      break
    end
  end
  local seen = self:seen()
  self.mrow, self.mcol = self.screen:advance(self.mrow, self.mcol, #seen)
  return seen
end

-- The exit status once the program has ended (128 + signal when killed), waiting up to `timeout` seconds
-- (default 10); nil if it still runs.
function Pty:wait(timeout)
  if self.status then return self.status end
  local t_end = math.min(now() + (timeout or 10), self.deadline)
  local st = ffi.new("int[1]")
  repeat
    local r = C.waitpid(self.pid, st, WNOHANG)
    if r == self.pid then
      local s = st[0]
      if s % 128 == 0 then self.status = math.floor(s / 256) % 256 else self.status = 128 + s % 128 end
      return self.status
    end
    self:pump(50)   -- keep reading: a child blocked writing to a full terminal never ends
  until now() >= t_end
  return nil
end

-- Kills the program's process group (if still running) and closes the terminal.
function Pty:close()
  if not self.status then
    C.kill(-self.pid, SIGKILL)
    C.kill(self.pid, SIGKILL)
    local st = ffi.new("int[1]")
    C.waitpid(self.pid, st, 0)
    self.status = 137
  end
  if self.fd >= 0 then C.close(self.fd); self.fd = -1 end
end

return M
