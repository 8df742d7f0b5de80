// /init of the guest that test/arch/run boots: a Debian kernel of the
// architecture under test, in qemu-system, with an initramfs holding this
// program, /smtp521, /sandbox (test/unit/seccomp.cpp) and the scripted sessions
// (/sessions/NAME.args, one argument a line, and NAME.in, the client's
// bytes).  It runs them, and a session that waits, times out, is reset or
// logs to syslog, then test/unit/seccomp.cpp, and reports on the console, one line each, starting
// "@@ "; test/arch/run compares.  Then it powers the machine off.
//
// Built static for the architecture under test: the guest has no shell, no
// busybox, and no libc but the loader and libc.so.6 that test/arch/run puts
// there for a dynamically linked smtp521.
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

std::string hex(const std::string& bytes) {
    static const char digits[] = "0123456789abcdef";
    std::string out;
    for (unsigned char c : bytes) {
        out += digits[c >> 4];
        out += digits[c & 15];
    }
    return out.empty() ? "-" : out;
}

std::string read_file(const std::string& path) {
    std::string data;
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return data;
    char buffer[65536];
    ssize_t n;
    while ((n = read(fd, buffer, sizeof buffer)) > 0) data.append(buffer, static_cast<std::size_t>(n));
    close(fd);
    return data;
}

long long now_ms() {
    timespec t{};
    clock_gettime(CLOCK_MONOTONIC, &t);
    return static_cast<long long>(t.tv_sec) * 1000 + t.tv_nsec / 1000000;
}

struct Run {
    pid_t pid = -1;
    int client = -1;  // our end of the connection (a socket, or the pipe we write)
    int output = -1;  // where the replies come (the socket again, or a pipe)
    int log = -1;     // smtp521's stderr
    bool tcp = false;
};

// smtp521 as a super-server starts it: on an accepted TCP connection over
// loopback, or on two pipes.
Run start(const std::string& binary, const std::vector<std::string>& args, bool tcp) {
    Run r;
    r.tcp = tcp;
    int child_in = -1, child_out = -1, err[2];
    if (pipe2(err, O_CLOEXEC) != 0) return r;
    if (tcp) {
        int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_in addr{};
        addr.sin_family = AF_INET;
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        socklen_t len = sizeof addr;
        if (bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || listen(listener, 1) != 0 ||
            getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) != 0)
            return r;
        r.client = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (connect(r.client, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) return r;
        child_in = child_out = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
        close(listener);
        r.output = r.client;
    } else {
        int in[2], out[2];
        if (pipe2(in, O_CLOEXEC) != 0 || pipe2(out, O_CLOEXEC) != 0) return r;
        child_in = in[0];
        r.client = in[1];
        child_out = out[1];
        r.output = out[0];
    }
    r.pid = fork();
    if (r.pid == 0) {
        dup2(child_in, 0);
        dup2(child_out, 1);
        dup2(err[1], 2);
        std::vector<char*> argv{const_cast<char*>(binary.c_str())};
        for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
        argv.push_back(nullptr);
        char path[] = "PATH=/";
        char* envp[] = {path, nullptr};
        execve(binary.c_str(), argv.data(), envp);
        _exit(127);
    }
    close(child_in);
    if (child_out != child_in) close(child_out);
    close(err[1]);
    r.log = err[0];
    return r;
}

// Send `input` (then end it, unless `hold`: half-close or close the
// pipe), read replies and log to end of file, reap.  Returns the wait
// status.
int finish(Run& r, const std::string& input, std::string& out, std::string& log, bool hold = false) {
    std::size_t sent = 0;
    bool input_open = true, output_open = true, log_open = true;
    fcntl(r.client, F_SETFL, O_NONBLOCK);
    auto end_input = [&] {
        input_open = false;
        if (r.tcp) shutdown(r.client, SHUT_WR);
        else close(r.client);
    };
    if (input.empty() && !hold) end_input();
    const long long deadline = now_ms() + 60000;
    while ((output_open || log_open) && now_ms() < deadline) {
        const bool writing = input_open && sent < input.size();
        pollfd fds[3] = {{r.output, static_cast<short>(output_open ? POLLIN : 0), 0},
                         {r.log, static_cast<short>(log_open ? POLLIN : 0), 0},
                         {r.client, static_cast<short>(writing ? POLLOUT : 0), 0}};
        nfds_t n = (writing && r.client != r.output) ? 3 : 2;
        if (writing && r.client == r.output) fds[0].events |= POLLOUT;
        if (poll(fds, n, 1000) < 0 && errno != EINTR) break;
        if (writing && ((fds[2].revents | fds[0].revents) & (POLLOUT | POLLERR | POLLHUP))) {
            ssize_t w = write(r.client, input.data() + sent, std::min<std::size_t>(input.size() - sent, 65536));
            if (w > 0) sent += static_cast<std::size_t>(w);
            if ((w < 0 && errno != EAGAIN && errno != EINTR) || (sent == input.size() && !hold)) end_input();
        }
        char buffer[65536];
        if (output_open && (fds[0].revents & (POLLIN | POLLERR | POLLHUP))) {
            ssize_t got = read(r.output, buffer, sizeof buffer);
            if (got > 0) out.append(buffer, static_cast<std::size_t>(got));
            else if (got == 0 || (errno != EAGAIN && errno != EINTR)) output_open = false;
        }
        if (log_open && (fds[1].revents & (POLLIN | POLLERR | POLLHUP))) {
            ssize_t got = read(r.log, buffer, sizeof buffer);
            if (got > 0) log.append(buffer, static_cast<std::size_t>(got));
            else if (got == 0 || (errno != EAGAIN && errno != EINTR)) log_open = false;
        }
    }
    if (output_open || log_open) kill(r.pid, SIGKILL);  // stuck: the host sees the missing bytes
    if (input_open) close(r.client);
    else if (r.tcp) close(r.client);
    if (r.output != r.client) close(r.output);
    close(r.log);
    int status = 0;
    while (waitpid(r.pid, &status, 0) < 0 && errno == EINTR) {
    }
    return status;
}

std::vector<std::string> lines(const std::string& text) {
    std::vector<std::string> out;
    std::size_t at = 0, nl;
    while ((nl = text.find('\n', at)) != std::string::npos) {
        out.push_back(text.substr(at, nl - at));
        at = nl + 1;
    }
    if (at < text.size()) out.push_back(text.substr(at));
    return out;
}

// The kernel's audit records of the filter's refusals (type=1326, as
// confine() asks for them), read from /dev/kmsg since the last call.
void report_audit(int kmsg, const char* phase) {
    if (kmsg < 0) return;
    usleep(500000);  // kauditd writes them asynchronously
    char record[8192];
    ssize_t n;
    while ((n = read(kmsg, record, sizeof record - 1)) > 0 || (n < 0 && errno == EPIPE)) {
        if (n <= 0) continue;  // EPIPE: records were overwritten; read on
        record[n] = '\0';
        char* text = std::strchr(record, ';');
        if (std::strstr(record, "type=1326")) {
            std::string line = text ? text + 1 : record;
            line.erase(std::remove(line.begin(), line.end(), '\n'), line.end());
            std::printf("@@ audit %s %s\n", phase, line.c_str());
        }
    }
    std::fflush(stdout);
}

void bring_up_loopback() {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    ifreq ifr{};
    std::strcpy(ifr.ifr_name, "lo");
    if (ioctl(fd, SIOCGIFFLAGS, &ifr) == 0) {
        ifr.ifr_flags = static_cast<short>(ifr.ifr_flags | IFF_UP);
        ioctl(fd, SIOCSIFFLAGS, &ifr);
    }
    close(fd);
}

}  // namespace

int main() {
    signal(SIGPIPE, SIG_IGN);
    mount("proc", "/proc", "proc", 0, nullptr);
    mount("devtmpfs", "/dev", "devtmpfs", 0, nullptr);
    bring_up_loopback();
    int kmsg = open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    lseek(kmsg, 0, SEEK_END);  // only what the sessions cause
    setvbuf(stdout, nullptr, _IOLBF, 0);
    utsname u{};
    uname(&u);
    std::printf("@@ kernel %s %s\n", u.release, u.machine);

    // Every scripted session, on a pipe and on a TCP connection.
    std::vector<std::string> names;
    if (DIR* d = opendir("/sessions")) {
        while (dirent* e = readdir(d)) {
            std::string name = e->d_name;
            if (name.size() > 5 && name.compare(name.size() - 5, 5, ".args") == 0)
                names.push_back(name.substr(0, name.size() - 5));
        }
        closedir(d);
    }
    std::sort(names.begin(), names.end());
    for (const std::string& name : names) {
        std::vector<std::string> args{"-l", "stderr"};
        for (const std::string& a : lines(read_file("/sessions/" + name + ".args"))) args.push_back(a);
        const std::string input = read_file("/sessions/" + name + ".in");
        for (bool tcp : {false, true}) {
            Run r = start("/smtp521", args, tcp);
            std::string out, log;
            int status = r.pid > 0 ? finish(r, input, out, log) : -1;
            std::printf("@@ session %s %s pid=%d status=%d out=%s log=%s\n", name.c_str(), tcp ? "tcp" : "pipe",
                        static_cast<int>(r.pid), status, hex(out).c_str(), hex(log).c_str());
        }
    }

    // A session that waits for its client: the filter is on.
    {
        Run r = start("/smtp521", {"-H", "mx.test", "-l", "stderr"}, true);
        std::string greeting;
        char c;
        while (greeting.find('\n') == std::string::npos && read(r.client, &c, 1) == 1) greeting += c;
        std::string seccomp = "-";
        for (const std::string& line : lines(read_file("/proc/" + std::to_string(r.pid) + "/status")))
            if (line.compare(0, 8, "Seccomp:") == 0) seccomp = line.substr(line.find_first_not_of(" \t", 8));
        std::string out, log;
        int status = finish(r, "QUIT\r\n", out, log);
        std::printf("@@ waiting seccomp=%s status=%d out=%s log=%s\n", seccomp.c_str(), status,
                    hex(greeting + out).c_str(), hex(log).c_str());
    }
    // What else a session meets: its deadline, a client's reset, syslog.
    {
        Run r = start("/smtp521", {"-H", "mx.test", "-l", "stderr", "-t", "1"}, true);
        std::string out, log;
        int status = finish(r, "", out, log, true);
        std::printf("@@ scenario timeout status=%d out=%s log=%s\n", status, hex(out).c_str(), hex(log).c_str());
    }
    {
        Run r = start("/smtp521", {"-H", "mx.test", "-l", "stderr"}, true);
        std::string greeting, out, log;
        char c;
        while (greeting.find('\n') == std::string::npos && read(r.client, &c, 1) == 1) greeting += c;
        linger reset{1, 0};
        setsockopt(r.client, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
        close(r.client);
        r.client = r.output = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);  // finish() reads EOF here
        shutdown(r.client, SHUT_RDWR);
        int status = finish(r, "", out, log);
        std::printf("@@ scenario client-reset status=%d out=%s log=%s\n", status, hex(greeting).c_str(),
                    hex(log).c_str());
    }
    // Stopped and continued while it waits in poll(): the kernel resumes
    // the wait through restart_syscall, which the filter must allow.
    {
        Run r = start("/smtp521", {"-H", "mx.test", "-l", "stderr"}, true);
        std::string greeting, out, log;
        char c;
        while (greeting.find('\n') == std::string::npos && read(r.client, &c, 1) == 1) greeting += c;
        const std::string wchan = "/proc/" + std::to_string(r.pid) + "/wchan";
        for (int i = 0; i < 500 && read_file(wchan).find("poll") == std::string::npos; ++i) usleep(10000);
        const std::string waited = read_file(wchan);
        int stopped = 0, continued = 0;
        kill(r.pid, SIGSTOP);
        while (waitpid(r.pid, &stopped, WUNTRACED) < 0 && errno == EINTR) {
        }
        kill(r.pid, SIGCONT);
        while (waitpid(r.pid, &continued, WCONTINUED) < 0 && errno == EINTR) {
        }
        int status = finish(r, "QUIT\r\n", out, log);
        std::printf("@@ scenario stop-continue status=%d out=%s log=%s wchan=%s stopped=%d continued=%d\n", status,
                    hex(greeting + out).c_str(), hex(log).c_str(), waited.c_str(), WIFSTOPPED(stopped) ? 1 : 0,
                    WIFCONTINUED(continued) ? 1 : 0);
    }
    {
        int devlog = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        std::strcpy(addr.sun_path, "/dev/log");
        bind(devlog, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
        Run r = start("/smtp521", {"-H", "mx.test", "-l", "syslog"}, false);
        std::string out, log;
        int status = finish(r, "EHLO a\r\nQUIT\r\n", out, log);
        pollfd p{devlog, POLLIN, 0};
        char message[2048];
        ssize_t n = poll(&p, 1, 5000) == 1 ? recv(devlog, message, sizeof message, 0) : -1;
        std::printf("@@ scenario syslog status=%d out=%s log=%s\n", status, hex(out).c_str(),
                    hex(n > 0 ? std::string(message, static_cast<std::size_t>(n)) : std::string()).c_str());
        close(devlog);
        unlink("/dev/log");
    }
    report_audit(kmsg, "sessions");

    // The confinement's own tests (test/unit/seccomp.cpp): their refusals are
    // also the audit log's positive control.
    pid_t pid = fork();
    if (pid == 0) {
        char path[] = "/sandbox";
        char* argv[] = {path, nullptr};
        char env[] = "PATH=/";
        char* envp[] = {env, nullptr};
        execve(path, argv, envp);
        _exit(127);
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    std::printf("@@ sandbox status=%d\n", status);
    report_audit(kmsg, "sandbox");
    std::printf("@@ done\n");
    std::fflush(stdout);
    sync();
    reboot(RB_POWER_OFF);
    return 0;
}
