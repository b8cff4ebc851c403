/* netkernel-vm-agent: init (PID 1) of a VM tenant's guest, after the initramfs has mounted
 * the host's files (csrc/vm/init.sh). It runs the commands `netkernel vm exec` sends over the
 * exec port (include/netkernel/vmport.h): each in the guest's root (/mnt/root), in its own
 * session, with its stdin, stdout and stderr carried as frames and its exit status sent back
 * once its output is drained. As init it also reaps orphans, and powers the guest off when
 * told to.
 *
 * It is statically linked: it runs from the initramfs, before and beside the root it serves.
 * One thread, one poll loop; writes to the port block (the host's supervisor always reads).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "netkernel/vmport.h"
#include "vm.h"

#define ROOT NK_VM_ROOT

struct chan {
  bool used;
  pid_t pid; /* 0 once reaped */
  int status;
  int in, out, err; /* our ends of its pipes; -1 when closed */
  char *pending;    /* stdin bytes not yet taken by the command */
  size_t npending;
  bool in_eof; /* close stdin once pending is written */
};

static struct chan chans[NK_VMPORT_MAXCHAN];
static int port = -1;

void nk_vm_say(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "netkernel-vm-agent: ");
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
}

void nk_vm_write_all(int fd, const void *p, size_t n) {
  const char *c = p;
  while (n) {
    ssize_t w = write(fd, c, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      nk_vm_say("a port failed: %s", strerror(errno));
      reboot(RB_POWER_OFF); /* nobody can reach this guest any more */
      _exit(1);
    }
    c += w;
    n -= (size_t)w;
  }
}

static void send_frame(uint16_t type, uint16_t chan, const void *p, uint32_t len) {
  struct nk_vmframe h = {.len = len, .type = type, .chan = chan};
  char buf[sizeof(h) + NK_VMPORT_MAX];
  memcpy(buf, &h, sizeof(h));
  if (len) memcpy(buf + sizeof(h), p, len);
  nk_vm_write_all(port, buf, sizeof(h) + len); /* one write: a frame is never torn */
}

int nk_vm_open_port(const char *want) {
  for (int tries = 0; tries < 500; tries++) {
    DIR *d = opendir("/sys/class/virtio-ports");
    struct dirent *e;
    while (d && (e = readdir(d))) {
      if (e->d_name[0] == '.') continue;
      char path[300], name[64] = "";
      snprintf(path, sizeof(path), "/sys/class/virtio-ports/%s/name", e->d_name);
      FILE *f = fopen(path, "r");
      if (!f) continue;
      if (fgets(name, sizeof(name), f)) name[strcspn(name, "\n")] = 0;
      fclose(f);
      if (strcmp(name, want) != 0) continue;
      snprintf(path, sizeof(path), "/dev/%s", e->d_name);
      closedir(d);
      return open(path, O_RDWR | O_CLOEXEC);
    }
    if (d) closedir(d);
    usleep(10000);
  }
  errno = ENOENT;
  return -1;
}

static void close_fd(int *fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

/* Splits "a\0b\0\0" at *pos into a NULL-terminated vector (pointers into p); false if the
 * list does not end inside the payload. */
static bool take_list(char *p, uint32_t len, uint32_t *pos, char ***out) {
  size_t n = 0, cap = 8;
  char **v = malloc(cap * sizeof(*v));
  while (v) {
    if (*pos >= len) break;
    char *s = p + *pos;
    size_t l = strnlen(s, len - *pos);
    if (*pos + l >= len) break; /* not NUL-terminated */
    *pos += (uint32_t)l + 1;
    if (l == 0) {
      v[n] = NULL;
      *out = v;
      return true;
    }
    if (n + 1 == cap) {
      char **w = realloc(v, (cap *= 2) * sizeof(*v));
      if (!w) break;
      v = w;
    }
    v[n++] = s;
  }
  free(v);
  return false;
}

static void finish_if_done(uint16_t c) {
  struct chan *ch = &chans[c];
  if (!ch->used || ch->pid || ch->out >= 0 || ch->err >= 0) return;
  int32_t st = ch->status;
  send_frame(NK_VM_EXIT, c, &st, sizeof(st));
  close_fd(&ch->in);
  free(ch->pending);
  memset(ch, 0, sizeof(*ch));
  ch->in = ch->out = ch->err = -1;
}

static void start(uint16_t c, char *p, uint32_t len) {
  struct chan *ch = &chans[c];
  int32_t fail = 127;
  if (ch->used) { /* the host reused a live channel: refuse the new command */
    send_frame(NK_VM_STDERR, c, "netkernel-vm-agent: channel busy\n", 33);
    send_frame(NK_VM_EXIT, c, &fail, sizeof(fail));
    return;
  }
  uint32_t pos = 0;
  size_t cwdlen = strnlen(p, len);
  char **argv = NULL, **envp = NULL;
  bool ok = cwdlen < len;
  if (ok) {
    pos = (uint32_t)cwdlen + 1;
    ok = take_list(p, len, &pos, &argv) && argv[0] && take_list(p, len, &pos, &envp);
  }
  int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1};
  if (!ok || pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC)) {
    const char *m = ok ? "netkernel-vm-agent: no pipes\n" : "netkernel-vm-agent: bad command\n";
    send_frame(NK_VM_STDERR, c, m, (uint32_t)strlen(m));
    send_frame(NK_VM_EXIT, c, &fail, sizeof(fail));
    goto out;
  }
  pid_t pid = fork();
  if (pid == 0) {
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    setsid();
    dup2(in[0], 0);
    dup2(out[1], 1);
    dup2(err[1], 2);
    if (chroot(ROOT) < 0 || chdir(*p ? p : "/") < 0) {
      fprintf(stderr, "netkernel-vm-agent: %s: %s\n", *p ? p : "/", strerror(errno));
      _exit(127);
    }
    extern char **environ;
    environ = envp; /* execvp searches the command's PATH, not ours */
    execvp(argv[0], argv);
    int e = errno;
    fprintf(stderr, "netkernel-vm-agent: %s: %s\n", argv[0], strerror(e));
    _exit(e == ENOENT ? 127 : 126);
  }
  close(in[0]);
  close(out[1]);
  close(err[1]);
  if (pid < 0) {
    close(in[1]);
    close(out[0]);
    close(err[0]);
    send_frame(NK_VM_EXIT, c, &fail, sizeof(fail));
    goto out;
  }
  fcntl(in[1], F_SETFL, O_NONBLOCK);
  *ch = (struct chan){.used = true, .pid = pid, .in = in[1], .out = out[0], .err = err[0]};
out:
  free(argv);
  free(envp);
}

static void feed(struct chan *ch) {
  while (ch->npending && ch->in >= 0) {
    ssize_t w = write(ch->in, ch->pending, ch->npending);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EAGAIN) return;
    if (w <= 0) { /* the command closed its stdin: what is left has nowhere to go */
      close_fd(&ch->in);
      ch->npending = 0;
      break;
    }
    memmove(ch->pending, ch->pending + w, ch->npending - (size_t)w);
    ch->npending -= (size_t)w;
  }
  if (!ch->npending && ch->in_eof) close_fd(&ch->in);
}

static void poweroff(void) {
  kill(-1, SIGTERM);
  for (int i = 0; i < 300 && waitpid(-1, NULL, 0) > 0; i++) {}
  kill(-1, SIGKILL);
  sync();
  reboot(RB_POWER_OFF);
  _exit(0);
}

static void handle(struct nk_vmframe *h, char *p) {
  if (h->chan >= NK_VMPORT_MAXCHAN) return;
  struct chan *ch = &chans[h->chan];
  switch (h->type) {
    case NK_VM_EXEC:
      start(h->chan, p, h->len);
      break;
    case NK_VM_STDIN:
      if (!ch->used || ch->in < 0 || ch->in_eof || !h->len) break;
      char *more = realloc(ch->pending, ch->npending + h->len);
      if (!more) break;
      memcpy(more + ch->npending, p, h->len);
      ch->pending = more;
      ch->npending += h->len;
      feed(ch);
      break;
    case NK_VM_STDIN_EOF:
      if (!ch->used) break;
      ch->in_eof = true;
      feed(ch);
      break;
    case NK_VM_SIGNAL:
      if (ch->used && ch->pid && h->len == sizeof(uint32_t)) {
        uint32_t sig;
        memcpy(&sig, p, sizeof(sig));
        if (sig > 0 && sig < 65) kill(-ch->pid, (int)sig);
      }
      break;
    case NK_VM_POWEROFF:
      poweroff();
      break;
    default:
      break;
  }
}

static void reap(void) {
  int st;
  pid_t pid;
  while ((pid = waitpid(-1, &st, WNOHANG)) > 0)
    for (uint16_t c = 0; c < NK_VMPORT_MAXCHAN; c++)
      if (chans[c].used && chans[c].pid == pid) {
        chans[c].pid = 0;
        chans[c].status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        finish_if_done(c);
      }
}

static void drain(uint16_t c, int *fd, uint16_t type) {
  static char buf[NK_VMPORT_MAX];
  ssize_t n = read(*fd, buf, sizeof(buf));
  if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
  if (n <= 0) {
    close_fd(fd);
    finish_if_done(c);
    return;
  }
  send_frame(type, c, buf, (uint32_t)n);
}

int main(void) {
  for (int c = 0; c < NK_VMPORT_MAXCHAN; c++) chans[c].in = chans[c].out = chans[c].err = -1;
  signal(SIGPIPE, SIG_IGN);
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  sigprocmask(SIG_BLOCK, &chld, NULL);
  int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
  port = nk_vm_open_port(NK_VMPORT_NAME);
  if (port < 0 || sfd < 0) {
    nk_vm_say("no exec port %s: %s", NK_VMPORT_NAME, strerror(errno));
    reboot(RB_POWER_OFF);
    return 1;
  }
  struct timespec up;
  clock_gettime(CLOCK_BOOTTIME, &up);
  uint32_t ms = (uint32_t)(up.tv_sec * 1000 + up.tv_nsec / 1000000);
  pthread_t net;
  pthread_create(&net, NULL, nk_vm_net, NULL); /* the guest's network, beside the commands */
  send_frame(NK_VM_READY, 0, &ms, sizeof(ms));

  static char in[sizeof(struct nk_vmframe) + NK_VMPORT_MAX];
  size_t have = 0;
  struct pollfd pf[2 + 3 * NK_VMPORT_MAXCHAN];
  uint16_t who[2 + 3 * NK_VMPORT_MAXCHAN];
  for (;;) {
    nfds_t n = 0;
    pf[n++] = (struct pollfd){.fd = port, .events = POLLIN};
    pf[n++] = (struct pollfd){.fd = sfd, .events = POLLIN};
    for (uint16_t c = 0; c < NK_VMPORT_MAXCHAN; c++) {
      struct chan *ch = &chans[c];
      if (!ch->used) continue;
      if (ch->out >= 0) who[n] = c, pf[n++] = (struct pollfd){.fd = ch->out, .events = POLLIN};
      if (ch->err >= 0) who[n] = c, pf[n++] = (struct pollfd){.fd = ch->err, .events = POLLIN};
      if (ch->in >= 0 && ch->npending)
        who[n] = c, pf[n++] = (struct pollfd){.fd = ch->in, .events = POLLOUT};
    }
    if (poll(pf, n, -1) < 0) continue;
    if (pf[1].revents) {
      struct signalfd_siginfo si;
      while (read(sfd, &si, sizeof(si)) == sizeof(si)) {}
      reap();
    }
    for (nfds_t i = 2; i < n; i++) {
      if (!pf[i].revents) continue;
      struct chan *ch = &chans[who[i]];
      if (pf[i].fd == ch->out) drain(who[i], &ch->out, NK_VM_STDOUT);
      else if (pf[i].fd == ch->err) drain(who[i], &ch->err, NK_VM_STDERR);
      else if (pf[i].fd == ch->in) feed(ch);
    }
    if (pf[0].revents & POLLIN) {
      ssize_t r = read(port, in + have, sizeof(in) - have);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) { /* the host closed the port (QEMU's chardev went away): wait for it */
        usleep(100000);
        continue;
      }
      have += (size_t)r;
      for (;;) {
        struct nk_vmframe h;
        if (have < sizeof(h)) break;
        memcpy(&h, in, sizeof(h));
        if (h.len > NK_VMPORT_MAX) {
          nk_vm_say("frame of %u bytes from the host: port reset", h.len);
          have = 0;
          break;
        }
        if (have < sizeof(h) + h.len) break;
        char *p = in + sizeof(h);
        handle(&h, p);
        have -= sizeof(h) + h.len;
        memmove(in, in + sizeof(h) + h.len, have);
      }
    } else if (pf[0].revents & (POLLHUP | POLLERR)) {
      usleep(100000); /* no host connected to the port yet */
    }
  }
}
