/* The kernel NSM: the Linux stack in its own network namespace. Its endpoints are kernel
 * sockets opened inside the namespace (a socket stays in the namespace it was created in) and
 * driven with ordinary non-blocking system calls. Congestion control and sysctls are the
 * namespace's. A tenant's loopback is the same kind of endpoint, in the tenant's namespace.
 *
 * Kernel sockets are edge-triggered in epoll: can_read / can_write remember that a socket may
 * still have data or room after we stopped (ring full or empty), so no edge is lost.
 */
#include <errno.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <string.h>
#include <sys/socket.h>

#include "engine.h"

/* EPOLLOUT is watched on a stream socket only while it connects or after a send met a full
 * buffer: otherwise every ACK that frees send space would be an event for the engine, and a
 * tenant with many chatty connections would flood it. */
#define EVENTS_NO_OUT (EPOLLIN | EPOLLRDHUP | EPOLLET)

/* The engine is single-threaded, so switching its namespace around one socket() is safe. */
int nk_in_netns(int netns_fd, int domain, int type) {
  return nk_in_netns_proto(netns_fd, domain, type, 0);
}

int nk_in_netns_proto(int netns_fd, int domain, int type, int protocol) {
  if (setns(netns_fd, CLONE_NEWNET) < 0) return -errno;
  int fd = socket(domain, type | SOCK_NONBLOCK | SOCK_CLOEXEC, protocol);
  int err = fd < 0 ? -errno : 0;
  if (setns(engine.self_netns, CLONE_NEWNET) < 0) {
    /* Staying in a tenant's namespace would be a security hole: stop here. */
    NK_INFO("cannot return to the engine's network namespace: %s", "fatal");
    _exit(70);
  }
  return fd < 0 ? err : fd;
}

static int fd_of(struct nk_esock *es, int k) { return es->ep[k].fd; }

/* ---- socket calls ---- */

static int kernel_open(struct nk_esock *es, int k) {
  struct nk_endpoint *e = &es->ep[k];
  int fd = nk_in_netns(e->nsm ? e->nsm->netns_fd : es->t->netns_fd, e->family, es->type);
  if (fd < 0) return fd;
  e->fd = fd;
  if (e->family == AF_INET6) {
    /* On the NSM each family has its own endpoint; the loopback's v6 one also takes 127/8. */
    int v = es->v6only || !e->loop;
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v, sizeof(v));
  }
  return 0;
}

static int kernel_setopt(struct nk_esock *es, int k, int level, int name, const void *val,
                         socklen_t len) {
  int fam = es->ep[k].family;
  if (level == IPPROTO_IPV6 && fam != AF_INET6) return 0;
  if (level == IPPROTO_IP && fam != AF_INET) return 0;
  return nk_setsockopt_unprivileged(fd_of(es, k), level, name, val, len);
}

static int kernel_bind(struct nk_esock *es, int k, const struct nk_addr *a, bool source) {
  if (source) { /* the port comes with connect(), as for an unbound socket */
    int one = 1;
    setsockopt(fd_of(es, k), IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
  }
  struct sockaddr_storage ss;
  socklen_t l = nk_addr_to_sa(a, &ss);
  return bind(fd_of(es, k), (struct sockaddr *)&ss, l) < 0 ? -errno : 0;
}

static bool kernel_address(struct nk_esock *es, int k, bool peer, struct nk_addr *out) {
  struct sockaddr_storage ss;
  socklen_t l = sizeof(ss);
  int fd = fd_of(es, k);
  if (fd < 0 || (peer ? getpeername(fd, (struct sockaddr *)&ss, &l)
                      : getsockname(fd, (struct sockaddr *)&ss, &l)) < 0)
    return false;
  nk_addr_from_sa(out, &ss);
  return true;
}

static uint16_t kernel_port(struct nk_esock *es, int k) {
  struct nk_addr a = {0};
  return kernel_address(es, k, false, &a) ? a.port : 0;
}

static int kernel_listen(struct nk_esock *es, int k, int backlog) {
  return listen(fd_of(es, k), backlog) < 0 ? -errno : 0;
}

static void kernel_accept(struct nk_esock *l, int k, int *budget) {
  struct nk_endpoint *le = &l->ep[k];
  while (!nk_sock_accept_queue_full(l) && nk_sock_may_accept(l)) {
    if (*budget == 0) { /* the rest in a later round */
      nk_sock_activate(l);
      *budget = -1;
      return;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    bool dropped;
    int cfd = nk_accept_or_drop(le->fd, (struct sockaddr *)&ss, &sl, &dropped);
    if (cfd < 0) {
      if (dropped) continue; /* refused for lack of engine descriptors */
      return;
    }
    (*budget)--;
    struct nk_addr peer;
    nk_addr_from_sa(&peer, &ss);
    struct nk_endpoint e = {.ops = &nk_kernel_ep_ops,
                            .nsm = le->nsm,
                            .family = le->family,
                            .loop = le->loop,
                            .fd = cfd,
                            .id = NK_EXT_LOST};
    if (!nk_sock_accepted(l, &e, NULL, &peer)) {
      /* Admission limit (logged by nk_tenant_admit): refuse it with a reset, keep the
       * listener. */
      struct linger lg = {1, 0};
      setsockopt(cfd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
      close(cfd);
    }
  }
}

static int kernel_connect(struct nk_esock *es, const struct nk_addr *dst) {
  struct sockaddr_storage ss;
  socklen_t l;
  if (es->ep[0].loop && es->ep[0].family == AF_INET6 && dst->family == AF_INET) {
    struct nk_addr m = {.family = AF_INET6, .port = dst->port}; /* 127/8 on a v6 socket */
    m.addr[10] = m.addr[11] = 0xff;
    memcpy(m.addr + 12, dst->addr, 4);
    l = nk_addr_to_sa(&m, &ss);
  } else {
    l = nk_addr_to_sa(dst, &ss);
  }
  if (connect(fd_of(es, 0), (struct sockaddr *)&ss, l) == 0) return 0;
  return errno == EINPROGRESS ? 1 : -errno;
}

static void kernel_shutdown_rd(struct nk_esock *es) { shutdown(fd_of(es, 0), SHUT_RD); }

static void kernel_close(struct nk_esock *es, int k, bool rst) {
  int fd = fd_of(es, k);
  if (fd < 0) return;
  if (rst && es->type == SOCK_STREAM && es->kind != NK_KIND_LISTENER) {
    struct linger l = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
  }
  close(fd); /* the engine's only descriptor of it: the close takes it out of the epoll set */
}

static void kernel_watch(struct nk_esock *es, int k, uint32_t events) {
  if (k == 0 && es->kind != NK_KIND_LISTENER) es->watch_out = (events & EPOLLOUT) != 0;
  nk_epoll_add(fd_of(es, k), events, &es->ep[k].h); /* or modify: names k from now */
}

static void watch_out(struct nk_esock *es, bool on) {
  if (es->watch_out == on || !es->ep_count || fd_of(es, 0) < 0) return;
  es->watch_out = on;
  /* Re-arming checks readiness now (EPOLL_CTL_MOD), so room that freed up meanwhile still
   * produces the event. */
  nk_epoll_mod(fd_of(es, 0), on ? NK_EP_DATA_EVENTS : EVENTS_NO_OUT, &es->ep[0].h);
}

static int kernel_getopt(struct nk_esock *es, int k, int level, int name, void *val,
                         socklen_t *len) {
  return getsockopt(fd_of(es, k), level, name, val, len) < 0 ? -errno : 0;
}

/* ---- stream data ---- */

static void kernel_transmit(struct nk_esock *es) {
  int64_t fill = nk_ring_fill_checked(&es->tx);
  if (fill < 0) {
    nk_sock_fail(es, ECONNRESET, NK_END_BROKEN);
    return;
  }
  struct nk_nsm *m = nk_sock_nsm(es);
  uint64_t budget = engine.service_bytes;
  while (fill > 0 && es->can_write) {
    if (budget == 0) { /* the rest in a later round */
      nk_sock_activate(es);
      break;
    }
    uint64_t want = (uint64_t)fill < budget ? (uint64_t)fill : budget;
    uint64_t grant = nk_policy_grant(es, m, NK_TX, want, want < NK_QUANTUM ? want : NK_QUANTUM);
    if (grant == 0) break; /* woken when the tokens are there */
    struct iovec iov[2];
    uint32_t tail = atomic_load_explicit(es->tx.tail, memory_order_relaxed);
    int cnt = nk_ring_iov(&es->tx, tail, (uint32_t)(grant < want ? grant : want), iov);
    struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
    ssize_t n = sendmsg(fd_of(es, 0), &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      nk_ring_consume(&es->tx, (uint32_t)n);
      fill -= n;
      budget -= (uint64_t)n;
      nk_sock_count(es, NK_TX, (uint64_t)n);
      nk_policy_charge(es, m, NK_TX, (uint64_t)n);
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
      if (errno == EAGAIN) {
        es->can_write = false;
        watch_out(es, true);
      }
      continue;
    }
    nk_sock_fail(es, n < 0 ? errno : EPIPE, NK_END_ERROR);
    return;
  }
  if (fill == 0 && es->shut_wr_pending) {
    shutdown(fd_of(es, 0), SHUT_WR);
    es->shut_wr_pending = false;
  }
}

static void kernel_receive(struct nk_esock *es) {
  struct nk_slot *s = nk_sock_slot(es);
  /* Never more than a ring's worth per service, even with the engine to itself: the tenant
   * moves the ring's tail, so "until the ring is full" could be forever. */
  uint64_t budget = engine.service_bytes < es->rx.size ? engine.service_bytes : es->rx.size;
  while (es->can_read && !atomic_load(&s->rx_eof)) {
    if (budget == 0) { /* the rest in a later round */
      nk_sock_activate(es);
      break;
    }
    int64_t fill = nk_ring_fill_checked(&es->rx);
    if (fill < 0) {
      nk_sock_fail(es, ECONNRESET, NK_END_BROKEN);
      return;
    }
    uint32_t space = es->rx.size - (uint32_t)fill;
    if (space == 0) {
      /* Stop reading: TCP flow control pushes back on the sender. */
      if (nk_sock_rx_stall(es, 1)) break;
      continue;
    }
    atomic_store_explicit(&s->rx_stalled, 0, memory_order_relaxed); /* S1 withdrawn: see there */
    if (space > budget) space = (uint32_t)budget;
    struct nk_nsm *m = nk_sock_nsm(es);
    uint64_t grant = nk_policy_grant(es, m, NK_RX, space, space < NK_QUANTUM ? space : NK_QUANTUM);
    if (grant == 0) break; /* TCP flow control holds the sender meanwhile */
    if (grant < space) space = (uint32_t)grant;
    struct iovec iov[2];
    uint32_t head = atomic_load_explicit(es->rx.head, memory_order_relaxed);
    int cnt = nk_ring_iov(&es->rx, head, space, iov);
    ssize_t n = readv(fd_of(es, 0), iov, cnt);
    if (n > 0) {
      nk_ring_produce(&es->rx, (uint32_t)n);
      budget -= (uint64_t)n;
      nk_sock_count(es, NK_RX, (uint64_t)n);
      nk_policy_charge(es, m, NK_RX, (uint64_t)n);
      /* A short read means the socket is drained: wait for the next edge. Not after the
       * peer's FIN, whose edge may have come with this data: read on until 0. */
      if ((uint32_t)n < space && !es->peer_fin) es->can_read = false;
      continue;
    }
    if (n == 0) {
      nk_sock_end_of_stream(es);
      break;
    }
    if (errno == EAGAIN) {
      es->can_read = false;
      break;
    }
    if (errno == EINTR) continue;
    nk_sock_fail(es, errno, NK_END_ERROR);
    return;
  }
  /* A reset that arrives after the peer's FIN was read (the first send after the peer closed:
   * Linux answers it with EPIPE on the next send) reaches neither read nor send while the
   * guest's ring is empty: take it from SO_ERROR. Before EOF, the reads meet it in order. */
  if (es->kernel_err && atomic_load(&s->rx_eof)) {
    es->kernel_err = false;
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(fd_of(es, 0), SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err)
      nk_sock_fail(es, err, NK_END_ERROR);
  }
}

/* ---- datagrams ---- */

static int kernel_send_dgram(struct nk_esock *es, int k, const struct nk_addr *dst, uint32_t pos,
                             uint32_t len, const void *ctl, size_t ctl_len) {
  struct iovec iov[2];
  int cnt = nk_ring_iov(&es->tx, pos, len, iov);
  struct sockaddr_storage ss;
  struct msghdr mh = {.msg_iov = iov,
                      .msg_iovlen = (size_t)cnt,
                      .msg_control = ctl_len ? (void *)ctl : NULL,
                      .msg_controllen = ctl_len};
  if (dst) {
    mh.msg_name = &ss;
    mh.msg_namelen = nk_addr_to_sa(dst, &ss);
  }
  ssize_t n = sendmsg(fd_of(es, k), &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
  return n < 0 ? -errno : (int)n;
}

/* A datagram for a socket that asked for control messages (IP_RECVTTL and the like): they
 * go in the record between header and payload (abi.h), so the payload is received aside and
 * copied after them. Only the kinds the application may have asked for are passed on; a
 * packet-info message names the interface the tenant sees its addresses on, its `lo` (1),
 * not the NSM's. -EAGAIN: the ring has no room for the largest record. */
static ssize_t recv_with_cmsgs(struct nk_esock *es, int k, int fd, uint32_t head, uint32_t len,
                               int64_t fill, struct sockaddr_storage *ss, struct nk_dgram *h) {
  if (es->rx.size - (uint64_t)fill < NK_DGRAM_SPACE_CMSG(len, NK_DGRAM_CMSG_MAX)) return -EAGAIN;
  static char data[NK_DGRAM_MAX + 1];
  _Alignas(struct cmsghdr) unsigned char ctl[512], out[NK_DGRAM_CMSG_MAX];
  struct iovec iov = {data, sizeof(data)};
  struct msghdr mh = {.msg_name = ss,
                      .msg_namelen = sizeof(*ss),
                      .msg_iov = &iov,
                      .msg_iovlen = 1,
                      .msg_control = ctl,
                      .msg_controllen = sizeof(ctl)};
  ssize_t n = recvmsg(fd, &mh, MSG_DONTWAIT);
  if (n < 0) return -errno;
  if ((size_t)n > len) n = len; /* cannot grow between the peek and now; but never more */
  size_t used = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
    bool ip = c->cmsg_level == IPPROTO_IP &&
              (c->cmsg_type == IP_TTL || c->cmsg_type == IP_TOS || c->cmsg_type == IP_PKTINFO);
    bool ip6 = c->cmsg_level == IPPROTO_IPV6 &&
               (c->cmsg_type == IPV6_HOPLIMIT || c->cmsg_type == IPV6_TCLASS ||
                c->cmsg_type == IPV6_PKTINFO);
    size_t space = CMSG_SPACE(c->cmsg_len - CMSG_LEN(0));
    if (!(ip || ip6) || used + space > sizeof(out)) continue;
    memset(out + used, 0, space);
    memcpy(out + used, c, c->cmsg_len);
    if (!es->ep[k].loop) {
      struct cmsghdr *o = (struct cmsghdr *)(out + used);
      if (ip && c->cmsg_type == IP_PKTINFO) {
        struct in_pktinfo pi;
        memcpy(&pi, CMSG_DATA(o), sizeof(pi));
        pi.ipi_ifindex = 1;
        memcpy(CMSG_DATA(o), &pi, sizeof(pi));
      } else if (ip6 && c->cmsg_type == IPV6_PKTINFO) {
        struct in6_pktinfo pi;
        memcpy(&pi, CMSG_DATA(o), sizeof(pi));
        pi.ipi6_ifindex = 1;
        memcpy(CMSG_DATA(o), &pi, sizeof(pi));
      }
    }
    used += space;
  }
  h->cmsg_len = (uint16_t)used;
  nk_ring_copy_in(&es->rx, head + sizeof(*h), out, (uint32_t)((used + 7u) & ~7u));
  nk_ring_copy_in(&es->rx, head + sizeof(*h) + ((used + 7u) & ~7u), data, (uint32_t)n);
  return n;
}

/* Datagrams per service: the tenant drains the ring as fast as it likes. */
#define DGRAMS_PER_SERVICE 256

static void kernel_recv_dgrams(struct nk_esock *es, int k) {
  struct nk_slot *s = nk_sock_slot(es);
  int fd = fd_of(es, k);
  for (int got = 0;; got++) {
    if (got == DGRAMS_PER_SERVICE) { /* the rest in a later round */
      nk_sock_activate(es);
      return;
    }
    int64_t fill = nk_ring_fill_checked(&es->rx);
    if (fill < 0) {
      nk_sock_fail(es, ECONNRESET, NK_END_BROKEN);
      return;
    }
    char peekbuf[1];
    ssize_t len = recv(fd, peekbuf, 1, MSG_PEEK | MSG_TRUNC | MSG_DONTWAIT);
    if (len < 0) {
      /* Not EAGAIN: a pending ICMP error (connected socket), which this recv consumed.
       * The guest's next recv() reports it, once, as Linux does. */
      if (errno != EAGAIN && errno != EINTR) atomic_store(&s->rx_err, errno);
      return;
    }
    if (!nk_policy_dgram(es, es->ep[k].nsm, NK_RX, (uint32_t)len)) return;
    uint32_t need = (uint32_t)NK_DGRAM_SPACE((uint32_t)len);
    if (es->rx.size - (uint32_t)fill < need) {
      if (nk_sock_rx_stall(es, need)) return;
      continue;
    }
    atomic_store_explicit(&s->rx_stalled, 0, memory_order_relaxed); /* S1 withdrawn: see there */
    uint32_t head = atomic_load_explicit(es->rx.head, memory_order_relaxed);
    struct sockaddr_storage ss;
    struct nk_dgram h = {0};
    ssize_t n;
    if (!es->want_cmsg) {
      struct iovec iov[2];
      int cnt = nk_ring_iov(&es->rx, head + sizeof(struct nk_dgram), (uint32_t)len, iov);
      struct msghdr mh = {
          .msg_name = &ss, .msg_namelen = sizeof(ss), .msg_iov = iov, .msg_iovlen = (size_t)cnt};
      n = recvmsg(fd, &mh, MSG_DONTWAIT);
      if (n < 0) return;
    } else {
      n = recv_with_cmsgs(es, k, fd, head, (uint32_t)len, fill, &ss, &h);
      if (n == -EAGAIN) {
        if (nk_sock_rx_stall(es, need + NK_DGRAM_CMSG_MAX)) return;
        continue;
      }
      if (n < 0) return;
    }
    h.len = (uint32_t)n;
    nk_addr_from_sa(&h.addr, &ss);
    nk_ring_copy_in(&es->rx, head, &h, sizeof(h));
    nk_ring_produce(&es->rx, (uint32_t)NK_DGRAM_SPACE_CMSG((uint32_t)n, h.cmsg_len));
    nk_sock_count(es, NK_RX, (uint64_t)n);
    nk_policy_charge_dgram(es, es->ep[k].nsm, NK_RX, (uint32_t)n);
  }
}

/* ---- events ---- */

void nk_kernel_event(struct nk_esock *es, int k, uint32_t ev) {
  NK_LOG(2, "slot %u endpoint %d events 0x%x", es->slot, k, ev);
  /* Queued in this batch before the endpoint was closed or moved (a move re-arms it under
   * its new index, so nothing is lost): stale. */
  if (k >= es->ep_count || es->ep[k].ops != &nk_kernel_ep_ops || es->ep[k].fd < 0) return;
  if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP)) es->can_read = true;
  if (ev & (EPOLLHUP | EPOLLERR | EPOLLRDHUP)) es->peer_fin = true;
  if (ev & EPOLLERR) es->kernel_err = true;
  if (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) es->can_write = true;
  if (es->state == NK_ST_CONNECTING && (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
    int err = 0;
    socklen_t l = sizeof(err);
    getsockopt(fd_of(es, 0), SOL_SOCKET, SO_ERROR, &err, &l);
    nk_sock_connected(es, err);
  }
  if ((ev & EPOLLOUT) && es->type == SOCK_STREAM && es->state == NK_ST_CONNECTED)
    watch_out(es, false);
  nk_sock_activate(es);
}

const struct nk_ep_ops nk_kernel_ep_ops = {
    .name = "kernel",
    .open = kernel_open,
    .setopt = kernel_setopt,
    .bind = kernel_bind,
    .port = kernel_port,
    .address = kernel_address,
    .listen = kernel_listen,
    .accept = kernel_accept,
    .connect = kernel_connect,
    .transmit = kernel_transmit,
    .receive = kernel_receive,
    .send_dgram = kernel_send_dgram,
    .recv_dgrams = kernel_recv_dgrams,
    .shutdown_rd = kernel_shutdown_rd,
    .finish = nk_sock_finish_stream,
    .close = kernel_close,
    .watch = kernel_watch,
    .getopt = kernel_getopt,
};

static struct nk_nsm_type kernel_type = {
    .type = "kernel",
    .ep = &nk_kernel_ep_ops,
    .kernel_sockets = true,
};
NK_NSM_TYPE(kernel_type)
