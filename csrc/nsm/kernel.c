/* The kernel NSM: the Linux stack in its own network namespace. Sockets are opened inside the
 * namespace (a socket stays in the namespace it was created in) and then driven with ordinary
 * non-blocking system calls by the engine. Congestion control and sysctls are the namespace's. */
#include <errno.h>
#include <sched.h>
#include <sys/socket.h>

#include "engine.h"

/* The engine is single-threaded, so switching its namespace around one socket() is safe. */
int nk_in_netns(int netns_fd, int domain, int type) {
  return nk_in_netns_proto(netns_fd, domain, type, 0);
}

int nk_in_netns_proto(int netns_fd, int domain, int type, int protocol) {
  if (setns(netns_fd, CLONE_NEWNET) < 0) return -errno;
  int fd = socket(domain, type | SOCK_NONBLOCK | SOCK_CLOEXEC, protocol);
  int err = fd < 0 ? -errno : 0;
  if (setns(E.self_netns, CLONE_NEWNET) < 0) {
    /* Staying in a tenant's namespace would be a security hole: stop here. */
    NK_INFO("cannot return to the engine's network namespace: %s", "fatal");
    _exit(70);
  }
  return fd < 0 ? err : fd;
}

static int kernel_open_socket(struct nk_nsm *nsm, int domain, int type) {
  return nk_in_netns(nsm->netns_fd, domain, type);
}

const struct nk_nsm_ops nk_nsm_kernel_ops = {
    .type = "kernel",
    .open_socket = kernel_open_socket,
};
