/* UDP ancillary data: what a receiver asks for with IP_RECVTTL, IP_RECVTOS, IP_PKTINFO (IPv4)
 * or IPV6_RECVHOPLIMIT, IPV6_RECVTCLASS, IPV6_RECVPKTINFO (IPv6) comes with each datagram as
 * a control message carrying the sender's TTL / hop limit and TOS / traffic class — set by
 * socket option or by a control message on sendmsg() (IP_TTL, IP_TOS, IPV6_HOPLIMIT,
 * IPV6_TCLASS) — and the address it was sent to. A control buffer too short for all of them
 * gets those that fit and MSG_CTRUNC. A bad value in a control message is EINVAL. */
#include <stdbool.h>

#include "sem.h"

struct anc {
  int ttl, tos, n;
  struct sockaddr_storage dst;
  int flags;
};

/* recvmsg() with `room` bytes of control buffer; what came, by type. */
static struct anc recv_anc(int fd, size_t room) {
  CHECK(sem_poll(fd, POLLIN, 5000) & POLLIN, "no datagram arrived");
  char buf[64], ctl[512] __attribute__((aligned(8)));
  struct iovec iov = {buf, sizeof buf};
  struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = room};
  struct anc a = {-1, -1, 0, {0}, 0};
  EXPECT_EQ(recvmsg(fd, &mh, 0), 4);
  a.flags = mh.msg_flags;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
    a.n++;
    if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_TTL) memcpy(&a.ttl, CMSG_DATA(c), 4);
    else if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_TOS) a.tos = *CMSG_DATA(c);
    else if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_HOPLIMIT)
      memcpy(&a.ttl, CMSG_DATA(c), 4);
    else if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_TCLASS)
      memcpy(&a.tos, CMSG_DATA(c), 4);
    else if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO) {
      struct in_pktinfo pi;
      memcpy(&pi, CMSG_DATA(c), sizeof pi);
      struct sockaddr_in *s = (struct sockaddr_in *)&a.dst;
      s->sin_family = AF_INET;
      s->sin_addr = pi.ipi_addr;
    } else if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO) {
      struct in6_pktinfo pi;
      memcpy(&pi, CMSG_DATA(c), sizeof pi);
      struct sockaddr_in6 *s = (struct sockaddr_in6 *)&a.dst;
      s->sin6_family = AF_INET6;
      s->sin6_addr = pi.ipi6_addr;
    } else
      sem_fail(__LINE__, "unexpected control message level %d type %d", c->cmsg_level,
               c->cmsg_type);
  }
  return a;
}

/* sendmsg() of "data" to `to` with control messages (level, type, int value) x n. */
static ssize_t send_anc(int fd, const struct sockaddr_storage *to, int n, const int *spec) {
  char ctl[256] __attribute__((aligned(8)));
  memset(ctl, 0, sizeof ctl);
  struct iovec iov = {"data", 4};
  struct msghdr mh = {.msg_name = (void *)to,
                      .msg_namelen = sem_len(to),
                      .msg_iov = &iov,
                      .msg_iovlen = 1,
                      .msg_control = n ? ctl : NULL,
                      .msg_controllen = n ? (size_t)n * CMSG_SPACE(sizeof(int)) : 0};
  struct cmsghdr *c = n ? CMSG_FIRSTHDR(&mh) : NULL;
  for (int i = 0; i < n; i++, c = CMSG_NXTHDR(&mh, c)) {
    c->cmsg_level = spec[3 * i];
    c->cmsg_type = spec[3 * i + 1];
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &spec[3 * i + 2], sizeof(int));
  }
  return sendmsg(fd, &mh, 0);
}

int main(int argc, char **argv) {
  sem_init("udp_ancillary", argc, argv);
  bool v6 = sem_family == AF_INET6;
  int lvl = v6 ? IPPROTO_IPV6 : IPPROTO_IP;
  int ttl_opt = v6 ? IPV6_UNICAST_HOPS : IP_TTL, tos_opt = v6 ? IPV6_TCLASS : IP_TOS;
  int ttl_cmsg = v6 ? IPV6_HOPLIMIT : IP_TTL, tos_cmsg = v6 ? IPV6_TCLASS : IP_TOS;
  int b = sem_bound(SOCK_DGRAM, sem_port(&sem_addr));
  int a = sem_bound(SOCK_DGRAM, 0);
  struct sockaddr_storage ba = sem_local(b);

  /* Nothing asked for: no control messages. */
  EXPECT_EQ(sendto(a, "data", 4, 0, (struct sockaddr *)&ba, sem_len(&ba)), 4);
  struct anc r = recv_anc(b, 512);
  EXPECT_EQ(r.n, 0);
  EXPECT_EQ(r.flags & MSG_CTRUNC, 0);

  /* Asked for: the sender's options show. */
  if (v6) {
    sem_set_int(b, IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1);
    sem_set_int(b, IPPROTO_IPV6, IPV6_RECVTCLASS, 1);
    sem_set_int(b, IPPROTO_IPV6, IPV6_RECVPKTINFO, 1);
    EXPECT_EQ(sem_get_int(b, IPPROTO_IPV6, IPV6_RECVHOPLIMIT), 1);
  } else {
    sem_set_int(b, IPPROTO_IP, IP_RECVTTL, 1);
    sem_set_int(b, IPPROTO_IP, IP_RECVTOS, 1);
    sem_set_int(b, IPPROTO_IP, IP_PKTINFO, 1);
    EXPECT_EQ(sem_get_int(b, IPPROTO_IP, IP_RECVTTL), 1);
  }
  sem_set_int(a, lvl, ttl_opt, 33);
  sem_set_int(a, lvl, tos_opt, 0x20);
  EXPECT_EQ(sendto(a, "data", 4, 0, (struct sockaddr *)&ba, sem_len(&ba)), 4);
  r = recv_anc(b, 512);
  EXPECT_EQ(r.n, 3);
  EXPECT_EQ(r.ttl, 33);
  EXPECT_EQ(r.tos, 0x20);
  CHECK(r.dst.ss_family == sem_family, "no packet info");
  sem_set_port(&r.dst, sem_port(&ba));
  CHECK(sem_addr_eq(&r.dst, &ba), "sent to %s, expected %s", sem_fmt(&r.dst), sem_fmt(&ba));

  /* Control messages on sendmsg() override the options for that datagram only. */
  int spec[] = {lvl, ttl_cmsg, 44, lvl, tos_cmsg, 0x28};
  EXPECT_EQ(send_anc(a, &ba, 2, spec), 4);
  r = recv_anc(b, 512);
  EXPECT_EQ(r.ttl, 44);
  EXPECT_EQ(r.tos, 0x28);
  EXPECT_EQ(send_anc(a, &ba, 0, NULL), 4);
  r = recv_anc(b, 512);
  EXPECT_EQ(r.ttl, 33);
  EXPECT_EQ(r.tos, 0x20);

  /* A control buffer with room for one: that one, and MSG_CTRUNC. */
  EXPECT_EQ(sendto(a, "data", 4, 0, (struct sockaddr *)&ba, sem_len(&ba)), 4);
  r = recv_anc(b, CMSG_SPACE(sizeof(int)));
  EXPECT_EQ(r.n, 1);
  CHECK(r.flags & MSG_CTRUNC, "MSG_CTRUNC not set (flags 0x%x)", r.flags);

  /* Values out of range are refused, and nothing is sent. */
  int bad_ttl[] = {lvl, ttl_cmsg, 256};
  EXPECT_ERR(send_anc(a, &ba, 1, bad_ttl), EINVAL);
  int bad_tos[] = {lvl, tos_cmsg, v6 ? 256 : -2};
  if (v6) EXPECT_ERR(send_anc(a, &ba, 1, bad_tos), EINVAL);
  EXPECT_EQ(sem_poll(b, POLLIN, 200) & POLLIN, 0);
  sem_ok();
}
