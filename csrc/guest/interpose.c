/* Exported libc-shaped symbols. No logic here: decide "is this ours" by lookup, then call
 * nk_*() (0/-errno) and turn the result into libc's -1 + errno, or call the real libc. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>

#include "guest.h"

static inline long ret(long r) {
  if (r < 0) {
    errno = (int)-r;
    return -1;
  }
  return r;
}

#define OURS(fd) (nk_libc.socket ? nk_fd_slot(fd) : (nk_libc_init(), nk_fd_slot(fd)))

NK_EXPORT int socket(int domain, int type, int protocol) {
  nk_libc_init();
  int base = type & ~(SOCK_NONBLOCK | SOCK_CLOEXEC);
  bool ip = domain == AF_INET || domain == AF_INET6;
  bool tcp = base == SOCK_STREAM && (protocol == 0 || protocol == IPPROTO_TCP);
  bool udp = base == SOCK_DGRAM && (protocol == 0 || protocol == IPPROTO_UDP);
  if (!nk_g.enabled || !ip || !(tcp || udp)) return nk_libc.socket(domain, type, protocol);
  return (int)ret(nk_socket(domain, type, protocol));
}

NK_EXPORT int bind(int fd, const struct sockaddr *sa, socklen_t len) {
  int s = OURS(fd);
  return s < 0 ? nk_libc.bind(fd, sa, len) : (int)ret(nk_bind(fd, s, sa, len));
}

NK_EXPORT int listen(int fd, int backlog) {
  int s = OURS(fd);
  return s < 0 ? nk_libc.listen(fd, backlog) : (int)ret(nk_listen(fd, s, backlog));
}

NK_EXPORT int accept4(int fd, struct sockaddr *sa, socklen_t *len, int flags) {
  int s = OURS(fd);
  return s < 0 ? nk_libc.accept4(fd, sa, len, flags) : (int)ret(nk_accept4(fd, s, sa, len, flags));
}

NK_EXPORT int accept(int fd, struct sockaddr *sa, socklen_t *len) {
  int s = OURS(fd);
  return s < 0 ? nk_libc.accept(fd, sa, len) : (int)ret(nk_accept4(fd, s, sa, len, 0));
}

NK_EXPORT int connect(int fd, const struct sockaddr *sa, socklen_t len) {
  int s = OURS(fd);
  return s < 0 ? nk_libc.connect(fd, sa, len) : (int)ret(nk_connect(fd, s, sa, len));
}

static ssize_t send_one(int fd, int s, const void *buf, size_t len, int flags,
                        const struct sockaddr *to, socklen_t tolen) {
  struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
  struct msghdr mh = {
      .msg_name = (void *)to, .msg_namelen = to ? tolen : 0, .msg_iov = &iov, .msg_iovlen = 1};
  return ret(nk_sendmsg(fd, s, &mh, flags));
}

static ssize_t recv_one(int fd, int s, void *buf, size_t len, int flags, struct sockaddr *from,
                        socklen_t *fromlen) {
  struct iovec iov = {.iov_base = buf, .iov_len = len};
  struct msghdr mh = {.msg_name = from,
                      .msg_namelen = from && fromlen ? *fromlen : 0,
                      .msg_iov = &iov,
                      .msg_iovlen = 1};
  ssize_t r = nk_recvmsg(fd, s, &mh, flags);
  if (r >= 0 && from && fromlen) *fromlen = mh.msg_namelen;
  return ret(r);
}

NK_EXPORT ssize_t send(int fd, const void *buf, size_t len, int flags) {
  int s = OURS(fd);
  return s < 0 ? nk_libc.send(fd, buf, len, flags) : send_one(fd, s, buf, len, flags, NULL, 0);
}

NK_EXPORT ssize_t sendto(int fd, const void *buf, size_t len, int flags, const struct sockaddr *to,
                         socklen_t tolen) {
  int s = OURS(fd);
  return s < 0 ? nk_libc.sendto(fd, buf, len, flags, to, tolen)
               : send_one(fd, s, buf, len, flags, to, tolen);
}

NK_EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags) {
  int s = OURS(fd);
  return s < 0 ? nk_libc.sendmsg(fd, msg, flags) : ret(nk_sendmsg(fd, s, msg, flags));
}

NK_EXPORT int sendmmsg(int fd, struct mmsghdr *vec, unsigned int n, int flags) {
  int s = OURS(fd);
  if (s < 0) return nk_libc.sendmmsg(fd, vec, n, flags);
  unsigned i;
  for (i = 0; i < n; i++) {
    ssize_t r = nk_sendmsg(fd, s, &vec[i].msg_hdr, flags);
    if (r < 0) {
      if (i == 0) return (int)ret(r);
      break;
    }
    vec[i].msg_len = (unsigned)r;
  }
  return (int)i;
}

NK_EXPORT ssize_t recv(int fd, void *buf, size_t len, int flags) {
  int s = OURS(fd);
  return s < 0 ? nk_libc.recv(fd, buf, len, flags) : recv_one(fd, s, buf, len, flags, NULL, NULL);
}

NK_EXPORT ssize_t recvfrom(int fd, void *buf, size_t len, int flags, struct sockaddr *from,
                           socklen_t *fromlen) {
  int s = OURS(fd);
  return s < 0 ? nk_libc.recvfrom(fd, buf, len, flags, from, fromlen)
               : recv_one(fd, s, buf, len, flags, from, fromlen);
}

NK_EXPORT ssize_t recvmsg(int fd, struct msghdr *msg, int flags) {
  int s = OURS(fd);
  if (s >= 0) return ret(nk_recvmsg(fd, s, msg, flags));
  ssize_t r = nk_libc.recvmsg(fd, msg, flags);
  /* Descriptors received over AF_UNIX land on numbers we may have seen before. */
  if (r >= 0 && msg->msg_controllen) nk_take_fds(msg, NULL, 0, nk_fd_forget);
  return r;
}

NK_EXPORT int recvmmsg(int fd, struct mmsghdr *vec, unsigned int n, int flags,
                       struct timespec *timeout) {
  int s = OURS(fd);
  if (s < 0) return nk_libc.recvmmsg(fd, vec, n, flags, timeout);
  unsigned i;
  for (i = 0; i < n; i++) {
    /* After the first datagram, take only what is already there (as Linux does with
     * MSG_WAITFORONE; without it Linux would wait for all n, which no program relies on). */
    ssize_t r = nk_recvmsg(fd, s, &vec[i].msg_hdr, i ? (flags | MSG_DONTWAIT) : flags);
    if (r < 0) {
      if (i == 0) return (int)ret(r);
      break;
    }
    vec[i].msg_len = (unsigned)r;
  }
  return (int)i;
}

NK_EXPORT ssize_t read(int fd, void *buf, size_t len) {
  int s = OURS(fd);
  return s < 0 ? nk_libc.read(fd, buf, len) : recv_one(fd, s, buf, len, 0, NULL, NULL);
}

NK_EXPORT ssize_t __read_chk(int fd, void *buf, size_t len, size_t buflen) {
  (void)buflen;
  return read(fd, buf, len);
}

NK_EXPORT ssize_t __recv_chk(int fd, void *buf, size_t len, size_t buflen, int flags) {
  (void)buflen;
  return recv(fd, buf, len, flags);
}

NK_EXPORT ssize_t __recvfrom_chk(int fd, void *buf, size_t len, size_t buflen, int flags,
                                 struct sockaddr *from, socklen_t *fromlen) {
  (void)buflen;
  return recvfrom(fd, buf, len, flags, from, fromlen);
}

NK_EXPORT ssize_t write(int fd, const void *buf, size_t len) {
  int s = OURS(fd);
  return s < 0 ? nk_libc.write(fd, buf, len) : send_one(fd, s, buf, len, 0, NULL, 0);
}

NK_EXPORT ssize_t readv(int fd, const struct iovec *iov, int n) {
  int s = OURS(fd);
  if (s < 0) return nk_libc.readv(fd, iov, n);
  struct msghdr mh = {.msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)n};
  return ret(nk_recvmsg(fd, s, &mh, 0));
}

NK_EXPORT ssize_t writev(int fd, const struct iovec *iov, int n) {
  int s = OURS(fd);
  if (s < 0) return nk_libc.writev(fd, iov, n);
  struct msghdr mh = {.msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)n};
  return ret(nk_sendmsg(fd, s, &mh, 0));
}

NK_EXPORT ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count) {
  int s = OURS(out_fd);
  return s < 0 ? nk_libc.sendfile(out_fd, in_fd, offset, count)
               : ret(nk_sendfile(out_fd, s, in_fd, offset, count));
}

NK_EXPORT ssize_t sendfile64(int out_fd, int in_fd, off_t *offset, size_t count) {
  int s = OURS(out_fd);
  return s < 0 ? nk_libc.sendfile64(out_fd, in_fd, offset, count)
               : ret(nk_sendfile(out_fd, s, in_fd, offset, count));
}

NK_EXPORT int shutdown(int fd, int how) {
  int s = OURS(fd);
  return s < 0 ? nk_libc.shutdown(fd, how) : (int)ret(nk_shutdown(fd, s, how));
}

NK_EXPORT int close(int fd) {
  nk_libc_init();
  /* The kernel keeps the proxy fd alive while other references exist; the engine sees the
   * hang-up on its end only after the last one. */
  nk_fd_forget(fd);
  return nk_libc.close(fd);
}

NK_EXPORT int close_range(unsigned int lo, unsigned int hi, int flags) {
  nk_libc_init();
  if (!nk_libc.close_range) {
    errno = ENOSYS;
    return -1;
  }
  int r = nk_libc.close_range(lo, hi, flags);
  if (r == 0 && !(flags & CLOSE_RANGE_CLOEXEC)) nk_fd_forget_range(lo, hi);
  return r;
}

NK_EXPORT int dup(int fd) {
  nk_libc_init();
  int r = nk_libc.dup(fd);
  if (r >= 0) nk_fd_copy(fd, r);
  return r;
}

NK_EXPORT int dup2(int fd, int fd2) {
  nk_libc_init();
  int r = nk_libc.dup2(fd, fd2);
  if (r >= 0 && fd != fd2) nk_fd_copy(fd, r);
  return r;
}

NK_EXPORT int dup3(int fd, int fd2, int flags) {
  nk_libc_init();
  int r = nk_libc.dup3(fd, fd2, flags);
  if (r >= 0) nk_fd_copy(fd, r);
  return r;
}

static int do_fcntl(int (*real)(int, int, ...), int fd, int cmd, va_list ap) {
  /* Every fcntl argument is an int or a pointer; pass it on as a pointer-sized value. */
  void *arg = va_arg(ap, void *);
  int r = real(fd, cmd, arg);
  if (r >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)) nk_fd_copy(fd, r);
  if (r >= 0 && cmd == F_SETFL) {
    int s = nk_fd_slot(fd);
    if (s >= 0) nk_note_nonblock(s, ((long)arg & O_NONBLOCK) != 0);
  }
  return r;
}

NK_EXPORT int fcntl(int fd, int cmd, ...) {
  nk_libc_init();
  va_list ap;
  va_start(ap, cmd);
  int r = do_fcntl(nk_libc.fcntl, fd, cmd, ap);
  va_end(ap);
  return r;
}

NK_EXPORT int fcntl64(int fd, int cmd, ...) {
  nk_libc_init();
  va_list ap;
  va_start(ap, cmd);
  int r = do_fcntl(nk_libc.fcntl64, fd, cmd, ap);
  va_end(ap);
  return r;
}

NK_EXPORT int ioctl(int fd, unsigned long req, ...) {
  va_list ap;
  va_start(ap, req);
  void *arg = va_arg(ap, void *);
  va_end(ap);
  int s = OURS(fd);
  return s < 0 ? nk_libc.ioctl(fd, req, arg) : (int)ret(nk_ioctl(fd, s, req, arg));
}

NK_EXPORT int getsockname(int fd, struct sockaddr *sa, socklen_t *len) {
  int s = OURS(fd);
  return s < 0 ? nk_libc.getsockname(fd, sa, len) : (int)ret(nk_getname(fd, s, sa, len, false));
}

NK_EXPORT int getpeername(int fd, struct sockaddr *sa, socklen_t *len) {
  int s = OURS(fd);
  return s < 0 ? nk_libc.getpeername(fd, sa, len) : (int)ret(nk_getname(fd, s, sa, len, true));
}

NK_EXPORT int getsockopt(int fd, int level, int name, void *val, socklen_t *len) {
  int s = OURS(fd);
  return s < 0 ? nk_libc.getsockopt(fd, level, name, val, len)
               : (int)ret(nk_getsockopt(fd, s, level, name, val, len));
}

NK_EXPORT int setsockopt(int fd, int level, int name, const void *val, socklen_t len) {
  int s = OURS(fd);
  return s < 0 ? nk_libc.setsockopt(fd, level, name, val, len)
               : (int)ret(nk_setsockopt(fd, s, level, name, val, len));
}

/* Not a libc function: the tenant's relay (csrc/relay) finds it with dlsym() and hands the
 * engine a program's connection with it. fd: a connected NetKernel stream socket; kfd: the
 * relay's kernel TCP socket to the program. 0, or -1 with errno (ENOTSOCK: fd is not one of
 * NetKernel's; EOPNOTSUPP: an engine without NK_OP_ATTACH). */
NK_EXPORT int netkernel_attach(int fd, int kfd) {
  int s = OURS(fd);
  if (s < 0) {
    errno = ENOTSOCK;
    return -1;
  }
  return (int)ret(nk_attach(fd, s, kfd));
}
