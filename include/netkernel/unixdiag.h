/* One AF_UNIX lookup through NETLINK_SOCK_DIAG, shared by the engine (csrc/engine/diag.c) and
 * a VM guest's agent (csrc/vm/net.c): whether the socket with inode ino exists in the netlink
 * socket's namespace, and its peer. Why both need it: a proxy end closed to show POLLHUP can
 * no longer tell when the other end goes, so its inode is looked up from time to time. */
#ifndef NETKERNEL_UNIXDIAG_H
#define NETKERNEL_UNIXDIAG_H

#include <errno.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sock_diag.h>
#include <linux/unix_diag.h>
#include <poll.h>
#include <stdint.h>
#include <sys/socket.h>

/* 1 found (its peer's inode in *peer when asked), 0 gone, -errno. nl: a NETLINK_SOCK_DIAG
 * socket. */
static inline int nk_unix_diag(int nl, uint64_t ino, uint64_t *peer) {
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
  /* The reply is immediate; the poll only bounds a kernel that does not answer. */
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
    struct nlmsgerr *e = (struct nlmsgerr *)NLMSG_DATA(h);
    return e->error == -ENOENT ? 0 : e->error;
  }
  if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY) return -EPROTO;
  struct unix_diag_msg *m = (struct unix_diag_msg *)NLMSG_DATA(h);
  if (m->udiag_ino != (uint32_t)ino) return 0;
  if (peer) {
    *peer = 0;
    int len = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof(*m)));
    for (struct rtattr *a = (struct rtattr *)(m + 1); RTA_OK(a, len); a = RTA_NEXT(a, len))
      if (a->rta_type == UNIX_DIAG_PEER) *peer = *(uint32_t *)RTA_DATA(a);
  }
  return 1;
}

#endif
