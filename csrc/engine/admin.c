/* The admin socket: a line protocol for the daemon (Python). One request line, then zero or
 * more data lines and a final "ok [value]" or "err ERRNO_NAME message" line.
 * Only root in the engine's own network namespace may connect: tenant processes run as root
 * too, but never in this namespace. */
#include <arpa/inet.h>
#include <errno.h>
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
  nk_ep_add(fd, EPOLLIN, &h_admin_listen);
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

static void command(struct nk_admin *a, char *line) {
  char *argv[8];
  int argc = 0;
  for (char *tok = strtok(line, " \t\r"); tok && argc < 8; tok = strtok(NULL, " \t\r"))
    argv[argc++] = tok;
  if (argc == 0) return err(a, EINVAL, "empty request");
  const char *cmd = argv[0];
  if (!strcmp(cmd, "nsm-add") && argc == 3) {
    int r = nk_nsm_add(argv[1], argv[2]);
    if (r < 0) return err(a, -r, "cannot add nsm %s: %s", argv[1], strerror(-r));
    return out(a, "ok");
  }
  if (!strcmp(cmd, "tenant-add") && argc == 6) {
    struct nk_tenant *t;
    int r = nk_tenant_add(argv[1], argv[2], argv[3], argv[4], argv[5], &t);
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
  if (!strcmp(cmd, "dns-upstream") && argc == 3) {
    struct nk_addr u;
    if (nk_addr_parse(argv[1], &u) < 0) return err(a, EINVAL, "bad address '%s'", argv[1]);
    u.port = htons((uint16_t)atoi(argv[2]));
    E.dns_upstream = u;
    return out(a, "ok");
  }
  if (!strcmp(cmd, "stats") && argc == 1) {
    for (struct nk_tenant *t = E.tenants; t; t = t->next)
      out(a, "tenant %s id=%u nsm=%s sockets=%u tx_bytes=%llu rx_bytes=%llu", t->name, t->id,
          t->nsm->name, t->nsocks, (unsigned long long)t->tx_bytes,
          (unsigned long long)t->rx_bytes);
    return out(a, "ok");
  }
  if (!strcmp(cmd, "conns") && argc <= 2) {
    for (struct nk_tenant *t = E.tenants; t; t = t->next) {
      if (argc == 2 && strcmp(argv[1], t->name)) continue;
      for (uint32_t i = 0; i < t->nslots; i++) {
        struct nk_esock *es = t->socks[i];
        if (!es) continue;
        char l[64], p[64];
        nk_addr_fmt(&t->slots[i].local, l, sizeof(l));
        nk_addr_fmt(&t->slots[i].peer, p, sizeof(p));
        struct nk_slot *sl = &t->slots[i];
        out(a, "conn tenant=%s slot=%u kind=%s state=%s local=%s peer=%s tx_bytes=%llu rx_bytes=%llu"
            " tx_queued=%lld rx_queued=%lld ready_sent=%u rx_ack=%u blocker=%d stalled=%u",
            t->name, i, kind_name(es->kind), es->closing ? "closing" : state_name(es->state), l, p,
            (unsigned long long)es->tx_bytes, (unsigned long long)es->rx_bytes,
            (long long)nk_ring_fill_checked(&es->tx), (long long)nk_ring_fill_checked(&es->rx),
            es->ready_sent, atomic_load(&sl->rx_ack), es->blocker_held,
            atomic_load(&sl->rx_stalled));
      }
    }
    return out(a, "ok");
  }
  if (!strcmp(cmd, "ping")) return out(a, "ok");
  err(a, EINVAL, "unknown request '%s' (or wrong number of arguments)", cmd);
}

static void admin_close(struct nk_admin *a) {
  nk_ep_del(a->fd);
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
  nk_ep_mod(a->fd, EPOLLIN | (a->outlen ? EPOLLOUT : 0), &a->h);
}

void nk_admin_event(struct nk_handle *h, uint32_t ev) {
  if (h->type == NK_H_ADMIN_LISTEN) {
    for (;;) {
      int fd = accept4(admin_listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) return;
      struct ucred cr = {0};
      uint64_t ns = nk_peer_netns(fd, &cr);
      bool ok = cr.uid == 0 && ns == E.self_netns_ino;
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
      nk_ep_add(fd, EPOLLIN, &a->h);
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
