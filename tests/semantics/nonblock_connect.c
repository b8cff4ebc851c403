/* Non-blocking connect + epoll(EPOLLOUT) + getsockopt(SO_ERROR):
 *  (a) to a listening port: EINPROGRESS (or immediate success), EPOLLOUT, SO_ERROR 0, a
 *      second connect() returns 0 and a third says EISCONN, data flows both ways;
 *  (b) to a closed port: SO_ERROR is ECONNREFUSED (reported once, then 0), and EPOLLERR shows.
 * Regression named after the bug: non-blocking connect + epoll. */
#include <sys/epoll.h>

#include "sem.h"

static int start_connect(const struct sockaddr_storage *a, int *immediate_err) {
  int fd = (int)SYS(socket(a->ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0));
  int r = connect(fd, (const struct sockaddr *)a, sem_len(a));
  *immediate_err = r == 0 ? 0 : errno;
  return fd;
}

static uint32_t wait_out(int fd) {
  int ep = (int)SYS(epoll_create1(EPOLL_CLOEXEC));
  struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd};
  SYS(epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev));
  int n;
  do n = epoll_wait(ep, &ev, 1, 5000);
  while (n < 0 && errno == EINTR);
  CHECK(n == 1, "epoll_wait(EPOLLOUT) returned %d", n);
  close(ep);
  return ev.events;
}

static int so_error(int fd) {
  int e = -1;
  socklen_t l = sizeof e;
  SYS(getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &l));
  EXPECT_EQ(l, sizeof e);
  return e;
}

int main(int argc, char **argv) {
  sem_init("nonblock_connect", argc, argv);

  /* (a) listening port */
  struct sockaddr_storage la;
  int l = sem_listener(0, &la);
  int err;
  int fd = start_connect(&la, &err);
  CHECK(err == 0 || err == EINPROGRESS, "connect to listener: %s", strerror(err));
  uint32_t evs = wait_out(fd);
  CHECK(evs & EPOLLOUT, "no EPOLLOUT (events 0x%x)", evs);
  CHECK(!(evs & EPOLLERR), "EPOLLERR on a good connect (events 0x%x)", evs);
  EXPECT_EQ(so_error(fd), 0);
  if (err == EINPROGRESS) {
    /* Linux quirk: the first connect() after an asynchronous completion returns 0 (it is how
     * the socket learns it is connected); only the next one says EISCONN. */
    EXPECT_EQ(connect(fd, (struct sockaddr *)&la, sem_len(&la)), 0);
  }
  EXPECT_ERR(connect(fd, (struct sockaddr *)&la, sem_len(&la)), EISCONN);
  struct sockaddr_storage pa = sem_peer(fd);
  CHECK(sem_addr_eq(&pa, &la), "getpeername %s != listener %s", sem_fmt(&pa), sem_fmt(&la));
  int s = (int)SYS(accept(l, NULL, NULL));
  sem_write_all(fd, "hello", 5);
  char buf[8];
  sem_read_all(s, buf, 5);
  CHECK(!memcmp(buf, "hello", 5), "data differs");
  sem_write_all(s, "world", 5);
  CHECK(sem_poll(fd, POLLIN, 5000) & POLLIN, "reply never readable");
  EXPECT_EQ(read(fd, buf, 8), 5);
  CHECK(!memcmp(buf, "world", 5), "reply differs");
  close(s);
  close(fd);
  close(l);

  /* (b) closed port: bind a socket to get a free port, close it, connect there. */
  int tmp = sem_bound(SOCK_STREAM, 0);
  struct sockaddr_storage ca = sem_local(tmp);
  close(tmp);
  fd = start_connect(&ca, &err);
  if (err == ECONNREFUSED) {
    /* Allowed: refused synchronously. */
  } else {
    EXPECT_EQ(err, EINPROGRESS);
    evs = wait_out(fd);
    CHECK(evs & (EPOLLERR | EPOLLHUP), "refused connect: events 0x%x lack EPOLLERR/EPOLLHUP", evs);
    EXPECT_EQ(so_error(fd), ECONNREFUSED);
    EXPECT_EQ(so_error(fd), 0); /* reading SO_ERROR clears it */
  }
  EXPECT_ERR(getpeername(fd, (struct sockaddr *)&pa, &(socklen_t){sizeof pa}), ENOTCONN);
  close(fd);
  sem_ok();
}
