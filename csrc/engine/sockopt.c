/* Socket options a tenant sets and reads.
 *
 * The engine runs as root, and a tenant's option reaches a kernel socket with the engine's
 * credentials and from the engine's address space. Two rules keep that from being a way up:
 *
 *  - An allowlist. Only the options below are offered; any other gets ENOPROTOOPT, Linux's
 *    answer for an option a protocol does not have (and a log line, so the operator learns
 *    what a program missed). Left out on purpose: every option whose value holds a pointer or
 *    a descriptor (filters, BPF programs, zero-copy receive), which would name the engine's
 *    memory or descriptors; options that would let a tenant leave its addresses (FREEBIND,
 *    encapsulation, IPsec policy) or override the operator's stack (TCP_CONGESTION, TCP_ULP),
 *    refused with EPERM, as are SO_BINDTODEVICE and SO_BINDTOIFINDEX (the NSM's devices).
 *  - The kernel's own verdict, as for an unprivileged process. The tenant holds no capability
 *    over the NSM's namespace, so every option is set with the engine's effective capabilities
 *    dropped for the call (restored after; capabilities are per thread): SO_MARK, SO_PRIORITY
 *    above 6, IP options, IPv6 hop-by-hop and destination options, SO_BUSY_POLL_BUDGET and
 *    the like then fail with exactly the errno Linux gives such a process.
 *
 * A socket with no kernel socket yet is checked on a scratch socket made in the namespace its
 * kernel sockets will live in (the NSM's; the tenant's own for an external NSM), never in the
 * engine's: a multicast join there would reach the host's interfaces.
 */
#include <errno.h>
#include <linux/capability.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <netinet/udp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>

#include "engine.h"

#ifndef SO_BUSY_POLL_BUDGET
#define SO_BUSY_POLL_BUDGET 70
#endif
#ifndef SO_PREFER_BUSY_POLL
#define SO_PREFER_BUSY_POLL 69
#endif
#ifndef SO_RCVMARK
#define SO_RCVMARK 75
#endif
#ifndef TCP_TX_DELAY
#define TCP_TX_DELAY 37
#endif
#ifndef IP_LOCAL_PORT_RANGE
#define IP_LOCAL_PORT_RANGE 51
#endif
#ifndef IPV6_FLOWINFO_SEND
#define IPV6_FLOWINFO_SEND 33
#endif
#ifndef IPV6_AUTOFLOWLABEL
#define IPV6_AUTOFLOWLABEL 70
#endif
#ifndef IPV6_MINHOPCOUNT
#define IPV6_MINHOPCOUNT 73
#endif
#ifndef IPV6_RECVORIGDSTADDR
#define IPV6_RECVORIGDSTADDR 74
#endif
#ifndef IPV6_MULTICAST_ALL
#define IPV6_MULTICAST_ALL 29
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif

enum { OFFER, REFUSE };
struct opt_rule {
  int level, name, verdict;
};

/* What a program may set. REFUSE: NetKernel's own policy, EPERM whatever the privileges. */
static const struct opt_rule rules[] = {
    {SOL_SOCKET, SO_REUSEADDR, OFFER},
    {SOL_SOCKET, SO_REUSEPORT, OFFER},
    {SOL_SOCKET, SO_KEEPALIVE, OFFER},
    {SOL_SOCKET, SO_BROADCAST, OFFER},
    {SOL_SOCKET, SO_SNDBUF, OFFER},
    {SOL_SOCKET, SO_RCVBUF, OFFER},
    {SOL_SOCKET, SO_SNDBUFFORCE, OFFER},
    {SOL_SOCKET, SO_RCVBUFFORCE, OFFER},
    {SOL_SOCKET, SO_RCVLOWAT, OFFER},
    {SOL_SOCKET, SO_PRIORITY, OFFER},
    {SOL_SOCKET, SO_OOBINLINE, OFFER},
    {SOL_SOCKET, SO_DONTROUTE, OFFER},
    {SOL_SOCKET, SO_MARK, OFFER},
    {SOL_SOCKET, SO_RCVMARK, OFFER},
    {SOL_SOCKET, SO_DEBUG, OFFER},
    {SOL_SOCKET, SO_BUSY_POLL, OFFER},
    /* The devices are the NSM's, not the tenant's (it sees only its lo): a program that
     * picked one from its own interfaces would pin its socket to the wrong one. */
    {SOL_SOCKET, SO_BINDTODEVICE, REFUSE},
    {SOL_SOCKET, SO_BINDTOIFINDEX, REFUSE},
    {SOL_SOCKET, SO_PREFER_BUSY_POLL, OFFER},
    {SOL_SOCKET, SO_BUSY_POLL_BUDGET, OFFER},
    {SOL_SOCKET, SO_TIMESTAMP, OFFER},
    {SOL_SOCKET, SO_TIMESTAMPNS, OFFER},
    {SOL_SOCKET, SO_INCOMING_CPU, OFFER},
    {SOL_SOCKET, SO_ZEROCOPY, OFFER},
    {SOL_SOCKET, SO_TXTIME, OFFER},
    {SOL_SOCKET, SO_MAX_PACING_RATE, OFFER},
    {SOL_SOCKET, SO_RCVTIMEO_OLD, OFFER},
    {SOL_SOCKET, SO_SNDTIMEO_OLD, OFFER},
    {SOL_SOCKET, SO_RCVTIMEO_NEW, OFFER},
    {SOL_SOCKET, SO_SNDTIMEO_NEW, OFFER},
    {SOL_SOCKET, SO_PASSCRED, OFFER},
    {IPPROTO_TCP, TCP_NODELAY, OFFER},
    {IPPROTO_TCP, TCP_MAXSEG, OFFER},
    {IPPROTO_TCP, TCP_CORK, OFFER},
    {IPPROTO_TCP, TCP_KEEPIDLE, OFFER},
    {IPPROTO_TCP, TCP_KEEPINTVL, OFFER},
    {IPPROTO_TCP, TCP_KEEPCNT, OFFER},
    {IPPROTO_TCP, TCP_SYNCNT, OFFER},
    {IPPROTO_TCP, TCP_LINGER2, OFFER},
    {IPPROTO_TCP, TCP_DEFER_ACCEPT, OFFER},
    {IPPROTO_TCP, TCP_WINDOW_CLAMP, OFFER},
    {IPPROTO_TCP, TCP_QUICKACK, OFFER},
    {IPPROTO_TCP, TCP_USER_TIMEOUT, OFFER},
    {IPPROTO_TCP, TCP_NOTSENT_LOWAT, OFFER},
    {IPPROTO_TCP, TCP_FASTOPEN, OFFER},
    {IPPROTO_TCP, TCP_FASTOPEN_CONNECT, OFFER},
    {IPPROTO_TCP, TCP_THIN_LINEAR_TIMEOUTS, OFFER},
    {IPPROTO_TCP, TCP_THIN_DUPACK, OFFER},
    {IPPROTO_TCP, TCP_INQ, OFFER},
    {IPPROTO_TCP, TCP_SAVE_SYN, OFFER},
    {IPPROTO_TCP, TCP_MD5SIG, OFFER},
    {IPPROTO_TCP, TCP_TX_DELAY, OFFER},
    {IPPROTO_TCP, TCP_REPAIR, OFFER},
    {IPPROTO_TCP, TCP_REPAIR_QUEUE, OFFER},
    {IPPROTO_TCP, TCP_QUEUE_SEQ, OFFER},
    {IPPROTO_TCP, TCP_REPAIR_OPTIONS, OFFER},
    {IPPROTO_TCP, TCP_REPAIR_WINDOW, OFFER},
    {IPPROTO_TCP, TCP_CONGESTION, REFUSE}, /* the operator chooses it, per NSM */
    {IPPROTO_TCP, TCP_ULP, REFUSE},        /* kernel TLS on the NSM's socket */
    {IPPROTO_IP, IP_TOS, OFFER},
    {IPPROTO_IP, IP_TTL, OFFER},
    {IPPROTO_IP, IP_OPTIONS, OFFER},
    {IPPROTO_IP, IP_RECVTOS, OFFER},
    {IPPROTO_IP, IP_RECVTTL, OFFER},
    {IPPROTO_IP, IP_PKTINFO, OFFER},
    {IPPROTO_IP, IP_RECVERR, OFFER},
    {IPPROTO_IP, IP_MTU_DISCOVER, OFFER},
    {IPPROTO_IP, IP_MULTICAST_IF, OFFER},
    {IPPROTO_IP, IP_MULTICAST_TTL, OFFER},
    {IPPROTO_IP, IP_MULTICAST_LOOP, OFFER},
    {IPPROTO_IP, IP_MULTICAST_ALL, OFFER},
    {IPPROTO_IP, IP_ADD_MEMBERSHIP, OFFER},
    {IPPROTO_IP, IP_DROP_MEMBERSHIP, OFFER},
    {IPPROTO_IP, IP_ADD_SOURCE_MEMBERSHIP, OFFER},
    {IPPROTO_IP, IP_DROP_SOURCE_MEMBERSHIP, OFFER},
    {IPPROTO_IP, IP_BLOCK_SOURCE, OFFER},
    {IPPROTO_IP, IP_UNBLOCK_SOURCE, OFFER},
    {IPPROTO_IP, MCAST_JOIN_GROUP, OFFER},
    {IPPROTO_IP, MCAST_LEAVE_GROUP, OFFER},
    {IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, OFFER},
    {IPPROTO_IP, IP_LOCAL_PORT_RANGE, OFFER},
    {IPPROTO_IP, IP_MINTTL, OFFER},
    {IPPROTO_IP, IP_RECVORIGDSTADDR, OFFER},
    {IPPROTO_IP, IP_TRANSPARENT, OFFER},
    {IPPROTO_IP, IP_FREEBIND, REFUSE}, /* a bind to an address not the tenant's */
    {IPPROTO_IPV6, IPV6_UNICAST_HOPS, OFFER},
    {IPPROTO_IPV6, IPV6_MULTICAST_IF, OFFER},
    {IPPROTO_IPV6, IPV6_MULTICAST_HOPS, OFFER},
    {IPPROTO_IPV6, IPV6_MULTICAST_LOOP, OFFER},
    {IPPROTO_IPV6, IPV6_MULTICAST_ALL, OFFER},
    {IPPROTO_IPV6, IPV6_JOIN_GROUP, OFFER},
    {IPPROTO_IPV6, IPV6_LEAVE_GROUP, OFFER},
    {IPPROTO_IPV6, MCAST_JOIN_GROUP, OFFER},
    {IPPROTO_IPV6, MCAST_LEAVE_GROUP, OFFER},
    {IPPROTO_IPV6, IPV6_TCLASS, OFFER},
    {IPPROTO_IPV6, IPV6_RECVTCLASS, OFFER},
    {IPPROTO_IPV6, IPV6_RECVPKTINFO, OFFER},
    {IPPROTO_IPV6, IPV6_RECVHOPLIMIT, OFFER},
    {IPPROTO_IPV6, IPV6_RECVERR, OFFER},
    {IPPROTO_IPV6, IPV6_MTU_DISCOVER, OFFER},
    {IPPROTO_IPV6, IPV6_MTU, OFFER},
    {IPPROTO_IPV6, IPV6_DONTFRAG, OFFER},
    {IPPROTO_IPV6, IPV6_ADDR_PREFERENCES, OFFER},
    {IPPROTO_IPV6, IPV6_AUTOFLOWLABEL, OFFER},
    {IPPROTO_IPV6, IPV6_FLOWINFO_SEND, OFFER},
    {IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, OFFER},
    {IPPROTO_IPV6, IPV6_MINHOPCOUNT, OFFER},
    {IPPROTO_IPV6, IPV6_HOPOPTS, OFFER},
    {IPPROTO_IPV6, IPV6_DSTOPTS, OFFER},
    {IPPROTO_IPV6, IPV6_RTHDRDSTOPTS, OFFER},
    {IPPROTO_IPV6, IPV6_RTHDR, OFFER},
    {IPPROTO_IPV6, IPV6_TRANSPARENT, OFFER},
    {IPPROTO_IPV6, IPV6_FREEBIND, REFUSE},
    {IPPROTO_UDP, UDP_CORK, OFFER},
    {IPPROTO_UDP, UDP_SEGMENT, OFFER},
    {IPPROTO_UDP, UDP_GRO, OFFER},
};

static int rule_for(int level, int name) {
  for (size_t i = 0; i < sizeof(rules) / sizeof(rules[0]); i++)
    if (rules[i].level == level && rules[i].name == name) return (int)i;
  return -1;
}

/* Options the kernel checks against their value alone: no capability test, no effect beyond
 * the socket, the same verdict whatever a new socket went through before. Programs set them
 * on nearly every connection (TCP_NODELAY, SO_REUSEADDR, SO_KEEPALIVE), so they skip the
 * capability dance and the scratch socket: up to 10 system calls fewer each (with
 * netkernel-crr, strace -c counted 68.6 engine calls per connection before, 56 after). */
static bool plain_option(int level, int name) {
  switch (level) {
    case SOL_SOCKET:
      return name == SO_REUSEADDR || name == SO_REUSEPORT || name == SO_KEEPALIVE ||
             name == SO_SNDBUF || name == SO_RCVBUF || name == SO_OOBINLINE || name == SO_BROADCAST;
    case IPPROTO_TCP:
      return name == TCP_NODELAY || name == TCP_CORK || name == TCP_KEEPIDLE ||
             name == TCP_KEEPINTVL || name == TCP_KEEPCNT || name == TCP_QUICKACK ||
             name == TCP_USER_TIMEOUT || name == TCP_DEFER_ACCEPT || name == TCP_NOTSENT_LOWAT ||
             name == TCP_SYNCNT || name == TCP_LINGER2 || name == TCP_MAXSEG;
    case IPPROTO_IP:
      return name == IP_TOS || name == IP_TTL;
    case IPPROTO_IPV6:
      return name == IPV6_UNICAST_HOPS || name == IPV6_TCLASS;
  }
  return false;
}

/* Where a plain option is checked for a socket with no kernel socket yet: one socket per
 * family and type, kept, in the engine's own namespace (a plain option reaches nothing past
 * the socket, so the namespace does not matter, and no setns() is needed). */
static int check_fds[2][2] = {{-1, -1}, {-1, -1}};

static int plain_check_socket(int family, int type) {
  int *fd = &check_fds[family == AF_INET6][type == SOCK_DGRAM];
  if (*fd < 0) *fd = socket(family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  return *fd;
}

void nk_sockopt_init(void) {
  for (int f = 0; f < 2; f++)
    for (int t = 0; t < 2; t++)
      plain_check_socket(f ? AF_INET6 : AF_INET, t ? SOCK_DGRAM : SOCK_STREAM);
}

/* setsockopt() as a process with no capabilities would do it: the effective set is emptied for
 * the call and restored after (the permitted set keeps them). */
int nk_setsockopt_unprivileged(int fd, int level, int name, const void *val, socklen_t len) {
  if (plain_option(level, name)) return setsockopt(fd, level, name, val, len) < 0 ? -errno : 0;
  struct __user_cap_header_struct h = {.version = _LINUX_CAPABILITY_VERSION_3};
  struct __user_cap_data_struct saved[2], none[2];
  bool dropped = syscall(SYS_capget, &h, saved) == 0;
  if (dropped) {
    memcpy(none, saved, sizeof(none));
    none[0].effective = none[1].effective = 0;
    dropped = syscall(SYS_capset, &h, none) == 0;
  }
  /* Never with the engine's own privileges: if they could not be dropped, refused. */
  if (!dropped) return -EPERM;
  int r = setsockopt(fd, level, name, val, len) < 0 ? -errno : 0;
  if (syscall(SYS_capset, &h, saved) < 0) {
    /* Without them the engine cannot enter namespaces: nothing would work. */
    NK_INFO("cannot restore the engine's capabilities: %s", strerror(errno));
    _exit(70);
  }
  return r;
}

/* A socket like es's in the namespace its kernel sockets live in, for a check or a read. */
static int scratch_socket(struct nk_esock *es) {
  struct nk_nsm *m = es->t->nsm;
  return nk_in_netns(m->type->kernel_sockets ? m->netns_fd : es->t->netns_fd, es->family, es->type);
}

void nk_opts_share(struct nk_esock *to, const struct nk_esock *from) {
  to->opts = from->opts;
  if (to->opts) to->opts->refs++;
}

void nk_opts_drop(struct nk_esock *es) {
  if (es->opts && --es->opts->refs == 0) free(es->opts);
  es->opts = NULL;
}

static void remember_opt(struct nk_esock *es, int level, int name, const void *val, socklen_t len) {
  if (len > sizeof(es->opts->o[0].val)) return;
  struct nk_optset *set = es->opts;
  if (!set || set->refs > 1) { /* none yet, or shared with the listener: a copy of its own */
    set = malloc(sizeof(*set));
    if (!set) return;
    if (es->opts) memcpy(set, es->opts, sizeof(*set));
    else set->n = 0;
    set->refs = 1;
    nk_opts_drop(es);
    es->opts = set;
  }
  int i;
  for (i = 0; i < set->n; i++)
    if (set->o[i].level == level && set->o[i].name == name) break;
  if (i == set->n) {
    if (set->n == NK_MAX_OPTS) return;
    set->n++;
  }
  set->o[i] = (struct nk_opt){.level = level, .name = name, .len = len};
  memcpy(set->o[i].val, val, len);
}

static void log_refused(struct nk_esock *es, int level, int name, int err) {
  uint64_t now = nk_now_ns();
  if (now - es->t->last_refusal_log_ns < 1000000000ull && es->t->last_refusal_log_ns) return;
  es->t->last_refusal_log_ns = now;
  NK_EVENT("sockopt_refused", "tenant=%s level=%d option=%d errno=%s", es->t->name, level, name,
           strerrorname_np(err));
}

int nk_sock_setopt(struct nk_esock *es, int level, int name, const void *val, socklen_t len) {
  if (level == IPPROTO_IPV6 && name == IPV6_V6ONLY) {
    if (es->family != AF_INET6) return -ENOPROTOOPT;
    if (len < sizeof(int)) return -EINVAL;
    if (es->bound) return -EINVAL;
    int v;
    memcpy(&v, val, sizeof(v));
    es->v6only = v != 0;
    return 0;
  }
  if (level == SOL_SOCKET && name == SO_LINGER) {
    /* Kept here, never given to the kernel socket: close() of a socket with a linger time
     * blocks, even a non-blocking one, and would stall the engine for every tenant. The
     * engine applies {1, 0} itself when it closes with a reset. */
    struct linger lg = {0};
    if (len < sizeof(lg)) return -EINVAL;
    memcpy(&lg, val, sizeof(lg));
    es->linger = lg;
    es->linger0 = lg.l_onoff && lg.l_linger == 0;
    return 0;
  }
  int rule = rule_for(level, name);
  if (rule < 0 || rules[rule].verdict == REFUSE) {
    int err = rule < 0 ? ENOPROTOOPT : EPERM;
    log_refused(es, level, name, err);
    return -err;
  }
  int err = 0;
  bool verdict = false;
  for (int k = 0; k < es->ep_count; k++) {
    if (!es->ep[k].ops->setopt) continue;
    int r = es->ep[k].ops->setopt(es, k, level, name, val, len);
    if (r == NK_NO_VERDICT) continue;
    verdict = true;
    if (r < 0 && !err) err = r;
  }
  if (!verdict) {
    /* Check against a scratch socket so the application sees Linux's verdict now. */
    bool plain = plain_option(level, name);
    int fd = plain ? plain_check_socket(es->family, es->type) : scratch_socket(es);
    if (fd >= 0) {
      err = nk_setsockopt_unprivileged(fd, level, name, val, len);
      if (!plain) close(fd);
    }
  }
  if (err) {
    log_refused(es, level, name, -err);
    return err;
  }
  remember_opt(es, level, name, val, len);
  if ((level == IPPROTO_IP && (name == IP_RECVTTL || name == IP_RECVTOS || name == IP_PKTINFO)) ||
      (level == IPPROTO_IPV6 &&
       (name == IPV6_RECVHOPLIMIT || name == IPV6_RECVTCLASS || name == IPV6_RECVPKTINFO)))
    es->want_cmsg = true; /* the kernel socket adds them; the engine passes them on */
  if (level == SOL_SOCKET && len >= sizeof(int)) { /* for the rings' sizes (tenant.c) */
    int v;
    memcpy(&v, val, sizeof(v));
    uint32_t size = v < 0 ? 0 : (uint32_t)v;
    if (name == SO_SNDBUF || name == SO_SNDBUFFORCE) es->sndbuf = size;
    if (name == SO_RCVBUF || name == SO_RCVBUFFORCE) es->rcvbuf = size;
  }
  return 0;
}

/* An option GuestLib recorded in the socket's slot (control.c take_preopts): one Linux takes
 * with any int value (netkernel/preopt.h), so a socket with no kernel socket yet only
 * remembers it, for its endpoints to take when they open; no check is needed. */
int nk_sock_setopt_known(struct nk_esock *es, int level, int name, int v) {
  if (es->ep_count) return nk_sock_setopt(es, level, name, &v, sizeof(v));
  remember_opt(es, level, name, &v, sizeof(v));
  return 0;
}

int nk_sock_getopt(struct nk_esock *es, int level, int name, void *val, socklen_t *len) {
  if (level == IPPROTO_TCP && name == TCP_ZEROCOPY_RECEIVE) return -EOPNOTSUPP; /* addresses */
  if (level == SOL_SOCKET && name == SO_LINGER) {
    if (*len < sizeof(es->linger)) return -EINVAL;
    memcpy(val, &es->linger, sizeof(es->linger));
    *len = sizeof(es->linger);
    return 0;
  }
  if (level != SOL_SOCKET && level != IPPROTO_TCP && level != IPPROTO_IP && level != IPPROTO_IPV6 &&
      level != IPPROTO_UDP)
    return -ENOPROTOOPT;
  if (level == IPPROTO_IPV6 && name == IPV6_V6ONLY) {
    if (es->family != AF_INET6) return -ENOPROTOOPT;
    int v = es->v6only;
    memcpy(val, &v, sizeof(v));
    *len = sizeof(v);
    return 0;
  }
  int ask = -1; /* an endpoint whose stack can answer, the NSM's rather than the loopback's */
  for (int k = 0; k < es->ep_count; k++)
    if (es->ep[k].ops->getopt && (!es->ep[k].loop || ask < 0)) ask = k;
  if (ask >= 0) return es->ep[ask].ops->getopt(es, ask, level, name, val, len);
  int fd = scratch_socket(es);
  if (fd < 0) return fd;
  for (int i = 0; es->opts && i < es->opts->n; i++) {
    const struct nk_opt *o = &es->opts->o[i];
    nk_setsockopt_unprivileged(fd, o->level, o->name, o->val, o->len);
  }
  int r = getsockopt(fd, level, name, val, len) < 0 ? -errno : 0;
  close(fd);
  return r;
}
