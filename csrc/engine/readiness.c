/* The readiness mirror: the engine end of each socket's proxy fd shows the guest, through
 * poll/epoll on its end, what a Linux socket would show (readable, writable, hung up), and the
 * ends a connection can come to. See csrc/guest/sock.c for the guest half of the protocol.
 * Memory order: each pair is labelled at both ends (R1/R2...); docs/abi.md lists them.
 */
#include <errno.h>
#include <string.h>

#include "engine.h"

#define PROXY_EVENTS EPOLLIN

static struct nk_slot *slot_of(struct nk_esock *es) { return &es->t->slots[es->slot]; }

/* Queue es for service: FIFO within its tenant, and the tenant on the round-robin ring. */
void nk_sock_activate(struct nk_esock *es) {
  if (es->active) return;
  es->active = true;
  es->next_active = NULL;
  struct nk_tenant *t = es->t;
  if (t->active_head) t->active_tail->next_active = es;
  else t->active_head = es;
  t->active_tail = es;
  if (!t->in_active) {
    t->in_active = true;
    t->next_active = NULL;
    struct nk_tenant **q = &engine.active_tenants;
    while (*q) q = &(*q)->next_active;
    *q = t;
  }
}

/* The socket's addresses live in the engine; the slot gets a copy for the guest's
 * getsockname()/getpeername(), which the engine never reads back (a tenant may scribble it).
 * T1: plain stores, published to the guest by the store of the slot's state that follows
 * them (seq_cst, so release); pairs with T2 in GuestLib's nk_getname(). */
void nk_sock_set_local(struct nk_esock *es, const struct nk_addr *a) {
  es->local = *a;
  slot_of(es)->local = *a;
}

void nk_sock_set_peer(struct nk_esock *es, const struct nk_addr *a) {
  es->peer = *a;
  slot_of(es)->peer = *a;
}

/* ---- readiness ---- */

static bool has_input(struct nk_esock *es) {
  struct nk_slot *s = slot_of(es);
  int64_t fill = nk_ring_fill_checked(&es->rx);
  if (es->kind == NK_KIND_DGRAM) fill = fill >= (int64_t)sizeof(struct nk_dgram) ? fill : 0;
  return fill > 0 || atomic_load(&s->rx_eof) || atomic_load(&s->rx_err);
}

/* Queue one READY record. The intent is published in ready_sent first and the ring looked at
 * again afterwards (R3: store, seq_cst fence, loads; pairs with R4 in GuestLib's
 * take_records(), which drained() calls after emptying the ring): a reader that
 * emptied the ring meanwhile either sees the intent and waits for the record or its
 * retraction, or we see the empty ring and retract. Either way no record outlives the bytes
 * it announced: programs such as wrk count "readable, then EAGAIN" as an error. */
static void send_ready(struct nk_esock *es) {
  char r = NK_MSG_READY;
  struct nk_slot *s = slot_of(es);
  if (es->proxy < 0) return;
  atomic_store(&s->ready_sent, es->ready_sent + 1);
  atomic_thread_fence(memory_order_seq_cst);
  if (has_input(es) && send(es->proxy, &r, 1, MSG_DONTWAIT | MSG_NOSIGNAL) == 1) {
    es->ready_sent++;
    es->seen_at_ready = atomic_load(&s->rx_seen);
    es->rx_bytes_at_ready = es->rx_bytes;
  } else {
    atomic_store(&s->ready_sent, es->ready_sent);
  }
}

/* Mirror the end of the byte stream onto the proxy fd: shutting our end for writing gives the
 * guest end POLLIN|POLLRDHUP for good, as a TCP socket has after the peer's FIN. We never
 * shut our end for reading: its EPOLLHUP must keep meaning "the guest closed it". When the
 * connection is over both ways, nk_sock_hang_up() closes our end instead. */
void nk_sock_proxy_shutdown(struct nk_esock *es) {
  NK_LOG(2, "tenant %s slot %u: end of stream", es->t->name, es->slot);
  if (es->proxy >= 0) shutdown(es->proxy, SHUT_WR);
}

static void zombie_link(struct nk_esock *es) {
  es->zombie = true;
  engine.nzombies++;
  es->next_zombie = engine.zombies;
  if (engine.zombies) engine.zombies->prev_zombie = &es->next_zombie;
  es->prev_zombie = &engine.zombies;
  engine.zombies = es;
}

/* The connection is over in both directions (reset, refused, or FIN both ways): close the
 * engine end so the guest end reads POLLIN|POLLOUT|POLLHUP|POLLRDHUP, as Linux reports. The
 * slot stays reserved (its ring may hold unread bytes and the guest still maps it) until the
 * sweep finds the guest end gone. Without sock_diag, fall back to a write shutdown. */
void nk_sock_hang_up(struct nk_esock *es) {
  if (es->proxy < 0 || es->zombie) return;
  uint64_t ino = nk_diag_peer_of_fd(es->proxy_in_tenant_ns ? es->t : NULL, es->proxy);
  NK_LOG(1, "tenant %s slot %u hangs up (guest end %llu)", es->t->name, es->slot,
         (unsigned long long)ino);
  if (!ino) {
    nk_sock_proxy_shutdown(es);
    return;
  }
  nk_sock_close_proxy(es);
  es->blocker_held = false;
  es->guest_ino = ino;
  zombie_link(es);
}

/* A socket of an adopted region (tenant.c adopt_slots): its proxy's engine end died with the
 * last engine, so the guest end shows POLLHUP already. Which namespace its pair was made in is
 * not known here: it is looked for in both. */
void nk_sock_adopt_zombie(struct nk_esock *es, uint64_t guest_ino) {
  es->guest_ino = guest_ino;
  es->adopted = true;
  zombie_link(es);
}

void nk_sock_relink_zombie(struct nk_esock *es) { zombie_link(es); }

void nk_sock_unzombie(struct nk_esock *es) {
  if (!es->prev_zombie) return;
  *es->prev_zombie = es->next_zombie;
  if (es->next_zombie) es->next_zombie->prev_zombie = es->prev_zombie;
  es->prev_zombie = NULL;
  engine.nzombies--;
}

void nk_sock_sweep_zombies(void) {
  for (struct nk_esock *es = engine.zombies, *next; es; es = next) {
    next = es->next_zombie;
    if (es->closing) continue;
    bool gone =
        es->adopted
            ? nk_diag_exists(es->t, es->guest_ino) == 0 && nk_diag_exists(NULL, es->guest_ino) == 0
            : nk_diag_exists(es->proxy_in_tenant_ns ? es->t : NULL, es->guest_ino) == 0;
    if (gone) {
      es->closing = true;
      nk_sock_activate(es);
    }
  }
}

/* Queue a READY record when there is something to read and none is outstanding.
 * R1: the fence orders our ring/EOF stores before the load of rx_ack; pairs with R2 in
 * GuestLib's stream_recv(), dgram_recv() and drained(), which publish rx_ack before they look
 * at the ring again. */
void nk_sock_maybe_ready(struct nk_esock *es) {
  struct nk_slot *s = slot_of(es);
  atomic_thread_fence(memory_order_seq_cst);
  if (!has_input(es)) return;
  uint32_t ack = atomic_load(&s->rx_ack);
  if (ack == es->ready_sent) {
    send_ready(es);
    return;
  }
  /* A record is outstanding, but the guest looked at the ring since we queued it and bytes
   * arrived since: queue another, so an edge-triggered poller sees a new EPOLLIN edge as it
   * would for new data on a Linux socket. E2: the fence above orders our ring stores before
   * this load; pairs with E1 in GuestLib's seen(). The guest takes back every record when it
   * drains. */
  if (atomic_load(&s->rx_seen) != es->seen_at_ready && es->rx_bytes != es->rx_bytes_at_ready)
    send_ready(es);
}

static bool writable_now(struct nk_esock *es) {
  struct nk_slot *s = slot_of(es);
  if (es->dead || atomic_load(&s->tx_closed)) return true;
  if (es->kind == NK_KIND_LISTENER) return false;
  if (es->state == NK_ST_CONNECTING) return false;
  int64_t fill = nk_ring_fill_checked(&es->tx);
  if (fill < 0) return true;
  return (uint64_t)(es->tx.size - fill) >= es->tx.size / 4;
}

/* The engine end of the proxy, closed. Where it refuses descriptors, nothing queued on it can
 * make the close block; elsewhere the closer thread does it (fds.c), a moment later: the
 * shutdown both ways shows the guest end its hang-up (POLLHUP) now, as the close would.
 * The blocker queued on it (held, or not read yet) is taken right after, so the guest end
 * also turns writable now: Linux shows a failed non-blocking connect POLLOUT with its POLLHUP.
 * The hang-up comes first, as a program that waits for POLLOUT and then looks for
 * POLLERR/POLLHUP in the same event needs; POLLOUT follows a moment later. Only blockers
 * travel this way, one at a time; the closer drains anything else a tenant queued. */
void nk_sock_close_proxy(struct nk_esock *es) {
  if (es->proxy < 0) return;
  nk_keep_drop(es);
  if (es->proxy_rights_refused) {
    /* An end the engine made and never shared: the close takes it out of the epoll set. */
    close(es->proxy);
  } else {
    /* The tenant may hold a copy of this end, which would keep it in the set. */
    nk_epoll_del(es->proxy);
    shutdown(es->proxy, SHUT_RDWR);
    char buf[NK_BLOCKER_SIZE];
    for (int i = 0; i < 2 && nk_recv_untrusted(es->proxy, buf, sizeof(buf), MSG_DONTWAIT) > 0;
         i++) {}
    nk_close_later_proxy(es->proxy);
  }
  es->blocker_held = false;
  es->proxy = -1;
}

void nk_sock_release_blocker(struct nk_esock *es) {
  if (es->proxy < 0 || !es->blocker_held || !writable_now(es)) return;
  char buf[NK_BLOCKER_SIZE];
  (void)nk_recv_untrusted(es->proxy, buf, sizeof(buf), MSG_DONTWAIT);
  es->blocker_held = false;
  nk_epoll_mod(es->proxy, PROXY_EVENTS, &es->h_proxy);
}

/* The connection is over: the guest is told as Linux tells it (see enum nk_end), the
 * endpoints are closed (with a reset when the tenant broke the socket), and the proxy hangs
 * up. The one way every failure ends. */
void nk_sock_fail(struct nk_esock *es, int err, enum nk_end how) {
  struct nk_slot *s = slot_of(es);
  NK_LOG(1, "tenant %s slot %u: %s (%s): tx %u/%u rx %u/%u", es->t->name, es->slot,
         how == NK_END_BROKEN  ? "reset"
         : how == NK_END_ERROR ? "connection error"
                               : "connect failed",
         strerror(err), atomic_load(es->tx.head), atomic_load(es->tx.tail),
         atomic_load(es->rx.head), atomic_load(es->rx.tail));
  /* X1 and T1: every byte before the end is in the ring already; the flags follow it, and
   * the state comes last (the guest reads so_error once it sees the state change). */
  if (how != NK_END_BROKEN) atomic_store(&s->so_error, err);
  nk_ep_close_all(es, how == NK_END_BROKEN);
  es->dead = true;
  if (how == NK_END_REFUSED) {
    es->state = NK_ST_NEW;
    /* Before the state the guest waits for: its next connect() renews the socket. */
    if (es->kind == NK_KIND_STREAM) atomic_store(&s->renew, 1);
  } else {
    es->state = NK_ST_CLOSED;
    atomic_store(&s->rx_err, err);
    atomic_store(&s->rx_eof, 1);
    atomic_store(&s->tx_closed, EPIPE);
  }
  atomic_store(&s->state, (uint32_t)es->state);
  nk_sock_hang_up(es);
  nk_sock_release_blocker(es);
}

/* The peer's byte stream ended and everything before it is in our receive ring: readable for
 * good, no READY record needed. Both directions shut: POLLHUP. X1: rx_eof (seq_cst) is stored
 * after the last bytes' head (P1); pairs with X2 in GuestLib's stream_recv(), which loads the
 * flag, then the ring: it never reports EOF with bytes still unread. */
void nk_sock_end_of_stream(struct nk_esock *es) {
  atomic_store(&slot_of(es)->rx_eof, 1);
  if (es->guest_shut_wr) nk_sock_hang_up(es);
  else nk_sock_proxy_shutdown(es);
}

/* The receive ring lacks `need` bytes of room: the guest is asked to kick the socket when it
 * drains. S1: the flag is stored, then a fence, before the ring is looked at again; pairs with
 * S2 in GuestLib's after_consume() (tail store, fence, load of rx_stalled): either we see the
 * room or it sees the flag. (C11 does not order a seq_cst store before a later acquire load of
 * another object without the fence; docs/abi.md.)
 * True while the room is still lacking; false (flag withdrawn) when the guest drained
 * meanwhile or broke its ring (the caller finds out). Callers withdraw the flag with a relaxed
 * store once there is room: it publishes nothing, and a stale flag costs one spurious kick. */
bool nk_sock_rx_stall(struct nk_esock *es, uint32_t need) {
  struct nk_slot *s = slot_of(es);
  atomic_store(&s->rx_stalled, 1);
  atomic_thread_fence(memory_order_seq_cst);
  int64_t fill = nk_ring_fill_checked(&es->rx);
  if (fill >= 0 && es->rx.size - (uint32_t)fill < need) return true;
  atomic_store(&s->rx_stalled, 0);
  return false;
}

void nk_sock_proxy_event(struct nk_esock *es, uint32_t ev) {
  if (ev & (EPOLLHUP | EPOLLERR)) {
    /* Every guest reference is gone (closed, or the processes died). */
    nk_sock_close_proxy(es);
    es->closing = true;
    nk_sock_service(es);
    return;
  }
  if ((ev & EPOLLOUT) && es->kind == NK_KIND_LISTENER) nk_sock_activate(es);
  if (ev & EPOLLIN) {
    /* Only blockers travel guest -> engine. Hold it while the socket cannot take data. */
    if (!es->blocker_held) {
      es->blocker_held = true;
      nk_epoll_mod(es->proxy, es->pending_listen_out ? EPOLLOUT : 0, &es->h_proxy);
    }
    nk_sock_activate(es);
  }
}
