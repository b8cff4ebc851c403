/* Options given to a TCP socket before it binds, connects or listens (TCP_NODELAY,
 * SO_KEEPALIVE, SO_REUSEADDR: what most programs set first) read back at once, the last value
 * given wins, and they are on the connection once it is made: read back after connect(), and
 * in a program that exec'd with the socket and connected it itself. In a tenant GuestLib keeps
 * such options in the socket's slot until its connect instead of asking the engine (a round
 * trip fewer per connection): this checks none is lost or changed on the way. */
#include <netinet/tcp.h>

#include "sem.h"

static void expect_opts(int fd, int nodelay, int keepalive, int reuseaddr) {
  EXPECT_EQ(sem_get_int(fd, IPPROTO_TCP, TCP_NODELAY), nodelay);
  EXPECT_EQ(sem_get_int(fd, SOL_SOCKET, SO_KEEPALIVE), keepalive);
  EXPECT_EQ(sem_get_int(fd, SOL_SOCKET, SO_REUSEADDR), reuseaddr);
}

static void ping(int cli, int l) {
  int srv = (int)SYS(accept(l, NULL, NULL));
  sem_write_all(cli, "ping", 4);
  char buf[4];
  sem_read_all(srv, buf, 4);
  CHECK(!memcmp(buf, "ping", 4), "the connection carried the wrong bytes");
  close(srv);
}

/* Exec'd with a fresh socket whose options its parent set: connect it, check them. */
static int child_main(int fd, char *host, char *port) {
  char *args[] = {"child", host, port, NULL};
  sem_init("options_before_connect(child)", 3, args);
  SYS(connect(fd, (struct sockaddr *)&sem_addr, sem_len(&sem_addr)));
  expect_opts(fd, 1, 1, 0);
  sem_write_all(fd, "ping", 4);
  return 0;
}

int main(int argc, char **argv) {
  if (argc == 5 && !strcmp(argv[1], "--child")) return child_main(atoi(argv[2]), argv[3], argv[4]);
  sem_init("options_before_connect", argc, argv);
  struct sockaddr_storage la;
  int l = sem_listener(0, &la);

  /* Read back before and after connect(); a later value replaces an earlier one. */
  int a = (int)SYS(socket(sem_family, SOCK_STREAM, 0));
  expect_opts(a, 0, 0, 0);
  sem_set_int(a, IPPROTO_TCP, TCP_NODELAY, 1);
  sem_set_int(a, SOL_SOCKET, SO_KEEPALIVE, 1);
  sem_set_int(a, SOL_SOCKET, SO_KEEPALIVE, 0);
  sem_set_int(a, SOL_SOCKET, SO_REUSEADDR, 7); /* any non-zero value is "on" */
  expect_opts(a, 1, 0, 1);
  SYS(connect(a, (struct sockaddr *)&la, sem_len(&la)));
  expect_opts(a, 1, 0, 1);
  ping(a, l);
  close(a);

  /* Not read back before connect(): nothing but the connect carries them. */
  int b = (int)SYS(socket(sem_family, SOCK_STREAM, 0));
  sem_set_int(b, SOL_SOCKET, SO_KEEPALIVE, 1);
  sem_set_int(b, IPPROTO_TCP, TCP_NODELAY, 1);
  SYS(connect(b, (struct sockaddr *)&la, sem_len(&la)));
  expect_opts(b, 1, 1, 0);
  ping(b, l);
  close(b);

  /* A length short of an int is refused, as Linux does, and records nothing. */
  int c = (int)SYS(socket(sem_family, SOCK_STREAM, 0));
  char one = 1;
  EXPECT_ERR(setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one), EINVAL);
  EXPECT_EQ(sem_get_int(c, IPPROTO_TCP, TCP_NODELAY), 0);
  close(c);

  /* Set in this program, connected in another that exec'd with the socket. */
  int d = (int)SYS(socket(sem_family, SOCK_STREAM, 0));
  sem_set_int(d, IPPROTO_TCP, TCP_NODELAY, 1);
  sem_set_int(d, SOL_SOCKET, SO_KEEPALIVE, 1);
  char fdarg[16], portarg[16];
  snprintf(fdarg, sizeof fdarg, "%d", d);
  snprintf(portarg, sizeof portarg, "%u", (unsigned)sem_port(&la));
  pid_t pid = sem_fork();
  if (pid == 0) {
    char *args[] = {argv[0], "--child", fdarg, argv[1], portarg, NULL};
    execv("/proc/self/exe", args);
    printf("FAIL options_before_connect: execv: %s\n", strerror(errno));
    _exit(1);
  }
  close(d);
  int srv = (int)SYS(accept(l, NULL, NULL));
  char buf[4];
  sem_read_all(srv, buf, 4);
  CHECK(!memcmp(buf, "ping", 4), "no ping from the exec'd child");
  sem_wait_child(pid);
  close(srv);
  close(l);
  sem_ok();
}
