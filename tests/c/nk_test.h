/* Tiny assertion kit for the C test programs (after libuv's test/task.h).
 *
 * Each ASSERT_* prints file:line, the expression and both operands, then exits 1. Exit 77 means
 * skip (liburing's runner convention); tests/helpers_c.py turns it into pytest.skip.
 * Single-threaded or multi-threaded callers alike: failing exits the whole process.
 */
#ifndef NK_TEST_H
#define NK_TEST_H

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#define NK_TEST_SKIP 77

#define NK__ASSERT_BASE(a, op, b, type, fmt)                                                \
  do {                                                                                      \
    type nk__a = (type)(a);                                                                 \
    type nk__b = (type)(b);                                                                 \
    if (!(nk__a op nk__b)) {                                                                \
      fprintf(stderr, "%s:%d: assertion failed: %s %s %s (" fmt " %s " fmt ")\n", __FILE__, \
              __LINE__, #a, #op, #b, nk__a, #op, nk__b);                                    \
      fflush(stderr);                                                                       \
      exit(1);                                                                              \
    }                                                                                       \
  } while (0)

#define ASSERT_EQ(a, b)      NK__ASSERT_BASE(a, ==, b, int64_t, "%" PRId64)
#define ASSERT_NE(a, b)      NK__ASSERT_BASE(a, !=, b, int64_t, "%" PRId64)
#define ASSERT_LE(a, b)      NK__ASSERT_BASE(a, <=, b, int64_t, "%" PRId64)
#define ASSERT_GE(a, b)      NK__ASSERT_BASE(a, >=, b, int64_t, "%" PRId64)
#define ASSERT_UINT_EQ(a, b) NK__ASSERT_BASE(a, ==, b, uint64_t, "0x%" PRIx64)
#define ASSERT_PTR_EQ(a, b)  NK__ASSERT_BASE(a, ==, b, const void *, "%p")
#define ASSERT(expr)                                                               \
  do {                                                                             \
    if (!(expr)) {                                                                 \
      fprintf(stderr, "%s:%d: assertion failed: %s\n", __FILE__, __LINE__, #expr); \
      fflush(stderr);                                                              \
      exit(1);                                                                     \
    }                                                                              \
  } while (0)

#endif
