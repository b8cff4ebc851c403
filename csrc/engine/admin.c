/* The admin socket: a line protocol for the daemon (Python). One request line, then zero or
 * more data lines and a final "ok [value]" or "err ERRNO_NAME message" line.
 * Only root in the engine's own network namespace may connect: tenant processes run as root
 * too, but never in this namespace. */
#include <arpa/inet.h>
#include <errno.h>
#include <linux/tcp.h> /* struct tcp_info with delivery_rate (glibc's copy is older) */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "engine.h"

struct nk_admin {
  int fd;
  struct nk_handle h;
  char in[4096];
  size_t inlen;
  char *out;
  size_t outlen, outcap;
  struct nk_admin *next;
};
static struct nk_admin *admins;
static int admin_listen_fd = -1;
static struct nk_handle h_admin_listen = {NK_H_ADMIN_LISTEN, 0, NULL};
void nk_control_forget_tenant(struct nk_tenant *t);

int nk_admin_listen(const char *path) {
  int fd = nk_unix_listen(path, SOCK_STREAM, 0600, 16);
  if (fd < 0) return fd;
  admin_listen_fd = fd;
  nk_epoll_add(fd, EPOLLIN, &h_admin_listen);
  return 0;
}

static void out(struct nk_admin *a, const char *fmt, ...) {
  char line[1024];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line, sizeof(line), fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n >= sizeof(line)) n = sizeof(line) - 1;
  if (a->outlen + (size_t)n + 1 > a->outcap) {
    size_t cap = a->outcap ? a->outcap * 2 : 8192;
    while (cap < a->outlen + (size_t)n + 1) cap *= 2;
    char *p = realloc(a->out, cap);
    if (!p) return;
    a->out = p;
    a->outcap = cap;
  }
  memcpy(a->out + a->outlen, line, (size_t)n);
  a->outlen += (size_t)n;
  a->out[a->outlen++] = '\n';
}

static void err(struct nk_admin *a, int e, const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  const char *name = strerrorname_np(e);
  out(a, "err %s %s", name ? name : "EINVAL", msg);
}

static const char *kind_name(int k) {
  switch (k) {
    case NK_KIND_STREAM:
      return "stream";
    case NK_KIND_DGRAM:
      return "dgram";
    case NK_KIND_LISTENER:
      return "listener";
  }
  return "free";
}

static const char *state_name(uint32_t s) {
  static const char *names[] = {"new", "bound", "listen", "connecting", "connected", "closed"};
  return s < 6 ? names[s] : "?";
}

/* "key=value" with an unsigned decimal value; false on anything else. */
static bool kv_u64(const char *arg, const char *key, uint64_t *out) {
  size_t kl = strlen(key);
  if (strncmp(arg, key, kl) || arg[kl] != '=') return false;
  const char *v = arg + kl + 1;
  if (*v < '0' || *v > '9') return false;
  char *end;
  errno = 0;
  unsigned long long x = strtoull(v, &end, 10);
  if (*end || errno) return false;
  *out = x;
  return true;
}

/* tenant-set NAME key=value...: all checked before any is applied. */
static void tenant_set(struct nk_admin *a, struct nk_tenant *t, int argc, char **argv) {
  uint64_t rate_tx = t->rate[NK_TX] * 8, rate_rx = t->rate[NK_RX] * 8, weight = t->weight,
           max_sockets = t->max_sockets, max_memory = t->max_memory, shm = t->shm,
           tenant_cc = t->cc.on;
  for (int i = 2; i < argc; i++) {
    uint64_t v;
    if (kv_u64(argv[i], "rate_tx", &v)) rate_tx = v;
    else if (kv_u64(argv[i], "shm", &v) && v <= 1) shm = v;
    else if (kv_u64(argv[i], "tenant_cc", &v) && v <= 1) tenant_cc = v;
    else if (kv_u64(argv[i], "rate_rx", &v)) rate_rx = v;
    else if (kv_u64(argv[i], "weight", &v)) weight = v;
    else if (kv_u64(argv[i], "max_sockets", &v)) max_sockets = v;
    else if (kv_u64(argv[i], "max_memory", &v)) max_memory = v;
    else
      return err(a, EINVAL,
                 "bad setting '%s' (known: rate_tx, rate_rx, weight, max_sockets, "
                 "max_memory, each =unsigned integer; shm=0|1, tenant_cc=0|1)",
                 argv[i]);
  }
  if (weight < 1 || weight > 1000) return err(a, EINVAL, "weight must be 1..1000");
  if (max_sockets > t->nslots)
    return err(a, EINVAL, "max_sockets %llu is above the tenant's %u slots",
               (unsigned long long)max_sockets, t->nslots);
  if (rate_tx != t->rate[NK_TX] * 8) nk_tenant_set_rate(t, NK_TX, rate_tx);
  if (rate_rx != t->rate[NK_RX] * 8) nk_tenant_set_rate(t, NK_RX, rate_rx);
  t->weight = (uint32_t)weight;
  t->max_sockets = (uint32_t)max_sockets;
  t->max_memory = max_memory;
  t->shm = shm; /* new connections; those on the path stay there */
  nk_cc_set(t, tenant_cc);
  NK_EVENT("policy_set",
           "tenant=%s rate_tx=%llu rate_rx=%llu weight=%u max_sockets=%u max_memory=%llu shm=%d "
           "tenant_cc=%d",
           t->name, (unsigned long long)rate_tx, (unsigned long long)rate_rx, t->weight,
           t->max_sockets, (unsigned long long)t->max_memory, t->shm, t->cc.on);
  out(a, "ok");
}

static const char *tcp_state_name(uint8_t st) {
  static const char *names[] = {"?",          "established", "syn-sent",  "syn-recv",
                                "fin-wait-1", "fin-wait-2",  "time-wait", "close",
                                "close-wait", "last-ack",    "listen",    "closing"};
  return st < sizeof(names) / sizeof(names[0]) ? names[st] : "?";
}

/* One "conn" line; for TCP on an NSM, the NSM's own view from TCP_INFO. */
static void conn_line(struct nk_admin *a, struct nk_tenant *t, uint32_t i, struct nk_esock *es) {
  char l[64], p[64], tcp[384] = "";
  struct nk_slot *sl = &t->slots[i];
  nk_addr_fmt(&es->local, l, sizeof(l)); /* the engine's copies: the slot's are the tenant's */
  nk_addr_fmt(&es->peer, p, sizeof(p));
  struct nk_nsm *m = nk_sock_nsm(es);
  if (es->type == SOCK_STREAM && es->ep_count && es->kind != NK_KIND_LISTENER &&
      es->ep[0].ops->getopt) {
    struct tcp_info ti;
    char ca[16] = "";
    socklen_t tl = sizeof(ti), cl = sizeof(ca) - 1;
    memset(&ti, 0, sizeof(ti));
    if (es->ep[0].ops->getopt(es, 0, IPPROTO_TCP, TCP_INFO, &ti, &tl) == 0) {
      es->ep[0].ops->getopt(es, 0, IPPROTO_TCP, TCP_CONGESTION, ca, &cl);
      snprintf(tcp, sizeof(tcp),
               " tcp_state=%s rtt_us=%u rttvar_us=%u cwnd=%u ssthresh=%u mss=%u retrans=%u"
               " total_retrans=%u lost=%u unacked=%u delivery_rate=%llu pacing_rate=%llu"
               " bytes_acked=%llu bytes_received=%llu ca=%s",
               tcp_state_name(ti.tcpi_state), ti.tcpi_rtt, ti.tcpi_rttvar, ti.tcpi_snd_cwnd,
               ti.tcpi_snd_ssthresh, ti.tcpi_snd_mss, ti.tcpi_retrans, ti.tcpi_total_retrans,
               ti.tcpi_lost, ti.tcpi_unacked, (unsigned long long)ti.tcpi_delivery_rate,
               (unsigned long long)ti.tcpi_pacing_rate, (unsigned long long)ti.tcpi_bytes_acked,
               (unsigned long long)ti.tcpi_bytes_received, ca[0] ? ca : "?");
    }
  }
  /* Which path carries it: an NSM, the tenant's loopback, or shared memory (then the peer's
   * tenant is named too). */
  const char *path = es->shm ? "shm" : m ? "nsm" : es->ep_count ? "loopback" : "-";
  /* Who moves the bytes between the socket's rings and its program: GuestLib in the program,
   * or the engine itself for the tenant's relay (direct.c; its readiness and ends shown). */
  char direct[96] = " carrier=guest";
  if (es->direct >= 0)
    snprintf(direct, sizeof(direct), " carrier=direct direct=rd:%d,wr:%d,hup:%d,eof:%d,shut:%d",
             es->direct_rd, es->direct_wr, es->direct_hup, es->direct_eof, es->direct_shut);
  char peer_tenant[80] = "";
  if (es->shm_peer)
    snprintf(peer_tenant, sizeof(peer_tenant), " peer_tenant=%s", es->shm_peer->t->name);
  out(a,
      "conn tenant=%s slot=%u kind=%s state=%s nsm=%s path=%s%s proto=%s local=%s peer=%s tx_bytes=%llu"
      " rx_bytes=%llu tx_queued=%lld rx_queued=%lld ready_sent=%u rx_ack=%u blocker=%d stalled=%u"
      " throttled=%d%s%s",
      t->name, i, kind_name(es->kind), es->closing ? "closing" : state_name(es->state),
      es->shm ? "shm"
      : m     ? m->name
              : (es->ep_count ? "loopback" : "-"),
      path, peer_tenant, es->type == SOCK_STREAM ? "tcp" : "udp", l, p,
      (unsigned long long)es->tx_bytes, (unsigned long long)es->rx_bytes,
      (long long)nk_ring_fill_checked(&es->tx), (long long)nk_ring_fill_checked(&es->rx),
      es->ready_sent, atomic_load(&sl->rx_ack), es->blocker_held, atomic_load(&sl->rx_stalled),
      es->throttled, direct, tcp);
}

/* The reply, whole, before the engine ends (handover): the daemon waits for it. */
static void admin_flush_now(struct nk_admin *a) {
  size_t off = 0;
  while (off < a->outlen) {
    ssize_t n = send(a->fd, a->out + off, a->outlen - off, MSG_NOSIGNAL);
    if (n <= 0) break;
    off += (size_t)n;
  }
}

static void command(struct nk_admin *a, char *line) {
  char *argv[16];
  int argc = 0;
  for (char *tok = strtok(line, " \t\r"); tok && argc < 16; tok = strtok(NULL, " \t\r"))
    argv[argc++] = tok;
  if (argc == 0) return err(a, EINVAL, "empty request");
  const char *cmd = argv[0];
  if (!strcmp(cmd, "nsm-add") && (argc == 3 || argc == 4)) {
    int r = nk_nsm_add(argv[1], argv[2], argc == 4 ? argv[3] : "kernel");
    if (r < 0) return err(a, -r, "cannot add nsm %s: %s", argv[1], strerror(-r));
    return out(a, "ok");
  }
  if (!strcmp(cmd, "nsm-del") && argc == 2) {
    struct nk_nsm *m = nk_nsm_find(argv[1]);
    if (!m) return err(a, ENOENT, "unknown nsm '%s'", argv[1]);
    int r = nk_nsm_del(m);
    if (r == -EBUSY) return err(a, EBUSY, "nsm %s still has tenants or connections", argv[1]);
    return r < 0 ? err(a, -r, "cannot remove nsm %s", argv[1]) : out(a, "ok");
  }
  if (!strcmp(cmd, "nsm-set") && argc == 3) {
    struct nk_nsm *m = nk_nsm_find(argv[1]);
    if (!m) return err(a, ENOENT, "unknown nsm '%s'", argv[1]);
    uint64_t bw;
    if (!kv_u64(argv[2], "bandwidth", &bw))
      return err(a, EINVAL, "bad setting '%s' (known: bandwidth=BITS_PER_SECOND)", argv[2]);
    nk_nsm_set_bandwidth(m, bw);
    NK_EVENT("nsm_set", "nsm=%s bandwidth=%llu", m->name, (unsigned long long)bw);
    return out(a, "ok");
  }
  if (!strcmp(cmd, "tenant-set") && argc >= 3) {
    struct nk_tenant *t = nk_tenant_find(argv[1]);
    if (!t) return err(a, ENOENT, "unknown tenant '%s'", argv[1]);
    return tenant_set(a, t, argc, argv);
  }
  if (!strcmp(cmd, "tenant-move") && argc == 3) {
    struct nk_tenant *t = nk_tenant_find(argv[1]);
    if (!t) return err(a, ENOENT, "unknown tenant '%s'", argv[1]);
    struct nk_nsm *m = nk_nsm_find(argv[2]);
    if (!m) return err(a, ENOENT, "unknown nsm '%s'", argv[2]);
    int r = nk_tenant_move(t, m);
    if (r < 0)
      return err(a, -r,
                 "tenant %s moved to %s, but some listeners could not follow "
                 "(see the log)",
                 t->name, m->name);
    return out(a, "ok %d", r);
  }
  if (!strcmp(cmd, "tenant-move-done") && argc == 2) {
    struct nk_tenant *t = nk_tenant_find(argv[1]);
    if (!t) return err(a, ENOENT, "unknown tenant '%s'", argv[1]);
    nk_tenant_move_done(t);
    return out(a, "ok");
  }
  if (!strcmp(cmd, "tenant-add") && (argc == 6 || argc == 8)) {
    /* [slots ring]: the tenant's own region layout (a VM tenant's), else the engine's. */
    unsigned long slots = argc == 8 ? strtoul(argv[6], NULL, 10) : 0;
    unsigned long ring = argc == 8 ? strtoul(argv[7], NULL, 10) : 0;
    if (slots > NK_MAX_SLOTS || ring > (1ul << 30))
      return err(a, EINVAL, "tenant-add: region of %lu slots of %lu bytes", slots, ring);
    struct nk_tenant *t;
    int r = nk_tenant_add(argv[1], argv[2], argv[3], argv[4], argv[5], (uint32_t)slots,
                          (uint32_t)ring, &t);
    if (r == -ENOENT) return err(a, ENOENT, "unknown nsm '%s'", argv[3]);
    if (r < 0) return err(a, -r, "cannot add tenant %s: %s", argv[1], strerror(-r));
    return out(a, "ok %u", t->id);
  }
  if (!strcmp(cmd, "tenant-del") && argc == 2) {
    struct nk_tenant *t = nk_tenant_find(argv[1]);
    if (!t) return err(a, ENOENT, "unknown tenant '%s'", argv[1]);
    nk_control_forget_tenant(t);
    nk_tenant_del(t);
    return out(a, "ok");
  }
  if (!strcmp(cmd, "state-version") && argc == 1) return out(a, "ok %s", nk_state_version());
  if (!strcmp(cmd, "handover") && argc == 1) {
    /* A live upgrade: everything to the daemon for the next engine, then this one ends at
     * once, leaving every descriptor as it is (no close, no reset: they are the next one's). */
    int r = nk_keep_handover();
    if (r < 0) return err(a, -r, "cannot hand over: no keep channel");
    out(a, "ok %d", r);
    admin_flush_now(a);
    _exit(0);
  }
  if (!strcmp(cmd, "serve") && argc == 1) {
    nk_control_serve();
    return out(a, "ok");
  }
  if (!strcmp(cmd, "dns-upstream") && argc == 3) {
    struct nk_addr u;
    if (nk_addr_parse(argv[1], &u) < 0) return err(a, EINVAL, "bad address '%s'", argv[1]);
    u.port = htons((uint16_t)atoi(argv[2]));
    engine.dns_upstream = u;
    return out(a, "ok");
  }
  if (!strcmp(cmd, "stats") && argc == 1) {
    for (struct nk_tenant *t = engine.tenants; t; t = t->next)
      out(a,
          "tenant %s id=%u nsm=%s sockets=%u tx_bytes=%llu rx_bytes=%llu memory=%llu"
          " rate_tx=%llu rate_rx=%llu weight=%u max_sockets=%u max_memory=%llu"
          " refused_sockets=%llu refused_memory=%llu slots=%u engine_ns=%llu engine_skips=%llu shm=%d"
          " fds=%u fd_limit=%llu ctls=%u dns_relayed=%llu dns_dropped=%llu region_bytes=%llu"
          " region_trimmed=%llu rings_shrunk=%llu throttle_wakes=%llu throttle_late_ns=%llu"
          " rate_late_credit=%llu tenant_cc=%d cc_rate=%llu cc_sent=%llu cc_qdelay_us=%u"
          " cc_flows=%u cc_retrans=%llu cc_cuts=%llu",
          t->name, t->id, t->nsm->name, t->nsocks, (unsigned long long)t->tx_bytes,
          (unsigned long long)t->rx_bytes, (unsigned long long)nk_tenant_memory(t),
          (unsigned long long)t->rate[NK_TX] * 8, (unsigned long long)t->rate[NK_RX] * 8, t->weight,
          t->max_sockets, (unsigned long long)t->max_memory, (unsigned long long)t->refused_sockets,
          (unsigned long long)t->refused_memory, t->nslots, (unsigned long long)t->cpu_total_ns,
          (unsigned long long)t->cpu_skips, t->shm, t->fds,
          (unsigned long long)nk_tenant_fd_limit(t), t->ctls, (unsigned long long)t->dns_relayed,
          (unsigned long long)t->dns_dropped, (unsigned long long)nk_tenant_region_bytes(t),
          (unsigned long long)t->region_trimmed, (unsigned long long)t->rings_shrunk,
          (unsigned long long)(t->throttle_wakes[NK_TX] + t->throttle_wakes[NK_RX]),
          (unsigned long long)(t->throttle_late_ns[NK_TX] + t->throttle_late_ns[NK_RX]),
          (unsigned long long)(t->rate_late_credit[NK_TX] + t->rate_late_credit[NK_RX]), t->cc.on,
          (unsigned long long)t->cc.rate * 8, (unsigned long long)(t->cc.sent_bps * 8),
          t->cc.qdelay_us, t->cc.flows, (unsigned long long)t->cc.retrans,
          (unsigned long long)t->cc.cuts);
    for (struct nk_nsm *m = engine.nsms; m; m = m->next) {
      uint32_t tenants = 0, socks = 0;
      for (struct nk_tenant *t = engine.tenants; t; t = t->next) {
        tenants += t->nsm == m;
        for (uint32_t i = 0; i < t->hwm; i++)
          if (t->socks[i] && nk_sock_nsm(t->socks[i]) == m) socks++;
      }
      out(a,
          "nsm %s type=%s tenants=%u sockets=%u tx_bytes=%llu rx_bytes=%llu bandwidth=%llu "
          "up=%d connects=%u",
          m->name, m->type->type, tenants, socks, (unsigned long long)m->bytes[NK_TX],
          (unsigned long long)m->bytes[NK_RX], (unsigned long long)m->bandwidth_bps,
          m->type->is_up ? m->type->is_up(m) : 1, m->type->connects ? m->type->connects(m) : 0);
    }
    return out(a, "ok");
  }
  if (!strcmp(cmd, "conns") && argc <= 2) {
    for (struct nk_tenant *t = engine.tenants; t; t = t->next) {
      if (argc == 2 && strcmp(argv[1], t->name)) continue;
      for (uint32_t i = 0; i < t->hwm; i++)
        if (t->socks[i]) conn_line(a, t, i, t->socks[i]);
    }
    return out(a, "ok");
  }
  if (!strcmp(cmd, "ping")) return out(a, "ok");
  err(a, EINVAL, "unknown request '%s' (or wrong number of arguments)", cmd);
}

static void admin_close(struct nk_admin *a) {
  nk_epoll_del(a->fd);
  close(a->fd);
  for (struct nk_admin **p = &admins; *p; p = &(*p)->next)
    if (*p == a) {
      *p = a->next;
      break;
    }
  free(a->out);
  free(a);
}

static void flush_out(struct nk_admin *a) {
  size_t off = 0;
  while (off < a->outlen) {
    ssize_t n = send(a->fd, a->out + off, a->outlen - off, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n <= 0) break;
    off += (size_t)n;
  }
  memmove(a->out, a->out + off, a->outlen - off);
  a->outlen -= off;
  nk_epoll_mod(a->fd, EPOLLIN | (a->outlen ? EPOLLOUT : 0), &a->h);
}

void nk_admin_event(struct nk_handle *h, uint32_t ev) {
  if (h->type == NK_H_ADMIN_LISTEN) {
    for (;;) {
      int fd = accept4(admin_listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) return;
      struct ucred cr = {0};
      uint64_t ns = nk_peer_netns(fd, &cr);
      bool ok = cr.uid == 0 && ns == engine.self_netns_ino;
      if (!ok) {
        close(fd);
        continue;
      }
      struct nk_admin *a = calloc(1, sizeof(*a));
      if (!a) {
        close(fd);
        continue;
      }
      a->fd = fd;
      a->h = (struct nk_handle){NK_H_ADMIN, 0, a};
      a->next = admins;
      admins = a;
      nk_epoll_add(fd, EPOLLIN, &a->h);
    }
  }
  struct nk_admin *a = h->obj;
  if (ev & EPOLLIN) {
    ssize_t n = recv(a->fd, a->in + a->inlen, sizeof(a->in) - 1 - a->inlen, MSG_DONTWAIT);
    if (n <= 0) {
      if (n == 0 || errno != EAGAIN) admin_close(a);
      return;
    }
    a->inlen += (size_t)n;
    char *nl;
    while ((nl = memchr(a->in, '\n', a->inlen))) {
      *nl = 0;
      command(a, a->in);
      size_t used = (size_t)(nl - a->in) + 1;
      memmove(a->in, nl + 1, a->inlen - used);
      a->inlen -= used;
    }
    if (a->inlen == sizeof(a->in) - 1) {
      admin_close(a); /* a line longer than any request */
      return;
    }
  }
  if (ev & (EPOLLHUP | EPOLLERR)) {
    admin_close(a);
    return;
  }
  flush_out(a);
}
