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
 * The channel is a SOCK_SEQPACKET pair the daemon made (--keep FD). Each message is a text
 * line, then for a listener its record (struct nk_kept_listener, versioned), with descriptors:
 *   engine -> daemon:  region NAME (memfd, doorbell) | listener NAME SLOT GEN (proxy end)
 *                      | drop NAME SLOT GEN | forget NAME
 *   daemon -> engine, once at start-up: the regions and listeners it kept, then "end".
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
struct stash {
  char tenant[64];
  bool listener;
  int fds[2];
  struct nk_kept_listener rec;
  struct stash *next;
};
static struct stash *stash;

static void keep_send(const char *line, const void *rec, size_t reclen, const int *fds, int nfds) {
  if (keep_fd < 0) return;
  char buf[sizeof(struct nk_kept_listener) + 160];
  size_t n = strlen(line);
  if (n + reclen > sizeof(buf)) return;
  memcpy(buf, line, n);
  if (rec) memcpy(buf + n, rec, reclen);
  if (nk_send_with_fds(sendmsg, keep_fd, buf, n + reclen, fds, nfds, MSG_DONTWAIT | MSG_NOSIGNAL) <
      0) {
    NK_INFO("keep channel: '%.*s' not kept (%s): it will not outlive this engine", (int)(n - 1),
            line, strerror(errno));
    if (errno == EPIPE || errno == ECONNRESET) keep_fd = -1;
  }
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
  keep_send(line, &k, sizeof(k), &es->proxy, 1);
  es->kept = true;
}

void nk_keep_drop(struct nk_esock *es) {
  if (!es->kept) return;
  es->kept = false;
  char line[128];
  snprintf(line, sizeof(line), "drop %s %u %u\n", es->t->name, es->slot, es->gen);
  keep_send(line, NULL, 0, NULL, 0);
}

/* ---- start-up: what the last engine left ---- */

static int read_stash(void) {
  for (;;) {
    struct pollfd p = {.fd = keep_fd, .events = POLLIN};
    if (poll(&p, 1, 10000) != 1) return -ETIMEDOUT;
    char buf[sizeof(struct nk_kept_listener) + 160];
    union {
      char b[CMSG_SPACE(sizeof(int) * 2)];
      struct cmsghdr align;
    } cm;
    struct iovec iov = {.iov_base = buf, .iov_len = sizeof(buf) - 1};
    struct msghdr mh = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.b, .msg_controllen = sizeof(cm.b)};
    ssize_t n = recvmsg(keep_fd, &mh, MSG_CMSG_CLOEXEC);
    if (n <= 0) return n == 0 ? -EPIPE : -errno;
    int fds[2] = {-1, -1};
    int nfds = nk_fds_from_cmsg(&mh, fds, 2);
    buf[n] = 0;
    char *nl = memchr(buf, '\n', (size_t)n);
    size_t head = nl ? (size_t)(nl - buf) + 1 : (size_t)n;
    char name[64];
    struct stash *s = calloc(1, sizeof(*s));
    if (!s) return -ENOMEM;
    s->fds[0] = fds[0];
    s->fds[1] = fds[1];
    unsigned slot, gen;
    if (!strncmp(buf, "end\n", 4)) {
      free(s);
      return 0;
    } else if (sscanf(buf, "region %63s", name) == 1 && nfds == 2) {
      strcpy(s->tenant, name);
    } else if (sscanf(buf, "listener %63s %u %u", name, &slot, &gen) == 3 && nfds == 1 &&
               (size_t)n - head == sizeof(struct nk_kept_listener)) {
      strcpy(s->tenant, name);
      s->listener = true;
      memcpy(&s->rec, buf + head, sizeof(s->rec));
    } else {
      NK_INFO("keep channel: a record the engine cannot read (%zd bytes, %d fds): skipped", n,
              nfds);
      for (int i = 0; i < 2; i++)
        if (fds[i] >= 0) close(fds[i]);
      free(s);
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

/* The region and doorbell the daemon kept for tenant name (ownership passes), or false. */
bool nk_keep_take_region(const char *name, int *memfd, int *doorbell) {
  for (struct stash **p = &stash; *p; p = &(*p)->next) {
    struct stash *s = *p;
    if (s->listener || strcmp(s->tenant, name)) continue;
    *memfd = s->fds[0];
    *doorbell = s->fds[1];
    *p = s->next;
    free(s);
    return true;
  }
  return false;
}

static int check_record(const struct nk_tenant *t, const struct nk_kept_listener *k) {
  if (k->version != NK_KEPT_VERSION || k->size != sizeof(*k)) return -EPROTO;
  if (k->slot >= t->nslots || (k->slot < t->hwm && t->socks[k->slot])) return -EINVAL;
  if ((k->family != AF_INET && k->family != AF_INET6) || k->nopts < 0 || k->nopts > NK_MAX_OPTS)
    return -EINVAL;
  for (int i = 0; i < k->nopts; i++)
    if (k->opts[i].len > sizeof(k->opts[i].val)) return -EINVAL;
  return 0;
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
  if (k->nopts) {
    es->opts = malloc(sizeof(*es->opts));
    if (es->opts) {
      es->opts->refs = 1;
      es->opts->n = k->nopts;
      memcpy(es->opts->o, k->opts, sizeof(k->opts[0]) * (size_t)k->nopts);
    }
  }
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

void nk_keep_restore(struct nk_tenant *t) {
  for (struct stash **p = &stash; *p;) {
    struct stash *s = *p;
    if (!s->listener || strcmp(s->tenant, t->name)) {
      p = &s->next;
      continue;
    }
    *p = s->next;
    int r = restore_listener(t, &s->rec, s->fds[0]);
    if (r < 0) {
      NK_INFO("tenant %s: listener at slot %u (port %u) not restored: %s", t->name, s->rec.slot,
              ntohs(s->rec.bind_addr.port), strerror(-r));
    } else {
      NK_EVENT("listener_restored", "tenant=%s slot=%u port=%u", t->name, s->rec.slot,
               ntohs(s->rec.bind_addr.port));
    }
    free(s);
  }
}
