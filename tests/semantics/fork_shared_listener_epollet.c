/* A listener shared by two forked workers, each with its own epoll set and an EPOLLET accept
 * loop (accept until EAGAIN). A third process makes 200 connections, each sending its index
 * and waiting for a one-byte ack. Every connection must be accepted exactly once across the
 * workers, none lost (a worker that stops before EAGAIN on an edge strands connections). */
#include <sys/epoll.h>

#include "sem.h"

#define NCONN 200

static void worker(int lfd, int ctl, int report) {
  int ep = (int)SYS(epoll_create1(EPOLL_CLOEXEC));
  struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.fd = lfd};
  SYS(epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev));
  ev.events = EPOLLIN;
  ev.data.fd = ctl;
  SYS(epoll_ctl(ep, EPOLL_CTL_ADD, ctl, &ev));
  uint32_t got[NCONN];
  uint32_t n = 0;
  int stop = 0;
  while (!stop) {
    struct epoll_event evs[4];
    int k = epoll_wait(ep, evs, 4, 10000);
    if (k < 0 && errno == EINTR) continue;
    CHECK(k > 0, "worker: epoll_wait returned %d (%s)", k, k < 0 ? strerror(errno) : "timeout");
    for (int i = 0; i < k; i++) {
      if (evs[i].data.fd == ctl) {
        stop = 1;
        continue;
      }
      for (;;) { /* edge-triggered: drain until EAGAIN */
        int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
          CHECK(errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR, "accept4: %s",
                strerror(errno));
          if (errno == EINTR) continue;
          break;
        }
        /* The accepted socket does not inherit O_NONBLOCK from the listener on Linux. */
        int fl = (int)SYS(fcntl(c, F_GETFL));
        CHECK(!(fl & O_NONBLOCK), "accepted socket inherited O_NONBLOCK");
        uint32_t idx;
        sem_read_all(c, &idx, sizeof idx);
        CHECK(idx < NCONN, "bad index %u", idx);
        CHECK(n < NCONN, "worker accepted more than %d connections", NCONN);
        got[n++] = idx;
        sem_write_all(c, "A", 1);
        close(c);
      }
    }
  }
  sem_write_all(report, &n, sizeof n);
  sem_write_all(report, got, n * sizeof got[0]);
  _exit(0);
}

int main(int argc, char **argv) {
  sem_init("fork_shared_listener_epollet", argc, argv);
  struct sockaddr_storage la;
  int lfd = sem_listener(SOCK_NONBLOCK, &la);
  int ctl[2], rep[2][2];
  SYS(pipe(ctl));
  pid_t w[2];
  for (int i = 0; i < 2; i++) {
    SYS(pipe(rep[i]));
    w[i] = sem_fork();
    if (w[i] == 0) {
      close(ctl[1]);
      close(rep[i][0]);
      worker(lfd, ctl[0], rep[i][1]);
    }
    close(rep[i][1]);
  }
  close(ctl[0]);

  /* Client: open all 200 connections first (they pile up in the accept queue while the
   * workers race), then collect every ack. */
  pid_t cl = sem_fork();
  if (cl == 0) {
    close(lfd);
    static int fds[NCONN];
    for (uint32_t i = 0; i < NCONN; i++) {
      fds[i] = sem_connect(&la);
      sem_write_all(fds[i], &i, sizeof i);
    }
    for (int i = 0; i < NCONN; i++) {
      char a;
      sem_read_all(fds[i], &a, 1);
      CHECK(a == 'A', "connection %d: bad ack", i);
      close(fds[i]);
    }
    _exit(0);
  }
  sem_wait_child(cl);
  close(ctl[1]); /* workers see the control pipe hang up and report */

  int seen[NCONN] = {0};
  uint32_t per[2];
  for (int i = 0; i < 2; i++) {
    uint32_t got[NCONN];
    sem_read_all(rep[i][0], &per[i], sizeof per[i]);
    CHECK(per[i] <= NCONN, "worker %d reports %u connections", i, per[i]);
    sem_read_all(rep[i][0], got, per[i] * sizeof got[0]);
    for (uint32_t j = 0; j < per[i]; j++) {
      CHECK(!seen[got[j]], "connection %u accepted twice", got[j]);
      seen[got[j]] = 1;
    }
    sem_wait_child(w[i]);
  }
  for (int i = 0; i < NCONN; i++) CHECK(seen[i], "connection %d never accepted", i);
  EXPECT_EQ(per[0] + per[1], NCONN);
  printf("accepted: worker0 %u, worker1 %u\n", per[0], per[1]);
  sem_ok();
}
