/* The relay's UDP half: datagrams of programs GuestLib does not reach.
 *
 * The tenant's namespace sends every datagram to an address other than loopback or the
 * tenant's own to the relay by TPROXY (relay.py): it arrives on a transparent socket the
 * daemon made (IP_TRANSPARENT needs privilege the relay lacks), with its original
 * destination (IP_ORIGDSTADDR). Per program port there is one NetKernel socket bound to the
 * tenant's address and that port, so peers see the program's own source port; per
 * (program port, peer) a "flow": a kernel socket bound to the peer's address and port
 * (IP_FREEBIND: every address is local here) and connected to the program. Through it the
 * relay hands the program what the peer sends, from the peer's address; and the program's
 * next datagrams to that peer reach it directly (TPROXY leaves packets of a connected
 * socket that is not transparent to normal delivery). Unconnected sockets a program binds
 * on its own addresses (servers) are found by the scan, and get their NetKernel socket
 * before anything is sent to them.
 *
 * Flows last while used (UDP has no end): one idle for FLOW_IDLE_MS goes, as a NAT's
 * mapping would; the program's socket is not affected. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "relay.h"

#define FLOW_IDLE_MS 60000
#define PORT_IDLE_MS 60000
#define MAX_FLOWS    8192
#define MAX_PORTS    4096
#define DGRAM_MAX    65536

#ifndef IP_ORIGDSTADDR
#define IP_ORIGDSTADDR 20
#endif
#ifndef IPV6_ORIGDSTADDR
#define IPV6_ORIGDSTADDR 74
#endif

struct uport {    /* a program's port, and its NetKernel socket */
  enum kind kind; /* K_UDP_PORT */
  int family;
  uint16_t port;
  int nkfd;
  bool seen;      /* a program's unconnected socket holds it (last scan) */
  long last_used; /* ms */
  unsigned flows;
  struct uport *next;
};

struct uflow {
  enum kind kind; /* K_UDP_FLOW */
  struct uport *up;
  struct sockaddr_storage peer; /* as NetKernel sees it */
  int kfd;                      /* bound to peer, connected to the program */
  long last_used;
  struct uflow *next;
};

static struct {
  enum kind kind; /* K_UDP_TPROXY */
  int fd;
} tproxy[2] = {{K_UDP_TPROXY, -1}, {K_UDP_TPROXY, -1}};
static struct uport *ports;
static struct uflow *flows;
static unsigned n_ports, n_flows;
static char dgram[DGRAM_MAX];

static void watch(int fd, void *tag) {
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = tag};
  epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

void udp_init(int tproxy4, int tproxy6) {
  tproxy[0].fd = tproxy4;
  tproxy[1].fd = tproxy6;
  for (int i = 0; i < 2; i++)
    if (tproxy[i].fd >= 0) watch(tproxy[i].fd, &tproxy[i]);
  if (tproxy4 < 0 && tproxy6 < 0) say("no transparent UDP socket given: UDP is not relayed");
}

static const struct sockaddr_storage *own_address(int family) {
  return family == AF_INET6 ? &tenant6 : &tenant4;
}

/* Ports whose NetKernel socket could not be made, so that the log says so once, not at every
 * scan that finds the program's socket again. */
#define SAID_MAX 64
static struct {
  int family;
  uint16_t port;
} said[SAID_MAX];
static unsigned said_next;

static bool said_before(int family, uint16_t port, bool remember) {
  for (unsigned i = 0; i < SAID_MAX; i++)
    if (said[i].family == family && said[i].port == port) return true;
  if (remember) {
    said[said_next % SAID_MAX].family = family;
    said[said_next % SAID_MAX].port = port;
    said_next++;
  }
  return false;
}

static struct uport *port_get(int family, uint16_t port, bool create) {
  for (struct uport *u = ports; u; u = u->next)
    if (u->family == family && u->port == port) return u;
  if (!create || n_ports >= MAX_PORTS || !own_address(family)->ss_family) return NULL;
  struct sockaddr_storage ss = *own_address(family);
  set_port(&ss, port);
  int fd = socket(family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0); /* NetKernel's */
  if (fd < 0 || bind(fd, (struct sockaddr *)&ss, sa_len(&ss)) < 0) {
    int e = errno;
    if (fd >= 0) close(fd);
    if (!said_before(family, port, true)) {
      char s[80];
      sa_str(&ss, s, sizeof(s));
      say("UDP %s through NetKernel: %s", s, strerror(e));
    }
    return NULL;
  }
  struct uport *u = calloc(1, sizeof(*u));
  if (!u) {
    close(fd);
    return NULL;
  }
  *u = (struct uport){K_UDP_PORT, family, port, fd, false, now_ms(), 0, ports};
  ports = u;
  n_ports++;
  watch(fd, u);
  return u;
}

static bool same_addr(const struct sockaddr_storage *a, const struct sockaddr_storage *b) {
  if (a->ss_family != b->ss_family) return false;
  if (a->ss_family == AF_INET6) {
    const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
    return x->sin6_port == y->sin6_port && !memcmp(&x->sin6_addr, &y->sin6_addr, 16);
  }
  const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
  return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
}

/* The flow between program port `u` and `peer`; `program` is the program's address (made
 * from u when NULL: a datagram from a peer to a port the program has not sent from). */
static struct uflow *flow_get(struct uport *u, const struct sockaddr_storage *peer,
                              const struct sockaddr_storage *program) {
  for (struct uflow *f = flows; f; f = f->next)
    if (f->up == u && same_addr(&f->peer, peer)) return f;
  if (n_flows >= MAX_FLOWS) return NULL;
  struct sockaddr_storage to;
  if (program) to = *program;
  else {
    to = *own_address(u->family);
    set_port(&to, u->port);
  }
  int fd = kernel_socket(u->family, SOCK_DGRAM);
  if (fd < 0) return NULL;
  int one = 1;
  if (u->family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_FREEBIND, &one, sizeof(one));
  else setsockopt(fd, IPPROTO_IP, IP_FREEBIND, &one, sizeof(one));
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(fd, (const struct sockaddr *)peer, sa_len(peer)) < 0 ||
      connect(fd, (struct sockaddr *)&to, sa_len(&to)) < 0) {
    char s[80];
    sa_str(peer, s, sizeof(s));
    say("UDP flow from %s: %s", s, strerror(errno));
    close(fd);
    return NULL;
  }
  struct uflow *f = calloc(1, sizeof(*f));
  if (!f) {
    close(fd);
    return NULL;
  }
  *f = (struct uflow){K_UDP_FLOW, u, *peer, fd, now_ms(), flows};
  flows = f;
  n_flows++;
  u->flows++;
  watch(fd, f);
  return f;
}

static void to_peer(struct uport *u, const struct sockaddr_storage *peer, size_t len) {
  u->last_used = now_ms();
  busy();
  /* Errors are the datagram's alone (a rate limit, an unreachable peer): dropped, as the
   * kernel drops what it cannot send. */
  sendto(u->nkfd, dgram, len, MSG_DONTWAIT, (const struct sockaddr *)peer, sa_len(peer));
}

/* A program's first datagram to a peer, caught by TPROXY. */
static void from_tproxy(int fd) {
  for (;;) {
    struct sockaddr_storage src = {0}, dst = {0};
    char cbuf[256];
    struct iovec iov = {dgram, sizeof(dgram)};
    struct msghdr mh = {.msg_name = &src,
                        .msg_namelen = sizeof(src),
                        .msg_iov = &iov,
                        .msg_iovlen = 1,
                        .msg_control = cbuf,
                        .msg_controllen = sizeof(cbuf)};
    ssize_t n = recvmsg(fd, &mh, MSG_DONTWAIT);
    if (n < 0) return;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
      if ((c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_ORIGDSTADDR) ||
          (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_ORIGDSTADDR))
        memcpy(&dst, CMSG_DATA(c),
               c->cmsg_len - CMSG_LEN(0) < sizeof(dst) ? c->cmsg_len - CMSG_LEN(0) : sizeof(dst));
    if (!dst.ss_family || dst.ss_family != src.ss_family) continue;
    uint16_t sport = ntohs(src.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&src)->sin6_port
                                                     : ((struct sockaddr_in *)&src)->sin_port);
    struct uport *u = port_get(src.ss_family, sport, true);
    if (!u) continue;
    struct uflow *f = flow_get(u, &dst, &src);
    if (f) f->last_used = now_ms();
    to_peer(u, &dst, (size_t)n);
  }
}

void udp_event(void *tag) {
  enum kind k = *(enum kind *)tag;
  if (k == K_UDP_TPROXY) {
    from_tproxy(((typeof(&tproxy[0]))tag)->fd);
  } else if (k == K_UDP_FLOW) { /* the program, to this flow's peer */
    struct uflow *f = tag;
    if (f->kfd < 0) return;
    for (;;) {
      ssize_t n = recv(f->kfd, dgram, sizeof(dgram), MSG_DONTWAIT);
      if (n < 0) return;
      f->last_used = now_ms();
      to_peer(f->up, &f->peer, (size_t)n);
    }
  } else if (k == K_UDP_PORT) { /* a peer, to the program */
    struct uport *u = tag;
    if (u->nkfd < 0) return;
    for (;;) {
      struct sockaddr_storage peer = {0};
      socklen_t pl = sizeof(peer);
      ssize_t n =
          recvfrom(u->nkfd, dgram, sizeof(dgram), MSG_DONTWAIT, (struct sockaddr *)&peer, &pl);
      if (n < 0) return;
      if (peer.ss_family != u->family) continue;
      u->last_used = now_ms();
      struct uflow *f = flow_get(u, &peer, NULL);
      if (!f) continue;
      f->last_used = u->last_used;
      send(f->kfd, dgram, (size_t)n, MSG_DONTWAIT);
    }
  }
}

void udp_scan_begin(void) {
  for (struct uport *u = ports; u; u = u->next) u->seen = false;
}

void udp_socket_found(int family, const uint8_t *addr, uint16_t port, bool v6only) {
  (void)addr;
  if (tproxy[0].fd < 0 && tproxy[1].fd < 0) return;
  struct uport *u = port_get(family, port, true);
  if (u) u->seen = true;
  if (family == AF_INET6 && !v6only && is_any(family, addr)) {
    u = port_get(AF_INET, port, true);
    if (u) u->seen = true;
  }
}

/* Closed flows and ports are freed only here, between epoll batches. */
static struct uflow *dead_flows;
static struct uport *dead_ports;

void udp_scan_end(long now) {
  for (struct uflow **p = &flows; *p;) {
    struct uflow *f = *p;
    if (now - f->last_used < FLOW_IDLE_MS) {
      p = &f->next;
      continue;
    }
    *p = f->next;
    epoll_ctl(ep, EPOLL_CTL_DEL, f->kfd, NULL);
    close(f->kfd);
    f->kfd = -1;
    f->up->flows--;
    n_flows--;
    f->next = dead_flows;
    dead_flows = f;
  }
  for (struct uport **p = &ports; *p;) {
    struct uport *u = *p;
    if (u->seen || u->flows || now - u->last_used < PORT_IDLE_MS) {
      p = &u->next;
      continue;
    }
    *p = u->next;
    epoll_ctl(ep, EPOLL_CTL_DEL, u->nkfd, NULL); /* as in conn_close (relay.c) */
    close(u->nkfd);
    u->nkfd = -1;
    n_ports--;
    u->next = dead_ports;
    dead_ports = u;
  }
}

void udp_bury(void) {
  while (dead_flows) {
    struct uflow *f = dead_flows;
    dead_flows = f->next;
    free(f);
  }
  while (dead_ports) {
    struct uport *u = dead_ports;
    dead_ports = u->next;
    free(u);
  }
}
