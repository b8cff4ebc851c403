/* Tenant-level congestion control: a tenant's share of a bottleneck NetKernel does not own
 * (a link between hosts) follows its weight, not the number of connections it opens.
 *
 * Linux shares a congested link per flow: a tenant with eight connections takes eight shares.
 * Here every tenant with tenant_cc on gets one sending rate for all its connections through
 * its NSM, adjusted every tick (NK_CC_TICK_NS) from what those connections see, read from the
 * NSM's own TCP_INFO: retransmissions, and queueing delay (smoothed RTT above the connection's
 * minimum RTT), and bytes acknowledged (what the path delivered). Congestion cuts the rate to
 * (1 - NK_CC_BETA x queue depth in targets, at most 4) of what the tenant delivered; otherwise
 * it grows by NK_CC_STEP per tick times the tenant's weight (slower just below the rate of the
 * last cut, where the path was full, as CUBIC does). This is AIMD per tenant
 * rather than per flow: tenants that share a bottleneck see its queue together, so their
 * rates converge to shares in proportion to their additive steps, i.e. to their weights, on
 * whatever host each runs, with no message between hosts and no knowledge of the link.
 *
 * Until a tenant first sees congestion its rate is not limited (0): alone on an idle path it
 * runs at what its connections reach. A tenant that stops sending for NK_CC_IDLE_NS is
 * unlimited again. Only the transmit direction is controlled (the sender's side decides what
 * enters the network). Only connections on a kernel NSM are sampled (their socket is here);
 * an lwIP tenant's rate is never limited by this.
 */
#include <linux/tcp.h> /* struct tcp_info with min_rtt (glibc's copy is older) */
#include <stddef.h>

#include "engine.h"

#define NK_CC_TICK_NS    10000000ull  /* 10 ms between samples */
#define NK_CC_IDLE_NS    500000000ull /* no tx for 0.5 s: the limit is dropped */
#define NK_CC_TARGET_US  1000         /* queueing delay above which the path is congested */
#define NK_CC_BETA       0.07         /* a cut takes this much of the rate */
#define NK_CC_STEP       (1.5e6 / 8)  /* bytes/s added per tick per unit of weight (150 Mbit/s/s) */
#define NK_CC_MIN_RATE   (1e6 / 8)    /* never below 1 Mbit/s */
#define NK_CC_DEPTH_MAX  2            /* a cut is at most 2 times NK_CC_BETA */
#define NK_CC_GRACE_NS   100000000ull /* a tenant starting to send is not cut for 100 ms */
#define NK_CC_PLATEAU    0.25         /* the slowest step, as a fraction of the full one */
#define NK_CC_HOLD_TICKS 3            /* after a cut, let the queue drain before judging again */
#define NK_CC_SCAN_MAX   8192         /* slots looked at per tenant and tick */
#define NK_CC_SAMPLE_MAX 256          /* TCP_INFO reads per tenant and tick */
#define NK_CC_BURST_NS   2000000ull   /* the bucket holds 2 ms of the rate (at least 64 KiB) */

void nk_cc_set(struct nk_tenant *t, bool on) {
  if (t->cc.on == on) return;
  uint64_t retrans = t->cc.retrans, cuts = t->cc.cuts;
  t->cc = (struct nk_cc){.on = on, .retrans = retrans, .cuts = cuts};
  if (on && engine.next_cc_ns == UINT64_MAX) engine.next_cc_ns = nk_now_ns();
}

/* A new rate; the tokens already there stay (a cut must not hand out a fresh burst). */
static void set_rate(struct nk_tenant *t, double rate, uint64_t now) {
  struct nk_bucket *b = &t->cc.bucket;
  if (rate <= 0) {
    t->cc.rate = 0;
    return;
  }
  if (rate < NK_CC_MIN_RATE) rate = NK_CC_MIN_RATE;
  bool fresh = !t->cc.rate;
  if (!fresh) nk_bucket_refill(b, now);
  double tokens = b->tokens;
  nk_bucket_set(b, (uint64_t)rate);
  uint64_t burst = (uint64_t)rate * NK_CC_BURST_NS / 1000000000ull;
  b->burst = burst > 65536 ? burst : 65536;
  b->tokens = fresh ? 0 : (tokens < (double)b->burst ? tokens : (double)b->burst);
  t->cc.rate = (uint64_t)rate;
}

uint64_t nk_cc_grant(struct nk_tenant *t, uint64_t now, uint64_t need, uint64_t *wait) {
  struct nk_bucket *b = &t->cc.bucket;
  uint64_t n = need < b->burst ? need : b->burst;
  double have = nk_bucket_refill(b, now);
  if (have < (double)n) {
    *wait = nk_bucket_wait(b, n);
    return 0;
  }
  return (uint64_t)have;
}

void nk_cc_charge(struct nk_tenant *t, uint64_t n) { t->cc.bucket.tokens -= (double)n; }

/* What the tenant's sending TCP connections on its NSM saw since the last tick: segments
 * retransmitted, bytes the receivers acknowledged (what the path delivered), queueing delay. */
static void sample(struct nk_tenant *t, uint64_t *retrans, uint64_t *acked, uint32_t *qdelay_us,
                   uint32_t *flows) {
  double qsum = 0, wsum = 0, qplain = 0;
  uint32_t n = 0, looked = 0;
  *retrans = 0;
  *acked = 0;
  /* A bounded share of the slots and of the getsockopt calls per tick, going on where the last
   * tick stopped: a tenant with 100,000 connections costs the engine no more than one with
   * a few hundred (the acknowledged bytes of the ones not looked at are counted when they are). */
  uint32_t hwm = t->hwm, start = hwm ? t->cc.cursor % hwm : 0, i = start, scanned = 0;
  for (; scanned < hwm && scanned < NK_CC_SCAN_MAX && looked < NK_CC_SAMPLE_MAX; scanned++) {
    struct nk_esock *es = t->socks[i];
    i = i + 1 == hwm ? 0 : i + 1;
    if (!es || es->type != SOCK_STREAM || es->ep_count < 1 || es->shm || es->dead) continue;
    struct nk_endpoint *ep = &es->ep[0];
    if (!ep->nsm || ep->loop || ep->fd < 0 || ep->ops != &nk_kernel_ep_ops) continue;
    /* Sent nothing and has nothing in flight: it says nothing of the path. */
    if (es->tx_bytes == es->cc_tx_mark && es->tx_bytes <= es->cc_acked) continue;
    es->cc_tx_mark = es->tx_bytes;
    looked++;
    struct tcp_info ti;
    socklen_t len = sizeof(ti);
    if (getsockopt(ep->fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0 ||
        len < offsetof(struct tcp_info, tcpi_min_rtt) + sizeof(ti.tcpi_min_rtt))
      continue;
    if (ti.tcpi_total_retrans > es->cc_retrans) *retrans += ti.tcpi_total_retrans - es->cc_retrans;
    es->cc_retrans = ti.tcpi_total_retrans;
    /* The first look only takes the mark: what was acknowledged before it is history. */
    uint64_t got =
        es->cc_acked && ti.tcpi_bytes_acked > es->cc_acked ? ti.tcpi_bytes_acked - es->cc_acked : 0;
    *acked += got;
    es->cc_acked = ti.tcpi_bytes_acked;
    if (ti.tcpi_rtt && ti.tcpi_min_rtt && ti.tcpi_min_rtt != UINT32_MAX) {
      double q = ti.tcpi_rtt > ti.tcpi_min_rtt ? (double)(ti.tcpi_rtt - ti.tcpi_min_rtt) : 0;
      /* Weighted by what each delivered: connections kept idle beside the bulk ones (their
       * RTT at its minimum) must not hide the queue the bulk ones see. */
      qsum += q * (double)got;
      wsum += (double)got;
      qplain += q;
      n++;
    }
  }
  t->cc.cursor = i;
  *qdelay_us = (uint32_t)(wsum > 0 ? qsum / wsum : n ? qplain / n : 0);
  *flows = n;
}

static void tick(struct nk_tenant *t, uint64_t now) {
  struct nk_cc *cc = &t->cc;
  double dt = cc->last_ns ? (double)(now - cc->last_ns) / 1e9 : 0;
  cc->last_ns = now;
  uint64_t sent = t->tx_bytes - cc->tx_mark;
  cc->tx_mark = t->tx_bytes;
  if (!sent) {
    if (cc->rate && now - cc->last_tx_ns > NK_CC_IDLE_NS) {
      set_rate(t, 0, now);
      cc->sent_bps = 0;
    }
    cc->flows = 0;
    return;
  }
  if (now - cc->last_tx_ns > NK_CC_IDLE_NS) { /* from idle: start afresh, not limited */
    cc->started_ns = now;
    cc->sent_bps = 0;
    set_rate(t, 0, now);
  }
  cc->last_tx_ns = now;
  if (dt <= 0) return;
  /* The engine may have slept past ticks: rates are over the real time, but a long gap is no
   * licence for a long step. */
  double span = dt;
  if (dt > 3 * NK_CC_TICK_NS / 1e9) dt = 3 * NK_CC_TICK_NS / 1e9;
  uint64_t retrans, acked;
  sample(t, &retrans, &acked, &cc->qdelay_us, &cc->flows);
  cc->retrans += retrans;
  /* What the path delivered, not what went into the NSM's socket buffers (more, while they
   * fill): a cut starts from what the tenant really got through. */
  double bps = (double)acked / span;
  cc->sent_bps = cc->sent_bps ? 0.75 * cc->sent_bps + 0.25 * bps : bps;
  bool congested = retrans > 0 || cc->qdelay_us > NK_CC_TARGET_US;
  /* No cut just after a cut (the queue needs time to drain) nor while the tenant's connections
   * are starting (what they delivered so far says nothing of their share). */
  bool holding =
      now - cc->cut_ns < NK_CC_HOLD_TICKS * NK_CC_TICK_NS || now - cc->started_ns < NK_CC_GRACE_NS;
  if (congested && !holding) {
    double base = cc->rate && (double)cc->rate < cc->sent_bps ? (double)cc->rate : cc->sent_bps;
    /* Nothing acknowledged seen yet (connections at their first look, short ones): what it
     * pushed into the NSM this tick stands in. A cut never lifts the limit. */
    if (base <= 0) base = (double)sent / span;
    /* The deeper the queue, the deeper the cut (as DCTCP scales its cut by the marks seen):
     * a tenant far over its share gives most of it back in one step. */
    double depth = (double)cc->qdelay_us / NK_CC_TARGET_US;
    double beta = NK_CC_BETA * (depth < 1 ? 1 : depth > NK_CC_DEPTH_MAX ? NK_CC_DEPTH_MAX : depth);
    cc->cut_rate = base;
    double cut = base * (1 - beta);
    set_rate(t, cut > NK_CC_MIN_RATE ? cut : NK_CC_MIN_RATE, now);
    cc->cut_ns = now;
    cc->cuts++;
  } else if (!congested && cc->rate) {
    /* Grow only while the tenant uses what it has: an idle allowance is no claim. */
    double step = NK_CC_STEP * (t->weight ? t->weight : 1) * dt / (NK_CC_TICK_NS / 1e9);
    /* Slower near the rate of the last cut, where the path was full (CUBIC's plateau): more of
     * each cycle is spent near capacity, fewer cuts are needed. Past it, full steps probe. */
    double gap = cc->cut_rate - (double)cc->rate;
    if (gap > 0) {
      double f = gap / (NK_CC_BETA * cc->cut_rate);
      step *= f < NK_CC_PLATEAU ? NK_CC_PLATEAU : f > 1 ? 1 : f;
    }
    if ((double)cc->rate < 1.25 * cc->sent_bps + step) set_rate(t, (double)cc->rate + step, now);
  }
}

void nk_cc_tick(uint64_t now) {
  if (now < engine.next_cc_ns) return;
  bool any = false;
  for (struct nk_tenant *t = engine.tenants; t; t = t->next)
    if (t->cc.on && !t->dead) {
      tick(t, now);
      any = true;
    }
  engine.next_cc_ns = any ? now + NK_CC_TICK_NS : UINT64_MAX;
}
