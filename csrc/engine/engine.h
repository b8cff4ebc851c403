/* CoreEngine internals.
 *
 * The engine is one thread: an epoll loop over the control and admin sockets, the engine ends
 * of every proxy fd, every NSM socket and each tenant's doorbell eventfd, plus a scan of the
 * tenants' doorbell bits while it polls. Nothing here is shared with another thread.
 *
 * Trust: everything inside a tenant region can be written by the tenant at any time. Engine
 * state (struct nk_esock, struct nk_tenant) lives in engine memory only; values read from the
 * region are read once and checked (indices, lengths, slot numbers, opcodes).
 */
#ifndef NK_ENGINE_H
#define NK_ENGINE_H

#include <netinet/in.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include "netkernel/abi.h"
#include "netkernel/addr.h"
#include "netkernel/fdpass.h"
#include "netkernel/ring.h"

extern int nk_debug;
#define NK_LOG(lvl, fmt, ...)                                                                \
  do {                                                                                       \
    if (nk_debug >= (lvl)) fprintf(stderr, "engine %s: " fmt "\n", __func__, ##__VA_ARGS__); \
  } while (0)
#define NK_INFO(fmt, ...) fprintf(stderr, "engine: " fmt "\n", ##__VA_ARGS__)
/* Structured events for the daemon's log: "engine: event=NAME key=value ...". */
#define NK_EVENT(name, fmt, ...) fprintf(stderr, "engine: event=" name " " fmt "\n", ##__VA_ARGS__)

/* What an epoll event points at. */
enum nk_htype {
  NK_H_CTL_LISTEN = 1,
  NK_H_ADMIN_LISTEN,
  NK_H_CTL,
  NK_H_ADMIN,
  NK_H_PROXY,
  NK_H_ENDPOINT, /* a kernel socket of an endpoint (idx: which) */
  NK_H_DOORBELL,
  NK_H_DNS,
  NK_H_DNS_UP,
  NK_H_SIGNAL,
  NK_H_NSM,    /* an NSM kind's own descriptor (obj: the NSM, idx: which, its business) */
  NK_H_DIRECT, /* a program's TCP socket the engine carries itself (direct.c) */
};
struct nk_handle {
  enum nk_htype type;
  int idx;
  void *obj;
};

/* ---- policy (policy.c) ---- */
enum { NK_TX = 0, NK_RX = 1 };
/* A token bucket in bytes. rate 0 = unlimited. tokens may go negative (a datagram larger than
 * the tokens at hand is sent whole and paid for afterwards). */
struct nk_bucket {
  uint64_t rate;  /* bytes per second */
  uint64_t burst; /* bytes */
  double tokens;
  uint64_t last_ns;
};

/* Token buckets (policy.c): nk_bucket_set refills to the burst, nk_bucket_refill adds what
 * accrued and returns the tokens, nk_bucket_wait is the ns until need bytes are there. */
void nk_bucket_set(struct nk_bucket *b, uint64_t rate);
double nk_bucket_refill(struct nk_bucket *b, uint64_t now);
uint64_t nk_bucket_wait(const struct nk_bucket *b, uint64_t need);

/* Tenant-level congestion control (tenant_cc.c): one sending rate for all of a tenant's
 * connections through its NSM, cut when they see congestion and raised by its weight. */
struct nk_cc {
  bool on;
  uint64_t rate;   /* bytes/s the tenant may send now; 0 = not limited (no congestion yet) */
  double cut_rate; /* what it delivered when last cut (bytes/s) */
  struct nk_bucket bucket;
  uint64_t last_ns, last_tx_ns, cut_ns, started_ns;
  uint64_t tx_mark;   /* the tenant's tx_bytes at the last tick */
  double sent_bps;    /* what it sent, smoothed (bytes/s) */
  uint32_t qdelay_us; /* its connections' queueing delay (srtt - min_rtt), last tick */
  uint32_t flows;     /* connections sampled at the last tick */
  uint32_t cursor;    /* the slot the next sample starts at */
  uint64_t retrans;   /* segments its connections retransmitted, in all */
  uint64_t cuts;      /* times its rate was cut */
};

/* ---- NSMs and endpoints: one file per kind (csrc/nsm/), registered by name ---- */
struct nk_nsm;
struct nk_tenant;
struct nk_esock;

/* What the engine asks of a stack for one endpoint (a socket of that stack) of a NetKernel
 * socket. The per-socket code in csrc/engine/ (readiness mirror, rings, policy, accounting)
 * calls only these; csrc/nsm/kernel.c, csrc/nsm/external.c and csrc/nsm/shm.c implement them.
 * k names the endpoint (es->ep[k]); stream data always runs on endpoint 0. NULL entries are
 * things the kind does not do (see each). */
#define NK_NO_VERDICT 1 /* setopt: the stack cannot say; the engine asks a scratch socket */
struct nk_ep_ops {
  const char *name;
  /* Opens endpoint k: its family, nsm and loop are set (nsm NULL: the tenant's loopback). */
  int (*open)(struct nk_esock *es, int k);
  /* An option as the application set it, replayed on every endpoint opened afterwards:
   * 0, -errno, or NK_NO_VERDICT. */
  int (*setopt)(struct nk_esock *es, int k, int level, int name, const void *val, socklen_t len);
  /* bind(); source: the tenant's address for a connect (the port is picked at connect). */
  int (*bind)(struct nk_esock *es, int k, const struct nk_addr *a, bool source);
  uint16_t (*port)(struct nk_esock *es, int k); /* the local port it got, network order */
  /* The stack's view of an address (false: the engine uses the tenant's address). */
  bool (*address)(struct nk_esock *es, int k, bool peer, struct nk_addr *out);
  int (*listen)(struct nk_esock *es, int k, int backlog);
  /* Hand the connections waiting on listener endpoint k to nk_sock_accepted(), at most
   * *budget of them (NULL: they come from the stack as events). */
  void (*accept)(struct nk_esock *l, int k, int *budget);
  /* Connect endpoint 0: 0 done, 1 under way (the stack calls nk_sock_connected()), -errno. */
  int (*connect)(struct nk_esock *es, const struct nk_addr *dst);
  /* Stream data on endpoint 0: the transmit ring to the stack (then the write shutdown the
   * application asked for, once flushed), and the stack into the receive ring. */
  void (*transmit)(struct nk_esock *es);
  void (*receive)(struct nk_esock *es);
  /* One datagram at transmit ring position pos (dst family 0: the connected peer), with the
   * control messages ctl (checked: nk_dgram_cmsgs_ok; a stack without them ignores them):
   * bytes taken, -EAGAIN to try again when the stack has room, another -errno: dropped. */
  int (*send_dgram)(struct nk_esock *es, int k, const struct nk_addr *dst, uint32_t pos,
                    uint32_t len, const void *ctl, size_t ctl_len);
  void (*recv_dgrams)(struct nk_esock *es, int k); /* NULL: they come as events */
  void (*shutdown_rd)(struct nk_esock *es);
  /* The application closed es: flush endpoint 0 and close it; true when es may be freed. */
  bool (*finish)(struct nk_esock *es);
  void (*close)(struct nk_esock *es, int k, bool rst);
  /* Endpoint k (new, renamed, or a listener pausing) wants these events. */
  void (*watch)(struct nk_esock *es, int k, uint32_t events);
  /* getsockopt() on endpoint k as its stack sees it (TCP_INFO for `conns`, say): 0 or -errno.
   * NULL: the stack cannot be asked; the engine answers from a scratch socket given the
   * options the application set. */
  int (*getopt)(struct nk_esock *es, int k, int level, int name, void *val, socklen_t *len);
};

/* A kind of NSM. Each csrc/nsm/ file defines one and registers it (NK_NSM_TYPE); the operator
 * names it in nsm-add as "TYPE" or "TYPE:ARG". */
struct nk_nsm_type {
  const char *type;
  const struct nk_ep_ops *ep; /* its sockets' endpoints */
  bool kernel_sockets;        /* its sockets are kernel sockets in the NSM's namespace */
  int (*init)(struct nk_nsm *m, const char *arg); /* arg: after "TYPE:", or NULL */
  void (*fini)(struct nk_nsm *m);
  void (*tenant_on)(struct nk_nsm *m, struct nk_tenant *t); /* t has sockets on m from now */
  void (*tenant_gone)(struct nk_nsm *m, struct nk_tenant *t);
  void (*forget)(struct nk_nsm *m, struct nk_esock *es); /* es is freed: drop references */
  int (*is_up)(struct nk_nsm *m);                        /* NULL: always */
  uint32_t (*connects)(struct nk_nsm *m);                /* processes that served it so far */
  bool (*poll)(struct nk_nsm *m); /* while the engine polls: true when it found work */
  void (*set_sleeping)(struct nk_nsm *m, bool v); /* the engine is about to sleep, or woke */
  void (*event)(struct nk_nsm *m, int which, uint32_t ev); /* its epoll handles (NK_H_NSM) */
  /* A live upgrade (keep.c): give the next engine what it takes to go on serving m's sockets
   * (nk_keep_nsm_out); false: its sockets are not handed over (they read as reset). Its init
   * takes the record back (nk_keep_nsm_in); resume runs once every tenant and socket is
   * back. NULL: its sockets are plain descriptors, handed over with them. */
  bool (*hand_over)(struct nk_nsm *m);
  void (*resume)(struct nk_nsm *m);
  struct nk_nsm_type *next;
};
void nk_nsm_register(struct nk_nsm_type *type);
#define NK_NSM_TYPE(var) \
  __attribute__((constructor)) static void register_##var(void) { nk_nsm_register(&var); }

struct nk_nsm {
  char name[32];
  int netns_fd;
  const struct nk_nsm_type *type;
  uint64_t bandwidth_bps;   /* the operator's figure for the uplink; 0 = not shared by weight */
  struct nk_bucket link[2]; /* what the engine lets through, per direction, when shared */
  uint64_t bytes[2];
  void *priv;       /* the kind's own state */
  bool handed_over; /* a live upgrade gave its state to the next engine */
  struct nk_nsm *next;
};
extern const struct nk_ep_ops nk_kernel_ep_ops; /* also the tenant's loopback */
extern const struct nk_ep_ops nk_shm_ep_ops;
/* ---- tenants ---- */
struct nk_esock;
#define NK_DNS_PENDING 256
struct nk_tenant {
  uint32_t id;
  char name[64];
  uint64_t netns_ino;
  int netns_fd;
  struct nk_nsm *nsm;
  struct nk_addr ipv4, ipv6;
  int memfd;
  uint8_t *base;
  uint64_t size;
  struct nk_region *rg;
  struct nk_slot *slots;
  uint8_t *rings;
  uint32_t nslots, ring_size, words;
  uint64_t ring_bytes; /* the open sockets' rings, at their sizes: what max_memory counts */
  int doorbell_fd;
  struct nk_handle h_doorbell, h_dns, h_dns_up;
  struct nk_esock **socks;
  uint32_t nsocks;
  uint32_t *free_stack; /* freed slots, most recently freed on top: reuse warm ring pages */
  uint32_t nfree;
  uint32_t cold;      /* free_stack[0, cold) have had their ring pages given back */
  uint32_t trim_next; /* where trim() goes on in free_stack: it punches a batch per pass */
  uint32_t hwm;       /* slots from here up were never used (and nothing in the region is committed
                 * for them): loops over sockets stop here */
  uint64_t tx_bytes, rx_bytes;
  struct nk_esock *bulk; /* sockets whose rings moved bulk data since last given back */
  uint64_t rings_shrunk; /* rings given back while their sockets stayed open */
  /* Operator policy (tenant-set). Rates in bytes/s, 0 = unlimited; limits 0 = none. */
  uint64_t rate[2];
  uint32_t weight;
  uint32_t max_sockets;
  uint64_t max_memory;
  struct nk_bucket bucket[2];
  /* Weighted sharing of an NSM's link: virtual time = bytes moved / weight. The tenant
   * counts as backlogged while it keeps asking for bandwidth (active_until). */
  double vt[2];
  uint64_t active_until[2];
  uint64_t refused_sockets, refused_memory;
  uint64_t last_refusal_log_ns;
  uint32_t fds;  /* engine descriptors held for it (fds.c): sockets' shares, control conns */
  uint32_t ctls; /* its control connections */
  uint32_t ctls_refused; /* of which over its share, held until answered EMFILE */
  /* Sockets with work, served round-robin between tenants (a tenant with many busy sockets
   * does not lengthen the round for the others). */
  struct nk_esock *active_head, *active_tail;
  bool in_active;
  bool carried;         /* had more work than one round's budget */
  uint64_t cpu_used_ns; /* when it last had the engine, or sat out a round for it */
  double cpu_tokens;    /* engine time (ns) it may still use while others contend */
  uint64_t cpu_last_ns;
  uint64_t cpu_total_ns, cpu_skips; /* engine time spent on it; rounds it sat out */
  /* The most bytes one service of it moved in the current and in the last 10 ms window
   * (+1, so that 0 means "not served"): services that all moved less than NK_SERVICE_BYTES
   * mark a tenant doing request-sized work, which keeps the others' services short. */
  uint64_t win_start_ns, win_max, prev_win_max;
  uint32_t throttled_socks;           /* its sockets waiting for rate or link tokens */
  struct nk_esock *refused_listeners; /* told accept_err: looked at again when a socket goes */
  /* Throttled sockets woken, per direction; how late past their tokens' due time in total;
   * and the rate tokens kept for it over those late wakes (policy.c, late_wake). */
  uint64_t throttle_wakes[2], throttle_late_ns[2], rate_late_credit[2];
  struct nk_cc cc;    /* tenant-level congestion control (tenant_cc.c) */
  bool shm;           /* its connections to colocated tenants may use the shared-memory path */
  uint32_t ephemeral; /* next local port for a shared-memory connection */
  struct nk_tenant *next_active;
  int dns_fd, dns_up_fd;
  struct nk_bucket dns_bucket; /* queries per second it may have relayed (dns.c) */
  uint64_t dns_relayed, dns_dropped;
  uint64_t region_trimmed; /* bytes of free slots' ring pages taken back (tenant.c) */
  int diag_fd;             /* NETLINK_SOCK_DIAG in the tenant's namespace */
  bool dead;               /* deleted: freed after the current event batch */
  /* Queries relayed and not answered yet. Each goes upstream under an id of the engine's
   * (index | random << 8): two queries that share an id (glibc's A and AAAA can, one time
   * in 256; two programs can too) never take each other's answer (dns.c). */
  struct nk_dns_query {
    uint16_t id;    /* the client's */
    uint16_t up_id; /* the one sent upstream */
    bool used;
    uint64_t sent_ns;
    struct sockaddr_storage client;
    socklen_t len;
  } dns_pending[NK_DNS_PENDING];
  uint32_t dns_next; /* where the search for a free entry starts */
  struct nk_tenant *next;
};

/* v6 + v4 on the NSM and v6 on loopback for a dual-stack listener, plus two during a move. */
#define NK_MAX_EP   6
#define NK_MAX_OPTS 24
struct nk_opt {
  int level, name;
  socklen_t len;
  uint8_t val[64];
};
/* The options an application set on a socket, kept to replay on endpoints opened later. A
 * listener's set is shared by the connections it accepts (refs) until one of them sets an
 * option of its own: most sockets set none, and an accepted one costs no copy. */
struct nk_optset {
  uint32_t refs;
  int n;
  struct nk_opt o[NK_MAX_OPTS];
};

/* One socket of a stack that a NetKernel socket uses: a listener has one per address family
 * and stack (and its loopback), a connection one. */
struct nk_endpoint {
  const struct nk_ep_ops *ops;
  struct nk_nsm *nsm; /* NULL: the tenant's loopback, or the shared-memory path */
  int family;
  bool loop;      /* lives in the tenant's own namespace (its loopback) */
  bool listening; /* listen() succeeded on it */
  int fd;         /* a kernel socket, or -1 */
  uint32_t id;    /* an external NSM's socket id (NK_EXT_LOST while that NSM is down) */
  uint16_t port;  /* an external NSM's: the port it bound, network order */
  struct nk_handle h;
};
#define NK_EXT_LOST UINT32_MAX

struct nk_esock {
  struct nk_tenant *t;
  uint32_t slot, gen;
  int kind;                  /* NK_KIND_* */
  int family;                /* as the application created it */
  int type;                  /* SOCK_STREAM / SOCK_DGRAM */
  int proxy;                 /* engine end of the proxy socketpair */
  bool proxy_rights_refused; /* SO_PASSRIGHTS is off on it: closing it cannot block */
  struct nk_handle h_proxy;
  struct nk_endpoint ep[NK_MAX_EP];
  int ep_count;
  uint32_t ep_fds; /* descriptors taken for endpoints beyond the first (nk_ep_open) */
  /* Endpoints closed whose stack may still touch the socket's rings (an external NSM until
   * it reports FREED): the slot stays reserved while any are. */
  uint32_t ep_held;
  uint32_t state;
  bool can_read, can_write;
  bool watch_out;          /* EPOLLOUT armed on endpoint 0's kernel socket */
  bool peer_fin;           /* the kernel socket reported RDHUP/HUP/ERR */
  bool kernel_err;         /* the kernel socket reported ERR: SO_ERROR may hold a reset */
  bool guest_shut_wr;      /* the application called shutdown(SHUT_WR) */
  bool proxy_in_tenant_ns; /* the guest made the socketpair (in its namespace) */
  bool zombie;             /* engine end closed to show POLLHUP; freed when the guest end is gone */
  bool adopted;            /* a zombie an adopted region brought (keep.c) */
  bool kept;               /* a listener the daemon keeps a record of (keep.c) */
  uint64_t guest_ino;      /* inode of the guest end, from sock_diag (zombies only) */
  struct nk_esock *next_zombie, **prev_zombie; /* engine.zombies */
  /* direct.c: the relay's end of a program's connection, carried by the engine in place of
   * GuestLib (-1: none); its cached edge-triggered readiness and hang-up; the program's FIN
   * read, ours passed on; a reset to give it. */
  int direct;
  struct nk_handle h_direct;
  bool direct_rd, direct_wr, direct_hup, direct_eof, direct_shut, direct_rst;
  bool blocker_held;
  bool shut_wr_pending;
  bool closing; /* the guest closed its last reference: flush, then free */
  bool dead;    /* reset: no more I/O */
  bool active;
  bool freed; /* on the graveyard: events still queued for it are ignored */
  bool v6only;
  bool want_cmsg; /* the application asked for control messages on received datagrams */
  bool linger0;
  struct linger linger;    /* as the application set it (SO_LINGER is not passed on) */
  uint32_t sndbuf, rcvbuf; /* SO_SNDBUF / SO_RCVBUF as the program set them, 0 = not set */
  bool bound;
  bool pending_listen_out; /* listener waits for room on its proxy end */
  bool accept_refused;     /* listener: its tenant is at a limit (nk_sock_may_accept) */
  struct nk_esock *next_refused;
  int backlog;
  int pending_fd; /* accepted connection waiting for delivery */
  struct nk_newconn pending_msg;
  uint32_t ready_sent;
  uint32_t seen_at_ready;     /* guest's rx_seen when the last READY record went out */
  uint64_t rx_bytes_at_ready; /* rx_bytes then */
  struct nk_addr bind_addr;
  /* The addresses the operator sees (conns) and the guest is told: engine-private, copied
   * into the slot for the guest, never read back from there. */
  struct nk_addr local, peer;
  struct nk_optset *opts; /* NULL: none set */
  uint64_t tx_bytes, rx_bytes;
  uint64_t cc_tx_mark; /* tx_bytes when tenant_cc last sampled it */
  uint32_t cc_retrans; /* its TCP_INFO total_retrans then */
  uint64_t cc_acked;   /* and bytes_acked */
  struct nk_ring tx, rx;
  /* Rings that moved bulk data give their pages back once the connection is quiet
   * (tenant.c: shrink): on its tenant's bulk list from NK_TRIM_BYTES moved until then. */
  bool on_bulk;
  uint64_t bytes_at_shrink; /* tx_bytes + rx_bytes when its rings were last given back */
  uint64_t bytes_at_check;  /* ... at the last pass that looked at it */
  struct nk_esock *next_bulk, **prev_bulk;
  struct nk_esock *next_active;
  bool throttled;   /* waiting for tokens: on engine.throttled until throttle_until */
  int throttle_dir; /* NK_TX / NK_RX: which direction's tokens */
  uint64_t throttle_until;
  struct nk_esock *next_throttled;
  /* Shared-memory path (csrc/nsm/shm.c): a connection between two tenant sockets on this
   * host. The engine copies the sender's transmit ring into the receiver's receive ring. */
  bool shm;                   /* this connection runs (or ran) on it: for `conns` */
  struct nk_esock *shm_peer;  /* the other end; NULL once it is gone */
  bool shm_waiting;           /* handed over, its peer not yet (keep.c): wait, not gone */
  bool shm_fin_sent;          /* our end of the byte stream was delivered to the peer */
  bool in_port_map;           /* listener reachable by the shared-memory path */
  struct nk_esock *next_port; /* chain of listeners hashed by port */
  /* External NSM (csrc/nsm/external.c): the engine hands out ring positions: the NSM may
   * take transmit bytes up to tx_off and write received bytes up to rx_credit. */
  struct {
    bool attached;
    bool fin; /* the NSM reported the peer's FIN */
    uint32_t tx_off, rx_credit;
  } ext;
};

/* ---- the engine ---- */
struct nk_engine {
  int epoll_fd;
  int self_netns;
  uint64_t self_netns_ino;
  struct nk_nsm *nsms;
  struct nk_tenant *tenants;
  uint32_t next_tenant_id;
  struct nk_tenant *active_tenants; /* round-robin ring of tenants with active sockets */
  struct nk_esock *throttled;
  uint64_t next_wake_ns;      /* earliest throttle_until, UINT64_MAX when none */
  struct nk_esock *graveyard; /* freed sockets, released after the current event batch */
  struct nk_tenant *dead_tenants;
  struct nk_addr dns_upstream;
  uint64_t spin_ns;
  uint32_t nzombies;
  struct nk_esock *zombies; /* swept for guest ends gone: a list, not a scan of all slots */
  uint64_t next_sweep_ns;
  /* Most bytes one service of a socket moves each way: unbounded while one tenant has the
   * engine, NK_SERVICE_BYTES while several contend (see run_active). */
  uint64_t service_bytes;
  uint64_t fd_limit;      /* RLIMIT_NOFILE, raised to the hard limit (fds.c) */
  uint64_t fds_taken;     /* descriptors held for tenants */
  uint64_t fd_headroom;   /* what tenants may hold in all (fds.c) */
  uint64_t fd_reserve;    /* kept for each tenant */
  uint64_t fds_committed; /* the sum over tenants of the larger of fds and fd_reserve */
  int spare_fd;
  uint32_t record_size; /* kernel memory one NEWCONN record takes on a proxy (listener.c) */
  uint64_t next_trim_ns;
  uint64_t next_cc_ns; /* next tenant_cc tick; UINT64_MAX while no such tenant sends */
  bool stop;
};
extern struct nk_engine engine;

/* fds.c */
#define NK_MAX_PASSED_FDS 253 /* SCM_MAX_FD: the most one message can carry */
/* Control space for a message from a socket a tenant can set options on: every descriptor,
 * plus credentials, a pidfd and a security label the kernel adds when asked (SO_PASSCRED,
 * SO_PASSPIDFD, SO_PASSSEC). Less, and the kernel closes what does not fit in our thread. */
#define NK_UNTRUSTED_CMSG_SPACE                                                     \
  (CMSG_SPACE(sizeof(int) * NK_MAX_PASSED_FDS) + CMSG_SPACE(sizeof(struct ucred)) + \
   CMSG_SPACE(sizeof(int)) + CMSG_SPACE(4096))
#define NK_SOCK_FDS          2   /* a socket's: its proxy end and one endpoint (more: ep_fds) */
#define NK_TENANT_FD_RESERVE 512 /* kept for each tenant however busy the others are */
#define NK_CTL_FDS           256 /* control connections a tenant may have besides its sockets */
#define NK_CTL_REFUSED_HELD  8   /* refused ones held for their answer at once, per tenant */
int nk_fds_init(void);
void nk_fds_recount(void); /* tenants or NSMs came or went */
void nk_close_later(int fd);
void nk_close_later_proxy(int fd); /* a proxy end the tenant made, checked when it came */
bool nk_fd_refuse_rights(int fd, bool fresh);
ssize_t nk_recv_untrusted(int fd, void *buf, size_t len, int flags);
int nk_fds_from_cmsg(struct msghdr *mh, int *out, int want);
int nk_accept_or_drop(int lfd, struct sockaddr *sa, socklen_t *len, bool *dropped);
uint64_t nk_tenant_fd_limit(const struct nk_tenant *t);
int nk_fds_may_take(const struct nk_tenant *t, uint32_t n);
int nk_fds_take(struct nk_tenant *t, uint32_t n);
void nk_fds_give(struct nk_tenant *t, uint32_t n);

/* keep.c: what outlives the engine. A listener's record, as the daemon keeps it between one
 * engine and the next; NK_KEPT_VERSION changes with its layout (an engine refuses others). */
#define NK_KEPT_VERSION 1
struct nk_kept_listener {
  uint32_t version, size;
  uint32_t slot, gen;
  int32_t family, backlog;
  struct nk_addr bind_addr;
  uint32_t sndbuf, rcvbuf;
  uint8_t v6only, linger0, pad[2];
  struct linger linger;
  int32_t nopts;
  struct nk_opt opts[NK_MAX_OPTS];
};
/* A socket as a live upgrade hands it over: the engine's own record of it, copied whole
 * (hence esock_size: an engine built with another layout refuses it), with what its
 * pointers named, by name, and which descriptors came with it (fdmask, in NK_KEPT_FD_*
 * order). */
enum { NK_KEPT_EP_NONE, NK_KEPT_EP_KERNEL, NK_KEPT_EP_SHM, NK_KEPT_EP_NSM, NK_KEPT_EP_OTHER };
enum { NK_KEPT_FD_PROXY, NK_KEPT_FD_DIRECT, NK_KEPT_FD_PENDING, NK_KEPT_FD_EP };
struct nk_kept_sock {
  uint32_t version, size, esock_size, fdmask;
  uint8_t ep_kind[NK_MAX_EP];
  char ep_nsm[NK_MAX_EP][32];
  char peer_tenant[64]; /* its shared-memory peer, if any */
  uint32_t peer_slot, peer_gen;
  int32_t nopts;
  struct nk_opt opts[NK_MAX_OPTS];
  struct nk_esock es;
};
struct nk_kept_counters {
  uint32_t version, id; /* id: the tenant's, kept (an external NSM knows tenants by it) */
  uint64_t tx_bytes, rx_bytes, refused_sockets, refused_memory, rings_shrunk, region_trimmed;
  uint64_t dns_relayed, dns_dropped, cpu_total_ns, cpu_skips;
};
int nk_keep_handover(void); /* sockets handed over, or -errno */
const char *nk_state_version(void);
bool nk_keep_ctl(struct nk_tenant *t, int fd);
bool nk_keep_nsm_out(struct nk_nsm *m, const void *rec, size_t len, const int *fds, int nfds);
/* The record a kind's hand_over sent for m (malloc'd, the caller frees), or NULL. */
void *nk_keep_nsm_in(const char *name, size_t *len, int *fds, int *nfds);
uint32_t nk_keep_tenant_id(const char *name); /* the last engine's id for it, or 0 */
void nk_keep_finish(void);
int nk_keep_init(int fd);
void nk_keep_region(struct nk_tenant *t);
void nk_keep_forget(struct nk_tenant *t);
void nk_keep_listener(struct nk_esock *es);
void nk_keep_drop(struct nk_esock *es);
bool nk_keep_take_region(const char *name, int *memfd, int *doorbell);
void nk_keep_restore(struct nk_tenant *t);

/* main.c */
int nk_epoll_add(int fd, uint32_t events, struct nk_handle *h);
int nk_epoll_mod(int fd, uint32_t events, struct nk_handle *h);
void nk_epoll_del(int fd);
int nk_unix_listen(const char *path, int type, mode_t mode, int backlog);
uint64_t nk_now_ns(void);

/* tenant.c */
struct nk_nsm *nk_nsm_find(const char *name);
int nk_nsm_add(const char *name, const char *netns_path, const char *type);
int nk_nsm_del(struct nk_nsm *m);
int nk_tenant_move(struct nk_tenant *t, struct nk_nsm *to);
int nk_tenant_move_done(struct nk_tenant *t);
struct nk_tenant *nk_tenant_find(const char *name);
struct nk_tenant *nk_tenant_by_ino(uint64_t ino);
int nk_tenant_add(const char *name, const char *netns_path, const char *nsm, const char *v4,
                  const char *v6, uint32_t slots, uint32_t ring, struct nk_tenant **out);
int nk_tenant_del(struct nk_tenant *t);
void nk_sock_size_rings(struct nk_esock *es);
struct nk_esock *nk_esock_alloc(struct nk_tenant *t, int proxy, int family, int type,
                                uint64_t inode);
struct nk_esock *nk_esock_alloc_at(struct nk_tenant *t, uint32_t slot, uint32_t gen, int proxy,
                                   int family, int type);
struct nk_esock *nk_esock_get(struct nk_tenant *t, uint32_t slot, uint32_t gen);
void nk_esock_free(struct nk_esock *es);
void nk_esock_reap(void); /* also releases deleted tenants and closed control connections */
void nk_control_reap(void);
bool nk_tenant_scan_doorbells(struct nk_tenant *t);

/* The per-socket code, by concern. Endpoints (endpoint.c): a socket's sockets on stacks. */
#define NK_EP_DATA_EVENTS (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET) /* see kernel.c */
int nk_ep_open(struct nk_esock *es, int family, struct nk_nsm *m);    /* m NULL: loopback */
int nk_ep_open_here(struct nk_esock *es, int family, bool loop);      /* the tenant's NSM now */
int nk_ep_reopen(struct nk_esock *es, int k); /* endpoint k again, after its stack came back */
int nk_ep_find(const struct nk_esock *es, const struct nk_addr *dst); /* -1: none fits */
void nk_ep_close(struct nk_esock *es, int k, bool rst);
void nk_ep_drop_last(struct nk_esock *es); /* close the endpoint just opened */
void nk_ep_close_all(struct nk_esock *es, bool rst);

/* ---- a program's connection carried directly (direct.c) ---- */
int nk_direct_attach(struct nk_esock *es, int fd);
void nk_direct_event(struct nk_esock *es, uint32_t ev);
void nk_direct_in(struct nk_esock *es);
void nk_direct_out(struct nk_esock *es);
void nk_direct_close(struct nk_esock *es);
void nk_direct_watch(struct nk_esock *es); /* its descriptor on a new engine's epoll */
void nk_ep_move(struct nk_esock *es, int to, int from, uint32_t events);
void nk_ep_keep_only(struct nk_esock *es, int k);
void nk_ep_local(struct nk_esock *es, int k, struct nk_addr *out);
void nk_ep_set(struct nk_esock *es, int k, const struct nk_endpoint *e);
void nk_ep_replay_opts(struct nk_esock *es, int k);    /* the options set so far, on endpoint k */
int nk_ep_listen_on_port(struct nk_esock *es, int k);  /* the tenant's address, es's port */
struct nk_nsm *nk_sock_nsm(const struct nk_esock *es); /* NULL: loopback or shared memory */
void nk_sock_count(struct nk_esock *es, int dir, uint64_t n); /* bytes moved, for stats */

/* readiness.c: the proxy fd mirrors the socket's state to the guest */
enum nk_end {
  NK_END_BROKEN,  /* the tenant broke its socket (bad ring): reset, no SO_ERROR */
  NK_END_ERROR,   /* the connection failed (reset by the peer, its NSM gone): SO_ERROR */
  NK_END_REFUSED, /* connect failed: SO_ERROR; the socket is finished, as after Linux's */
};
void nk_sock_fail(struct nk_esock *es, int err, enum nk_end how);
void nk_sock_activate(struct nk_esock *es);
void nk_sock_maybe_ready(struct nk_esock *es);
void nk_sock_release_blocker(struct nk_esock *es);
void nk_sock_end_of_stream(struct nk_esock *es); /* rx EOF reached the guest's ring */
void nk_sock_proxy_shutdown(struct nk_esock *es);
void nk_sock_hang_up(struct nk_esock *es);
void nk_sock_close_proxy(struct nk_esock *es);
void nk_sock_sweep_zombies(void);
void nk_sock_unzombie(struct nk_esock *es); /* off engine.zombies */
void nk_sock_adopt_zombie(struct nk_esock *es, uint64_t guest_ino);
void nk_sock_relink_zombie(struct nk_esock *es); /* a zombie handed over: on engine.zombies */
void nk_sock_proxy_event(struct nk_esock *es, uint32_t ev);
bool nk_sock_rx_stall(struct nk_esock *es, uint32_t need); /* true: still short of room */
void nk_sock_set_local(struct nk_esock *es, const struct nk_addr *a);
void nk_sock_set_peer(struct nk_esock *es, const struct nk_addr *a);
struct nk_slot *nk_sock_slot(struct nk_esock *es);

/* stream.c: service, close, shutdown */
void nk_sock_service(struct nk_esock *es);
bool nk_sock_finish_stream(struct nk_esock *es); /* the finish of a stack with TCP's close */
int nk_sock_shutdown(struct nk_esock *es, int how);

/* dgram.c */
void nk_dgram_service(struct nk_esock *es);
bool nk_dgram_cmsgs_ok(const void *ctl, size_t len);

/* listener.c */
void nk_sock_calibrate(void);
int nk_sock_listen(struct nk_esock *es, int backlog);
void nk_listener_service(struct nk_esock *l);
bool nk_sock_accept_queue_full(struct nk_esock *l);
bool nk_sock_may_accept(struct nk_esock *l); /* before taking a connection off a stack */
void nk_sock_accept_retry(struct nk_tenant *t);
void nk_sock_accept_forget(struct nk_esock *l); /* off the tenant's refused listeners */
/* A connection a stack accepted for listener l (endpoint e, a template), as accept() makes it
 * in l's tenant and delivers it; local NULL: the tenant's address and l's port. NULL when the
 * tenant is at its limits or l's queue is full: the stack refuses it with a reset. */
struct nk_esock *nk_sock_accepted(struct nk_esock *l, const struct nk_endpoint *e,
                                  const struct nk_addr *local, const struct nk_addr *peer);

/* connect.c */
int nk_sock_bind(struct nk_esock *es, const struct nk_addr *a);
int nk_sock_connect(struct nk_esock *es, const struct nk_addr *a, int *in_progress);
void nk_sock_connected(struct nk_esock *es, int err); /* a stack answered a connect */

/* move.c: a tenant moving to another NSM, an NSM coming back */
int nk_sock_listen_on(struct nk_esock *es, struct nk_nsm *m);
void nk_sock_drop_listeners_off(struct nk_esock *es, struct nk_nsm *keep);
void nk_sock_relisten(struct nk_esock *es, int k); /* endpoint k's stack came back */

/* sockopt.c: the options a tenant may set, checked as the kernel checks an unprivileged process */
int nk_sock_setopt(struct nk_esock *es, int level, int name, const void *val, socklen_t len);
int nk_sock_setopt_known(struct nk_esock *es, int level, int name, int v);
int nk_sock_getopt(struct nk_esock *es, int level, int name, void *val, socklen_t *len);
int nk_setsockopt_unprivileged(int fd, int level, int name, const void *val, socklen_t len);
void nk_sockopt_init(void); /* opens the sockets plain options are checked on */
void nk_opts_share(struct nk_esock *to, const struct nk_esock *from); /* accept: inherited */
void nk_opts_drop(struct nk_esock *es);

/* csrc/nsm/kernel.c */
int nk_in_netns(int netns_fd, int domain, int type); /* socket() inside a namespace */
int nk_in_netns_proto(int netns_fd, int domain, int type, int protocol);
void nk_kernel_event(struct nk_esock *es, int k, uint32_t ev);

/* csrc/nsm/shm.c: the shared-memory path, a route connect() takes before any NSM */
void nk_shm_listener_add(struct nk_esock *l);
void nk_shm_listener_del(struct nk_esock *l);
int nk_shm_connect(struct nk_esock *es, const struct nk_addr *dst); /* 1 done, 0 not ours, -errno */

/* policy.c */
#define NK_QUANTUM 16384u /* smallest grant worth a system call for a stream */
/* Most bytes one service of a socket moves while several tenants contend: small while one
 * of them does request-sized work (its request waits behind at most one such service),
 * larger when all of them move bulk. Each sendmsg/readv wakes the peer across
 * cores and pushes what it queued; 16 bulk tenants on one engine thread took 1.3x the CPU
 * per Gbit/s of 16 namespaces with 256 KiB services, 2.1x with 64 KiB (docs/benchmarks.md). */
#define NK_SERVICE_BYTES      65536u
#define NK_BULK_SERVICE_BYTES 262144u
#define NK_SHM_SERVICE_BYTES  262144u
uint64_t nk_policy_grant(struct nk_esock *es, struct nk_nsm *m, int dir, uint64_t want,
                         uint64_t need);
void nk_policy_charge(struct nk_esock *es, struct nk_nsm *m, int dir, uint64_t n);
void nk_policy_unthrottle(struct nk_esock *es);
void nk_policy_wake_due(uint64_t now);
int nk_tenant_admit(struct nk_tenant *t);
int nk_tenant_admissible(struct nk_tenant *t); /* the same check, nothing taken */
bool nk_policy_dgram(struct nk_esock *es, struct nk_nsm *m, int dir, uint32_t len);
void nk_policy_charge_dgram(struct nk_esock *es, struct nk_nsm *m, int dir, uint32_t len);
void nk_tenant_set_rate(struct nk_tenant *t, int dir, uint64_t bits_per_s);
/* tenant_cc.c */
void nk_cc_set(struct nk_tenant *t, bool on);
void nk_cc_tick(uint64_t now);
uint64_t nk_cc_grant(struct nk_tenant *t, uint64_t now, uint64_t need, uint64_t *wait);
void nk_cc_charge(struct nk_tenant *t, uint64_t n);
void nk_nsm_set_bandwidth(struct nk_nsm *m, uint64_t bits_per_s);
uint64_t nk_tenant_memory(const struct nk_tenant *t);

/* tenant.c: the ring pages of free slots a tenant filled, taken back over max_memory */
/* A socket that moved more than this has touched more ring pages than a short connection:
 * they are given back when it closes, or once it is quiet. */
#define NK_TRIM_BYTES (16u * 1024u)
bool nk_tenant_trim_due(void);
void nk_tenant_bulk_add(struct nk_esock *es);
bool nk_tenant_trim_all(void); /* true: more to do soon */
uint64_t nk_tenant_region_bytes(const struct nk_tenant *t);

/* control.c, admin.c */
uint64_t nk_peer_netns(int fd, struct ucred *cred);
int nk_control_listen(const char *path, int fd);   /* fd >= 0: the daemon's socket */
void nk_control_serve(void);                       /* the daemon's socket: from now on */
unsigned nk_control_hand_over(void);               /* a live upgrade: every connection */
int nk_control_adopt(struct nk_tenant *t, int fd); /* one the last engine handed over */
void nk_control_event(struct nk_handle *h, uint32_t ev);
int nk_admin_listen(const char *path);
void nk_admin_event(struct nk_handle *h, uint32_t ev);

/* diag.c */
uint64_t nk_diag_peer_of_fd(struct nk_tenant *t, int fd);
int nk_diag_exists(struct nk_tenant *t, uint64_t ino);

/* dns.c */
int nk_dns_open(struct nk_tenant *t);
void nk_dns_close(struct nk_tenant *t);
int nk_dns_reopen_upstream(struct nk_tenant *t); /* after a move: relay through the new NSM */
void nk_dns_event(struct nk_tenant *t, bool upstream);

/* addr.c (conversions to and from sockaddr: netkernel/addr.h) */
int nk_addr_parse(const char *s, struct nk_addr *a);
void nk_addr_fmt(const struct nk_addr *a, char *buf, size_t len);

#endif
