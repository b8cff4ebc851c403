/* sendto()/sendmsg() with an address on a connected TCP socket: Linux ignores the address
 * (here a TEST-NET one that routes nowhere) and the data reaches the connected peer. On an
 * unconnected TCP socket the same call fails with EPIPE.
 * Regression named after the bug: socket_wrapper and gVisor broke sockperf on this. */
#include "sem.h"

int main(int argc, char **argv) {
  sem_init("sendto_connected_tcp", argc, argv);
  int cli, srv;
  sem_pair(&cli, &srv);

  struct sockaddr_storage bogus;
  memset(&bogus, 0, sizeof bogus);
  bogus.ss_family = (sa_family_t)sem_family;
  if (sem_family == AF_INET)
    inet_pton(AF_INET, "192.0.2.1", &((struct sockaddr_in *)&bogus)->sin_addr);
  else inet_pton(AF_INET6, "2001:db8::1", &((struct sockaddr_in6 *)&bogus)->sin6_addr);
  sem_set_port(&bogus, 9);

  char buf[32];
  EXPECT_EQ(sendto(cli, "bogus-addr", 10, 0, (struct sockaddr *)&bogus, sem_len(&bogus)), 10);
  sem_read_all(srv, buf, 10);
  CHECK(!memcmp(buf, "bogus-addr", 10), "data differs");

  /* The peer's address given explicitly is ignored the same way. */
  struct sockaddr_storage pa = sem_peer(cli);
  EXPECT_EQ(sendto(cli, "peer-addr", 9, 0, (struct sockaddr *)&pa, sem_len(&pa)), 9);
  sem_read_all(srv, buf, 9);
  CHECK(!memcmp(buf, "peer-addr", 9), "data differs");

  /* sendmsg with msg_name set. */
  struct iovec iov = {.iov_base = "msg-name", .iov_len = 8};
  struct msghdr mh = {
      .msg_name = &bogus, .msg_namelen = sem_len(&bogus), .msg_iov = &iov, .msg_iovlen = 1};
  EXPECT_EQ(sendmsg(cli, &mh, 0), 8);
  sem_read_all(srv, buf, 8);
  CHECK(!memcmp(buf, "msg-name", 8), "data differs");

  /* The accepted side too. */
  EXPECT_EQ(sendto(srv, "reply", 5, 0, (struct sockaddr *)&bogus, sem_len(&bogus)), 5);
  sem_read_all(cli, buf, 5);
  CHECK(!memcmp(buf, "reply", 5), "reply differs");

  /* The connection itself is untouched: the peer is still the listener's address. */
  struct sockaddr_storage pb = sem_peer(cli);
  CHECK(sem_addr_eq(&pa, &pb), "peer changed from %s to %s", sem_fmt(&pa), sem_fmt(&pb));

  /* Unconnected TCP: sendto with an address does not connect; it fails with EPIPE. */
  int u = (int)SYS(socket(sem_family, SOCK_STREAM, 0));
  EXPECT_ERR(sendto(u, "x", 1, MSG_NOSIGNAL, (struct sockaddr *)&pa, sem_len(&pa)), EPIPE);
  close(u);
  sem_ok();
}
