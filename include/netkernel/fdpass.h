/* Descriptors passed over AF_UNIX sockets (SCM_RIGHTS), one copy for GuestLib, the engine and
 * ServiceLib: the control replies, NEWCONN records and NSM hellos all carry them.
 *
 * Sending builds one SCM_RIGHTS message. Receiving walks every control message, since a peer
 * may attach several, and hands each descriptor somewhere: a descriptor left in a received
 * message would stay open in this process for good. */
#ifndef NETKERNEL_FDPASS_H
#define NETKERNEL_FDPASS_H

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

#define NK_FDPASS_MAX 10 /* the most any NetKernel message carries (a socket handed over) */

/* Sends len bytes of buf on sock as one message with nfds descriptors attached, through
 * send (sendmsg, or GuestLib's pointer to libc's own). Returns what send() does. */
static inline ssize_t nk_send_with_fds(ssize_t (*send)(int, const struct msghdr *, int), int sock,
                                       const void *buf, size_t len, const int *fds, int nfds,
                                       int flags) {
  union {
    char buf[CMSG_SPACE(sizeof(int) * NK_FDPASS_MAX)];
    struct cmsghdr align;
  } cm;
  memset(&cm, 0, sizeof(cm));
  struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
  struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
  if (nfds < 0 || nfds > NK_FDPASS_MAX) {
    errno = EINVAL;
    return -1;
  }
  if (nfds > 0) {
    mh.msg_control = cm.buf;
    mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
    struct cmsghdr *h = CMSG_FIRSTHDR(&mh);
    h->cmsg_level = SOL_SOCKET;
    h->cmsg_type = SCM_RIGHTS;
    h->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
    memcpy(CMSG_DATA(h), fds, sizeof(int) * (size_t)nfds);
  }
  return send(sock, &mh, flags);
}

/* The descriptors of a received message: the first `want` go to out[] (the rest of out[] is
 * -1), every other one to rest(). Returns how many there were. */
static inline int nk_take_fds(struct msghdr *mh, int *out, int want, void (*rest)(int fd)) {
  int got = 0, total = 0;
  for (int i = 0; i < want; i++) out[i] = -1;
  if (!mh->msg_control) return 0;
  for (struct cmsghdr *h = CMSG_FIRSTHDR(mh); h; h = CMSG_NXTHDR(mh, h)) {
    if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS) continue;
    int k = (int)((h->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    for (int j = 0; j < k; j++, total++) {
      int fd;
      memcpy(&fd, CMSG_DATA(h) + (size_t)j * sizeof(int), sizeof(int));
      if (got < want) out[got++] = fd;
      else rest(fd);
    }
  }
  return total;
}

/* Receives one message of at most len bytes on sock (recvmsg), its first `want` descriptors
 * into out[] and any others to rest(). Returns what recvmsg() does. */
static inline ssize_t nk_recv_with_fds(int sock, void *buf, size_t len, int *out, int want,
                                       int flags, void (*rest)(int fd)) {
  union {
    char buf[CMSG_SPACE(sizeof(int) * NK_FDPASS_MAX)];
    struct cmsghdr align;
  } cm;
  struct iovec iov = {.iov_base = buf, .iov_len = len};
  struct msghdr mh = {
      .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof(cm.buf)};
  ssize_t n = recvmsg(sock, &mh, flags);
  if (n < 0) mh.msg_controllen = 0; /* nothing came: the buffer holds no descriptors */
  nk_take_fds(&mh, out, want, rest);
  return n;
}

#endif
