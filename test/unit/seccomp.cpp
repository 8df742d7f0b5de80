// Tests of the confinement: what the seccomp filter of confine() lets a
// process do, and what it refuses.  The filter cannot be lifted, so each
// case runs in a forked child that confines itself and reports through its
// exit status.
#define SMTP521_NO_MAIN
#include "../../smtp521.cpp"

#include "catch.hpp"

#include <sys/mman.h>
#include <sys/un.h>
#include <sys/wait.h>

#include <string>

using namespace smtp521;

namespace {

// Fork; the child confines itself (exit 100 if it cannot) and runs `body`,
// whose value is its exit status.  Returns the child's wait status.
template <class Body>
int confined(Body body) {
    pid_t pid = fork();
    if (pid == 0) {
        if (!confine()) _exit(100);
        _exit(body());
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    return status;
}

int exit_code(int status) { return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status); }

// The status of a child that found every call refused: no bit of
// refused() below, and not what a program it might exec exits with.
constexpr int all_refused = 0xA5;

// 0 if `result` is -1 with errno EPERM, else `bit`.
int refused(long result, int bit) { return result == -1 && errno == EPERM ? 0 : bit; }

}  // namespace

TEST_CASE("the filter refuses open, socket, connect, execve and fork with EPERM") {
    // A socket made before the filter: connect() on it must still fail.
    int unconnected = socket(AF_UNIX, SOCK_DGRAM, 0);
    REQUIRE(unconnected >= 0);
    int status = confined([unconnected] {
        int failures = 0;
        failures |= refused(open("/etc/hostname", O_RDONLY), 1);
        failures |= refused(openat(AT_FDCWD, "/", O_RDONLY | O_DIRECTORY), 2);
        failures |= refused(socket(AF_INET, SOCK_STREAM, 0), 4);
        sockaddr_un log{};
        log.sun_family = AF_UNIX;
        std::memcpy(log.sun_path, "/dev/log", sizeof "/dev/log");
        failures |= refused(connect(unconnected, reinterpret_cast<sockaddr*>(&log), sizeof log), 8);
        char path[] = "/bin/true";
        char* argv[] = {path, nullptr};
        char* envp[] = {nullptr};
        failures |= refused(execve(path, argv, envp), 16);
        failures |= refused(fork(), 32);
        failures |= refused(mmap(nullptr, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS,
                                 -1, 0) == MAP_FAILED ? -1 : 0, 64);
        return failures != 0 ? failures : all_refused;
    });
    close(unconnected);
    // A bit set names the call that got through; 0 is /bin/true's status,
    // an execve() that ran.
    CHECK(exit_code(status) == all_refused);
}

TEST_CASE("the filter lets the session's own calls through") {
    int to_child[2], from_child[2];
    REQUIRE(pipe(to_child) == 0);
    REQUIRE(pipe(from_child) == 0);
    int pair[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM, 0, pair) == 0);
    REQUIRE(write(to_child[1], "ping", 4) == 4);
    REQUIRE(write(pair[1], "sock", 4) == 4);
    int status = confined([&] {
        char buffer[8];
        if (wait_for(to_child[0], POLLIN, now_ms() + 1000) != Wait::ready) return 1;
        if (read(to_child[0], buffer, sizeof buffer) != 4) return 2;
        if (write(from_child[1], "pong", 4) != 4) return 3;
        if (recv(pair[0], buffer, sizeof buffer, MSG_DONTWAIT) != 4) return 4;
        if (send(pair[0], "back", 4, MSG_NOSIGNAL) != 4) return 5;
        if (shutdown(pair[0], SHUT_WR) != 0) return 6;
        if (close(pair[0]) != 0) return 7;
        return 0;
    });
    CHECK(exit_code(status) == 0);
    // The child's ends, closed here too: a child that failed (it could not
    // confine itself) leaves the reads below at end of file, not blocked.
    close(from_child[1]);
    close(pair[0]);
    char buffer[8] = {};
    CHECK(read(from_child[0], buffer, sizeof buffer) == 4);
    CHECK(std::string(buffer, 4) == "pong");
    CHECK(read(pair[1], buffer, sizeof buffer) == 4);
    CHECK(std::string(buffer, 4) == "back");
    for (int fd : {to_child[0], to_child[1], from_child[0], pair[1]}) close(fd);
}

#if defined(__x86_64__)
TEST_CASE("an x32 system call kills the process") {
    // x32 calls carry bit 30; this program never makes one, injected code might.
    int status = confined([] { return static_cast<int>(syscall(0x40000000L | SYS_getpid) == -1 ? 1 : 2); });
    CHECK(WIFSIGNALED(status));
    CHECK(WTERMSIG(status) == SIGSYS);
}
#endif

#if defined(__SANITIZE_ADDRESS__)
TEST_CASE("under the filter, AddressSanitizer still reports and fails the process") {
    // The sanitizer runs of make check stay meaningful: a memory error
    // after confine() still ends the process with the sanitizer's status.
    int status = confined([] {
        volatile char bytes[4] = {};
        volatile int index = 4;
        return static_cast<int>(bytes[index]);  // one past the end
    });
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) != 0);
    CHECK(WEXITSTATUS(status) != 100);  // it did confine itself
}
#endif

TEST_CASE("sendto an address is refused; send on a socket connected before the filter is not") {
    // The syslog and backstop sockets are connected before the filter; a
    // confined process must not reach any other socket on the host with
    // one of them (journald's, say), nor with the client's.
    int receiver = socket(AF_UNIX, SOCK_DGRAM, 0), sender = socket(AF_UNIX, SOCK_DGRAM, 0);
    REQUIRE(receiver >= 0);
    REQUIRE(sender >= 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    const std::string name = "smtp521-sandbox-" + std::to_string(getpid());  // abstract: nothing to clean up
    std::memcpy(address.sun_path + 1, name.data(), name.size());
    const auto length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
    REQUIRE(bind(receiver, reinterpret_cast<sockaddr*>(&address), length) == 0);
    REQUIRE(connect(sender, reinterpret_cast<sockaddr*>(&address), length) == 0);
    int status = confined([&] {
        int failures = 0;
        failures |= refused(sendto(sender, "addressed", 9, 0, reinterpret_cast<sockaddr*>(&address), length), 1);
        if (send(sender, "connected", 9, 0) != 9) failures |= 2;
        return failures;
    });
    CHECK(exit_code(status) == 0);  // 1: sendto to an address got through; 2: send did not
    char buffer[16] = {};
    CHECK(recv(receiver, buffer, sizeof buffer, MSG_DONTWAIT) == 9);
    CHECK(std::string(buffer, 9) == "connected");
    CHECK(recv(receiver, buffer, sizeof buffer, MSG_DONTWAIT) == -1);  // nothing else arrived
    close(sender);
    close(receiver);
}

TEST_CASE("restart_syscall, which the kernel makes a stopped poll() call, is allowed") {
    // Called with nothing to restart, the kernel answers EINTR; refused,
    // EPERM (then a session that was stopped, traced or frozen while it
    // waited would end there without its reply).
    int status = confined([] {
        errno = 0;
        long result = syscall(SYS_restart_syscall);
        return result == -1 && errno == EINTR ? 0 : (errno == EPERM ? 1 : 2);
    });
    CHECK(exit_code(status) == 0);
}

#if !defined(__SANITIZE_ADDRESS__)  // the sanitizer's handlers return: that build allows it
#if defined(__x86_64__)
namespace {
[[noreturn]] void resumed_by_forged_frame() {
    syscall(SYS_exit_group, 77);
    __builtin_unreachable();
}

// rt_sigreturn with a signal frame of our making at the stack pointer (the
// kernel reads the ucontext there, its pretcode popped): allowed, the
// process resumes in resumed_by_forged_frame() on a stack of its choosing.
long forged_rt_sigreturn(ucontext_t& frame) {
    long result;
    asm volatile("mov %%rsp, %%r12\n\tmov %1, %%rsp\n\tsyscall\n\tmov %%r12, %%rsp"
                 : "=a"(result)
                 : "r"(&frame), "a"(static_cast<long>(SYS_rt_sigreturn))
                 : "rcx", "r11", "r12", "memory");
    return result;
}
}  // namespace
#endif

TEST_CASE("a sigreturn, which no handler here makes, kills the process") {
    // Sigreturn-oriented programming: injected code that forges a signal
    // frame sets every register and the signal mask (SIGALRM blocked: no
    // backstop).  On x86-64 a real forged frame; elsewhere the call as is.
    int status = confined([] {
#if defined(__x86_64__)
        static ucontext_t frame alignas(16) {};
        static char stack[4096] alignas(16);
        frame.uc_mcontext.gregs[REG_RIP] = reinterpret_cast<greg_t>(&resumed_by_forged_frame);
        frame.uc_mcontext.gregs[REG_RSP] = reinterpret_cast<greg_t>(stack + sizeof stack - 8);
        frame.uc_mcontext.gregs[REG_CSGSFS] = 0x33;  // the 64-bit user code segment
        frame.uc_mcontext.gregs[REG_EFL] = 0x202;
        sigaddset(&frame.uc_sigmask, SIGALRM);
        return forged_rt_sigreturn(frame) == -EPERM ? 1 : 2;
#else
        return syscall(SYS_rt_sigreturn) == -1 && errno == EPERM ? 1 : 2;
#endif
    });
    // 77: the forged frame was taken; 1: refused with EPERM, not killed.
    CHECK(exit_code(status) == 128 + SIGSYS);
#if defined(SYS_sigreturn)
    status = confined([] { return syscall(SYS_sigreturn) == -1 && errno == EPERM ? 1 : 2; });
    CHECK(exit_code(status) == 128 + SIGSYS);
#endif
}
#endif
