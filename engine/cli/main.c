/* engine/cli/main.c: the fsdp-lua executable. Embeds LuaJIT, points package.path at the lua/ library, and runs
 * a script, a -e statement or the interactive REPL (line editing through libedit). The engine itself is
 * reached from Lua through the FFI (the executable exports its fl_* symbols). `-n N` re-executes the same
 * command under mpirun (the launcher); each rank joins the job at start, so that an uncaught error on any rank
 * prints that rank's traceback and ends the whole job.
 *
 * The REPL on N ranks from a terminal: Open MPI's mpirun ends the job on SIGINT and forwards stdin through a
 * pipe, so the launcher keeps mpirun out of the terminal's foreground process group (Ctrl-C then reaches the
 * ranks only, which join that group: FSDP_LUA_PGRP) and rank 0 edits lines on the terminal itself
 * (FSDP_LUA_TTY, mpirun --stdin none). */
#include "fsdp.h"

#include <editline/readline.h>
#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <limits.h>
#include <lua.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#ifndef FL_LUA_DIR
#define FL_LUA_DIR "/usr/local/share/fsdp-lua/lua"
#endif

static const char *usage =
    "usage: fsdp-lua [options] [script.lua [args...]]\n"
    "       fsdp-lua inspect PATH [--tensor NAME]   summarise a checkpoint or .safetensors file\n"
    "  -n N         run N ranks: re-executes this command under `mpirun -np N` (N = 1 runs directly)\n"
    "  -e STMT      run the Lua statement STMT (may repeat; runs before the script)\n"
    "  -i           enter the interactive REPL after the script (the default when no script is given);\n"
    "               with -n N every rank runs each line and rank 0 prints the answers grouped\n"
    "  -h, --help   show this help\n"
    "  -v, --version\n"
    "Environment: FSDP_LUA_PATH overrides where the lua/ library is found; OMP_NUM_THREADS sets threads\n"
    "(with -n N it defaults to max(1, cores / N), so the ranks share the cores); OMP_WAIT_POLICY defaults\n"
    "to passive (waiting threads sleep: a busy neighbour then costs far less). With -n N the ranks get\n"
    "FSDP_STDOUT_TTY=1 when this process's stdout is a terminal, else 0 (theirs is mpirun's pty either way).\n"
    "FSDP_LUA_HISTORY is the REPL's history file (default ~/.fsdp_lua_history, empty for none);\n"
    "FSDP_REPL_TIMEOUT the seconds a collective may wait in the multi-rank REPL before it fails (default 5;\n"
    "fsdp.repl_timeout(s) at the prompt changes it).\n"
    "Multi-node: run `mpirun ... fsdp-lua script.lua` yourself; every rank joins the job when it starts.\n"
    "An uncaught error on any rank prints \"[rank R] <error and traceback>\" and ends the job non-zero.\n"
    "Scripts `require \"fsdp\"`; see README.md.\n";

/* True when this process is one rank of a job of several (an error then ends the whole job). */
static bool multi_rank(void) { return fl_dist_is_initialized() && fl_comm_size(fl_comm_world()) > 1; }

static bool is_dir(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* lua/ next to the executable's build dir (build/fsdp-lua -> ../lua), else the install prefix. */
static void find_lua_dir(char *out, size_t n) { /* n >= PATH_MAX + 64 */
    const char *env = getenv("FSDP_LUA_PATH");
    if (env && *env) { snprintf(out, n, "%s", env); return; }
    char exe[PATH_MAX - 64];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len > 0) {
        exe[len] = 0;
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = 0;
            snprintf(out, n, "%s/../lua", exe);
            if (is_dir(out)) return;
            snprintf(out, n, "%s/../share/fsdp-lua/lua", exe);
            if (is_dir(out)) return;
        }
    }
    snprintf(out, n, "%s", FL_LUA_DIR);
}

static int traceback(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (!msg) msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    luaL_traceback(L, L, msg, 1);
    return 1;
}

static int report(lua_State *L, int status) {
    if (status != 0) {
        const char *msg = lua_tostring(L, -1);
        if (!msg) msg = "(error object is not a string)";
        /* The other ranks would wait for this one in their next collective until the timeout: end them now. */
        if (multi_rank()) fl_dist_abort(1, msg);
        fprintf(stderr, "fsdp-lua: %s\n", msg);
        fflush(stderr);
        lua_pop(L, 1);
    }
    return status;
}

static int docall(lua_State *L, int nargs);

/* The library's exit hooks (lua/fsdp/core.lua's at_exit: an async checkpoint still being written is waited for
 * and published), when the library was loaded at all. They run on a normal end only, while MPI is still up, since
 * they may communicate; returns the status of the call (an error is reported like the script's own). */
static int run_exit_hooks(lua_State *L) {
    int top = lua_gettop(L), status = 0;
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "loaded");
    lua_getfield(L, -1, "fsdp.core");
    if (lua_istable(L, -1)) {
        lua_getfield(L, -1, "run_exit_hooks");
        if (lua_isfunction(L, -1)) {
            status = docall(L, 0);
            if (status) lua_replace(L, top + 1);   /* the message, for report() */
        }
    }
    lua_settop(L, top + (status ? 1 : 0));
    return report(L, status);
}

/* os.exit in a job of several ranks: status 0 leaves the job cleanly (exit hooks run, MPI finalized); any other
 * status ends every rank with it, as an uncaught error does, instead of leaving the others waiting in a
 * collective. */
static int dist_os_exit(lua_State *L) {
    int status;
    if (lua_isnoneornil(L, 1) || (lua_isboolean(L, 1) && lua_toboolean(L, 1))) status = 0;
    else if (lua_isboolean(L, 1)) status = 1;
    else status = (int)luaL_checkinteger(L, 1);
    if (status == 0 && run_exit_hooks(L) != 0) status = 1;
    fflush(stdout);
    if (status != 0) fl_dist_abort(status, NULL);
    fl_dist_finalize();
    exit(0);
}

/* os.exit in a single process: the exit hooks run first on status 0 (true or none), then LuaJIT's own os.exit
 * (which closes the state when asked). */
static int single_os_exit(lua_State *L) {
    bool ok = lua_isnoneornil(L, 1) || (lua_isboolean(L, 1) && lua_toboolean(L, 1)) ||
              (lua_isnumber(L, 1) && lua_tointeger(L, 1) == 0);
    if (ok && run_exit_hooks(L) != 0) {
        lua_settop(L, 0);
        lua_pushinteger(L, 1);
    }
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 0);
    return 0;
}

static int count_cores(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

/* mpirun as a child in a process group of its own, so that Ctrl-C at the terminal reaches the ranks (which
 * join ours) but not mpirun, which would end the job. Returns mpirun's exit status. */
static int launch_interactive(char **av) {
    pid_t pid = fork();
    if (pid < 0) { fprintf(stderr, "fsdp-lua: -n: cannot fork: %s\n", strerror(errno)); return 1; }
    if (pid == 0) {
        setpgid(0, 0);
        execvp("mpirun", av);
        fprintf(stderr, "fsdp-lua: cannot run mpirun: %s (install openmpi-bin)\n", strerror(errno));
        _exit(127);
    }
    setpgid(pid, pid);   /* also here: whichever of the two runs first */
    signal(SIGINT, SIG_IGN);
    signal(SIGQUIT, SIG_IGN);
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
    if (WIFEXITED(st)) return WEXITSTATUS(st);
    return 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
}

/* `fsdp-lua -n N opts script args` -> `mpirun -np N <container flags> fsdp-lua opts script args`. Returns only on
 * failure, or with the REPL on a terminal (launch_interactive) mpirun's exit status; otherwise mpirun's exit
 * status becomes ours through exec. */
/* Whether this machine lets a process read another's memory (process_vm_readv, "CMA"): Open MPI's shared-memory
 * transport then copies a message once, straight between the ranks, instead of twice through a shared buffer
 * (GPT-2 124M, 2-rank FSDP: 575 -> 252 ms of collectives a step, and the time ranks wait on them 650 -> 100
 * ms). Containers often forbid it (seccomp, ptrace rules). Probed on a child of ours; Yama's ptrace_scope 2 and
 * 3 forbid it between the ranks even where a parent may read its child (scope 1 Open MPI opens itself). */
static bool cma_works(void) {
    FILE *f = fopen("/proc/sys/kernel/yama/ptrace_scope", "r");
    if (f) {
        int scope = 0;
        bool strict = fscanf(f, "%d", &scope) == 1 && scope >= 2;
        fclose(f);
        if (strict) return false;
    }
    static int word = 0x1234abcd;
    int p[2];
    if (pipe(p) != 0) return false;
    pid_t pid = fork();
    if (pid < 0) { close(p[0]); close(p[1]); return false; }
    if (pid == 0) {   /* waits until the parent closes its end */
        close(p[1]);
        char c;
        while (read(p[0], &c, 1) < 0 && errno == EINTR) {}
        _exit(0);
    }
    close(p[0]);
    int got = 0;
    struct iovec local = {&got, sizeof got}, remote = {&word, sizeof word};
    ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
    close(p[1]);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
    return n == (ssize_t)sizeof got && got == 0x1234abcd;
}

static int launch(int n, int argc, char **argv, int n_at, bool repl) {
    char exe[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len <= 0) { fprintf(stderr, "fsdp-lua: -n: cannot find this executable: %s\n", strerror(errno)); return 1; }
    exe[len] = 0;
    /* The ranks find the same lua/ library as this process, and split the cores between them. */
    char dir[PATH_MAX + 64];
    find_lua_dir(dir, sizeof dir);
    setenv("FSDP_LUA_PATH", dir, 1);
    const char *omp = getenv("OMP_NUM_THREADS");
    if (!omp || !*omp) {
        char th[16];
        int per = count_cores() / n;
        snprintf(th, sizeof th, "%d", per < 1 ? 1 : per);
        setenv("OMP_NUM_THREADS", th, 1);
    }
    /* A rank's stdout is Open MPI's pty whether or not ours is a terminal: tell the ranks which it is (train.lua
     * draws its progress bar only on a terminal). */
    setenv("FSDP_STDOUT_TTY", isatty(STDOUT_FILENO) ? "1" : "0", 1);
    char np[16];
    snprintf(np, sizeof np, "%d", n);
    /* A container needs: more ranks than slots (--oversubscribe), root, and shared memory without CMA where
     * the container forbids it (vader single-copy none; cma_works). --bind-to none and yield_when_idle: each
     * rank also runs a communication thread, and a rank spinning in MPI must not take a core from the compute
     * threads. -x exports to remote nodes. */
    const char *fixed[] = {"mpirun", "-np", np, "--oversubscribe", "--allow-run-as-root", "--bind-to", "none",
                           "--mca", "btl", "self,vader", "--mca", "btl_vader_single_copy_mechanism",
                           cma_works() ? "cma" : "none",
                           "--mca", "mpi_yield_when_idle", "1", "-x", "OMP_NUM_THREADS", "-x", "OMP_WAIT_POLICY", "-x", "FSDP_LUA_PATH",
                           "-x", "FSDP_STDOUT_TTY"};
    int nfixed = (int)(sizeof fixed / sizeof fixed[0]);
    char **av = calloc((size_t)(nfixed + 16 + argc), sizeof *av);
    if (!av) { fprintf(stderr, "fsdp-lua: -n: out of memory\n"); return 1; }
    int k = 0;
    for (int i = 0; i < nfixed; i++) av[k++] = (char *)fixed[i];
    if (getenv("LUA_PATH")) { av[k++] = "-x"; av[k++] = "LUA_PATH"; }
    bool tty = repl && isatty(0) && isatty(1);
    char pg[32];
    if (tty) {
        snprintf(pg, sizeof pg, "%d", (int)getpgrp());
        setenv("FSDP_LUA_PGRP", pg, 1);
        setenv("FSDP_LUA_TTY", "1", 1);
        const char *extra[] = {"--stdin", "none", "-x", "FSDP_LUA_PGRP", "-x", "FSDP_LUA_TTY"};
        for (int i = 0; i < 6; i++) av[k++] = (char *)extra[i];
    }
    for (const char *const *e = (const char *const[]){"FSDP_LUA_HISTORY", "FSDP_REPL_TIMEOUT", NULL}; *e; e++)
        if (getenv(*e)) { av[k++] = "-x"; av[k++] = (char *)*e; }
    av[k++] = exe;
    for (int i = 1; i < argc; i++)
        if (i != n_at && i != n_at + 1) av[k++] = argv[i];
    av[k] = NULL;
    fflush(stdout);
    if (tty) {
        int rc = launch_interactive(av);
        free(av);
        return rc;
    }
    execvp("mpirun", av);
    fprintf(stderr, "fsdp-lua: -n %d: cannot run mpirun: %s (install openmpi-bin)\n", n, strerror(errno));
    free(av);
    return 127;
}

static int docall(lua_State *L, int nargs) {
    int base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, traceback);
    lua_insert(L, base);
    int status = lua_pcall(L, nargs, 0, base);
    lua_remove(L, base);
    return status;
}

/* ---- the REPL's C side: reading lines (libedit), history, completion callbacks, Ctrl-C. Everything else (what
 * a line means, printing, the ranks' protocol) is lua/fsdp/repl.lua's, which calls these through `cli`. ---- */

static lua_State *repl_L;                      /* the state the signal handler hooks */
static pthread_t main_thread;
static volatile sig_atomic_t executing = 0;    /* a statement runs: Ctrl-C interrupts it */
static volatile sig_atomic_t sigint_seen = 0;  /* Ctrl-C while reading a line: cancel it */
static char history_path[PATH_MAX];            /* "" when history is off */
static int completer_ref = LUA_NOREF;

/* The hook the handler installs: raises "interrupted" at the next Lua instruction of the statement, unless an op
 * took the request first (then its error is already on its way). */
static void interrupt_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    lua_sethook(L, NULL, 0, 0);
    if (executing && fl_interrupt_take()) luaL_error(L, "interrupted");
}

static int wake_pipe[2] = {-1, -1};   /* the handler writes a byte: libedit's read wakes (getc_or_interrupt) */

static void on_sigint(int sig) {
    /* MPI's, OpenMP's and the communication thread may receive it: the main thread is the one to act */
    if (!pthread_equal(pthread_self(), main_thread)) { pthread_kill(main_thread, sig); return; }
    sigint_seen = 1;
    fl_interrupt_request();
    if (executing) lua_sethook(repl_L, interrupt_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
    if (wake_pipe[1] >= 0) {
        int saved = errno;
        ssize_t w = write(wake_pipe[1], "", 1);   /* non-blocking; a full pipe is awake already */
        (void)w;
        errno = saved;
    }
}

/* libedit's input, one character (a Unicode code point, decoded from UTF-8) at a time: -1 ends the line read,
 * at end of input or when Ctrl-C was pressed. Ctrl-C may come at any point: before the poll (the wake pipe
 * makes it return), during it or during the read (EINTR: the handler has no SA_RESTART while a line is read), or
 * between the two, after the terminal has flushed the typed characters with the signal: a raw terminal's read
 * therefore only runs when FIONREAD says a byte is there, so that it never blocks. */
static int read_byte(int fd) {
    bool tty = isatty(fd);
    for (;;) {
        if (sigint_seen) return -1;
        struct pollfd pf[2] = {{fd, POLLIN, 0}, {wake_pipe[0], POLLIN, 0}};
        if (poll(pf, 2, -1) < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (pf[1].revents) {
            char drain[64];
            while (read(wake_pipe[0], drain, sizeof drain) > 0) {}
            continue;
        }
        /* In raw mode a readable terminal with nothing to read was flushed by Ctrl-C: back to poll. In canonical
         * mode (libedit reads typed-ahead lines before it switches to raw) nothing to read is Ctrl-D's EOF. */
        struct termios tm;
        int avail = 1;
        if (tty && tcgetattr(fd, &tm) == 0 && !(tm.c_lflag & ICANON) && ioctl(fd, FIONREAD, &avail) == 0 &&
            avail == 0) {
            if (pf[0].revents & (POLLHUP | POLLERR)) return -1;   /* the terminal is gone */
            continue;
        }
        unsigned char c;
        ssize_t n = read(fd, &c, 1);
        if (n == 1) return c;
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        return -1;
    }
}

static int getc_or_interrupt(FILE *f) {
    int fd = fileno(f), c = read_byte(fd);
    if (c < 0x80) return c;
    int more = c >= 0xf0 ? 3 : c >= 0xe0 ? 2 : c >= 0xc0 ? 1 : 0;
    int cp = c & (0x3f >> more);
    for (int i = 0; i < more; i++) {
        int d = read_byte(fd);
        if (d < 0) return -1;
        cp = (cp << 6) | (d & 0x3f);
    }
    return cp;
}

/* While a statement runs, SA_RESTART: its file reads must not fail with EINTR. While a line is read, none: a
 * read interrupted by Ctrl-C returns (read_byte). */
static void set_sigint(bool restart) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = restart ? SA_RESTART : 0;
    sigaction(SIGINT, &sa, NULL);
}

/* cli.readline(prompt): the line; nil at end of input (Ctrl-D); false when Ctrl-C cancelled it. */
static int cli_readline(lua_State *L) {
    const char *prompt = luaL_optstring(L, 1, "> ");
    sigint_seen = 0;
    set_sigint(false);
    char *line = readline(prompt);
    set_sigint(true);
    if (line) {
        lua_pushstring(L, line);
        free(line);
    } else if (sigint_seen) {
        lua_pushboolean(L, 0);
    } else {
        lua_pushnil(L);
    }
    sigint_seen = 0;
    return 1;
}

/* cli.add_history(line): kept for the arrow keys and written to the history file at once, so a REPL that is
 * killed keeps what was typed. */
static int cli_add_history(lua_State *L) {
    const char *line = luaL_checkstring(L, 1);
    add_history(line);
    if (history_path[0] && write_history(history_path) != 0) {
        fprintf(stderr, "fsdp-lua: cannot write the history file %s: %s\n", history_path, strerror(errno));
        history_path[0] = 0;   /* once is enough */
    }
    return 0;
}

/* cli.executing(on): a statement starts (Ctrl-C now interrupts it) or ends; either way a stale request goes. */
static int cli_executing(lua_State *L) {
    bool on = lua_toboolean(L, 1);
    if (!on) fl_interrupt_arm(false);
    executing = on;
    fl_interrupt_clear();
    if (on) fl_interrupt_arm(true);
    else lua_sethook(L, NULL, 0, 0);
    return 0;
}

/* cli.set_completer(fn): fn(word) returns the completions of the word before the cursor, whole words. */
static int cli_set_completer(lua_State *L) {
    luaL_checktype(L, 1, LUA_TFUNCTION);
    luaL_unref(L, LUA_REGISTRYINDEX, completer_ref);
    lua_pushvalue(L, 1);
    completer_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

static int cli_isatty(lua_State *L) {
    lua_pushboolean(L, isatty(0) && isatty(1));
    return 1;
}

/* libedit asks for matches one by one after the Lua completer has listed them all. */
static char **completions = NULL;
static int ncompletions = 0;

static char *next_completion(const char *text, int state) {
    (void)text;
    return state < ncompletions ? strdup(completions[state]) : NULL;
}

static char **complete(const char *text, int start, int end) {
    (void)start; (void)end;
    rl_attempted_completion_over = 1;   /* never fall back to file names */
    for (int i = 0; i < ncompletions; i++) free(completions[i]);
    free(completions);
    completions = NULL;
    ncompletions = 0;
    lua_State *L = repl_L;
    if (completer_ref == LUA_NOREF) return NULL;
    int top = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, completer_ref);
    lua_pushstring(L, text);
    /* a completer error must not unwind through libedit: it is shown, and nothing completes */
    if (lua_pcall(L, 1, 1, 0) != 0) {
        fprintf(stderr, "\nfsdp-lua: completion failed: %s\n", lua_tostring(L, -1));
        lua_settop(L, top);
        return NULL;
    }
    if (lua_istable(L, -1)) {
        int n = (int)lua_objlen(L, -1);
        completions = calloc((size_t)(n > 0 ? n : 1), sizeof *completions);
        for (int i = 1; completions && i <= n; i++) {
            lua_rawgeti(L, -1, i);
            const char *s = lua_tostring(L, -1);
            if (s) completions[ncompletions++] = strdup(s);
            lua_pop(L, 1);
        }
    }
    lua_settop(L, top);
    if (ncompletions == 0) return NULL;
    return rl_completion_matches(text, next_completion);
}

/* History: $FSDP_LUA_HISTORY (empty: none), else ~/.fsdp_lua_history. */
static void init_line_editing(void) {
    /* All before the first history call: libedit initialises itself there (using_history) and reads these once. */
    /* Words run across . and : so that fsdp.mo<TAB> and model:na<TAB> complete as one */
    static char breaks[] = " \t\n\"\\'`@$><=;|&{(,+-*/%^~#[]";
    rl_basic_word_break_characters = breaks;
    rl_completer_word_break_characters = breaks;
    rl_completion_append_character = '\0';
    rl_attempted_completion_function = complete;
    /* libedit's own SIGINT handler would re-raise the signal to the whole process group (every rank) */
    rl_catch_signals = 0;
    if (pipe(wake_pipe) == 0) {
        fcntl(wake_pipe[0], F_SETFL, O_NONBLOCK);
        fcntl(wake_pipe[1], F_SETFL, O_NONBLOCK);
        rl_getc_function = getc_or_interrupt;
    }
    const char *env = getenv("FSDP_LUA_HISTORY");
    const char *home = getenv("HOME");
    if (env) snprintf(history_path, sizeof history_path, "%s", env);
    else snprintf(history_path, sizeof history_path, "%s/.fsdp_lua_history", home && *home ? home : ".");
    using_history();
    stifle_history(1000);
    if (history_path[0]) read_history(history_path);   /* a missing file is a first run */
}

static int run_repl(lua_State *L) {
    repl_L = L;
    main_thread = pthread_self();
    init_line_editing();
    set_sigint(true);
    lua_pushcfunction(L, traceback);
    lua_getglobal(L, "require");
    lua_pushstring(L, "fsdp.repl");
    if (lua_pcall(L, 1, 1, -3) != 0) { lua_remove(L, -2); return report(L, 1); }
    lua_getfield(L, -1, "run");
    lua_remove(L, -2);
    static const luaL_Reg cli[] = {{"readline", cli_readline}, {"add_history", cli_add_history},
                                   {"executing", cli_executing}, {"set_completer", cli_set_completer},
                                   {"isatty", cli_isatty}, {NULL, NULL}};
    lua_newtable(L);
    for (const luaL_Reg *r = cli; r->name; r++) {
        lua_pushcfunction(L, r->func);
        lua_setfield(L, -2, r->name);
    }
    lua_pushstring(L, fl_version());
    lua_setfield(L, -2, "version");
    int status = lua_pcall(L, 1, 0, -3);
    signal(SIGINT, SIG_DFL);
    if (status != 0) { lua_remove(L, -2); return report(L, status); }
    lua_pop(L, 1);
    return 0;
}

int main(int argc, char **argv) {
    const char *stmts[64];
    int nstmts = 0, script = 0, nranks = 0, n_at = 0;
    bool interactive = false;
    /* `fsdp-lua inspect ...` runs the script lua/fsdp/inspect_cli.lua with the arguments that follow. */
    char inspect[PATH_MAX + 96];
    if (argc > 1 && !strcmp(argv[1], "inspect")) {
        find_lua_dir(inspect, PATH_MAX + 64);
        strcat(inspect, "/fsdp/inspect_cli.lua");
        argv[1] = inspect;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-n")) {
            char *end = NULL;
            long v = i + 1 < argc ? strtol(argv[i + 1], &end, 10) : 0;
            if (i + 1 >= argc || !end || *end || end == argv[i + 1] || v < 1 || v > 100000) {
                fprintf(stderr, "fsdp-lua: -n needs a number of ranks >= 1, got '%s'\n%s", i + 1 < argc ? argv[i + 1] : "",
                        usage);
                return 2;
            }
            nranks = (int)v;
            n_at = i++;
            continue;
        }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { fputs(usage, stdout); return 0; }
        if (!strcmp(a, "-v") || !strcmp(a, "--version")) { printf("fsdp-lua %s (LuaJIT, OpenBLAS)\n", fl_version()); return 0; }
        if (!strcmp(a, "-i")) { interactive = true; continue; }
        if (!strcmp(a, "-e")) {
            if (i + 1 >= argc) { fprintf(stderr, "fsdp-lua: -e needs a statement\n%s", usage); return 2; }
            if (nstmts == 64) { fprintf(stderr, "fsdp-lua: at most 64 -e statements\n"); return 2; }
            stmts[nstmts++] = argv[++i];
            continue;
        }
        if (a[0] == '-' && a[1]) { fprintf(stderr, "fsdp-lua: unknown option '%s'\n%s", a, usage); return 2; }
        script = i;
        break;
    }
    if (nranks > 0 && getenv("OMPI_COMM_WORLD_SIZE")) {
        fprintf(stderr, "fsdp-lua: -n %d given inside an MPI job (already started by mpirun); drop -n\n", nranks);
        return 2;
    }
    bool repl = interactive || (!script && nstmts == 0);
    /* OpenMP threads that wait sleep instead of spinning (OMP_WAIT_POLICY=passive) unless the user chose: with
     * our GEMM blocks the waits are short and rare, so a quiet machine loses nothing (GPT-2 124M, 1 process:
     * 208 vs 202 tokens/s), while beside one busy core spinning workers cost a sixth of the step (111 vs 93).
     * libgomp reads the variable when it loads, before main: set it, then run this program again. */
    if (!getenv("OMP_WAIT_POLICY")) {
        setenv("OMP_WAIT_POLICY", "passive", 1);
        if (nranks <= 1) {
            execv("/proc/self/exe", argv);
            /* without /proc the run goes on with libgomp's default policy */
        }
    }
    if (nranks > 1) return launch(nranks, argc, argv, n_at, repl);

    /* The launcher's terminal REPL (launch_interactive): Ctrl-C reaches this rank through the terminal's
     * foreground process group. */
    const char *pgrp = getenv("FSDP_LUA_PGRP");
    if (pgrp && *pgrp && setpgid(0, (pid_t)atoi(pgrp)) != 0)
        fprintf(stderr, "fsdp-lua: cannot join the terminal's process group %s (Ctrl-C will not reach this rank): "
                "%s\n", pgrp, strerror(errno));

    /* Join the job now (world size 1 without mpirun: no MPI), so that errors below know the rank. */
    if (fl_dist_init(0) < 0) {
        fprintf(stderr, "fsdp-lua: cannot join the MPI job: %s\n", fl_last_error());
        return 1;
    }
    if (getenv("FSDP_LUA_TTY") && fl_comm_rank(fl_comm_world()) == 0) {
        /* rank 0 reads and prints on the terminal itself: mpirun --stdin none, and its own output would come
         * through mpirun later than the prompt */
        int fd = open("/dev/tty", O_RDWR);
        if (fd < 0) {
            fprintf(stderr, "fsdp-lua: cannot open the terminal /dev/tty for the REPL: %s\n", strerror(errno));
        } else {
            fflush(stdout);
            fflush(stderr);
            dup2(fd, 0);
            dup2(fd, 1);
            dup2(fd, 2);
            if (fd > 2) close(fd);
        }
    }
    if (multi_rank()) setvbuf(stdout, NULL, _IOLBF, 0);  /* whole lines from each rank, and none lost on abort */

    lua_State *L = luaL_newstate();
    if (!L) { fprintf(stderr, "fsdp-lua: cannot create a Lua state\n"); return 1; }
    luaL_openlibs(L);
    lua_getglobal(L, "os");
    if (multi_rank()) {
        lua_pushcfunction(L, dist_os_exit);
    } else {
        lua_getfield(L, -1, "exit");
        lua_pushcclosure(L, single_os_exit, 1);
    }
    lua_setfield(L, -2, "exit");
    lua_pop(L, 1);

    char dir[PATH_MAX + 64], buf[3 * PATH_MAX + 256];
    find_lua_dir(dir, sizeof dir);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    snprintf(buf, sizeof buf, "%s/?.lua;%s/?/init.lua;%s", dir, dir, lua_tostring(L, -1));
    lua_pop(L, 1);
    lua_pushstring(L, buf);
    lua_setfield(L, -2, "path");
    lua_pop(L, 1);

    /* arg: script at 0, its arguments at 1.., the executable and options at negative indices, as lua(1). */
    lua_createtable(L, argc, 1);
    int first = script ? script : argc;
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i - first);
    }
    lua_setglobal(L, "arg");

    int status = 0;
    for (int i = 0; i < nstmts && !status; i++) {
        status = luaL_loadbuffer(L, stmts[i], strlen(stmts[i]), "=(command line)");
        if (!status) status = docall(L, 0);
        report(L, status);
    }
    if (!status && script) {
        status = luaL_loadfile(L, argv[script]);
        if (!status) {
            int nargs = argc - script - 1;
            for (int i = script + 1; i < argc; i++) lua_pushstring(L, argv[i]);
            status = docall(L, nargs);
        }
        report(L, status);
    }
    if (!status && repl) status = run_repl(L);
    if (!status) status = run_exit_hooks(L);
    lua_close(L);   /* collects Lua's handles first: groups are released before MPI goes */
    if (fl_dist_finalize() < 0) {
        fprintf(stderr, "fsdp-lua: %s\n", fl_last_error());
        if (!status) status = 1;
    }
    return status ? 1 : 0;
}
