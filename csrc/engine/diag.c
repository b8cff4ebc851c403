/* AF_UNIX socket lookups through NETLINK_SOCK_DIAG.
 *
 * Why: a reset socket must read as POLLHUP on the guest's proxy fd, which only closing (or
 * shutting both ways) the engine end achieves — and after that the engine end can no longer
 * tell us when the guest closes its end. So the engine remembers the guest end's inode (asked
 * from the kernel, not from the guest) and checks from time to time whether it still exists.
 */
#include <errno.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sock_diag.h>
#include <linux/unix_diag.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include "engine.h"

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
  if (nl < 0) return -EAFNOSUPPORT;
  struct {
    struct nlmsghdr nh;
    struct unix_diag_req r;
  } req = {
      .nh = {.nlmsg_len = sizeof(req),
             .nlmsg_type = SOCK_DIAG_BY_FAMILY,
             .nlmsg_flags = NLM_F_REQUEST},
      .r = {.sdiag_family = AF_UNIX,
            .udiag_states = ~0u,
            .udiag_ino = (uint32_t)ino,
            .udiag_show = UDIAG_SHOW_PEER,
            .udiag_cookie = {INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE}},
  };
  if (send(nl, &req, sizeof(req), 0) < 0) return -errno;
  /* The reply is immediate; a non-blocking socket would only need a poll here. */
  union {
    char buf[8192];
    struct nlmsghdr align;
  } u;
  struct pollfd p = {.fd = nl, .events = POLLIN};
  if (poll(&p, 1, 1000) != 1) return -ETIMEDOUT;
  ssize_t n = recv(nl, u.buf, sizeof(u.buf), 0);
  if (n < 0) return -errno;
  struct nlmsghdr *h = &u.align;
  if (!NLMSG_OK(h, (size_t)n)) return -EPROTO;
  if (h->nlmsg_type == NLMSG_ERROR) {
    struct nlmsgerr *e = NLMSG_DATA(h);
    return e->error == -ENOENT ? 0 : e->error;
  }
  if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY) return -EPROTO;
  struct unix_diag_msg *m = NLMSG_DATA(h);
  if (m->udiag_ino != (uint32_t)ino) return 0;
  if (peer) {
    *peer = 0;
    int len = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof(*m)));
    for (struct rtattr *a = (struct rtattr *)(m + 1); RTA_OK(a, len); a = RTA_NEXT(a, len))
      if (a->rta_type == UNIX_DIAG_PEER) *peer = *(uint32_t *)RTA_DATA(a);
  }
  return 1;
}

uint64_t nk_diag_peer_of_fd(struct nk_tenant *t, int fd) {
  struct stat st;
  uint64_t peer = 0;
  if (fstat(fd, &st) < 0) return 0;
  if (query(t, st.st_ino, &peer) != 1) return 0;
  return peer;
}

int nk_diag_exists(struct nk_tenant *t, uint64_t ino) { return query(t, ino, NULL); }
