/* connect() again on a TCP socket whose connect failed: Linux lets the same socket try again
 * (programs that wait for a server to come up loop on one socket).
 *  (a) a blocking connect refused, then connect() to a listener: 0, and bytes flow;
 *  (b) a non-blocking connect refused and its error taken with SO_ERROR: the next connect()
 *      ends that attempt with ECONNABORTED, the one after starts afresh (EINPROGRESS or 0),
 *      the socket connects, keeps O_NONBLOCK, and bytes flow;
 *  (c) the same with the error not taken: the next connect() reports it (ECONNREFUSED);
 *  (d) options set before the failed attempt still hold on the socket that connects. */
#include <fcntl.h>

#include "sem.h"

/* An address nothing listens on: a port bound, then closed. */
static struct sockaddr_storage closed_port(void) {
  int tmp = sem_bound(SOCK_STREAM, 0);
  struct sockaddr_storage a = sem_local(tmp);
  close(tmp);
  return a;
}

static int connect_to(int fd, const struct sockaddr_storage *a) {
  return connect(fd, (const struct sockaddr *)a, sem_len(a));
}

/* Waits for a non-blocking connect to a closed port to fail: writable and hung up. Linux
 * shows POLLOUT|POLLERR|POLLHUP at once; NetKernel's proxy shows POLLOUT and POLLHUP, which
 * may arrive a moment apart, without POLLERR (docs/architecture.md). */
static void refused_wait(int fd) {
  int ev = 0;
  for (double end = sem_now() + 5; sem_now() < end;) {
    ev = sem_poll(fd, POLLOUT, 5000);
    if ((ev & POLLOUT) && (ev & (POLLERR | POLLHUP))) return;
  }
  CHECK(0, "failed connect never writable and hung up (revents 0x%x)", ev);
}

/* A non-blocking connect to a closed port, waited for until it has failed. */
static void refused_nonblocking(int fd, const struct sockaddr_storage *closed) {
  int r = connect_to(fd, closed);
  if (r < 0 && errno == ECONNREFUSED) return; /* failed at once */
  CHECK(r < 0 && errno == EINPROGRESS, "connect to a closed port: %d %s", r, strerror(errno));
  refused_wait(fd);
}

/* Finish a connect to the listener that began with r (0 or EINPROGRESS), check the peer
 * address, and move bytes both ways through the accepted socket. */
static void finish_and_talk(int fd, int l, int r, const struct sockaddr_storage *la) {
  if (r < 0) {
    CHECK(errno == EINPROGRESS, "connect to the listener: %s", strerror(errno));
    CHECK(sem_poll(fd, POLLOUT, 5000) & POLLOUT, "connect never completed");
    EXPECT_EQ(sem_get_int(fd, SOL_SOCKET, SO_ERROR), 0);
  }
  struct sockaddr_storage pa = sem_peer(fd);
  CHECK(sem_addr_eq(&pa, la), "getpeername %s != listener %s", sem_fmt(&pa), sem_fmt(la));
  int s = (int)SYS(accept(l, NULL, NULL));
  sem_write_all(fd, "again", 5);
  char buf[8];
  sem_read_all(s, buf, 5);
  CHECK(!memcmp(buf, "again", 5), "server read '%.5s'", buf);
  sem_write_all(s, "back", 4);
  CHECK(sem_poll(fd, POLLIN, 5000) & POLLIN, "reply never arrived");
  sem_read_all(fd, buf, 4);
  CHECK(!memcmp(buf, "back", 4), "client read '%.4s'", buf);
  close(s);
}

int main(int argc, char **argv) {
  sem_init("connect_again", argc, argv);
  struct sockaddr_storage la;
  int l = sem_listener(0, &la);
  struct sockaddr_storage closed = closed_port();
  int fam = la.ss_family;

  /* (a) blocking */
  int fd = (int)SYS(socket(fam, SOCK_STREAM, 0));
  EXPECT_ERR(connect_to(fd, &closed), ECONNREFUSED);
  EXPECT_ERR(send(fd, "x", 1, MSG_NOSIGNAL), EPIPE);
  EXPECT_EQ(connect_to(fd, &la), 0);
  finish_and_talk(fd, l, 0, &la);
  EXPECT_ERR(connect_to(fd, &la), EISCONN);
  close(fd);

  /* (b) non-blocking, error taken */
  fd = (int)SYS(socket(fam, SOCK_STREAM | SOCK_NONBLOCK, 0));
  refused_nonblocking(fd, &closed);
  int taken = sem_get_int(fd, SOL_SOCKET, SO_ERROR);
  if (taken) { /* it failed asynchronously: Linux ends the attempt on the next connect() */
    EXPECT_EQ(taken, ECONNREFUSED);
    EXPECT_ERR(connect_to(fd, &la), ECONNABORTED);
  }
  int r = connect_to(fd, &la);
  finish_and_talk(fd, l, r, &la);
  CHECK(fcntl(fd, F_GETFL) & O_NONBLOCK, "O_NONBLOCK lost on connecting again");
  close(fd);

  /* (c) non-blocking, error not taken */
  fd = (int)SYS(socket(fam, SOCK_STREAM | SOCK_NONBLOCK, 0));
  r = connect_to(fd, &closed);
  if (r < 0 && errno == EINPROGRESS) {
    refused_wait(fd);
    EXPECT_ERR(connect_to(fd, &la), ECONNREFUSED);
    EXPECT_EQ(sem_get_int(fd, SOL_SOCKET, SO_ERROR), 0); /* the connect took it */
  } else {
    CHECK(r < 0 && errno == ECONNREFUSED, "connect to a closed port: %s", strerror(errno));
  }
  r = connect_to(fd, &la);
  finish_and_talk(fd, l, r, &la);
  close(fd);

  /* (d) an option set before the failed attempt, read back after the new connection */
  fd = (int)SYS(socket(fam, SOCK_STREAM, 0));
  sem_set_int(fd, IPPROTO_TCP, TCP_NODELAY, 1);
  EXPECT_ERR(connect_to(fd, &closed), ECONNREFUSED);
  EXPECT_EQ(connect_to(fd, &la), 0);
  CHECK(sem_get_int(fd, IPPROTO_TCP, TCP_NODELAY) != 0, "TCP_NODELAY lost on connecting again");
  finish_and_talk(fd, l, 0, &la);
  close(fd);

  close(l);
  sem_ok();
}
