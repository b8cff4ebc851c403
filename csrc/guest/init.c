/* Process set-up: the constructor, registration with the engine, the per-thread control
 * connections and fork handling.
 *
 * Control connections are per thread so that a request and its reply never interleave with
 * another thread's (and never with readiness records, which travel on the proxy fds).
 * Lock order at fork: ctl_lock, then reg_lock (taken in prepare, released in parent/child).
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "guest.h"

struct nk_guest nk_g = {.doorbell_fd = -1};
int nk_debug;

static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t ctl_lock = PTHREAD_MUTEX_INITIALIZER;
static __thread int t_ctl = -1;
/* Every control fd this process opened, so the fork child can drop the parent's ones. */
#define NK_MAX_CTL 1024
static int ctl_fds[NK_MAX_CTL];
static int n_ctl;

static void atfork_prepare(void) {
  pthread_mutex_lock(&ctl_lock);
  pthread_mutex_lock(&reg_lock);
}
static void atfork_parent(void) {
  pthread_mutex_unlock(&reg_lock);
  pthread_mutex_unlock(&ctl_lock);
}
static void atfork_child(void) {
  /* The parent's control connections carry the parent's requests: the child opens its own.
   * The region mapping and the doorbell stay valid (same tenant). */
  for (int i = 0; i < n_ctl; i++) nk_libc.close(ctl_fds[i]);
  n_ctl = 0;
  t_ctl = -1;
  pthread_mutex_unlock(&reg_lock);
  pthread_mutex_unlock(&ctl_lock);
}

__attribute__((constructor)) static void nk_ctor(void) {
  int saved = errno;
  nk_libc_init();
  const char *dbg = getenv("NETKERNEL_DEBUG");
  nk_debug = dbg ? atoi(dbg) : 0;
  /* Never take configuration from the environment of a setuid program (torsocks). */
  if (getauxval(AT_SECURE)) goto out;
  /* Copy it: programs like nginx rewrite their environment block (setproctitle) and clear the
   * environment of their workers, which still need the engine. */
  static char path[108];
  const char *env = getenv("NETKERNEL_SOCKET");
  if (!env || !*env || strlen(env) >= sizeof(path)) goto out;
  strcpy(path, env);
  nk_g.ctl_path = path;
  pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
  /* Processes of other tenants run as the same user: non-dumpable keeps them (and anything
   * without CAP_SYS_PTRACE) out of our /proc/PID/fd, mem and map_files, where this tenant's
   * region and sockets could be found. NETKERNEL_DUMPABLE=1 keeps core dumps for debugging. */
  const char *dump = getenv("NETKERNEL_DUMPABLE");
  if (!dump || strcmp(dump, "1") != 0) prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  nk_g.enabled = true;
out:
  errno = saved;
}

static int ctl_connect(void) {
  int fd = nk_libc.socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  struct sockaddr_un un = {.sun_family = AF_UNIX};
  strncpy(un.sun_path, nk_g.ctl_path, sizeof(un.sun_path) - 1);
  if (nk_libc.connect(fd, (struct sockaddr *)&un, sizeof(un)) < 0) {
    int e = errno;
    nk_libc.close(fd);
    NK_LOG(0, "cannot reach the NetKernel engine at %s: %s", nk_g.ctl_path, strerror(e));
    return -ENETDOWN;
  }
  pthread_mutex_lock(&ctl_lock);
  if (n_ctl < NK_MAX_CTL) ctl_fds[n_ctl++] = fd;
  pthread_mutex_unlock(&ctl_lock);
  return fd;
}

/* Requests that may go again to the next engine when the connection died with them: they
 * change nothing the next engine would know of (its state starts afresh), or only read. */
static bool resendable(uint32_t op) {
  return op == NK_OP_REGISTER || op == NK_OP_SOCKET || op == NK_OP_RENEW || op == NK_OP_GETSOCKOPT;
}

/* Sends req (with send_fd attached when >= 0) and waits for the reply. Up to two fds that
 * come back are stored in rep-adjacent out parameters by the REGISTER path only.
 * The engine may die, and the daemon start another on the same socket, at any point: a
 * request that never left goes to the next engine; one that died with the engine goes again
 * if resendable(), else fails as the socket call would on a host that restarted. */
static int ctl_call_fds(struct nk_req *req, int send_fd, struct nk_rep *rep, int *fds, int nfds) {
  for (int tries = 0;; tries++) {
    if (t_ctl < 0) {
      int fd = ctl_connect();
      if (fd < 0) return fd;
      t_ctl = fd;
    }
    ssize_t n;
    do
      n = nk_send_with_fds(nk_libc.sendmsg, t_ctl, req, sizeof(*req), &send_fd, send_fd >= 0,
                           MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    bool sent = n >= 0;
    if (sent) {
      union {
        char buf[CMSG_SPACE(sizeof(int) * NK_FDPASS_MAX)];
        struct cmsghdr align;
      } cm;
      struct iovec riov = {.iov_base = rep, .iov_len = sizeof(*rep)};
      struct msghdr rh = {.msg_iov = &riov,
                          .msg_iovlen = 1,
                          .msg_control = cm.buf,
                          .msg_controllen = sizeof(cm.buf)};
      do n = nk_libc.recvmsg(t_ctl, &rh, MSG_CMSG_CLOEXEC);
      while (n < 0 && errno == EINTR);
      if (n == (ssize_t)sizeof(*rep)) {
        nk_take_fds(&rh, fds, nfds, nk_libc_close);
        return 0;
      }
      if (n >= 0) nk_take_fds(&rh, NULL, 0, nk_libc_close);
    }
    /* The engine went away: an error for the caller, never a hang. */
    NK_LOG(tries ? 0 : 1, "lost the control connection to the engine");
    nk_libc.close(t_ctl);
    t_ctl = -1;
    if (tries == 0 && (!sent || resendable(req->op))) continue;
    return sent && req->op == NK_OP_CONNECT ? -ECONNREFUSED : -ENETDOWN;
  }
}

int nk_ctl_call(struct nk_req *req, int send_fd, struct nk_rep *rep) {
  int saved = errno;
  int r = ctl_call_fds(req, send_fd, rep, NULL, 0);
  errno = saved;
  return r;
}

int nk_ensure_registered(void) {
  if (!nk_g.enabled) return -ENETDOWN;
  /* G2: acquire; pairs with G1 below: a thread that sees registered sees the mapping and
   * every nk_g field set before it. */
  if (__atomic_load_n(&nk_g.registered, __ATOMIC_ACQUIRE)) return 0;
  int saved = errno, r = 0;
  pthread_mutex_lock(&reg_lock);
  if (nk_g.registered) goto out;
  struct nk_req req = {.op = NK_OP_REGISTER};
  struct nk_rep rep;
  int fds[2];
  r = ctl_call_fds(&req, -1, &rep, fds, 2);
  if (r < 0) goto out;
  if (rep.err) {
    r = rep.err;
    NK_LOG(0, "the engine refused this process: %s", strerror(-r));
    goto out;
  }
  if (fds[0] < 0 || fds[1] < 0) {
    r = -EPROTO;
    goto out;
  }
  struct nk_reginfo info;
  memcpy(&info, rep.optval, sizeof(info));
  void *base = mmap(NULL, info.region_size, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
  nk_libc.close(fds[0]);
  if (base == MAP_FAILED) {
    r = -errno;
    nk_libc.close(fds[1]);
    goto out;
  }
  struct nk_region *rg = base;
  if (rg->magic != NK_REGION_MAGIC || rg->version != NK_ABI_VERSION) {
    NK_LOG(0, "engine speaks ABI %u, GuestLib %u", rg->version, NK_ABI_VERSION);
    munmap(base, info.region_size);
    nk_libc.close(fds[1]);
    r = -EPROTO;
    goto out;
  }
  nk_g.region = rg;
  nk_g.region_size = info.region_size;
  nk_g.nslots = rg->nslots;
  nk_g.ring_size = rg->ring_size;
  nk_g.slots = (struct nk_slot *)((uint8_t *)base + rg->slots_off);
  nk_g.rings = (uint8_t *)base + rg->rings_off;
  nk_g.doorbell_fd = fds[1];
  nk_g.info = info;
  __atomic_store_n(&nk_g.registered, true, __ATOMIC_RELEASE); /* G1: after all of the above */
  NK_LOG(1, "registered: tenant %u, %u slots of %u bytes", info.tenant_id, nk_g.nslots,
         nk_g.ring_size);
out:
  pthread_mutex_unlock(&reg_lock);
  errno = saved;
  return r;
}
