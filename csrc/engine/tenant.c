/* NSMs, tenants, their shared regions and the slot table.
 *
 * A tenant's region is a memfd created here and handed only to processes whose network
 * namespace is the tenant's (checked in control.c). Rings are allocated with the slot and
 * their pages are given back to the kernel when the slot is freed, so idle sockets do not pin
 * memory.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "engine.h"

/* Free slots kept with their pages, for the next sockets to reuse warm; the rest are given
 * back to the kernel by the next trim pass (within a second), at most NK_COOL_BATCH at once. */
#define NK_WARM_SLOTS 256u
#define NK_COOL_BATCH 1024u

struct nk_nsm *nk_nsm_find(const char *name) {
  for (struct nk_nsm *n = engine.nsms; n; n = n->next)
    if (strcmp(n->name, name) == 0) return n;
  return NULL;
}

static struct nk_nsm_type *types; /* registered by each csrc/nsm/ file at start */

void nk_nsm_register(struct nk_nsm_type *type) {
  type->next = types;
  types = type;
}

/* type: "TYPE" or "TYPE:ARG", a registered kind: "kernel", "external:PATH" (a stack in another
 * process that connects to the engine at PATH), ... */
int nk_nsm_add(const char *name, const char *netns_path, const char *type) {
  if (strlen(name) >= sizeof(((struct nk_nsm *)0)->name)) return -ENAMETOOLONG;
  if (nk_nsm_find(name)) return -EEXIST;
  const char *colon = strchr(type, ':');
  size_t len = colon ? (size_t)(colon - type) : strlen(type);
  const struct nk_nsm_type *kind = types;
  while (kind && (strlen(kind->type) != len || strncmp(kind->type, type, len) != 0))
    kind = kind->next;
  if (!kind) return -EINVAL;
  int fd = open(netns_path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -errno;
  struct nk_nsm *n = calloc(1, sizeof(*n));
  if (!n) {
    close(fd);
    return -ENOMEM;
  }
  strcpy(n->name, name);
  n->netns_fd = fd;
  n->type = kind;
  int r = kind->init ? kind->init(n, colon ? colon + 1 : NULL) : colon ? -EINVAL : 0;
  if (r < 0) {
    close(fd);
    free(n);
    return r;
  }
  n->next = engine.nsms;
  engine.nsms = n;
  nk_fds_recount();
  NK_INFO("nsm %s (%s) added: %s", name, kind->type, netns_path);
  return 0;
}

/* An NSM can go only when nothing uses it: no tenant assigned, no socket left on it. */
int nk_nsm_del(struct nk_nsm *m) {
  for (struct nk_tenant *t = engine.tenants; t; t = t->next) {
    if (t->nsm == m) return -EBUSY;
    for (uint32_t i = 0; i < t->hwm; i++) {
      struct nk_esock *es = t->socks[i];
      if (!es) continue;
      for (int k = 0; k < es->ep_count; k++)
        if (es->ep[k].nsm == m) return -EBUSY;
    }
  }
  for (struct nk_nsm **p = &engine.nsms; *p; p = &(*p)->next)
    if (*p == m) {
      *p = m->next;
      break;
    }
  nk_fds_recount();
  if (m->type->fini) m->type->fini(m);
  close(m->netns_fd);
  NK_INFO("nsm %s removed", m->name);
  free(m);
  return 0;
}

/* New sockets of t open on to; its listeners listen on both NSMs until move_done. Existing
 * connections stay where they are (the daemon steers their packets there). */
int nk_tenant_move(struct nk_tenant *t, struct nk_nsm *to) {
  struct nk_nsm *from = t->nsm;
  t->nsm = to;
  if (to->type->tenant_on) to->type->tenant_on(to, t);
  t->active_until[NK_TX] = t->active_until[NK_RX] = 0; /* a newcomer on to's link */
  int r = nk_dns_reopen_upstream(t);
  if (r < 0) NK_INFO("tenant %s: DNS relay not moved: %s", t->name, strerror(-r));
  int listeners = 0, failed = 0;
  for (uint32_t i = 0; i < t->hwm; i++) {
    struct nk_esock *es = t->socks[i];
    if (!es || es->kind != NK_KIND_LISTENER || es->dead || es->closing) continue;
    r = nk_sock_listen_on(es, to);
    if (r < 0) {
      failed++;
      NK_EVENT("listener_not_moved", "tenant=%s slot=%u port=%u error=%s", t->name, i,
               ntohs(es->bind_addr.port), strerrorname_np(-r));
    } else {
      listeners++;
    }
  }
  NK_EVENT("tenant_moved", "tenant=%s from=%s to=%s listeners=%d failed=%d", t->name, from->name,
           to->name, listeners, failed);
  return failed ? -EADDRINUSE : listeners;
}

int nk_tenant_move_done(struct nk_tenant *t) {
  for (uint32_t i = 0; i < t->hwm; i++) {
    struct nk_esock *es = t->socks[i];
    if (es && es->kind == NK_KIND_LISTENER && !es->dead) nk_sock_drop_listeners_off(es, t->nsm);
  }
  return 0;
}

struct nk_tenant *nk_tenant_find(const char *name) {
  for (struct nk_tenant *t = engine.tenants; t; t = t->next)
    if (strcmp(t->name, name) == 0) return t;
  return NULL;
}

struct nk_tenant *nk_tenant_by_ino(uint64_t ino) {
  for (struct nk_tenant *t = engine.tenants; t; t = t->next)
    if (t->netns_ino == ino) return t;
  return NULL;
}

static uint32_t env_u32(const char *name, uint32_t dflt) {
  const char *v = getenv(name);
  return v && *v ? (uint32_t)strtoul(v, NULL, 0) : dflt;
}

/* The region's file is a power of two long (the rest past `size` is never touched): a VM
 * tenant's guest maps it as an ivshmem PCI BAR, and a BAR's size is a power of two. */
static uint64_t region_file_size(uint64_t size) {
  uint64_t f = 4096;
  while (f < size) f <<= 1;
  return f;
}

/* A region the daemon kept from the last engine (keep.c): the same memfd, of the size this
 * engine would make, still sealed against resizing (else a tenant's truncate could SIGBUS us). */
static int region_adoptable(int fd, uint64_t size) {
  struct stat st;
  if (fstat(fd, &st) < 0) return -errno;
  if ((uint64_t)st.st_size != region_file_size(size)) return -EMEDIUMTYPE;
  int seals = fcntl(fd, F_GET_SEALS);
  int need = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;
  if (seals < 0 || (seals & need) != need) return -EPERM;
  return 0;
}

/* adopt: a kept region's memfd (ownership passes), or -1 for a new one. slots, ring: this
 * tenant's layout, or 0 for the engine's (a VM tenant's is small: its guest maps it whole). */
static int region_create(struct nk_tenant *t, int adopt, uint32_t slots, uint32_t ring_bytes) {
  uint32_t ring = ring_bytes ? ring_bytes : env_u32("NETKERNEL_RING_SIZE", NK_DEFAULT_RING_SIZE);
  uint32_t nslots = slots ? slots : env_u32("NETKERNEL_SLOTS", NK_DEFAULT_SLOTS);
  if (ring < 4096 || (ring & (ring - 1)) || nslots == 0 || nslots > NK_MAX_SLOTS) return -EINVAL;
  t->ring_size = ring;
  t->nslots = nslots;
  t->words = NK_DOORBELL_WORDS(nslots);
  uint64_t hdr = sizeof(struct nk_region) + t->words * sizeof(uint64_t);
  uint64_t slots_off = (hdr + 4095) & ~4095ull;
  uint64_t rings_off = (slots_off + (uint64_t)nslots * sizeof(struct nk_slot) + 4095) & ~4095ull;
  uint64_t size = rings_off + (uint64_t)nslots * 2u * ring;
  char nm[80];
  snprintf(nm, sizeof(nm), "netkernel-%s", t->name);
  /* Normal pages, not huge ones: the region is sparse and commits what sockets touch, and a
   * huge page would commit 2 MiB for the first byte of a ring. Sealed against shrinking and
   * growing before anyone else sees it: a tenant (or an external NSM) that could truncate it
   * would make the engine's next access a SIGBUS. */
  int fd = adopt;
  if (fd >= 0) {
    int r = region_adoptable(fd, size);
    if (r < 0) {
      close(fd);
      return r;
    }
  } else if ((fd = memfd_create(nm, MFD_CLOEXEC | MFD_ALLOW_SEALING)) < 0) {
    return -errno;
  } else if (ftruncate(fd, (off_t)region_file_size(size)) < 0) {
    int e = errno;
    close(fd);
    return -e;
  }
  if (adopt < 0 && fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
    int e = errno;
    close(fd);
    return -e;
  }
  void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) {
    int e = errno;
    close(fd);
    return -e;
  }
  t->memfd = fd;
  t->base = base;
  t->size = size;
  t->rg = base;
  t->rg->magic = NK_REGION_MAGIC;
  t->rg->version = NK_ABI_VERSION;
  t->rg->nslots = nslots;
  t->rg->ring_size = ring;
  t->rg->size = size;
  t->rg->slots_off = slots_off;
  t->rg->rings_off = rings_off;
  t->rg->tenant_id = t->id;
  t->slots = (struct nk_slot *)(t->base + slots_off);
  t->rings = t->base + rings_off;
  return 0;
}

static void adopt_slots(struct nk_tenant *t);

int nk_tenant_add(const char *name, const char *netns_path, const char *nsm_name, const char *v4,
                  const char *v6, uint32_t slots, uint32_t ring, struct nk_tenant **out) {
  if (strlen(name) >= sizeof(((struct nk_tenant *)0)->name)) return -ENAMETOOLONG;
  if (nk_tenant_find(name)) return -EEXIST;
  struct nk_nsm *nsm = nk_nsm_find(nsm_name);
  if (!nsm) return -ENOENT;
  struct nk_tenant *t = calloc(1, sizeof(*t));
  if (!t) return -ENOMEM;
  int r;
  strcpy(t->name, name);
  t->nsm = nsm;
  t->weight = 1;
  t->shm = true;
  t->memfd = t->doorbell_fd = t->dns_fd = t->dns_up_fd = t->netns_fd = t->diag_fd = -1;
  if ((r = nk_addr_parse(v4, &t->ipv4)) < 0 || t->ipv4.family != AF_INET) goto fail_free;
  if ((r = nk_addr_parse(v6, &t->ipv6)) < 0 || t->ipv6.family != AF_INET6) {
    r = -EINVAL;
    goto fail_free;
  }
  t->netns_fd = open(netns_path, O_RDONLY | O_CLOEXEC);
  if (t->netns_fd < 0) {
    r = -errno;
    goto fail_free;
  }
  struct stat st;
  fstat(t->netns_fd, &st);
  t->netns_ino = st.st_ino;
  if (t->netns_ino == engine.self_netns_ino || nk_tenant_by_ino(t->netns_ino)) {
    r = -EBUSY; /* a tenant must have a namespace of its own */
    goto fail_ns;
  }
  /* A live upgrade keeps a tenant's id (an external NSM names tenants by it). */
  uint32_t kept_id = nk_keep_tenant_id(name);
  for (struct nk_tenant *o = engine.tenants; o && kept_id; o = o->next)
    if (o->id == kept_id) kept_id = 0;
  t->id = kept_id ? kept_id : ++engine.next_tenant_id;
  if (t->id > engine.next_tenant_id) engine.next_tenant_id = t->id;
  int kept_memfd = -1, kept_doorbell = -1;
  bool adopt = nk_keep_take_region(name, &kept_memfd, &kept_doorbell);
  if (adopt && (r = region_create(t, kept_memfd, slots, ring)) < 0) {
    /* Made by an engine with another layout (NETKERNEL_SLOTS, NETKERNEL_RING_SIZE): a new
     * one. The tenant's running processes keep the old region and cannot use this engine;
     * the tenant stays, for processes started from now on. */
    NK_EVENT("region_not_adopted", "tenant=%s error=%s", name, strerrorname_np(-r));
    close(kept_doorbell);
    adopt = false;
  }
  if (!adopt && (r = region_create(t, -1, slots, ring)) < 0) goto fail_ns;
  t->socks = calloc(t->nslots, sizeof(*t->socks));
  t->free_stack = calloc(t->nslots, sizeof(*t->free_stack));
  if (!t->socks || !t->free_stack) {
    r = -ENOMEM;
    goto fail_socks;
  }
  t->nfree = 0; /* slots come from hwm until some are freed */
  t->doorbell_fd = adopt ? kept_doorbell : eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (t->doorbell_fd < 0) {
    r = -errno;
    goto fail_socks;
  }
  t->h_doorbell = (struct nk_handle){NK_H_DOORBELL, 0, t};
  nk_epoll_add(t->doorbell_fd, EPOLLIN, &t->h_doorbell);
  if (nk_dns_open(t) < 0) NK_INFO("tenant %s: no DNS stub (lo down?)", name);
  t->next = engine.tenants;
  engine.tenants = t;
  nk_fds_recount();
  NK_INFO("tenant %s (id %u) on nsm %s: %s %s", name, t->id, nsm->name, v4, v6);
  if (nsm->type->tenant_on) nsm->type->tenant_on(nsm, t);
  if (adopt) {
    nk_keep_restore(t); /* its listeners first, at their slots */
    adopt_slots(t);
  }
  nk_keep_region(t);
  *out = t;
  return 0;
fail_socks:
  free(t->socks);
  free(t->free_stack);
  munmap(t->base, t->size);
  close(t->memfd);
fail_ns:
  close(t->netns_fd);
fail_free:
  free(t);
  return r < 0 ? r : -EINVAL;
}

int nk_tenant_del(struct nk_tenant *t) {
  nk_keep_forget(t);
  for (uint32_t i = 0; i < t->hwm; i++)
    if (t->socks[i]) nk_esock_free(t->socks[i]);
  nk_fds_give(t, t->fds); /* its control connections are closed by the caller */
  for (struct nk_nsm *m = engine.nsms; m; m = m->next)
    if (m->type->tenant_gone) m->type->tenant_gone(m, t);
  nk_dns_close(t);
  if (t->diag_fd >= 0) close(t->diag_fd);
  nk_epoll_del(t->doorbell_fd);
  close(t->doorbell_fd);
  for (struct nk_tenant **p = &engine.active_tenants; *p; p = &(*p)->next_active)
    if (*p == t) {
      *p = t->next_active;
      break;
    }
  for (struct nk_tenant **p = &engine.tenants; *p; p = &(*p)->next)
    if (*p == t) {
      *p = t->next;
      break;
    }
  nk_fds_recount();
  /* Processes of the tenant may still map the region; the memfd lives until they unmap. */
  munmap(t->base, t->size);
  close(t->memfd);
  close(t->netns_fd);
  NK_INFO("tenant %s removed", t->name);
  /* Events for its doorbell and DNS sockets may still sit in this epoll batch. */
  t->dead = true;
  t->next = engine.dead_tenants;
  engine.dead_tenants = t;
  return 0;
}

/* The socket at slot i, of generation gen, its budget taken (nk_tenant_admit). */
static struct nk_esock *esock_init(struct nk_tenant *t, uint32_t i, uint32_t gen, int proxy,
                                   int family, int type) {
  struct nk_esock *es = calloc(1, sizeof(*es));
  if (!es) {
    nk_fds_give(t, NK_SOCK_FDS);
    errno = ENOBUFS;
    return NULL;
  }
  es->t = t;
  es->slot = i;
  es->gen = gen;
  es->family = family;
  es->type = type;
  es->kind = type == SOCK_DGRAM ? NK_KIND_DGRAM : NK_KIND_STREAM;
  es->proxy = proxy;
  es->direct = -1;
  es->pending_fd = -1;
  es->state = NK_ST_NEW;
  es->can_write = true;
  for (int k = 0; k < NK_MAX_EP; k++)
    es->ep[k] = (struct nk_endpoint){.fd = -1, .id = NK_EXT_LOST, .h = {NK_H_ENDPOINT, k, es}};
  /* Reset the shared header before the guest can see the slot. */
  struct nk_slot *s = &t->slots[i];
  memset(s, 0, sizeof(*s));
  s->gen = es->gen;
  s->kind = (uint32_t)es->kind;
  s->family = (uint32_t)family;
  uint8_t *ring = t->rings + (uint64_t)i * 2u * t->ring_size;
  nk_ring_init(&es->tx, ring, t->ring_size, &s->tx_head, &s->tx_tail);
  nk_ring_init(&es->rx, ring + t->ring_size, t->ring_size, &s->rx_head, &s->rx_tail);
  es->h_proxy = (struct nk_handle){NK_H_PROXY, 0, es};
  t->socks[i] = es;
  t->nsocks++;
  t->ring_bytes += 2ull * t->ring_size;
  return es;
}

struct nk_esock *nk_esock_alloc(struct nk_tenant *t, int proxy, int family, int type,
                                uint64_t inode) {
  int r = nk_tenant_admit(t);
  if (r < 0) {
    errno = -r;
    return NULL;
  }
  uint32_t i;
  if (t->nfree) {
    i = t->free_stack[--t->nfree];
    if (t->cold > t->nfree) t->cold = t->nfree;
  } else {
    i = t->hwm++; /* nk_tenant_admit checked there is one */
    atomic_store_explicit(&t->rg->slots_hwm, t->hwm, memory_order_release);
  }
  /* The engine's copy of the generation decides; the region's copy is informational. */
  uint32_t gen = t->slots[i].gen + 1;
  struct nk_esock *es = esock_init(t, i, gen, proxy, family, type);
  if (!es) {
    t->free_stack[t->nfree++] = i;
    return NULL;
  }
  t->slots[i].inode = inode;
  return es;
}

/* At a given slot, outside the free stack (keep.c: an adopted region's listeners, while
 * the free stack is still empty). */
struct nk_esock *nk_esock_alloc_at(struct nk_tenant *t, uint32_t i, uint32_t gen, int proxy,
                                   int family, int type) {
  if (i >= t->nslots || (i < t->hwm && t->socks[i])) {
    errno = EINVAL;
    return NULL;
  }
  int r = nk_tenant_admit(t);
  if (r < 0) {
    errno = -r;
    return NULL;
  }
  if (i >= t->hwm) {
    t->hwm = i + 1;
    atomic_store_explicit(&t->rg->slots_hwm, t->hwm, memory_order_release);
  }
  return esock_init(t, i, gen, proxy, family, type);
}

/* An adopted region's slots, after its listeners came back: every other socket that was
 * open under the last engine is reset, as Linux reports a connection whose host restarted
 * (ECONNRESET, then EOF and EPIPE; a connect under way is refused and may be tried again),
 * and its slot comes back when its guest end is gone (sock_diag, as for any reset socket).
 * What the slots say is the tenant's word and is only believed about its own sockets. */
static void adopt_slots(struct nk_tenant *t) {
  uint32_t hwm = atomic_load(&t->rg->slots_hwm);
  if (hwm > t->nslots) hwm = t->nslots;
  if (hwm > t->hwm) t->hwm = hwm;
  atomic_store(&t->rg->slots_hwm, t->hwm);
  uint32_t dead = 0;
  for (uint32_t j = t->hwm; j-- > 0;) { /* low slots end on top of the free stack */
    if (t->socks[j]) continue;
    struct nk_slot *s = &t->slots[j];
    uint64_t ino = s->inode;
    int family = s->family == AF_INET ? AF_INET : AF_INET6;
    struct nk_esock *es = NULL;
    if (ino && nk_tenant_admit(t) == 0)
      es =
          esock_init(t, j, s->gen, -1, family, s->kind == NK_KIND_DGRAM ? SOCK_DGRAM : SOCK_STREAM);
    if (!es) {
      s->inode = 0;
      s->kind = NK_KIND_FREE;
      t->free_stack[t->nfree++] = j;
      continue;
    }
    /* esock_init cleared the slot: the guest's view of the end is written again. */
    s->inode = ino;
    es->dead = true;
    if (s->kind == NK_KIND_STREAM && atomic_load(&s->state) == NK_ST_CONNECTING) {
      atomic_store(&s->so_error, ECONNREFUSED);
      atomic_store(&s->renew, 1);
      es->state = NK_ST_NEW;
    } else {
      atomic_store(&s->rx_err, ECONNRESET);
      atomic_store(&s->rx_eof, 1);
      atomic_store(&s->tx_closed, EPIPE);
      es->state = NK_ST_CLOSED;
    }
    atomic_store(&s->state, es->state);
    nk_sock_adopt_zombie(es, ino);
    dead++;
  }
  t->cold = 0;
  NK_EVENT("region_adopted", "tenant=%s slots=%u reset=%u kept=%u", t->name, t->hwm, dead,
           t->nsocks - dead);
}

/* A buffer size as Linux takes it from SO_SNDBUF / SO_RCVBUF, for a ring: the next power of
 * two, a page at least, the tenant's ring size at most; 0 (not set): the ring size. */
static uint32_t ring_for(uint32_t want, uint32_t max) {
  if (want == 0 || want >= max) return max;
  uint32_t size = 4096;
  while (size < want) size <<= 1;
  return size;
}

/* A stream socket's rings sized from the SO_SNDBUF / SO_RCVBUF its program set before the
 * connection, as Linux sizes its buffers from them (DESIGN §B): a program that asks for small
 * buffers gets the back-pressure it asked for, and the tenant's max_memory counts the smaller
 * rings. Called at connect() and accept, while no byte has moved; not on an external NSM,
 * which is told one size for both rings. The guest sees the sizes in the slot, written
 * before the state that lets bytes move (T1). A listener moves no bytes: called at listen(),
 * its rings take a page each. */
void nk_sock_size_rings(struct nk_esock *es) {
  struct nk_tenant *t = es->t;
  bool listener = es->kind == NK_KIND_LISTENER;
  if (!es->sndbuf && !es->rcvbuf && !listener) return;
  if (t->nsm && !t->nsm->type->kernel_sockets) return;
  if (nk_ring_fill_checked(&es->tx) != 0 || nk_ring_fill_checked(&es->rx) != 0) return;
  uint32_t tx = ring_for(listener ? 1 : es->sndbuf, t->ring_size);
  uint32_t rx = ring_for(listener ? 1 : es->rcvbuf, t->ring_size);
  struct nk_slot *s = &t->slots[es->slot];
  uint8_t *ring = t->rings + (uint64_t)es->slot * 2u * t->ring_size;
  t->ring_bytes -= (uint64_t)es->tx.size + es->rx.size;
  nk_ring_init(&es->tx, ring, tx, &s->tx_head, &s->tx_tail);
  nk_ring_init(&es->rx, ring + t->ring_size, rx, &s->rx_head, &s->rx_tail);
  t->ring_bytes += (uint64_t)tx + rx;
  s->tx_size = tx == t->ring_size ? 0 : tx;
  s->rx_size = rx == t->ring_size ? 0 : rx;
  /* What a warm slot's last socket left past the new ends is no ring's now: given back, or
   * it would count against max_memory's trim (tenant.c trim()) for as long as this socket. */
  off_t at = (off_t)(ring - t->base);
  if (tx < t->ring_size)
    fallocate(t->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, at + tx, t->ring_size - tx);
  if (rx < t->ring_size)
    fallocate(t->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, at + t->ring_size + rx,
              t->ring_size - rx);
}

void nk_tenant_bulk_add(struct nk_esock *es) {
  struct nk_tenant *t = es->t;
  es->on_bulk = true;
  es->bytes_at_check = es->tx_bytes + es->rx_bytes;
  es->next_bulk = t->bulk;
  if (t->bulk) t->bulk->prev_bulk = &es->next_bulk;
  es->prev_bulk = &t->bulk;
  t->bulk = es;
}

static void bulk_del(struct nk_esock *es) {
  if (!es->on_bulk) return;
  *es->prev_bulk = es->next_bulk;
  if (es->next_bulk) es->next_bulk->prev_bulk = es->prev_bulk;
  es->on_bulk = false;
}

struct nk_esock *nk_esock_get(struct nk_tenant *t, uint32_t slot, uint32_t gen) {
  if (slot >= t->nslots) return NULL;
  struct nk_esock *es = t->socks[slot];
  if (!es || es->gen != gen) return NULL;
  return es;
}

void nk_esock_free(struct nk_esock *es) {
  struct nk_tenant *t = es->t;
  nk_shm_listener_del(es);
  if (es->accept_refused) nk_sock_accept_forget(es);
  nk_ep_close_all(es, true); /* freed while connected (tenant deleted): the peer is reset */
  if (es->ep_held) /* the stacks still holding closed endpoints must not name it any more */
    for (struct nk_nsm *m = engine.nsms; m; m = m->next)
      if (m->type->forget) m->type->forget(m, es);
  nk_sock_unzombie(es);
  bulk_del(es);
  if (es->pending_fd >= 0) close(es->pending_fd);
  nk_opts_drop(es);
  nk_sock_close_proxy(es);
  nk_direct_close(es); /* in the proxy's place in the budget */
  nk_fds_give(t, NK_SOCK_FDS + es->ep_fds);
  /* Unlink from the active and throttled lists. */
  struct nk_esock *prev = NULL;
  for (struct nk_esock *x = t->active_head; x; prev = x, x = x->next_active)
    if (x == es) {
      if (prev) prev->next_active = es->next_active;
      else t->active_head = es->next_active;
      if (t->active_tail == es) t->active_tail = prev;
      break;
    }
  nk_policy_unthrottle(es);
  struct nk_slot *s = &t->slots[es->slot];
  s->inode = 0;
  s->kind = NK_KIND_FREE;
  atomic_store(&s->state, NK_ST_CLOSED);
  /* Give ring pages back when the socket moved enough bytes to have touched many of them; a
   * short connection's few pages are reused warm by the next socket (slots are reused LIFO).
   * So a closed socket pins at most 2 * NK_TRIM_BYTES. */
  if (es->tx_bytes + es->rx_bytes > NK_TRIM_BYTES) {
    uint64_t off = (uint64_t)(t->rings - t->base) + (uint64_t)es->slot * 2u * t->ring_size;
    fallocate(t->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
              (off_t)(2u * t->ring_size));
  }
  t->socks[es->slot] = NULL;
  t->free_stack[t->nfree++] = es->slot;
  t->nsocks--;
  t->ring_bytes -= (uint64_t)es->tx.size + es->rx.size;
  if (t->refused_listeners) nk_sock_accept_retry(t);
  /* Events for this socket may still sit in the current epoll batch: free it afterwards. */
  es->freed = true;
  es->active = true; /* never queue it again */
  es->next_active = engine.graveyard;
  engine.graveyard = es;
}

void nk_esock_reap(void) {
  while (engine.graveyard) {
    struct nk_esock *es = engine.graveyard;
    engine.graveyard = es->next_active;
    free(es);
  }
  while (engine.dead_tenants) {
    struct nk_tenant *t = engine.dead_tenants;
    engine.dead_tenants = t->next;
    free(t->socks);
    free(t->free_stack);
    free(t);
  }
  nk_control_reap();
}

uint64_t nk_tenant_region_bytes(const struct nk_tenant *t) {
  struct stat st;
  return fstat(t->memfd, &st) == 0 ? (uint64_t)st.st_blocks * 512u : 0;
}

/* A tenant can write anywhere in its region, also into the rings of slots it has no socket
 * in: pages that then count against its memory cgroup but not against max_memory, which the
 * engine enforces on the rings of open sockets. When the region holds more than those rings
 * may, the free slots' ring pages are given back (what the tenant wrote there is lost: it was
 * never a socket's). Checked once a second, only for tenants with max_memory. */
static void trim(struct nk_tenant *t) {
  /* The header and the slots used so far, page-aligned; then the rings. */
  uint64_t slots_end = (uint64_t)((uint8_t *)t->slots - t->base) +
                       (((uint64_t)t->hwm * sizeof(struct nk_slot) + 4095) & ~4095ull);
  uint64_t allowed = slots_end + nk_tenant_memory(t);
  if (allowed < t->max_memory) allowed = t->max_memory;
  uint64_t held = nk_tenant_region_bytes(t);
  if (held <= allowed) return;
  uint64_t ring2 = 2ull * t->ring_size, base = (uint64_t)(t->rings - t->base);
  /* Slots never used, and their rings: one range each. */
  fallocate(t->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)slots_end,
            (off_t)(base - slots_end));
  fallocate(t->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(base + t->hwm * ring2),
            (off_t)(t->size - base - t->hwm * ring2));
  /* Then the free slots' rings, cold ones too (the tenant may have written there again): a
   * batch per pass, going round the stack from where the last pass stopped. A tenant that
   * keeps writing into free rings costs the engine at most a batch of punches a second, not
   * one per free slot (which could be 100,000). */
  uint32_t n = t->nfree < NK_COOL_BATCH ? t->nfree : NK_COOL_BATCH;
  for (uint32_t k = 0; k < n; k++, t->trim_next++) {
    if (t->trim_next >= t->nfree) t->trim_next = 0;
    fallocate(t->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
              (off_t)(base + t->free_stack[t->trim_next] * ring2), (off_t)ring2);
  }
  uint64_t after = nk_tenant_region_bytes(t);
  t->region_trimmed += held > after ? held - after : 0;
  NK_EVENT("region_trimmed", "tenant=%s held=%llu allowed=%llu after=%llu", t->name,
           (unsigned long long)held, (unsigned long long)allowed, (unsigned long long)after);
}

static void punch_ring(struct nk_tenant *t, const struct nk_ring *r) {
  fallocate(t->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(r->data - t->base),
            (off_t)r->size);
}

/* An open socket whose rings moved bulk data, then nothing for a whole pass (one to two
 * seconds), gives their pages back, as TCP gives back buffer memory a quiet connection no
 * longer needs; the next bytes fault in fresh pages. Only empty rings: their pages hold
 * nothing. The engine alone writes the receive ring. The guest writes the transmit ring only
 * under the slot's tx_lock (every GuestLib sender takes it), so the engine takes that lock
 * around the punch, with a try, never a wait: a guest that holds it (or wrote garbage in it)
 * keeps its pages (a ring that holds bytes keeps them too, until it has moved more). An
 * external NSM writes rings itself: its sockets keep theirs. */
static void shrink(struct nk_esock *es) {
  struct nk_tenant *t = es->t;
  if (es->ext.attached || es->ep_held || es->closing) return;
  if (nk_ring_fill_checked(&es->rx) == 0) punch_ring(t, &es->rx);
  _Atomic uint32_t *lock = &t->slots[es->slot].tx_lock;
  uint32_t unlocked = 0;
  if (atomic_compare_exchange_strong_explicit(lock, &unlocked, 1, memory_order_acquire,
                                              memory_order_relaxed)) {
    if (nk_ring_fill_checked(&es->tx) == 0) punch_ring(t, &es->tx);
    atomic_store_explicit(lock, 0, memory_order_release);
  }
  t->rings_shrunk++;
}

/* The bulk list: sockets that moved data since the last pass stay for the next; quiet ones
 * give their rings back and leave it (to join again after NK_TRIM_BYTES more). A pass costs
 * one look per socket that moved bulk data lately, none per idle one, and an engine with no
 * traffic is on no timer for it: the list empties within two passes. */
static void shrink_quiet(struct nk_tenant *t) {
  for (struct nk_esock *es = t->bulk, *next; es; es = next) {
    next = es->next_bulk;
    uint64_t moved = es->tx_bytes + es->rx_bytes;
    if (moved != es->bytes_at_check) {
      es->bytes_at_check = moved;
      continue;
    }
    shrink(es);
    bulk_del(es);
    es->bytes_at_shrink = moved;
  }
}

/* Free slots beyond the warm ones at the top of the stack: their pages go back. */
static bool cool(struct nk_tenant *t) {
  if (t->nfree <= t->cold + NK_WARM_SLOTS) return false;
  uint32_t end = t->nfree - NK_WARM_SLOTS, n = 0;
  uint64_t ring2 = 2ull * t->ring_size, base = (uint64_t)(t->rings - t->base);
  for (; t->cold < end && n < NK_COOL_BATCH; t->cold++, n++)
    fallocate(t->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
              (off_t)(base + t->free_stack[t->cold] * ring2), (off_t)ring2);
  return t->cold < end;
}

bool nk_tenant_trim_due(void) {
  for (struct nk_tenant *t = engine.tenants; t; t = t->next)
    if (t->max_memory || t->nfree > t->cold + NK_WARM_SLOTS || t->bulk) return true;
  return false;
}

bool nk_tenant_trim_all(void) {
  bool more = false;
  for (struct nk_tenant *t = engine.tenants; t; t = t->next) {
    if (t->dead) continue;
    more |= cool(t);
    shrink_quiet(t);
    if (t->max_memory) trim(t);
  }
  return more;
}

/* Collects the doorbell bits guests set; returns true if any socket was activated.
 * D2 (with main()'s sleep path): the loads here come after main()'s fence; the exchanges
 * (seq_cst) take the bits D1 in GuestLib's doorbell() set, and with them the ring stores the
 * guest made before setting them. The relaxed peeks publish nothing: a bit one misses is
 * taken in a later round, and before a sleep the fence in main() orders them. */
bool nk_tenant_scan_doorbells(struct nk_tenant *t) {
  struct nk_region *rg = t->rg;
  if (!atomic_load_explicit(&rg->doorbell_summary, memory_order_relaxed)) return false;
  bool any = false;
  uint64_t summary = atomic_exchange(&rg->doorbell_summary, 0);
  while (summary) {
    uint32_t first = (uint32_t)__builtin_ctzll(summary);
    summary &= summary - 1;
    /* Only the words this summary bit stands for (in a region with a few hundred thousand
     * slots, ~30 words; with up to 4,096 slots, one). */
    for (uint32_t w = first; w < t->words && w < (t->hwm + 63) / 64; w += 64) {
      uint64_t bits = atomic_load_explicit(&rg->doorbell[w], memory_order_relaxed);
      if (!bits) continue;
      bits = atomic_exchange(&rg->doorbell[w], 0);
      while (bits) {
        uint32_t b = (uint32_t)__builtin_ctzll(bits);
        bits &= bits - 1;
        uint32_t slot = w * 64 + b;
        /* Bits for slots that are not allocated are tenant garbage: ignore them. */
        if (slot < t->hwm && t->socks[slot]) {
          nk_sock_activate(t->socks[slot]);
          any = true;
        }
      }
    }
  }
  return any;
}
