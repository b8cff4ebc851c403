/* Single-producer single-consumer byte ring over shared memory.
 *
 * Contract: one producer and one consumer at a time (callers serialise several threads or
 * processes with the slot's tx_lock/rx_lock). The producer owns *head, the consumer owns
 * *tail; each only reads the other's index. Indices run free and are masked on use, so
 * head - tail is the fill level even across wrap-around. size is a power of two.
 *
 * Memory order:
 *  P1: the producer stores head with release after copying data; pairs with C0 (consumer's
 *      acquire load of head), so the consumer never sees an index ahead of the bytes.
 *  C1: the consumer stores tail with release after copying data out; pairs with P0 (the
 *      producer's acquire load of tail), so the producer never overwrites unread bytes.
 *  The loads of one's own index are relaxed: only this side writes it. docs/abi.md lists
 *  these pairs with every other one of the protocol. Callers that copy into the ring
 *  themselves (nk_ring_copy_in(), nk_ring_iov()) publish with nk_ring_produce() (P1) after the
 *  copy, and consume with nk_ring_consume() (C1) after copying out.
 *
 * The engine uses nk_ring_fill_checked(): a fill level above size means the tenant wrote
 * garbage into an index it owns, and the engine then resets that socket.
 */
#ifndef NETKERNEL_RING_H
#define NETKERNEL_RING_H

#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#include "abi.h"

/* One process's handle on a ring: pointers into its own mapping, never shared (the shared
 * parts, the indices and the bytes, are laid out in abi.h). */
struct nk_ring {
  uint8_t *data;
  uint32_t size; /* power of two */
  NK_ATOMIC(uint32_t) * head;
  NK_ATOMIC(uint32_t) * tail;
};

static inline void nk_ring_init(struct nk_ring *r, void *data, uint32_t size, struct nk_index *head,
                                struct nk_index *tail) {
  r->data = (uint8_t *)data;
  r->size = size;
  r->head = &head->v;
  r->tail = &tail->v;
}

/* Bytes readable; for the consumer. C0: acquire, pairs with P1. */
static inline uint32_t nk_ring_fill(const struct nk_ring *r) {
  uint32_t head = atomic_load_explicit(r->head, memory_order_acquire);
  uint32_t tail = atomic_load_explicit(r->tail, memory_order_relaxed); /* own index */
  return head - tail;
}

/* Bytes writable; for the producer. P0: acquire, pairs with C1. */
static inline uint32_t nk_ring_space(const struct nk_ring *r) {
  uint32_t tail = atomic_load_explicit(r->tail, memory_order_acquire);
  uint32_t head = atomic_load_explicit(r->head, memory_order_relaxed); /* own index */
  return r->size - (head - tail);
}

/* Fill level as the engine sees it, where the other side is untrusted: returns -1 when the
 * indices are inconsistent. Both loads acquire, C0 and P0 at once: the engine may be either
 * side. */
static inline int64_t nk_ring_fill_checked(const struct nk_ring *r) {
  uint32_t head = atomic_load_explicit(r->head, memory_order_acquire);
  uint32_t tail = atomic_load_explicit(r->tail, memory_order_acquire);
  uint32_t fill = head - tail;
  if (fill > r->size) return -1;
  return fill;
}

/* Copy len bytes in at the producer's head without publishing (caller checked space). */
static inline void nk_ring_copy_in(struct nk_ring *r, uint32_t at, const void *src, uint32_t len) {
  uint32_t off = at & (r->size - 1);
  uint32_t first = r->size - off;
  if (first > len) first = len;
  memcpy(r->data + off, src, first);
  if (len > first) memcpy(r->data, (const uint8_t *)src + first, len - first);
}

/* Copy len bytes out from position at (caller checked fill) without consuming. */
static inline void nk_ring_copy_out(const struct nk_ring *r, uint32_t at, void *dst, uint32_t len) {
  uint32_t off = at & (r->size - 1);
  uint32_t first = r->size - off;
  if (first > len) first = len;
  memcpy(dst, r->data + off, first);
  if (len > first) memcpy((uint8_t *)dst + first, r->data, len - first);
}

/* Up to two iovecs describing len bytes starting at position at. Returns the iovec count. */
static inline int nk_ring_iov(const struct nk_ring *r, uint32_t at, uint32_t len,
                              struct iovec iov[2]) {
  uint32_t off = at & (r->size - 1);
  uint32_t first = r->size - off;
  if (len == 0) return 0;
  if (first >= len) {
    iov[0].iov_base = r->data + off;
    iov[0].iov_len = len;
    return 1;
  }
  iov[0].iov_base = r->data + off;
  iov[0].iov_len = first;
  iov[1].iov_base = r->data;
  iov[1].iov_len = len - first;
  return 2;
}

/* P1: publish head after the bytes are in place. */
static inline void nk_ring_produce(struct nk_ring *r, uint32_t len) {
  uint32_t head = atomic_load_explicit(r->head, memory_order_relaxed); /* own index */
  atomic_store_explicit(r->head, head + len, memory_order_release);
}

/* C1: publish tail after the bytes were copied out. */
static inline void nk_ring_consume(struct nk_ring *r, uint32_t len) {
  uint32_t tail = atomic_load_explicit(r->tail, memory_order_relaxed); /* own index */
  atomic_store_explicit(r->tail, tail + len, memory_order_release);
}

/* Producer convenience: write up to len bytes, return bytes written. */
static inline uint32_t nk_ring_write(struct nk_ring *r, const void *src, uint32_t len) {
  uint32_t space = nk_ring_space(r);
  if (len > space) len = space;
  if (len == 0) return 0;
  nk_ring_copy_in(r, atomic_load_explicit(r->head, memory_order_relaxed), src, len);
  nk_ring_produce(r, len);
  return len;
}

/* Consumer convenience: read up to len bytes, return bytes read. */
static inline uint32_t nk_ring_read(struct nk_ring *r, void *dst, uint32_t len) {
  uint32_t fill = nk_ring_fill(r);
  if (len > fill) len = fill;
  if (len == 0) return 0;
  nk_ring_copy_out(r, atomic_load_explicit(r->tail, memory_order_relaxed), dst, len);
  nk_ring_consume(r, len);
  return len;
}

#endif
