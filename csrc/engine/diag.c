/* AF_UNIX socket lookups through NETLINK_SOCK_DIAG.
 *
 * Why: a reset socket must read as POLLHUP on the guest's proxy fd, which only closing (or
 * shutting both ways) the engine end achieves — and after that the engine end can no longer
 * tell us when the guest closes its end. So the engine remembers the guest end's inode (asked
 * from the kernel, not from the guest) and checks from time to time whether it still exists.
 */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include "engine.h"
#include "netkernel/unixdiag.h"

/* sock_diag sees only the sockets of its own network namespace: a guest's socketpair lives in
 * the tenant's namespace, one the engine made (accept) in the engine's. */
static int nl_engine = -1;

static int diag_socket(struct nk_tenant *t) {
  if (!t) {
    if (nl_engine < 0) nl_engine = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    return nl_engine;
  }
  if (t->diag_fd < 0)
    t->diag_fd = nk_in_netns_proto(t->netns_fd, AF_NETLINK, SOCK_DGRAM, NETLINK_SOCK_DIAG);
  return t->diag_fd;
}

/* One request for socket ino; returns 1 found (peer in *peer when asked), 0 gone, -errno. */
static int query(struct nk_tenant *t, uint64_t ino, uint64_t *peer) {
  int nl = diag_socket(t);
  return nl < 0 ? -EAFNOSUPPORT : nk_unix_diag(nl, ino, peer);
}

uint64_t nk_diag_peer_of_fd(struct nk_tenant *t, int fd) {
  struct stat st;
  uint64_t peer = 0;
  if (fstat(fd, &st) < 0) return 0;
  if (query(t, st.st_ino, &peer) != 1) return 0;
  return peer;
}

int nk_diag_exists(struct nk_tenant *t, uint64_t ino) { return query(t, ino, NULL); }
