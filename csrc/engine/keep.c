/* What outlives the engine: the daemon keeps, for the engine that comes after this one, the
 * kernel objects tenants hold that the engine made — each tenant's region and doorbell, and
 * the engine end of each listener's proxy fd with what it takes to listen again.
 *
 * Why: when the engine dies, its state dies with it, but the tenants' processes live on with
 * the region mapped, the doorbell eventfd and their listeners' proxy fds (nginx waits in
 * epoll on one, and a proxy fd whose other end is gone can never be reconnected). The next
 * engine adopts the same region (every socket that was open there reads as reset; the slots
 * come back when their guest ends are gone), answers on the same doorbell, and listens again
 * for the same proxy fds at the same slots, so a server's listener goes on working and no
 * process has to register again. Connections are not kept: their state was in this process.
 *
 * A live upgrade (handover, below) keeps everything else too: each socket's state and
 * descriptors, the control connections, the tenants' counters. The new engine goes on where
 * this one stopped; nothing is reset.
 *
 * The channel is a SOCK_SEQPACKET pair the daemon made (--keep FD). Each message is a text
 * line, then for a listener or a socket its record (versioned), with descriptors:
 *   engine -> daemon:  region NAME (memfd, doorbell) | listener NAME SLOT GEN (proxy end)
 *                      | drop NAME SLOT GEN | forget NAME
 *                      handover only: sock NAME SLOT GEN (its descriptors) | ctl NAME (fd)
 *                      | counters NAME | handed-over
 *   daemon -> engine, once at start-up: what it kept, then "end".
 * The daemon is trusted (root, it started us), but its records are checked all the same.
 * Nothing here waits on the daemon once running: a full channel loses the record (logged),
 * which costs that listener its survival, never the engine its progress.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include "engine.h"

static int keep_fd = -1;

/* What the daemon handed back at start-up, taken as tenants are added again. */
enum stash_kind { ST_REGION, ST_LISTENER, ST_SOCK, ST_CTL, ST_COUNTERS, ST_NSM };
struct stash {
  char tenant[64];
  enum stash_kind kind;
  int nfds;
  int fds[NK_FDPASS_MAX];
  union {
    struct nk_kept_listener listener;
    struct nk_kept_sock sock;
    struct nk_kept_counters counters;
  } rec;
  void *blob; /* ST_NSM: the kind's record */
  size_t blob_len;
  struct stash *next;
};

static void stash_free(struct stash *s) {
  for (int i = 0; i < s->nfds; i++)
    if (s->fds[i] >= 0) close(s->fds[i]);
  free(s->blob);
  free(s);
}

/* Sockets restored from a handover whose shared-memory peer is in a tenant that may come
 * later: joined up at "serve", when every tenant is back. */
struct peer_link {
  struct nk_esock *es;
  char tenant[64];
  uint32_t slot, gen;
  struct peer_link *next;
};
static struct peer_link *peer_links;
static struct stash *stash;

#define KEEP_MSG_MAX 16384 /* a socket's record is about 5 KiB, an external NSM's about 9 */
_Static_assert(sizeof(struct nk_kept_sock) + 160 <= KEEP_MSG_MAX, "a socket's record fits");

/* wait: a handover, which the daemon reads as we write (else a full channel loses it). */
static bool keep_send_wait(const char *line, const void *rec, size_t reclen, const int *fds,
                           int nfds, bool wait) {
  if (keep_fd < 0) return false;
  static char buf[KEEP_MSG_MAX];
  size_t n = strlen(line);
  if (n + reclen > sizeof(buf)) return false;
  memcpy(buf, line, n);
  if (rec) memcpy(buf + n, rec, reclen);
  for (;;) {
    if (nk_send_with_fds(sendmsg, keep_fd, buf, n + reclen, fds, nfds,
                         MSG_DONTWAIT | MSG_NOSIGNAL) >= 0)
      return true;
    struct pollfd p = {.fd = keep_fd, .events = POLLOUT};
    if (!wait || errno != EAGAIN || poll(&p, 1, 5000) != 1) break;
  }
  NK_INFO("keep channel: '%.*s' not kept (%s): it will not outlive this engine", (int)(n - 1), line,
          strerror(errno));
  if (errno == EPIPE || errno == ECONNRESET) keep_fd = -1;
  return false;
}

static void keep_send(const char *line, const void *rec, size_t reclen, const int *fds, int nfds) {
  (void)keep_send_wait(line, rec, reclen, fds, nfds, false);
}

void nk_keep_region(struct nk_tenant *t) {
  char line[96];
  snprintf(line, sizeof(line), "region %s\n", t->name);
  int fds[2] = {t->memfd, t->doorbell_fd};
  keep_send(line, NULL, 0, fds, 2);
}

void nk_keep_forget(struct nk_tenant *t) {
  char line[96];
  snprintf(line, sizeof(line), "forget %s\n", t->name);
  keep_send(line, NULL, 0, NULL, 0);
}

void nk_keep_listener(struct nk_esock *es) {
  if (keep_fd < 0 || es->proxy < 0) return;
  struct nk_kept_listener k = {.version = NK_KEPT_VERSION,
                               .size = sizeof(k),
                               .slot = es->slot,
                               .gen = es->gen,
                               .family = es->family,
                               .backlog = es->backlog,
                               .bind_addr = es->bind_addr,
                               .sndbuf = es->sndbuf,
                               .rcvbuf = es->rcvbuf,
                               .v6only = es->v6only,
                               .linger0 = es->linger0,
                               .linger = es->linger};
  if (es->opts) {
    k.nopts = es->opts->n;
    memcpy(k.opts, es->opts->o, sizeof(k.opts[0]) * (size_t)es->opts->n);
  }
  char line[128];
  snprintf(line, sizeof(line), "listener %s %u %u\n", es->t->name, es->slot, es->gen);
  es->kept = keep_send_wait(line, &k, sizeof(k), &es->proxy, 1, false) || es->kept;
}

void nk_keep_drop(struct nk_esock *es) {
  if (!es->kept) return;
  es->kept = false;
  char line[128];
  snprintf(line, sizeof(line), "drop %s %u %u\n", es->t->name, es->slot, es->gen);
  keep_send(line, NULL, 0, NULL, 0);
}

/* ---- a live upgrade: everything to the next engine ---- */

static uint8_t ep_kind(const struct nk_endpoint *e) {
  if (e->ops == &nk_kernel_ep_ops) return NK_KEPT_EP_KERNEL;
  if (e->ops == &nk_shm_ep_ops) return NK_KEPT_EP_SHM;
  if (e->nsm && e->nsm->handed_over && e->ops == e->nsm->type->ep) return NK_KEPT_EP_NSM;
  return NK_KEPT_EP_OTHER;
}

static bool all_nsms_handed = true; /* an NSM that could not: closed ids may name sockets */

/* A socket's record and descriptors; false when it cannot be handed over (an endpoint on an
 * external NSM: that stack resets its sockets when this engine goes, and the next engine
 * reads the socket as reset; a listener there is kept as a listener). */
static bool hand_over_sock(struct nk_esock *es) {
  static struct nk_kept_sock k;
  memset(&k, 0, sizeof(k));
  k.version = NK_KEPT_VERSION;
  k.size = sizeof(k);
  k.esock_size = sizeof(struct nk_esock);
  int fds[NK_FDPASS_MAX], n = 0;
  if (es->proxy >= 0) {
    k.fdmask |= 1u << NK_KEPT_FD_PROXY;
    fds[n++] = es->proxy;
  }
  if (es->direct >= 0) {
    k.fdmask |= 1u << NK_KEPT_FD_DIRECT;
    fds[n++] = es->direct;
  }
  if (es->pending_fd >= 0) {
    k.fdmask |= 1u << NK_KEPT_FD_PENDING;
    fds[n++] = es->pending_fd;
  }
  for (int j = 0; j < es->ep_count; j++) {
    struct nk_endpoint *e = &es->ep[j];
    k.ep_kind[j] = ep_kind(e);
    if (k.ep_kind[j] == NK_KEPT_EP_OTHER) return false;
    if (e->nsm) snprintf(k.ep_nsm[j], sizeof(k.ep_nsm[j]), "%s", e->nsm->name);
    if (e->fd >= 0) {
      k.fdmask |= 1u << (NK_KEPT_FD_EP + j);
      fds[n++] = e->fd;
    }
  }
  if (es->ep_held && !all_nsms_handed) return false; /* a closed endpoint an NSM still holds */
  if (es->opts) {
    k.nopts = es->opts->n;
    memcpy(k.opts, es->opts->o, sizeof(k.opts[0]) * (size_t)es->opts->n);
  }
  if (es->shm_peer) {
    snprintf(k.peer_tenant, sizeof(k.peer_tenant), "%s", es->shm_peer->t->name);
    k.peer_slot = es->shm_peer->slot;
    k.peer_gen = es->shm_peer->gen;
  }
  memcpy(&k.es, es, sizeof(*es));
  char line[128];
  snprintf(line, sizeof(line), "sock %s %u %u\n", es->t->name, es->slot, es->gen);
  return keep_send_wait(line, &k, sizeof(k), fds, n, true);
}

/* What a next engine must match to take sockets over from this one. */
const char *nk_state_version(void) {
  static char v[64];
  snprintf(v, sizeof(v), "%u/%zu/%zu", NK_KEPT_VERSION, sizeof(struct nk_kept_sock),
           sizeof(struct nk_esock));
  return v;
}

bool nk_keep_nsm_out(struct nk_nsm *m, const void *rec, size_t len, const int *fds, int nfds) {
  char line[96];
  snprintf(line, sizeof(line), "nsm %s\n", m->name);
  return keep_send_wait(line, rec, len, fds, nfds, true);
}

int nk_keep_handover(void) {
  if (keep_fd < 0) return -ENOTCONN;
  unsigned socks = 0, skipped = 0;
  char line[128];
  /* The NSMs first: which of their sockets can go depends on whether they could. */
  for (struct nk_nsm *m = engine.nsms; m; m = m->next) {
    m->handed_over = m->type->hand_over && m->type->hand_over(m);
    if (m->type->hand_over && !m->handed_over) all_nsms_handed = false;
  }
  for (struct nk_tenant *t = engine.tenants; t; t = t->next) {
    for (uint32_t i = 0; i < t->hwm; i++) {
      struct nk_esock *es = t->socks[i];
      if (!es || es->freed) continue;
      if (hand_over_sock(es)) socks++;
      else skipped++;
    }
    struct nk_kept_counters c = {.version = NK_KEPT_VERSION,
                                 .id = t->id,
                                 .tx_bytes = t->tx_bytes,
                                 .rx_bytes = t->rx_bytes,
                                 .refused_sockets = t->refused_sockets,
                                 .refused_memory = t->refused_memory,
                                 .rings_shrunk = t->rings_shrunk,
                                 .region_trimmed = t->region_trimmed,
                                 .dns_relayed = t->dns_relayed,
                                 .dns_dropped = t->dns_dropped,
                                 .cpu_total_ns = t->cpu_total_ns,
                                 .cpu_skips = t->cpu_skips};
    snprintf(line, sizeof(line), "counters %s\n", t->name);
    keep_send_wait(line, &c, sizeof(c), NULL, 0, true);
  }
  unsigned ctls = nk_control_hand_over();
  NK_EVENT("handed_over", "sockets=%u not_handed=%u control_connections=%u", socks, skipped, ctls);
  keep_send_wait("handed-over\n", NULL, 0, NULL, 0, true);
  return (int)socks;
}

bool nk_keep_ctl(struct nk_tenant *t, int fd) {
  char line[96];
  snprintf(line, sizeof(line), "ctl %s\n", t->name);
  return keep_send_wait(line, NULL, 0, &fd, 1, true);
}

/* ---- start-up: what the last engine left ---- */

static int read_stash(void) {
  for (;;) {
    struct pollfd p = {.fd = keep_fd, .events = POLLIN};
    if (poll(&p, 1, 10000) != 1) return -ETIMEDOUT;
    static char buf[KEEP_MSG_MAX + 1];
    union {
      char b[CMSG_SPACE(sizeof(int) * NK_FDPASS_MAX)];
      struct cmsghdr align;
    } cm;
    struct iovec iov = {.iov_base = buf, .iov_len = sizeof(buf) - 1};
    struct msghdr mh = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.b, .msg_controllen = sizeof(cm.b)};
    ssize_t n = recvmsg(keep_fd, &mh, MSG_CMSG_CLOEXEC);
    if (n <= 0) return n == 0 ? -EPIPE : -errno;
    struct stash *s = calloc(1, sizeof(*s));
    if (!s) return -ENOMEM;
    for (int i = 0; i < NK_FDPASS_MAX; i++) s->fds[i] = -1;
    s->nfds = nk_fds_from_cmsg(&mh, s->fds, NK_FDPASS_MAX);
    buf[n] = 0;
    char *nl = memchr(buf, '\n', (size_t)n);
    size_t head = nl ? (size_t)(nl - buf) + 1 : (size_t)n, body = (size_t)n - head;
    unsigned slot, gen;
    if (!strncmp(buf, "end\n", 4)) {
      stash_free(s);
      return 0;
    } else if (sscanf(buf, "region %63s", s->tenant) == 1 && s->nfds == 2) {
      s->kind = ST_REGION;
    } else if (sscanf(buf, "listener %63s %u %u", s->tenant, &slot, &gen) == 3 && s->nfds == 1 &&
               body == sizeof(struct nk_kept_listener)) {
      s->kind = ST_LISTENER;
      memcpy(&s->rec.listener, buf + head, body);
    } else if (sscanf(buf, "sock %63s %u %u", s->tenant, &slot, &gen) == 3 &&
               body == sizeof(struct nk_kept_sock)) {
      s->kind = ST_SOCK;
      memcpy(&s->rec.sock, buf + head, body);
    } else if (sscanf(buf, "ctl %63s", s->tenant) == 1 && s->nfds == 1) {
      s->kind = ST_CTL;
    } else if (sscanf(buf, "nsm %63s", s->tenant) == 1 && (s->blob = malloc(body ? body : 1))) {
      s->kind = ST_NSM;
      memcpy(s->blob, buf + head, body);
      s->blob_len = body;
    } else if (sscanf(buf, "counters %63s", s->tenant) == 1 &&
               body == sizeof(struct nk_kept_counters)) {
      s->kind = ST_COUNTERS;
      memcpy(&s->rec.counters, buf + head, body);
    } else {
      NK_INFO("keep channel: a record the engine cannot read (%zd bytes, %d fds): skipped", n,
              s->nfds);
      stash_free(s);
      continue;
    }
    s->next = stash;
    stash = s;
  }
}

int nk_keep_init(int fd) {
  keep_fd = fd;
  int r = read_stash();
  if (r < 0) NK_INFO("keep channel: reading what the last engine left: %s", strerror(-r));
  return r;
}

/* The next stash entry of kind for tenant name, taken off the stash. */
static struct stash *take(enum stash_kind kind, const char *name) {
  for (struct stash **p = &stash; *p; p = &(*p)->next) {
    struct stash *s = *p;
    if (s->kind != kind || (name && strcmp(s->tenant, name))) continue;
    *p = s->next;
    return s;
  }
  return NULL;
}

void *nk_keep_nsm_in(const char *name, size_t *len, int *fds, int *nfds) {
  struct stash *s = take(ST_NSM, name);
  if (!s) return NULL;
  void *blob = s->blob;
  *len = s->blob_len;
  *nfds = s->nfds;
  memcpy(fds, s->fds, sizeof(int) * (size_t)s->nfds);
  free(s);
  return blob;
}

uint32_t nk_keep_tenant_id(const char *name) {
  for (struct stash *s = stash; s; s = s->next)
    if (s->kind == ST_COUNTERS && !strcmp(s->tenant, name) &&
        s->rec.counters.version == NK_KEPT_VERSION)
      return s->rec.counters.id;
  return 0;
}

/* The region and doorbell the daemon kept for tenant name (ownership passes), or false. */
bool nk_keep_take_region(const char *name, int *memfd, int *doorbell) {
  struct stash *s = take(ST_REGION, name);
  if (!s) return false;
  *memfd = s->fds[0];
  *doorbell = s->fds[1];
  free(s);
  return true;
}

static int check_opts(int n, const struct nk_opt *o) {
  if (n < 0 || n > NK_MAX_OPTS) return -EINVAL;
  for (int i = 0; i < n; i++)
    if (o[i].len > sizeof(o[i].val)) return -EINVAL;
  return 0;
}

static struct nk_optset *optset_of(int n, const struct nk_opt *o) {
  if (!n) return NULL;
  struct nk_optset *set = malloc(sizeof(*set));
  if (!set) return NULL;
  set->refs = 1;
  set->n = n;
  memcpy(set->o, o, sizeof(o[0]) * (size_t)n);
  return set;
}

static int check_record(const struct nk_tenant *t, const struct nk_kept_listener *k) {
  if (k->version != NK_KEPT_VERSION || k->size != sizeof(*k)) return -EPROTO;
  if (k->slot >= t->nslots || (k->slot < t->hwm && t->socks[k->slot])) return -EINVAL;
  if (k->family != AF_INET && k->family != AF_INET6) return -EINVAL;
  return check_opts(k->nopts, k->opts);
}

/* Listen again for a kept listener, at its slot and generation, on the tenant's NSM. The
 * proxy end is the new socket's, or closed here when there is none. */
static int restore_listener(struct nk_tenant *t, const struct nk_kept_listener *k, int proxy) {
  int r = check_record(t, k);
  struct nk_esock *es =
      r < 0 ? NULL : nk_esock_alloc_at(t, k->slot, k->gen, proxy, k->family, SOCK_STREAM);
  if (!es) {
    if (r == 0) r = -errno;
    close(proxy);
    return r;
  }
  es->proxy_in_tenant_ns = true; /* a listener's pair is always the guest's (socket, renew) */
  nk_sock_slot(es)->inode = nk_diag_peer_of_fd(t, proxy);
  nk_epoll_add(es->proxy, EPOLLIN, &es->h_proxy);
  es->opts = optset_of(k->nopts, k->opts);
  es->sndbuf = k->sndbuf;
  es->rcvbuf = k->rcvbuf;
  es->v6only = k->v6only;
  es->linger0 = k->linger0;
  es->linger = k->linger;
  struct nk_addr b = k->bind_addr;
  r = nk_sock_bind(es, &b);
  if (r == 0) r = nk_sock_listen(es, k->backlog);
  if (r < 0) nk_sock_fail(es, ECONNABORTED, NK_END_BROKEN); /* accept() fails, as it would */
  return r;
}

static bool ring_ok(const struct nk_tenant *t, uint32_t size) {
  return size >= 4096 && size <= t->ring_size && !(size & (size - 1));
}

/* The next descriptor of a handed-over socket's, in the order hand_over_sock() sent them. */
static int next_fd(struct stash *s, uint32_t mask, int bit, int *at) {
  if (!(mask & (1u << bit)) || *at >= s->nfds) return -1;
  int fd = s->fds[*at];
  s->fds[(*at)++] = -1;
  return fd;
}

/* Shared-memory pairs whose both ends are back are joined again (the ends of a pair come
 * with their tenants, one after the other). */
static void join_peers(void) {
  for (struct peer_link **p = &peer_links; *p;) {
    struct peer_link *l = *p;
    struct nk_tenant *pt = nk_tenant_find(l->tenant);
    struct nk_esock *peer = pt ? nk_esock_get(pt, l->slot, l->gen) : NULL;
    if (!peer) {
      p = &l->next;
      continue;
    }
    /* Each end has its own link: the peer's names this socket, and is joined in this pass. */
    l->es->shm_peer = peer;
    l->es->shm_waiting = false;
    nk_sock_activate(l->es);
    *p = l->next;
    free(l);
  }
}

/* A socket the last engine handed over: its state as it was, its descriptors, its place in
 * every list this engine keeps. The record is the last engine's (the daemon only carries it);
 * its layout is checked (NK_KEPT_VERSION, the sizes) before anything in it is believed. */
static int restore_sock(struct nk_tenant *t, struct stash *st) {
  const struct nk_kept_sock *k = &st->rec.sock;
  const struct nk_esock *o = &k->es;
  if (k->version != NK_KEPT_VERSION || k->size != sizeof(*k) ||
      k->esock_size != sizeof(struct nk_esock))
    return -EPROTO;
  if (o->slot >= t->nslots || (o->slot < t->hwm && t->socks[o->slot])) return -EINVAL;
  if (o->ep_count < 0 || o->ep_count > NK_MAX_EP || check_opts(k->nopts, k->opts) < 0 ||
      !ring_ok(t, o->tx.size) || !ring_ok(t, o->rx.size))
    return -EINVAL;
  struct nk_nsm *nsms[NK_MAX_EP] = {0};
  for (int j = 0; j < o->ep_count; j++) {
    uint8_t kind = k->ep_kind[j];
    if (kind != NK_KEPT_EP_KERNEL && kind != NK_KEPT_EP_SHM && kind != NK_KEPT_EP_NSM)
      return -EINVAL;
    if (k->ep_nsm[j][0] && !(nsms[j] = nk_nsm_find(k->ep_nsm[j]))) return -ENOENT;
    if (kind == NK_KEPT_EP_NSM && !nsms[j]) return -EINVAL;
  }
  struct nk_esock *es = malloc(sizeof(*es));
  if (!es) return -ENOMEM;
  memcpy(es, o, sizeof(*es));
  es->t = t;
  es->opts = optset_of(k->nopts, k->opts);
  /* Lists are this engine's: off all of them, then back on those it was on. */
  bool zombie = es->zombie, bulk = es->on_bulk, port_map = es->in_port_map;
  es->zombie = es->on_bulk = es->in_port_map = es->active = es->throttled = false;
  es->accept_refused = false;
  es->next_zombie = NULL;
  es->prev_zombie = NULL;
  es->next_bulk = NULL;
  es->prev_bulk = NULL;
  es->next_active = es->next_throttled = es->next_port = es->next_refused = NULL;
  es->shm_peer = NULL;
  es->freed = false;
  es->h_proxy = (struct nk_handle){NK_H_PROXY, 0, es};
  es->h_direct = (struct nk_handle){NK_H_DIRECT, 0, es};
  int at = 0;
  es->proxy = next_fd(st, k->fdmask, NK_KEPT_FD_PROXY, &at);
  es->direct = next_fd(st, k->fdmask, NK_KEPT_FD_DIRECT, &at);
  es->pending_fd = next_fd(st, k->fdmask, NK_KEPT_FD_PENDING, &at);
  for (int j = 0; j < NK_MAX_EP; j++) {
    struct nk_endpoint *e = &es->ep[j];
    e->h = (struct nk_handle){NK_H_ENDPOINT, j, es};
    if (j >= es->ep_count) {
      *e = (struct nk_endpoint){.fd = -1, .id = NK_EXT_LOST, .h = e->h};
      continue;
    }
    e->ops = k->ep_kind[j] == NK_KEPT_EP_KERNEL ? &nk_kernel_ep_ops
             : k->ep_kind[j] == NK_KEPT_EP_SHM  ? &nk_shm_ep_ops
                                                : nsms[j]->type->ep;
    e->nsm = nsms[j];
    e->fd = next_fd(st, k->fdmask, NK_KEPT_FD_EP + j, &at);
  }
  struct nk_slot *s = &t->slots[es->slot];
  uint8_t *ring = t->rings + (uint64_t)es->slot * 2u * t->ring_size;
  nk_ring_init(&es->tx, ring, es->tx.size, &s->tx_head, &s->tx_tail);
  nk_ring_init(&es->rx, ring + t->ring_size, es->rx.size, &s->rx_head, &s->rx_tail);
  t->socks[es->slot] = es;
  t->nsocks++;
  t->ring_bytes += (uint64_t)es->tx.size + es->rx.size;
  if (es->slot >= t->hwm) {
    t->hwm = es->slot + 1;
    atomic_store_explicit(&t->rg->slots_hwm, t->hwm, memory_order_release);
  }
  (void)nk_fds_take(t, NK_SOCK_FDS + es->ep_fds);
  if (zombie) nk_sock_relink_zombie(es);
  if (bulk) nk_tenant_bulk_add(es);
  if (port_map) nk_shm_listener_add(es);
  if (k->peer_tenant[0]) {
    struct peer_link *l = calloc(1, sizeof(*l));
    if (l) {
      l->es = es;
      es->shm_waiting = true;
      snprintf(l->tenant, sizeof(l->tenant), "%s", k->peer_tenant);
      l->slot = k->peer_slot;
      l->gen = k->peer_gen;
      l->next = peer_links;
      peer_links = l;
      join_peers();
    }
  }
  /* Its descriptors on this engine's epoll, then a look at everything (level-triggered:
   * whatever is ready now is seen; a spurious look costs nothing). */
  if (es->proxy >= 0)
    nk_epoll_add(es->proxy, EPOLLIN | (es->pending_listen_out ? EPOLLOUT : 0), &es->h_proxy);
  for (int j = 0; j < es->ep_count; j++) {
    struct nk_endpoint *e = &es->ep[j];
    /* A kernel socket's events come by epoll; an NSM kind's watch learns the socket's ids. */
    if (!e->ops->watch || (e->ops == &nk_kernel_ep_ops && e->fd < 0)) continue;
    if (es->kind == NK_KIND_LISTENER)
      e->ops->watch(es, j, nk_sock_accept_queue_full(es) ? 0 : EPOLLIN);
    else e->ops->watch(es, j, NK_EP_DATA_EVENTS);
  }
  if (es->direct >= 0) nk_direct_watch(es);
  nk_sock_activate(es);
  return 0;
}

void nk_keep_restore(struct nk_tenant *t) {
  unsigned socks = 0;
  for (struct stash *s; (s = take(ST_SOCK, t->name)); stash_free(s)) {
    int r = restore_sock(t, s);
    if (r < 0)
      NK_INFO("tenant %s: socket at slot %u not handed over: %s", t->name, s->rec.sock.es.slot,
              strerror(-r));
    else socks++;
  }
  for (struct stash *s; (s = take(ST_LISTENER, t->name)); free(s)) {
    const struct nk_kept_listener *k = &s->rec.listener;
    struct nk_esock *have = k->slot < t->hwm ? t->socks[k->slot] : NULL;
    if (have && have->gen == k->gen) { /* handed over whole, just now */
      close(s->fds[0]);
      continue;
    }
    int r = restore_listener(t, k, s->fds[0]);
    if (r < 0) {
      NK_INFO("tenant %s: listener at slot %u (port %u) not restored: %s", t->name, k->slot,
              ntohs(k->bind_addr.port), strerror(-r));
    } else {
      NK_EVENT("listener_restored", "tenant=%s slot=%u port=%u", t->name, k->slot,
               ntohs(k->bind_addr.port));
    }
  }
  struct stash *c = take(ST_COUNTERS, t->name);
  if (c && c->rec.counters.version == NK_KEPT_VERSION) {
    const struct nk_kept_counters *k = &c->rec.counters;
    t->tx_bytes = k->tx_bytes;
    t->rx_bytes = k->rx_bytes;
    t->refused_sockets = k->refused_sockets;
    t->refused_memory = k->refused_memory;
    t->rings_shrunk = k->rings_shrunk;
    t->region_trimmed = k->region_trimmed;
    t->dns_relayed = k->dns_relayed;
    t->dns_dropped = k->dns_dropped;
    t->cpu_total_ns = k->cpu_total_ns;
    t->cpu_skips = k->cpu_skips;
  }
  if (c) stash_free(c);
  if (socks) NK_EVENT("sockets_taken_over", "tenant=%s sockets=%u", t->name, socks);
}

/* Every tenant is back ("serve"): shared-memory pairs are joined again, the control
 * connections handed over are answered, and what no tenant took is let go. */
void nk_keep_finish(void) {
  for (struct nk_nsm *m = engine.nsms; m; m = m->next)
    if (m->type->resume) m->type->resume(m);
  join_peers();
  while (peer_links) { /* peers that did not come: alone now, as after the peer's close */
    struct peer_link *l = peer_links;
    peer_links = l->next;
    NK_INFO("tenant %s slot %u: its shared-memory peer was not handed over", l->es->t->name,
            l->es->slot);
    l->es->shm_waiting = false;
    nk_sock_activate(l->es);
    free(l);
  }
  for (struct stash *s; (s = take(ST_CTL, NULL)); free(s)) {
    struct nk_tenant *t = nk_tenant_find(s->tenant);
    if (!t || nk_control_adopt(t, s->fds[0]) < 0) close(s->fds[0]);
  }
  while (stash) {
    struct stash *s = stash;
    stash = s->next;
    stash_free(s);
  }
}
