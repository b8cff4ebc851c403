/* ServiceLib: the interface between the CoreEngine and a network stack that runs in its own
 * process (an "external NSM", such as csrc/nsm/lwip). docs/servicelib.md explains it in
 * prose, with the order of events for each socket call; this header is the contract.
 *
 * Channels
 *  - A control connection: AF_UNIX SOCK_SEQPACKET, the NSM connects to the path the engine
 *    listens on for it (one NSM process at a time). It carries struct nk_sl_ctl messages:
 *    the engine's HELLO (with the queue memfd and two eventfds), and TENANT_ADD (with the
 *    tenant's region memfd) / TENANT_DEL. Its hang-up is how each side learns the other died.
 *  - Three single-producer single-consumer queues of 64-byte queue elements (nqes) in one
 *    shared memfd (struct nk_sl_shared): requests (engine -> NSM), replies (NSM -> engine,
 *    answers to the few synchronous requests) and events (NSM -> engine); in the same memfd,
 *    two byte areas for datagrams (struct nk_sl_area), one each way.
 *  - Doorbells: the engine writes to `nsm_bell` after posting requests while the NSM says it
 *    sleeps, and always after a synchronous one; the NSM writes to `engine_bell` after
 *    posting events while the engine sleeps, and after every reply.
 *
 * Sockets are named by the NSM's ids (`sock`, below NK_SL_MAX_SOCKS). Payload never crosses
 * a queue: the engine tells the NSM where a connection's two byte rings lie in the tenant's
 * region (ATTACH) and then hands out credit in bytes: SEND "n more bytes follow in the
 * transmit ring", RECV "you may write n more bytes into the receive ring". The NSM keeps its
 * own position in each ring and answers with SENT (it took n bytes) and RECVD (it wrote n
 * bytes). It never reads or writes a ring index: those belong to the engine and the tenant.
 *
 * Trust: the engine validates every nqe it reads (opcode, socket id, counts against the
 * credit it gave) and never follows anything in the shared memory as a pointer. An NSM that
 * breaks the protocol is disconnected and treated as dead. The NSM, for its part, must treat
 * the bytes in a tenant's rings as untrusted data.
 *
 * Layout rules as in abi.h: fixed-width fields, offsets not pointers, sizes pinned.
 *
 * Memory order (docs/abi.md lists every pair with both sites):
 *  K1/K2: nk_sl_push() stores head with release after the element; nk_sl_pop() and
 *         nk_sl_empty() load it with acquire, so an nqe is never read before it is written.
 *  K3/K4: nk_sl_pop() stores tail with release after copying the element out; nk_sl_push()
 *         loads it with acquire, so a slot is never overwritten while being read.
 *  A1/A2, A3/A4: the same for a datagram area's head (the producer's store after copying the
 *         bytes in, nk_sl_area_valid()'s load) and tail (the consumer's store after copying
 *         them out, nk_sl_area_room()'s load).
 *  W1/W2: requests while the NSM sleeps: the engine's post() (push, fence, load req.sleeping)
 *         against nk_sl_may_sleep() (store req.sleeping, fence, look at req).
 *  W3/W4: events while the engine sleeps: nk_sl_flush() (push, fence, load evt.sleeping)
 *         against the engine's sleep path (store evt.sleeping, fence, look at evt).
 */
#ifndef NETKERNEL_SERVICELIB_H
#define NETKERNEL_SERVICELIB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "abi.h"

#define NK_SL_MAGIC     0x4e4b534cu /* "NKSL" */
#define NK_SL_VERSION   1
#define NK_SL_QUEUE_LEN 4096u /* nqes per queue, a power of two */
#define NK_SL_MAX_SOCKS 65536u

/* ---- requests: engine -> NSM ---- */
#define NK_SLQ_SOCKET \
  1                      /* sync. tenant, arg = family, arg2 = SOCK_STREAM / SOCK_DGRAM ->
                             reply sock = new id, or arg = -errno */
#define NK_SLQ_BIND    2 /* sync. sock, addr (port 0: pick one) -> reply addr = bound */
#define NK_SLQ_LISTEN  3 /* sync. sock, arg = backlog -> reply arg = 0 / -errno */
#define NK_SLQ_CONNECT 4 /* sync. sock, addr -> reply arg = 0 (then CONNECTED or ERROR) */
#define NK_SLQ_ATTACH \
  5                       /* sock, tenant, off = transmit ring's offset in the region,
                             arg2 = ring size (the receive ring follows the transmit ring),
                             len = transmit ring position of the first byte to take,
                             arg = receive ring position of the first byte to write */
#define NK_SLQ_SEND     6 /* sock, len: len more bytes are in the transmit ring */
#define NK_SLQ_RECV     7 /* sock, len: len more bytes of room in the receive ring */
#define NK_SLQ_SHUTDOWN 8 /* sock: no more bytes after those sent (FIN) */
#define NK_SLQ_CLOSE    9 /* sock, arg = 1 to reset: the engine forgets it; -> FREED */
#define NK_SLQ_SETOPT \
  10 /* sock, arg = level, arg2 = option, len = its int value: an option
                             the application set (SOL_SOCKET / IPPROTO_TCP ints only); the NSM
                             applies what its stack has and ignores the rest */
#define NK_SLQ_SENDTO \
  11 /* sock (a datagram socket), addr (family 0: the connected peer),
                             off = position of the payload in dg_out, len: one datagram */

/* ---- replies (to SOCKET, BIND, LISTEN, CONNECT): NSM -> engine, tag echoed ---- */
#define NK_SLR_DONE 32

/* ---- events: NSM -> engine ---- */
#define NK_SLE_CONNECTED 64 /* sock, addr = local address */
#define NK_SLE_ACCEPTED  65 /* sock = new connection, arg = listener's id, addr = peer */
#define NK_SLE_SENT      66 /* sock, len: took len bytes out of the transmit ring */
#define NK_SLE_RECVD     67 /* sock, len: wrote len bytes into the receive ring */
#define NK_SLE_FIN       68 /* sock: the peer's byte stream ended after the last RECVD */
#define NK_SLE_ERROR     69 /* sock, arg = errno (ECONNRESET, ECONNREFUSED, ETIMEDOUT...) */
#define NK_SLE_FREED     70 /* sock: CLOSE done; the id may be used again */
#define NK_SLE_DGRAM     71 /* sock, addr = source, off = position in dg_in, len: a datagram */

struct nk_nqe {
  uint16_t op;
  uint16_t flags; /* reserved, 0 */
  uint32_t tag;   /* requests that get a reply: echoed in it */
  uint32_t sock;
  int32_t arg;
  uint32_t len;
  uint32_t tenant;
  uint64_t off;
  struct nk_addr addr;
  uint32_t arg2;
  uint32_t reserved;
};
NK_PIN_SIZE(nk_nqe, 64);
NK_PIN_OFFSET(nk_nqe, op, 0);
NK_PIN_OFFSET(nk_nqe, flags, 2);
NK_PIN_OFFSET(nk_nqe, tag, 4);
NK_PIN_OFFSET(nk_nqe, sock, 8);
NK_PIN_OFFSET(nk_nqe, arg, 12);
NK_PIN_OFFSET(nk_nqe, len, 16);
NK_PIN_OFFSET(nk_nqe, tenant, 20);
NK_PIN_OFFSET(nk_nqe, off, 24);
NK_PIN_OFFSET(nk_nqe, addr, 32);
NK_PIN_OFFSET(nk_nqe, arg2, 56);
NK_PIN_OFFSET(nk_nqe, reserved, 60);

/* One queue: the producer owns head, the consumer owns tail (free-running, masked on use).
 * `sleeping` is the consumer's: set before it blocks on its doorbell, re-checked after (W2 for
 * req, W4 for evt; rep's is unused). Each on its own cache line. */
struct nk_sl_queue {
  struct nk_index head;
  struct nk_index tail;
  struct nk_index sleeping;
  struct nk_nqe e[NK_SL_QUEUE_LEN];
};

/* Datagrams travel through these byte areas, not through the tenant's rings: a UDP socket's
 * rings also carry its loopback traffic, which the engine moves itself, so the NSM cannot own
 * a position in them. Producer owns head, consumer tail; a datagram starts where the previous
 * one ended (positions run free, masked on use, a datagram may wrap). Each side checks that an
 * nqe names exactly its next position and a length within what was published. */
#define NK_SL_AREA_SIZE (1u << 20)
struct nk_sl_area {
  struct nk_index head;
  struct nk_index tail;
  uint8_t data[NK_SL_AREA_SIZE];
};

struct nk_sl_shared {
  uint32_t magic;
  uint32_t version;
  uint32_t queue_len;
  uint32_t area_size;
  uint32_t reserved[12];
  struct nk_sl_queue req;   /* engine -> NSM */
  struct nk_sl_queue rep;   /* NSM -> engine */
  struct nk_sl_queue evt;   /* NSM -> engine */
  struct nk_sl_area dg_out; /* engine -> NSM: datagrams to send */
  struct nk_sl_area dg_in;  /* NSM -> engine: datagrams received */
};
#define NK_SL_QUEUE_BYTES (3u * NK_CACHELINE + NK_SL_QUEUE_LEN * 64u)
#define NK_SL_AREA_BYTES  (2u * NK_CACHELINE + NK_SL_AREA_SIZE)
NK_PIN_SIZE(nk_sl_queue, NK_SL_QUEUE_BYTES);
NK_PIN_OFFSET(nk_sl_queue, head, 0);
NK_PIN_OFFSET(nk_sl_queue, tail, NK_CACHELINE);
NK_PIN_OFFSET(nk_sl_queue, sleeping, 2 * NK_CACHELINE);
NK_PIN_OFFSET(nk_sl_queue, e, 3 * NK_CACHELINE);
NK_PIN_SIZE(nk_sl_area, NK_SL_AREA_BYTES);
NK_PIN_OFFSET(nk_sl_area, head, 0);
NK_PIN_OFFSET(nk_sl_area, tail, NK_CACHELINE);
NK_PIN_OFFSET(nk_sl_area, data, 2 * NK_CACHELINE);
NK_PIN_SIZE(nk_sl_shared, NK_CACHELINE + 3 * NK_SL_QUEUE_BYTES + 2 * NK_SL_AREA_BYTES);
NK_PIN_OFFSET(nk_sl_shared, magic, 0);
NK_PIN_OFFSET(nk_sl_shared, version, 4);
NK_PIN_OFFSET(nk_sl_shared, queue_len, 8);
NK_PIN_OFFSET(nk_sl_shared, area_size, 12);
NK_PIN_OFFSET(nk_sl_shared, req, NK_CACHELINE);
NK_PIN_OFFSET(nk_sl_shared, rep, NK_CACHELINE + NK_SL_QUEUE_BYTES);
NK_PIN_OFFSET(nk_sl_shared, evt, NK_CACHELINE + 2 * NK_SL_QUEUE_BYTES);
NK_PIN_OFFSET(nk_sl_shared, dg_out, NK_CACHELINE + 3 * NK_SL_QUEUE_BYTES);
NK_PIN_OFFSET(nk_sl_shared, dg_in, NK_CACHELINE + 3 * NK_SL_QUEUE_BYTES + NK_SL_AREA_BYTES);

/* ---- control messages (SEQPACKET) ---- */
#define NK_SLC_HELLO      1 /* engine -> NSM: fds [shared memfd, nsm_bell, engine_bell] */
#define NK_SLC_TENANT_ADD 2 /* engine -> NSM: fd [region memfd] */
#define NK_SLC_TENANT_DEL 3 /* engine -> NSM */
struct nk_sl_ctl {
  uint32_t op;
  uint32_t version; /* HELLO: NK_SL_VERSION */
  uint32_t tenant;  /* TENANT_*: the tenant's id (as in nqes) */
  uint32_t reserved;
  uint64_t size;             /* HELLO: bytes of the shared memfd; TENANT_ADD: of the region */
  struct nk_addr ipv4, ipv6; /* TENANT_ADD: the addresses the NSM must hold for it */
  char name[64];             /* HELLO: the NSM's name; TENANT_ADD: the tenant's */
};
NK_PIN_SIZE(nk_sl_ctl, 24 + 48 + 64);
NK_PIN_OFFSET(nk_sl_ctl, op, 0);
NK_PIN_OFFSET(nk_sl_ctl, version, 4);
NK_PIN_OFFSET(nk_sl_ctl, tenant, 8);
NK_PIN_OFFSET(nk_sl_ctl, reserved, 12);
NK_PIN_OFFSET(nk_sl_ctl, size, 16);
NK_PIN_OFFSET(nk_sl_ctl, ipv4, 24);
NK_PIN_OFFSET(nk_sl_ctl, ipv6, 48);
NK_PIN_OFFSET(nk_sl_ctl, name, 72);

/* Queue helpers for either side. Push: false when full. Pop: false when empty.
 * Push: K4, the acquire load of tail, pairs with K3 in nk_sl_pop(); K1, the release store of
 * head after the element, pairs with K2 in nk_sl_pop() and nk_sl_empty(). Head is our own
 * index (relaxed). */
static inline bool nk_sl_push(struct nk_sl_queue *q, const struct nk_nqe *e) {
  uint32_t head = atomic_load_explicit(&q->head.v, memory_order_relaxed);
  uint32_t tail = atomic_load_explicit(&q->tail.v, memory_order_acquire);
  if (head - tail >= NK_SL_QUEUE_LEN) return false;
  q->e[head & (NK_SL_QUEUE_LEN - 1)] = *e;
  atomic_store_explicit(&q->head.v, head + 1, memory_order_release);
  return true;
}

/* Copies the element out before releasing the slot: the producer may reuse it at once, and
 * the reader must look at its own copy only (the other side can still write the queue).
 * K2: the acquire load of head pairs with K1 in nk_sl_push(); K3: the release store of tail
 * after the copy pairs with K4 in nk_sl_push(). Tail is our own index (relaxed). */
static inline bool nk_sl_pop(struct nk_sl_queue *q, struct nk_nqe *out) {
  uint32_t tail = atomic_load_explicit(&q->tail.v, memory_order_relaxed);
  uint32_t head = atomic_load_explicit(&q->head.v, memory_order_acquire);
  if (head == tail) return false;
  *out = q->e[tail & (NK_SL_QUEUE_LEN - 1)];
  atomic_store_explicit(&q->tail.v, tail + 1, memory_order_release);
  return true;
}

/* Producer: room for len more bytes? Then copy them in at head (not yet published), and
 * publish with A1, a release store of head (nk_sl_dgram_post(), the engine's ext_send_dgram()).
 * A4: the acquire load of tail pairs with A3, the consumer's release store of tail after its
 * copy (nk_sl_dgram_take(), the engine's dgram_in()). */
static inline uint32_t nk_sl_area_room(struct nk_sl_area *a) {
  uint32_t tail = atomic_load_explicit(&a->tail.v, memory_order_acquire);
  uint32_t used = atomic_load_explicit(&a->head.v, memory_order_relaxed) - tail;
  return used > NK_SL_AREA_SIZE ? 0 : NK_SL_AREA_SIZE - used;
}

static inline void nk_sl_area_copy_in(struct nk_sl_area *a, uint32_t pos, const void *src,
                                      uint32_t len) {
  uint32_t off = pos & (NK_SL_AREA_SIZE - 1), first = NK_SL_AREA_SIZE - off;
  if (first > len) first = len;
  memcpy(a->data + off, src, first);
  memcpy(a->data, (const uint8_t *)src + first, len - first);
}

static inline void nk_sl_area_copy_out(const struct nk_sl_area *a, uint32_t pos, void *dst,
                                       uint32_t len) {
  uint32_t off = pos & (NK_SL_AREA_SIZE - 1), first = NK_SL_AREA_SIZE - off;
  if (first > len) first = len;
  memcpy(dst, a->data + off, first);
  memcpy((uint8_t *)dst + first, a->data, len - first);
}

/* Consumer: true when a datagram at `pos` of `len` bytes is exactly the next one published.
 * A2: the acquire load of head pairs with A1 (see nk_sl_area_room()). Then copy it out and
 * free it with A3. */
static inline bool nk_sl_area_valid(struct nk_sl_area *a, uint64_t pos, uint32_t len) {
  uint32_t tail = atomic_load_explicit(&a->tail.v, memory_order_relaxed);
  uint32_t head = atomic_load_explicit(&a->head.v, memory_order_acquire);
  return pos == tail && len <= head - tail && len <= 65535u;
}

/* Consumer: K2, as in nk_sl_pop() (W2 looks at req with it). */
static inline bool nk_sl_empty(struct nk_sl_queue *q) {
  return atomic_load_explicit(&q->head.v, memory_order_acquire) ==
         atomic_load_explicit(&q->tail.v, memory_order_relaxed);
}

/* ---- the NSM's side: a small library (csrc/servicelib/servicelib.c, libnetkernel-sl.a) ----
 *
 * A stack links it, connects, and then runs a loop of its own: poll nk_sl_fds() together with
 * its other descriptors (a TAP device...), call nk_sl_dispatch() when they are readable (or
 * while it spins), and nk_sl_flush() once per batch. Requests arrive through the handler;
 * events and replies go out with nk_sl_event() / nk_sl_reply(). */
struct nk_sl;

/* nk_sl_tenant, nk_sl_handlers and nk_sl_stream live in the NSM's own memory (pointers
 * included): API, not shared layout, so no pins. */
struct nk_sl_tenant {
  uint32_t id;
  char name[64];
  uint8_t *base; /* the region, mapped read-write */
  uint64_t size;
  struct nk_addr ipv4, ipv6;
  void *user; /* for the stack */
};

struct nk_sl_handlers {
  void (*tenant_add)(void *ctx, struct nk_sl_tenant *t);
  void (*tenant_del)(void *ctx, struct nk_sl_tenant *t); /* before the unmap */
  void (*request)(void *ctx, const struct nk_nqe *e);
};

/* Connects to the engine's socket for this NSM and waits for its HELLO. NULL with errno set
 * and a reason in err. */
struct nk_sl *nk_sl_connect(const char *path, char *err, size_t errlen);
void nk_sl_close(struct nk_sl *sl);
/* Descriptors to wait on: the control connection and the request doorbell. */
void nk_sl_fds(const struct nk_sl *sl, int *ctl, int *bell);
/* Handles control messages and up to `max` requests. Returns requests handled, or -1 when
 * the engine is gone (the stack should exit: its sockets are the engine's). */
int nk_sl_dispatch(struct nk_sl *sl, const struct nk_sl_handlers *h, void *ctx, int max);
/* Before blocking in poll(): true when it may block (nothing arrived since). Then call
 * nk_sl_awake() after poll() returns. */
bool nk_sl_may_sleep(struct nk_sl *sl);
void nk_sl_awake(struct nk_sl *sl);
void nk_sl_event(struct nk_sl *sl, const struct nk_nqe *e); /* queued locally when full */
void nk_sl_reply(struct nk_sl *sl, const struct nk_nqe *req, uint32_t sock, int32_t arg,
                 const struct nk_addr *addr);
void nk_sl_flush(struct nk_sl *sl); /* rings the engine's doorbell when it sleeps */
/* The datagram areas (see struct nk_sl_area): read a SENDTO's payload out of dg_out and free
 * its space (false, and nothing freed, when the nqe does not name the next datagram: the
 * engine broke the protocol); post a received datagram (false: dropped, no room or larger
 * than NK_DGRAM_MAX). */
bool nk_sl_dgram_take(struct nk_sl *sl, const struct nk_nqe *e, void *dst);
bool nk_sl_dgram_post(struct nk_sl *sl, uint32_t sock, const struct nk_addr *src, const void *data,
                      uint32_t len);
struct nk_sl_tenant *nk_sl_tenant(struct nk_sl *sl, uint32_t id);

/* One connection's two rings, as ATTACH describes them. The stack keeps this per socket and
 * moves bytes only through these helpers, which never leave the ranges the engine gave. */
struct nk_sl_stream {
  uint8_t *tx, *rx;
  uint32_t size;
  uint32_t tx_pos, tx_avail;  /* next byte to take; bytes offered by SEND, not yet taken */
  uint32_t rx_pos, rx_credit; /* next byte to write; room granted by RECV, not yet used */
};
/* false when the rings are not inside the tenant's region. */
bool nk_sl_stream_attach(struct nk_sl *sl, struct nk_sl_stream *s, const struct nk_nqe *e);
/* The next contiguous run of offered bytes (at most max): pointer and length. */
uint32_t nk_sl_tx_peek(const struct nk_sl_stream *s, const uint8_t **p, uint32_t max);
void nk_sl_tx_took(struct nk_sl_stream *s, uint32_t n);
/* The next contiguous run of granted room (at most max). */
uint32_t nk_sl_rx_room(const struct nk_sl_stream *s, uint8_t **p, uint32_t max);
void nk_sl_rx_wrote(struct nk_sl_stream *s, uint32_t n);

#endif
