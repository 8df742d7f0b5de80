// The one point where the tests meet Catch2: Debian 12 ships v2, a single
// header with its main behind CATCH_CONFIG_MAIN; Debian 13 ships v3, split
// headers and a library (the Makefile links -lCatch2 when it finds v3).
// The tests use TEST_CASE, CHECK, CHECK_FALSE, REQUIRE and INFO, which
// both spell alike.
//
// A guest of another architecture (test/arch) has no Catch2 library of
// its own to link: built with SMTP521_MINI_CATCH, the same cases run on
// the small stand-in below, which prints each failed check and exits 1
// if any failed (test_catch2's per-case report is the host's).
#pragma once
#if defined(SMTP521_MINI_CATCH)
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

namespace mini_catch {
struct Case {
    const char* name;
    void (*body)();
};
inline std::vector<Case>& cases() {
    static std::vector<Case> all;
    return all;
}
inline int& failures() {
    static int n = 0;
    return n;
}
struct Abort {};  // a failed REQUIRE ends its case
struct Register {
    Register(const char* name, void (*body)()) { cases().push_back({name, body}); }
};
inline bool check(bool ok, const char* expr, const char* file, int line, bool required) {
    if (!ok) {
        ++failures();
        std::printf("%s:%d: FAILED: %s\n", file, line, expr);
        if (required) throw Abort{};
    }
    return ok;
}
}  // namespace mini_catch

#define MINI_CATCH_CAT2(a, b) a##b
#define MINI_CATCH_CAT(a, b) MINI_CATCH_CAT2(a, b)
#define MINI_CATCH_CASE(fn, name)                                                    \
    static void fn();                                                                \
    static mini_catch::Register MINI_CATCH_CAT(fn, _registered)(name, fn);           \
    static void fn()
#define TEST_CASE(name) MINI_CATCH_CASE(MINI_CATCH_CAT(mini_catch_case_, __LINE__), name)
#define CHECK(...) mini_catch::check(static_cast<bool>(__VA_ARGS__), #__VA_ARGS__, __FILE__, __LINE__, false)
#define CHECK_FALSE(...) mini_catch::check(!(__VA_ARGS__), "!(" #__VA_ARGS__ ")", __FILE__, __LINE__, false)
#define REQUIRE(...) mini_catch::check(static_cast<bool>(__VA_ARGS__), #__VA_ARGS__, __FILE__, __LINE__, true)
#define INFO(...) ((void)(std::ostringstream() << __VA_ARGS__))
#elif __has_include(<catch2/catch_test_macros.hpp>)
#include <catch2/catch_test_macros.hpp>
#else
#include <catch2/catch.hpp>
#endif
