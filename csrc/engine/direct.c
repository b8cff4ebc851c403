/* A program's connection carried by the engine directly. A program GuestLib does not reach
 * (static, Go) has its TCP connections relayed by the tenant's relay (csrc/relay), which
 * holds the other end of each in the tenant's namespace. Once the relay has the NetKernel
 * socket connected, it hands the engine its end (NK_OP_ATTACH) and drops out: the engine
 * plays GuestLib's half of the ring protocol itself, reading that TCP socket into the
 * transmit ring and writing the receive ring out to it. Per request that saves the relay's
 * two wake-ups, its six system calls and the READY records and doorbells between it and the
 * engine (docs/benchmarks.md, "Programs GuestLib does not reach").
 *
 * The socket is the tenant's: it may keep a copy, set options on it, scribble the slot's
 * rings. Every call on it is non-blocking whatever its file's flags (MSG_DONTWAIT), it is
 * closed by the closer thread (fds.c: a linger it set cannot hold the engine), and the rings
 * are checked as for any socket: a tenant that breaks them resets its own connection.
 */
#include <errno.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include "engine.h"

#define DIRECT_EVENTS (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET)

static struct nk_slot *slot_of(struct nk_esock *es) { return &es->t->slots[es->slot]; }

static int sockopt_int(int fd, int level, int name) {
  int v = -1;
  socklen_t l = sizeof(v);
  return getsockopt(fd, level, name, &v, &l) == 0 ? v : -1;
}

/* An established TCP socket (IPv4 or IPv6), and nothing else: not a listener, not a file. */
static bool tcp_established(int fd) {
  struct stat st;
  if (fstat(fd, &st) < 0 || !S_ISSOCK(st.st_mode)) return false;
  int dom = sockopt_int(fd, SOL_SOCKET, SO_DOMAIN);
  if ((dom != AF_INET && dom != AF_INET6) || sockopt_int(fd, SOL_SOCKET, SO_TYPE) != SOCK_STREAM ||
      sockopt_int(fd, SOL_SOCKET, SO_PROTOCOL) != IPPROTO_TCP)
    return false;
  struct tcp_info ti;
  socklen_t l = sizeof(ti);
  return getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &l) == 0 &&
         (ti.tcpi_state == TCP_ESTABLISHED || ti.tcpi_state == TCP_CLOSE_WAIT);
}

void nk_direct_watch(struct nk_esock *es) {
  if (es->direct >= 0) nk_epoll_add(es->direct, DIRECT_EVENTS, &es->h_direct);
}

int nk_direct_attach(struct nk_esock *es, int fd) {
  if (es->kind != NK_KIND_STREAM || es->state != NK_ST_CONNECTED || es->dead || es->closing ||
      es->direct >= 0 || !es->ep_count)
    return -EINVAL;
  if (!tcp_established(fd)) return -EINVAL;
  es->direct = fd;
  es->h_direct = (struct nk_handle){NK_H_DIRECT, 0, es};
  es->direct_rd = es->direct_wr = true;
  if (nk_epoll_add(fd, DIRECT_EVENTS, &es->h_direct) < 0) {
    es->direct = -1;
    return -ENOMEM;
  }
  /* The proxy is done with: the relay closes its end, which must not close the socket. What
   * it showed the relay (a READY record, a blocker) goes with it. */
  nk_sock_close_proxy(es);
  es->blocker_held = false;
  NK_LOG(1, "tenant %s slot %u: carried directly", es->t->name, es->slot);
  nk_sock_activate(es);
  return 0;
}

void nk_direct_event(struct nk_esock *es, uint32_t ev) {
  if (es->direct < 0) return; /* queued in this batch before it was let go */
  if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) es->direct_rd = true;
  if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) es->direct_hup = true;
  if (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) es->direct_wr = true;
  nk_sock_activate(es);
}

/* The program's bytes into the transmit ring, as GuestLib's send() would put them. */
void nk_direct_in(struct nk_esock *es) {
  if (es->direct < 0 || es->direct_eof || es->dead) return;
  while (es->direct_rd) {
    int64_t fill = nk_ring_fill_checked(&es->tx);
    if (fill < 0) {
      nk_sock_fail(es, ECONNRESET, NK_END_BROKEN);
      return;
    }
    uint32_t space = es->tx.size - (uint32_t)fill;
    if (space == 0) return; /* the stack's progress brings us back */
    struct iovec iov[2];
    uint32_t head = atomic_load_explicit(es->tx.head, memory_order_relaxed);
    int cnt = nk_ring_iov(&es->tx, head, space, iov);
    struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
    ssize_t n = recvmsg(es->direct, &mh, MSG_DONTWAIT);
    if (n > 0) {
      nk_ring_produce(&es->tx, (uint32_t)n);
      /* What GuestLib's doorbell does: the stack's transmit runs again, in this service if
       * it has not yet, in the next round if it has (it may have room still: then no event
       * of the stack's socket would ever bring the socket back). */
      nk_sock_activate(es);
      /* Short of the room: all there was. The next bytes are a new edge; an end of stream
       * signalled already is not, so that one is read on to. */
      if ((uint32_t)n < space && !es->direct_hup) es->direct_rd = false;
      continue;
    }
    if (n == 0) { /* the program's FIN: shutdown(SHUT_WR) once the ring is flushed */
      es->direct_eof = true;
      nk_sock_shutdown(es, SHUT_WR);
      return;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN) {
      es->direct_rd = false;
      return;
    }
    /* The program reset its connection (or worse): the peer is reset too. */
    nk_sock_fail(es, ECONNRESET, NK_END_BROKEN);
    return;
  }
}

/* The receive ring out to the program, as GuestLib's recv() would take it, and the ends of
 * the byte stream passed on. Then, with both directions over, the socket closes as if its
 * program had closed it. */
void nk_direct_out(struct nk_esock *es) {
  if (es->direct < 0) return;
  struct nk_slot *s = slot_of(es);
  bool moved = false;
  while (es->direct_wr) {
    int64_t fill = nk_ring_fill_checked(&es->rx);
    if (fill < 0) {
      if (!es->dead) nk_sock_fail(es, ECONNRESET, NK_END_BROKEN);
      es->direct_rst = true;
      break;
    }
    if (fill == 0) break;
    struct iovec iov[2];
    uint32_t tail = atomic_load_explicit(es->rx.tail, memory_order_relaxed);
    int cnt = nk_ring_iov(&es->rx, tail, (uint32_t)fill, iov);
    struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
    ssize_t n = sendmsg(es->direct, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      nk_ring_consume(&es->rx, (uint32_t)n);
      moved = true;
      if ((uint64_t)n < (uint64_t)fill) es->direct_wr = false; /* full: EPOLLOUT brings us back */
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) {
      es->direct_wr = false;
      break;
    }
    /* The program is gone (its reset, or it shut its reading side): so is the connection. */
    if (!es->dead) nk_sock_fail(es, ECONNRESET, NK_END_BROKEN);
    es->direct_rst = true;
    break;
  }
  /* The stack stopped reading for want of room, which it now has: what GuestLib's kick does. */
  if (moved && atomic_load(&s->rx_stalled)) {
    atomic_store_explicit(&s->rx_stalled, 0, memory_order_relaxed);
    nk_sock_activate(es);
  }
  int64_t left = nk_ring_fill_checked(&es->rx);
  if (es->dead) {
    /* Reset (by the peer: the bytes before it go first, as far as they fit; or by us). The
     * program sees the reset when the closer closes our end with SO_LINGER {1, 0}. */
    if (left <= 0 || !es->direct_wr || es->direct_rst) {
      es->direct_rst = true;
      es->closing = true;
    }
    return;
  }
  if (left == 0 && atomic_load(&s->rx_eof) && !es->direct_shut) {
    es->direct_shut = true; /* the peer's FIN, after the last byte */
    if (shutdown(es->direct, SHUT_WR) < 0 && errno != ENOTCONN) {
      nk_sock_fail(es, ECONNRESET, NK_END_BROKEN);
      es->direct_rst = true;
      es->closing = true;
      return;
    }
  }
  if (es->direct_eof && es->direct_shut) {
    /* Both ways over. Closed once the program has every byte (a reset from the closer's
     * SO_LINGER {1, 0} would drop what its receive queue does not hold yet); room that
     * frees up wakes us (EPOLLOUT). */
    int q = 0;
    if (ioctl(es->direct, SIOCOUTQ, &q) < 0 || q == 0) es->closing = true;
  }
}

/* The socket is freed: the program's connection ends with it (reset unless it ended). */
void nk_direct_close(struct nk_esock *es) {
  if (es->direct < 0) return;
  nk_epoll_del(es->direct); /* the tenant may hold a copy, which would keep it in the set */
  nk_close_later(es->direct);
  es->direct = -1;
}
