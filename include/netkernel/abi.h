/* NetKernel shared ABI: the tenant region, per-socket rings and the messages that cross
 * between GuestLib (in tenant processes) and the CoreEngine.
 *
 * Contract:
 *  - Everything in the region is writable by every process of the tenant. The engine reads
 *    each field once, validates it and never follows it as a pointer (DESIGN §D). GuestLib
 *    trusts what the engine writes.
 *  - Offsets, never pointers. Fixed-width fields. The size of every struct here and the
 *    offset of every field are pinned by static asserts: changing one is an ABI change and
 *    needs NK_ABI_VERSION bumped.
 *  - Ring indices are free-running uint32_t, masked on use; ring sizes are powers of two.
 *    Each index has one writer: the producer of that ring owns head, the consumer owns tail.
 *
 * Python reads the NK_* integer constants from this file at build time (tools/gen_abi.py),
 * so the two cannot drift. docs/abi.md describes the layout and the memory-order pairs.
 */
#ifndef NETKERNEL_ABI_H
#define NETKERNEL_ABI_H

#include <stddef.h>
#include <stdint.h>

/* C++ may include this header for the layouts (ring.h, addr.h and servicelib.h are C11 only):
 * there the atomic fields are plain integers of the same size, and the layout pins are
 * static_assert, since C++ has no _Static_assert. */
#ifdef __cplusplus
#define NK_ATOMIC(t)                t
#define NK_STATIC_ASSERT(cond, msg) static_assert(cond, msg)
#else
#include <stdatomic.h>
#define NK_ATOMIC(t)                _Atomic t
#define NK_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#endif
/* The pins: a shared struct's size, and the offset of each of its fields. */
#define NK_PIN_SIZE(s, size)     NK_STATIC_ASSERT(sizeof(struct s) == (size), #s " size")
#define NK_PIN_OFFSET(s, f, off) NK_STATIC_ASSERT(offsetof(struct s, f) == (off), #s "." #f)

#define NK_REGION_MAGIC 0x4e4b5247u /* "NKRG" */
#define NK_ABI_VERSION  3
#define NK_CACHELINE    64

#define NK_DEFAULT_RING_SIZE (1024u * 1024u) /* bytes per direction per socket */
/* Sockets per tenant region. The slot array and the rings are reserved for all of them but
 * committed only where used (the memfd is sparse): the table costs address space, not memory,
 * and the tenant's policy (max_sockets, max_memory) is what bounds it. 64 short of 2^17 so
 * that the whole region (rings, slot array, header) fits in 256 GiB: a VM tenant's guest sees
 * it as a PCI BAR, which must be a power of two, and QEMU's guests are given 256 GiB BARs but
 * not 512 GiB ones. */
#define NK_DEFAULT_SLOTS          131008u
#define NK_DOORBELL_WORDS(nslots) (((nslots) + 63u) / 64u)
#define NK_MAX_SLOTS              (1u << 20)

/* Boolean options that a stream socket is given before it has a kernel socket (before its
 * bind, connect or listen), as most clients set TCP_NODELAY and servers SO_REUSEADDR: GuestLib
 * records them in nk_slot.preopts instead of asking the engine (a round trip fewer per
 * connection), and the engine takes them before it acts on any request for the socket. Bit i:
 * option i was given; bit NK_PREOPT_VALUE + i: its value was non-zero. netkernel/preopt.h maps
 * them to their levels and names. */
#define NK_PREOPT_REUSEADDR 0
#define NK_PREOPT_REUSEPORT 1
#define NK_PREOPT_KEEPALIVE 2
#define NK_PREOPT_NODELAY   3
#define NK_PREOPT_COUNT     4
#define NK_PREOPT_VALUE     16

/* Socket kinds stored in nk_slot.kind. */
#define NK_KIND_FREE     0
#define NK_KIND_STREAM   1
#define NK_KIND_DGRAM    2
#define NK_KIND_LISTENER 3

/* Connection states stored in nk_slot.state (engine-written, informational for the guest). */
#define NK_ST_NEW        0
#define NK_ST_BOUND      1
#define NK_ST_LISTEN     2
#define NK_ST_CONNECTING 3
#define NK_ST_CONNECTED  4
#define NK_ST_CLOSED     5

/* An address as it crosses the ABI: no struct sockaddr, whose size depends on the family. */
struct nk_addr {
  uint16_t family; /* AF_INET or AF_INET6, 0 = none */
  uint16_t port;   /* network byte order */
  uint32_t scope_id;
  uint8_t addr[16]; /* IPv4 in the first 4 bytes */
};
NK_PIN_SIZE(nk_addr, 24);
NK_PIN_OFFSET(nk_addr, family, 0);
NK_PIN_OFFSET(nk_addr, port, 2);
NK_PIN_OFFSET(nk_addr, scope_id, 4);
NK_PIN_OFFSET(nk_addr, addr, 8);

/* One index on its own cache line (DPDK rte_ring layout). */
struct nk_index {
  NK_ATOMIC(uint32_t) v;
  uint32_t pad[NK_CACHELINE / 4 - 1];
};
NK_PIN_SIZE(nk_index, NK_CACHELINE);
NK_PIN_OFFSET(nk_index, v, 0);

/* Per-socket header in the region. The engine writes lines 0, 1 and 6 (identity, state,
 * addresses, the end flags, rx_stalled, ready_sent) and the indices it owns, rx_head and
 * tx_tail. The guest writes tx_head, rx_tail and line 7 (rx_ack, rx_seen, kick, the locks,
 * async_connect, the options it mirrors and preopts). Four fields have a second writer: the
 * guest clears rx_err and so_error when it reports them (Linux's one pending error), and the
 * engine clears kick when it serves the socket and preopts when it takes them. docs/abi.md
 * lists the memory-order pairs. */
struct nk_slot {
  /* line 0: identity (engine) */
  uint64_t inode; /* inode of the guest end of the proxy fd; 0 when free */
  uint32_t gen;   /* bumped by the engine each time the slot is reused */
  uint32_t kind;  /* NK_KIND_* */
  NK_ATOMIC(uint32_t) state;
  uint32_t family; /* AF_INET / AF_INET6 as the application created it */
  /* The rings' sizes when not the region's ring_size (0): a stream socket's, from the
   * SO_SNDBUF / SO_RCVBUF its program set, written before the state that lets bytes move. */
  uint32_t tx_size, rx_size;
  uint32_t reserved0[8];
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
  /* A listener whose tenant may not open one more socket: the errno accept() reports (EMFILE
   * or ENOBUFS) while its connections wait in the stack, 0 otherwise. */
  NK_ATOMIC(int32_t) accept_err;
  /* A stream socket whose connect failed, its proxy hung up: Linux lets the socket connect
   * again, so GuestLib's next connect() brings a new proxy first (NK_OP_RENEW). */
  NK_ATOMIC(uint32_t) renew;
  uint32_t reserved2[8];
  /* line 7: guest side */
  NK_ATOMIC(uint32_t) rx_ack; /* ready records consumed by the guest (counter) */
  NK_ATOMIC(uint32_t) kick;   /* set with the doorbell bit (which is what the engine acts on) */
  NK_ATOMIC(uint32_t) tx_lock;
  NK_ATOMIC(uint32_t) rx_lock;
  NK_ATOMIC(uint32_t) async_connect; /* an EINPROGRESS connect not yet reported done */
  uint32_t rcvtimeo_ms;              /* SO_RCVTIMEO, 0 = none */
  uint32_t sndtimeo_ms;              /* SO_SNDTIMEO, 0 = none */
  uint32_t rcvlowat;
  NK_ATOMIC(uint32_t) nonblock; /* O_NONBLOCK of the proxy fd's file description, mirrored */
  NK_ATOMIC(uint32_t) rx_seen;  /* bumped each time the guest looks at the receive ring */
  NK_ATOMIC(uint32_t)
  preopts; /* options given before the socket had a kernel socket (NK_PREOPT_*) */
  uint32_t reserved3[5];
};
NK_PIN_SIZE(nk_slot, 8 * NK_CACHELINE);
NK_PIN_OFFSET(nk_slot, inode, 0);
NK_PIN_OFFSET(nk_slot, gen, 8);
NK_PIN_OFFSET(nk_slot, kind, 12);
NK_PIN_OFFSET(nk_slot, state, 16);
NK_PIN_OFFSET(nk_slot, family, 20);
NK_PIN_OFFSET(nk_slot, tx_size, 24);
NK_PIN_OFFSET(nk_slot, rx_size, 28);
NK_PIN_OFFSET(nk_slot, local, NK_CACHELINE);
NK_PIN_OFFSET(nk_slot, peer, NK_CACHELINE + 24);
NK_PIN_OFFSET(nk_slot, tx_head, 2 * NK_CACHELINE);
NK_PIN_OFFSET(nk_slot, tx_tail, 3 * NK_CACHELINE);
NK_PIN_OFFSET(nk_slot, rx_head, 4 * NK_CACHELINE);
NK_PIN_OFFSET(nk_slot, rx_tail, 5 * NK_CACHELINE);
NK_PIN_OFFSET(nk_slot, rx_eof, 6 * NK_CACHELINE);
NK_PIN_OFFSET(nk_slot, rx_err, 6 * NK_CACHELINE + 4);
NK_PIN_OFFSET(nk_slot, so_error, 6 * NK_CACHELINE + 8);
NK_PIN_OFFSET(nk_slot, tx_closed, 6 * NK_CACHELINE + 12);
NK_PIN_OFFSET(nk_slot, rx_stalled, 6 * NK_CACHELINE + 16);
NK_PIN_OFFSET(nk_slot, ready_sent, 6 * NK_CACHELINE + 20);
NK_PIN_OFFSET(nk_slot, accept_err, 6 * NK_CACHELINE + 24);
NK_PIN_OFFSET(nk_slot, renew, 6 * NK_CACHELINE + 28);
NK_PIN_OFFSET(nk_slot, rx_ack, 7 * NK_CACHELINE);
NK_PIN_OFFSET(nk_slot, kick, 7 * NK_CACHELINE + 4);
NK_PIN_OFFSET(nk_slot, tx_lock, 7 * NK_CACHELINE + 8);
NK_PIN_OFFSET(nk_slot, rx_lock, 7 * NK_CACHELINE + 12);
NK_PIN_OFFSET(nk_slot, async_connect, 7 * NK_CACHELINE + 16);
NK_PIN_OFFSET(nk_slot, rcvtimeo_ms, 7 * NK_CACHELINE + 20);
NK_PIN_OFFSET(nk_slot, sndtimeo_ms, 7 * NK_CACHELINE + 24);
NK_PIN_OFFSET(nk_slot, rcvlowat, 7 * NK_CACHELINE + 28);
NK_PIN_OFFSET(nk_slot, nonblock, 7 * NK_CACHELINE + 32);
NK_PIN_OFFSET(nk_slot, rx_seen, 7 * NK_CACHELINE + 36);
NK_PIN_OFFSET(nk_slot, preopts, 7 * NK_CACHELINE + 40);

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
  /* Slots at and above this were never handed out (engine-written, only grows): a guest
   * looking for a slot scans below it instead of faulting in the whole slot array. */
  NK_ATOMIC(uint32_t) slots_hwm;
  uint32_t reserved0[4];
  /* line 1: the engine says whether it sleeps; guests ring the eventfd only then (the first
   * to see it set clears it, so one write wakes it) */
  NK_ATOMIC(uint32_t) engine_sleeping;
  uint32_t reserved1[15];
  /* line 2: summary word, then the per-slot doorbell bits (guest sets, engine clears). Summary
   * bit b stands for the words w with w % 64 == b, so the engine reads only those. */
  NK_ATOMIC(uint64_t) doorbell_summary;
  uint64_t reserved2[7];
  NK_ATOMIC(uint64_t) doorbell[]; /* NK_DOORBELL_WORDS(nslots) words */
};
NK_PIN_SIZE(nk_region, 3 * NK_CACHELINE);
NK_PIN_OFFSET(nk_region, magic, 0);
NK_PIN_OFFSET(nk_region, version, 4);
NK_PIN_OFFSET(nk_region, nslots, 8);
NK_PIN_OFFSET(nk_region, ring_size, 12);
NK_PIN_OFFSET(nk_region, size, 16);
NK_PIN_OFFSET(nk_region, slots_off, 24);
NK_PIN_OFFSET(nk_region, rings_off, 32);
NK_PIN_OFFSET(nk_region, tenant_id, 40);
NK_PIN_OFFSET(nk_region, slots_hwm, 44);
NK_PIN_OFFSET(nk_region, engine_sleeping, NK_CACHELINE);
NK_PIN_OFFSET(nk_region, doorbell_summary, 2 * NK_CACHELINE);
NK_PIN_OFFSET(nk_region, doorbell, 3 * NK_CACHELINE);

/* A UDP datagram in a ring: header, then cmsg_len bytes of control messages padded to 8
 * bytes, then len payload bytes padded to 8 bytes. The control messages are laid out as the
 * kernel's (struct cmsghdr, CMSG_ALIGN), of the kinds a program may give sendmsg() or ask
 * recvmsg() for on a UDP socket: on rx IP_TTL, IP_TOS, IP_PKTINFO, IPV6_HOPLIMIT,
 * IPV6_TCLASS, IPV6_PKTINFO; on tx IP_TTL, IP_TOS, IPV6_HOPLIMIT, IPV6_TCLASS. */
struct nk_dgram {
  uint32_t len;
  uint16_t cmsg_len; /* at most NK_DGRAM_CMSG_MAX */
  uint16_t reserved;
  struct nk_addr addr; /* destination on tx, source on rx */
};
NK_PIN_SIZE(nk_dgram, 32);
NK_PIN_OFFSET(nk_dgram, len, 0);
NK_PIN_OFFSET(nk_dgram, cmsg_len, 4);
NK_PIN_OFFSET(nk_dgram, reserved, 6);
NK_PIN_OFFSET(nk_dgram, addr, 8);
#define NK_DGRAM_MAX      65507u
#define NK_DGRAM_CMSG_MAX 192u
#define NK_DGRAM_SPACE_CMSG(len, cmsg_len) \
  (sizeof(struct nk_dgram) + (((cmsg_len) + 7u) & ~7u) + (((len) + 7u) & ~7u))
#define NK_DGRAM_SPACE(len) NK_DGRAM_SPACE_CMSG(len, 0u)

/* ---- Messages on the proxy fd (AF_UNIX SOCK_SEQPACKET, guest end <-> engine end) ---- */

/* engine -> guest: "this socket has something to read" (1 byte), or a new connection on a
 * listener (struct nk_newconn with the new proxy fd attached as SCM_RIGHTS). On a listener a
 * READY record means "look at accept_err": accept() reports it, and rings the doorbell so
 * that the engine looks again once it is consumed. */
#define NK_MSG_READY   'R'
#define NK_MSG_NEWCONN 'N'
struct nk_newconn {
  uint32_t type; /* NK_MSG_NEWCONN */
  uint32_t slot;
  uint32_t gen;
  uint32_t reserved;
  struct nk_addr peer;
  struct nk_addr local;
};
NK_PIN_SIZE(nk_newconn, 64);
NK_PIN_OFFSET(nk_newconn, type, 0);
NK_PIN_OFFSET(nk_newconn, slot, 4);
NK_PIN_OFFSET(nk_newconn, gen, 8);
NK_PIN_OFFSET(nk_newconn, reserved, 12);
NK_PIN_OFFSET(nk_newconn, peer, 16);
NK_PIN_OFFSET(nk_newconn, local, 40);

/* guest -> engine: a blocker record. Its size exceeds a quarter of the guest end's minimal
 * SO_SNDBUF, so while it is queued the kernel reports the guest end unwritable. The engine
 * consumes it when the socket can take data again. */
#define NK_BLOCKER_SIZE 1536u

/* ---- Requests on the per-thread control connection (AF_UNIX SOCK_SEQPACKET) ---- */

#define NK_OP_REGISTER     1 /* reply carries the region memfd and the doorbell eventfd */
#define NK_OP_SOCKET       2 /* carries the engine end of a fresh proxy socketpair */
#define NK_OP_BIND         3
#define NK_OP_LISTEN       4
#define NK_OP_CONNECT      5
#define NK_OP_SHUTDOWN     6
#define NK_OP_SETSOCKOPT   7
#define NK_OP_GETSOCKOPT   8
#define NK_OP_LINGER_CLOSE 9 /* reserved */
/* A stream socket whose connect failed (slot's renew set), with the engine end of a fresh
 * proxy socketpair: the reply names a new socket that inherits the old one's options and
 * bind. The old slot stays the old proxy's until its guest end is gone. */
#define NK_OP_RENEW 10
/* A connected stream socket and, as SCM_RIGHTS, a connected TCP socket of the tenant's (the
 * relay's end of a program's connection in the tenant's namespace): from now on the engine
 * moves the socket's bytes to and from that TCP socket itself, in place of GuestLib, and
 * lets go of the proxy. */
#define NK_OP_ATTACH 11

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
  uint64_t inode; /* SOCKET, RENEW: inode of the guest end */
  struct nk_addr addr;
  uint8_t optval[NK_OPT_MAX];
};
NK_PIN_SIZE(nk_req, 64 + NK_OPT_MAX);
NK_PIN_OFFSET(nk_req, op, 0);
NK_PIN_OFFSET(nk_req, slot, 4);
NK_PIN_OFFSET(nk_req, gen, 8);
NK_PIN_OFFSET(nk_req, arg0, 12);
NK_PIN_OFFSET(nk_req, arg1, 16);
NK_PIN_OFFSET(nk_req, arg2, 20);
NK_PIN_OFFSET(nk_req, optlen, 24);
NK_PIN_OFFSET(nk_req, reserved, 28);
NK_PIN_OFFSET(nk_req, inode, 32);
NK_PIN_OFFSET(nk_req, addr, 40);
NK_PIN_OFFSET(nk_req, optval, 64);

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
NK_PIN_SIZE(nk_rep, 56 + NK_OPT_MAX);
NK_PIN_OFFSET(nk_rep, err, 0);
NK_PIN_OFFSET(nk_rep, slot, 4);
NK_PIN_OFFSET(nk_rep, gen, 8);
NK_PIN_OFFSET(nk_rep, val, 12);
NK_PIN_OFFSET(nk_rep, optlen, 16);
NK_PIN_OFFSET(nk_rep, reserved, 20);
NK_PIN_OFFSET(nk_rep, addr, 32);
NK_PIN_OFFSET(nk_rep, optval, 56);

/* REGISTER reply: err, and in optval: */
struct nk_reginfo {
  uint64_t region_size;
  uint32_t tenant_id;
  uint32_t reserved;
  struct nk_addr ipv4;
  struct nk_addr ipv6;
};
NK_PIN_SIZE(nk_reginfo, 64);
NK_STATIC_ASSERT(sizeof(struct nk_reginfo) <= NK_OPT_MAX, "nk_reginfo fits in nk_rep.optval");
NK_PIN_OFFSET(nk_reginfo, region_size, 0);
NK_PIN_OFFSET(nk_reginfo, tenant_id, 8);
NK_PIN_OFFSET(nk_reginfo, reserved, 12);
NK_PIN_OFFSET(nk_reginfo, ipv4, 16);
NK_PIN_OFFSET(nk_reginfo, ipv6, 40);

#endif
