/* Socket options and flags as Linux reports them: SO_TYPE/SO_DOMAIN/SO_PROTOCOL,
 * SO_ACCEPTCONN, TCP_NODELAY, SO_KEEPALIVE, SO_REUSEADDR, SO_RCVBUF (doubled on read back),
 * SO_RCVTIMEO (recv fails with EAGAIN after it), getsockname/getpeername agreeing on both
 * ends, SOCK_NONBLOCK|SOCK_CLOEXEC and accept4 flags, FIONREAD, MSG_PEEK, MSG_WAITALL across
 * two writes, MSG_DONTWAIT on an empty socket. */
#include <sys/ioctl.h>

#include "sem.h"

int main(int argc, char **argv) {
  sem_init("sockopts", argc, argv);
  struct sockaddr_storage la;
  int l = sem_listener(0, &la);

  /* Flags on socket(): type options do not show in SO_TYPE. */
  int c = (int)SYS(socket(sem_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  CHECK(SYS(fcntl(c, F_GETFL)) & O_NONBLOCK, "SOCK_NONBLOCK not visible in F_GETFL");
  EXPECT_EQ(SYS(fcntl(c, F_GETFD)), FD_CLOEXEC);
  EXPECT_EQ(sem_get_int(c, SOL_SOCKET, SO_TYPE), SOCK_STREAM);
  EXPECT_EQ(sem_get_int(c, SOL_SOCKET, SO_DOMAIN), sem_family);
  EXPECT_EQ(sem_get_int(c, SOL_SOCKET, SO_PROTOCOL), IPPROTO_TCP);
  EXPECT_EQ(sem_get_int(c, SOL_SOCKET, SO_ACCEPTCONN), 0);
  EXPECT_EQ(sem_get_int(l, SOL_SOCKET, SO_ACCEPTCONN), 1);
  EXPECT_EQ(sem_get_int(l, SOL_SOCKET, SO_REUSEADDR), 1); /* set by sem_bound */
  EXPECT_EQ(sem_get_int(c, SOL_SOCKET, SO_REUSEADDR), 0);
  int r = connect(c, (struct sockaddr *)&la, sem_len(&la));
  CHECK(r == 0 || errno == EINPROGRESS, "connect: %s", strerror(errno));
  CHECK(sem_poll(c, POLLOUT, 5000) & POLLOUT, "connect never completed");
  EXPECT_EQ(sem_get_int(c, SOL_SOCKET, SO_ERROR), 0);
  /* Back to blocking for the rest. */
  SYS(fcntl(c, F_SETFL, SYS(fcntl(c, F_GETFL)) & ~O_NONBLOCK));
  CHECK(!(SYS(fcntl(c, F_GETFL)) & O_NONBLOCK), "O_NONBLOCK did not clear");

  int s = (int)SYS(accept4(l, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC));
  CHECK(SYS(fcntl(s, F_GETFL)) & O_NONBLOCK, "accept4 SOCK_NONBLOCK not honoured");
  EXPECT_EQ(SYS(fcntl(s, F_GETFD)), FD_CLOEXEC);
  EXPECT_EQ(sem_get_int(s, SOL_SOCKET, SO_ACCEPTCONN), 0);
  EXPECT_EQ(sem_get_int(s, SOL_SOCKET, SO_DOMAIN), sem_family);
  EXPECT_EQ(sem_get_int(s, SOL_SOCKET, SO_REUSEADDR), 1); /* inherited from the listener */
  SYS(fcntl(s, F_SETFL, 0));

  /* Addresses agree across the two ends. */
  struct sockaddr_storage cl = sem_local(c), cp = sem_peer(c), sl = sem_local(s), sp = sem_peer(s);
  CHECK(sem_addr_eq(&cl, &sp), "client local %s != server peer %s", sem_fmt(&cl), sem_fmt(&sp));
  CHECK(sem_addr_eq(&cp, &sl), "client peer %s != server local %s", sem_fmt(&cp), sem_fmt(&sl));
  CHECK(sem_addr_eq(&sl, &la), "server local %s != listener %s", sem_fmt(&sl), sem_fmt(&la));
  /* A short buffer: the address is truncated but the full length is reported. */
  struct sockaddr_storage tiny;
  socklen_t tlen = 4;
  SYS(getsockname(c, (struct sockaddr *)&tiny, &tlen));
  EXPECT_EQ(tlen, sem_len(&cl));

  /* Boolean options read back as 1 (any nonzero set value), and 0 after clearing. */
  EXPECT_EQ(sem_get_int(c, IPPROTO_TCP, TCP_NODELAY), 0);
  sem_set_int(c, IPPROTO_TCP, TCP_NODELAY, 1);
  EXPECT_EQ(sem_get_int(c, IPPROTO_TCP, TCP_NODELAY), 1);
  sem_set_int(c, IPPROTO_TCP, TCP_NODELAY, 0);
  EXPECT_EQ(sem_get_int(c, IPPROTO_TCP, TCP_NODELAY), 0);
  EXPECT_EQ(sem_get_int(c, SOL_SOCKET, SO_KEEPALIVE), 0);
  sem_set_int(c, SOL_SOCKET, SO_KEEPALIVE, 5);
  EXPECT_EQ(sem_get_int(c, SOL_SOCKET, SO_KEEPALIVE), 1);
  sem_set_int(c, SOL_SOCKET, SO_REUSEADDR, 1);
  EXPECT_EQ(sem_get_int(c, SOL_SOCKET, SO_REUSEADDR), 1);
  /* SO_RCVBUF: the kernel doubles the value for bookkeeping and reports the double. */
  sem_set_int(c, SOL_SOCKET, SO_RCVBUF, 65536);
  EXPECT_EQ(sem_get_int(c, SOL_SOCKET, SO_RCVBUF), 131072);
  /* Unknown option and bad level. */
  int v;
  socklen_t vl = sizeof v;
  EXPECT_ERR(getsockopt(c, SOL_SOCKET, 0x7fff, &v, &vl), ENOPROTOOPT);

  /* MSG_DONTWAIT on an empty blocking socket. */
  char buf[64];
  EXPECT_ERR(recv(c, buf, sizeof buf, MSG_DONTWAIT), EAGAIN);

  /* SO_RCVTIMEO: a blocking recv gives up with EAGAIN after the timeout. */
  struct timeval tv = {.tv_sec = 0, .tv_usec = 200000}, tvg;
  SYS(setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv));
  socklen_t tvl = sizeof tvg;
  SYS(getsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tvg, &tvl));
  EXPECT_EQ(tvg.tv_sec * 1000000 + tvg.tv_usec, 200000);
  double t0 = sem_now();
  EXPECT_ERR(recv(c, buf, sizeof buf, 0), EAGAIN);
  double dt = sem_now() - t0;
  CHECK(dt >= 0.15 && dt < 3.0, "SO_RCVTIMEO 200ms waited %.3fs", dt);

  /* FIONREAD and MSG_PEEK on pending bytes. */
  sem_write_all(s, "0123456789", 10);
  CHECK(sem_poll(c, POLLIN, 5000) & POLLIN, "bytes never arrived");
  int avail = -1;
  SYS(ioctl(c, FIONREAD, &avail));
  EXPECT_EQ(avail, 10);
  EXPECT_EQ(recv(c, buf, 4, MSG_PEEK), 4);
  CHECK(!memcmp(buf, "0123", 4), "MSG_PEEK data differs");
  SYS(ioctl(c, FIONREAD, &avail));
  EXPECT_EQ(avail, 10);
  EXPECT_EQ(recv(c, buf, sizeof buf, 0), 10);
  CHECK(!memcmp(buf, "0123456789", 10), "data differs");
  SYS(ioctl(c, FIONREAD, &avail));
  EXPECT_EQ(avail, 0);

  /* MSG_WAITALL collects two writes 300 ms apart into one recv. */
  tv.tv_sec = 0;
  tv.tv_usec = 0;
  SYS(setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv));
  pid_t pid = sem_fork();
  if (pid == 0) {
    sem_write_all(s, "first", 5);
    usleep(300000);
    sem_write_all(s, "second", 6);
    _exit(0);
  }
  EXPECT_EQ(recv(c, buf, 11, MSG_WAITALL), 11);
  CHECK(!memcmp(buf, "firstsecond", 11), "MSG_WAITALL data differs");
  sem_wait_child(pid);
  close(s);
  close(c);
  close(l);
  sem_ok();
}
