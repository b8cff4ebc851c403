/* Abortive close: SO_LINGER {1, 0} then close() sends a RST, so the peer's recv fails with
 * ECONNRESET, then reads EOF, and its send fails with EPIPE. Also closing a socket that
 * still has unread received data resets the connection (RFC 2525), with no SO_LINGER. */
#include "sem.h"

static void expect_reset(int fd) {
  char buf[16];
  /* Blocking recv: waits for the RST (the watchdog bounds it). */
  EXPECT_ERR(recv(fd, buf, sizeof buf, 0), ECONNRESET);
  EXPECT_EQ(recv(fd, buf, sizeof buf, 0), 0);
  EXPECT_ERR(send(fd, "x", 1, MSG_NOSIGNAL), EPIPE);
}

int main(int argc, char **argv) {
  sem_init("linger_zero_reset", argc, argv);
  int cli, srv;

  /* (a) SO_LINGER zero on the accepted side. */
  sem_pair(&cli, &srv);
  struct linger lg = {.l_onoff = 1, .l_linger = 0}, got;
  SYS(setsockopt(srv, SOL_SOCKET, SO_LINGER, &lg, sizeof lg));
  socklen_t gl = sizeof got;
  SYS(getsockopt(srv, SOL_SOCKET, SO_LINGER, &got, &gl));
  CHECK(got.l_onoff && got.l_linger == 0, "SO_LINGER read back {%d, %d}", got.l_onoff,
        got.l_linger);
  SYS(close(srv));
  expect_reset(cli);
  close(cli);

  /* (b) SO_LINGER zero on the connecting side: the accepted side sees the reset. */
  sem_pair(&cli, &srv);
  SYS(setsockopt(cli, SOL_SOCKET, SO_LINGER, &lg, sizeof lg));
  SYS(close(cli));
  expect_reset(srv);
  close(srv);

  /* (c) close with unread data: RST instead of FIN. */
  sem_pair(&cli, &srv);
  sem_write_all(cli, "unread", 6);
  CHECK(sem_poll(srv, POLLIN, 5000) & POLLIN, "data never arrived");
  SYS(close(srv));
  expect_reset(cli);
  close(cli);
  sem_ok();
}
