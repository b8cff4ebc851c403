/* netkernel-seccomp: writes the seccomp filter of tenant processes (a classic BPF program,
 * struct sock_filter[]) to stdout. The build runs it once and installs the result as
 * seccomp.bpf; `netkernel run` hands that to bubblewrap (--seccomp), which loads it, with
 * no_new_privs, into every process of the tenant.
 *
 * In the spirit of the container runtimes' default profiles (Docker's, Podman's): a tenant
 * runs unmodified server software, so everything ordinary is allowed, and refused are the
 * system calls that reach the host kernel's global state or its least-hardened paths:
 * mounts and namespaces (no nested user namespaces, the usual first step of a kernel
 * exploit), modules, kexec, reboot, swap, clocks, accounting, keyrings (not namespaced),
 * BPF and perf, userfaultfd, io_uring (its operations bypass seccomp and GuestLib alike),
 * handle-based opens (the "shocker" escape), raw port I/O, page migration between nodes,
 * terminal input injection (TIOCSTI, TIOCLINUX) and odd personalities. Sockets are limited to
 * the families a tenant has any use for (AF_UNIX, AF_INET, AF_INET6, AF_NETLINK): AF_VSOCK,
 * for one, would reach the hypervisor around NetKernel. Other ABIs than the native one (x32,
 * 32-bit compat) are refused whole.
 *
 * Most of these need capabilities the tenant lacks anyway (it is unprivileged outside its
 * user namespace); the filter keeps the kernel's code for them out of reach, so a bug there
 * is not a way out. The answer is EPERM (ENOSYS for clone3, so that libc falls back to
 * clone, whose flags the filter can see; EAFNOSUPPORT for socket families).
 */
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__)
#define NK_ARCH    AUDIT_ARCH_X86_64
#define NK_X32_BIT 0x40000000u
#elif defined(__aarch64__)
#define NK_ARCH AUDIT_ARCH_AARCH64
#else
#error "netkernel-seccomp: add this architecture's AUDIT_ARCH"
#endif

#define NK_NS_FLAGS                                                                          \
  (CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | \
   CLONE_NEWCGROUP | 0x00000080 /* CLONE_NEWTIME */)

#define LOW32(i)  (offsetof(struct seccomp_data, args) + (i)*8) /* little endian */
#define RET(v)    BPF_STMT(BPF_RET | BPF_K, (v))
#define DENY(e)   RET(SECCOMP_RET_ERRNO | ((e)&SECCOMP_RET_DATA))
#define ALLOW     RET(SECCOMP_RET_ALLOW)
#define LOAD(off) BPF_STMT(BPF_LD | BPF_W | BPF_ABS, (off))

static struct sock_filter prog[512];
static unsigned n;

static void emit(struct sock_filter f) {
  if (n == sizeof(prog) / sizeof(prog[0])) {
    fprintf(stderr, "netkernel-seccomp: program too long\n");
    _exit(1);
  }
  prog[n++] = f;
}

/* if (nr == k) return ERRNO(e); — expects the syscall number in A */
static void deny_nr(unsigned k, int e) {
  emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, k, 0, 1));
  emit((struct sock_filter)DENY(e));
}

static const int denied[] = {
#ifdef __NR_mount
    __NR_mount,
#endif
    __NR_umount2,
    __NR_pivot_root,
    __NR_swapon,
    __NR_swapoff,
    __NR_reboot,
    __NR_init_module,
    __NR_finit_module,
    __NR_delete_module,
    __NR_kexec_load,
#ifdef __NR_kexec_file_load
    __NR_kexec_file_load,
#endif
#ifdef __NR_iopl
    __NR_iopl,
    __NR_ioperm,
#endif
    __NR_acct,
    __NR_settimeofday,
    __NR_clock_settime,
    __NR_clock_adjtime,
    __NR_bpf,
    __NR_perf_event_open,
    __NR_userfaultfd,
    __NR_keyctl,
    __NR_add_key,
    __NR_request_key,
    __NR_lookup_dcookie,
    __NR_open_by_handle_at,
    __NR_name_to_handle_at,
    __NR_quotactl,
#ifdef __NR_quotactl_fd
    __NR_quotactl_fd,
#endif
#ifdef __NR_nfsservctl
    __NR_nfsservctl,
#endif
    __NR_syslog,
#ifdef __NR__sysctl
    __NR__sysctl,
#endif
#ifdef __NR_uselib
    __NR_uselib,
#endif
    __NR_setns,
    __NR_fsopen,
    __NR_fsconfig,
    __NR_fsmount,
    __NR_fspick,
    __NR_move_mount,
    __NR_open_tree,
#ifdef __NR_mount_setattr
    __NR_mount_setattr,
#endif
    __NR_io_uring_setup,
    __NR_io_uring_enter,
    __NR_io_uring_register,
    __NR_move_pages,
    __NR_migrate_pages,
    __NR_fanotify_init,
    __NR_vhangup,
};

int main(void) {
  /* Native ABI only. */
  emit((struct sock_filter)LOAD(offsetof(struct seccomp_data, arch)));
  emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, NK_ARCH, 1, 0));
  emit((struct sock_filter)DENY(ENOSYS));
  emit((struct sock_filter)LOAD(offsetof(struct seccomp_data, nr)));
#ifdef NK_X32_BIT
  emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, NK_X32_BIT, 0, 1));
  emit((struct sock_filter)DENY(ENOSYS));
#endif
  for (size_t i = 0; i < sizeof(denied) / sizeof(denied[0]); i++)
    deny_nr((unsigned)denied[i], EPERM);
  deny_nr(__NR_clone3, ENOSYS);

  /* clone and unshare: not into new namespaces. */
  const unsigned ns_calls[] = {__NR_clone, __NR_unshare};
  for (int i = 0; i < 2; i++) {
    emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ns_calls[i], 0, 4));
    emit((struct sock_filter)LOAD(LOW32(0)));
    emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, NK_NS_FLAGS, 0, 1));
    emit((struct sock_filter)DENY(EPERM));
    emit((struct sock_filter)ALLOW);
  }
  /* ioctl: no injecting input into the terminal the tenant may share with its launcher. The
   * kernel takes the command as 32 bits: only those are compared. */
  emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_ioctl, 0, 5));
  emit((struct sock_filter)LOAD(LOW32(1)));
  emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, TIOCSTI, 1, 0));
  emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, TIOCLINUX, 0, 1));
  emit((struct sock_filter)DENY(EPERM));
  emit((struct sock_filter)ALLOW);
  /* socket, socketpair: the families a tenant has a use for. */
  const unsigned sock_calls[] = {__NR_socket, __NR_socketpair};
  for (int i = 0; i < 2; i++) {
    emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, sock_calls[i], 0, 7));
    emit((struct sock_filter)LOAD(LOW32(0)));
    emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AF_UNIX, 3, 0));
    emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AF_INET, 2, 0));
    emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AF_INET6, 1, 0));
    emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AF_NETLINK, 0, 1));
    emit((struct sock_filter)ALLOW);
    emit((struct sock_filter)DENY(EAFNOSUPPORT));
  }
  /* personality: the values Docker lets through (Linux, its 32-bit variant, ADDR_NO_RANDOMIZE
   * combinations, and the query). */
  const unsigned ok_personalities[] = {0x0, 0x8, 0x20000, 0x20008, 0xffffffff};
  emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_personality, 0, 8));
  emit((struct sock_filter)LOAD(LOW32(0)));
  for (int i = 0; i < 5; i++)
    emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ok_personalities[i], (__u8)(5 - i),
                                      0));
  emit((struct sock_filter)DENY(EPERM));
  emit((struct sock_filter)ALLOW);
  emit((struct sock_filter)ALLOW);

  if (fwrite(prog, sizeof(prog[0]), n, stdout) != n || fflush(stdout) != 0) {
    perror("netkernel-seccomp: write");
    return 1;
  }
  return 0;
}
