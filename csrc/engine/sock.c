/* Engine side of a NetKernel socket: moves bytes between the tenant's rings and the NSM's
 * kernel sockets, mirrors readiness onto the proxy fd, and runs the socket calls the guest
 * asks for. See csrc/guest/sock.c for the guest half of the readiness protocol.
 *
 * Kernel sockets are edge-triggered in epoll: can_read / can_write remember that a socket may
 * still have data or room after we stopped (ring full or empty), so no edge is lost.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/stat.h>

#include "engine.h"

/* EPOLLOUT is watched on a stream socket only while it connects or after a send met a full
 * buffer: otherwise every ACK that frees send space would be an event for the engine, and a
 * tenant with many chatty connections would flood it. */
#define KFD_EVENTS (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET)
#define KFD_EVENTS_NO_OUT (EPOLLIN | EPOLLRDHUP | EPOLLET)
#define PROXY_EVENTS EPOLLIN

static struct nk_slot *slot_of(struct nk_esock *es) { return &es->t->slots[es->slot]; }
static void connect_failed(struct nk_esock *es, int err);

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
    struct nk_tenant **q = &E.active_tenants;
    while (*q) q = &(*q)->next_active;
    *q = t;
  }
}

/* The NSM a connected or connecting socket's traffic goes through (NULL: loopback). */
struct nk_nsm *nk_sock_nsm(const struct nk_esock *es) {
  return es->nk && !es->shm ? es->kfd_nsm[0] : NULL;
}

/* ---- kernel sockets ---- */

static int kfd_add(struct nk_esock *es, int fd, int family, struct nk_nsm *nsm) {
  if (es->nk >= NK_MAX_KFD) return -EMFILE;
  bool loop = nsm == NULL;
  int k = es->nk++;
  es->kfd[k] = fd;
  es->kfd_family[k] = family;
  es->kfd_loop[k] = loop;
  es->kfd_nsm[k] = nsm;
  es->kfd_ext[k] = false;
  /* Replay the options the application set before this kernel socket existed. */
  for (int i = 0; i < es->nopts; i++) {
    struct nk_opt *o = &es->opts[i];
    if (o->level == IPPROTO_IPV6 && family != AF_INET6) continue;
    if (o->level == IPPROTO_IP && family != AF_INET) continue;
    nk_setsockopt_unprivileged(fd, o->level, o->name, o->val, o->len);
  }
  if (family == AF_INET6) {
    int v = es->v6only || !loop;
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v, sizeof(v));
  }
  return k;
}

/* An endpoint that is a socket of an external NSM (ext.c). */
static int kfd_open_ext(struct nk_esock *es, int family, struct nk_nsm *nsm) {
  if (es->nk >= NK_MAX_KFD) return -EMFILE;
  int id = nk_ext_socket(nsm, es->t, family, es->type);
  if (id < 0) return id;
  int k = es->nk++;
  es->kfd[k] = -1;
  es->kfd_family[k] = family;
  es->kfd_loop[k] = false;
  es->kfd_nsm[k] = nsm;
  es->kfd_ext[k] = true;
  es->ext_id[k] = (uint32_t)id;
  es->ext_port[k] = 0;
  nk_ext_ref(es, k);
  for (int i = 0; i < es->nopts; i++) /* replayed, as on a kernel socket */
    nk_ext_setopt(es, k, es->opts[i].level, es->opts[i].name, es->opts[i].val, es->opts[i].len);
  return k;
}

/* A new kernel socket on the tenant's NSM of the moment (new connections follow a move), or
 * in the tenant's own namespace for its loopback. */
static int kfd_open_on(struct nk_esock *es, int family, struct nk_nsm *nsm) {
  if (nsm && nsm->ext) return kfd_open_ext(es, family, nsm);
  int fd = !nsm ? nk_in_netns(es->t->netns_fd, family, es->type)
                : nsm->ops->open_socket(nsm, family, es->type);
  if (fd < 0) return fd;
  int k = kfd_add(es, fd, family, nsm);
  if (k < 0) close(fd);
  return k;
}

static int kfd_open(struct nk_esock *es, int family, bool loop) {
  return kfd_open_on(es, family, loop ? NULL : es->t->nsm);
}

static void kfd_watch_out(struct nk_esock *es, bool on) {
  if (es->watch_out == on || !es->nk || es->kfd[0] < 0) return;
  es->watch_out = on;
  /* Re-arming checks readiness now (EPOLL_CTL_MOD), so room that freed up meanwhile still
   * produces the event. */
  nk_ep_mod(es->kfd[0], on ? KFD_EVENTS : KFD_EVENTS_NO_OUT, &es->h_kfd[0]);
}

static void kfd_watch(struct nk_esock *es, int k) {
  if (es->kfd_ext[k]) return;
  if (k == 0) es->watch_out = true;
  nk_ep_add(es->kfd[k], KFD_EVENTS, &es->h_kfd[k]);
}

/* bind(), listen() on endpoint k, kernel or external. */
static int kfd_bind(struct nk_esock *es, int k, const struct nk_addr *a) {
  if (es->kfd_ext[k]) return nk_ext_bind(es, k, a);
  struct sockaddr_storage ss;
  socklen_t l = nk_addr_to_sa(a, &ss);
  return bind(es->kfd[k], (struct sockaddr *)&ss, l) < 0 ? -errno : 0;
}

static int kfd_listen(struct nk_esock *es, int k, int backlog) {
  if (es->kfd_ext[k]) return nk_ext_listen(es, k, backlog);
  return listen(es->kfd[k], backlog) < 0 ? -errno : 0;
}

static void kfd_close_one(struct nk_esock *es, int k, bool rst) {
  if (es->kfd_ext[k]) {
    nk_ext_close(es, k, rst);
    es->kfd_ext[k] = false;
  } else if (es->kfd[k] >= 0) {
    nk_ep_del(es->kfd[k]);
    close(es->kfd[k]);
  }
  es->kfd[k] = -1;
  es->kfd_nsm[k] = NULL;
}

/* Endpoint `from` becomes endpoint `to` (to < from, to's own closed or moved already). */
static void kfd_move(struct nk_esock *es, int to, int from, uint32_t events) {
  es->kfd[to] = es->kfd[from];
  es->kfd_family[to] = es->kfd_family[from];
  es->kfd_loop[to] = es->kfd_loop[from];
  es->kfd_nsm[to] = es->kfd_nsm[from];
  es->kfd_ext[to] = es->kfd_ext[from];
  es->ext_id[to] = es->ext_id[from];
  es->ext_port[to] = es->ext_port[from];
  es->kfd_ext[from] = false;
  es->kfd[from] = -1;
  /* Events for it must now name index `to` (fails harmlessly when it is not watched yet). */
  if (es->kfd_ext[to]) {
    if (es->ext_id[to] != NK_EXT_LOST) nk_ext_ref(es, to);
  } else {
    nk_ep_mod(es->kfd[to], events, &es->h_kfd[to]);
  }
}

void nk_sock_close_kfds(struct nk_esock *es, bool rst) {
  for (int k = 0; k < es->nk; k++) {
    if (es->kfd_ext[k]) {
      kfd_close_one(es, k, rst);
      continue;
    }
    if (es->kfd[k] < 0) continue;
    if (rst && es->type == SOCK_STREAM && es->kind != NK_KIND_LISTENER) {
      struct linger l = {1, 0};
      setsockopt(es->kfd[k], SOL_SOCKET, SO_LINGER, &l, sizeof(l));
    }
    nk_ep_del(es->kfd[k]);
    close(es->kfd[k]);
    es->kfd[k] = -1;
    es->kfd_nsm[k] = NULL;
  }
  es->nk = 0;
}

/* Keep only endpoint k (after connect picked one of a wildcard bind's sockets). */
static void kfd_keep_only(struct nk_esock *es, int k) {
  for (int i = 0; i < es->nk; i++)
    if (i != k) kfd_close_one(es, i, false);
  if (k != 0) {
    es->watch_out = true;
    kfd_move(es, 0, k, KFD_EVENTS);
  }
  es->nk = 1;
}

/* The socket's addresses live in the engine; the slot gets a copy for the guest's
 * getsockname()/getpeername(), which the engine never reads back (a tenant may scribble it). */
void nk_sock_set_local(struct nk_esock *es, const struct nk_addr *a) {
  es->local = *a;
  slot_of(es)->local = *a;
}

void nk_sock_set_peer(struct nk_esock *es, const struct nk_addr *a) {
  es->peer = *a;
  slot_of(es)->peer = *a;
}

static void set_local_from_kfd(struct nk_esock *es, int k) {
  if (es->kfd[k] < 0) return;
  struct sockaddr_storage ss;
  socklen_t l = sizeof(ss);
  struct nk_addr a;
  if (getsockname(es->kfd[k], (struct sockaddr *)&ss, &l) == 0) {
    nk_addr_from_sa(&a, &ss);
    nk_sock_set_local(es, &a);
  }
}

static void set_peer_from_kfd(struct nk_esock *es, int k) {
  if (es->kfd[k] < 0) return;
  struct sockaddr_storage ss;
  socklen_t l = sizeof(ss);
  struct nk_addr a;
  if (getpeername(es->kfd[k], (struct sockaddr *)&ss, &l) == 0) {
    nk_addr_from_sa(&a, &ss);
    nk_sock_set_peer(es, &a);
  }
}

/* ---- readiness ---- */

static bool has_input(struct nk_esock *es) {
  struct nk_slot *s = slot_of(es);
  int64_t fill = nk_ring_fill_checked(&es->rx);
  if (es->kind == NK_KIND_DGRAM) fill = fill >= (int64_t)sizeof(struct nk_dgram) ? fill : 0;
  return fill > 0 || atomic_load(&s->rx_eof) || atomic_load(&s->rx_err);
}

/* Queue one READY record. The intent is published in ready_sent first and the ring looked at
 * again afterwards (R3, seq_cst; pairs with R4 in GuestLib's drained()): a reader that
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
 * connection is over both ways, hang_up() closes our end instead. */
static void proxy_shutdown(struct nk_esock *es) {
  NK_LOG(2, "tenant %s slot %u: end of stream", es->t->name, es->slot);
  if (es->proxy >= 0) shutdown(es->proxy, SHUT_WR);
}

/* The connection is over in both directions (reset, refused, or FIN both ways): close the
 * engine end so the guest end reads POLLIN|POLLOUT|POLLHUP|POLLRDHUP, as Linux reports. The
 * slot stays reserved (its ring may hold unread bytes and the guest still maps it) until the
 * sweep finds the guest end gone. Without sock_diag, fall back to a write shutdown. */
static void hang_up(struct nk_esock *es) {
  if (es->proxy < 0 || es->zombie) return;
  uint64_t ino = nk_diag_peer_of_fd(es->proxy_in_tenant_ns ? es->t : NULL, es->proxy);
  NK_LOG(1, "tenant %s slot %u hangs up (guest end %llu)", es->t->name, es->slot, (unsigned long long)ino);
  if (!ino) {
    proxy_shutdown(es);
    return;
  }
  nk_sock_close_proxy(es);
  es->blocker_held = false;
  es->guest_ino = ino;
  es->zombie = true;
  E.nzombies++;
}

void nk_sock_sweep_zombies(void) {
  for (struct nk_tenant *t = E.tenants; t; t = t->next)
    for (uint32_t i = 0; i < t->nslots; i++) {
      struct nk_esock *es = t->socks[i];
      if (!es || !es->zombie || es->closing) continue;
      if (nk_diag_exists(es->proxy_in_tenant_ns ? t : NULL, es->guest_ino) == 0) {
        es->closing = true;
        nk_sock_activate(es);
      }
    }
}

/* Queue a READY record when there is something to read and none is outstanding.
 * R1: the fence orders our ring/EOF stores before the load of rx_ack; pairs with R2 in
 * GuestLib's stream_recv(), which publishes rx_ack before re-checking the ring. */
static void maybe_ready(struct nk_esock *es) {
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
   * would for new data on a Linux socket. E3: the fence above orders our ring stores before
   * this load; pairs with E2 in GuestLib. The guest takes back every record when it drains. */
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
 * shutdown both ways shows the guest end its hang-up (POLLHUP) now, as the close would. */
void nk_sock_close_proxy(struct nk_esock *es) {
  if (es->proxy < 0) return;
  nk_ep_del(es->proxy);
  if (es->proxy_rights_refused) {
    close(es->proxy);
  } else {
    shutdown(es->proxy, SHUT_RDWR);
    nk_close_later(es->proxy);
  }
  es->proxy = -1;
}

static void release_blocker(struct nk_esock *es) {
  if (es->proxy < 0 || !es->blocker_held || !writable_now(es)) return;
  char buf[NK_BLOCKER_SIZE];
  (void)nk_recv_untrusted(es->proxy, buf, sizeof(buf), MSG_DONTWAIT);
  es->blocker_held = false;
  nk_ep_mod(es->proxy, PROXY_EVENTS, &es->h_proxy);
}

/* The tenant broke its socket (bad indices, bad record): reset that socket only. */
void nk_sock_reset(struct nk_esock *es, int err) {
  struct nk_slot *s = slot_of(es);
  NK_LOG(1, "tenant %s slot %u reset (%s): tx %u/%u rx %u/%u", es->t->name, es->slot,
         strerror(err), atomic_load(es->tx.head), atomic_load(es->tx.tail),
         atomic_load(es->rx.head), atomic_load(es->rx.tail));
  nk_shm_unlink(es, ECONNRESET);
  nk_sock_close_kfds(es, true);
  es->dead = true;
  es->state = NK_ST_CLOSED;
  atomic_store(&s->state, NK_ST_CLOSED);
  atomic_store(&s->rx_err, err);
  atomic_store(&s->rx_eof, 1);
  atomic_store(&s->tx_closed, EPIPE);
  hang_up(es);
  release_blocker(es);
}

static void conn_error(struct nk_esock *es, int err) {
  struct nk_slot *s = slot_of(es);
  NK_LOG(1, "tenant %s slot %u: connection error %s", es->t->name, es->slot, strerror(err));
  atomic_store(&s->so_error, err);
  atomic_store(&s->rx_err, err);
  atomic_store(&s->rx_eof, 1);
  atomic_store(&s->tx_closed, EPIPE);
  nk_sock_close_kfds(es, false);
  es->dead = true;
  es->state = NK_ST_CLOSED;
  atomic_store(&s->state, NK_ST_CLOSED);
  hang_up(es);
  release_blocker(es);
}

void nk_sock_maybe_ready(struct nk_esock *es) { maybe_ready(es); }
void nk_sock_release_blocker(struct nk_esock *es) { release_blocker(es); }
void nk_sock_conn_error(struct nk_esock *es, int err) { conn_error(es, err); }
void nk_sock_hang_up(struct nk_esock *es) { hang_up(es); }

/* The peer's byte stream ended and everything before it is in our receive ring. */
void nk_sock_end_of_stream(struct nk_esock *es) {
  atomic_store(&slot_of(es)->rx_eof, 1);
  if (es->guest_shut_wr) hang_up(es);
  else proxy_shutdown(es);
}

/* ---- stream data ---- */

static void stream_tx(struct nk_esock *es) {
  int64_t fill = nk_ring_fill_checked(&es->tx);
  if (fill < 0) {
    nk_sock_reset(es, ECONNRESET);
    return;
  }
  struct nk_nsm *m = nk_sock_nsm(es);
  uint64_t budget = E.service_bytes;
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
    ssize_t n = sendmsg(es->kfd[0], &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      nk_ring_consume(&es->tx, (uint32_t)n);
      fill -= n;
      budget -= (uint64_t)n;
      es->tx_bytes += (uint64_t)n;
      es->t->tx_bytes += (uint64_t)n;
      nk_policy_charge(es, m, NK_TX, (uint64_t)n);
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
      if (errno == EAGAIN) {
        es->can_write = false;
        kfd_watch_out(es, true);
      }
      continue;
    }
    conn_error(es, n < 0 ? errno : EPIPE);
    return;
  }
  if (fill == 0 && es->shut_wr_pending) {
    shutdown(es->kfd[0], SHUT_WR);
    es->shut_wr_pending = false;
  }
}

static void stream_rx(struct nk_esock *es) {
  struct nk_slot *s = slot_of(es);
  /* Never more than a ring's worth per service, even with the engine to itself: the tenant
   * moves the ring's tail, so "until the ring is full" could be forever. */
  uint64_t budget = E.service_bytes < es->rx.size ? E.service_bytes : es->rx.size;
  while (es->can_read && !atomic_load(&s->rx_eof)) {
    if (budget == 0) { /* the rest in a later round */
      nk_sock_activate(es);
      break;
    }
    int64_t fill = nk_ring_fill_checked(&es->rx);
    if (fill < 0) {
      nk_sock_reset(es, ECONNRESET);
      return;
    }
    uint32_t space = es->rx.size - (uint32_t)fill;
    if (space == 0) {
      /* Stop reading: TCP flow control pushes back on the sender. The guest kicks us when
       * it drains. S1: seq_cst store then re-check; pairs with the guest's consume + load. */
      atomic_store(&s->rx_stalled, 1);
      if (nk_ring_fill_checked(&es->rx) < (int64_t)es->rx.size) {
        atomic_store(&s->rx_stalled, 0);
        continue;
      }
      return;
    }
    atomic_store_explicit(&s->rx_stalled, 0, memory_order_relaxed);
    if (space > budget) space = (uint32_t)budget;
    struct nk_nsm *m = nk_sock_nsm(es);
    uint64_t grant = nk_policy_grant(es, m, NK_RX, space, space < NK_QUANTUM ? space : NK_QUANTUM);
    if (grant == 0) return; /* TCP flow control holds the sender meanwhile */
    if (grant < space) space = (uint32_t)grant;
    struct iovec iov[2];
    uint32_t head = atomic_load_explicit(es->rx.head, memory_order_relaxed);
    int cnt = nk_ring_iov(&es->rx, head, space, iov);
    ssize_t n = readv(es->kfd[0], iov, cnt);
    if (n > 0) {
      nk_ring_produce(&es->rx, (uint32_t)n);
      budget -= (uint64_t)n;
      es->rx_bytes += (uint64_t)n;
      es->t->rx_bytes += (uint64_t)n;
      nk_policy_charge(es, m, NK_RX, (uint64_t)n);
      /* A short read means the socket is drained: wait for the next edge. Not after the
       * peer's FIN, whose edge may have come with this data: read on until 0. */
      if ((uint32_t)n < space && !es->peer_fin) es->can_read = false;
      continue;
    }
    if (n == 0) {
      atomic_store(&s->rx_eof, 1);
      /* Readable for good: no READY record needed. Both directions shut: POLLHUP. */
      if (es->guest_shut_wr) hang_up(es);
      else proxy_shutdown(es);
      break;
    }
    if (errno == EAGAIN) {
      es->can_read = false;
      break;
    }
    if (errno == EINTR) continue;
    conn_error(es, errno);
    break;
  }
}

/* A reset that arrives after the peer's FIN was read (the first send after the peer closed:
 * Linux answers it with EPIPE on the next send) reaches neither read nor send here while the
 * guest's ring is empty: take it from SO_ERROR. Before EOF, stream_rx meets it in order. */
static void stream_error(struct nk_esock *es) {
  if (!es->kfd_err || !atomic_load(&slot_of(es)->rx_eof)) return;
  es->kfd_err = false;
  int err = 0;
  socklen_t len = sizeof(err);
  if (getsockopt(es->kfd[0], SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err) conn_error(es, err);
}

/* ---- datagrams ---- */

static int dgram_kfd_for(struct nk_esock *es, const struct nk_addr *dst) {
  bool loop = nk_addr_is_loopback(dst);
  int fam = dst->family;
  for (int k = 0; k < es->nk; k++)
    if (es->kfd_loop[k] == loop && (es->kfd_family[k] == fam || (loop && es->kfd_family[k] == AF_INET6)))
      return k;
  /* First send without bind: open a socket bound to the tenant's address. */
  int k = kfd_open(es, loop ? es->family : fam, loop);
  if (k < 0) return k;
  if (!loop) {
    struct nk_addr src = fam == AF_INET ? es->t->ipv4 : es->t->ipv6;
    int r = kfd_bind(es, k, &src);
    if (r < 0 && es->kfd_ext[k]) { /* no port on the external NSM: not usable */
      kfd_close_one(es, k, false);
      es->nk--;
      return r;
    }
    if (es->kfd_ext[k]) {
      src.port = es->ext_port[k];
      nk_sock_set_local(es, &src);
    }
  }
  set_local_from_kfd(es, k);
  kfd_watch(es, k);
  return k;
}

/* Datagrams per service, each way: the ring is the tenant's to refill, and datagrams to its
 * loopback cost no tokens, so without a bound the engine would never leave. */
#define NK_DGRAMS_PER_SERVICE 256

static void dgram_tx(struct nk_esock *es) {
  uint64_t budget = E.service_bytes;
  for (int sent = 0;; sent++) {
    int64_t fill = nk_ring_fill_checked(&es->tx);
    if (fill < 0) {
      nk_sock_reset(es, ECONNRESET);
      return;
    }
    if (fill == 0) return;
    if (sent == NK_DGRAMS_PER_SERVICE || budget == 0) { /* the rest in a later round */
      nk_sock_activate(es);
      return;
    }
    struct nk_dgram h;
    uint32_t tail = atomic_load_explicit(es->tx.tail, memory_order_relaxed);
    if (fill < (int64_t)sizeof(h)) {
      nk_sock_reset(es, ECONNRESET);
      return;
    }
    nk_ring_copy_out(&es->tx, tail, &h, sizeof(h)); /* read once, then validate the copy */
    if (h.len > NK_DGRAM_MAX || (int64_t)NK_DGRAM_SPACE(h.len) > fill) {
      nk_sock_reset(es, ECONNRESET);
      return;
    }
    budget -= budget < h.len ? budget : h.len;
    struct nk_addr dst = h.addr;
    nk_addr_unmap(&dst);
    int k;
    if (dst.family == 0) {
      k = es->nk ? 0 : -EDESTADDRREQ; /* connected socket */
    } else if (dst.family != AF_INET && dst.family != AF_INET6) {
      k = -EAFNOSUPPORT;
    } else {
      k = dgram_kfd_for(es, &dst);
    }
    if (k >= 0) {
      if (!nk_policy_dgram(es, es->kfd_nsm[k], NK_TX, h.len)) return;
      if (es->kfd_ext[k]) {
        if (nk_ext_sendto(es, k, dst.family ? &dst : NULL, tail + sizeof(h), h.len)) {
          es->tx_bytes += h.len;
          es->t->tx_bytes += h.len;
          nk_policy_charge_dgram(es, es->kfd_nsm[k], NK_TX, h.len);
        }
        nk_ring_consume(&es->tx, (uint32_t)NK_DGRAM_SPACE(h.len));
        continue;
      }
      struct iovec iov[2];
      int cnt = nk_ring_iov(&es->tx, tail + sizeof(h), h.len, iov);
      struct sockaddr_storage ss;
      struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
      if (dst.family) {
        mh.msg_name = &ss;
        mh.msg_namelen = nk_addr_to_sa(&dst, &ss);
      }
      ssize_t n = sendmsg(es->kfd[k], &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n < 0 && errno == EAGAIN) {
        es->can_write = false;
        return; /* retry on EPOLLOUT */
      }
      if (n >= 0) {
        es->tx_bytes += (uint64_t)n;
        es->t->tx_bytes += (uint64_t)n;
        nk_policy_charge_dgram(es, es->kfd_nsm[k], NK_TX, (uint32_t)n);
      }
      /* Other send errors drop the datagram, as UDP would. */
    }
    nk_ring_consume(&es->tx, (uint32_t)NK_DGRAM_SPACE(h.len));
  }
}

static void dgram_rx(struct nk_esock *es) {
  struct nk_slot *s = slot_of(es);
  for (int k = 0; k < es->nk; k++) {
    if (es->kfd[k] < 0) continue; /* an external NSM's come as events (ext.c) */
    for (int got = 0;; got++) {
      if (got == NK_DGRAMS_PER_SERVICE) { /* the rest in a later round */
        nk_sock_activate(es);
        break;
      }
      int64_t fill = nk_ring_fill_checked(&es->rx);
      if (fill < 0) {
        nk_sock_reset(es, ECONNRESET);
        return;
      }
      char peekbuf[1];
      ssize_t len = recv(es->kfd[k], peekbuf, 1, MSG_PEEK | MSG_TRUNC | MSG_DONTWAIT);
      if (len < 0) {
        /* Not EAGAIN: a pending ICMP error (connected socket), which this recv consumed.
         * The guest's next recv() reports it, once, as Linux does. */
        if (errno != EAGAIN && errno != EINTR) atomic_store(&s->rx_err, errno);
        break;
      }
      if (!nk_policy_dgram(es, es->kfd_nsm[k], NK_RX, (uint32_t)len)) break;
      uint32_t need = (uint32_t)NK_DGRAM_SPACE((uint32_t)len);
      if (es->rx.size - (uint32_t)fill < need) {
        atomic_store(&s->rx_stalled, 1);
        if (es->rx.size - (uint32_t)nk_ring_fill_checked(&es->rx) >= need) {
          atomic_store(&s->rx_stalled, 0);
          continue;
        }
        return;
      }
      atomic_store_explicit(&s->rx_stalled, 0, memory_order_relaxed);
      uint32_t head = atomic_load_explicit(es->rx.head, memory_order_relaxed);
      struct iovec iov[2];
      int cnt = nk_ring_iov(&es->rx, head + sizeof(struct nk_dgram), (uint32_t)len, iov);
      struct sockaddr_storage ss;
      struct msghdr mh = {.msg_name = &ss, .msg_namelen = sizeof(ss), .msg_iov = iov,
                          .msg_iovlen = (size_t)cnt};
      ssize_t n = recvmsg(es->kfd[k], &mh, MSG_DONTWAIT);
      if (n < 0) break;
      struct nk_dgram h = {.len = (uint32_t)n};
      nk_addr_from_sa(&h.addr, &ss);
      nk_ring_copy_in(&es->rx, head, &h, sizeof(h));
      nk_ring_produce(&es->rx, (uint32_t)NK_DGRAM_SPACE((uint32_t)n));
      es->rx_bytes += (uint64_t)n;
      es->t->rx_bytes += (uint64_t)n;
      nk_policy_charge_dgram(es, es->kfd_nsm[k], NK_RX, (uint32_t)n);
    }
  }
}

/* ---- listeners ---- */

/* Kernel memory one NEWCONN record (64 bytes and a descriptor) takes on a proxy's send queue,
 * measured at start (768 bytes on 6.x kernels): a listener's proxy can then be given a send
 * buffer that holds just its backlog of not-yet-accepted connections. */
void nk_sock_calibrate(void) {
  E.record_size = 1024;
  int sv[2], pv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) return;
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pv) == 0) {
    struct nk_newconn msg = {.type = NK_MSG_NEWCONN};
    union {
      char buf[CMSG_SPACE(sizeof(int))];
      struct cmsghdr align;
    } cm;
    memset(&cm, 0, sizeof(cm));
    struct iovec iov = {.iov_base = &msg, .iov_len = sizeof(msg)};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf,
                        .msg_controllen = sizeof(cm.buf)};
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &pv[1], sizeof(int));
    int q = 0;
    if (sendmsg(sv[0], &mh, MSG_DONTWAIT) == sizeof(msg) && ioctl(sv[0], SIOCOUTQ, &q) == 0 && q > 0)
      E.record_size = (uint32_t)q;
    close(pv[0]);
    close(pv[1]);
  }
  close(sv[0]);
  close(sv[1]);
}

/* Linux queues up to backlog + 1 connections that nobody accepted yet (and clamps the backlog
 * to somaxconn); connections beyond wait in the kernel, retrying their SYN. The engine holds
 * the same number on the listener's proxy: its send buffer fits that many records, so a
 * delivery beyond them fails (EAGAIN) and the rest stay in the NSM's own accept queue. (The
 * kernel's smallest send buffer fits 6 records: tiny backlogs get up to 6.) */
static void proxy_fit_backlog(struct nk_esock *l, int backlog) {
  if (l->proxy < 0) return;
  uint64_t queued = (uint64_t)(backlog < 0 ? 0 : backlog > 65535 ? 65535 : backlog) + 1;
  /* A send succeeds while the queue holds less than the buffer, so queued records fit in
   * queued * size - 1 bytes and one more does not. The kernel doubles what it is given. */
  int half = (int)((queued * E.record_size - 1) / 2);
  if (setsockopt(l->proxy, SOL_SOCKET, SO_SNDBUFFORCE, &half, sizeof(half)) < 0)
    setsockopt(l->proxy, SOL_SOCKET, SO_SNDBUF, &half, sizeof(half));
}

static bool deliver_conn(struct nk_esock *l, int gfd, struct nk_newconn *msg) {
  union {
    char buf[CMSG_SPACE(sizeof(int))];
    struct cmsghdr align;
  } cm;
  memset(&cm, 0, sizeof(cm));
  struct iovec iov = {.iov_base = msg, .iov_len = sizeof(*msg)};
  struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf,
                      .msg_controllen = sizeof(cm.buf)};
  struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(c), &gfd, sizeof(int));
  return sendmsg(l->proxy, &mh, MSG_DONTWAIT | MSG_NOSIGNAL) == sizeof(*msg);
}

/* Is listener l's queue of connections its application has not accepted yet full? Then a new
 * one would be refused or held (see proxy_fit_backlog). */
static bool accept_queue_full(struct nk_esock *l) { return l->pending_fd >= 0; }
bool nk_sock_accept_queue_full(struct nk_esock *l) { return accept_queue_full(l); }

/* While the queue is full the NSM's listening sockets are not watched: their connections wait
 * in the kernel's accept queue (a level-triggered EPOLLIN would wake the engine for nothing
 * until the application accepts). */
static void listen_watch(struct nk_esock *l, bool on) {
  for (int k = 0; k < l->nk; k++)
    if (!l->kfd_ext[k] && l->kfd[k] >= 0) nk_ep_mod(l->kfd[k], on ? EPOLLIN : 0, &l->h_kfd[k]);
}

/* Hand the new connection es (guest end gfd, which this call closes or keeps) to listener l's
 * application; when its accept queue is full, hold it as the one pending connection.
 * False when one is already pending: the caller refuses the connection. */
bool nk_sock_deliver_conn(struct nk_esock *l, struct nk_esock *es, int gfd) {
  struct nk_newconn msg = {.type = NK_MSG_NEWCONN, .slot = es->slot, .gen = es->gen,
                           .peer = es->peer, .local = es->local};
  if (l->pending_fd < 0 && deliver_conn(l, gfd, &msg)) {
    close(gfd);
    return true;
  }
  if (l->pending_fd >= 0) return false;
  l->pending_fd = gfd;
  l->pending_msg = msg;
  l->pending_listen_out = true;
  nk_ep_mod(l->proxy, PROXY_EVENTS | EPOLLOUT, &l->h_proxy);
  listen_watch(l, false);
  return true;
}

/* A new connection's engine side in listener l's tenant, as accept() makes it: a fresh proxy
 * pair (the guest end, to deliver, in *gfd), the listener's options inherited as in Linux.
 * NULL with nothing left open when the tenant is at its limits. */
static struct nk_esock *accepted_end(struct nk_esock *l, int *gfd) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) return NULL;
  int one = 1;
  setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &one, sizeof(one));
  struct stat st;
  fstat(sv[1], &st);
  struct nk_esock *es = nk_esock_alloc(l->t, sv[0], l->family, SOCK_STREAM, st.st_ino);
  if (!es) {
    close(sv[0]);
    close(sv[1]);
    return NULL;
  }
  es->proxy_rights_refused = nk_fd_refuse_rights(sv[0]);
  memcpy(es->opts, l->opts, sizeof(es->opts));
  es->nopts = l->nopts;
  es->linger = l->linger;
  es->linger0 = l->linger0;
  es->state = NK_ST_CONNECTED;
  atomic_store(&slot_of(es)->state, NK_ST_CONNECTED);
  es->can_read = es->can_write = true;
  nk_ep_add(es->proxy, PROXY_EVENTS, &es->h_proxy);
  *gfd = sv[1];
  return es;
}

struct nk_esock *nk_sock_accepted_end(struct nk_esock *l, int *gfd) { return accepted_end(l, gfd); }

/* Connections per service of a listener: a flood of them waits for the next round. */
#define NK_ACCEPTS_PER_SERVICE 64

static void listener_accept(struct nk_esock *l) {
  struct nk_tenant *t = l->t;
  if (l->pending_fd >= 0) {
    if (!deliver_conn(l, l->pending_fd, &l->pending_msg)) return;
    close(l->pending_fd);
    l->pending_fd = -1;
    if (l->pending_listen_out) {
      l->pending_listen_out = false;
      nk_ep_mod(l->proxy, PROXY_EVENTS, &l->h_proxy);
    }
    listen_watch(l, true);
  }
  int accepted = 0;
  for (int k = 0; k < l->nk; k++) {
    if (l->kfd[k] < 0) continue; /* an external NSM's: its connections come as events */
    while (!accept_queue_full(l)) {
      if (accepted++ == NK_ACCEPTS_PER_SERVICE) {
        nk_sock_activate(l);
        return;
      }
      struct sockaddr_storage ss;
      socklen_t sl = sizeof(ss);
      bool dropped;
      int cfd = nk_accept_or_drop(l->kfd[k], (struct sockaddr *)&ss, &sl, &dropped);
      if (cfd < 0) {
        if (dropped) continue; /* refused for lack of engine descriptors */
        break;
      }
      int gfd;
      struct nk_esock *es = accepted_end(l, &gfd);
      if (!es) {
        /* Admission limit (logged by nk_tenant_admit): refuse this connection with a reset,
         * keep the listener. */
        struct linger lg = {1, 0};
        setsockopt(cfd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        close(cfd);
        continue;
      }
      kfd_add(es, cfd, l->kfd_family[k], l->kfd_nsm[k]);
      if (l->kfd_loop[k]) {
        set_local_from_kfd(es, 0); /* any 127/8 address: ask the kernel */
      } else {
        struct nk_addr a = l->kfd_family[k] == AF_INET ? t->ipv4 : t->ipv6; /* the NSM listener's */
        a.port = l->bind_addr.port;
        nk_sock_set_local(es, &a);
      }
      struct nk_addr peer;
      nk_addr_from_sa(&peer, &ss);
      nk_sock_set_peer(es, &peer);
      kfd_watch(es, 0);
      nk_sock_deliver_conn(l, es, gfd); /* delivered, or held until the queue drains */
      nk_sock_activate(es);
    }
  }
}

/* A connection the external NSM accepted on listener l's endpoint k (its socket id). False
 * when the engine cannot take it: the caller has the NSM reset it. */
bool nk_sock_ext_accepted(struct nk_esock *l, int k, uint32_t id, const struct nk_addr *peer) {
  struct nk_tenant *t = l->t;
  int gfd;
  if (l->proxy < 0 || accept_queue_full(l)) return false;
  struct nk_esock *es = accepted_end(l, &gfd);
  if (!es) return false;
  es->nk = 1;
  es->kfd[0] = -1;
  es->kfd_family[0] = l->kfd_family[k];
  es->kfd_loop[0] = false;
  es->kfd_nsm[0] = l->kfd_nsm[k];
  es->kfd_ext[0] = true;
  es->ext_id[0] = id;
  es->ext_port[0] = l->bind_addr.port;
  nk_ext_ref(es, 0);
  for (int i = 0; i < es->nopts; i++) /* inherited from the listener, as in Linux */
    nk_ext_setopt(es, 0, es->opts[i].level, es->opts[i].name, es->opts[i].val, es->opts[i].len);
  es->ext = true;
  struct nk_addr a = l->kfd_family[k] == AF_INET ? t->ipv4 : t->ipv6;
  a.port = l->bind_addr.port;
  nk_sock_set_local(es, &a);
  struct nk_addr p = *peer;
  p.scope_id = 0;
  nk_sock_set_peer(es, &p);
  nk_ext_attach(es);
  nk_sock_activate(es);
  nk_sock_deliver_conn(l, es, gfd); /* the queue had room: delivered or held */
  return true;
}

/* The external NSM answered an earlier connect: err 0 = established. */
void nk_sock_ext_connected(struct nk_esock *es, int err, const struct nk_addr *local) {
  struct nk_slot *s = slot_of(es);
  if (err) {
    connect_failed(es, err);
    return;
  }
  es->state = NK_ST_CONNECTED;
  struct nk_addr a = es->kfd_family[0] == AF_INET ? es->t->ipv4 : es->t->ipv6;
  a.port = local && local->port ? local->port : es->ext_port[0];
  nk_sock_set_local(es, &a);
  atomic_store(&s->state, NK_ST_CONNECTED);
  nk_ext_attach(es);
  nk_sock_activate(es);
}

/* NSM m came back (a new process): listen again where es listened on it. */
void nk_sock_relisten(struct nk_esock *es, struct nk_nsm *m) {
  for (int k = 0; k < es->nk; k++) {
    if (!es->kfd_ext[k] || es->kfd_nsm[k] != m || es->ext_id[k] != NK_EXT_LOST) continue;
    int fam = es->kfd_family[k];
    int id = nk_ext_socket(m, es->t, fam, SOCK_STREAM);
    int r = id;
    if (id >= 0) {
      es->ext_id[k] = (uint32_t)id;
      nk_ext_ref(es, k);
      for (int i = 0; i < es->nopts; i++) /* the options set on it, as at first */
        nk_ext_setopt(es, k, es->opts[i].level, es->opts[i].name, es->opts[i].val, es->opts[i].len);
      struct nk_addr a = fam == AF_INET ? es->t->ipv4 : es->t->ipv6;
      a.port = es->bind_addr.port;
      r = kfd_bind(es, k, &a);
      if (r == 0) r = kfd_listen(es, k, es->backlog);
      if (r < 0) nk_ext_close(es, k, false);
    }
    if (r < 0) NK_INFO("tenant %s: listener on port %u not restored on nsm %s: %s", es->t->name,
                       ntohs(es->bind_addr.port), m->name, strerror(-r));
    else NK_EVENT("listener_restored", "tenant=%s nsm=%s port=%u", es->t->name, m->name,
                  ntohs(es->bind_addr.port));
  }
}

/* ---- closing ---- */

static void finish_close(struct nk_esock *es) {
  if (es->shm && !nk_shm_close(es)) return; /* flushing to the peer; it brings us back */
  if (es->kind == NK_KIND_STREAM && !es->dead && es->nk && !es->shm) {
    /* Unread received data at close makes Linux send a reset; so do we. */
    int64_t unread = nk_ring_fill_checked(&es->rx);
    bool rst = es->linger0 || unread != 0;
    if (!rst) {
      int64_t fill = nk_ring_fill_checked(&es->tx);
      if (fill > 0) return; /* flush the rest first; EPOLLOUT brings us back */
    }
    nk_sock_close_kfds(es, rst);
  }
  if (es->ext_closing) return; /* the NSM may still touch its rings: FREED brings us back */
  nk_esock_free(es);
}

/* The caller has unlinked es from its tenant's active list (run_active), or it is not on it
 * or stays on it (the proxy hang-up path): es->active is left alone here, because a socket
 * still linked but marked inactive would be linked a second time by nk_sock_activate, which
 * cuts the list and strands the sockets after it (they stay "active" and are never served:
 * seen as sockets that outlive their processes). */
void nk_sock_service(struct nk_esock *es) {
  struct nk_slot *s = slot_of(es);
  atomic_store_explicit(&s->kick, 0, memory_order_relaxed);
  if (!es->dead) {
    if (es->kind == NK_KIND_LISTENER) {
      listener_accept(es);
    } else if (es->shm) {
      nk_shm_service(es);
    } else if (es->ext) {
      if (es->state == NK_ST_CONNECTED) nk_ext_service(es);
    } else if (es->kind == NK_KIND_STREAM && es->state == NK_ST_CONNECTED && es->nk) {
      stream_tx(es);
      if (!es->dead) stream_rx(es);
      if (!es->dead) stream_error(es);
    } else if (es->kind == NK_KIND_DGRAM) {
      dgram_tx(es);
      if (!es->dead) dgram_rx(es);
    }
  }
  if (es->closing) {
    finish_close(es);
    return;
  }
  release_blocker(es);
  if (es->kind != NK_KIND_LISTENER) maybe_ready(es);
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
      nk_ep_mod(es->proxy, es->pending_listen_out ? EPOLLOUT : 0, &es->h_proxy);
    }
    nk_sock_activate(es);
  }
}

/* Linux reports a failed connect as EPOLLIN|EPOLLOUT|EPOLLERR|EPOLLHUP; a hung-up proxy fd
 * reads as EPOLLIN|EPOLLOUT|EPOLLHUP, which is what callers test. The socket is finished, as
 * it is for nearly every program after a failed connect. */
static void connect_failed(struct nk_esock *es, int err) {
  struct nk_slot *s = slot_of(es);
  atomic_store(&s->so_error, err);
  nk_sock_close_kfds(es, false);
  es->state = NK_ST_NEW;
  es->dead = true;
  atomic_store(&s->state, NK_ST_NEW);
  hang_up(es);
  release_blocker(es);
}

static void connect_done(struct nk_esock *es) {
  struct nk_slot *s = slot_of(es);
  int err = 0;
  socklen_t l = sizeof(err);
  getsockopt(es->kfd[0], SOL_SOCKET, SO_ERROR, &err, &l);
  if (err) {
    connect_failed(es, err);
    return;
  }
  es->state = NK_ST_CONNECTED;
  set_local_from_kfd(es, 0);
  set_peer_from_kfd(es, 0);
  atomic_store(&s->state, NK_ST_CONNECTED);
}

void nk_sock_kfd_event(struct nk_esock *es, int idx, uint32_t ev) {
  NK_LOG(2, "slot %u kfd %d events 0x%x", es->slot, idx, ev);

  if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP)) es->can_read = true;
  if (ev & (EPOLLHUP | EPOLLERR | EPOLLRDHUP)) es->peer_fin = true;
  if (ev & EPOLLERR) es->kfd_err = true;
  if (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) es->can_write = true;
  if (es->state == NK_ST_CONNECTING && (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))) connect_done(es);
  if ((ev & EPOLLOUT) && es->type == SOCK_STREAM && es->state == NK_ST_CONNECTED)
    kfd_watch_out(es, false);
  nk_sock_activate(es);
}

/* ---- socket calls ---- */

static int bind_one(struct nk_esock *es, int family, bool loop, const struct nk_addr *a,
                    uint16_t port) {
  int k = kfd_open(es, family, loop);
  if (k < 0) return k;
  struct nk_addr b = *a;
  b.port = port;
  int r = kfd_bind(es, k, &b);
  return r < 0 ? r : k;
}

static uint16_t kfd_port(struct nk_esock *es, int k) {
  if (es->kfd_ext[k]) return es->ext_port[k];
  struct sockaddr_storage ss;
  socklen_t l = sizeof(ss);
  struct nk_addr a = {0};
  if (getsockname(es->kfd[k], (struct sockaddr *)&ss, &l) == 0) nk_addr_from_sa(&a, &ss);
  return a.port;
}

/* Binding maps the application's address onto the tenant's: a wildcard means the tenant's
 * addresses on its NSM plus its own loopback; loopback stays in the tenant's namespace. */
int nk_sock_bind(struct nk_esock *es, const struct nk_addr *req) {
  if (es->bound || es->nk) return -EINVAL;
  struct nk_tenant *t = es->t;
  struct nk_addr a = *req;
  if (a.family == 0) a.family = (uint16_t)es->family;
  if (a.family != es->family) return -EAFNOSUPPORT;
  struct nk_addr ip = a;
  nk_addr_unmap(&ip);
  uint16_t port = a.port;
  int r;
  struct nk_addr any4 = {.family = AF_INET}, any6 = {.family = AF_INET6};
  if (nk_addr_is_any(&a)) {
    if (es->family == AF_INET) {
      if ((r = bind_one(es, AF_INET, false, &t->ipv4, port)) < 0) goto fail;
      port = kfd_port(es, r);
      if ((r = bind_one(es, AF_INET, true, &any4, port)) < 0) goto fail;
    } else {
      if ((r = bind_one(es, AF_INET6, false, &t->ipv6, port)) < 0) goto fail;
      port = kfd_port(es, r);
      if (!es->v6only && (r = bind_one(es, AF_INET, false, &t->ipv4, port)) < 0) goto fail;
      if ((r = bind_one(es, AF_INET6, true, &any6, port)) < 0) goto fail;
    }
  } else if (nk_addr_is_loopback(&ip)) {
    if ((r = bind_one(es, es->family, true, &a, port)) < 0) goto fail;
    port = kfd_port(es, r);
  } else if (nk_addr_eq_ip(&ip, &t->ipv4) && !(es->family == AF_INET6 && es->v6only)) {
    if ((r = bind_one(es, AF_INET, false, &t->ipv4, port)) < 0) goto fail;
    port = kfd_port(es, r);
  } else if (nk_addr_eq_ip(&ip, &t->ipv6)) {
    if ((r = bind_one(es, AF_INET6, false, &t->ipv6, port)) < 0) goto fail;
    port = kfd_port(es, r);
  } else {
    return -EADDRNOTAVAIL;
  }
  es->bound = true;
  es->bind_addr = a;
  es->bind_addr.port = port;
  nk_sock_set_local(es, &es->bind_addr);
  es->state = NK_ST_BOUND;
  atomic_store(&slot_of(es)->state, NK_ST_BOUND);
  if (es->kind == NK_KIND_DGRAM)
    for (int k = 0; k < es->nk; k++) kfd_watch(es, k);
  return 0;
fail:
  nk_sock_close_kfds(es, false);
  return r;
}

int nk_sock_listen(struct nk_esock *es, int backlog) {
  if (es->type != SOCK_STREAM) return -EOPNOTSUPP;
  if (es->kind == NK_KIND_LISTENER) {
    for (int k = 0; k < es->nk; k++)
      if (!es->kfd_ext[k]) listen(es->kfd[k], backlog);
    es->backlog = backlog;
    proxy_fit_backlog(es, backlog);
    return 0;
  }
  if (es->state != NK_ST_NEW && es->state != NK_ST_BOUND) return -EINVAL;
  if (!es->bound) {
    struct nk_addr any = {.family = (uint16_t)es->family};
    int r = nk_sock_bind(es, &any);
    if (r < 0) return r;
  }
  for (int k = 0; k < es->nk; k++) {
    int r = kfd_listen(es, k, backlog);
    if (r < 0) return r;
  }
  es->backlog = backlog;
  proxy_fit_backlog(es, backlog);
  es->kind = NK_KIND_LISTENER;
  es->state = NK_ST_LISTEN;
  struct nk_slot *s = slot_of(es);
  s->kind = NK_KIND_LISTENER;
  atomic_store(&s->state, NK_ST_LISTEN);
  for (int k = 0; k < es->nk; k++)
    if (!es->kfd_ext[k]) nk_ep_add(es->kfd[k], EPOLLIN, &es->h_kfd[k]);
  nk_shm_listener_add(es);
  return 0;
}

int nk_sock_connect(struct nk_esock *es, const struct nk_addr *req, int *in_progress) {
  struct nk_slot *s = slot_of(es);
  *in_progress = 0;
  if (es->kind == NK_KIND_LISTENER) return -EISCONN;
  if (es->dead) return -ECONNABORTED;
  struct nk_addr dst = *req;
  if (dst.family == 0 && es->kind == NK_KIND_DGRAM) { /* AF_UNSPEC: dissolve the association */
    struct nk_addr none = {0};
    nk_sock_set_peer(es, &none);
    es->state = es->bound ? NK_ST_BOUND : NK_ST_NEW;
    atomic_store(&s->state, es->state);
    return 0;
  }
  if (dst.family == AF_INET6 && es->family == AF_INET) return -EAFNOSUPPORT;
  nk_addr_unmap(&dst);
  if (dst.family == AF_INET && es->family == AF_INET6 && es->v6only) return -ENETUNREACH;
  if (es->kind == NK_KIND_STREAM && es->state != NK_ST_CONNECTED) {
    /* A listener of a tenant on this host (or of this one) takes it over shared memory. */
    int r = nk_shm_connect(es, &dst);
    if (r < 0) return r;
    if (r > 0) {
      /* Established already. A non-blocking caller still gets EINPROGRESS, as from Linux TCP
       * (the guest's blocker is let go at once); a blocking one gets 0 without a round trip. */
      *in_progress = atomic_load(&s->nonblock) != 0;
      return 0;
    }
  }
  bool loop = nk_addr_is_loopback(&dst);
  int fam = dst.family;
  int k = -1;
  for (int i = 0; i < es->nk; i++)
    if (es->kfd_loop[i] == loop && (es->kfd_family[i] == fam || (loop && es->kfd_family[i] == AF_INET6)))
      k = i;
  if (es->nk && k < 0) return es->bound ? -EADDRNOTAVAIL : -EINVAL;
  if (k < 0) {
    k = kfd_open(es, loop ? (es->family == AF_INET6 ? AF_INET6 : AF_INET) : fam, loop);
    if (k < 0) return k;
    if (!loop) {
      /* Connections leave with the tenant's own source address (DESIGN §F). */
      int one = 1;
      if (!es->kfd_ext[k])
        setsockopt(es->kfd[k], IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
      struct nk_addr src = fam == AF_INET ? es->t->ipv4 : es->t->ipv6;
      int r = kfd_bind(es, k, &src);
      if (r < 0) {
        nk_sock_close_kfds(es, false);
        return r;
      }
    }
  }
  kfd_keep_only(es, k);
  k = 0;
  if (es->kfd_ext[0]) {
    /* An external NSM: it answers with CONNECTED or ERROR (ext.c). */
    int r = nk_ext_connect(es, &dst);
    if (r < 0) {
      if (es->kind == NK_KIND_STREAM) {
        nk_sock_close_kfds(es, false);
        es->bound = false;
      }
      return r;
    }
    struct nk_addr local = fam == AF_INET ? es->t->ipv4 : es->t->ipv6;
    local.port = es->ext_port[0];
    if (es->kind == NK_KIND_DGRAM) { /* connected at once, as a kernel UDP socket */
      nk_sock_set_peer(es, &dst);
      nk_sock_set_local(es, &local);
      es->state = NK_ST_CONNECTED;
      atomic_store(&s->state, NK_ST_CONNECTED);
      es->bound = true;
      return 0;
    }
    es->ext = true;
    es->state = NK_ST_CONNECTING;
    atomic_store(&s->state, NK_ST_CONNECTING);
    nk_sock_set_local(es, &local);
    nk_sock_set_peer(es, &dst);
    es->can_read = es->can_write = true;
    *in_progress = 1;
    return 0;
  }
  struct sockaddr_storage ss;
  socklen_t l;
  if (loop && es->kfd_family[0] == AF_INET6 && dst.family == AF_INET) {
    struct nk_addr m = {.family = AF_INET6, .port = dst.port};
    m.addr[10] = m.addr[11] = 0xff;
    memcpy(m.addr + 12, dst.addr, 4);
    l = nk_addr_to_sa(&m, &ss);
  } else {
    l = nk_addr_to_sa(&dst, &ss);
  }
  int r = connect(es->kfd[0], (struct sockaddr *)&ss, l);
  if (r < 0 && errno != EINPROGRESS) {
    int e = errno;
    if (es->kind == NK_KIND_STREAM) {
      nk_sock_close_kfds(es, false);
      es->bound = false;
    }
    return -e;
  }
  if (es->kind == NK_KIND_DGRAM) {
    nk_sock_set_peer(es, &dst);
    set_local_from_kfd(es, 0);
    es->state = NK_ST_CONNECTED;
    atomic_store(&s->state, NK_ST_CONNECTED);
    if (!es->bound) kfd_watch(es, 0);
    es->bound = true;
    return 0;
  }
  es->can_read = es->can_write = true;
  kfd_watch(es, 0);
  if (r == 0) {
    es->state = NK_ST_CONNECTING;
    connect_done(es);
  } else {
    es->state = NK_ST_CONNECTING;
    atomic_store(&s->state, NK_ST_CONNECTING);
    set_local_from_kfd(es, 0);
    nk_sock_set_peer(es, &dst);
    *in_progress = 1;
  }
  nk_sock_activate(es);
  return 0;
}

int nk_sock_shutdown(struct nk_esock *es, int how) {
  struct nk_slot *s = slot_of(es);
  if (es->kind == NK_KIND_LISTENER) {
    /* Linux lets shutdown() wake a listener's accept(); the socket then accepts no more. */
    return -ENOTCONN;
  }
  if (es->state != NK_ST_CONNECTED || es->dead) return -ENOTCONN;
  if (how == SHUT_WR || how == SHUT_RDWR) {
    atomic_store(&s->tx_closed, EPIPE);
    es->shut_wr_pending = true;
    es->guest_shut_wr = true;
  }
  if (how == SHUT_RD || how == SHUT_RDWR) {
    if (es->nk && es->kfd[0] >= 0) shutdown(es->kfd[0], SHUT_RD);
    atomic_store(&s->rx_eof, 1);
  }
  if (atomic_load(&s->rx_eof)) {
    if (es->guest_shut_wr) hang_up(es);
    else proxy_shutdown(es);
  }
  nk_sock_activate(es);
  return 0;
}

/* ---- tenant move ---- */

/* Give listener es kernel listeners on NSM m as well, on the same addresses and port, so new
 * connections arriving at m find it. The old NSM's listeners stay until the daemon has
 * steered new traffic away from them (nk_sock_drop_listeners_off). */
int nk_sock_listen_on(struct nk_esock *es, struct nk_nsm *m) {
  int n = es->nk, added = 0;
  for (int k = 0; k < n; k++) {
    if (es->kfd_loop[k] || es->kfd_nsm[k] == m) continue;
    bool have = false;
    for (int j = 0; j < es->nk; j++)
      if (es->kfd_nsm[j] == m && es->kfd_family[j] == es->kfd_family[k]) have = true;
    if (have) continue;
    int fam = es->kfd_family[k];
    int j = kfd_open_on(es, fam, m);
    if (j < 0) return j;
    struct nk_addr a = fam == AF_INET ? es->t->ipv4 : es->t->ipv6;
    a.port = es->bind_addr.port;
    int r = kfd_bind(es, j, &a);
    if (r == 0) r = kfd_listen(es, j, es->backlog);
    if (r < 0) {
      kfd_close_one(es, j, false);
      es->nk--;
      return r;
    }
    if (!es->kfd_ext[j]) nk_ep_add(es->kfd[j], accept_queue_full(es) ? 0 : EPOLLIN, &es->h_kfd[j]);
    added++;
  }
  return added;
}

/* Accept what is still queued on listeners outside keep (and loopback), then close them. */
void nk_sock_drop_listeners_off(struct nk_esock *es, struct nk_nsm *keep) {
  listener_accept(es);
  int w = 0;
  for (int k = 0; k < es->nk; k++) {
    if (es->kfd_loop[k] || es->kfd_nsm[k] == keep) {
      if (w != k) kfd_move(es, w, k, accept_queue_full(es) ? 0 : EPOLLIN);
      w++;
      continue;
    }
    kfd_close_one(es, k, false);
  }
  for (int k = w; k < es->nk; k++) {
    es->kfd[k] = -1;
    es->kfd_nsm[k] = NULL;
  }
  es->nk = w;
}
