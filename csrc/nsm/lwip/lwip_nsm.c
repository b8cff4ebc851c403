/* netkernel-lwip: an external NSM built on lwIP (Debian's liblwip, 2.1.3, its Unix port).
 *
 * One process per NSM, in the NSM's network namespace, attached to the fabric by a TAP device
 * (the daemon bridges it with the namespace's eth0). lwIP holds the addresses of the tenants
 * the engine gives it: one lwIP netif per tenant, all on the one TAP, each with a MAC of its
 * own, so ARP and NDP answer for each tenant as for a host. It serves the engine's sockets over
 * ServiceLib (include/netkernel/servicelib.h): bytes go from a tenant's transmit ring straight
 * into tcp_write() and from received pbufs straight into the tenant's receive ring.
 *
 * Threads: lwIP's tcpip thread runs its timers; this program's main thread does everything
 * else (TAP frames, requests). Both hold lwIP's core lock while in lwIP. The main thread
 * spins briefly after work and then sleeps in poll(): an idle NSM costs nothing.
 *
 * Debian's build has two traps, both avoided here: PBUF_POOL buffers are smaller than
 * pbuf.c believes (memp.c sees glibc's TCP_MSS), so frames are read into PBUF_RAM pbufs; and
 * the contrib tapif is affected by the same bug, so the TAP netif is our own.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/if_tun.h>
#include <linux/virtio_net.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "lwip/etharp.h"
#include "lwip/ethip6.h"
#include "lwip/inet_chksum.h"
#include "lwip/init.h"
#include "lwip/ip.h"
#include "lwip/nd6.h"
#include "lwip/netif.h"
#include "lwip/pbuf.h"
#include "lwip/priv/tcp_priv.h"
#include "lwip/tcp.h"
#include "lwip/tcpip.h"
#include "lwip/udp.h"
#include "netif/ethernet.h"

#include "netkernel/servicelib.h"

#define RX_BATCH 64
#define SPIN_NS  50000ull

static struct nk_sl *sl;
static int tapfd = -1;
static int nsm_index;
static int prefix4 = 15, prefix6 = 64;
static __thread int in_loop; /* the main thread inside its loop: it flushes events itself */

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Events from lwIP's timer thread (a retransmission timeout, a late FIN) go out at once. */
static void emit(const struct nk_nqe *e) {
  nk_sl_event(sl, e);
  if (!in_loop) nk_sl_flush(sl);
}

/* ---- one netif per tenant, all on the TAP ---- */

struct tnetif {
  struct netif nif;
  struct nk_sl_tenant *t;
  struct tnetif *next;
};
static struct tnetif *tnetifs;

/* ---- the TAP device, with the kernel's segmentation offloads ----
 *
 * Every frame that crosses the TAP costs a system call and a trip through two bridges and a
 * veth (measured: 86 % of this process's time at 1.3 Gbit/s, almost all per frame). So frames
 * carry a virtio-net header (IFF_VNET_HDR): the kernel hands us TCP segments of up to 64 KiB
 * (TUN_F_TSO*, their checksum left to us: TUN_F_CSUM), and we hand it runs of lwIP's
 * 1460-byte segments of one connection merged into one GSO frame, which it segments. lwIP
 * itself has no TSO; TCP_MSS is fixed in Debian's build. */
static unsigned char frame_buf[sizeof(struct virtio_net_hdr) + 65536]; /* the run being merged */
static unsigned char rx_buf[sizeof(struct virtio_net_hdr) + 65536];

static void tap_write(struct iovec *iov, int cnt) {
  if (writev(tapfd, iov, cnt) < 0) {
    /* A full TAP queue drops the frame, as a NIC would: TCP retransmits. */
  }
}

/* The run of segments being merged: Ethernet + IPv4 + TCP header (no options) of the first,
 * then the payloads. Only the main thread merges, and it flushes before letting go of the
 * core lock; lwIP's timer thread sends its frames as they come. */
static unsigned char *const gso_frame = frame_buf + sizeof(struct virtio_net_hdr);
static size_t gso_len;
static int gso_segs;
static u32_t gso_next_seq;
static u16_t gso_mss, gso_last;

static u16_t fold(u32_t s) {
  while (s >> 16) s = (s & 0xffff) + (s >> 16);
  return (u16_t)s;
}

static void gso_flush(void) {
  if (!gso_segs) return;
  struct virtio_net_hdr *vh = (struct virtio_net_hdr *)frame_buf;
  memset(vh, 0, sizeof(*vh));
  if (gso_segs > 1) {
    unsigned char *ip = gso_frame + 14, *th = ip + 20;
    u16_t total = lwip_htons((u16_t)(gso_len - 14));
    memcpy(ip + 2, &total, 2);
    memset(ip + 10, 0, 2);
    u16_t ipsum = inet_chksum(ip, 20);
    memcpy(ip + 10, &ipsum, 2);
    /* The kernel completes the TCP checksum of each segment from the pseudo-header sum. */
    u32_t sum = 0;
    u16_t w;
    for (int i = 12; i < 20; i += 2) {
      memcpy(&w, ip + i, 2);
      sum += w;
    }
    sum += lwip_htons(6) + lwip_htons((u16_t)(gso_len - 34));
    u16_t partial = fold(sum);
    memcpy(th + 16, &partial, 2);
    vh->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    vh->gso_type = VIRTIO_NET_HDR_GSO_TCPV4;
    vh->hdr_len = 54;
    vh->gso_size = gso_mss;
    vh->csum_start = 34;
    vh->csum_offset = 16;
  }
  struct iovec iov = {.iov_base = frame_buf, .iov_len = sizeof(*vh) + gso_len};
  tap_write(&iov, 1);
  gso_segs = 0;
  gso_len = 0;
}

/* True when p was taken into the run (a full-size, in-order data segment of the same flow). */
static bool gso_add(struct pbuf *p) {
  unsigned char h[54];
  if (p->tot_len < 55 || p->tot_len > 1514) return false;
  pbuf_copy_partial(p, h, 54, 0);
  /* IPv4 without options or fragments, TCP without options, no SYN/RST/URG. */
  if (h[12] != 0x08 || h[13] != 0x00 || h[14] != 0x45 || h[23] != 6 || (h[20] & 0x3f) || h[21] ||
      (h[46] >> 4) != 5 || (h[47] & 0x26))
    return false;
  u16_t len = (u16_t)(p->tot_len - 54);
  u32_t seq;
  memcpy(&seq, h + 38, 4);
  seq = lwip_ntohl(seq);
  bool same = gso_segs && seq == gso_next_seq && gso_last == gso_mss && len <= gso_mss &&
              !memcmp(gso_frame, h, 12) && !memcmp(gso_frame + 26, h + 26, 12) && /* IPs, ports */
              !memcmp(gso_frame + 42, h + 42, 4) &&
              !memcmp(gso_frame + 48, h + 48, 2) && /* ack, wnd */
              !(gso_frame[47] & 0x01) && gso_len + len <= 14 + 20 + 20 + 44 * 1460;
  if (!same) {
    gso_flush();
    pbuf_copy_partial(p, gso_frame, p->tot_len, 0);
    gso_len = p->tot_len;
    gso_segs = 1;
    gso_mss = len;
  } else {
    pbuf_copy_partial(p, gso_frame + gso_len, len, 54);
    gso_len += len;
    gso_segs++;
    gso_frame[47] |= h[47]; /* PSH or FIN of the last segment */
  }
  gso_last = len;
  gso_next_seq = seq + len;
  if (h[47] & 0x01) gso_flush();
  return true;
}

static err_t tap_output(struct netif *n, struct pbuf *p) {
  (void)n;
  if (in_loop && gso_add(p)) return ERR_OK;
  if (in_loop) gso_flush();                /* keep the order of this flow's frames */
  static const struct virtio_net_hdr none; /* no GSO, checksums complete */
  struct iovec iov[17] = {{.iov_base = (void *)&none, .iov_len = sizeof(none)}};
  int cnt = 1;
  for (struct pbuf *q = p; q && cnt < 17; q = q->next) {
    iov[cnt].iov_base = q->payload;
    iov[cnt].iov_len = q->len;
    cnt++;
  }
  tap_write(iov, cnt);
  return ERR_OK;
}

static err_t tnetif_init(struct netif *n) {
  struct tnetif *tn = n->state;
  n->name[0] = 'n';
  n->name[1] = 'k';
  n->output = etharp_output;
  n->output_ip6 = ethip6_output;
  n->linkoutput = tap_output;
  n->mtu = 1500;
  n->hwaddr_len = 6;
  /* Locally administered, unique per NSM and tenant. */
  uint8_t mac[6] = {
      0x02, 0x4e, 0x4b, (uint8_t)nsm_index, (uint8_t)(tn->t->id >> 8), (uint8_t)tn->t->id};
  memcpy(n->hwaddr, mac, 6);
  n->flags = NETIF_FLAG_BROADCAST | NETIF_FLAG_ETHARP | NETIF_FLAG_ETHERNET | NETIF_FLAG_MLD6;
  return ERR_OK;
}

static void to_ip(const struct nk_addr *a, ip_addr_t *ip) {
  memset(ip, 0, sizeof(*ip));
  if (a->family == AF_INET) {
    IP_SET_TYPE(ip, IPADDR_TYPE_V4);
    memcpy(&ip_2_ip4(ip)->addr, a->addr, 4);
  } else {
    IP_SET_TYPE(ip, IPADDR_TYPE_V6);
    memcpy(ip_2_ip6(ip)->addr, a->addr, 16);
  }
}

static void from_ip(const ip_addr_t *ip, uint16_t port, struct nk_addr *a) {
  memset(a, 0, sizeof(*a));
  a->port = lwip_htons(port);
  if (IP_IS_V4(ip)) {
    a->family = AF_INET;
    memcpy(a->addr, &ip_2_ip4(ip)->addr, 4);
  } else {
    a->family = AF_INET6;
    memcpy(a->addr, ip_2_ip6(ip)->addr, 16);
  }
}

static void tenant_add(void *ctx, struct nk_sl_tenant *t) {
  (void)ctx;
  struct tnetif *tn = calloc(1, sizeof(*tn));
  if (!tn) return;
  tn->t = t;
  ip4_addr_t ip, mask, gw;
  memcpy(&ip.addr, t->ipv4.addr, 4);
  mask.addr = prefix4 ? lwip_htonl(~0u << (32 - prefix4)) : 0;
  gw.addr = 0;
  if (!netif_add(&tn->nif, &ip, &mask, &gw, tn, tnetif_init, ethernet_input)) {
    free(tn);
    fprintf(stderr, "netkernel-lwip: cannot add a netif for tenant %s\n", t->name);
    return;
  }
  if (t->ipv6.family == AF_INET6) {
    netif_create_ip6_linklocal_address(&tn->nif, 1);
    ip6_addr_t a6;
    memcpy(a6.addr, t->ipv6.addr, 16);
    ip6_addr_clear_zone(&a6);
    s8_t idx;
    if (netif_add_ip6_address(&tn->nif, &a6, &idx) == ERR_OK)
      netif_ip6_addr_set_state(&tn->nif, idx, IP6_ADDR_PREFERRED); /* the daemon owns it: no DAD */
    netif_ip6_addr_set_state(&tn->nif, 0, IP6_ADDR_PREFERRED);
  }
  netif_set_link_up(&tn->nif);
  netif_set_up(&tn->nif);
  t->user = tn;
  tn->next = tnetifs;
  tnetifs = tn;
  /* Tell the switch where the tenant now lives (a gratuitous ARP). */
  etharp_gratuitous(&tn->nif);
  fprintf(stderr, "netkernel-lwip: tenant %s (id %u) on %02x:%02x:%02x:%02x:%02x:%02x\n", t->name,
          t->id, tn->nif.hwaddr[0], tn->nif.hwaddr[1], tn->nif.hwaddr[2], tn->nif.hwaddr[3],
          tn->nif.hwaddr[4], tn->nif.hwaddr[5]);
}

/* Linux lets a SYN reopen a connection in TIME_WAIT when its sequence number lies beyond
 * the old connection's (RFC 1122 4.2.2.13). lwIP answers such a SYN with an ACK, and a Linux
 * client, which reuses a port as soon as its own side is closed, then waits a second per
 * attempt (seen with wrk and "Connection: close": 4 requests/s). Do as Linux: drop the
 * TIME_WAIT pcb (no RST goes out for it) and let the SYN reach the listener. */
static void reopen_time_wait(const uint8_t *f, size_t len) {
  uint16_t type = (uint16_t)(f[12] << 8 | f[13]);
  const uint8_t *ip = f + 14, *th;
  struct nk_addr src = {0}, dst = {0};
  if (type == 0x0800 && len >= 14 + 20) {
    size_t ihl = (size_t)(ip[0] & 15) * 4;
    if (ip[9] != 6 || ihl < 20 || len < 14 + ihl + 20) return;
    src.family = dst.family = AF_INET;
    memcpy(src.addr, ip + 12, 4);
    memcpy(dst.addr, ip + 16, 4);
    th = ip + ihl;
  } else if (type == 0x86dd && len >= 14 + 40 + 20) {
    if (ip[6] != 6) return; /* extension headers: leave it to lwIP */
    src.family = dst.family = AF_INET6;
    memcpy(src.addr, ip + 8, 16);
    memcpy(dst.addr, ip + 24, 16);
    th = ip + 40;
  } else {
    return;
  }
  if ((th[13] & (TCP_SYN | TCP_ACK | TCP_RST)) != TCP_SYN) return;
  u16_t sport = (u16_t)(th[0] << 8 | th[1]), dport = (u16_t)(th[2] << 8 | th[3]);
  u32_t seq = (u32_t)th[4] << 24 | (u32_t)th[5] << 16 | (u32_t)th[6] << 8 | th[7];
  ip_addr_t s, d;
  to_ip(&src, &s);
  to_ip(&dst, &d);
  for (struct tcp_pcb *pcb = tcp_tw_pcbs; pcb; pcb = pcb->next)
    if (pcb->local_port == dport && pcb->remote_port == sport && ip_addr_cmp(&pcb->remote_ip, &s) &&
        ip_addr_cmp(&pcb->local_ip, &d)) {
      if (TCP_SEQ_GT(seq, pcb->rcv_nxt)) tcp_abort(pcb);
      return;
    }
}

/* Frames to the netif whose MAC they name; broadcast and multicast to every netif. */
static void tap_input(struct pbuf *p) {
  const uint8_t *dst = p->payload;
  if (tcp_tw_pcbs) reopen_time_wait(p->payload, p->len);
  if (dst[0] & 1) {
    for (struct tnetif *tn = tnetifs; tn; tn = tn->next) {
      struct pbuf *c = tn->next ? pbuf_clone(PBUF_RAW, PBUF_RAM, p) : p;
      if (!c) continue;
      if (tn->nif.input(c, &tn->nif) != ERR_OK) pbuf_free(c);
      if (c == p) return;
    }
    pbuf_free(p);
    return;
  }
  for (struct tnetif *tn = tnetifs; tn; tn = tn->next)
    if (!memcmp(tn->nif.hwaddr, dst, 6)) {
      if (tn->nif.input(p, &tn->nif) != ERR_OK) pbuf_free(p);
      return;
    }
  pbuf_free(p);
}

static uint64_t frames_too_big;

/* A frame may be a GSO segment of up to 64 KiB whose TCP/UDP checksum the kernel left for
 * us (NEEDS_CSUM: the field holds the pseudo-header sum): complete it, since lwIP checks. */
static int tap_read_batch(void) {
  int n = 0;
  const size_t hl = sizeof(struct virtio_net_hdr);
  while (n < RX_BATCH) {
    ssize_t r = read(tapfd, rx_buf, sizeof(rx_buf));
    if (r < (ssize_t)hl + 14) break;
    const struct virtio_net_hdr *vh = (const struct virtio_net_hdr *)rx_buf;
    unsigned char *f = rx_buf + hl;
    size_t len = (size_t)r - hl;
    n++;
    if (len > 0xffff) { /* a pbuf cannot hold it (the daemon caps tap0's gso_max_size) */
      frames_too_big++;
      continue;
    }
    if (vh->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
      size_t start = vh->csum_start, off = vh->csum_offset;
      if (start + off + 2 > len) continue;
      u16_t sum = inet_chksum(f + start, (u16_t)(len - start));
      memcpy(f + start + off, &sum, 2);
    }
    struct pbuf *p = pbuf_alloc(PBUF_RAW, (u16_t)len, PBUF_RAM);
    if (!p) break;
    memcpy(p->payload, f, len);
    tap_input(p);
  }
  return n;
}

/* ---- connections ---- */

struct conn {
  uint32_t id;
  struct nk_sl_tenant *t; /* NULL once the tenant is gone */
  struct tcp_pcb *pcb;    /* NULL once lwIP freed it (error) or we closed it */
  struct udp_pcb *upcb;   /* a datagram socket's instead */
  int family;
  bool listener, connecting, attached;
  bool fin_in, fin_reported, shut_pending;
  struct nk_sl_stream st;
  struct pbuf *rxq; /* received, not yet in the tenant's ring */
};
static struct conn *conns[NK_SL_MAX_SOCKS];
static uint32_t next_id = 1;

static struct conn *conn_new(struct nk_sl_tenant *t, int family) {
  for (uint32_t i = 0; i < NK_SL_MAX_SOCKS; i++) {
    uint32_t id = (next_id + i) % NK_SL_MAX_SOCKS;
    if (conns[id]) continue;
    struct conn *c = calloc(1, sizeof(*c));
    if (!c) return NULL;
    c->id = id;
    c->t = t;
    c->family = family;
    conns[id] = c;
    next_id = id + 1; /* ids rotate: a late event names no newer socket */
    return c;
  }
  return NULL;
}

static int lwip_errno(err_t e) {
  switch (e) {
    case ERR_OK:
      return 0;
    case ERR_MEM:
      return ENOBUFS;
    case ERR_BUF:
      return ENOBUFS;
    case ERR_TIMEOUT:
      return ETIMEDOUT;
    case ERR_RTE:
      return ENETUNREACH;
    case ERR_INPROGRESS:
      return EINPROGRESS;
    case ERR_VAL:
      return EINVAL;
    case ERR_WOULDBLOCK:
      return EWOULDBLOCK;
    case ERR_USE:
      return EADDRINUSE;
    case ERR_ALREADY:
      return EALREADY;
    case ERR_ISCONN:
      return EISCONN;
    case ERR_CONN:
      return ENOTCONN;
    case ERR_IF:
      return ENETDOWN;
    case ERR_ABRT:
      return ECONNABORTED;
    case ERR_RST:
      return ECONNRESET;
    case ERR_CLSD:
      return ENOTCONN;
    case ERR_ARG:
      return EINVAL;
    default:
      return EIO;
  }
}

static void maybe_fin(struct conn *c) {
  if (c->fin_in && !c->rxq && !c->fin_reported && c->attached) {
    c->fin_reported = true;
    emit(&(struct nk_nqe){.op = NK_SLE_FIN, .sock = c->id});
  }
}

/* Received bytes into the tenant's ring, as far as the engine's credit goes; the window
 * opens (tcp_recved) only as they land there. */
static void drain_rx(struct conn *c) {
  if (!c->attached) return;
  uint32_t total = 0;
  while (c->rxq && c->st.rx_credit) {
    uint8_t *dst;
    uint32_t room = nk_sl_rx_room(&c->st, &dst, c->rxq->tot_len);
    u16_t n = pbuf_copy_partial(c->rxq, dst, (u16_t)room, 0);
    if (!n) break;
    c->rxq = pbuf_free_header(c->rxq, n);
    nk_sl_rx_wrote(&c->st, n);
    total += n;
  }
  if (total) {
    emit(&(struct nk_nqe){.op = NK_SLE_RECVD, .sock = c->id, .len = total});
    for (uint32_t left = total; c->pcb && left;) {
      u16_t w = left > 0xffff ? 0xffff : (u16_t)left;
      tcp_recved(c->pcb, w);
      left -= w;
    }
  }
  maybe_fin(c);
}

/* The tenant's offered bytes into lwIP, as far as its send buffer goes (tcp_write copies). */
static void push_tx(struct conn *c) {
  if (!c->pcb || !c->attached) return;
  uint32_t total = 0;
  while (c->st.tx_avail) {
    u16_t room = tcp_sndbuf(c->pcb);
    if (!room || tcp_sndqueuelen(c->pcb) >= TCP_SND_QUEUELEN - 4) break;
    const uint8_t *p;
    uint32_t n = nk_sl_tx_peek(&c->st, &p, room);
    u8_t more = n < c->st.tx_avail ? TCP_WRITE_FLAG_MORE : 0;
    if (tcp_write(c->pcb, p, (u16_t)n, TCP_WRITE_FLAG_COPY | more) != ERR_OK) break;
    nk_sl_tx_took(&c->st, n);
    total += n;
  }
  if (total) emit(&(struct nk_nqe){.op = NK_SLE_SENT, .sock = c->id, .len = total});
  if (c->shut_pending && !c->st.tx_avail) {
    c->shut_pending = false;
    tcp_shutdown(c->pcb, 0, 1);
  }
  tcp_output(c->pcb);
}

static err_t on_recv(void *arg, struct tcp_pcb *pcb, struct pbuf *p, err_t err) {
  (void)pcb, (void)err;
  struct conn *c = arg;
  if (!p) {
    c->fin_in = true;
    maybe_fin(c);
    return ERR_OK;
  }
  if (c->rxq) pbuf_cat(c->rxq, p);
  else c->rxq = p;
  drain_rx(c);
  return ERR_OK;
}

static err_t on_sent(void *arg, struct tcp_pcb *pcb, u16_t len) {
  (void)pcb, (void)len;
  push_tx(arg);
  return ERR_OK;
}

/* lwIP has freed the pcb. */
static void on_err(void *arg, err_t err) {
  struct conn *c = arg;
  if (!c) return;
  c->pcb = NULL;
  int e = lwip_errno(err);
  if (c->connecting) e = err == ERR_RST ? ECONNREFUSED : err == ERR_ABRT ? ETIMEDOUT : e;
  c->connecting = false;
  emit(&(struct nk_nqe){.op = NK_SLE_ERROR, .sock = c->id, .arg = e ? e : ECONNRESET});
}

static void watch(struct conn *c) {
  tcp_arg(c->pcb, c);
  tcp_recv(c->pcb, on_recv);
  tcp_sent(c->pcb, on_sent);
  tcp_err(c->pcb, on_err);
}

static err_t on_connected(void *arg, struct tcp_pcb *pcb, err_t err) {
  struct conn *c = arg;
  c->connecting = false;
  if (err != ERR_OK) {
    emit(&(struct nk_nqe){.op = NK_SLE_ERROR, .sock = c->id, .arg = lwip_errno(err)});
    return ERR_OK;
  }
  struct nk_nqe e = {.op = NK_SLE_CONNECTED, .sock = c->id};
  from_ip(&pcb->local_ip, pcb->local_port, &e.addr);
  emit(&e);
  push_tx(c);
  return ERR_OK;
}

static err_t on_accept(void *arg, struct tcp_pcb *pcb, err_t err) {
  struct conn *l = arg;
  if (err != ERR_OK || !pcb || !l->t) return ERR_VAL;
  struct conn *c = conn_new(l->t, l->family);
  if (!c) {
    tcp_abort(pcb);
    return ERR_ABRT;
  }
  c->pcb = pcb;
  watch(c);
  struct nk_nqe e = {.op = NK_SLE_ACCEPTED, .sock = c->id, .arg = (int32_t)l->id};
  from_ip(&pcb->remote_ip, pcb->remote_port, &e.addr);
  emit(&e);
  return ERR_OK;
}

static void conn_drop_pcb(struct conn *c, bool rst) {
  if (c->upcb) {
    udp_remove(c->upcb);
    c->upcb = NULL;
  }
  if (!c->pcb) return;
  struct tcp_pcb *pcb = c->pcb;
  c->pcb = NULL;
  tcp_arg(pcb, NULL);
  if (c->listener) {
    tcp_accept(pcb, NULL);
    tcp_close(pcb);
    return;
  }
  tcp_recv(pcb, NULL);
  tcp_sent(pcb, NULL);
  tcp_err(pcb, NULL);
  if (rst || tcp_close(pcb) != ERR_OK) tcp_abort(pcb);
}

static void tenant_del(void *ctx, struct nk_sl_tenant *t) {
  (void)ctx;
  /* Its sockets die with it; the ids stay until the engine's CLOSE, as the protocol says. */
  for (uint32_t id = 0; id < NK_SL_MAX_SOCKS; id++) {
    struct conn *c = conns[id];
    if (!c || c->t != t) continue;
    conn_drop_pcb(c, true);
    if (c->rxq) pbuf_free(c->rxq);
    c->rxq = NULL;
    c->attached = false;
    c->t = NULL;
  }
  for (struct tnetif **p = &tnetifs; *p; p = &(*p)->next)
    if ((*p)->t == t) {
      struct tnetif *tn = *p;
      *p = tn->next;
      netif_remove(&tn->nif);
      free(tn);
      break;
    }
  t->user = NULL;
}

/* ---- datagrams ---- */

static uint8_t dgram_buf[65536];

static void on_udp(void *arg, struct udp_pcb *pcb, struct pbuf *p, const ip_addr_t *addr,
                   u16_t port) {
  (void)pcb;
  struct conn *c = arg;
  struct nk_addr src;
  from_ip(addr, port, &src);
  u16_t n = pbuf_copy_partial(p, dgram_buf, p->tot_len, 0);
  pbuf_free(p);
  if (c && c->t) nk_sl_dgram_post(sl, c->id, &src, dgram_buf, n);
  if (!in_loop) nk_sl_flush(sl);
}

static void udp_sendto_req(struct conn *c, const struct nk_nqe *e) {
  /* The payload leaves the area whatever happens to it next: the area stays in step. */
  if (!nk_sl_dgram_take(sl, e, dgram_buf)) {
    fprintf(stderr, "netkernel-lwip: a SENDTO out of step with the datagram area\n");
    return;
  }
  if (!c || !c->upcb || !c->t) return;
  struct pbuf *p = pbuf_alloc(PBUF_TRANSPORT, (u16_t)e->len, PBUF_RAM);
  if (!p) return; /* dropped, as UDP may */
  memcpy(p->payload, dgram_buf, e->len);
  if (e->addr.family == 0) {
    udp_send(c->upcb, p);
  } else if (e->addr.family == c->family) {
    ip_addr_t ip;
    to_ip(&e->addr, &ip);
    udp_sendto(c->upcb, p, &ip, lwip_ntohs(e->addr.port));
  }
  pbuf_free(p);
}

/* An address the engine names must be the tenant's own: a second check, the engine's is first. */
static bool tenant_owns(const struct nk_sl_tenant *t, const struct nk_addr *a) {
  const struct nk_addr *own = a->family == AF_INET ? &t->ipv4 : &t->ipv6;
  return a->family == own->family && !memcmp(a->addr, own->addr, a->family == AF_INET ? 4 : 16);
}

/* The options lwIP has; the values are Linux's. (TCP_* numbers from <netinet/tcp.h>, which
 * cannot be included next to lwIP's headers.) */
#define LINUX_IPPROTO_TCP   6
#define LINUX_TCP_NODELAY   1
#define LINUX_TCP_KEEPIDLE  4
#define LINUX_TCP_KEEPINTVL 5
#define LINUX_TCP_KEEPCNT   6
#define LINUX_TCP_CORK      3
static void setopt(struct conn *c, int level, int name, int v) {
  if (level == LINUX_IPPROTO_TCP && name == LINUX_TCP_CORK && !v) {
    /* Uncorking pushes what is queued at once, Nagle or not (nginx corks around sendfile
     * with Nagle on and relies on this: without it each keep-alive response's body waited
     * for the client's delayed ACK, 40 ms). lwIP has no cork: only this push. */
    bool nodelay = tcp_nagle_disabled(c->pcb);
    tcp_nagle_disable(c->pcb);
    tcp_output(c->pcb);
    if (!nodelay) tcp_nagle_enable(c->pcb);
    return;
  }
  if (level == SOL_SOCKET && name == SO_KEEPALIVE) {
    if (v) ip_set_option(c->pcb, SOF_KEEPALIVE);
    else ip_reset_option(c->pcb, SOF_KEEPALIVE);
  } else if (level == LINUX_IPPROTO_TCP && name == LINUX_TCP_NODELAY) {
    if (v) tcp_nagle_disable(c->pcb);
    else tcp_nagle_enable(c->pcb);
  } else if (level == LINUX_IPPROTO_TCP && v > 0) {
    if (name == LINUX_TCP_KEEPIDLE) c->pcb->keep_idle = (u32_t)v * 1000;
    else if (name == LINUX_TCP_KEEPINTVL) c->pcb->keep_intvl = (u32_t)v * 1000;
    else if (name == LINUX_TCP_KEEPCNT) c->pcb->keep_cnt = (u32_t)v;
  }
}

static void request(void *ctx, const struct nk_nqe *e) {
  (void)ctx;
  struct conn *c = e->op == NK_SLQ_SOCKET || e->sock >= NK_SL_MAX_SOCKS ? NULL : conns[e->sock];
  switch (e->op) {
    case NK_SLQ_SOCKET: {
      struct nk_sl_tenant *t = nk_sl_tenant(sl, e->tenant);
      int fam = e->arg;
      if (!t || !t->user) return nk_sl_reply(sl, e, 0, -ENETDOWN, NULL);
      if (fam != AF_INET && fam != AF_INET6) return nk_sl_reply(sl, e, 0, -EAFNOSUPPORT, NULL);
      if (e->arg2 == SOCK_DGRAM) {
        struct conn *n = conn_new(t, fam);
        struct udp_pcb *u =
            n ? udp_new_ip_type(fam == AF_INET ? IPADDR_TYPE_V4 : IPADDR_TYPE_V6) : NULL;
        if (!u) {
          if (n) conns[n->id] = NULL;
          free(n);
          return nk_sl_reply(sl, e, 0, -ENOBUFS, NULL);
        }
        udp_bind_netif(u, &((struct tnetif *)t->user)->nif);
        udp_recv(u, on_udp, n);
        n->upcb = u;
        return nk_sl_reply(sl, e, n->id, 0, NULL);
      }
      if (e->arg2 != SOCK_STREAM) return nk_sl_reply(sl, e, 0, -EPROTONOSUPPORT, NULL);
      struct conn *n = conn_new(t, fam);
      struct tcp_pcb *pcb =
          n ? tcp_new_ip_type(fam == AF_INET ? IPADDR_TYPE_V4 : IPADDR_TYPE_V6) : NULL;
      if (!pcb) {
        if (n) conns[n->id] = NULL;
        free(n);
        return nk_sl_reply(sl, e, 0, -ENOBUFS, NULL);
      }
      ip_set_option(pcb, SOF_REUSEADDR);
      tcp_bind_netif(pcb, &((struct tnetif *)t->user)->nif);
      n->pcb = pcb;
      watch(n);
      return nk_sl_reply(sl, e, n->id, 0, NULL);
    }
    case NK_SLQ_BIND: {
      if (!c || (!c->pcb && !c->upcb) || !c->t) return nk_sl_reply(sl, e, e->sock, -EBADF, NULL);
      if (e->addr.family != c->family || !tenant_owns(c->t, &e->addr))
        return nk_sl_reply(sl, e, e->sock, -EADDRNOTAVAIL, NULL);
      ip_addr_t ip;
      to_ip(&e->addr, &ip);
      err_t r = c->upcb ? udp_bind(c->upcb, &ip, lwip_ntohs(e->addr.port))
                        : tcp_bind(c->pcb, &ip, lwip_ntohs(e->addr.port));
      struct nk_addr a = e->addr;
      a.port = lwip_htons(c->upcb ? c->upcb->local_port : c->pcb->local_port);
      return nk_sl_reply(sl, e, e->sock, -lwip_errno(r), &a);
    }
    case NK_SLQ_LISTEN: {
      if (c && c->upcb) return nk_sl_reply(sl, e, e->sock, -EOPNOTSUPP, NULL);
      if (!c || !c->pcb) return nk_sl_reply(sl, e, e->sock, -EBADF, NULL);
      err_t r = ERR_OK;
      u8_t backlog = e->arg <= 0 ? 1 : e->arg > 255 ? 255 : (u8_t)e->arg;
      struct tcp_pcb *l = tcp_listen_with_backlog_and_err(c->pcb, backlog, &r);
      if (!l) return nk_sl_reply(sl, e, e->sock, -lwip_errno(r ? r : ERR_MEM), NULL);
      c->pcb = l; /* lwIP freed the old pcb */
      c->listener = true;
      tcp_arg(l, c);
      tcp_accept(l, on_accept);
      return nk_sl_reply(sl, e, e->sock, 0, NULL);
    }
    case NK_SLQ_CONNECT: {
      if (!c || (!c->pcb && !c->upcb)) return nk_sl_reply(sl, e, e->sock, -EBADF, NULL);
      if (e->addr.family != c->family) return nk_sl_reply(sl, e, e->sock, -EAFNOSUPPORT, NULL);
      ip_addr_t ip;
      to_ip(&e->addr, &ip);
      if (c->upcb) /* a datagram socket: only its peer's datagrams from now on */
        return nk_sl_reply(sl, e, e->sock,
                           -lwip_errno(udp_connect(c->upcb, &ip, lwip_ntohs(e->addr.port))), NULL);
      c->connecting = true;
      err_t r = tcp_connect(c->pcb, &ip, lwip_ntohs(e->addr.port), on_connected);
      if (r != ERR_OK) c->connecting = false;
      return nk_sl_reply(sl, e, e->sock, -lwip_errno(r), NULL);
    }
    case NK_SLQ_ATTACH:
      if (!c || !c->t) return;
      if (!nk_sl_stream_attach(sl, &c->st, e)) {
        emit(&(struct nk_nqe){.op = NK_SLE_ERROR, .sock = c->id, .arg = EFAULT});
        return;
      }
      c->attached = true;
      drain_rx(c);
      return;
    case NK_SLQ_SEND:
      if (!c || !c->attached) return;
      c->st.tx_avail += e->len;
      push_tx(c);
      return;
    case NK_SLQ_RECV:
      if (!c || !c->attached) return;
      c->st.rx_credit += e->len;
      drain_rx(c);
      return;
    case NK_SLQ_SHUTDOWN:
      if (!c) return;
      c->shut_pending = true;
      push_tx(c);
      return;
    case NK_SLQ_SENDTO:
      udp_sendto_req(c, e);
      return;
    case NK_SLQ_SETOPT:
      if (c && c->pcb && !c->listener) setopt(c, e->arg, (int)e->arg2, (int)e->len);
      return;
    case NK_SLQ_CLOSE:
      if (!c) return;
      conn_drop_pcb(c, e->arg != 0);
      if (c->rxq) pbuf_free(c->rxq);
      conns[c->id] = NULL;
      emit(&(struct nk_nqe){.op = NK_SLE_FREED, .sock = c->id});
      free(c);
      return;
  }
}

/* The engine went away (it crashed, or is being replaced): its sockets, and the tenants it
 * gave us, are over. Every connection is reset, so peers learn at once rather than at their
 * next timeout; the stack itself (ARP, the TAP) stays, for the next engine. */
static void engine_gone(void) {
  for (uint32_t id = 0; id < NK_SL_MAX_SOCKS; id++) {
    struct conn *c = conns[id];
    if (!c) continue;
    conn_drop_pcb(c, true);
    if (c->rxq) pbuf_free(c->rxq);
    conns[id] = NULL;
    free(c);
  }
  while (tnetifs) {
    struct tnetif *tn = tnetifs;
    tnetifs = tn->next;
    netif_remove(&tn->nif);
    free(tn);
  }
}

static const struct nk_sl_handlers handlers = {
    .tenant_add = tenant_add,
    .tenant_del = tenant_del,
    .request = request,
};

static int tap_open(const char *name) {
  int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
  if (fd < 0) return -errno;
  struct ifreq ifr;
  memset(&ifr, 0, sizeof(ifr));
  snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
  int hdr = sizeof(struct virtio_net_hdr);
  if (ioctl(fd, TUNSETIFF, &ifr) < 0 || ioctl(fd, TUNSETVNETHDRSZ, &hdr) < 0 ||
      ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) < 0) {
    int e = errno;
    close(fd);
    return -e;
  }
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  return fd;
}

static void usage(void) {
  fprintf(stderr,
          "usage: netkernel-lwip --engine PATH --tap NAME [--index N] [--prefix4 LEN] "
          "[--prefix6 LEN]\n"
          "  Serves a NetKernel engine's sockets with lwIP on a TAP device (run by the daemon\n"
          "  in the NSM's network namespace; see docs/servicelib.md).\n");
}

int main(int argc, char **argv) {
  const char *engine = NULL, *tap = NULL;
  static const struct option opts[] = {
      {"engine", required_argument, 0, 'e'},  {"tap", required_argument, 0, 't'},
      {"index", required_argument, 0, 'i'},   {"prefix4", required_argument, 0, '4'},
      {"prefix6", required_argument, 0, '6'}, {0, 0, 0, 0}};
  int o;
  while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
    switch (o) {
      case 'e':
        engine = optarg;
        break;
      case 't':
        tap = optarg;
        break;
      case 'i':
        nsm_index = atoi(optarg) & 0xff;
        break;
      case '4':
        prefix4 = atoi(optarg);
        break;
      case '6':
        prefix6 = atoi(optarg);
        break;
      default:
        usage();
        return 2;
    }
  }
  if (!engine || !tap || prefix4 < 0 || prefix4 > 32) {
    usage();
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  tapfd = tap_open(tap);
  if (tapfd < 0) {
    fprintf(stderr, "netkernel-lwip: cannot attach to TAP %s: %s\n", tap, strerror(-tapfd));
    return 1;
  }
  tcpip_init(NULL, NULL);
  char err[256];
  sl = nk_sl_connect(engine, err, sizeof(err));
  if (!sl) {
    fprintf(stderr, "netkernel-lwip: %s\n", err);
    return 1;
  }
  fprintf(stderr, "netkernel-lwip: serving %s on %s (lwIP %s)\n", engine, tap, LWIP_VERSION_STRING);
  int ctl, bell;
  nk_sl_fds(sl, &ctl, &bell);
  uint64_t last_work = now_ns();
  in_loop = 1;
  for (;;) {
    if (!sl) {
      /* Wait for the next engine (the daemon restarts a dead one at once); a stack that came
       * back on its own keeps its ARP and NDP state, and needs no restart of its own. */
      struct timespec pause = {0, 20 * 1000 * 1000};
      nanosleep(&pause, NULL);
      LOCK_TCPIP_CORE();
      tap_read_batch(); /* frames for the tenants that were: dropped, not queued up */
      UNLOCK_TCPIP_CORE();
      if (!(sl = nk_sl_connect(engine, err, sizeof(err)))) continue;
      fprintf(stderr, "netkernel-lwip: serving %s again\n", engine);
      nk_sl_fds(sl, &ctl, &bell);
      last_work = now_ns();
    }
    LOCK_TCPIP_CORE();
    int frames = tap_read_batch();
    int reqs = nk_sl_dispatch(sl, &handlers, NULL, 256);
    gso_flush();
    nk_sl_flush(sl);
    UNLOCK_TCPIP_CORE();
    if (reqs < 0) {
      fprintf(stderr, "netkernel-lwip: the engine went away: its connections are reset\n");
      LOCK_TCPIP_CORE();
      engine_gone();
      gso_flush(); /* the resets go out now */
      UNLOCK_TCPIP_CORE();
      nk_sl_close(sl);
      sl = NULL;
      continue;
    }
    uint64_t now = now_ns();
    if (frames || reqs) {
      last_work = now;
      continue;
    }
    if (now - last_work < SPIN_NS) continue;
    LOCK_TCPIP_CORE();
    bool sleep = nk_sl_may_sleep(sl);
    UNLOCK_TCPIP_CORE();
    if (!sleep) continue;
    struct pollfd p[3] = {{.fd = tapfd, .events = POLLIN},
                          {.fd = ctl, .events = POLLIN},
                          {.fd = bell, .events = POLLIN}};
    poll(p, 3, -1);
    nk_sl_awake(sl);
    last_work = now_ns();
  }
}
