/* GuestLib internals, shared by the files of libnetkernel.so.
 *
 * Layers (Samba's socket_wrapper, TAS): interpose.c exports libc-shaped symbols and holds no
 * logic; they call nk_*() here, which call the real libc through nk_libc (libc.c).
 * Errors inside GuestLib are 0 / -errno; the exported calls keep libc's -1 + errno contract.
 *
 * Threads: every function here may be called from any thread of the tenant process. Per-socket
 * state lives in the shared region (struct nk_slot), so any process holding the proxy fd
 * (dup, fork, exec, SCM_RIGHTS) operates on the same socket.
 */
#ifndef NK_GUEST_H
#define NK_GUEST_H

#include <netinet/in.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include "netkernel/abi.h"
#include "netkernel/addr.h"
#include "netkernel/fdpass.h"
#include "netkernel/ring.h"

#define NK_EXPORT __attribute__((visibility("default")))

/* The real libc symbols, filled once. */
struct nk_libc {
  int (*socket)(int, int, int);
  int (*socketpair)(int, int, int, int[2]);
  int (*bind)(int, const struct sockaddr *, socklen_t);
  int (*listen)(int, int);
  int (*accept)(int, struct sockaddr *, socklen_t *);
  int (*accept4)(int, struct sockaddr *, socklen_t *, int);
  int (*connect)(int, const struct sockaddr *, socklen_t);
  ssize_t (*send)(int, const void *, size_t, int);
  ssize_t (*sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
  ssize_t (*sendmsg)(int, const struct msghdr *, int);
  int (*sendmmsg)(int, struct mmsghdr *, unsigned int, int);
  ssize_t (*recv)(int, void *, size_t, int);
  ssize_t (*recvfrom)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
  ssize_t (*recvmsg)(int, struct msghdr *, int);
  int (*recvmmsg)(int, struct mmsghdr *, unsigned int, int, struct timespec *);
  ssize_t (*read)(int, void *, size_t);
  ssize_t (*write)(int, const void *, size_t);
  ssize_t (*readv)(int, const struct iovec *, int);
  ssize_t (*writev)(int, const struct iovec *, int);
  ssize_t (*sendfile)(int, int, off_t *, size_t);
  ssize_t (*sendfile64)(int, int, off_t *, size_t);
  int (*shutdown)(int, int);
  int (*close)(int);
  int (*close_range)(unsigned int, unsigned int, int);
  int (*dup)(int);
  int (*dup2)(int, int);
  int (*dup3)(int, int, int);
  int (*fcntl)(int, int, ...);
  int (*fcntl64)(int, int, ...);
  int (*ioctl)(int, unsigned long, ...);
  int (*getsockname)(int, struct sockaddr *, socklen_t *);
  int (*getpeername)(int, struct sockaddr *, socklen_t *);
  int (*getsockopt)(int, int, int, void *, socklen_t *);
  int (*setsockopt)(int, int, int, const void *, socklen_t);
};
extern struct nk_libc nk_libc;
/* For nk_take_fds(): descriptors a message brought that nobody wants. */
static inline void nk_libc_close(int fd) { nk_libc.close(fd); }
void nk_libc_init(void);

/* Process state. */
struct nk_guest {
  bool enabled; /* NETKERNEL_SOCKET set and not a setuid program */
  bool registered;
  const char *ctl_path;
  struct nk_region *region;
  uint64_t region_size;
  struct nk_slot *slots;
  uint8_t *rings;
  uint32_t nslots;
  uint32_t ring_size;
  int doorbell_fd;
  struct nk_reginfo info;
};
extern struct nk_guest nk_g;

extern int nk_debug;
#define NK_LOG(lvl, fmt, ...)                                                                 \
  do {                                                                                        \
    if (nk_debug >= (lvl))                                                                    \
      fprintf(stderr, "netkernel[%d] %s: " fmt "\n", (int)getpid(), __func__, ##__VA_ARGS__); \
  } while (0)

/* init.c */
int nk_ensure_registered(void);
int nk_ctl_call(struct nk_req *req, int send_fd, struct nk_rep *rep);

/* fdmap.c: fd -> slot. Returns slot index or -1 when the fd is not a NetKernel socket. */
int nk_fd_slot(int fd);
void nk_fd_set(int fd, int slot);
void nk_fd_forget(int fd);
void nk_fd_forget_range(unsigned lo, unsigned hi);
void nk_fd_copy(int from, int to);

/* sock.c */
struct nk_slot *nk_slot_at(int slot);
void nk_slot_rings(int slot, struct nk_ring *tx, struct nk_ring *rx);
int nk_socket(int domain, int type, int protocol);
int nk_attach(int fd, int slot, int kfd);
int nk_bind(int fd, int slot, const struct sockaddr *sa, socklen_t len);
int nk_listen(int fd, int slot, int backlog);
int nk_accept4(int fd, int slot, struct sockaddr *sa, socklen_t *len, int flags);
int nk_connect(int fd, int slot, const struct sockaddr *sa, socklen_t len);
ssize_t nk_sendmsg(int fd, int slot, const struct msghdr *msg, int flags);
ssize_t nk_recvmsg(int fd, int slot, struct msghdr *msg, int flags);
ssize_t nk_sendfile(int out_fd, int slot, int in_fd, off_t *offset, size_t count);
int nk_shutdown(int fd, int slot, int how);
int nk_getname(int fd, int slot, struct sockaddr *sa, socklen_t *len, bool peer);
int nk_getsockopt(int fd, int slot, int level, int name, void *val, socklen_t *len);
int nk_setsockopt(int fd, int slot, int level, int name, const void *val, socklen_t len);
int nk_ioctl(int fd, int slot, unsigned long req, void *arg);
void nk_note_nonblock(int slot, bool on);

#endif
