/* dup2/dup3 with sockets: dup2 onto a free fd number and onto an fd holding another
 * connected socket (which that closes: its peer sees EOF), dup2(fd, fd) returns fd without
 * closing it, dup3(fd, fd) is EINVAL, dup3(O_CLOEXEC) sets FD_CLOEXEC; data sent through the
 * dup reaches the peer, and the dup keeps working after the original is closed.
 * Regression named after the bug: "dup2 onto itself" closed the socket in interposers. */
#include "sem.h"

int main(int argc, char **argv) {
  sem_init("dup2_onto_socket", argc, argv);
  int cli, srv, cli2, srv2;
  sem_pair(&cli, &srv);
  sem_pair(&cli2, &srv2);
  char buf[64];

  /* dup2(fd, fd): returns fd, and fd stays open and usable. */
  EXPECT_EQ(dup2(cli, cli), cli);
  EXPECT_EQ(fcntl(cli, F_GETFD) >= 0, 1);
  sem_write_all(cli, "self", 4);
  sem_read_all(srv, buf, 4);
  CHECK(!memcmp(buf, "self", 4), "data after dup2(fd, fd) differs");

  /* dup3(fd, fd, 0) is EINVAL (unlike dup2), and closes nothing. */
  EXPECT_ERR(dup3(cli, cli, 0), EINVAL);
  EXPECT_EQ(fcntl(cli, F_GETFD) >= 0, 1);

  /* dup2 onto an unused high fd number. */
  int hi = 100;
  close(hi);
  EXPECT_EQ(dup2(cli, hi), hi);
  EXPECT_EQ(fcntl(hi, F_GETFD), 0); /* dup2 never copies FD_CLOEXEC */
  int type = 0;
  socklen_t tl = sizeof type;
  SYS(getsockopt(hi, SOL_SOCKET, SO_TYPE, &type, &tl));
  EXPECT_EQ(type, SOCK_STREAM);
  struct sockaddr_storage a1 = sem_local(cli), a2 = sem_local(hi);
  CHECK(sem_addr_eq(&a1, &a2), "getsockname of dup %s != original %s", sem_fmt(&a2), sem_fmt(&a1));
  sem_write_all(hi, "via-dup", 7);
  sem_read_all(srv, buf, 7);
  CHECK(!memcmp(buf, "via-dup", 7), "data via dup differs");

  /* dup2 onto an fd that holds another connected socket: that socket is closed first, so its
   * peer (srv2) sees EOF, and the fd number now means the first connection. */
  int target = cli2;
  EXPECT_EQ(dup2(cli, target), target);
  CHECK(sem_poll(srv2, POLLIN, 5000) & POLLIN, "peer of the replaced socket saw no EOF");
  EXPECT_EQ(read(srv2, buf, sizeof buf), 0);
  sem_write_all(target, "over", 4);
  sem_read_all(srv, buf, 4);
  CHECK(!memcmp(buf, "over", 4), "data via dup2-onto-socket differs");

  /* dup3 with O_CLOEXEC. */
  int ce = 101;
  close(ce);
  EXPECT_EQ(dup3(cli, ce, O_CLOEXEC), ce);
  EXPECT_EQ(fcntl(ce, F_GETFD), FD_CLOEXEC);

  /* Close the original: the dups keep the connection alive, both directions. */
  SYS(close(cli));
  EXPECT_ERR(fcntl(cli, F_GETFD), EBADF);
  sem_write_all(hi, "after-close", 11);
  sem_read_all(srv, buf, 11);
  CHECK(!memcmp(buf, "after-close", 11), "data after closing original differs");
  sem_write_all(srv, "back", 4);
  sem_read_all(target, buf, 4);
  CHECK(!memcmp(buf, "back", 4), "reply via dup differs");
  /* The peer sees EOF only when the last dup is gone. */
  SYS(close(hi));
  SYS(close(ce));
  EXPECT_EQ(sem_poll(srv, POLLIN, 100) & POLLIN, 0);
  SYS(close(target));
  CHECK(sem_poll(srv, POLLIN, 5000) & POLLIN, "no EOF after the last dup closed");
  EXPECT_EQ(read(srv, buf, sizeof buf), 0);
  sem_ok();
}
