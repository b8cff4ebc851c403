/* A TCP program with no GuestLib in it, for tests of the path for programs GuestLib cannot
 * reach: the tests build it with `musl-gcc -static`.
 *
 *   tcp server PORT            echo server on [::]:PORT (IPv4 too), one process per client;
 *                              prints "READY" once listening
 *   tcp client HOST PORT BYTES sends BYTES of a fixed pseudo-random stream, reads the echo
 *                              back and compares it; prints "OK <local address> <bytes>"
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
  if (me.ss_family == AF_INET6) inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&me)->sin6_addr, a, sizeof(a));
  else inet_ntop(AF_INET, &((struct sockaddr_in *)&me)->sin_addr, a, sizeof(a));
  printf("OK %s %ld\n", a, got);
  return 0;
}

int main(int argc, char **argv) {
  if (argc == 3 && !strcmp(argv[1], "server")) return serve(atoi(argv[2]));
  if (argc == 5 && !strcmp(argv[1], "client")) return client(argv[2], argv[3], atol(argv[4]));
  fprintf(stderr, "usage: tcp server PORT | tcp client HOST PORT BYTES\n");
  return 2;
}
