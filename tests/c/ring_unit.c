/* Unit tests of include/netkernel/ring.h: fill/space, wrap-around at every offset, copies and
 * iovecs across the wrap, the engine's consistency check and indices running past UINT32_MAX.
 * Single process, single thread. Exit 0 pass, 1 fail. */
#include <netkernel/ring.h>

#include <stdint.h>
#include <string.h>

#include "nk_test.h"

/* A ring as the ABI lays it out: head and tail each on their own cache line. */
struct test_ring {
  struct nk_index head;
  struct nk_index tail;
  struct nk_ring r;
  uint8_t *buf;
};

static uint8_t storage[4096 + 64];

static void tr_init(struct test_ring *t, uint32_t size, uint32_t start) {
  ASSERT_LE(size + 64, sizeof storage);
  memset(t, 0, sizeof *t);
  /* Guard bytes after the ring catch a copy that runs past size. */
  memset(storage, 0xEE, sizeof storage);
  t->buf = storage;
  atomic_store(&t->head.v, start);
  atomic_store(&t->tail.v, start);
  nk_ring_init(&t->r, t->buf, size, &t->head, &t->tail);
}

static void check_guard(uint32_t size) {
  for (uint32_t i = size; i < size + 64; i++) ASSERT_UINT_EQ(storage[i], 0xEE);
}

static uint8_t pattern(uint32_t seq) { return (uint8_t)(seq * 131u + (seq >> 8) + 7u); }

static void test_empty_full(uint32_t size, uint32_t start) {
  struct test_ring t;
  tr_init(&t, size, start);
  ASSERT_EQ(nk_ring_fill(&t.r), 0);
  ASSERT_EQ(nk_ring_space(&t.r), size);
  ASSERT_EQ(nk_ring_fill_checked(&t.r), 0);

  uint8_t in[4096], out[4096];
  for (uint32_t i = 0; i < size; i++) in[i] = pattern(i);
  /* Reading an empty ring yields nothing and moves nothing. */
  ASSERT_EQ(nk_ring_read(&t.r, out, 16), 0);
  ASSERT_UINT_EQ(atomic_load(&t.tail.v), start);

  /* Fill exactly: an oversized write is cut to the space left. */
  ASSERT_EQ(nk_ring_write(&t.r, in, size - 1), size - 1);
  ASSERT_EQ(nk_ring_space(&t.r), 1);
  ASSERT_EQ(nk_ring_write(&t.r, in + size - 1, 10), 1);
  ASSERT_EQ(nk_ring_fill(&t.r), size);
  ASSERT_EQ(nk_ring_space(&t.r), 0);
  ASSERT_EQ(nk_ring_fill_checked(&t.r), size);
  ASSERT_EQ(nk_ring_write(&t.r, in, 1), 0); /* full: nothing more goes in */
  ASSERT_UINT_EQ(atomic_load(&t.head.v), start + size);

  ASSERT_EQ(nk_ring_read(&t.r, out, size + 10), size);
  ASSERT_EQ(memcmp(in, out, size), 0);
  ASSERT_EQ(nk_ring_fill(&t.r), 0);
  ASSERT_EQ(nk_ring_space(&t.r), size);
  check_guard(size);
}

/* For every starting offset and every length up to size, a write then a read round-trips,
 * and the bytes land where the mask says they must. */
static void test_wrap_every_offset(uint32_t size, uint32_t base) {
  uint8_t in[4096], out[4096];
  for (uint32_t off = 0; off < size; off++) {
    for (uint32_t len = 1; len <= size; len++) {
      struct test_ring t;
      tr_init(&t, size, base + off);
      for (uint32_t i = 0; i < len; i++) in[i] = pattern(off * 7 + len + i);
      ASSERT_EQ(nk_ring_write(&t.r, in, len), len);
      for (uint32_t i = 0; i < len; i++)
        ASSERT_UINT_EQ(t.buf[(base + off + i) & (size - 1)], in[i]);
      memset(out, 0, len);
      ASSERT_EQ(nk_ring_read(&t.r, out, len), len);
      ASSERT_EQ(memcmp(in, out, len), 0);
      ASSERT_UINT_EQ(atomic_load(&t.head.v), (uint32_t)(base + off + len));
      ASSERT_UINT_EQ(atomic_load(&t.tail.v), (uint32_t)(base + off + len));
      check_guard(size);
    }
  }
}

/* copy_in / copy_out / iov at an arbitrary position, without publishing. */
static void test_copy_and_iov(uint32_t size, uint32_t base) {
  uint8_t in[4096], out[4096];
  for (uint32_t off = 0; off < size; off++) {
    for (uint32_t len = 0; len <= size; len++) {
      struct test_ring t;
      tr_init(&t, size, base);
      uint32_t at = base + off;
      for (uint32_t i = 0; i < len; i++) in[i] = pattern(at + i);
      nk_ring_copy_in(&t.r, at, in, len);
      /* Indices are untouched by the copy primitives. */
      ASSERT_UINT_EQ(atomic_load(&t.head.v), base);
      memset(out, 0, sizeof out);
      nk_ring_copy_out(&t.r, at, out, len);
      ASSERT_EQ(memcmp(in, out, len), 0);
      check_guard(size);

      struct iovec iov[2];
      memset(iov, 0, sizeof iov);
      int n = nk_ring_iov(&t.r, at, len, iov);
      uint32_t phys = at & (size - 1);
      uint32_t first = size - phys;
      if (len == 0) {
        ASSERT_EQ(n, 0);
        continue;
      }
      if (len <= first) {
        ASSERT_EQ(n, 1);
        ASSERT_PTR_EQ(iov[0].iov_base, t.buf + phys);
        ASSERT_EQ(iov[0].iov_len, len);
      } else {
        ASSERT_EQ(n, 2);
        ASSERT_PTR_EQ(iov[0].iov_base, t.buf + phys);
        ASSERT_EQ(iov[0].iov_len, first);
        ASSERT_PTR_EQ(iov[1].iov_base, t.buf);
        ASSERT_EQ(iov[1].iov_len, len - first);
      }
      /* The iovecs describe exactly the bytes copy_in placed. */
      uint32_t k = 0;
      for (int v = 0; v < n; v++)
        for (size_t j = 0; j < iov[v].iov_len; j++)
          ASSERT_UINT_EQ(((uint8_t *)iov[v].iov_base)[j], in[k++]);
      ASSERT_EQ(k, len);
    }
  }
}

/* A long run of interleaved partial writes and reads of varying sizes, checked against a
 * simple model (the byte stream sequence number). */
static void test_stream(uint32_t size, uint32_t base) {
  struct test_ring t;
  tr_init(&t, size, base);
  uint32_t wseq = 0, rseq = 0, rng = 12345;
  uint8_t buf[4096 + 8]; /* want may exceed size by 2 */
  for (int step = 0; step < 20000; step++) {
    rng = rng * 1103515245u + 12345u;
    uint32_t want = (rng >> 16) % (size + 3);
    if (rng & 0x100) {
      for (uint32_t i = 0; i < want; i++) buf[i] = pattern(wseq + i);
      uint32_t space = nk_ring_space(&t.r);
      uint32_t n = nk_ring_write(&t.r, buf, want);
      ASSERT_EQ(n, want < space ? want : space);
      wseq += n;
    } else {
      uint32_t fill = nk_ring_fill(&t.r);
      uint32_t n = nk_ring_read(&t.r, buf, want);
      ASSERT_EQ(n, want < fill ? want : fill);
      for (uint32_t i = 0; i < n; i++) ASSERT_UINT_EQ(buf[i], pattern(rseq + i));
      rseq += n;
    }
    ASSERT_EQ(nk_ring_fill(&t.r), wseq - rseq);
    ASSERT_EQ(nk_ring_fill_checked(&t.r), wseq - rseq);
    ASSERT_LE(nk_ring_fill(&t.r), size);
  }
  check_guard(size);
}

/* The engine's view of a hostile tenant: any fill above size is rejected. */
static void test_fill_checked(uint32_t size, uint32_t base) {
  struct test_ring t;
  tr_init(&t, size, base);
  atomic_store(&t.head.v, base + size);
  ASSERT_EQ(nk_ring_fill_checked(&t.r), size);
  atomic_store(&t.head.v, base + size + 1);
  ASSERT_EQ(nk_ring_fill_checked(&t.r), -1);
  atomic_store(&t.head.v, base + 0x80000000u);
  ASSERT_EQ(nk_ring_fill_checked(&t.r), -1);
  /* tail ahead of head (head - tail wraps to a huge value) */
  atomic_store(&t.head.v, base);
  atomic_store(&t.tail.v, base + 1);
  ASSERT_EQ(nk_ring_fill_checked(&t.r), -1);
  atomic_store(&t.tail.v, base + size);
  ASSERT_EQ(nk_ring_fill_checked(&t.r), -1);
  /* garbage in both */
  atomic_store(&t.head.v, 0xDEADBEEFu);
  atomic_store(&t.tail.v, 0x12345678u);
  ASSERT_EQ(nk_ring_fill_checked(&t.r), -1);
  /* consistent again */
  atomic_store(&t.head.v, base + 1 + size / 2);
  atomic_store(&t.tail.v, base + 1);
  ASSERT_EQ(nk_ring_fill_checked(&t.r), size / 2);
}

/* Indices crossing UINT32_MAX: start just below and push several rings' worth through. */
static void test_index_overflow(uint32_t size) {
  struct test_ring t;
  tr_init(&t, size, 0xFFFFFF00u);
  uint8_t in[4096], out[4096];
  uint32_t seq = 0;
  int crossed = 0;
  for (int round = 0; round < 64 || seq < 0x100u + 4 * size; round++) {
    uint32_t len = (uint32_t)(round * 37 + 1) % size + 1;
    for (uint32_t i = 0; i < len; i++) in[i] = pattern(seq + i);
    uint32_t before = atomic_load(&t.head.v);
    ASSERT_EQ(nk_ring_write(&t.r, in, len), len);
    if (atomic_load(&t.head.v) < before) crossed = 1;
    ASSERT_EQ(nk_ring_fill(&t.r), len);
    ASSERT_EQ(nk_ring_fill_checked(&t.r), len);
    ASSERT_EQ(nk_ring_space(&t.r), size - len);
    ASSERT_EQ(nk_ring_read(&t.r, out, len), len);
    ASSERT_EQ(memcmp(in, out, len), 0);
    seq += len;
  }
  ASSERT_EQ(crossed, 1);
  ASSERT_UINT_EQ(atomic_load(&t.head.v), (uint32_t)(0xFFFFFF00u + seq));
  /* Full ring whose head has wrapped and tail has not. */
  tr_init(&t, size, 0xFFFFFFFFu - size / 2);
  for (uint32_t i = 0; i < size; i++) in[i] = pattern(i);
  ASSERT_EQ(nk_ring_write(&t.r, in, size), size);
  ASSERT(atomic_load(&t.head.v) < atomic_load(&t.tail.v));
  ASSERT_EQ(nk_ring_fill(&t.r), size);
  ASSERT_EQ(nk_ring_space(&t.r), 0);
  ASSERT_EQ(nk_ring_fill_checked(&t.r), size);
  ASSERT_EQ(nk_ring_read(&t.r, out, size), size);
  ASSERT_EQ(memcmp(in, out, size), 0);
  check_guard(size);
}

int main(void) {
  static const uint32_t sizes[] = {1, 2, 4, 8, 16, 32, 64, 4096};
  static const uint32_t bases[] = {0, 0xFFFFFF00u, 0xFFFFFFFFu - 3};
  int cases = 0;
  for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
    uint32_t size = sizes[s];
    for (size_t b = 0; b < sizeof bases / sizeof bases[0]; b++) {
      uint32_t base = bases[b];
      test_empty_full(size, base);
      test_fill_checked(size, base);
      test_stream(size, base);
      if (size <= 64) {
        test_wrap_every_offset(size, base);
        test_copy_and_iov(size, base);
      }
      cases++;
    }
    test_index_overflow(size);
  }
  printf("OK ring_unit (%d size/base combinations)\n", cases);
  return 0;
}
