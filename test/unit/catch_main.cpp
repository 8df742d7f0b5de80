// Catch2's main, compiled once: it is the slow part of the build.  With
// SMTP521_MINI_CATCH (test/unit/catch.hpp), the stand-in's: every case in turn.
#if defined(SMTP521_MINI_CATCH)
#include "catch.hpp"
int main() {
    for (const mini_catch::Case& c : mini_catch::cases()) {
        try {
            c.body();
        } catch (const mini_catch::Abort&) {
        }
        std::printf("%s: %s\n", mini_catch::failures() ? "failed so far" : "passed", c.name);
    }
    std::printf("%zu test cases, %d failed checks\n", mini_catch::cases().size(), mini_catch::failures());
    return mini_catch::failures() == 0 ? 0 : 1;
}
#elif __has_include(<catch2/catch_session.hpp>)
#include <catch2/catch_session.hpp>
int main(int argc, char* argv[]) { return Catch::Session().run(argc, argv); }
#else
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
#endif
