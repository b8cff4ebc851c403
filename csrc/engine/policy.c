/* Operator policy, enforced where every tenant byte passes: rate limits per tenant and
 * direction, weighted sharing of an NSM's uplink between tenants, and admission limits.
 *
 * Rates are token buckets in bytes of payload. Sharing is by tenant, not by flow: each
 * tenant has a virtual time (bytes moved / weight) per direction, and a tenant may use the
 * link's tokens only while its virtual time is not ahead of the slowest backlogged tenant's
 * by more than a slack. A tenant with eight connections therefore gets what a tenant with one
 * gets at equal weight. The engine keeps the link's queue empty by sending below the
 * operator's bandwidth figure (NK_LINK_SHARE), so the kernel's per-flow TCP dynamics at the
 * bottleneck never get to decide the shares.
 *
 * A socket that must wait is put on engine.throttled with the time its tokens will be there; the
 * main loop sleeps until the earliest such time (nothing spins while throttled).
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>

#include "engine.h"

#define NK_BURST_MIN      (64u * 1024u)
#define NK_BURST_NS       2000000ull /* 2 ms of the rate */
#define NK_LINK_SHARE     0.92       /* payload budget: leaves room for TCP/IP/Ethernet headers */
#define NK_SLACK          (256.0 * 1024.0) /* virtual-time lead (bytes at weight 1) still allowed */
#define NK_BACKLOG_NS     20000000ull      /* a tenant that asked within 20 ms is backlogged */
#define NK_FAIR_RETRY_NS  200000ull        /* an ineligible tenant looks again after 0.2 ms */
#define NK_REFUSAL_LOG_NS 1000000000ull

void nk_bucket_set(struct nk_bucket *b, uint64_t rate) {
  b->rate = rate;
  uint64_t burst = rate * NK_BURST_NS / 1000000000ull;
  b->burst = burst > NK_BURST_MIN ? burst : NK_BURST_MIN;
  b->tokens = (double)b->burst;
  b->last_ns = nk_now_ns();
}

double nk_bucket_refill(struct nk_bucket *b, uint64_t now) {
  if (now > b->last_ns) {
    /* Above the burst only by a late wake's credit (late_wake), kept until it is spent. */
    double cap = b->tokens > (double)b->burst ? b->tokens : (double)b->burst;
    b->tokens += (double)(now - b->last_ns) * (double)b->rate / 1e9;
    if (b->tokens > cap) b->tokens = cap;
    b->last_ns = now;
  }
  return b->tokens;
}

/* Nanoseconds until the bucket holds need bytes. */
uint64_t nk_bucket_wait(const struct nk_bucket *b, uint64_t need) {
  if (b->tokens >= (double)need) return 0;
  return (uint64_t)(((double)need - b->tokens) * 1e9 / (double)b->rate) + 1000;
}

void nk_tenant_set_rate(struct nk_tenant *t, int dir, uint64_t bits_per_s) {
  t->rate[dir] = bits_per_s / 8;
  nk_bucket_set(&t->bucket[dir], t->rate[dir]);
}

void nk_nsm_set_bandwidth(struct nk_nsm *m, uint64_t bits_per_s) {
  m->bandwidth_bps = bits_per_s;
  for (int d = 0; d < 2; d++)
    nk_bucket_set(&m->link[d], (uint64_t)((double)bits_per_s / 8 * NK_LINK_SHARE));
}

/* The smallest virtual time among the backlogged tenants sharing m (t itself included). */
static double share_floor(struct nk_tenant *t, struct nk_nsm *m, int dir, uint64_t now) {
  double vmin = t->vt[dir];
  for (struct nk_tenant *o = engine.tenants; o; o = o->next)
    if (o != t && o->nsm == m && o->active_until[dir] > now && o->vt[dir] < vmin) vmin = o->vt[dir];
  return vmin;
}

static void throttle(struct nk_esock *es, int dir, uint64_t until) {
  es->throttle_dir = dir;
  if (es->throttled) {
    if (until < es->throttle_until) es->throttle_until = until;
  } else {
    es->throttled = true;
    es->t->throttled_socks++;
    es->throttle_until = until;
    es->next_throttled = engine.throttled;
    engine.throttled = es;
  }
  if (es->throttle_until < engine.next_wake_ns) engine.next_wake_ns = es->throttle_until;
}

/* How many bytes es may move now through NSM m (NULL: the tenant's own loopback, never
 * limited). Returns 0 when fewer than need bytes are allowed; the socket is then woken when
 * they should be. A datagram asks need = its length and is sent whole. */
uint64_t nk_policy_grant(struct nk_esock *es, struct nk_nsm *m, int dir, uint64_t want,
                         uint64_t need) {
  struct nk_tenant *t = es->t;
  bool cc = dir == NK_TX && t->cc.rate;
  if (!m || want == 0 || (!t->rate[dir] && !m->link[dir].rate && !cc)) return want;
  uint64_t now = nk_now_ns();
  uint64_t grant = want, wait = 0;
  if (t->rate[dir]) {
    struct nk_bucket *b = &t->bucket[dir];
    uint64_t n = need < b->burst ? need : b->burst;
    double have = nk_bucket_refill(b, now);
    if (have < (double)n) wait = nk_bucket_wait(b, n);
    else if ((double)grant > have) grant = (uint64_t)have;
  }
  if (cc) {
    uint64_t w = 0, have = nk_cc_grant(t, now, need, &w);
    if (w > wait) wait = w;
    else if (grant > have) grant = have;
  }
  if (m->link[dir].rate) {
    /* Coming back from idle: no credit for the time away. */
    if (t->active_until[dir] <= now) {
      double floor = share_floor(t, m, dir, now);
      if (t->vt[dir] < floor) t->vt[dir] = floor;
    }
    t->active_until[dir] = now + NK_BACKLOG_NS;
    struct nk_bucket *b = &m->link[dir];
    uint64_t n = need < b->burst ? need : b->burst;
    double have = nk_bucket_refill(b, now);
    if (t->vt[dir] > share_floor(t, m, dir, now) + NK_SLACK) {
      uint64_t w = nk_bucket_wait(b, n);
      w = w > NK_FAIR_RETRY_NS ? w : NK_FAIR_RETRY_NS;
      if (w > wait) wait = w;
    } else if (have < (double)n) {
      uint64_t w = nk_bucket_wait(b, n);
      if (w > wait) wait = w;
    } else if ((double)grant > have) {
      grant = (uint64_t)have;
    }
  }
  if (wait) {
    throttle(es, dir, now + wait);
    return 0;
  }
  return grant < need ? need : grant;
}

/* A datagram goes whole or waits. It costs its length, and an empty one a byte: Linux
 * delivers empty datagrams, and a rate limit must still count them. */
bool nk_policy_dgram(struct nk_esock *es, struct nk_nsm *m, int dir, uint32_t len) {
  uint64_t cost = len ? len : 1;
  return nk_policy_grant(es, m, dir, cost, cost) != 0;
}

void nk_policy_charge_dgram(struct nk_esock *es, struct nk_nsm *m, int dir, uint32_t len) {
  nk_policy_charge(es, m, dir, len ? len : 1);
}

void nk_policy_charge(struct nk_esock *es, struct nk_nsm *m, int dir, uint64_t n) {
  if (!m) return;
  struct nk_tenant *t = es->t;
  m->bytes[dir] += n;
  if (t->rate[dir]) t->bucket[dir].tokens -= (double)n;
  if (dir == NK_TX && t->cc.rate) nk_cc_charge(t, n);
  if (m->link[dir].rate) {
    m->link[dir].tokens -= (double)n;
    t->vt[dir] += (double)n / (double)(t->weight ? t->weight : 1);
  }
}

/* A throttled socket woken at now, maybe late: the engine was busy with other tenants' work
 * or off the CPU. The tokens that accrued past the burst while it waited are its own: a
 * tenant that was held back the whole time would have spent them had the engine come on time,
 * and the burst cap would throw them away. Without this credit a small rate-limited tenant
 * beside a flood lost what the engine's lateness cost it (1.2% of 200 Mbit/s with both cores
 * busy here, 22% once in CI). The long-run rate stays exact: tokens still accrue only at the
 * rate, only while the tenant waits for them. Counted, so an operator sees the lateness. */
static void late_wake(struct nk_esock *es, uint64_t now) {
  struct nk_tenant *t = es->t;
  int d = es->throttle_dir;
  t->throttle_wakes[d]++;
  t->throttle_late_ns[d] += now - es->throttle_until;
  if (!t->rate[d] || now <= t->bucket[d].last_ns) return;
  struct nk_bucket *b = &t->bucket[d];
  double before = b->tokens > (double)b->burst ? b->tokens : (double)b->burst;
  b->tokens += (double)(now - b->last_ns) * (double)b->rate / 1e9;
  b->last_ns = now;
  if (b->tokens > before) t->rate_late_credit[d] += (uint64_t)(b->tokens - before);
}

/* Wake the sockets whose tokens are due; recompute the next wake-up. */
void nk_policy_wake_due(uint64_t now) {
  if (!engine.throttled || now < engine.next_wake_ns) return;
  uint64_t next = UINT64_MAX;
  for (struct nk_esock **p = &engine.throttled; *p;) {
    struct nk_esock *es = *p;
    if (es->throttle_until <= now) {
      late_wake(es, now);
      *p = es->next_throttled;
      es->throttled = false;
      es->t->throttled_socks--;
      nk_sock_activate(es);
    } else {
      if (es->throttle_until < next) next = es->throttle_until;
      p = &es->next_throttled;
    }
  }
  engine.next_wake_ns = next;
}

void nk_policy_unthrottle(struct nk_esock *es) {
  if (!es->throttled) return;
  for (struct nk_esock **p = &engine.throttled; *p; p = &(*p)->next_throttled)
    if (*p == es) {
      *p = es->next_throttled;
      break;
    }
  es->throttled = false;
  es->t->throttled_socks--;
}

/* Shared memory the tenant's sockets may commit: each owns a transmit and a receive ring, of
 * the tenant's ring size unless SO_SNDBUF / SO_RCVBUF made them smaller. */
uint64_t nk_tenant_memory(const struct nk_tenant *t) { return t->ring_bytes; }

static int refuse(struct nk_tenant *t, int err, const char *reason, uint64_t limit,
                  uint64_t *counter) {
  (*counter)++;
  uint64_t now = nk_now_ns();
  /* One line per second at most: a program retrying in a loop must not flood the log. */
  if (now - t->last_refusal_log_ns >= NK_REFUSAL_LOG_NS || !t->last_refusal_log_ns) {
    t->last_refusal_log_ns = now;
    NK_EVENT("socket_refused", "tenant=%s reason=%s limit=%llu errno=%s refused_total=%llu",
             t->name, reason, (unsigned long long)limit, strerrorname_np(err),
             (unsigned long long)(t->refused_sockets + t->refused_memory));
  }
  return -err;
}

/* May the tenant open one more socket? 0 or the errno Linux gives when it runs out: EMFILE
 * for the socket limit and the tenant's share of the engine's descriptors (as for a process's
 * descriptor limit), ENFILE for the engine's own (as for the system's), ENOBUFS for memory.
 * On 0 the socket's descriptors are taken from the budget; nk_esock_free gives them back. */
static int admit(struct nk_tenant *t, bool take) {
  if (t->max_sockets && t->nsocks >= t->max_sockets)
    return refuse(t, EMFILE, "max_sockets", t->max_sockets, &t->refused_sockets);
  if (t->max_memory && nk_tenant_memory(t) + 2ull * t->ring_size > t->max_memory)
    return refuse(t, ENOBUFS, "max_memory", t->max_memory, &t->refused_memory);
  if (t->nfree == 0 && t->hwm >= t->nslots)
    return refuse(t, EMFILE, "slots", t->nslots, &t->refused_sockets);
  int r = take ? nk_fds_take(t, NK_SOCK_FDS) : nk_fds_may_take(t, NK_SOCK_FDS);
  if (r == -EMFILE)
    return refuse(t, EMFILE, "engine_fds", nk_tenant_fd_limit(t), &t->refused_sockets);
  if (r < 0) return refuse(t, ENFILE, "engine_fds_total", engine.fd_limit, &t->refused_sockets);
  return 0;
}

int nk_tenant_admit(struct nk_tenant *t) { return admit(t, true); }

int nk_tenant_admissible(struct nk_tenant *t) { return admit(t, false); }
