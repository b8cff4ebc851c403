/* The table of real libc symbols, resolved once with dlsym(RTLD_NEXT).
 * A missing symbol, or one that resolves to GuestLib itself, aborts with a clear message
 * (proxychains-ng): silently calling ourselves would recurse forever. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>

#include "guest.h"

struct nk_libc nk_libc;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void *resolve(const char *name, void *self, int required) {
  void *p = dlsym(RTLD_NEXT, name);
  if (!p && required) {
    fprintf(stderr, "netkernel: libc symbol %s not found; cannot run\n", name);
    abort();
  }
  if (p && p == self) {
    fprintf(stderr, "netkernel: %s resolves to GuestLib itself; check LD_PRELOAD\n", name);
    abort();
  }
  return p;
}

/* Our own exported symbols, so resolve() can refuse them. */
extern int close(int);

static void do_init(void) {
#define R(field, req) *(void **)&nk_libc.field = resolve(#field, NULL, req)
  R(socket, 1);
  R(socketpair, 1);
  R(bind, 1);
  R(listen, 1);
  R(accept, 1);
  R(accept4, 1);
  R(connect, 1);
  R(send, 1);
  R(sendto, 1);
  R(sendmsg, 1);
  R(sendmmsg, 1);
  R(recv, 1);
  R(recvfrom, 1);
  R(recvmsg, 1);
  R(recvmmsg, 1);
  R(read, 1);
  R(write, 1);
  R(readv, 1);
  R(writev, 1);
  R(sendfile, 1);
  R(sendfile64, 0);
  R(shutdown, 1);
  R(close_range, 0);
  R(dup, 1);
  R(dup2, 1);
  R(dup3, 1);
  R(fcntl, 1);
  R(fcntl64, 0);
  R(ioctl, 1);
  R(getsockname, 1);
  R(getpeername, 1);
  R(getsockopt, 1);
  R(setsockopt, 1);
#undef R
  *(void **)&nk_libc.close = resolve("close", (void *)close, 1);
  if (!nk_libc.fcntl64) nk_libc.fcntl64 = nk_libc.fcntl;
  if (!nk_libc.sendfile64) nk_libc.sendfile64 = nk_libc.sendfile;
}

void nk_libc_init(void) { pthread_once(&once, do_init); }
