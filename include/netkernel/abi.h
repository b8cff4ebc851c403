/* NetKernel shared ABI: the tenant region, per-socket rings and the messages that cross
 * between GuestLib (in tenant processes) and the CoreEngine.
 *
 * Contract:
 *  - Everything in the region is writable by every process of the tenant. The engine reads
 *    each field once, validates it and never follows it as a pointer (DESIGN §D). GuestLib
 *    trusts what the engine writes.
 *  - Offsets, never pointers. Fixed-width fields. Sizes and offsets are pinned by static
 *    asserts: changing one is an ABI change and needs NK_ABI_VERSION bumped.
 *  - Ring indices are free-running uint32_t, masked on use; ring sizes are powers of two.
 *    Each index has one writer: the producer of that ring owns head, the consumer owns tail.
 *
 * Python reads the NK_* integer constants from this file at build time (gen_constants.py),
 * so the two cannot drift.
 */
#ifndef NETKERNEL_ABI_H
#define NETKERNEL_ABI_H

#include <stdint.h>
#include <stddef.h>

/* C++ may include this header for the layouts (ring.h, addr.h and servicelib.h are C11 only):
 * there the atomic fields are plain integers of the same size, and the layout pins are
 * static_assert, since C++ has no _Static_assert. */
#ifdef __cplusplus
#define NK_ATOMIC(t) t
#define NK_STATIC_ASSERT(cond, msg) static_assert(cond, msg)
#else
#include <stdatomic.h>
#define NK_ATOMIC(t) _Atomic t
#define NK_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#endif

#define NK_REGION_MAGIC 0x4e4b5247u /* "NKRG" */
#define NK_ABI_VERSION 1
#define NK_CACHELINE 64

#define NK_DEFAULT_RING_SIZE (1024u * 1024u) /* bytes per direction per socket */
#define NK_DEFAULT_SLOTS 1024u               /* sockets per tenant region */
#define NK_DOORBELL_WORDS(nslots) (((nslots) + 63u) / 64u)
#define NK_MAX_SLOTS 65536u

/* Socket kinds stored in nk_slot.kind. */
#define NK_KIND_FREE 0
#define NK_KIND_STREAM 1
#define NK_KIND_DGRAM 2
#define NK_KIND_LISTENER 3

/* Connection states stored in nk_slot.state (engine-written, informational for the guest). */
#define NK_ST_NEW 0
#define NK_ST_BOUND 1
#define NK_ST_LISTEN 2
#define NK_ST_CONNECTING 3
#define NK_ST_CONNECTED 4
#define NK_ST_CLOSED 5

/* An address as it crosses the ABI: no struct sockaddr, whose size depends on the family. */
struct nk_addr {
  uint16_t family; /* AF_INET or AF_INET6, 0 = none */
  uint16_t port;   /* network byte order */
  uint32_t scope_id;
  uint8_t addr[16]; /* IPv4 in the first 4 bytes */
};
NK_STATIC_ASSERT(sizeof(struct nk_addr) == 24, "nk_addr size");

/* One index on its own cache line (DPDK rte_ring layout). */
struct nk_index {
  NK_ATOMIC(uint32_t) v;
  uint32_t pad[NK_CACHELINE / 4 - 1];
};
NK_STATIC_ASSERT(sizeof(struct nk_index) == NK_CACHELINE, "nk_index size");

/* Per-socket header in the region. The engine writes: ident, kind, state, addresses,
 * rx_head, tx_tail, rx_eof, rx_err, so_error, rx_stalled. The guest writes: tx_head, rx_tail,
 * rx_ack, kick, locks and the guest-side options. */
struct nk_slot {
  /* line 0: identity (engine) */
  uint64_t inode; /* inode of the guest end of the proxy fd; 0 when free */
  uint32_t gen;   /* bumped by the engine each time the slot is reused */
  uint32_t kind;  /* NK_KIND_* */
  NK_ATOMIC(uint32_t) state;
  uint32_t family; /* AF_INET / AF_INET6 as the application created it */
  uint32_t reserved0[10];
  /* line 1: addresses (engine) */
  struct nk_addr local;
  struct nk_addr peer;
  uint8_t reserved1[16];
  /* lines 2..5: ring indices, each alone on a line, with tx and rx apart */
  struct nk_index tx_head; /* guest produces into tx */
  struct nk_index tx_tail; /* engine consumes from tx */
  struct nk_index rx_head; /* engine produces into rx */
  struct nk_index rx_tail; /* guest consumes from rx */
  /* line 6: readiness and errors (engine) */
  NK_ATOMIC(uint32_t) rx_eof;     /* peer sent FIN (or NSM socket gone) */
  NK_ATOMIC(int32_t) rx_err;      /* errno reported once by recv (ECONNRESET...) */
  NK_ATOMIC(int32_t) so_error;    /* pending SO_ERROR */
  NK_ATOMIC(uint32_t) tx_closed;  /* sending no longer possible: errno (EPIPE...) */
  NK_ATOMIC(uint32_t) rx_stalled; /* engine stopped reading the NSM: kick it when draining */
  NK_ATOMIC(uint32_t) ready_sent; /* ready records sent by the engine (counter) */
  uint32_t reserved2[10];
  /* line 7: guest side */
  NK_ATOMIC(uint32_t) rx_ack; /* ready records consumed by the guest (counter) */
  NK_ATOMIC(uint32_t) kick;   /* guest asks the engine to re-evaluate this socket */
  NK_ATOMIC(uint32_t) tx_lock;
  NK_ATOMIC(uint32_t) rx_lock;
  NK_ATOMIC(uint32_t) async_connect; /* an EINPROGRESS connect not yet reported done */
  uint32_t rcvtimeo_ms;              /* SO_RCVTIMEO, 0 = none */
  uint32_t sndtimeo_ms;              /* SO_SNDTIMEO, 0 = none */
  uint32_t rcvlowat;
  NK_ATOMIC(uint32_t) nonblock; /* O_NONBLOCK of the proxy fd's file description, mirrored */
  NK_ATOMIC(uint32_t) rx_seen;  /* bumped each time the guest looks at the receive ring */
  uint32_t reserved3[6];
};
NK_STATIC_ASSERT(sizeof(struct nk_slot) == 8 * NK_CACHELINE, "nk_slot size");
NK_STATIC_ASSERT(offsetof(struct nk_slot, local) == NK_CACHELINE, "nk_slot.local");
NK_STATIC_ASSERT(offsetof(struct nk_slot, tx_head) == 2 * NK_CACHELINE, "nk_slot.tx_head");
NK_STATIC_ASSERT(offsetof(struct nk_slot, rx_tail) == 5 * NK_CACHELINE, "nk_slot.rx_tail");
NK_STATIC_ASSERT(offsetof(struct nk_slot, rx_eof) == 6 * NK_CACHELINE, "nk_slot.rx_eof");
NK_STATIC_ASSERT(offsetof(struct nk_slot, rx_ack) == 7 * NK_CACHELINE, "nk_slot.rx_ack");

/* Region header, at offset 0 of the tenant's memfd. The slot array follows at slots_off,
 * the rings at rings_off: slot i owns 2*ring_size bytes at rings_off + i*2*ring_size
 * (tx first, then rx). */
struct nk_region {
  uint32_t magic;
  uint32_t version;
  uint32_t nslots;
  uint32_t ring_size;
  uint64_t size; /* total bytes of the region */
  uint64_t slots_off;
  uint64_t rings_off;
  uint32_t tenant_id;
  uint32_t reserved0[5];
  /* line 1: the engine says whether it sleeps; guests ring the eventfd only then */
  NK_ATOMIC(uint32_t) engine_sleeping;
  uint32_t reserved1[15];
  /* line 2: summary word, then the per-slot doorbell bits (guest sets, engine clears) */
  NK_ATOMIC(uint64_t) doorbell_summary;
  uint64_t reserved2[7];
  NK_ATOMIC(uint64_t) doorbell[]; /* NK_DOORBELL_WORDS(nslots) words */
};
NK_STATIC_ASSERT(offsetof(struct nk_region, engine_sleeping) == NK_CACHELINE, "engine_sleeping");
NK_STATIC_ASSERT(offsetof(struct nk_region, doorbell_summary) == 2 * NK_CACHELINE, "summary");
NK_STATIC_ASSERT(offsetof(struct nk_region, doorbell) == 3 * NK_CACHELINE, "doorbell");

/* A UDP datagram in a ring: header, then len payload bytes, then padding to 8 bytes. */
struct nk_dgram {
  uint32_t len;
  uint32_t reserved;
  struct nk_addr addr; /* destination on tx, source on rx */
};
NK_STATIC_ASSERT(sizeof(struct nk_dgram) == 32, "nk_dgram size");
#define NK_DGRAM_MAX 65507u
#define NK_DGRAM_SPACE(len) (sizeof(struct nk_dgram) + (((len) + 7u) & ~7u))

/* ---- Messages on the proxy fd (AF_UNIX SOCK_SEQPACKET, guest end <-> engine end) ---- */

/* engine -> guest: "this socket has something to read" (1 byte), or a new connection on a
 * listener (struct nk_newconn with the new proxy fd attached as SCM_RIGHTS). */
#define NK_MSG_READY 'R'
#define NK_MSG_NEWCONN 'N'
struct nk_newconn {
  uint32_t type; /* NK_MSG_NEWCONN */
  uint32_t slot;
  uint32_t gen;
  uint32_t reserved;
  struct nk_addr peer;
  struct nk_addr local;
};
NK_STATIC_ASSERT(sizeof(struct nk_newconn) == 64, "nk_newconn size");

/* guest -> engine: a blocker record. Its size exceeds a quarter of the guest end's minimal
 * SO_SNDBUF, so while it is queued the kernel reports the guest end unwritable. The engine
 * consumes it when the socket can take data again. */
#define NK_BLOCKER_SIZE 1536u

/* ---- Requests on the per-thread control connection (AF_UNIX SOCK_SEQPACKET) ---- */

#define NK_OP_REGISTER 1    /* reply carries the region memfd and the doorbell eventfd */
#define NK_OP_SOCKET 2      /* carries the engine end of a fresh proxy socketpair */
#define NK_OP_BIND 3
#define NK_OP_LISTEN 4
#define NK_OP_CONNECT 5
#define NK_OP_SHUTDOWN 6
#define NK_OP_SETSOCKOPT 7
#define NK_OP_GETSOCKOPT 8
#define NK_OP_LINGER_CLOSE 9 /* reserved */

#define NK_OPT_MAX 256

struct nk_req {
  uint32_t op;
  uint32_t slot;
  uint32_t gen;
  int32_t arg0; /* SOCKET: domain; LISTEN: backlog; SHUTDOWN: how; *SOCKOPT: level */
  int32_t arg1; /* SOCKET: type (flags masked off); *SOCKOPT: optname */
  int32_t arg2; /* SOCKET: protocol */
  uint32_t optlen;
  uint32_t reserved;
  uint64_t inode; /* SOCKET: inode of the guest end */
  struct nk_addr addr;
  uint8_t optval[NK_OPT_MAX];
};
NK_STATIC_ASSERT(sizeof(struct nk_req) == 64 + NK_OPT_MAX, "nk_req size");

struct nk_rep {
  int32_t err; /* 0 or -errno */
  uint32_t slot;
  uint32_t gen;
  int32_t val; /* CONNECT: 1 when still in progress */
  uint32_t optlen;
  uint32_t reserved[3];
  struct nk_addr addr;
  uint8_t optval[NK_OPT_MAX];
};
NK_STATIC_ASSERT(sizeof(struct nk_rep) == 56 + NK_OPT_MAX, "nk_rep size");

/* REGISTER reply: err, and in optval: */
struct nk_reginfo {
  uint64_t region_size;
  uint32_t tenant_id;
  uint32_t reserved;
  struct nk_addr ipv4;
  struct nk_addr ipv6;
};

#endif
