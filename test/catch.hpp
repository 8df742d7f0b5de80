// The one point where the tests meet Catch2: Debian 12 ships v2, a single
// header with its main behind CATCH_CONFIG_MAIN; Debian 13 ships v3, split
// headers and a library (the Makefile links -lCatch2 when it finds v3).
// The tests use TEST_CASE, CHECK, REQUIRE and INFO, which both spell alike.
#pragma once
#if __has_include(<catch2/catch_test_macros.hpp>)
#include <catch2/catch_test_macros.hpp>
#else
#include <catch2/catch.hpp>
#endif
