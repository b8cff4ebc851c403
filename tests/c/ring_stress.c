/* Stress of include/netkernel/ring.h across two processes (shared memfd, fork) and across two
 * threads (DPDK's ring stress test, byte-stream flavour).
 *
 * The ring sits in shared memory behind a struct nk_slot, using its tx_head/tx_tail indices
 * exactly as the ABI lays them out; 64 KiB of data follow. The producer writes records
 *   {magic, producer, seq, len, checksum} + len payload bytes derived from seq
 * of random length 1..4000 in random-sized pieces; the consumer reads random-sized pieces
 * (records straddle reads and the wrap) and checks every record for loss, duplication,
 * reordering (seq), tearing (checksum, payload pattern). Both sides busy-poll with
 * sched_yield() and give up after a stall deadline.
 *
 * usage: ring_stress [SECONDS=2] [process|thread|both=both]
 * Prints records, bytes and MB/s per variant. Exit 0 pass, 1 fail.
 */
#include <netkernel/ring.h>

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define RING_SIZE   (64u * 1024u)
#define DATA_OFF    4096u
#define REC_MAGIC   0x4e4b5245u /* "NKRE" */
#define END_MAGIC   0x4e4b454eu /* "NKEN" */
#define MAX_PAYLOAD 4000u
#define STALL_SEC   10.0

struct rec_hdr {
  uint32_t magic;
  uint32_t producer;
  uint64_t seq;
  uint32_t len;
  uint32_t csum; /* over magic, producer, seq, len and the payload */
};
_Static_assert(sizeof(struct rec_hdr) == 24, "rec_hdr size");

struct shared {
  struct nk_slot slot;        /* tx_head / tx_tail as the ABI places them */
  NK_ATOMIC(uint32_t) failed; /* either side sets it to stop the other */
};
_Static_assert(sizeof(struct shared) <= DATA_OFF, "header fits before the data");

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint32_t xorshift(uint32_t *s) {
  uint32_t x = *s;
  x ^= x << 13;
  x ^= x >> 17;
  x ^= x << 5;
  return *s = x;
}

static uint8_t payload_byte(uint64_t seq, uint32_t i) {
  uint32_t seed = (uint32_t)(seq * 2654435761u) ^ (uint32_t)(seq >> 32);
  return (uint8_t)(seed + i * 0x9du + (i >> 7));
}

static uint32_t fnv1a(uint32_t h, const void *p, size_t n) {
  const uint8_t *b = p;
  for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 16777619u;
  return h;
}

static uint32_t rec_csum(const struct rec_hdr *h, const uint8_t *payload) {
  uint32_t c = 2166136261u;
  c = fnv1a(c, &h->magic, 4);
  c = fnv1a(c, &h->producer, 4);
  c = fnv1a(c, &h->seq, 8);
  c = fnv1a(c, &h->len, 4);
  return fnv1a(c, payload, h->len);
}

struct side {
  struct shared *sh;
  struct nk_ring ring;
  double seconds;
  uint32_t producer_id;
  /* results */
  uint64_t records;
  uint64_t bytes;
  int err;
};

static void fail(struct side *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail(struct side *s, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "ring_stress[%d]: ", (int)getpid());
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  s->err = 1;
  atomic_store(&s->sh->failed, 1);
}

/* Push len bytes in random pieces; waits (bounded) when the ring is full. */
static int push(struct side *s, const uint8_t *p, uint32_t len, uint32_t *rng) {
  double last = 0;
  uint32_t spins = 0;
  while (len > 0) {
    uint32_t piece = 1 + xorshift(rng) % (len < 6000 ? len : 6000);
    uint32_t n;
    if (xorshift(rng) & 1) {
      n = nk_ring_write(&s->ring, p, piece);
    } else { /* the copy_in + produce path the guest uses */
      uint32_t space = nk_ring_space(&s->ring);
      n = piece < space ? piece : space;
      if (n) {
        nk_ring_copy_in(&s->ring, atomic_load_explicit(s->ring.head, memory_order_relaxed), p, n);
        nk_ring_produce(&s->ring, n);
      }
    }
    if (n) {
      p += n;
      len -= n;
      spins = 0;
      continue;
    }
    if (atomic_load_explicit(&s->sh->failed, memory_order_relaxed)) return -1;
    if ((++spins & 1023) == 1) {
      double t = now();
      if (spins == 1) last = t;
      if (t - last > STALL_SEC) {
        fail(s, "producer stalled: ring full for %.0fs", STALL_SEC);
        return -1;
      }
    }
    sched_yield();
  }
  return 0;
}

static void *producer(void *arg) {
  struct side *s = arg;
  uint32_t rng = 0x9e3779b9u ^ s->producer_id;
  static __thread uint8_t rec[sizeof(struct rec_hdr) + MAX_PAYLOAD];
  double end = now() + s->seconds;
  uint64_t seq = 0;
  for (;;) {
    if ((seq & 63) == 0 && now() >= end) break; /* look at the clock every 64 records */
    struct rec_hdr h = {REC_MAGIC, s->producer_id, seq, 1 + xorshift(&rng) % MAX_PAYLOAD, 0};
    uint8_t *pl = rec + sizeof h;
    for (uint32_t i = 0; i < h.len; i++) pl[i] = payload_byte(seq, i);
    h.csum = rec_csum(&h, pl);
    memcpy(rec, &h, sizeof h);
    if (push(s, rec, (uint32_t)sizeof h + h.len, &rng) < 0) return NULL;
    s->bytes += sizeof h + h.len;
    seq++;
  }
  struct rec_hdr h = {END_MAGIC, s->producer_id, seq, 0, 0};
  h.csum = rec_csum(&h, rec);
  if (push(s, (const uint8_t *)&h, sizeof h, &rng) < 0) return NULL;
  s->records = seq;
  return NULL;
}

/* Pull exactly len bytes, in random pieces, through read or through the iovec path. */
static int pull(struct side *s, uint8_t *p, uint32_t len, uint32_t *rng) {
  double last = 0;
  uint32_t spins = 0;
  while (len > 0) {
    uint32_t piece = 1 + xorshift(rng) % (len < 5000 ? len : 5000);
    uint32_t n;
    if (xorshift(rng) & 1) {
      n = nk_ring_read(&s->ring, p, piece);
    } else { /* the iov + consume path the engine uses */
      uint32_t fill = nk_ring_fill(&s->ring);
      n = piece < fill ? piece : fill;
      if (n) {
        struct iovec iov[2];
        int cnt =
            nk_ring_iov(&s->ring, atomic_load_explicit(s->ring.tail, memory_order_relaxed), n, iov);
        uint32_t k = 0;
        for (int i = 0; i < cnt; i++) {
          memcpy(p + k, iov[i].iov_base, iov[i].iov_len);
          k += (uint32_t)iov[i].iov_len;
        }
        if (k != n) {
          fail(s, "nk_ring_iov covered %u bytes, wanted %u", k, n);
          return -1;
        }
        nk_ring_consume(&s->ring, n);
      }
    }
    int64_t chk = nk_ring_fill_checked(&s->ring);
    if (chk < 0) {
      fail(s, "nk_ring_fill_checked reports inconsistent indices");
      return -1;
    }
    if (n) {
      p += n;
      len -= n;
      spins = 0;
      continue;
    }
    if (atomic_load_explicit(&s->sh->failed, memory_order_relaxed)) return -1;
    if ((++spins & 1023) == 1) {
      double t = now();
      if (spins == 1) last = t;
      if (t - last > STALL_SEC) {
        fail(s, "consumer stalled: ring empty for %.0fs", STALL_SEC);
        return -1;
      }
    }
    sched_yield();
  }
  return 0;
}

static void *consumer(void *arg) {
  struct side *s = arg;
  uint32_t rng = 0x85ebca6bu;
  static __thread uint8_t pl[MAX_PAYLOAD];
  uint64_t expect = 0;
  for (;;) {
    struct rec_hdr h;
    if (pull(s, (uint8_t *)&h, sizeof h, &rng) < 0) return NULL;
    if (h.magic == END_MAGIC) {
      if (h.csum != rec_csum(&h, pl) || h.len != 0) {
        fail(s, "torn end record");
        return NULL;
      }
      if (h.seq != expect) {
        fail(s, "end record says %llu records, received %llu", (unsigned long long)h.seq,
             (unsigned long long)expect);
        return NULL;
      }
      break;
    }
    if (h.magic != REC_MAGIC || h.len == 0 || h.len > MAX_PAYLOAD) {
      fail(s, "bad header at record %llu: magic 0x%08x len %u (stream out of sync)",
           (unsigned long long)expect, h.magic, h.len);
      return NULL;
    }
    if (h.producer != s->producer_id) {
      fail(s, "record %llu from producer %u, expected %u", (unsigned long long)expect, h.producer,
           s->producer_id);
      return NULL;
    }
    if (pull(s, pl, h.len, &rng) < 0) return NULL;
    if (h.seq != expect) {
      fail(s, "%s: got seq %llu, expected %llu",
           h.seq < expect ? "duplicate or reordered record" : "lost record",
           (unsigned long long)h.seq, (unsigned long long)expect);
      return NULL;
    }
    if (rec_csum(&h, pl) != h.csum) {
      fail(s, "torn record %llu (checksum)", (unsigned long long)h.seq);
      return NULL;
    }
    for (uint32_t i = 0; i < h.len; i++)
      if (pl[i] != payload_byte(h.seq, i)) {
        fail(s, "record %llu byte %u is 0x%02x, expected 0x%02x", (unsigned long long)h.seq, i,
             pl[i], payload_byte(h.seq, i));
        return NULL;
      }
    s->bytes += sizeof h + h.len;
    expect++;
  }
  s->records = expect;
  return NULL;
}

static struct shared *map_shared(int *fd_out) {
  int fd = memfd_create("nk-ring-stress", MFD_CLOEXEC);
  if (fd < 0) {
    perror("memfd_create");
    return NULL;
  }
  if (ftruncate(fd, DATA_OFF + RING_SIZE) < 0) {
    perror("ftruncate");
    close(fd);
    return NULL;
  }
  void *p = mmap(NULL, DATA_OFF + RING_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    perror("mmap");
    close(fd);
    return NULL;
  }
  *fd_out = fd;
  return p;
}

static void side_init(struct side *s, struct shared *sh, double seconds, uint32_t id) {
  memset(s, 0, sizeof *s);
  s->sh = sh;
  s->seconds = seconds;
  s->producer_id = id;
  nk_ring_init(&s->ring, (uint8_t *)sh + DATA_OFF, RING_SIZE, &sh->slot.tx_head, &sh->slot.tx_tail);
}

static void report(const char *variant, const struct side *c, double elapsed) {
  printf("%s: %llu records, %llu bytes in %.2fs, %.1f MB/s\n", variant,
         (unsigned long long)c->records, (unsigned long long)c->bytes, elapsed,
         (double)c->bytes / elapsed / 1e6);
}

static int run_process(double seconds) {
  int fd;
  struct shared *sh = map_shared(&fd);
  if (!sh) return 1;
  /* Start just below UINT32_MAX so the indices wrap early in the run. */
  atomic_store(&sh->slot.tx_head.v, 0xFFFF0000u);
  atomic_store(&sh->slot.tx_tail.v, 0xFFFF0000u);
  double t0 = now();
  pid_t pid = fork();
  if (pid < 0) {
    perror("fork");
    return 1;
  }
  if (pid == 0) {
    struct side p;
    /* The child maps the same memfd again, at another address: offsets, never pointers. */
    void *m = mmap(NULL, DATA_OFF + RING_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) _exit(1);
    side_init(&p, m, seconds, 1);
    producer(&p);
    _exit(p.err ? 1 : 0);
  }
  struct side c;
  side_init(&c, sh, seconds, 1);
  consumer(&c);
  double elapsed = now() - t0;
  if (c.err) kill(pid, SIGKILL);
  int st;
  if (waitpid(pid, &st, 0) < 0) {
    perror("waitpid");
    return 1;
  }
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
    fprintf(stderr, "producer process failed (status 0x%x)\n", st);
    return 1;
  }
  if (c.err) return 1;
  report("process", &c, elapsed);
  munmap(sh, DATA_OFF + RING_SIZE);
  close(fd);
  return 0;
}

static int run_thread(double seconds) {
  int fd;
  struct shared *sh = map_shared(&fd);
  if (!sh) return 1;
  atomic_store(&sh->slot.tx_head.v, 0xFFFFFF00u);
  atomic_store(&sh->slot.tx_tail.v, 0xFFFFFF00u);
  struct side p, c;
  side_init(&p, sh, seconds, 2);
  side_init(&c, sh, seconds, 2);
  double t0 = now();
  pthread_t tp, tc;
  int e = pthread_create(&tp, NULL, producer, &p);
  if (e) {
    fprintf(stderr, "pthread_create: %s\n", strerror(e));
    return 1;
  }
  e = pthread_create(&tc, NULL, consumer, &c);
  if (e) {
    fprintf(stderr, "pthread_create: %s\n", strerror(e));
    atomic_store(&sh->failed, 1);
    pthread_join(tp, NULL);
    return 1;
  }
  pthread_join(tp, NULL);
  pthread_join(tc, NULL);
  double elapsed = now() - t0;
  if (p.err || c.err) return 1;
  if (p.records != c.records || p.bytes != c.bytes) {
    fprintf(stderr, "produced %llu records/%llu bytes, consumed %llu/%llu\n",
            (unsigned long long)p.records, (unsigned long long)p.bytes,
            (unsigned long long)c.records, (unsigned long long)c.bytes);
    return 1;
  }
  report("thread", &c, elapsed);
  munmap(sh, DATA_OFF + RING_SIZE);
  close(fd);
  return 0;
}

int main(int argc, char **argv) {
  double seconds = argc > 1 ? atof(argv[1]) : 2.0;
  const char *mode = argc > 2 ? argv[2] : "both";
  if (seconds <= 0) seconds = 2.0;
  setvbuf(stdout, NULL, _IOLBF, 0);
  /* Hard backstop: each variant runs `seconds`, plus stall deadlines, plus slack. */
  alarm((unsigned)(2 * seconds + 2 * STALL_SEC + 30));
  int rc = 0;
  int any = 0;
  if (!strcmp(mode, "process") || !strcmp(mode, "both")) {
    rc |= run_process(seconds);
    any = 1;
  }
  if (!strcmp(mode, "thread") || !strcmp(mode, "both")) {
    rc |= run_thread(seconds);
    any = 1;
  }
  if (!any) {
    fprintf(stderr, "usage: %s [SECONDS] [process|thread|both]\n", argv[0]);
    return 2;
  }
  if (rc == 0) printf("OK ring_stress\n");
  return rc ? 1 : 0;
}
