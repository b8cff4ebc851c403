/* What both ends of a VM tenant's network port share (include/netkernel/vmnet.h): the proxy
 * table by id, and writing and reading frames. The agent (net.c) and the bridge (bridge.c)
 * each link port.c. */
#ifndef NETKERNEL_VM_PORT_H
#define NETKERNEL_VM_PORT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "netkernel/vmnet.h"

struct nk_vm_proxy {
  int fd;       /* this side's end of the proxy pair (-1: none) */
  uint64_t ino; /* agent: the program's end */
  bool blocked; /* a blocker is in flight */
  bool zombie;  /* agent: the connection is over, waiting for the program's end to go */
};

/* Ids the guest names (SOCKET, RENEW) and ids the host names (accepted connections,
 * NK_VMNET_HOSTID set), each below NK_VMNET_IDS. */
struct nk_vm_proxies {
  struct nk_vm_proxy *guest, *host;
};

int nk_vm_proxies_init(struct nk_vm_proxies *t);
struct nk_vm_proxy *nk_vm_proxy(struct nk_vm_proxies *t, uint32_t id);

/* One frame, whole, on the port; false if the port failed. */
bool nk_vm_put(int port, uint16_t type, uint32_t a, uint32_t b, const void *p, uint32_t len);

struct nk_vm_reader {
  char in[sizeof(struct nk_vmnet) + NK_VMNET_MAX];
  size_t have;
};

/* Reads what the port has and hands each whole frame to on_frame. 1: go on; 0: the other
 * side closed the port; -1: a frame longer than NK_VMNET_MAX (the port is out of step). */
int nk_vm_read(int port, struct nk_vm_reader *r, void (*on_frame)(struct nk_vmnet *h, char *p));

#endif
