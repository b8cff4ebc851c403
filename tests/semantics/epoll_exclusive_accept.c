/* EPOLLEXCLUSIVE on a listener shared by several processes (nginx's accept_mutex-free mode):
 * every connection is accepted exactly once, no process is left without a wake-up while
 * connections wait, and a wake-up that finds nothing gives EAGAIN (non-blocking accept).
 * Also: the same socket in two epoll sets of one process, both level-triggered. */
#include <sys/epoll.h>

#include "sem.h"

#define WORKERS 3
#define CONNS   150

static void worker(int l, int report) {
  int ep = (int)SYS(epoll_create1(0));
  struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.fd = l};
  SYS(epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev));
  int count = 0;
  for (;;) {
    int n = epoll_wait(ep, &ev, 1, 1500);
    if (n < 0 && errno == EINTR) continue;
    if (n == 0) break; /* quiet for 1.5 s: the client is done */
    int c = accept4(l, NULL, NULL, SOCK_NONBLOCK);
    if (c < 0) {
      CHECK(errno == EAGAIN || errno == EWOULDBLOCK, "accept: %s", strerror(errno));
      continue; /* another worker took it */
    }
    char b;
    CHECK(sem_poll(c, POLLIN, 5000) & POLLIN, "no byte from client");
    EXPECT_EQ(read(c, &b, 1), 1);
    EXPECT_EQ(write(c, &b, 1), 1);
    close(c);
    count++;
  }
  EXPECT_EQ(write(report, &count, sizeof count), (long)sizeof count);
  _exit(0);
}

int main(int argc, char **argv) {
  sem_init("epoll_exclusive_accept", argc, argv);
  struct sockaddr_storage la;
  int l = sem_listener(SOCK_NONBLOCK, &la);

  /* One socket in two epoll sets, both see it readable. */
  int ep1 = (int)SYS(epoll_create1(0)), ep2 = (int)SYS(epoll_create1(0));
  struct epoll_event ev = {.events = EPOLLIN, .data.fd = l};
  SYS(epoll_ctl(ep1, EPOLL_CTL_ADD, l, &ev));
  SYS(epoll_ctl(ep2, EPOLL_CTL_ADD, l, &ev));
  int probe = sem_connect(&la);
  EXPECT_EQ(epoll_wait(ep1, &ev, 1, 5000), 1);
  EXPECT_EQ(epoll_wait(ep2, &ev, 1, 5000), 1);
  int a = (int)SYS(accept(l, NULL, NULL));
  EXPECT_EQ(epoll_wait(ep1, &ev, 1, 0), 0);
  EXPECT_EQ(epoll_wait(ep2, &ev, 1, 0), 0);
  close(a);
  close(probe);

  int pfd[2];
  SYS(pipe(pfd));
  pid_t pids[WORKERS];
  for (int i = 0; i < WORKERS; i++)
    if ((pids[i] = sem_fork()) == 0) worker(l, pfd[1]);
  for (int i = 0; i < CONNS; i++) {
    int c = sem_connect(&la);
    char b = (char)i, r = 0;
    sem_write_all(c, &b, 1);
    sem_read_all(c, &r, 1);
    EXPECT_EQ(r, b);
    close(c);
  }
  int total = 0;
  for (int i = 0; i < WORKERS; i++) {
    sem_wait_child(pids[i]);
    int n;
    EXPECT_EQ(read(pfd[0], &n, sizeof n), (long)sizeof n);
    total += n;
  }
  EXPECT_EQ(total, CONNS);
  sem_ok();
}
