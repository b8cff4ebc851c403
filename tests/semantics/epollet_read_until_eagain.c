/* EPOLLET reader: a forked writer sends 1 MiB in chunks; on each edge the reader reads until
 * EAGAIN and verifies every byte by stream offset. Phase 1 is lock-stepped through a pipe so
 * that, after draining to EAGAIN, a zero-timeout epoll_wait must report nothing (edge
 * triggering does not re-fire without new data). Phase 2 runs free; edges must keep coming
 * until EOF (a missed edge shows as a 5 s epoll_wait timeout). */
#include <sys/epoll.h>

#include "sem.h"

#define TOTAL       (1u << 20)
#define SYNC_ROUNDS 8
#define SYNC_CHUNK  20000u

int main(int argc, char **argv) {
  sem_init("epollet_read_until_eagain", argc, argv);
  struct sockaddr_storage la;
  int l = sem_listener(0, &la);
  int tok[2];
  SYS(pipe(tok));
  pid_t pid = sem_fork();
  if (pid == 0) {
    close(tok[1]);
    int fd = sem_connect(&la);
    static uint8_t chunk[65536];
    uint64_t off = 0;
    for (int r = 0; r < SYNC_ROUNDS; r++) {
      for (uint32_t i = 0; i < SYNC_CHUNK; i++) chunk[i] = sem_byte(off + i);
      sem_write_all(fd, chunk, SYNC_CHUNK);
      off += SYNC_CHUNK;
      char t;
      sem_read_all(tok[0], &t, 1); /* reader drained and checked */
    }
    uint32_t rng = 1;
    while (off < TOTAL) {
      rng = rng * 1103515245u + 12345u;
      uint32_t n = 1 + (rng >> 8) % sizeof chunk;
      if (n > TOTAL - off) n = (uint32_t)(TOTAL - off);
      for (uint32_t i = 0; i < n; i++) chunk[i] = sem_byte(off + i);
      sem_write_all(fd, chunk, n);
      off += n;
      if ((rng & 7) == 0) usleep(1000); /* let the reader catch up: more edges */
    }
    close(fd);
    _exit(0);
  }
  close(tok[0]);
  int s = (int)SYS(accept4(l, NULL, NULL, SOCK_NONBLOCK));
  int ep = (int)SYS(epoll_create1(0));
  struct epoll_event ev = {.events = EPOLLIN | EPOLLET | EPOLLRDHUP, .data.fd = s};
  SYS(epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev));

  uint64_t got = 0;
  unsigned edges = 0, reads = 0;
  int eof = 0, sync_round = 0;
  uint8_t buf[4096];
  while (!eof) {
    int n = epoll_wait(ep, &ev, 1, 5000);
    if (n < 0 && errno == EINTR) continue;
    CHECK(n == 1, "epoll_wait returned %d after %llu bytes, %u edges: an edge was lost", n,
          (unsigned long long)got, edges);
    edges++;
    for (;;) { /* read until EAGAIN */
      ssize_t r = read(s, buf, sizeof buf);
      if (r < 0) {
        CHECK(errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR, "read: %s",
              strerror(errno));
        if (errno == EINTR) continue;
        break;
      }
      if (r == 0) {
        eof = 1;
        break;
      }
      reads++;
      for (ssize_t i = 0; i < r; i++)
        CHECK(buf[i] == sem_byte(got + (uint64_t)i), "byte at offset %llu differs",
              (unsigned long long)(got + (uint64_t)i));
      got += (uint64_t)r;
    }
    if (sync_round < SYNC_ROUNDS && got == (uint64_t)(sync_round + 1) * SYNC_CHUNK) {
      /* Drained to EAGAIN with the writer parked: no new edge may be reported. */
      int z = epoll_wait(ep, &ev, 1, 0);
      CHECK(z == 0, "EPOLLET re-fired without new data (events 0x%x)", ev.events);
      sync_round++;
      sem_write_all(tok[1], "t", 1);
    }
  }
  EXPECT_EQ(got, TOTAL);
  EXPECT_EQ(sync_round, SYNC_ROUNDS);
  CHECK(edges >= SYNC_ROUNDS, "only %u edges", edges);
  sem_wait_child(pid);
  printf("%u edges, %u reads\n", edges, reads);
  sem_ok();
}
