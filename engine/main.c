/* engine/main.c: the fsdp-lua executable. Embeds LuaJIT, points package.path at the lua/ library, and runs
 * a script, a -e statement or the interactive REPL (line editing through libedit). The engine itself is
 * reached from Lua through the FFI (the executable exports its fl_* symbols). */
#include "fsdp.h"

#include <editline/readline.h>
#include <lauxlib.h>
#include <limits.h>
#include <lua.h>
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
    "  -e STMT      run the Lua statement STMT (may repeat; runs before the script)\n"
    "  -i           enter the interactive REPL after the script (the default when no script is given)\n"
    "  -h, --help   show this help\n"
    "  -v, --version\n"
    "Environment: FSDP_LUA_PATH overrides where the lua/ library is found; OMP_NUM_THREADS sets threads.\n"
    "Scripts `require \"fsdp\"`; see README.md.\n";

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
        fprintf(stderr, "fsdp-lua: %s\n", lua_tostring(L, -1));
        fflush(stderr);
        lua_pop(L, 1);
    }
    return status;
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
    int nstmts = 0, script = 0;
    bool interactive = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
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
    lua_State *L = luaL_newstate();
    if (!L) { fprintf(stderr, "fsdp-lua: cannot create a Lua state\n"); return 1; }
    luaL_openlibs(L);

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
    lua_close(L);
    return status ? 1 : 0;
}
