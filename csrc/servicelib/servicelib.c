/* ServiceLib, the NSM's side (see include/netkernel/servicelib.h and docs/servicelib.md).
 *
 * Single-threaded by contract: one thread of the stack calls everything here. */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "netkernel/fdpass.h"
#include "netkernel/servicelib.h"

#define MAX_TENANTS 1024

struct nk_sl {
  int ctl, nsm_bell, engine_bell;
  struct nk_sl_shared *sh;
  uint64_t sh_size;
  bool posted;            /* events since the last flush */
  struct nk_nqe *backlog; /* events that found the queue full, oldest first */
  size_t nbacklog, cap;
  struct nk_sl_tenant *tenants[MAX_TENANTS];
};

static void close_fd(int fd) { close(fd); }

static int recv_ctl(int fd, struct nk_sl_ctl *m, int *fds, int maxfds, int *nfds) {
  union {
    char buf[CMSG_SPACE(4 * sizeof(int))];
    struct cmsghdr align;
  } cm;
  struct iovec iov = {.iov_base = m, .iov_len = sizeof(*m)};
  struct msghdr mh = {
      .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof(cm.buf)};
  ssize_t n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  *nfds = 0;
  if (n <= 0) return n == 0 ? 0 : -errno;
  int total = nk_take_fds(&mh, fds, maxfds, close_fd);
  *nfds = total < maxfds ? total : maxfds;
  return n == (ssize_t)sizeof(*m) ? 1 : -EPROTO;
}

struct nk_sl *nk_sl_connect(const char *path, char *err, size_t errlen) {
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof(sa.sun_path)) {
    snprintf(err, errlen, "socket path too long: %s", path);
    errno = ENAMETOOLONG;
    return NULL;
  }
  strcpy(sa.sun_path, path);
  int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
    int e = errno;
    snprintf(err, errlen, "cannot connect to the engine at %s: %s", path, strerror(e));
    if (fd >= 0) close(fd);
    errno = e;
    return NULL;
  }
  struct pollfd p = {.fd = fd, .events = POLLIN};
  struct nk_sl_ctl m;
  int fds[3], nfds = 0, r = -ETIMEDOUT;
  if (poll(&p, 1, 5000) == 1) r = recv_ctl(fd, &m, fds, 3, &nfds);
  const char *why = NULL;
  if (r <= 0) why = r == 0 ? "the engine closed the connection" : strerror(-r);
  else if (m.op != NK_SLC_HELLO || nfds != 3) why = "no HELLO from the engine";
  else if (m.version != NK_SL_VERSION) why = "the engine speaks another ServiceLib version";
  struct nk_sl *sl = NULL;
  if (!why) {
    sl = calloc(1, sizeof(*sl));
    void *sh = sl ? mmap(NULL, m.size, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0) : MAP_FAILED;
    if (sh == MAP_FAILED || m.size < sizeof(struct nk_sl_shared)) {
      why = "cannot map the queues";
      if (sh != MAP_FAILED) munmap(sh, m.size);
    } else {
      sl->sh = sh;
      sl->sh_size = m.size;
      if (sl->sh->magic != NK_SL_MAGIC || sl->sh->queue_len != NK_SL_QUEUE_LEN ||
          sl->sh->area_size != NK_SL_AREA_SIZE)
        why = "the queues have an unknown layout";
    }
  }
  if (nfds > 0) close(fds[0]); /* the mapping stays */
  if (why) {
    snprintf(err, errlen, "%s", why);
    for (int i = 1; i < nfds; i++) close(fds[i]);
    if (sl && sl->sh) munmap(sl->sh, sl->sh_size);
    free(sl);
    close(fd);
    errno = EPROTO;
    return NULL;
  }
  sl->ctl = fd;
  sl->nsm_bell = fds[1];
  sl->engine_bell = fds[2];
  return sl;
}

void nk_sl_close(struct nk_sl *sl) {
  for (int i = 0; i < MAX_TENANTS; i++)
    if (sl->tenants[i]) {
      munmap(sl->tenants[i]->base, sl->tenants[i]->size);
      free(sl->tenants[i]);
    }
  munmap(sl->sh, sl->sh_size);
  close(sl->ctl);
  close(sl->nsm_bell);
  close(sl->engine_bell);
  free(sl->backlog);
  free(sl);
}

void nk_sl_fds(const struct nk_sl *sl, int *ctl, int *bell) {
  *ctl = sl->ctl;
  *bell = sl->nsm_bell;
}

struct nk_sl_tenant *nk_sl_tenant(struct nk_sl *sl, uint32_t id) {
  for (int i = 0; i < MAX_TENANTS; i++)
    if (sl->tenants[i] && sl->tenants[i]->id == id) return sl->tenants[i];
  return NULL;
}

/* -1: the engine is gone. */
static int control(struct nk_sl *sl, const struct nk_sl_handlers *h, void *ctx) {
  for (;;) {
    struct nk_sl_ctl m;
    int fds[1], nfds;
    int r = recv_ctl(sl->ctl, &m, fds, 1, &nfds);
    if (r == -EAGAIN || r == -EINTR) return 0;
    if (r <= 0) return -1;
    if (m.op == NK_SLC_TENANT_ADD && nfds == 1 && !nk_sl_tenant(sl, m.tenant)) {
      void *base = mmap(NULL, m.size, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
      close(fds[0]);
      nfds = 0;
      int slot = -1;
      for (int i = 0; i < MAX_TENANTS && slot < 0; i++)
        if (!sl->tenants[i]) slot = i;
      struct nk_sl_tenant *t = slot >= 0 && base != MAP_FAILED ? calloc(1, sizeof(*t)) : NULL;
      if (!t) {
        if (base != MAP_FAILED) munmap(base, m.size);
        fprintf(stderr, "servicelib: cannot take tenant %u\n", m.tenant);
        continue;
      }
      t->id = m.tenant;
      memcpy(t->name, m.name, sizeof(t->name));
      t->name[sizeof(t->name) - 1] = 0;
      t->base = base;
      t->size = m.size;
      t->ipv4 = m.ipv4;
      t->ipv6 = m.ipv6;
      sl->tenants[slot] = t;
      if (h->tenant_add) h->tenant_add(ctx, t);
    } else if (m.op == NK_SLC_TENANT_DEL) {
      for (int i = 0; i < MAX_TENANTS; i++) {
        struct nk_sl_tenant *t = sl->tenants[i];
        if (!t || t->id != m.tenant) continue;
        if (h->tenant_del) h->tenant_del(ctx, t);
        munmap(t->base, t->size);
        free(t);
        sl->tenants[i] = NULL;
      }
    }
    for (int i = 0; i < nfds; i++) close(fds[i]);
  }
}

int nk_sl_dispatch(struct nk_sl *sl, const struct nk_sl_handlers *h, void *ctx, int max) {
  uint64_t v;
  while (read(sl->nsm_bell, &v, sizeof(v)) > 0) {}
  if (control(sl, h, ctx) < 0) return -1;
  int n = 0;
  struct nk_nqe e;
  while (n < max && nk_sl_pop(&sl->sh->req, &e)) {
    /* The engine sends a tenant's region before the first request that names it, but on
     * another channel: a request may overtake it. Read the control connection first then. */
    if ((e.op == NK_SLQ_SOCKET || e.op == NK_SLQ_ATTACH) && !nk_sl_tenant(sl, e.tenant) &&
        control(sl, h, ctx) < 0)
      return -1;
    h->request(ctx, &e);
    n++;
  }
  return n;
}

bool nk_sl_may_sleep(struct nk_sl *sl) {
  nk_sl_flush(sl);
  if (sl->nbacklog) return false; /* keep trying to hand them over */
  /* W2: the flag is stored, fenced, then the queue looked at; pairs with W1 in the engine's
   * post() (csrc/nsm/external.c): either we see its request or it sees us asleep and rings. */
  atomic_store(&sl->sh->req.sleeping.v, 1);
  atomic_thread_fence(memory_order_seq_cst);
  if (!nk_sl_empty(&sl->sh->req)) {
    atomic_store(&sl->sh->req.sleeping.v, 0);
    return false;
  }
  return true;
}

void nk_sl_awake(struct nk_sl *sl) { atomic_store(&sl->sh->req.sleeping.v, 0); }

static void ring(int fd) {
  uint64_t one = 1;
  if (write(fd, &one, sizeof(one)) < 0) {
    /* EAGAIN: the counter is saturated, so the engine will look anyway. */
  }
}

void nk_sl_event(struct nk_sl *sl, const struct nk_nqe *e) {
  if (!sl->nbacklog && nk_sl_push(&sl->sh->evt, e)) {
    sl->posted = true;
    return;
  }
  if (sl->nbacklog == sl->cap) {
    size_t cap = sl->cap ? 2 * sl->cap : 256;
    struct nk_nqe *b = realloc(sl->backlog, cap * sizeof(*b));
    if (!b) {
      fprintf(stderr, "servicelib: out of memory for events: exiting\n");
      exit(71);
    }
    sl->backlog = b;
    sl->cap = cap;
  }
  sl->backlog[sl->nbacklog++] = *e;
}

void nk_sl_reply(struct nk_sl *sl, const struct nk_nqe *req, uint32_t sock, int32_t arg,
                 const struct nk_addr *addr) {
  struct nk_nqe r = {.op = NK_SLR_DONE, .tag = req->tag, .sock = sock, .arg = arg};
  if (addr) r.addr = *addr;
  /* The engine waits for this one and consumes replies as they come: room is there unless
   * the engine is broken, in which case the reply is dropped and its wait times out. */
  if (nk_sl_push(&sl->sh->rep, &r)) ring(sl->engine_bell);
}

void nk_sl_flush(struct nk_sl *sl) {
  size_t i = 0;
  while (i < sl->nbacklog && nk_sl_push(&sl->sh->evt, &sl->backlog[i])) i++;
  if (i) {
    memmove(sl->backlog, sl->backlog + i, (sl->nbacklog - i) * sizeof(*sl->backlog));
    sl->nbacklog -= i;
    sl->posted = true;
  }
  if (!sl->posted) return;
  sl->posted = false;
  /* W3: events published (K1) before the load of the engine's flag; pairs with W4 in the
   * engine's main() (ext_set_sleeping(), fence, ext_poll()): either it sees our events or we
   * see it asleep and ring. */
  atomic_thread_fence(memory_order_seq_cst);
  if (atomic_load(&sl->sh->evt.sleeping.v)) ring(sl->engine_bell);
}

/* ---- datagrams ---- */

bool nk_sl_dgram_take(struct nk_sl *sl, const struct nk_nqe *e, void *dst) {
  struct nk_sl_area *a = &sl->sh->dg_out;
  if (!nk_sl_area_valid(a, e->off, e->len)) return false;
  nk_sl_area_copy_out(a, (uint32_t)e->off, dst, e->len);
  /* A3: the copy before the space is freed; pairs with A4 in the engine's nk_sl_area_room(). */
  atomic_store_explicit(&a->tail.v, (uint32_t)e->off + e->len, memory_order_release);
  return true;
}

bool nk_sl_dgram_post(struct nk_sl *sl, uint32_t sock, const struct nk_addr *src, const void *data,
                      uint32_t len) {
  struct nk_sl_area *a = &sl->sh->dg_in;
  if (len > NK_DGRAM_MAX || nk_sl_area_room(a) < len) return false; /* dropped, as UDP may */
  uint32_t head = atomic_load_explicit(&a->head.v, memory_order_relaxed);
  nk_sl_area_copy_in(a, head, data, len);
  /* A1: the bytes before the head; pairs with A2 in the engine's nk_sl_area_valid(). */
  atomic_store_explicit(&a->head.v, head + len, memory_order_release);
  struct nk_nqe e = {.op = NK_SLE_DGRAM, .sock = sock, .off = head, .len = len, .addr = *src};
  nk_sl_event(sl, &e);
  return true;
}

/* ---- rings ---- */

bool nk_sl_stream_attach(struct nk_sl *sl, struct nk_sl_stream *s, const struct nk_nqe *e) {
  struct nk_sl_tenant *t = nk_sl_tenant(sl, e->tenant);
  uint64_t size = e->arg2;
  if (!t || size == 0 || (size & (size - 1)) || e->off > t->size || 2 * size > t->size - e->off)
    return false;
  memset(s, 0, sizeof(*s));
  s->tx = t->base + e->off;
  s->rx = s->tx + size;
  s->size = (uint32_t)size;
  /* Positions are the engine's ring positions (the nqe's len carries the transmit ring's
   * tail and arg the receive ring's head): the bytes land where the tenant looks. */
  s->tx_pos = e->len;
  s->rx_pos = (uint32_t)e->arg;
  return true;
}

uint32_t nk_sl_tx_peek(const struct nk_sl_stream *s, const uint8_t **p, uint32_t max) {
  uint32_t off = s->tx_pos & (s->size - 1);
  uint32_t n = s->size - off;
  if (n > s->tx_avail) n = s->tx_avail;
  if (n > max) n = max;
  *p = s->tx + off;
  return n;
}

void nk_sl_tx_took(struct nk_sl_stream *s, uint32_t n) {
  s->tx_pos += n;
  s->tx_avail -= n;
}

uint32_t nk_sl_rx_room(const struct nk_sl_stream *s, uint8_t **p, uint32_t max) {
  uint32_t off = s->rx_pos & (s->size - 1);
  uint32_t n = s->size - off;
  if (n > s->rx_credit) n = s->rx_credit;
  if (n > max) n = max;
  *p = s->rx + off;
  return n;
}

void nk_sl_rx_wrote(struct nk_sl_stream *s, uint32_t n) {
  s->rx_pos += n;
  s->rx_credit -= n;
}
