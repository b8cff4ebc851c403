/* What the relay's TCP half (relay.c) and UDP half (udp.c) share. */
#ifndef NETKERNEL_RELAY_H
#define NETKERNEL_RELAY_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

/* Tags in epoll data tell what woke us: every struct registered starts with one. */
enum kind { K_OUT_LISTENER, K_MIRROR, K_END, K_UDP_TPROXY, K_UDP_PORT, K_UDP_FLOW, K_GONE };

extern int ep;                                   /* the relay's epoll */
extern struct sockaddr_storage tenant4, tenant6; /* the tenant's addresses (family 0: none) */

void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int kernel_socket(int family, int type); /* in this namespace, not through GuestLib */
socklen_t sa_len(const struct sockaddr_storage *ss);
void sa_str(const struct sockaddr_storage *ss, char *out, size_t n);
void set_port(struct sockaddr_storage *ss, uint16_t port);
bool is_loopback(int family, const uint8_t *a);
bool is_any(int family, const uint8_t *a);
long now_ms(void);
void busy(void); /* the tenant is active: look at its sockets often for a while */

void udp_init(int tproxy4, int tproxy6);
void udp_event(void *tag);
void udp_scan_begin(void);
void udp_socket_found(int family, const uint8_t *addr, uint16_t port, bool v6only);
void udp_scan_end(long now);
void udp_bury(void);

#endif
