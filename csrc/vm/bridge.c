/* netkernel-vm-bridge: the host half of a VM tenant's network. Started in the tenant's sandbox
 * (as the tenant, like any tenant program) as
 *
 *     netkernel-vm-bridge PORT_FD -- qemu-system-x86_64 ARGS...
 *
 * it registers with the engine as GuestLib does, gives the tenant's region to QEMU as an
 * ivshmem-plain device (the guest's programs map it: bytes never cross the port), starts QEMU
 * and then plays GuestLib towards the engine for the guest's agent (csrc/vm/net.c) over the
 * network port PORT_FD (include/netkernel/vmnet.h): one engine control connection per guest
 * control connection, one host proxy pair per guest proxy, their records relayed. It exits
 * with QEMU.
 *
 * Everything the engine sees comes from this tenant process, so the engine trusts it no more
 * than any tenant program; what the guest sends here is checked before it is acted on.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "netkernel/abi.h"
#include "netkernel/fdpass.h"
#include "netkernel/vmnet.h"
#include "port.h"

#define MAX_CONNS 1024

enum kind { K_PORT = 1, K_CTL, K_PROXY, K_QEMU, K_DNS };

struct conn { /* an engine control connection, for one of the guest's */
  int fd;
  bool pending;    /* a request of the guest's waits for the engine's reply */
  uint32_t new_id; /* the proxy id its pending request brings, or 0 */
  int new_fd;      /* that proxy's host end until the reply */
};

static struct conn conns[MAX_CONNS];
/* By id: the host proxy's "guest" end (the engine holds the other). */
static struct nk_vm_proxies proxies;
static uint32_t next_host_id = 1;
static int ep, port, doorbell = -1, dns = -1;
static const char *engine_path;

static void die(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "netkernel-vm-bridge: ");
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  exit(1);
}

static uint64_t tag(enum kind k, uint32_t v) { return (uint64_t)k << 32 | v; }

static struct nk_vm_proxy *proxy_of(uint32_t id) { return nk_vm_proxy(&proxies, id); }

static void put(uint16_t type, uint32_t a, uint32_t b, const void *p, uint32_t len) {
  if (!nk_vm_put(port, type, a, b, p, len)) die("the network port failed: %s", strerror(errno));
}

static int engine_connect(void) {
  int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  struct sockaddr_un un = {.sun_family = AF_UNIX};
  strncpy(un.sun_path, engine_path, sizeof(un.sun_path) - 1);
  if (fd >= 0 && connect(fd, (struct sockaddr *)&un, sizeof(un)) == 0) return fd;
  if (fd >= 0) close(fd);
  return -1;
}

static void close_fd(int fd) { close(fd); }

static void drop_proxy(uint32_t id, struct nk_vm_proxy *p) {
  (void)id;
  if (p->fd >= 0) close(p->fd); /* also leaves the epoll set */
  p->fd = -1;
  p->blocked = false;
}

/* The engine's reply on a control connection. */
static void on_ctl(uint32_t c) {
  struct conn *k = &conns[c];
  struct nk_rep rep;
  /* REGISTER's region and doorbell are closed: the guest has its own. */
  ssize_t n = nk_recv_with_fds(k->fd, &rep, sizeof(rep), NULL, 0, MSG_CMSG_CLOEXEC | MSG_DONTWAIT,
                               close_fd);
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  if (n != (ssize_t)sizeof(rep)) { /* the engine went away: the guest's GuestLib is told so */
    memset(&rep, 0, sizeof(rep));
    rep.err = -ENETDOWN;
    close(k->fd);
    k->fd = -1;
  }
  if (!k->pending) return; /* nothing asked: nothing to answer */
  k->pending = false;
  if (k->new_id) {
    struct nk_vm_proxy *p = proxy_of(k->new_id);
    if (rep.err == 0 && p && p->fd < 0) {
      p->fd = k->new_fd;
      struct epoll_event ev = {.events = EPOLLIN, .data.u64 = tag(K_PROXY, k->new_id)};
      epoll_ctl(ep, EPOLL_CTL_ADD, p->fd, &ev);
    } else {
      close(k->new_fd);
    }
    k->new_id = 0;
    k->new_fd = -1;
  }
  put(NK_VMNET_CTL_REP, c, 0, &rep, sizeof(rep));
}

/* A record the engine sent on a proxy: READY, or NEWCONN with the new proxy. */
static void on_proxy(uint32_t id, uint32_t events) {
  struct nk_vm_proxy *p = proxy_of(id);
  if (!p || p->fd < 0) return;
  if (events & EPOLLOUT && p->blocked) { /* the engine took the blocker: the socket has room */
    p->blocked = false;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = tag(K_PROXY, id)};
    epoll_ctl(ep, EPOLL_CTL_MOD, p->fd, &ev);
    put(NK_VMNET_UNBLOCK, id, 0, NULL, 0);
  }
  if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
  for (;;) {
    char rec[sizeof(struct nk_newconn)];
    int fd;
    ssize_t n = nk_recv_with_fds(p->fd, rec, sizeof(rec), &fd, 1, MSG_CMSG_CLOEXEC | MSG_DONTWAIT,
                                 close_fd);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return;
    if (n <= 0) {
      /* The engine closed its end: the connection is over. The engine keeps the socket's slot
       * (its ring may hold bytes the program has not read) while this end exists, so it stays
       * open, unwatched, until the guest says the program's end is gone (NK_VMNET_CLOSED). */
      if (fd >= 0) close(fd);
      epoll_ctl(ep, EPOLL_CTL_DEL, p->fd, NULL);
      put(NK_VMNET_HUP, id, 0, NULL, 0);
      return;
    }
    if (n == sizeof(struct nk_newconn) && fd >= 0 && next_host_id < NK_VMNET_IDS) {
      uint32_t nid = NK_VMNET_HOSTID | next_host_id++;
      /* Ids are not reused: a million accepted connections per VM boot (enough for now;
       * reuse needs the guest to confirm it is done with the id). */
      struct nk_vm_proxy *q = proxy_of(nid);
      q->fd = fd;
      q->blocked = false;
      struct epoll_event ev = {.events = EPOLLIN, .data.u64 = tag(K_PROXY, nid)};
      epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
      put(NK_VMNET_NEWCONN, id, nid, rec, sizeof(struct nk_newconn));
    } else if (n == 1) {
      if (fd >= 0) close(fd);
      put(NK_VMNET_READY, id, 0, rec, 1);
    } else if (fd >= 0) {
      close(fd);
    }
  }
}

static void on_frame(struct nk_vmnet *h, char *p) {
  switch (h->type) {
    case NK_VMNET_CTL_OPEN:
      if (h->a >= MAX_CONNS || conns[h->a].fd >= 0) break;
      conns[h->a] = (struct conn){.fd = engine_connect(), .new_fd = -1};
      if (conns[h->a].fd >= 0) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = tag(K_CTL, h->a)};
        epoll_ctl(ep, EPOLL_CTL_ADD, conns[h->a].fd, &ev);
      }
      break;
    case NK_VMNET_CTL_CLOSE:
      if (h->a >= MAX_CONNS || conns[h->a].fd < 0) break;
      close(conns[h->a].fd);
      if (conns[h->a].new_fd >= 0) close(conns[h->a].new_fd);
      conns[h->a] = (struct conn){.fd = -1, .new_fd = -1};
      break;
    case NK_VMNET_CTL_REQ: {
      if (h->a >= MAX_CONNS || h->len != sizeof(struct nk_req)) break;
      struct conn *k = &conns[h->a];
      if (k->fd < 0 && (k->fd = engine_connect()) >= 0) {
        /* The engine died and the daemon started another (its regions are kept): this
         * connection goes to the new one, as GuestLib's would. */
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = tag(K_CTL, h->a)};
        epoll_ctl(ep, EPOLL_CTL_ADD, k->fd, &ev);
      }
      struct nk_req req;
      memcpy(&req, p, sizeof(req));
      bool brings = req.op == NK_OP_SOCKET || req.op == NK_OP_RENEW;
      struct nk_vm_proxy *np = brings ? proxy_of(h->b) : NULL;
      if (k->fd < 0 || k->pending || req.op == NK_OP_ATTACH ||
          (brings && (!np || np->fd >= 0 || (h->b & NK_VMNET_HOSTID)))) {
        struct nk_rep rep = {.err = k->fd < 0 ? -ENETDOWN : -EINVAL};
        put(NK_VMNET_CTL_REP, h->a, 0, &rep, sizeof(rep));
        break;
      }
      int sv[2] = {-1, -1};
      if (brings) {
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
          struct nk_rep rep = {.err = -errno};
          put(NK_VMNET_CTL_REP, h->a, 0, &rep, sizeof(rep));
          break;
        }
        int one = 1; /* one blocker record makes it unwritable, as GuestLib's end */
        setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &one, sizeof(one));
        k->new_id = h->b;
        k->new_fd = sv[0];
      }
      /* req.inode is the guest end's inode: the engine writes it into the slot, where the
       * guest's GuestLib looks its sockets up; it is not the engine's to check. */
      ssize_t n;
      do n = nk_send_with_fds(sendmsg, k->fd, &req, sizeof(req), &sv[1], brings, MSG_NOSIGNAL);
      while (n < 0 && errno == EINTR);
      if (sv[1] >= 0) close(sv[1]);
      k->pending = true;
      if (n < 0) on_ctl(h->a); /* reports the failure as the engine's absence */
      break;
    }
    case NK_VMNET_CLOSED: {
      struct nk_vm_proxy *q = proxy_of(h->a);
      if (q && q->fd >= 0) drop_proxy(h->a, q);
      break;
    }
    case NK_VMNET_BLOCK: {
      struct nk_vm_proxy *q = proxy_of(h->a);
      if (!q || q->fd < 0 || q->blocked) break;
      static const char blocker[NK_BLOCKER_SIZE];
      if (send(q->fd, blocker, sizeof(blocker), MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
        put(NK_VMNET_UNBLOCK, h->a, 0, NULL, 0); /* could not queue it: let the guest try again */
        break;
      }
      q->blocked = true;
      struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u64 = tag(K_PROXY, h->a)};
      epoll_ctl(ep, EPOLL_CTL_MOD, q->fd, &ev);
      break;
    }
    case NK_VMNET_DNS: /* the guest's resolver asks the tenant's, as a program here would */
      if (dns >= 0 && h->len >= 12) send(dns, p, h->len, MSG_DONTWAIT);
      break;
    case NK_VMNET_KICK:
      if (doorbell >= 0) {
        uint64_t one = 1;
        if (write(doorbell, &one, sizeof(one)) < 0) { /* full: the engine is awake anyway */
        }
      }
      break;
    default:
      break;
  }
}

static void on_port(void) {
  static struct nk_vm_reader in;
  int r = nk_vm_read(port, &in, on_frame);
  if (r == 0) die("the guest's network port closed");
  if (r < 0) die("a frame longer than %u bytes from the guest", NK_VMNET_MAX);
}

int main(int argc, char **argv) {
  if (argc < 4 || strcmp(argv[2], "--") != 0)
    die("usage: netkernel-vm-bridge PORT_FD -- qemu-system-x86_64 ARGS...");
  port = atoi(argv[1]);
  engine_path = getenv("NETKERNEL_SOCKET");
  if (!engine_path) die("NETKERNEL_SOCKET is not set");
  signal(SIGPIPE, SIG_IGN);
  for (int i = 0; i < MAX_CONNS; i++) conns[i] = (struct conn){.fd = -1, .new_fd = -1};
  if (nk_vm_proxies_init(&proxies) < 0) die("out of memory");

  /* Register, as GuestLib does: the region's memfd and the doorbell. */
  int ctl = engine_connect();
  if (ctl < 0) die("cannot reach the engine at %s: %s", engine_path, strerror(errno));
  struct nk_req req = {.op = NK_OP_REGISTER};
  if (nk_send_with_fds(sendmsg, ctl, &req, sizeof(req), NULL, 0, MSG_NOSIGNAL) < 0)
    die("register: %s", strerror(errno));
  struct nk_rep rep;
  int fds[2];
  if (nk_recv_with_fds(ctl, &rep, sizeof(rep), fds, 2, 0, close_fd) != sizeof(rep))
    die("register: no reply from the engine");
  if (rep.err || fds[0] < 0 || fds[1] < 0)
    die("the engine refused this VM: %s", strerror(-rep.err));
  doorbell = fds[1];
  struct stat st;
  if (fstat(fds[0], &st) < 0) die("region: %s", strerror(errno));
  if (st.st_size & (st.st_size - 1) || st.st_size > (1ll << 38))
    die("the tenant's region is %lld bytes: a guest maps at most 256 GiB, a power of two "
        "(NETKERNEL_SLOTS or NETKERNEL_RING_SIZE too large for VM tenants)",
        (long long)st.st_size);

  /* QEMU, with the region as an ivshmem-plain device. It keeps the memfd open (not CLOEXEC). */
  int rfd = fcntl(fds[0], F_DUPFD, 100);
  close(fds[0]);
  char obj[200], dev[] = "ivshmem-plain,memdev=nkregion";
  snprintf(obj, sizeof(obj),
           "memory-backend-file,id=nkregion,mem-path=/proc/self/fd/%d,size=%lld,share=on", rfd,
           (long long)st.st_size);
  char **qargv = calloc((size_t)argc + 8, sizeof(*qargv));
  int n = 0;
  for (int i = 3; i < argc; i++) qargv[n++] = argv[i];
  qargv[n++] = "-object";
  qargv[n++] = obj;
  qargv[n++] = "-device";
  qargv[n++] = dev;
  qargv[n] = NULL;
  pid_t parent = getpid();
  pid_t qemu = fork();
  if (qemu == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL); /* the VM does not outlive its network */
    if (getppid() != parent) _exit(1);
    close(port);
    close(ctl);
    close(doorbell);
    execvp(qargv[0], qargv);
    fprintf(stderr, "netkernel-vm-bridge: %s: %s\n", qargv[0], strerror(errno));
    _exit(127);
  }
  if (qemu < 0) die("fork: %s", strerror(errno));
  close(rfd);

  ep = epoll_create1(EPOLL_CLOEXEC);
  /* The engine's DNS stub in this namespace (what the tenant's resolv.conf names). */
  struct sockaddr_in stub = {.sin_family = AF_INET, .sin_port = htons(53)};
  inet_pton(AF_INET, NK_DNS_STUB, &stub.sin_addr);
  dns = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (dns >= 0 && connect(dns, (struct sockaddr *)&stub, sizeof(stub)) == 0) {
    struct epoll_event dev = {.events = EPOLLIN, .data.u64 = tag(K_DNS, 0)};
    epoll_ctl(ep, EPOLL_CTL_ADD, dns, &dev);
  }
  int pfd = (int)syscall(SYS_pidfd_open, qemu, 0);
  struct epoll_event ev = {.events = EPOLLIN, .data.u64 = tag(K_PORT, 0)};
  epoll_ctl(ep, EPOLL_CTL_ADD, port, &ev);
  ev = (struct epoll_event){.events = EPOLLIN, .data.u64 = tag(K_QEMU, 0)};
  if (pfd >= 0) epoll_ctl(ep, EPOLL_CTL_ADD, pfd, &ev);
  for (;;) {
    struct epoll_event evs[64];
    int k = epoll_wait(ep, evs, 64, pfd >= 0 ? -1 : 1000);
    if (k < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
    int status;
    if (waitpid(qemu, &status, WNOHANG) == qemu)
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    for (int i = 0; i < k; i++) {
      uint32_t v = (uint32_t)evs[i].data.u64;
      switch ((enum kind)(evs[i].data.u64 >> 32)) {
        case K_PORT:
          on_port();
          break;
        case K_CTL:
          if (conns[v].fd >= 0) on_ctl(v);
          break;
        case K_PROXY:
          on_proxy(v, evs[i].events);
          break;
        case K_QEMU:
          break; /* reaped above */
        case K_DNS: {
          char ans[NK_VMNET_MAX];
          ssize_t r;
          while ((r = recv(dns, ans, sizeof(ans), MSG_DONTWAIT)) > 0)
            put(NK_VMNET_DNS_ANSWER, 0, 0, ans, (uint32_t)r);
          break;
        }
      }
    }
  }
}
