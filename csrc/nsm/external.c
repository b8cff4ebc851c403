/* The external NSM: a network stack in another process (such as csrc/nsm/lwip), driven over
 * ServiceLib queues (include/netkernel/servicelib.h, docs/servicelib.md). It has no kernel
 * sockets to give the engine: every endpoint on it is a ServiceLib socket id.
 *
 * The engine listens on one Unix socket per external NSM; the NSM process connects, gets the
 * queues and the regions of the tenants it serves, and from then on everything is nqes. A
 * few socket calls (socket, bind, listen, connect) wait for the NSM's reply, with a deadline;
 * the data path never waits: the engine hands out ring positions as credit and the NSM
 * reports what it took and wrote.
 *
 * Trust: the NSM's queues are read like a tenant's region: every nqe is copied out, checked
 * (opcode, socket id, counts against the credit given) and never followed as a pointer. An
 * NSM that breaks the protocol is disconnected; its tenants' connections fail as they do
 * when it dies, and the daemon restarts it.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "engine.h"
#include "netkernel/servicelib.h"

#define SYNC_TIMEOUT_NS  2000000000ull
#define SYNC_SPIN_NS     50000ull
#define EVENTS_PER_POLL  512
#define MAX_TENANTS_SEEN 1024

enum { REF_FREE = 0, REF_LIVE, REF_CLOSING };
struct ext_ref {
  struct nk_esock *es; /* REF_CLOSING: the socket waiting for FREED, or NULL */
  uint8_t k;
  uint8_t state;
};

struct nk_ext {
  struct nk_nsm *m;
  char path[108];
  int lfd, cfd; /* listening socket; the NSM's control connection (-1: none) */
  int shfd, nsm_bell, engine_bell;
  struct nk_sl_shared *sh;
  struct nk_handle h_listen, h_ctl, h_bell;
  struct ext_ref *ref; /* NK_SL_MAX_SOCKS */
  uint32_t tag;
  uint32_t connects;
  /* CLOSEs that found the request queue full: sent before anything else once there is room
   * (their ids stay REF_CLOSING meanwhile, so nothing reuses them or their rings). */
  struct nk_nqe *closes;
  size_t ncloses, closes_cap;
  uint32_t tenants[MAX_TENANTS_SEEN]; /* ids whose region the NSM has */
  uint32_t ntenants;
  bool broken;   /* broke the protocol or timed out inside a call: taken down at the next poll */
  bool resuming; /* taken over from the last engine: its events wait until every socket is back */
  struct ext_kept *kept; /* while resuming */
};

static const struct nk_ep_ops ext_ep_ops;
static bool up(const struct nk_ext *x) { return x && x->cfd >= 0; }
static void ext_down(struct nk_ext *x, const char *why);
static struct nk_ext *ext_of(const struct nk_esock *es, int k) { return es->ep[k].nsm->priv; }

/* es is a connection on this NSM (the ids of listeners and datagram sockets carry no stream). */
static bool is_conn(const struct nk_esock *es) {
  return es->kind == NK_KIND_STREAM && es->ep_count && es->ep[0].ops == &ext_ep_ops &&
         (es->state == NK_ST_CONNECTING || es->state == NK_ST_CONNECTED);
}

static void bell(struct nk_ext *x) {
  uint64_t one = 1;
  if (write(x->nsm_bell, &one, sizeof(one)) < 0) { /* saturated: it will look */
  }
}

/* Async request: the doorbell rings only while the NSM sleeps. */
static bool post(struct nk_ext *x, struct nk_nqe *q) {
  if (!up(x) || !nk_sl_push(&x->sh->req, q)) return false;
  /* W1: the request is published (K1) before the NSM's flag is read; pairs with W2 in
   * ServiceLib's nk_sl_may_sleep() (store sleeping, fence, look at the queue again): either
   * it finds the request or we find it asleep and ring. */
  atomic_thread_fence(memory_order_seq_cst);
  if (atomic_load(&x->sh->req.sleeping.v)) bell(x);
  return true;
}

/* Every tenant waits while the engine waits for the NSM: waits over 2 ms are logged (at most
 * once a second, with how many there were) so an operator can see a slow NSM. */
static void note_wait(struct nk_ext *x, uint32_t op, uint64_t ns) {
  static uint64_t last_ns, slow;
  if (ns < 2000000) return;
  slow++;
  uint64_t now = nk_now_ns();
  if (now - last_ns < 1000000000ull) return;
  NK_EVENT("nsm_slow_reply", "nsm=%s op=%u ms=%.1f slow_replies=%llu", x->m->name, op, ns / 1e6,
           (unsigned long long)slow);
  last_ns = now;
}

static int sync_req(struct nk_ext *x, struct nk_nqe *q, struct nk_nqe *rep) {
  if (!up(x) || x->broken) return -ENETDOWN;
  q->tag = ++x->tag;
  if (!nk_sl_push(&x->sh->req, q)) return -ENOBUFS;
  bell(x);
  uint64_t t0 = nk_now_ns();
  /* Replies are the NSM's to write: at most a queue's worth of stale ones can stand before
   * ours, so more than that is an NSM writing garbage (its head index runs on for ever). */
  uint32_t popped = 0;
  for (;;) {
    struct nk_nqe r;
    while (nk_sl_pop(&x->sh->rep, &r)) {
      if (r.op == NK_SLR_DONE && r.tag == q->tag) {
        *rep = r;
        note_wait(x, q->op, nk_now_ns() - t0);
        return 0;
      } /* else: the answer to a request that timed out earlier */
      if (++popped > NK_SL_QUEUE_LEN) {
        NK_EVENT("nsm_protocol_error", "nsm=%s reason=reply_flood op=%u", x->m->name, q->op);
        x->broken = true; /* taken down by the main loop, with nothing half-changed here */
        return -EPROTO;
      }
    }
    uint64_t now = nk_now_ns();
    if (now - t0 > SYNC_TIMEOUT_NS) {
      /* Every tenant waited with us: an NSM that does not answer is taken down (the daemon
       * restarts it), not waited for again on the next call. */
      NK_EVENT("nsm_timeout", "nsm=%s op=%u", x->m->name, q->op);
      x->broken = true;
      return -ETIMEDOUT;
    }
    if (now - t0 < SYNC_SPIN_NS) continue;
    struct pollfd p[2] = {{.fd = x->engine_bell, .events = POLLIN},
                          {.fd = x->cfd, .events = POLLRDHUP}};
    int ms = (int)((SYNC_TIMEOUT_NS - (now - t0)) / 1000000) + 1;
    if (poll(p, 2, ms) < 0 && errno != EINTR) return -errno;
    /* A dead NSM is taken down by the main loop (its control connection's hang-up): here
     * the caller just gets the error, with nothing half-changed under it. */
    if (p[1].revents & (POLLHUP | POLLERR | POLLRDHUP)) return -ENETDOWN;
    uint64_t v;
    if (p[0].revents & POLLIN) (void)!read(x->engine_bell, &v, sizeof(v));
  }
}

/* A reply's -errno, as the application will see it: an errno, whatever the NSM wrote. */
static int reply_errno(int32_t arg) {
  if (arg < 0 && arg >= -4095) return arg;
  if (arg > 0 && arg <= 4095) return -arg;
  return -EIO;
}

/* ---- the engine's side of a socket ---- */

static void ext_tenant_on(struct nk_nsm *m, struct nk_tenant *t);

static void ext_ref(struct nk_esock *es, int k) {
  if (es->ep[k].id == NK_EXT_LOST) return;
  ext_of(es, k)->ref[es->ep[k].id] = (struct ext_ref){.es = es, .k = (uint8_t)k, .state = REF_LIVE};
}

static int ext_open(struct nk_esock *es, int k) {
  struct nk_endpoint *e = &es->ep[k];
  struct nk_ext *x = e->nsm->priv;
  ext_tenant_on(e->nsm, es->t);
  struct nk_nqe q = {
      .op = NK_SLQ_SOCKET, .tenant = es->t->id, .arg = e->family, .arg2 = (uint32_t)es->type};
  struct nk_nqe r;
  int err = sync_req(x, &q, &r);
  if (err) return err;
  if (r.arg) return reply_errno(r.arg);
  if (r.sock >= NK_SL_MAX_SOCKS || x->ref[r.sock].state != REF_FREE) {
    NK_EVENT("nsm_protocol_error", "nsm=%s reason=socket_id id=%u", e->nsm->name, r.sock);
    return -EPROTO;
  }
  e->fd = -1;
  e->id = r.sock;
  e->port = 0;
  ext_ref(es, k);
  return 0;
}

static void ext_watch(struct nk_esock *es, int k, uint32_t events) {
  (void)events; /* its events come from the NSM: they must name k */
  ext_ref(es, k);
}

static int answer(struct nk_ext *x, struct nk_nqe *q, struct nk_nqe *r) {
  int err = sync_req(x, q, r);
  if (err) return err;
  return r->arg ? reply_errno(r->arg) : 0;
}

static int ext_bind(struct nk_esock *es, int k, const struct nk_addr *a, bool source) {
  (void)source;
  struct nk_endpoint *e = &es->ep[k];
  if (e->id == NK_EXT_LOST) return -ENETDOWN;
  struct nk_nqe q = {.op = NK_SLQ_BIND, .sock = e->id, .addr = *a}, r;
  int err = answer(e->nsm->priv, &q, &r);
  if (!err) e->port = r.addr.port ? r.addr.port : a->port;
  return err;
}

static uint16_t ext_port(struct nk_esock *es, int k) { return es->ep[k].port; }

static int ext_listen(struct nk_esock *es, int k, int backlog) {
  if (es->ep[k].listening) return 0; /* again: the backlog is the engine's to hold */
  if (es->ep[k].id == NK_EXT_LOST) return -ENETDOWN;
  struct nk_nqe q = {.op = NK_SLQ_LISTEN, .sock = es->ep[k].id, .arg = backlog}, r;
  return answer(ext_of(es, k), &q, &r);
}

/* It answers a stream's connect with CONNECTED or ERROR; a datagram socket is connected at
 * once, as a kernel UDP socket. */
static int ext_connect(struct nk_esock *es, const struct nk_addr *dst) {
  if (es->ep[0].id == NK_EXT_LOST) return -ENETDOWN;
  struct nk_nqe q = {.op = NK_SLQ_CONNECT, .sock = es->ep[0].id, .addr = *dst}, r;
  int err = answer(ext_of(es, 0), &q, &r);
  return err ? err : es->kind == NK_KIND_STREAM;
}

static void ext_transmit(struct nk_esock *es);

/* The application's int options (TCP_NODELAY matters most: nginx relies on it) reach the NSM's
 * socket; whether its stack has them is the NSM's business. */
static int ext_setopt(struct nk_esock *es, int k, int level, int name, const void *val,
                      socklen_t len) {
  if (es->ep[k].id == NK_EXT_LOST || len != sizeof(int)) return NK_NO_VERDICT;
  if (level != SOL_SOCKET && level != IPPROTO_TCP) return NK_NO_VERDICT;
  int v;
  memcpy(&v, val, sizeof(v));
  /* Program order: the bytes written before the call reach the NSM before the option (an
   * uncork must find them there). */
  if (k == 0 && is_conn(es) && es->state == NK_ST_CONNECTED && es->ext.attached) {
    ext_transmit(es);
    /* That may have reset the socket (a tenant that broke its ring): nothing left to set. */
    if (es->ep_count <= k || es->ep[k].ops != &ext_ep_ops || es->ep[k].id == NK_EXT_LOST)
      return NK_NO_VERDICT;
  }
  struct nk_nqe q = {.op = NK_SLQ_SETOPT,
                     .sock = es->ep[k].id,
                     .arg = level,
                     .arg2 = (uint32_t)name,
                     .len = (uint32_t)v};
  post(ext_of(es, k), &q);
  return NK_NO_VERDICT; /* whether its stack has it is the NSM's business */
}

/* One datagram of the tenant's transmit ring (at ring position pos) to the NSM, through its
 * outgoing area. dst family 0: the connected peer. False when it was dropped (area full, NSM
 * down), as UDP may drop. */
static int ext_send_dgram(struct nk_esock *es, int k, const struct nk_addr *dst, uint32_t pos,
                          uint32_t len, const void *ctl, size_t ctl_len) {
  (void)ctl, (void)ctl_len; /* the external-NSM interface carries no control messages */
  struct nk_ext *x = ext_of(es, k);
  if (!up(x) || es->ep[k].id == NK_EXT_LOST) return -ENETDOWN;
  struct nk_sl_area *a = &x->sh->dg_out;
  if (nk_sl_area_room(a) < len) return -ENOBUFS;
  uint32_t head = atomic_load_explicit(&a->head.v, memory_order_relaxed);
  struct iovec iov[2];
  int cnt = nk_ring_iov(&es->tx, pos, len, iov);
  uint32_t at = head;
  for (int i = 0; i < cnt; i++) {
    nk_sl_area_copy_in(a, at, iov[i].iov_base, (uint32_t)iov[i].iov_len);
    at += (uint32_t)iov[i].iov_len;
  }
  struct nk_nqe q = {.op = NK_SLQ_SENDTO, .sock = es->ep[k].id, .off = head, .len = len};
  if (dst) q.addr = *dst;
  /* A1: the bytes before the head; pairs with A2 in nk_sl_area_valid() (nk_sl_dgram_take()). */
  atomic_store_explicit(&a->head.v, head + len, memory_order_release);
  if (!post(x, &q)) {
    atomic_store_explicit(&a->head.v, head, memory_order_relaxed); /* not announced: take back */
    return -ENOBUFS;
  }
  return (int)len;
}

/* A datagram the NSM received: into the socket's receive ring as a record, or dropped when
 * the ring is full (as Linux drops at a full receive buffer). The area is freed either way. */
static bool dgram_in(struct nk_ext *x, const struct nk_nqe *e, struct nk_esock *es, int k) {
  struct nk_sl_area *a = &x->sh->dg_in;
  if (!nk_sl_area_valid(a, e->off, e->len) || e->len > NK_DGRAM_MAX) return false;
  uint32_t need = (uint32_t)NK_DGRAM_SPACE(e->len);
  int64_t fill = es ? nk_ring_fill_checked(&es->rx) : -1;
  if (es && es->kind == NK_KIND_DGRAM && !es->dead && fill >= 0 &&
      es->rx.size - (uint32_t)fill >= need &&
      (e->addr.family == AF_INET || e->addr.family == AF_INET6)) {
    uint32_t head = atomic_load_explicit(es->rx.head, memory_order_relaxed);
    struct iovec iov[2];
    int cnt = nk_ring_iov(&es->rx, head + sizeof(struct nk_dgram), e->len, iov);
    uint32_t at = (uint32_t)e->off;
    for (int i = 0; i < cnt; i++) {
      nk_sl_area_copy_out(a, at, iov[i].iov_base, (uint32_t)iov[i].iov_len);
      at += (uint32_t)iov[i].iov_len;
    }
    struct nk_dgram h = {.len = e->len, .addr = e->addr};
    h.addr.scope_id = 0;
    nk_ring_copy_in(&es->rx, head, &h, sizeof(h));
    nk_ring_produce(&es->rx, need);
    nk_sock_count(es, NK_RX, e->len);
    nk_policy_charge_dgram(es, es->ep[k].nsm, NK_RX, e->len);
    nk_sock_activate(es);
  }
  /* A3: the bytes were copied out before the space is freed; pairs with A4 in
   * nk_sl_area_room() (the NSM's nk_sl_dgram_post()). */
  atomic_store_explicit(&a->tail.v, (uint32_t)e->off + e->len, memory_order_release);
  return true;
}

static bool flush_closes(struct nk_ext *x) {
  size_t i = 0;
  while (i < x->ncloses && post(x, &x->closes[i])) i++;
  if (i) memmove(x->closes, x->closes + i, (x->ncloses - i) * sizeof(*x->closes));
  x->ncloses -= i;
  return x->ncloses == 0;
}

/* CLOSE for id: now, or as soon as the queue has room. False only when out of memory. */
static bool post_close(struct nk_ext *x, uint32_t id, bool rst) {
  struct nk_nqe q = {.op = NK_SLQ_CLOSE, .sock = id, .arg = rst};
  if (flush_closes(x) && post(x, &q)) return true;
  if (x->ncloses == x->closes_cap) {
    size_t cap = x->closes_cap ? 2 * x->closes_cap : 64;
    struct nk_nqe *c = realloc(x->closes, cap * sizeof(*c));
    if (!c) return false;
    x->closes = c;
    x->closes_cap = cap;
  }
  x->closes[x->ncloses++] = q;
  return true;
}

static void ext_close(struct nk_esock *es, int k, bool rst) {
  struct nk_ext *x = ext_of(es, k);
  uint32_t id = es->ep[k].id;
  es->ep[k].id = NK_EXT_LOST;
  if (id == NK_EXT_LOST || !up(x)) return;
  if (!post_close(x, id, rst)) {
    ext_down(x, "out of memory for its requests");
    return;
  }
  /* Until FREED the NSM may still touch the socket's rings: the slot stays reserved. */
  x->ref[id] = (struct ext_ref){.es = es, .state = REF_CLOSING};
  es->ep_held++;
}

static void attach(struct nk_esock *es) {
  uint32_t tail = atomic_load(es->tx.tail), head = atomic_load(es->rx.head);
  es->ext.tx_off = tail;
  es->ext.rx_credit = head;
  struct nk_nqe q = {.op = NK_SLQ_ATTACH,
                     .sock = es->ep[0].id,
                     .tenant = es->t->id,
                     .off = (uint64_t)(es->tx.data - es->t->base),
                     .arg2 = es->tx.size,
                     .len = tail,
                     .arg = (int32_t)head};
  es->ext.attached = post(ext_of(es, 0), &q);
}

/* The connection's NSM, when it can take requests; it has the socket's rings from then on. A
 * request that found the NSM's queue full is tried again in a later round. */
static struct nk_ext *ready(struct nk_esock *es) {
  if (!es->ep_count || es->ep[0].ops != &ext_ep_ops) return NULL; /* closed */
  struct nk_ext *x = ext_of(es, 0);
  if (es->ep[0].id == NK_EXT_LOST || !up(x)) return NULL;
  if (!es->ext.attached) attach(es);
  if (!es->ext.attached) {
    nk_sock_activate(es);
    return NULL;
  }
  return x;
}

/* What policy grants of `avail` bytes in direction dir, posted to the NSM as one `op` request
 * (SEND: bytes to take from the transmit ring; RECV: room to fill in the receive ring) and
 * charged. Returns the bytes posted; 0 when policy granted none (it wakes the socket when
 * tokens are due) or the queue to the NSM is full (the socket tries again next round). */
static uint32_t offer(struct nk_ext *x, struct nk_esock *es, int dir, uint32_t op, uint32_t avail) {
  struct nk_nsm *m = es->ep[0].nsm;
  uint64_t g = nk_policy_grant(es, m, dir, avail, avail < NK_QUANTUM ? avail : NK_QUANTUM);
  if (!g) return 0;
  struct nk_nqe q = {.op = op, .sock = es->ep[0].id, .len = (uint32_t)g};
  if (!post(x, &q)) {
    nk_sock_activate(es);
    return 0;
  }
  nk_policy_charge(es, m, dir, g);
  return (uint32_t)g;
}

/* Offer the transmit ring's new bytes. The NSM reads them in the tenant's ring, never its
 * indices: the order comes by way of the engine, C0 (the guest's bytes, here) then K1 (the
 * SEND nqe, which the NSM pops with K2 before it reads them). */
static void ext_transmit(struct nk_esock *es) {
  struct nk_ext *x = ready(es);
  if (!x) return;
  int64_t fill = nk_ring_fill_checked(&es->tx);
  uint32_t tail = atomic_load_explicit(es->tx.tail, memory_order_relaxed);
  uint32_t offered = es->ext.tx_off - tail;
  if (fill < 0 || offered > (uint64_t)fill) { /* the tenant moved its head back */
    nk_sock_fail(es, ECONNRESET, NK_END_BROKEN);
    return;
  }
  uint32_t fresh = (uint32_t)fill - offered;
  if (fresh) es->ext.tx_off += offer(x, es, NK_TX, NK_SLQ_SEND, fresh);
  if (fill == 0 && es->shut_wr_pending) {
    struct nk_nqe q = {.op = NK_SLQ_SHUTDOWN, .sock = es->ep[0].id};
    if (post(x, &q)) es->shut_wr_pending = false;
    else nk_sock_activate(es);
  }
}

/* Grant receive room as the application drains: P0 (the guest's tail, here) then K1 (the
 * RECV nqe): the NSM writes only after the guest's reads of that room. */
static void ext_receive(struct nk_esock *es) {
  struct nk_ext *x = ready(es);
  if (!x) return;
  struct nk_slot *s = nk_sock_slot(es);
  if (es->ext.fin || atomic_load(&s->rx_eof)) return;
  int64_t rfill = nk_ring_fill_checked(&es->rx);
  if (rfill < 0) {
    nk_sock_fail(es, ECONNRESET, NK_END_BROKEN);
    return;
  }
  uint32_t head = atomic_load_explicit(es->rx.head, memory_order_relaxed);
  uint32_t limit = head - (uint32_t)rfill + es->rx.size;
  uint32_t room = limit - es->ext.rx_credit, outstanding = es->ext.rx_credit - head;
  if (room > es->rx.size) return; /* the tenant moved its tail back: its own loss */
  if (room == 0 && outstanding == 0) {
    nk_sock_rx_stall(es, 1); /* it kicks us when it drains */
    return;
  }
  atomic_store_explicit(&s->rx_stalled, 0, memory_order_relaxed); /* S1 withdrawn */
  if (room == 0 || (room < es->rx.size / 4 && outstanding > 0)) return;
  es->ext.rx_credit += offer(x, es, NK_RX, NK_SLQ_RECV, room);
}

/* A connection the engine could not take (admission limit, full accept queue): reset it. */
static void refuse(struct nk_ext *x, uint32_t id) {
  if (post_close(x, id, true)) x->ref[id] = (struct ext_ref){.state = REF_CLOSING};
  else ext_down(x, "out of memory for its requests");
}

/* ---- events from the NSM ---- */

static bool protocol_error(struct nk_ext *x, const struct nk_nqe *e, const char *what) {
  NK_EVENT("nsm_protocol_error", "nsm=%s reason=%s op=%u id=%u len=%u", x->m->name, what, e->op,
           e->sock, e->len);
  ext_down(x, "protocol error");
  return false;
}

static bool handle(struct nk_ext *x, const struct nk_nqe *e) {
  if (e->sock >= NK_SL_MAX_SOCKS) return protocol_error(x, e, "socket_id");
  struct ext_ref *ref = &x->ref[e->sock];
  if (e->op == NK_SLE_FREED) {
    if (ref->state != REF_CLOSING) return protocol_error(x, e, "freed_unknown");
    struct nk_esock *es = ref->es;
    *ref = (struct ext_ref){0};
    if (es && --es->ep_held == 0 && es->closing) nk_sock_activate(es);
    return true;
  }
  if (e->op == NK_SLE_ACCEPTED) {
    if (ref->state != REF_FREE || e->arg < 0 || (uint32_t)e->arg >= NK_SL_MAX_SOCKS)
      return protocol_error(x, e, "accepted_id");
    struct ext_ref *l = &x->ref[e->arg];
    if (l->state == REF_CLOSING) { /* the listener is going */
      refuse(x, e->sock);
      return true;
    }
    if (l->state != REF_LIVE || l->es->kind != NK_KIND_LISTENER)
      return protocol_error(x, e, "accepted_listener");
    struct nk_addr peer = e->addr;
    const struct nk_endpoint *le = &l->es->ep[l->k];
    if (peer.family != le->family) return protocol_error(x, e, "accepted_family");
    struct nk_endpoint conn = {.ops = &ext_ep_ops,
                               .nsm = x->m,
                               .family = le->family,
                               .fd = -1,
                               .id = e->sock,
                               .port = l->es->bind_addr.port};
    if (!nk_sock_accepted(l->es, &conn, NULL, &peer)) refuse(x, e->sock);
    return true;
  }
  if (e->op == NK_SLE_DGRAM) /* the area must be freed whatever became of the socket */
    return dgram_in(x, e, ref->state == REF_LIVE ? ref->es : NULL, ref->k) ||
           protocol_error(x, e, "dgram_area");
  if (ref->state == REF_CLOSING) return true; /* sent before it saw our CLOSE */
  if (ref->state != REF_LIVE) return protocol_error(x, e, "unknown_socket");
  struct nk_esock *es = ref->es;
  if (es->freed || es->dead) return true;
  switch (e->op) {
    case NK_SLE_CONNECTED:
    case NK_SLE_ERROR:
      if (e->op == NK_SLE_ERROR && (e->arg <= 0 || e->arg > 4095))
        return protocol_error(x, e, "errno");
      if (es->state == NK_ST_CONNECTING && is_conn(es)) {
        if (e->op == NK_SLE_CONNECTED && e->addr.port) es->ep[0].port = e->addr.port;
        nk_sock_connected(es, e->op == NK_SLE_ERROR ? e->arg : 0);
      } else if (e->op == NK_SLE_ERROR && is_conn(es)) {
        nk_sock_fail(es, e->arg, NK_END_ERROR);
      }
      return true;
    case NK_SLE_SENT: {
      uint32_t tail = atomic_load_explicit(es->tx.tail, memory_order_relaxed);
      if (!is_conn(es) || e->len > es->ext.tx_off - tail) return protocol_error(x, e, "sent_len");
      /* The NSM copied the bytes out before it pushed SENT (K1), we popped it (K2): C1 hands
       * the space back to the guest after them. */
      nk_ring_consume(&es->tx, e->len);
      nk_sock_count(es, NK_TX, e->len);
      nk_sock_activate(es);
      return true;
    }
    case NK_SLE_RECVD: {
      uint32_t head = atomic_load_explicit(es->rx.head, memory_order_relaxed);
      if (!is_conn(es) || es->ext.fin || e->len > es->ext.rx_credit - head)
        return protocol_error(x, e, "recvd_len");
      /* The NSM wrote the bytes before it pushed RECVD (K1), we popped it (K2): P1 passes them
       * on to the guest. */
      nk_ring_produce(&es->rx, e->len);
      nk_sock_count(es, NK_RX, e->len);
      nk_sock_activate(es);
      return true;
    }
    case NK_SLE_FIN:
      if (!is_conn(es)) return protocol_error(x, e, "fin");
      es->ext.fin = true;
      if (!atomic_load(&es->t->slots[es->slot].rx_eof)) nk_sock_end_of_stream(es);
      nk_sock_activate(es);
      return true;
  }
  return protocol_error(x, e, "opcode");
}

static bool ext_poll(struct nk_ext *x) {
  if (!up(x) || x->resuming) return false;
  if (x->broken) {
    ext_down(x, "protocol error or no answer");
    return true;
  }
  if (x->ncloses) flush_closes(x);
  struct nk_nqe e;
  int n = 0;
  while (n < EVENTS_PER_POLL && up(x) && nk_sl_pop(&x->sh->evt, &e)) {
    n++;
    if (!handle(x, &e)) break;
  }
  return n > 0;
}

static int ext_is_up(struct nk_nsm *m) { return up(m->priv); }
static uint32_t ext_connects(struct nk_nsm *m) { return ((struct nk_ext *)m->priv)->connects; }

static bool ext_poll_nsm(struct nk_nsm *m) { return ext_poll(m->priv); }

/* The engine announces its sleep in the NSM's event queue as in each tenant region: part of
 * W4 (main()'s sleep path, then ext_poll()); pairs with W3 in ServiceLib's nk_sl_flush(). */
static void ext_set_sleeping(struct nk_nsm *m, bool v) {
  struct nk_ext *x = m->priv;
  if (up(x)) atomic_store(&x->sh->evt.sleeping.v, (uint32_t)v);
}

/* ---- tenants ---- */

static int send_ctl(int fd, const struct nk_sl_ctl *m, const int *fds, int nfds) {
  return nk_send_with_fds(sendmsg, fd, m, sizeof(*m), fds, nfds, MSG_NOSIGNAL) ==
                 (ssize_t)sizeof(*m)
             ? 0
             : -errno;
}

/* Only the NSMs serving a tenant (it is assigned there, or has sockets there) map its region. */
static void ext_tenant_on(struct nk_nsm *m, struct nk_tenant *t) {
  struct nk_ext *x = m->priv;
  if (!up(x)) return;
  for (uint32_t i = 0; i < x->ntenants; i++)
    if (x->tenants[i] == t->id) return;
  if (x->ntenants == MAX_TENANTS_SEEN) return;
  struct nk_sl_ctl c = {
      .op = NK_SLC_TENANT_ADD, .tenant = t->id, .size = t->size, .ipv4 = t->ipv4, .ipv6 = t->ipv6};
  snprintf(c.name, sizeof(c.name), "%s", t->name);
  if (send_ctl(x->cfd, &c, &t->memfd, 1) == 0) x->tenants[x->ntenants++] = t->id;
}

static void ext_tenant_gone(struct nk_nsm *m, struct nk_tenant *t) {
  struct nk_ext *x = m->priv;
  for (uint32_t i = 0; i < x->ntenants; i++) {
    if (x->tenants[i] != t->id) continue;
    x->tenants[i] = x->tenants[--x->ntenants];
    struct nk_sl_ctl c = {.op = NK_SLC_TENANT_DEL, .tenant = t->id};
    if (up(x)) send_ctl(x->cfd, &c, NULL, 0);
    break;
  }
}

/* ---- the NSM process comes and goes ---- */

static void ext_down(struct nk_ext *x, const char *why) {
  if (!up(x)) return;
  NK_EVENT("nsm_down", "nsm=%s reason=\"%s\"", x->m->name, why);
  nk_epoll_del(x->cfd);
  nk_epoll_del(x->engine_bell);
  nk_close_later(x->cfd); /* it may have queued descriptors there */
  x->cfd = -1;
  x->broken = false;
  /* Every socket it held is gone: connections fail as Linux fails them when the peer's
   * stack vanishes (reset), connects are refused, listeners wait for the next process. */
  for (uint32_t id = 0; id < NK_SL_MAX_SOCKS; id++) {
    struct ext_ref r = x->ref[id];
    x->ref[id] = (struct ext_ref){0};
    if (r.state == REF_CLOSING) {
      if (r.es && --r.es->ep_held == 0 && r.es->closing) nk_sock_activate(r.es);
      continue;
    }
    if (r.state != REF_LIVE) continue;
    struct nk_esock *es = r.es;
    es->ep[r.k].id = NK_EXT_LOST;
    if (es->kind == NK_KIND_LISTENER || es->dead) continue;
    if (es->state == NK_ST_CONNECTING) nk_sock_connected(es, ECONNREFUSED);
    else nk_sock_fail(es, ECONNRESET, NK_END_ERROR);
    nk_sock_activate(es);
  }
  x->ncloses = 0;
  munmap(x->sh, sizeof(*x->sh));
  x->sh = NULL;
  close(x->shfd);
  close(x->nsm_bell);
  close(x->engine_bell);
  x->ntenants = 0;
}

static void ext_up(struct nk_ext *x, int cfd) {
  /* Sealed at its size, as a tenant region: the NSM must not be able to shrink it under us. */
  x->shfd = memfd_create("netkernel-servicelib", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  x->nsm_bell = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  x->engine_bell = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  void *sh = MAP_FAILED;
  if (x->shfd >= 0 && ftruncate(x->shfd, sizeof(struct nk_sl_shared)) == 0 &&
      fcntl(x->shfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) == 0)
    sh = mmap(NULL, sizeof(struct nk_sl_shared), PROT_READ | PROT_WRITE, MAP_SHARED, x->shfd, 0);
  if (sh == MAP_FAILED || x->nsm_bell < 0 || x->engine_bell < 0) {
    NK_INFO("nsm %s: cannot set up its queues", x->m->name);
    if (sh != MAP_FAILED) munmap(sh, sizeof(struct nk_sl_shared));
    if (x->shfd >= 0) close(x->shfd);
    if (x->nsm_bell >= 0) close(x->nsm_bell);
    if (x->engine_bell >= 0) close(x->engine_bell);
    nk_close_later(cfd);
    return;
  }
  x->sh = sh;
  x->sh->magic = NK_SL_MAGIC;
  x->sh->version = NK_SL_VERSION;
  x->sh->queue_len = NK_SL_QUEUE_LEN;
  x->sh->area_size = NK_SL_AREA_SIZE;
  struct nk_sl_ctl hello = {
      .op = NK_SLC_HELLO, .version = NK_SL_VERSION, .size = sizeof(struct nk_sl_shared)};
  snprintf(hello.name, sizeof(hello.name), "%s", x->m->name);
  int fds[3] = {x->shfd, x->nsm_bell, x->engine_bell};
  if (send_ctl(cfd, &hello, fds, 3) < 0) {
    munmap(x->sh, sizeof(*x->sh));
    close(x->shfd);
    close(x->nsm_bell);
    close(x->engine_bell);
    nk_close_later(cfd);
    return;
  }
  x->cfd = cfd;
  x->connects++;
  nk_epoll_add(cfd, EPOLLRDHUP, &x->h_ctl);
  nk_epoll_add(x->engine_bell, EPOLLIN, &x->h_bell);
  NK_EVENT("nsm_up", "nsm=%s", x->m->name);
  /* Its tenants' regions, then the listeners it lost when the previous process went. */
  for (struct nk_tenant *t = engine.tenants; t; t = t->next) {
    if (t->dead) continue;
    bool on = t->nsm == x->m;
    for (uint32_t i = 0; i < t->hwm && !on; i++) {
      struct nk_esock *es = t->socks[i];
      for (int k = 0; es && k < es->ep_count; k++) on |= es->ep[k].nsm == x->m;
    }
    if (!on) continue;
    ext_tenant_on(x->m, t);
    for (uint32_t i = 0; i < t->hwm; i++) {
      struct nk_esock *es = t->socks[i];
      if (!es || es->kind != NK_KIND_LISTENER) continue;
      for (int k = 0; k < es->ep_count; k++)
        if (es->ep[k].nsm == x->m && es->ep[k].id == NK_EXT_LOST) nk_sock_relisten(es, k);
    }
  }
}

enum { H_LISTEN, H_CTL, H_BELL }; /* its epoll handles (NK_H_NSM, idx) */

static void ext_event(struct nk_nsm *m, int which, uint32_t ev) {
  struct nk_ext *x = m->priv;
  if (which == H_LISTEN) {
    int fd = accept4(x->lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) return;
    /* Only root in the NSM's own namespace (where the daemon starts its process) may serve
     * it: a tenant's root is not root here (user namespace), and a process elsewhere that
     * stood in for the NSM would be handed tenants' regions. */
    struct ucred cr = {0};
    uint64_t ns = nk_peer_netns(fd, &cr);
    struct stat st;
    uint64_t want = fstat(x->m->netns_fd, &st) == 0 ? st.st_ino : 1;
    if (cr.uid != 0 || ns != want) {
      NK_INFO("nsm %s: refused a connection from pid %d uid %d (root in the NSM's namespace only)",
              x->m->name, (int)cr.pid, (int)cr.uid);
      nk_close_later(fd);
      return;
    }
    if (up(x)) {
      /* One process per NSM. The old one may be dying: its hang-up is what lets the next in. */
      NK_INFO("nsm %s: a second process was refused (one is connected)", x->m->name);
      nk_close_later(fd);
      return;
    }
    ext_up(x, fd);
  } else if (which == H_CTL) {
    if (ev & (EPOLLHUP | EPOLLERR | EPOLLRDHUP)) ext_down(x, "the NSM process went away");
  } else if (which == H_BELL) {
    uint64_t v;
    (void)!read(x->engine_bell, &v, sizeof(v));
    ext_poll(x);
  }
}

/* ---- a live upgrade: the NSM process stays connected, to the next engine ---- */

/* What the next engine needs besides the sockets (which carry their ids): the process's
 * connection, queues and doorbells (the daemon keeps them open, so the process sees nothing),
 * the tenants it was given, the request tag, and the ids being closed (their sockets named by
 * tenant, slot and generation). Bounded: an NSM with more in flight is not handed over (its
 * sockets then read as reset, as when the process dies). */
#define KEPT_TENANTS 256
#define KEPT_CLOSING 64
#define KEPT_CLOSES  32
struct ext_kept {
  uint32_t version, size;
  uint32_t tag, connects, ntenants, nclosing, ncloses;
  uint32_t tenants[KEPT_TENANTS];
  struct {
    uint32_t id, slot, gen;
    char tenant[64]; /* "" when its socket is gone already */
  } closing[KEPT_CLOSING];
  struct nk_nqe closes[KEPT_CLOSES];
};

static bool ext_hand_over(struct nk_nsm *m) {
  struct nk_ext *x = m->priv;
  if (!up(x) || x->broken || x->ntenants > KEPT_TENANTS || x->ncloses > KEPT_CLOSES) return false;
  static struct ext_kept k;
  memset(&k, 0, sizeof(k));
  k.version = NK_KEPT_VERSION;
  k.size = sizeof(k);
  k.tag = x->tag;
  k.connects = x->connects;
  k.ntenants = x->ntenants;
  memcpy(k.tenants, x->tenants, sizeof(k.tenants[0]) * x->ntenants);
  k.ncloses = (uint32_t)x->ncloses;
  memcpy(k.closes, x->closes, sizeof(k.closes[0]) * x->ncloses);
  for (uint32_t id = 0; id < NK_SL_MAX_SOCKS; id++) {
    struct ext_ref *r = &x->ref[id];
    if (r->state != REF_CLOSING) continue;
    if (k.nclosing == KEPT_CLOSING) return false;
    k.closing[k.nclosing].id = id;
    if (r->es) {
      snprintf(k.closing[k.nclosing].tenant, 64, "%s", r->es->t->name);
      k.closing[k.nclosing].slot = r->es->slot;
      k.closing[k.nclosing].gen = r->es->gen;
    }
    k.nclosing++;
  }
  int fds[4] = {x->cfd, x->shfd, x->nsm_bell, x->engine_bell};
  return nk_keep_nsm_out(m, &k, sizeof(k), fds, 4);
}

/* In init: the process, queues and doorbells the last engine handed over, if any. */
static bool ext_take_over(struct nk_ext *x) {
  size_t len;
  int fds[NK_FDPASS_MAX], nfds = 0;
  struct ext_kept *k = nk_keep_nsm_in(x->m->name, &len, fds, &nfds);
  if (!k) return false;
  void *sh = MAP_FAILED;
  bool ok = nfds == 4 && len == sizeof(*k) && k->version == NK_KEPT_VERSION &&
            k->size == sizeof(*k) && k->ntenants <= KEPT_TENANTS && k->nclosing <= KEPT_CLOSING &&
            k->ncloses <= KEPT_CLOSES;
  if (ok)
    sh = mmap(NULL, sizeof(struct nk_sl_shared), PROT_READ | PROT_WRITE, MAP_SHARED, fds[1], 0);
  if (!ok || sh == MAP_FAILED) {
    NK_INFO("nsm %s: what the last engine handed over is unusable: its process starts over",
            x->m->name);
    for (int i = 0; i < nfds; i++) close(fds[i]);
    free(k);
    return false;
  }
  x->cfd = fds[0];
  x->shfd = fds[1];
  x->nsm_bell = fds[2];
  x->engine_bell = fds[3];
  x->sh = sh;
  x->tag = k->tag;
  x->connects = k->connects;
  x->ntenants = k->ntenants;
  memcpy(x->tenants, k->tenants, sizeof(k->tenants[0]) * k->ntenants);
  for (uint32_t i = 0; i < k->ncloses; i++) post_close(x, k->closes[i].sock, k->closes[i].arg);
  for (uint32_t i = 0; i < k->nclosing; i++) {
    uint32_t id = k->closing[i].id;
    if (id >= NK_SL_MAX_SOCKS) continue;
    x->ref[id] = (struct ext_ref){.state = REF_CLOSING};
  }
  x->kept = k; /* the closing ids' sockets are named once they are back (ext_resume) */
  x->resuming = true;
  NK_EVENT("nsm_taken_over", "nsm=%s tenants=%u closing=%u", x->m->name, k->ntenants, k->nclosing);
  return true;
}

/* Every tenant and socket is back: the closing ids find their sockets, and the process's
 * events are read again. */
static void ext_resume(struct nk_nsm *m) {
  struct nk_ext *x = m->priv;
  if (!x || !x->resuming) return;
  struct ext_kept *k = x->kept;
  for (uint32_t i = 0; k && i < k->nclosing; i++) {
    uint32_t id = k->closing[i].id;
    if (id >= NK_SL_MAX_SOCKS || !k->closing[i].tenant[0]) continue;
    k->closing[i].tenant[63] = 0;
    struct nk_tenant *t = nk_tenant_find(k->closing[i].tenant);
    struct nk_esock *es = t ? nk_esock_get(t, k->closing[i].slot, k->closing[i].gen) : NULL;
    if (es && es->ep_held) x->ref[id].es = es; /* its ep_held came with it */
  }
  free(k);
  x->kept = NULL;
  x->resuming = false;
  nk_epoll_add(x->cfd, EPOLLRDHUP, &x->h_ctl);
  nk_epoll_add(x->engine_bell, EPOLLIN, &x->h_bell);
  ext_poll(x);
}

/* "external:PATH": the NSM process connects to the engine at PATH. */
static int ext_init(struct nk_nsm *m, const char *path) {
  if (!path) return -EINVAL;
  struct nk_ext *x = calloc(1, sizeof(*x));
  if (!x) return -ENOMEM;
  x->ref = calloc(NK_SL_MAX_SOCKS, sizeof(*x->ref));
  int r = !x->ref ? -ENOMEM : strlen(path) >= sizeof(x->path) ? -ENAMETOOLONG : 0;
  if (r) {
    free(x->ref);
    free(x);
    return r;
  }
  snprintf(x->path, sizeof(x->path), "%s", path);
  x->lfd = nk_unix_listen(path, SOCK_SEQPACKET, 0600, 4);
  if (x->lfd < 0) {
    r = x->lfd;
    free(x->ref);
    free(x);
    return r;
  }
  x->m = m;
  x->cfd = -1;
  x->h_listen = (struct nk_handle){NK_H_NSM, H_LISTEN, m};
  x->h_ctl = (struct nk_handle){NK_H_NSM, H_CTL, m};
  x->h_bell = (struct nk_handle){NK_H_NSM, H_BELL, m};
  nk_epoll_add(x->lfd, EPOLLIN, &x->h_listen);
  m->priv = x;
  ext_take_over(x);
  return 0;
}

static void ext_fini(struct nk_nsm *m) {
  struct nk_ext *x = m->priv;
  if (!x) return;
  ext_down(x, "the NSM was removed");
  nk_epoll_del(x->lfd);
  close(x->lfd);
  unlink(x->path);
  free(x->closes);
  free(x->kept);
  free(x->ref);
  free(x);
  m->priv = NULL;
}

/* A socket freed while the NSM still holds closed ids of it (its tenant was deleted): those
 * ids must not name it any more. Rare, so a scan. */
static void ext_forget(struct nk_nsm *m, struct nk_esock *es) {
  struct nk_ext *x = m->priv;
  for (uint32_t id = 0; id < NK_SL_MAX_SOCKS; id++)
    if (x->ref[id].es == es) {
      if (x->ref[id].state == REF_LIVE) x->ref[id] = (struct ext_ref){0};
      else x->ref[id].es = NULL;
    }
}

static const struct nk_ep_ops ext_ep_ops = {
    .name = "external",
    .open = ext_open,
    .setopt = ext_setopt,
    .bind = ext_bind,
    .port = ext_port,
    .listen = ext_listen,
    .connect = ext_connect,
    .transmit = ext_transmit,
    .receive = ext_receive,
    .send_dgram = ext_send_dgram,
    .finish = nk_sock_finish_stream,
    .close = ext_close,
    .watch = ext_watch,
};

static struct nk_nsm_type external_type = {
    .type = "external",
    .ep = &ext_ep_ops,
    .init = ext_init,
    .fini = ext_fini,
    .tenant_on = ext_tenant_on,
    .tenant_gone = ext_tenant_gone,
    .forget = ext_forget,
    .is_up = ext_is_up,
    .connects = ext_connects,
    .poll = ext_poll_nsm,
    .set_sleeping = ext_set_sleeping,
    .event = ext_event,
    .hand_over = ext_hand_over,
    .resume = ext_resume,
};
NK_NSM_TYPE(external_type)
