/* A program with no GuestLib in it, for tests of the path for programs GuestLib cannot
 * reach: the tests build it with `musl-gcc -static`.
 *
 *   net server PORT                TCP echo server on [::]:PORT (IPv4 too), one process per
 *                                  client; prints "READY" once listening
 *   net client HOST PORT BYTES     sends BYTES of a fixed pseudo-random stream, reads the echo
 *                                  back and compares it; prints "OK <local address> <bytes>"
 *   net udp-server PORT            UDP echo on [::]:PORT (IPv4 too); prints "READY"
 *   net udp-client HOST PORT N     N datagrams of 1..8000 bytes, each answered before the next
 *                                  (resent after 1 s if lost); prints "OK <N>"
 */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static uint8_t next_byte(uint32_t *s) {
  *s = *s * 1103515245u + 12345u;
  return (uint8_t)(*s >> 16);
}

static int serve(int port) {
  int l = socket(AF_INET6, SOCK_STREAM, 0), zero = 0, one = 1;
  setsockopt(l, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
  if (bind(l, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(l, 128) < 0) {
    perror("listen");
    return 1;
  }
  signal(SIGCHLD, SIG_IGN);
  printf("READY\n");
  fflush(stdout);
  for (;;) {
    int c = accept(l, NULL, NULL);
    if (c < 0) continue;
    if (fork() == 0) {
      char buf[65536];
      ssize_t n;
      while ((n = read(c, buf, sizeof(buf))) > 0)
        for (ssize_t off = 0; off < n;) {
          ssize_t w = write(c, buf + off, n - off);
          if (w <= 0) _exit(1);
          off += w;
        }
      _exit(0);
    }
    close(c);
  }
}

static int client(const char *host, const char *port, long total) {
  struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res;
  int r = getaddrinfo(host, port, &hints, &res);
  if (r) {
    fprintf(stderr, "getaddrinfo: %s\n", gai_strerror(r));
    return 1;
  }
  int fd = socket(res->ai_family, SOCK_STREAM, 0);
  if (connect(fd, res->ai_addr, res->ai_addrlen) < 0) {
    perror("connect");
    return 1;
  }
  pid_t w = fork();
  if (w == 0) { /* the writer */
    uint32_t s = 1;
    char buf[65536];
    for (long left = total; left > 0;) {
      size_t n = left < (long)sizeof(buf) ? (size_t)left : sizeof(buf);
      for (size_t i = 0; i < n; i++) buf[i] = (char)next_byte(&s);
      for (size_t off = 0; off < n;) {
        ssize_t k = write(fd, buf + off, n - off);
        if (k <= 0) _exit(1);
        off += (size_t)k;
      }
      left -= (long)n;
    }
    shutdown(fd, SHUT_WR);
    _exit(0);
  }
  uint32_t s = 1;
  long got = 0;
  char buf[65536];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0)
    for (ssize_t i = 0; i < n; i++, got++)
      if ((uint8_t)buf[i] != next_byte(&s)) {
        fprintf(stderr, "byte %ld differs\n", got);
        return 1;
      }
  int st;
  waitpid(w, &st, 0);
  if (got != total || !WIFEXITED(st) || WEXITSTATUS(st)) {
    fprintf(stderr, "echoed %ld of %ld bytes\n", got, total);
    return 1;
  }
  struct sockaddr_storage me;
  socklen_t ml = sizeof(me);
  char a[INET6_ADDRSTRLEN];
  getsockname(fd, (struct sockaddr *)&me, &ml);
  if (me.ss_family == AF_INET6)
    inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&me)->sin6_addr, a, sizeof(a));
  else inet_ntop(AF_INET, &((struct sockaddr_in *)&me)->sin_addr, a, sizeof(a));
  printf("OK %s %ld\n", a, got);
  return 0;
}

static int udp_serve(int port) {
  int s = socket(AF_INET6, SOCK_DGRAM, 0), zero = 0;
  setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
  struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
  if (bind(s, (struct sockaddr *)&a, sizeof(a)) < 0) {
    perror("bind");
    return 1;
  }
  printf("READY\n");
  fflush(stdout);
  char buf[65536];
  for (;;) {
    struct sockaddr_storage from;
    socklen_t fl = sizeof(from);
    ssize_t n = recvfrom(s, buf, sizeof(buf), 0, (struct sockaddr *)&from, &fl);
    if (n >= 0) sendto(s, buf, (size_t)n, 0, (struct sockaddr *)&from, fl);
  }
}

static int udp_client(const char *host, const char *port, int count) {
  struct addrinfo hints = {.ai_socktype = SOCK_DGRAM}, *res;
  int r = getaddrinfo(host, port, &hints, &res);
  if (r) {
    fprintf(stderr, "getaddrinfo: %s\n", gai_strerror(r));
    return 1;
  }
  int s = socket(res->ai_family, SOCK_DGRAM, 0);
  struct timeval tv = {1, 0};
  setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  uint32_t seed = 7;
  char out[8000], in[8001];
  for (int i = 0; i < count; i++) {
    size_t len = 1 + (size_t)(i * 997) % sizeof(out);
    for (size_t k = 0; k < len; k++) out[k] = (char)next_byte(&seed);
    memcpy(out, &i, sizeof(i) < len ? sizeof(i) : len);
    for (int tries = 0;; tries++) {
      if (tries == 5) {
        fprintf(stderr, "datagram %d: no answer\n", i);
        return 1;
      }
      sendto(s, out, len, 0, res->ai_addr, res->ai_addrlen);
      struct sockaddr_storage from;
      socklen_t fl = sizeof(from);
      ssize_t n = recvfrom(s, in, sizeof(in), 0, (struct sockaddr *)&from, &fl);
      if (n < 0) continue;
      if ((size_t)n != len || memcmp(in, out, len)) {
        if (n >= (ssize_t)sizeof(i) && memcmp(in, &i, sizeof(i))) continue; /* a late resend */
        fprintf(stderr, "datagram %d: %zd bytes back, %zu sent, or different\n", i, n, len);
        return 1;
      }
      break;
    }
  }
  printf("OK %d\n", count);
  return 0;
}

int main(int argc, char **argv) {
  if (argc == 3 && !strcmp(argv[1], "udp-server")) return udp_serve(atoi(argv[2]));
  if (argc == 5 && !strcmp(argv[1], "udp-client"))
    return udp_client(argv[2], argv[3], atoi(argv[4]));
  if (argc == 3 && !strcmp(argv[1], "server")) return serve(atoi(argv[2]));
  if (argc == 5 && !strcmp(argv[1], "client")) return client(argv[2], argv[3], atol(argv[4]));
  fprintf(stderr,
          "usage: net server PORT | net client HOST PORT BYTES | net udp-server PORT | "
          "net udp-client HOST PORT N\n");
  return 2;
}
