/* The shared-memory path: a TCP connection between two tenant sockets on this host (two
 * tenants, or one tenant and itself) runs without TCP. connect() finds the listener the
 * network would have delivered to, the engine pairs the two sockets, and from then on it
 * copies bytes from the sender's transmit ring straight into the receiver's receive ring:
 * send() copies in, the engine copies across, recv() copies out. No kernel socket, no
 * packets, no checksums, no ACKs.
 *
 * Each tenant keeps its own region: neither maps the other's, so neither can read more than
 * the bytes sent to it (DESIGN D). The engine reads both rings' indices once and checks them,
 * as on the NSM path; a tenant that breaks its ring resets its own connection (the peer sees
 * ECONNRESET, as after a TCP reset) and nothing else.
 *
 * Semantics follow Linux TCP: back-pressure (a full receive ring holds the sender's ring, a
 * full transmit ring blocks or EAGAINs the sender), half-close by shutdown(SHUT_WR), FIN on
 * close after the last byte, a reset on close with unread bytes or SO_LINGER {1, 0}, EPIPE for
 * writes after the peer has gone. Reachability follows the network's: a connection takes this
 * path only to a listener bound to the address and port it was sent to, loopback only inside
 * one tenant, and only when both tenants have the path switched on.
 */
#include <errno.h>
#include <string.h>
#include <sys/epoll.h>

#include "engine.h"

#define PORT_BUCKETS 1024u
static struct nk_esock *by_port[PORT_BUCKETS]; /* listeners, chained by next_port */

static struct nk_slot *slot_of(struct nk_esock *es) { return &es->t->slots[es->slot]; }
static unsigned bucket(uint16_t port) { return port % PORT_BUCKETS; }

void nk_shm_listener_add(struct nk_esock *l) {
  if (l->in_port_map) return;
  unsigned b = bucket(l->bind_addr.port);
  l->next_port = by_port[b];
  by_port[b] = l;
  l->in_port_map = true;
}

void nk_shm_listener_del(struct nk_esock *l) {
  if (!l->in_port_map) return;
  for (struct nk_esock **p = &by_port[bucket(l->bind_addr.port)]; *p; p = &(*p)->next_port)
    if (*p == l) {
      *p = l->next_port;
      break;
    }
  l->in_port_map = false;
}

/* Would a connection from tenant `from` to dst reach listener l over the network? 2 when l is
 * bound to dst's address itself, 1 through a wildcard bind, 0 not at all. */
static int reaches(const struct nk_esock *l, const struct nk_tenant *from,
                   const struct nk_addr *dst) {
  const struct nk_tenant *t = l->t;
  if (l->kind != NK_KIND_LISTENER || l->dead || l->closing || l->proxy < 0 || t->dead) return 0;
  if (l->bind_addr.port != dst->port) return 0;
  if (dst->family == AF_INET6 && l->family != AF_INET6) return 0;
  if (dst->family == AF_INET && l->family == AF_INET6 && l->v6only) return 0;
  bool loop = nk_addr_is_loopback(dst);
  if (loop && t != from) return 0; /* a tenant's loopback is its own (DESIGN E) */
  if (!loop && !nk_addr_eq_ip(dst, dst->family == AF_INET ? &t->ipv4 : &t->ipv6)) return 0;
  struct nk_addr b = l->bind_addr;
  nk_addr_unmap(&b);
  if (nk_addr_is_any(&l->bind_addr)) return 1;
  return nk_addr_eq_ip(&b, dst) ? 2 : 0;
}

/* The listener Linux would pick: a bind to the exact address beats a wildcard. Listeners that
 * tie can only be an SO_REUSEPORT group of one tenant (anything else would not have bound);
 * Linux spreads connections over the group by a hash of the addresses, we take turns. */
static struct nk_esock *find_listener(const struct nk_tenant *from, const struct nk_addr *dst) {
  static unsigned turn;
  int score = 0;
  unsigned ties = 0;
  for (struct nk_esock *l = by_port[bucket(dst->port)]; l; l = l->next_port) {
    int r = l->t->shm ? reaches(l, from, dst) : 0;
    if (r > score) score = r, ties = 0;
    if (r == score && r > 0) ties++;
  }
  if (score == 0) return NULL;
  unsigned pick = turn++ % ties;
  for (struct nk_esock *l = by_port[bucket(dst->port)]; l; l = l->next_port)
    if (l->t->shm && reaches(l, from, dst) == score && pick-- == 0) return l;
  return NULL;
}

/* Our end's address: the source address Linux would choose (the tenant's own address of the
 * destination's family, 127.0.0.1 or ::1 for loopback) or the one the socket is bound to. */
static bool local_address(struct nk_esock *es, const struct nk_addr *dst, struct nk_addr *out) {
  struct nk_tenant *t = es->t;
  struct nk_addr a = {.family = dst->family};
  if (nk_addr_is_loopback(dst)) {
    if (dst->family == AF_INET) a.addr[0] = 127, a.addr[3] = 1;
    else a.addr[15] = 1;
  } else {
    a = dst->family == AF_INET ? t->ipv4 : t->ipv6;
  }
  if (es->bound) {
    struct nk_addr b = es->bind_addr;
    nk_addr_unmap(&b);
    if (!nk_addr_is_any(&es->bind_addr)) {
      /* Bound to an address of the other kind (loopback vs the tenant's): let the NSM path
       * give Linux's answer. */
      if (b.family != dst->family || nk_addr_is_loopback(&b) != nk_addr_is_loopback(dst))
        return false;
      a = b;
    }
    a.port = es->bind_addr.port;
  } else {
    /* Ephemeral ports from Linux's default range. Uniqueness matters only among this
     * tenant's connections to one listener, and the counter wraps after 28232 of them. */
    a.port = htons((uint16_t)(32768u + t->ephemeral++ % 28232u));
  }
  *out = a;
  return true;
}

int nk_shm_connect(struct nk_esock *es, const struct nk_addr *dst) {
  struct nk_tenant *t = es->t;
  if (!t->shm || es->dead) return 0;
  if (dst->family != AF_INET && dst->family != AF_INET6) return 0;
  struct nk_esock *l = find_listener(t, dst);
  if (!l) return 0;
  /* Its application's accept queue is full: the connection goes the network's way, where
   * it waits in the NSM's queues and retries its SYN, as Linux's would. */
  if (nk_sock_accept_queue_full(l)) return 0;
  struct nk_addr local;
  if (!local_address(es, dst, &local)) return 0;

  /* The accepted end, in the listener's tenant, as for a connection from any stack. */
  struct nk_endpoint path = {
      .ops = &nk_shm_ep_ops, .family = dst->family, .fd = -1, .id = NK_EXT_LOST};
  struct nk_esock *nb = nk_sock_accepted(l, &path, dst, &local);
  if (!nb) return -ECONNREFUSED; /* the listener's tenant is at its limits: as a RST */
  nb->shm = true;
  nk_ep_close_all(es, false); /* what a bind opened: the connection takes this path instead */
  nk_ep_set(es, 0, &path);
  es->ep_count = 1;
  es->shm = true;
  es->shm_peer = nb;
  nb->shm_peer = es;
  es->state = NK_ST_CONNECTED;
  nk_sock_set_local(es, &local);
  nk_sock_set_peer(es, dst);
  atomic_store(&slot_of(es)->state, NK_ST_CONNECTED);
  NK_LOG(1, "tenant %s slot %u -> tenant %s slot %u over shared memory", t->name, es->slot,
         nb->t->name, nb->slot);
  nk_sock_activate(es);
  nk_sock_activate(nb);
  return 1;
}

/* Copies up to budget bytes from src's transmit ring into dst's receive ring. Returns the
 * bytes moved, or -1 when a ring was broken (its socket is reset, the pair unlinked). */
static int64_t move(struct nk_esock *src, struct nk_esock *dst, uint64_t budget) {
  struct nk_slot *ds = slot_of(dst);
  int64_t moved = 0;
  for (;;) {
    int64_t fill = nk_ring_fill_checked(&src->tx);
    if (fill < 0) {
      nk_sock_fail(src, ECONNRESET, NK_END_BROKEN);
      return -1;
    }
    if (fill == 0 || budget == 0) return moved;
    if (atomic_load(&ds->rx_eof)) {
      /* The receiver shut its reading side: what arrives now is never read. */
      nk_ring_consume(&src->tx, (uint32_t)fill);
      return moved + fill;
    }
    int64_t dfill = nk_ring_fill_checked(&dst->rx);
    if (dfill < 0) {
      nk_sock_fail(dst, ECONNRESET, NK_END_BROKEN);
      return -1;
    }
    if ((uint32_t)dfill == dst->rx.size) {
      /* Full, bytes still waiting: the receiver kicks its socket when it drains. */
      if (nk_sock_rx_stall(dst, 1)) return moved;
      continue;
    }
    atomic_store_explicit(&ds->rx_stalled, 0, memory_order_relaxed); /* S1 withdrawn */
    uint64_t n = (uint64_t)fill;
    if (n > dst->rx.size - (uint64_t)dfill) n = dst->rx.size - (uint64_t)dfill;
    if (n > budget) n = budget;
    struct iovec from[2], to[2];
    int nf = nk_ring_iov(&src->tx, atomic_load_explicit(src->tx.tail, memory_order_relaxed),
                         (uint32_t)n, from);
    int nt = nk_ring_iov(&dst->rx, atomic_load_explicit(dst->rx.head, memory_order_relaxed),
                         (uint32_t)n, to);
    /* Two pieces each side at most (ring wrap): walk both. */
    size_t fo = 0, too = 0;
    for (int fi = 0, ti = 0; fi < nf && ti < nt;) {
      size_t c = from[fi].iov_len - fo;
      if (to[ti].iov_len - too < c) c = to[ti].iov_len - too;
      memcpy((char *)to[ti].iov_base + too, (char *)from[fi].iov_base + fo, c);
      fo += c;
      too += c;
      if (fo == from[fi].iov_len) fi++, fo = 0;
      if (too == to[ti].iov_len) ti++, too = 0;
    }
    nk_ring_produce(&dst->rx, (uint32_t)n);
    nk_ring_consume(&src->tx, (uint32_t)n);
    nk_sock_count(src, NK_TX, n);
    nk_sock_count(dst, NK_RX, n);
    moved += (int64_t)n;
    budget -= n;
  }
}

/* After the last byte, our FIN: the peer's guest reads EOF once its ring is drained. */
static void send_fin(struct nk_esock *from, struct nk_esock *to) {
  if (from->shm_fin_sent || !from->shut_wr_pending) return;
  if (nk_ring_fill_checked(&from->tx) != 0) return;
  from->shut_wr_pending = false;
  from->shm_fin_sent = true;
  nk_sock_end_of_stream(to);
}

/* The peer closed after its FIN and is gone. Bytes sent now would draw a reset from Linux;
 * the application's next send gets EPIPE, and the socket reads as hung up. */
static void peer_gone(struct nk_esock *es) {
  int64_t fill = nk_ring_fill_checked(&es->tx);
  if (fill < 0) {
    nk_sock_fail(es, ECONNRESET, NK_END_BROKEN);
    return;
  }
  es->shut_wr_pending = false;
  if (fill == 0) return;
  nk_ring_consume(&es->tx, (uint32_t)fill);
  atomic_store(&slot_of(es)->tx_closed, EPIPE);
  nk_sock_hang_up(es);
}

static void shm_transmit(struct nk_esock *es) {
  struct nk_esock *p = es->shm_peer;
  if (!p && es->shm_waiting) return; /* a live upgrade brings its peer back in a moment */
  if (!p) {
    peer_gone(es);
    return;
  }
  /* The bound on a service is about engine time: a byte copied ring to ring costs a fraction
   * of one sent through the kernel, and with 64 KiB the pair's wake-ups ate a third of its
   * throughput (38 Gbit/s vs 60). With the engine to itself, a ring's worth each way: both
   * rings' indices are the tenants' to move, so "until one is empty or full" could be forever. */
  uint64_t budget = engine.service_bytes == UINT64_MAX ? 2ull * es->tx.size : NK_SHM_SERVICE_BYTES;
  int64_t out = move(es, p, budget);
  if (out < 0) return;
  int64_t in = move(p, es, budget - (uint64_t)out);
  if (in < 0) return;
  if ((uint64_t)(out + in) >= budget) nk_sock_activate(es); /* the rest in a later round */
  send_fin(es, p);
  send_fin(p, es);
  nk_sock_release_blocker(p);
  nk_sock_maybe_ready(p);
  if (p->closing) nk_sock_activate(p); /* it may be waiting to flush into our ring */
}

static void unlink_pair(struct nk_esock *es, int err);

/* The application closed its last reference to es. True when es may be freed now; false
 * while its last bytes wait for room in the peer's ring (the peer's reads bring us back). */
static bool shm_finish(struct nk_esock *es) {
  struct nk_esock *p = es->shm_peer;
  if (!p && es->shm_waiting) return false; /* its peer comes back with a live upgrade */
  if (!p || es->dead) return true;
  int64_t unread = nk_ring_fill_checked(&es->rx);
  int64_t incoming = nk_ring_fill_checked(&p->tx);
  if (es->linger0 || unread != 0 || incoming != 0) {
    /* Linux resets a connection closed with unread data (or bytes still on the way). */
    unlink_pair(es, ECONNRESET);
    return true;
  }
  es->shut_wr_pending = true;
  int64_t moved = move(es, p, NK_SHM_SERVICE_BYTES);
  if (moved < 0) return true;
  if (!es->shm_peer) return true;
  if (nk_ring_fill_checked(&es->tx) > 0) {
    /* More than one service's worth left (a tenant can keep refilling a ring it closed):
     * come back in a later round rather than stay. */
    if ((uint64_t)moved >= NK_SHM_SERVICE_BYTES) nk_sock_activate(es);
    nk_sock_maybe_ready(p);
    return false;
  }
  send_fin(es, p);
  nk_sock_maybe_ready(p);
  unlink_pair(es, 0);
  return true;
}

/* Dissolve the pair. With err, the peer's connection is reset (its socket reports err, as
 * after a TCP reset); without, the peer just learns it is alone (see peer_gone). */
static void unlink_pair(struct nk_esock *es, int err) {
  struct nk_esock *p = es->shm_peer;
  if (!p) return;
  es->shm_peer = NULL;
  p->shm_peer = NULL;
  if (err && !p->dead) nk_sock_fail(p, err, NK_END_ERROR);
  nk_sock_activate(p);
}

static void shm_close(struct nk_esock *es, int k, bool rst) {
  (void)k;
  unlink_pair(es, rst ? ECONNRESET : 0);
}

static int shm_connect(struct nk_esock *es, const struct nk_addr *dst) {
  (void)es, (void)dst;
  return -EISCONN; /* it only ever carries a connection made by nk_shm_connect */
}

static int shm_open(struct nk_esock *es, int k) {
  (void)es, (void)k;
  return -EOPNOTSUPP; /* never opened as a socket: nk_shm_connect makes it */
}

const struct nk_ep_ops nk_shm_ep_ops = {
    .name = "shm",
    .open = shm_open,
    .connect = shm_connect,
    .transmit = shm_transmit,
    .finish = shm_finish,
    .close = shm_close,
};
