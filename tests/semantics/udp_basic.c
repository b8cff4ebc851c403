/* UDP: unconnected sendto/recvfrom with the right source address, connected send/recv,
 * datagram boundaries kept (including a zero-length datagram and truncation with MSG_TRUNC),
 * MSG_PEEK, FIONREAD = size of the next datagram, a connected socket ignoring other senders,
 * and ECONNREFUSED reported on a connected socket after sending to a closed port. */
#include <sys/ioctl.h>

#include "sem.h"

static ssize_t recv_wait(int fd, void *buf, size_t len, int flags) {
  CHECK(sem_poll(fd, POLLIN, 5000) & POLLIN, "no datagram arrived");
  return recv(fd, buf, len, flags);
}

int main(int argc, char **argv) {
  sem_init("udp_basic", argc, argv);
  int a = sem_bound(SOCK_DGRAM, sem_port(&sem_addr));
  int b = sem_bound(SOCK_DGRAM, 0);
  struct sockaddr_storage aa = sem_local(a), ba = sem_local(b);
  int type = 0;
  socklen_t tl = sizeof type;
  SYS(getsockopt(a, SOL_SOCKET, SO_TYPE, &type, &tl));
  EXPECT_EQ(type, SOCK_DGRAM);
  char buf[4096];

  /* Unconnected: recvfrom reports the sender's bound address. */
  EXPECT_EQ(sendto(a, "hello", 5, 0, (struct sockaddr *)&ba, sem_len(&ba)), 5);
  struct sockaddr_storage from;
  socklen_t fl = sizeof from;
  CHECK(sem_poll(b, POLLIN, 5000) & POLLIN, "datagram never arrived");
  EXPECT_EQ(recvfrom(b, buf, sizeof buf, 0, (struct sockaddr *)&from, &fl), 5);
  CHECK(!memcmp(buf, "hello", 5), "payload differs");
  EXPECT_EQ(fl, sem_len(&aa));
  CHECK(sem_addr_eq(&from, &aa), "source %s, expected %s", sem_fmt(&from), sem_fmt(&aa));
  /* Unconnected send without an address has no destination. */
  EXPECT_ERR(send(a, "x", 1, 0), EDESTADDRREQ);
  EXPECT_ERR(getpeername(a, (struct sockaddr *)&from, &fl), ENOTCONN);

  /* Boundaries: three datagrams come back as three, zero-length included. */
  static char big[2000];
  memset(big, 'B', sizeof big);
  EXPECT_EQ(sendto(a, "1234567890", 10, 0, (struct sockaddr *)&ba, sem_len(&ba)), 10);
  EXPECT_EQ(sendto(a, "", 0, 0, (struct sockaddr *)&ba, sem_len(&ba)), 0);
  EXPECT_EQ(sendto(a, big, sizeof big, 0, (struct sockaddr *)&ba, sem_len(&ba)), (long)sizeof big);
  EXPECT_EQ(sendto(a, "tail", 4, 0, (struct sockaddr *)&ba, sem_len(&ba)), 4);
  /* FIONREAD is the size of the next datagram, not the queue total. */
  CHECK(sem_poll(b, POLLIN, 5000) & POLLIN, "no datagram");
  int avail = -1;
  SYS(ioctl(b, FIONREAD, &avail));
  EXPECT_EQ(avail, 10);
  /* MSG_PEEK does not consume. */
  EXPECT_EQ(recv(b, buf, sizeof buf, MSG_PEEK), 10);
  EXPECT_EQ(recv(b, buf, 4, MSG_PEEK), 4);
  EXPECT_EQ(recv(b, buf, sizeof buf, 0), 10);
  CHECK(!memcmp(buf, "1234567890", 10), "payload differs");
  EXPECT_EQ(recv_wait(b, buf, sizeof buf, 0), 0); /* the empty datagram */
  SYS(ioctl(b, FIONREAD, &avail));
  EXPECT_EQ(avail, (long)sizeof big);
  /* A short buffer truncates and drops the rest of that datagram; MSG_TRUNC gives its
   * real length, and recvmsg flags it. */
  EXPECT_EQ(recv(b, buf, 100, MSG_TRUNC | MSG_PEEK), (long)sizeof big);
  struct iovec iov = {.iov_base = buf, .iov_len = 100};
  struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
  EXPECT_EQ(recvmsg(b, &mh, 0), 100);
  CHECK(mh.msg_flags & MSG_TRUNC, "recvmsg did not flag MSG_TRUNC (flags 0x%x)", mh.msg_flags);
  EXPECT_EQ(recv_wait(b, buf, sizeof buf, 0), 4);
  CHECK(!memcmp(buf, "tail", 4), "datagram after the truncated one differs");
  EXPECT_ERR(recv(b, buf, sizeof buf, MSG_DONTWAIT), EAGAIN);

  /* Connected UDP, both ways. */
  SYS(connect(a, (struct sockaddr *)&ba, sem_len(&ba)));
  SYS(connect(b, (struct sockaddr *)&aa, sem_len(&aa)));
  struct sockaddr_storage pa = sem_peer(a);
  CHECK(sem_addr_eq(&pa, &ba), "getpeername %s, expected %s", sem_fmt(&pa), sem_fmt(&ba));
  EXPECT_EQ(send(a, "ping", 4, 0), 4);
  EXPECT_EQ(recv_wait(b, buf, sizeof buf, 0), 4);
  CHECK(!memcmp(buf, "ping", 4), "payload differs");
  EXPECT_EQ(send(b, "pong", 4, 0), 4);
  EXPECT_EQ(read(a, buf, sizeof buf), 4);
  CHECK(!memcmp(buf, "pong", 4), "payload differs");

  /* A connected socket drops datagrams from anyone but its peer. */
  int c = sem_bound(SOCK_DGRAM, 0);
  EXPECT_EQ(sendto(c, "stranger", 8, 0, (struct sockaddr *)&aa, sem_len(&aa)), 8);
  EXPECT_EQ(send(b, "friend", 6, 0), 6);
  EXPECT_EQ(recv_wait(a, buf, sizeof buf, 0), 6);
  CHECK(!memcmp(buf, "friend", 6), "connected socket received '%.6s'", buf);
  EXPECT_EQ(sem_poll(a, POLLIN, 100) & POLLIN, 0);

  /* Connected to a closed port: the ICMP unreachable surfaces as ECONNREFUSED. */
  int tmp = sem_bound(SOCK_DGRAM, 0);
  struct sockaddr_storage closed = sem_local(tmp);
  close(tmp);
  SYS(connect(c, (struct sockaddr *)&closed, sem_len(&closed)));
  EXPECT_EQ(send(c, "void", 4, 0), 4);
  CHECK(sem_poll(c, POLLIN, 5000) & POLLERR, "no POLLERR after sending to a closed port");
  EXPECT_ERR(recv(c, buf, sizeof buf, MSG_DONTWAIT), ECONNREFUSED);
  EXPECT_ERR(recv(c, buf, sizeof buf, MSG_DONTWAIT), EAGAIN); /* reported once */
  close(a);
  close(b);
  close(c);
  sem_ok();
}
