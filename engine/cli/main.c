/* engine/cli/main.c: the fsdp-lua executable. Embeds LuaJIT, points package.path at the lua/ library, and runs
 * a script, a -e statement or the interactive REPL (line editing through libedit). The engine itself is
 * reached from Lua through the FFI (the executable exports its fl_* symbols). `-n N` re-executes the same
 * command under mpirun (the launcher); each rank joins the job at start, so that an uncaught error on any rank
 * prints that rank's traceback and ends the whole job. */
#include "fsdp.h"

#include <editline/readline.h>
#include <errno.h>
#include <lauxlib.h>
#include <limits.h>
#include <lua.h>
#include <sched.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef FL_LUA_DIR
#define FL_LUA_DIR "/usr/local/share/fsdp-lua/lua"
#endif

static const char *usage =
    "usage: fsdp-lua [options] [script.lua [args...]]\n"
    "       fsdp-lua inspect PATH [--tensor NAME]   summarise a checkpoint or .safetensors file\n"
    "  -n N         run N ranks: re-executes this command under `mpirun -np N` (N = 1 runs directly)\n"
    "  -e STMT      run the Lua statement STMT (may repeat; runs before the script)\n"
    "  -i           enter the interactive REPL after the script (the default when no script is given)\n"
    "  -h, --help   show this help\n"
    "  -v, --version\n"
    "Environment: FSDP_LUA_PATH overrides where the lua/ library is found; OMP_NUM_THREADS sets threads\n"
    "(with -n N it defaults to max(1, cores / N), so the ranks share the cores). With -n N the ranks get\n"
    "FSDP_STDOUT_TTY=1 when this process's stdout is a terminal, else 0 (theirs is mpirun's pty either way).\n"
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

/* `fsdp-lua -n N opts script args` -> `mpirun -np N <container flags> fsdp-lua opts script args`. Returns only on
 * failure; mpirun's exit status becomes ours. */
static int launch(int n, int argc, char **argv, int n_at) {
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
    /* A container needs: more ranks than slots (--oversubscribe), root, shared memory without CMA
     * (vader single-copy none). --bind-to none and yield_when_idle: each rank also runs a communication thread,
     * and a rank spinning in MPI must not take a core from the compute threads. -x exports to remote nodes. */
    const char *fixed[] = {"mpirun", "-np", np, "--oversubscribe", "--allow-run-as-root", "--bind-to", "none",
                           "--mca", "btl", "self,vader", "--mca", "btl_vader_single_copy_mechanism", "none",
                           "--mca", "mpi_yield_when_idle", "1", "-x", "OMP_NUM_THREADS", "-x", "FSDP_LUA_PATH",
                           "-x", "FSDP_STDOUT_TTY"};
    int nfixed = (int)(sizeof fixed / sizeof fixed[0]);
    char **av = calloc((size_t)(nfixed + 5 + argc), sizeof *av);
    if (!av) { fprintf(stderr, "fsdp-lua: -n: out of memory\n"); return 1; }
    int k = 0;
    for (int i = 0; i < nfixed; i++) av[k++] = (char *)fixed[i];
    if (getenv("LUA_PATH")) { av[k++] = "-x"; av[k++] = "LUA_PATH"; }
    av[k++] = exe;
    for (int i = 1; i < argc; i++)
        if (i != n_at && i != n_at + 1) av[k++] = argv[i];
    av[k] = NULL;
    fflush(stdout);
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

static int run_repl(lua_State *L) {
    /* The REPL's logic (continuation lines, printing) is Lua: lua/fsdp/repl.lua. C only reads lines. */
    lua_pushcfunction(L, traceback);
    lua_getglobal(L, "require");
    lua_pushstring(L, "fsdp.repl");
    if (lua_pcall(L, 1, 1, -3) != 0) return report(L, 1);
    lua_remove(L, -2);
    int repl = lua_gettop(L);
    printf("fsdp-lua %s (LuaJIT). Ctrl-D exits.\n", fl_version());
    char hist[PATH_MAX];
    const char *home = getenv("HOME");
    snprintf(hist, sizeof hist, "%s/.fsdp_lua_history", home ? home : ".");
    using_history();
    read_history(hist);
    bool more = false;
    for (;;) {
        char *line = readline(more ? ">> " : "> ");
        if (!line) break;
        if (*line) add_history(line);
        lua_getfield(L, repl, "feed");
        lua_pushstring(L, line);
        free(line);
        lua_pushcfunction(L, traceback);
        lua_insert(L, -3);
        if (lua_pcall(L, 1, 1, -3) != 0) {
            fprintf(stderr, "%s\n", lua_tostring(L, -1));
            lua_pop(L, 2);
            more = false;
            continue;
        }
        more = lua_toboolean(L, -1);
        lua_pop(L, 2);
    }
    write_history(hist);
    printf("\n");
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
    if (nranks > 1) return launch(nranks, argc, argv, n_at);

    /* Join the job now (world size 1 without mpirun: no MPI), so that errors below know the rank. */
    if (fl_dist_init(0) < 0) {
        fprintf(stderr, "fsdp-lua: cannot join the MPI job: %s\n", fl_last_error());
        return 1;
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
    if (!status && (interactive || (!script && nstmts == 0))) status = run_repl(L);
    if (!status) status = run_exit_hooks(L);
    lua_close(L);   /* collects Lua's handles first: groups are released before MPI goes */
    if (fl_dist_finalize() < 0) {
        fprintf(stderr, "fsdp-lua: %s\n", fl_last_error());
        if (!status) status = 1;
    }
    return status ? 1 : 0;
}
