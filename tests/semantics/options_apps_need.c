/* Options whose absence broke real applications on other stacks (gVisor, TAS): each is set
 * and read back as Linux does. SO_REUSEPORT lets two listeners share a port and both take
 * connections; TCP_SYNCNT, TCP_KEEPIDLE/INTVL/CNT, TCP_USER_TIMEOUT, IP_MTU_DISCOVER (or
 * IPV6_MTU_DISCOVER), IP_TOS (or IPV6_TCLASS) and SO_LINGER keep their values; SO_SNDBUF
 * reads back doubled; a v6 socket starts with IPV6_V6ONLY off; an option nobody knows is
 * ENOPROTOOPT. */
#include <netinet/tcp.h>

#include "sem.h"

/* Both listeners on one port with SO_REUSEPORT; connect until each has accepted one (the
 * kernel spreads connections by a hash of the 4-tuple, so a few tries suffice). */
static void reuseport(void) {
  int a = (int)SYS(socket(sem_family, SOCK_STREAM, 0));
  int b = (int)SYS(socket(sem_family, SOCK_STREAM, 0));
  sem_set_int(a, SOL_SOCKET, SO_REUSEPORT, 1);
  sem_set_int(b, SOL_SOCKET, SO_REUSEPORT, 1);
  EXPECT_EQ(sem_get_int(b, SOL_SOCKET, SO_REUSEPORT), 1);
  struct sockaddr_storage addr = sem_addr;
  SYS(bind(a, (struct sockaddr *)&addr, sem_len(&addr)));
  addr = sem_local(a);
  SYS(bind(b, (struct sockaddr *)&addr, sem_len(&addr)));
  SYS(listen(a, 64));
  SYS(listen(b, 64));
  int got[2] = {0, 0}, clients[64], n = 0;
  while (n < 64 && !(got[0] && got[1])) {
    clients[n++] = sem_connect(&addr);
    struct pollfd pf[2] = {{.fd = a, .events = POLLIN}, {.fd = b, .events = POLLIN}};
    CHECK(poll(pf, 2, 5000) > 0, "connection %d reached neither listener", n);
    for (int i = 0; i < 2; i++)
      if (pf[i].revents & POLLIN) {
        close((int)SYS(accept(pf[i].fd, NULL, NULL)));
        got[i]++;
      }
  }
  CHECK(got[0] && got[1], "after %d connections: %d accepted by one listener, %d by the other", n,
        got[0], got[1]);
  for (int i = 0; i < n; i++) close(clients[i]);
  close(a);
  close(b);

  /* Without SO_REUSEPORT on the second socket the port is taken. */
  int c = (int)SYS(socket(sem_family, SOCK_STREAM, 0));
  int d = (int)SYS(socket(sem_family, SOCK_STREAM, 0));
  sem_set_int(c, SOL_SOCKET, SO_REUSEPORT, 1);
  addr = sem_addr;
  SYS(bind(c, (struct sockaddr *)&addr, sem_len(&addr)));
  addr = sem_local(c);
  SYS(listen(c, 8));
  EXPECT_ERR(bind(d, (struct sockaddr *)&addr, sem_len(&addr)), EADDRINUSE);
  close(c);
  close(d);
}

int main(int argc, char **argv) {
  sem_init("options_apps_need", argc, argv);
  reuseport();

  int cli, srv;
  sem_pair(&cli, &srv);
  sem_set_int(cli, IPPROTO_TCP, TCP_SYNCNT, 3);
  EXPECT_EQ(sem_get_int(cli, IPPROTO_TCP, TCP_SYNCNT), 3);
  sem_set_int(cli, IPPROTO_TCP, TCP_KEEPIDLE, 30);
  sem_set_int(cli, IPPROTO_TCP, TCP_KEEPINTVL, 7);
  sem_set_int(cli, IPPROTO_TCP, TCP_KEEPCNT, 4);
  EXPECT_EQ(sem_get_int(cli, IPPROTO_TCP, TCP_KEEPIDLE), 30);
  EXPECT_EQ(sem_get_int(cli, IPPROTO_TCP, TCP_KEEPINTVL), 7);
  EXPECT_EQ(sem_get_int(cli, IPPROTO_TCP, TCP_KEEPCNT), 4);
  sem_set_int(cli, IPPROTO_TCP, TCP_USER_TIMEOUT, 5000);
  EXPECT_EQ(sem_get_int(cli, IPPROTO_TCP, TCP_USER_TIMEOUT), 5000);
  if (sem_family == AF_INET) {
    sem_set_int(cli, IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO);
    EXPECT_EQ(sem_get_int(cli, IPPROTO_IP, IP_MTU_DISCOVER), IP_PMTUDISC_DO);
    sem_set_int(cli, IPPROTO_IP, IP_TOS, 0x10);
    EXPECT_EQ(sem_get_int(cli, IPPROTO_IP, IP_TOS), 0x10);
  } else {
    sem_set_int(cli, IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO);
    EXPECT_EQ(sem_get_int(cli, IPPROTO_IPV6, IPV6_MTU_DISCOVER), IPV6_PMTUDISC_DO);
    sem_set_int(cli, IPPROTO_IPV6, IPV6_TCLASS, 0x10);
    EXPECT_EQ(sem_get_int(cli, IPPROTO_IPV6, IPV6_TCLASS), 0x10);
    int v6 = (int)SYS(socket(AF_INET6, SOCK_STREAM, 0));
    EXPECT_EQ(sem_get_int(v6, IPPROTO_IPV6, IPV6_V6ONLY), 0);
    close(v6);
  }
  struct linger lg = {.l_onoff = 1, .l_linger = 3}, back = {0, 0};
  socklen_t ll = sizeof back;
  SYS(setsockopt(srv, SOL_SOCKET, SO_LINGER, &lg, sizeof lg));
  SYS(getsockopt(srv, SOL_SOCKET, SO_LINGER, &back, &ll));
  EXPECT_EQ(back.l_onoff, 1);
  EXPECT_EQ(back.l_linger, 3);
  sem_set_int(srv, SOL_SOCKET, SO_SNDBUF, 65536);
  EXPECT_EQ(sem_get_int(srv, SOL_SOCKET, SO_SNDBUF), 131072);

  int v = 1;
  EXPECT_ERR(setsockopt(cli, SOL_SOCKET, 9999, &v, sizeof v), ENOPROTOOPT);
  socklen_t vl = sizeof v;
  EXPECT_ERR(getsockopt(cli, SOL_SOCKET, 9999, &v, &vl), ENOPROTOOPT);

  /* The connection still carries data after all that. */
  char buf[4];
  sem_write_all(cli, "ping", 4);
  sem_read_all(srv, buf, 4);
  CHECK(!memcmp(buf, "ping", 4), "data differs");
  close(cli);
  close(srv);
  sem_ok();
}
