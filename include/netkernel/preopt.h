/* The options GuestLib may record in nk_slot.preopts (abi.h), by level and name: the one
 * table both sides read, so that what GuestLib defers is what the engine takes. */
#ifndef NETKERNEL_PREOPT_H
#define NETKERNEL_PREOPT_H

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include "netkernel/abi.h"

static const struct {
  int level, name;
} nk_preopts[NK_PREOPT_COUNT] = {
    [NK_PREOPT_REUSEADDR] = {SOL_SOCKET, SO_REUSEADDR},
    [NK_PREOPT_REUSEPORT] = {SOL_SOCKET, SO_REUSEPORT},
    [NK_PREOPT_KEEPALIVE] = {SOL_SOCKET, SO_KEEPALIVE},
    [NK_PREOPT_NODELAY] = {IPPROTO_TCP, TCP_NODELAY},
};

/* The NK_PREOPT_* index of an option, or -1. Linux accepts each of these with any int value
 * on a TCP socket of either family, so recording one can report success at once. */
static inline int nk_preopt_index(int level, int name) {
  for (int i = 0; i < NK_PREOPT_COUNT; i++)
    if (nk_preopts[i].level == level && nk_preopts[i].name == name) return i;
  return -1;
}

#endif
