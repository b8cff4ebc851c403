/* fd -> NetKernel slot, decided by lookup (never by "the real call failed").
 *
 * Entries: 0 = not looked at yet, -1 = not ours, s+1 = slot s. The table is per process; a
 * dup, fork, exec or SCM_RIGHTS copy of a proxy fd that we did not see is recognised on first
 * use by the proxy fd's inode, which the engine wrote into the slot. Calls that free an fd
 * number (close, dup2 onto it, close_range) reset its entry.
 */
#include <errno.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "guest.h"

#define NK_FDMAP_MAX (1u << 20)
static _Atomic int32_t *fdmap;
static unsigned fdmap_cap;

__attribute__((constructor(101))) static void fdmap_init(void) {
  /* Reserve one entry per possible fd; untouched pages cost nothing. */
  void *p = mmap(NULL, NK_FDMAP_MAX * sizeof(int32_t), PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return;
  fdmap = p;
  fdmap_cap = NK_FDMAP_MAX;
}

static int lookup_inode(uint64_t ino) {
  /* Only the slots ever used: reading the rest would fault their pages in. */
  uint32_t hwm = atomic_load_explicit(&nk_g.region->slots_hwm, memory_order_acquire);
  if (hwm > nk_g.nslots) hwm = nk_g.nslots;
  for (uint32_t i = 0; i < hwm; i++)
    if (nk_g.slots[i].inode == ino && nk_g.slots[i].kind != NK_KIND_FREE) return (int)i;
  return -1;
}

int nk_fd_slot(int fd) {
  if (fd < 0 || (unsigned)fd >= fdmap_cap || !nk_g.enabled) return -1;
  int32_t e = atomic_load_explicit(&fdmap[fd], memory_order_relaxed);
  if (e > 0) return e - 1;
  if (e < 0) return -1;
  /* First sight of this fd: only an AF_UNIX SOCK_SEQPACKET socket can be one of ours. */
  int saved = errno, slot = -1;
  struct stat st;
  if (fstat(fd, &st) < 0 || !S_ISSOCK(st.st_mode)) goto done;
  int v;
  socklen_t l = sizeof(v);
  if (nk_libc.getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &v, &l) < 0 || v != AF_UNIX) goto done;
  l = sizeof(v);
  if (nk_libc.getsockopt(fd, SOL_SOCKET, SO_TYPE, &v, &l) < 0 || v != SOCK_SEQPACKET) goto done;
  if (nk_ensure_registered() < 0) goto done;
  slot = lookup_inode(st.st_ino);
done:
  atomic_store_explicit(&fdmap[fd], slot >= 0 ? slot + 1 : -1, memory_order_relaxed);
  errno = saved;
  return slot;
}

void nk_fd_set(int fd, int slot) {
  if (fd >= 0 && (unsigned)fd < fdmap_cap)
    atomic_store_explicit(&fdmap[fd], slot >= 0 ? slot + 1 : 0, memory_order_relaxed);
}

void nk_fd_forget(int fd) { nk_fd_set(fd, -1); }

void nk_fd_forget_range(unsigned lo, unsigned hi) {
  if (!fdmap) return;
  if (hi >= fdmap_cap) hi = fdmap_cap - 1;
  for (unsigned i = lo; i <= hi && i < fdmap_cap; i++)
    if (atomic_load_explicit(&fdmap[i], memory_order_relaxed))
      atomic_store_explicit(&fdmap[i], 0, memory_order_relaxed);
}

void nk_fd_copy(int from, int to) {
  if (to < 0 || (unsigned)to >= fdmap_cap) return;
  int32_t e = (from >= 0 && (unsigned)from < fdmap_cap)
                  ? atomic_load_explicit(&fdmap[from], memory_order_relaxed)
                  : 0;
  atomic_store_explicit(&fdmap[to], e, memory_order_relaxed);
}
