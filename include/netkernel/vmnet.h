/* The network port of a VM tenant: frames between the guest agent, which plays the engine's
 * local half for GuestLib in the guest, and the bridge in the tenant's sandbox on the host,
 * which holds the host proxy pairs and talks to the engine as GuestLib does (csrc/vm/net.c,
 * csrc/vm/bridge.c, docs/architecture.md "VM tenants").
 *
 * Only control crosses this port: requests and replies of the control connections, and the
 * few records a proxy carries (READY, NEWCONN, blockers). Bytes go through the tenant's
 * region, which the guest maps as an ivshmem BAR. A byte stream of frames; little-endian,
 * fixed width. Either end treats what it reads as untrusted, and a frame that breaks these
 * rules ends the port (and with it the VM's network: it hurts only that VM).
 */
#ifndef NETKERNEL_VMNET_H
#define NETKERNEL_VMNET_H

#include <stdint.h>

#define NK_VMNET_NAME   "nk.net"
#define NK_VMNET_MAX    2048         /* largest payload: an nk_req (320 bytes), a DNS message */
#define NK_VMNET_HOSTID 0x80000000u  /* proxies the host names (accepted connections) */
#define NK_VMNET_IDS    (1u << 20)   /* ids below this on each side */
#define NK_DNS_STUB     "127.0.0.53" /* the tenant's resolver, in its namespace and the guest */

struct nk_vmnet {
  uint32_t len;  /* payload bytes that follow */
  uint16_t type; /* enum nk_vmnet_type */
  uint16_t reserved;
  uint32_t a; /* a control connection or a proxy id */
  uint32_t b; /* a second proxy id, or 0 */
};
_Static_assert(sizeof(struct nk_vmnet) == 16, "nk_vmnet is ABI");

enum nk_vmnet_type {
  /* guest -> host */
  NK_VMNET_CTL_OPEN = 1,  /* a: a new control connection */
  NK_VMNET_CTL_CLOSE = 2, /* a: it closed */
  NK_VMNET_CTL_REQ = 3,   /* a: connection, b: the new proxy's id (SOCKET, RENEW) or 0; nk_req */
  NK_VMNET_CLOSED = 4,    /* a: the program's end of this proxy is gone */
  NK_VMNET_BLOCK = 5,     /* a: the program queued a blocker record on this proxy */
  NK_VMNET_KICK = 6,      /* the program rang the doorbell */
  NK_VMNET_DNS = 7,       /* a DNS query for the tenant's resolver (the engine's stub) */
  /* host -> guest */
  NK_VMNET_CTL_REP = 16,    /* a: connection; nk_rep */
  NK_VMNET_READY = 17,      /* a: proxy; the record (NK_MSG_READY) */
  NK_VMNET_NEWCONN = 18,    /* a: the listener's proxy, b: the new one's id; struct nk_newconn */
  NK_VMNET_UNBLOCK = 19,    /* a: proxy; the engine consumed its blocker */
  NK_VMNET_HUP = 20,        /* a: proxy; the engine's end is gone */
  NK_VMNET_DNS_ANSWER = 21, /* an answer to a query, as the resolver gave it */
};

#endif
