/* Half close: after shutdown(SHUT_WR) the peer reads the data then EOF (0) and POLLRDHUP,
 * yet can still send back; the first side receives the whole reply after its shutdown, and
 * its own writes now fail with EPIPE. shutdown() on an unconnected socket is ENOTCONN. */
#include "sem.h"

#define REPLY 32768

int main(int argc, char **argv) {
  sem_init("shutdown_half_close", argc, argv);
  int cli, srv;
  sem_pair(&cli, &srv);
  char buf[256];

  sem_write_all(cli, "request", 7);
  SYS(shutdown(cli, SHUT_WR));
  EXPECT_ERR(send(cli, "x", 1, MSG_NOSIGNAL), EPIPE);

  sem_read_all(srv, buf, 7);
  CHECK(!memcmp(buf, "request", 7), "request differs");
  CHECK(sem_poll(srv, POLLIN | POLLRDHUP, 5000) & POLLRDHUP, "no POLLRDHUP after peer SHUT_WR");
  EXPECT_EQ(read(srv, buf, sizeof buf), 0);
  EXPECT_EQ(read(srv, buf, sizeof buf), 0); /* EOF is sticky */
  /* The other direction still works: the half-closed side is not hung up. */
  EXPECT_EQ(sem_poll(cli, POLLHUP, 0) & POLLHUP, 0);

  static uint8_t reply[REPLY];
  for (uint32_t i = 0; i < REPLY; i++) reply[i] = sem_byte(i);
  sem_write_all(srv, reply, REPLY);
  SYS(close(srv));

  static uint8_t in[REPLY];
  sem_read_all(cli, in, REPLY);
  CHECK(!memcmp(in, reply, REPLY), "reply differs");
  EXPECT_EQ(read(cli, buf, sizeof buf), 0);
  /* Both directions shut now: POLLHUP. */
  CHECK(sem_poll(cli, POLLIN, 1000) & POLLHUP, "no POLLHUP once both directions are shut");
  close(cli);

  int u = (int)SYS(socket(sem_family, SOCK_STREAM, 0));
  EXPECT_ERR(shutdown(u, SHUT_WR), ENOTCONN);
  close(u);
  sem_ok();
}
