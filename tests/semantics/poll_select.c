/* Readiness: poll and select on a connected pair (writable at once, readable only after the
 * peer writes, POLLRDHUP/EOF after the peer closes, POLLHUP once both directions are shut);
 * one socket in two epoll sets gets the event in both; EPOLLONESHOT fires once until
 * re-armed with EPOLL_CTL_MOD; epoll_wait fails with EINTR when a signal handler runs, both
 * without SA_RESTART and with it (epoll_wait is never restarted, see signal(7)). */
#include <sys/epoll.h>
#include <sys/select.h>

#include "sem.h"

static volatile sig_atomic_t got_sig;
static void on_usr1(int sig) {
  (void)sig;
  got_sig++;
}

static int sel(int fd, int *rd, int *wr, int ms) {
  fd_set r, w;
  FD_ZERO(&r);
  FD_ZERO(&w);
  FD_SET(fd, &r);
  FD_SET(fd, &w);
  struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
  int n = (int)SYS(select(fd + 1, &r, &w, NULL, &tv));
  *rd = FD_ISSET(fd, &r) != 0;
  *wr = FD_ISSET(fd, &w) != 0;
  return n;
}

static int ep_add(int fd, uint32_t events) {
  int ep = (int)SYS(epoll_create1(EPOLL_CLOEXEC));
  struct epoll_event ev = {.events = events, .data.u64 = 0xfeed0000u + (uint32_t)fd};
  SYS(epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev));
  return ep;
}

static int ep_wait(int ep, struct epoll_event *ev, int ms) {
  int n;
  do n = epoll_wait(ep, ev, 1, ms);
  while (n < 0 && errno == EINTR);
  CHECK(n >= 0, "epoll_wait: %s", strerror(errno));
  return n;
}

static void expect_eintr(int ep, int restart) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_usr1;
  sa.sa_flags = restart ? SA_RESTART : 0;
  SYS(sigaction(SIGUSR1, &sa, NULL));
  got_sig = 0;
  pid_t me = getpid();
  pid_t pid = sem_fork();
  if (pid == 0) {
    usleep(200000);
    kill(me, SIGUSR1);
    _exit(0);
  }
  struct epoll_event ev;
  double t0 = sem_now();
  int n = epoll_wait(ep, &ev, 1, 5000);
  int e = errno;
  double dt = sem_now() - t0;
  CHECK(n == -1 && e == EINTR,
        "epoll_wait (SA_RESTART %s) returned %d errno %s after %.2fs, "
        "expected EINTR",
        restart ? "on" : "off", n, strerror(e), dt);
  EXPECT_EQ(got_sig, 1);
  sem_wait_child(pid);
}

int main(int argc, char **argv) {
  sem_init("poll_select", argc, argv);
  int cli, srv;
  sem_pair(&cli, &srv);

  /* Fresh connection: writable, not readable. */
  int re = sem_poll(cli, POLLIN | POLLOUT, 1000);
  EXPECT_EQ(re, POLLOUT);
  int rd, wr;
  EXPECT_EQ(sel(cli, &rd, &wr, 0), 1);
  EXPECT_EQ(rd, 0);
  EXPECT_EQ(wr, 1);
  EXPECT_EQ(sem_poll(cli, POLLIN, 50), 0);

  /* After the peer writes: readable. */
  sem_write_all(srv, "x", 1);
  CHECK(sem_poll(cli, POLLIN, 5000) & POLLIN, "not readable after the peer wrote");
  EXPECT_EQ(sem_poll(cli, POLLIN | POLLOUT, 0), POLLIN | POLLOUT);
  EXPECT_EQ(sel(cli, &rd, &wr, 1000), 2);
  EXPECT_EQ(rd, 1);
  EXPECT_EQ(wr, 1);

  /* The same socket in two epoll sets: both report it. */
  int ep1 = ep_add(cli, EPOLLIN), ep2 = ep_add(cli, EPOLLIN);
  struct epoll_event ev;
  EXPECT_EQ(ep_wait(ep1, &ev, 1000), 1);
  EXPECT_EQ(ev.events, EPOLLIN);
  EXPECT_EQ(ev.data.u64, 0xfeed0000u + (uint32_t)cli);
  EXPECT_EQ(ep_wait(ep2, &ev, 1000), 1);
  EXPECT_EQ(ev.events, EPOLLIN);
  /* Level-triggered: still there while unread. */
  EXPECT_EQ(ep_wait(ep1, &ev, 0), 1);

  /* EPOLLONESHOT: once, then silent (data still pending) until re-armed. */
  int ep3 = ep_add(cli, EPOLLIN | EPOLLONESHOT);
  EXPECT_EQ(ep_wait(ep3, &ev, 1000), 1);
  EXPECT_EQ(ep_wait(ep3, &ev, 100), 0);
  ev.events = EPOLLIN | EPOLLONESHOT;
  ev.data.u64 = 42;
  SYS(epoll_ctl(ep3, EPOLL_CTL_MOD, cli, &ev));
  EXPECT_EQ(ep_wait(ep3, &ev, 1000), 1);
  EXPECT_EQ(ev.data.u64, 42);
  EXPECT_EQ(ep_wait(ep3, &ev, 100), 0);

  char c;
  EXPECT_EQ(read(cli, &c, 1), 1);
  EXPECT_EQ(ep_wait(ep1, &ev, 0), 0);
  EXPECT_EQ(ep_wait(ep2, &ev, 0), 0);

  /* epoll_wait interrupted by a signal: EINTR with and without SA_RESTART. */
  int ep_empty = (int)SYS(epoll_create1(EPOLL_CLOEXEC));
  expect_eintr(ep_empty, 0);
  expect_eintr(ep_empty, 1);

  /* Peer closes: readable with POLLRDHUP, read gives EOF; still writable, no POLLHUP yet. */
  SYS(close(srv));
  re = sem_poll(cli, POLLIN | POLLRDHUP, 5000);
  CHECK((re & (POLLIN | POLLRDHUP)) == (POLLIN | POLLRDHUP), "after peer close revents 0x%x", re);
  EXPECT_EQ(sem_poll(cli, POLLHUP, 0), 0);
  EXPECT_EQ(sel(cli, &rd, &wr, 1000), 2);
  EXPECT_EQ(rd, 1);
  EXPECT_EQ(read(cli, &c, 1), 0);
  /* Our side shut too: POLLHUP. */
  SYS(shutdown(cli, SHUT_WR));
  CHECK(sem_poll(cli, POLLIN, 1000) & POLLHUP, "no POLLHUP after both directions shut");
  close(cli);
  sem_ok();
}
