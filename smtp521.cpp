// smtp521 -- refuse all mail, at once and for good.
//
// A super-server (inetd, systemd socket activation, tcpserver) starts one
// smtp521 per TCP connection, with the connection on fds 0 and 1.  It speaks
// just enough SMTP to make the sending MTA return the message to its author
// now (a permanent 5yz reply) instead of queueing it for days, logs one line,
// and exits.  Standards: RFC 1846, RFC 7504, RFC 5321.  The rules cited as
// R1..R18 are those of SPEC.md.
//
// Read top to bottom: options, reply texts, the session state machine (pure,
// no I/O), the I/O loop, logging, main.

#include <arpa/inet.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>

namespace smtp521 {

constexpr std::string_view version = SMTP521_VERSION;  // make: from debian/changelog

// ---------------------------------------------------------------- options

// When the refusal comes.  The default is `rcpt`: measured against Postfix,
// Exim and OpenSMTPD in their default settings, only a 5yz reply after a 220
// greeting makes every one of them return the mail at once; a 521 greeting
// (RFC 7504 3) leaves it queued in Postfix and OpenSMTPD.  See the man page.
enum class Mode {
    rcpt,      // 220 greeting, 250 to HELO/EHLO/MAIL, 521 5.3.2 from RCPT on
    greeting,  // RFC 1846 4.2 (b): 521 greeting, 521 to all but QUIT
    close,     // RFC 1846 4.2 (a): 521 greeting, then close
};

enum class LogTarget { syslog, stderr_, none };

struct Options {
    Mode mode = Mode::rcpt;
    std::string_view hostname;                         // first word of every reply
    std::string_view message = "does not accept mail"; // text after the name
    int timeout_seconds = 300;                         // RFC 1846 4.2: "5 minutes"
    // More than any sender's recipients per connection (Postfix 50, Exim
    // and OpenSMTPD 100) plus HELO, MAIL, DATA, RSET and QUIT, so a real
    // message always meets every refusal; few enough that a looping bot is
    // cut off after a few kilobytes of replies.
    int max_commands = 200;
    LogTarget log = LogTarget::syslog;
};

constexpr int min_timeout = 1, max_timeout = 86400;
constexpr int min_commands = 1, max_commands_limit = 100000;

// RFC 5321 4.5.3.1.4 and 4.5.3.1.5: 512 octets for a command line and for
// a reply line, CRLF included.
constexpr std::size_t max_line = 512;
constexpr std::size_t max_reply = 512;

// sysexits(3): EX_USAGE for bad options.  A session ends with 0 however the
// client behaved: under systemd a non-zero status would leave a failed unit
// behind for every rude client.
constexpr int exit_ok = 0, exit_usage = 64;

constexpr std::string_view usage_text =
    "usage: smtp521 [-c] [-r rcpt|greeting] [-H name] [-m text] [-t seconds]\n"
    "               [-n count] [-l syslog|stderr|none] [-V] [-h]\n"
    "Answer one SMTP connection on stdin/stdout so that the sender returns\n"
    "the mail at once: this host does not accept mail (RFC 1846, RFC 7504).\n"
    "\n"
    "  -r, --refuse-at WHEN     rcpt (default): greet 220, refuse every RCPT\n"
    "                           with 521 5.3.2; greeting: greet 521 and answer\n"
    "                           521 to every command but QUIT (RFC 7504)\n"
    "  -c, --close              greet 521 and close at once (RFC 1846 4.2 a)\n"
    "  -H, --hostname NAME      first word of every reply (default: gethostname)\n"
    "  -m, --message TEXT       reply text after the name\n"
    "                           (default: \"does not accept mail\")\n"
    "  -t, --timeout SECONDS    end the session after SECONDS, 1-86400 (default 300)\n"
    "  -n, --max-commands N     end the session after N commands, 1-100000\n"
    "                           (default 200)\n"
    "  -l, --log TARGET         session log line to syslog (default), stderr\n"
    "                           or none\n"
    "  -V, --version            print the version and exit\n"
    "  -h, --help               print this help and exit\n";

// ---------------------------------------------------------------- reply texts

// A reply is built once, at start, from the options, and then only copied:
// the session emits fixed strings (RFC 1846 6).
struct Reply {
    char bytes[max_reply + 1] = {};
    std::size_t length = 0;
    std::string_view view() const { return {bytes, length}; }
};

struct Replies {
    Reply greeting;  // first line of the session
    Reply helo;      // answer to HELO and EHLO
    Reply mail;      // answer to MAIL in rcpt mode
    Reply ok;        // answer to RSET and NOOP in rcpt mode
    Reply refusal;   // the 521 with its enhanced code
    Reply quit;      // RFC 5321 4.1.1.10: 221, then close
};

// printf into a reply and add CRLF; false if it would pass max_reply.
[[gnu::format(printf, 2, 3)]] bool format_reply(Reply& reply, const char* format, ...) {
    std::va_list args;
    va_start(args, format);
    int n = std::vsnprintf(reply.bytes, sizeof reply.bytes, format, args);
    va_end(args);
    if (n < 0 || static_cast<std::size_t>(n) + 2 > max_reply) return false;
    reply.bytes[n] = '\r';
    reply.bytes[n + 1] = '\n';
    reply.length = static_cast<std::size_t>(n) + 2;
    return true;
}

// R1, R2: the code, then the host's name.  R10 (RFC 2034 3): no enhanced
// status code in the greeting nor in the reply to HELO/EHLO.  X.3.2 is the
// code RFC 7504 pairs with 521.  The EHLO reply is one line: no extension
// is advertised, since none is honoured.
bool build_replies(const Options& options, Replies& replies) {
    const int nl = static_cast<int>(options.hostname.size());
    const int ml = static_cast<int>(options.message.size());
    const char* name = options.hostname.data();
    const char* text = options.message.data();
    bool fits = true;
    if (options.mode == Mode::rcpt) {
        fits &= format_reply(replies.greeting, "220 %.*s ESMTP %.*s", nl, name, ml, text);
        fits &= format_reply(replies.helo, "250 %.*s", nl, name);
    } else {
        fits &= format_reply(replies.greeting, "521 %.*s %.*s", nl, name, ml, text);
        fits &= format_reply(replies.helo, "521 %.*s %.*s", nl, name, ml, text);
    }
    fits &= format_reply(replies.mail, "250 2.1.0 Ok");
    fits &= format_reply(replies.ok, "250 2.0.0 Ok");
    fits &= format_reply(replies.refusal, "521 5.3.2 %.*s %.*s", nl, name, ml, text);
    fits &= format_reply(replies.quit, "221 %.*s closing connection", nl, name);
    return fits;
}

// ---------------------------------------------------------------- session

enum class EndReason { none, quit, eof, timeout, limit, http, tls, close, read_error, write_error };

constexpr std::string_view end_reason_name(EndReason reason) {
    switch (reason) {
    case EndReason::none: return "none";
    case EndReason::quit: return "quit";
    case EndReason::eof: return "eof";
    case EndReason::timeout: return "timeout";
    case EndReason::limit: return "limit";
    case EndReason::http: return "http";
    case EndReason::tls: return "tls";
    case EndReason::close: return "close";
    case EndReason::read_error: return "read-error";
    case EndReason::write_error: return "write-error";
    }
    return "none";
}

// Replies waiting to be written.  Its size is one pipe buffer (PIPE_BUF), so
// one write of it never blocks on a pipe that poll() called writable.
struct Output {
    static constexpr std::size_t capacity = 4096;
    char bytes[capacity];
    std::size_t length = 0;
    std::size_t room() const { return capacity - length; }
    void append(std::string_view s) {
        std::memcpy(bytes + length, s.data(), s.size());
        length += s.size();
    }
    std::string_view view() const { return {bytes, length}; }
    void clear() { length = 0; }
};
static_assert(Output::capacity >= 2 * max_reply, "room for the greeting and a reply");

// What the client tried, for the log line: bounded copies of its words.
struct Argument {
    static constexpr std::size_t capacity = 100;
    char bytes[capacity];
    std::size_t length = 0;
    bool truncated = false;
    void set(std::string_view s) {
        length = s.size() < capacity ? s.size() : capacity;
        truncated = s.size() > capacity;
        if (length > 0) std::memcpy(bytes, s.data(), length);  // memcpy(_, nullptr, 0) is undefined
    }
    bool empty() const { return length == 0; }  // a truncated argument has capacity octets
    std::string_view view() const { return {bytes, length}; }
};

constexpr std::size_t logged_rcpts = 3;

enum class Verb { other, helo, ehlo, mail, rcpt, rset, noop, quit };

// string_view::substr throws std::out_of_range; these clamp instead, so
// nothing here can throw, and a static build links no exception machinery
// (libstdc++'s emergency pool alone is a 70 KiB allocation at start).
constexpr std::string_view head(std::string_view s, std::size_t n) { return {s.data(), n < s.size() ? n : s.size()}; }
constexpr std::string_view tail(std::string_view s, std::size_t from) {
    return from < s.size() ? std::string_view(s.data() + from, s.size() - from) : std::string_view(s.data() + s.size(), 0);
}

constexpr char to_upper(char c) { return c >= 'a' && c <= 'z' ? static_cast<char>(c - 'a' + 'A') : c; }

// RFC 5321 2.4: commands are case-insensitive.  `prefix` is upper case.
constexpr bool starts_with_nocase(std::string_view s, std::string_view prefix) {
    if (s.size() < prefix.size()) return false;
    for (std::size_t i = 0; i < prefix.size(); ++i)
        if (to_upper(s[i]) != prefix[i]) return false;
    return true;
}

// A verb is the whole first word.
constexpr bool is_verb(std::string_view line, std::string_view verb) {
    return starts_with_nocase(line, verb) && (line.size() == verb.size() || line[verb.size()] == ' ');
}

constexpr Verb verb_of(std::string_view line) {
    if (is_verb(line, "HELO")) return Verb::helo;
    if (is_verb(line, "EHLO")) return Verb::ehlo;
    if (is_verb(line, "MAIL")) return Verb::mail;
    if (is_verb(line, "RCPT")) return Verb::rcpt;
    if (is_verb(line, "RSET")) return Verb::rset;
    if (is_verb(line, "NOOP")) return Verb::noop;
    if (is_verb(line, "QUIT")) return Verb::quit;
    return Verb::other;
}

// R18: an HTTP request line is not SMTP.  Methods are case-sensitive.
constexpr bool is_http_request(std::string_view line) {
    constexpr std::string_view methods[] = {"GET ",    "POST ",  "HEAD ",    "PUT ",  "DELETE ",
                                            "OPTIONS ", "PATCH ", "CONNECT ", "TRACE "};
    for (auto method : methods)
        if (head(line, method.size()) == method) return true;
    return false;
}

// The interesting word of a HELO/MAIL/RCPT line: after the verb, past
// "FROM:"/"TO:", the <path> up to '>' or the first word.
constexpr std::string_view argument_of(std::string_view line) {
    std::size_t i = 4;
    while (i < line.size() && line[i] == ' ') ++i;
    std::string_view rest = tail(line, i);
    for (std::string_view prefix : {std::string_view("FROM:"), std::string_view("TO:")}) {
        if (starts_with_nocase(rest, prefix)) {
            rest.remove_prefix(prefix.size());
            while (!rest.empty() && rest.front() == ' ') rest.remove_prefix(1);
            break;
        }
    }
    if (rest.empty()) return rest;
    const bool bracketed = rest.front() == '<';
    std::size_t end = bracketed ? rest.find('>') : rest.find(' ');
    if (end == std::string_view::npos) return rest;
    return head(rest, bracketed ? end + 1 : end);
}

// The protocol, with no I/O: bytes in, reply bytes out, an end reason.
class Session {
public:
    Session(const Replies& replies, Mode mode, int max_commands)
        : replies_(replies), mode_(mode), max_commands_(max_commands) {}

    // R16: the greeting goes out first, whatever an early talker has sent.
    void greet(Output& out) {
        out.append(replies_.greeting.view());
        if (mode_ == Mode::close) end_ = EndReason::close;
    }

    // Consume input until it is used up, the session ends, or `out` has no
    // room for another reply; return how much was consumed.  The caller
    // writes `out` and feeds the rest.
    std::size_t feed(std::string_view input, Output& out) {
        std::size_t used = 0;
        while (used < input.size() && end_ == EndReason::none && out.room() >= max_reply) {
            std::string_view rest = tail(input, used);
            std::size_t newline = rest.find('\n');
            std::string_view chunk = head(rest, newline);
            // R8: keep at most one line's worth; the rest of a long line
            // is counted, not stored.
            std::size_t keep = chunk.size() < line_capacity - line_length_ ? chunk.size()
                                                                          : line_capacity - line_length_;
            std::memcpy(line_ + line_length_, chunk.data(), keep);
            line_length_ += keep;
            if (keep < chunk.size()) overlong_ = true;
            used += chunk.size();
            // R18: a TLS handshake record begins 0x16 0x03.
            if (commands_ == 0 && line_length_ >= 2 && line_[0] == '\x16' && line_[1] == '\x03') {
                end_ = EndReason::tls;
                break;
            }
            if (newline == std::string_view::npos) break;
            ++used;  // the LF
            command(out);
        }
        return used;
    }

    // The client closed its side: a last unterminated line still counts.
    void input_closed(Output& out) {
        if (end_ != EndReason::none) return;
        if (line_length_ > 0 || overlong_) command(out);
        if (end_ == EndReason::none) end_ = EndReason::eof;
    }

    bool ended() const { return end_ != EndReason::none; }
    EndReason end_reason() const { return end_; }
    int commands() const { return commands_; }
    const Argument& helo() const { return helo_; }
    const Argument& mail() const { return mail_; }
    const Argument& rcpt(std::size_t i) const { return rcpt_[i]; }
    int rcpt_count() const { return rcpt_count_; }

private:
    // R8: 512 octets with the line end: 510 of text and CRLF, or 511 and a
    // bare LF.  The CR is kept with the text and stripped later.
    static constexpr std::size_t line_capacity = max_line - 1;

    void command(Output& out) {
        std::string_view line(line_, line_length_);
        if (!line.empty() && line.back() == '\r') line.remove_suffix(1);  // R7: CRLF or bare LF
        const bool overlong = overlong_;
        line_length_ = 0;
        overlong_ = false;

        if (commands_ == 0 && is_http_request(line)) {
            end_ = EndReason::http;
            return;
        }
        ++commands_;
        const Verb verb = verb_of(line);
        record(verb, line);
        out.append(reply_to(verb, overlong).view());
        if (verb == Verb::quit && !overlong)
            end_ = EndReason::quit;
        else if (commands_ >= max_commands_)
            end_ = EndReason::limit;
    }

    // R3 (b), R4, and the rcpt mode: which reply a command gets.  An
    // overlong line is refused whatever its verb.
    const Reply& reply_to(Verb verb, bool overlong) const {
        if (overlong) return replies_.refusal;
        switch (verb) {
        case Verb::quit: return replies_.quit;
        case Verb::helo:
        case Verb::ehlo: return replies_.helo;
        case Verb::mail: return mode_ == Mode::rcpt ? replies_.mail : replies_.refusal;
        case Verb::rset:
        case Verb::noop: return mode_ == Mode::rcpt ? replies_.ok : replies_.refusal;
        case Verb::rcpt:
        case Verb::other: return replies_.refusal;
        }
        return replies_.refusal;
    }

    void record(Verb verb, std::string_view line) {
        switch (verb) {
        case Verb::helo:
        case Verb::ehlo: helo_.set(argument_of(line)); break;
        case Verb::mail: mail_.set(argument_of(line)); break;
        case Verb::rcpt:
            if (static_cast<std::size_t>(rcpt_count_) < logged_rcpts) rcpt_[rcpt_count_].set(argument_of(line));
            ++rcpt_count_;
            break;
        default: break;
        }
    }

    const Replies& replies_;
    const Mode mode_;
    const int max_commands_;
    EndReason end_ = EndReason::none;
    int commands_ = 0;
    char line_[line_capacity];
    std::size_t line_length_ = 0;
    bool overlong_ = false;
    Argument helo_, mail_, rcpt_[logged_rcpts];
    int rcpt_count_ = 0;
};

// ---------------------------------------------------------------- I/O loop

using Millis = long long;

Millis now_ms() {
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<Millis>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

int poll_timeout(Millis deadline) {
    Millis left = deadline - now_ms();
    if (left <= 0) return 0;
    return left > INT_MAX ? INT_MAX : static_cast<int>(left);
}

enum class Wait { ready, timeout, failed };

// Wait until fd is ready for `events` or the deadline passes.  POLLHUP and
// POLLERR count as ready: the read or write that follows reports them.
Wait wait_for(int fd, short events, Millis deadline) {
    for (;;) {
        pollfd p{fd, events, 0};
        int n = poll(&p, 1, poll_timeout(deadline));
        if (n > 0) return (p.revents & POLLNVAL) ? Wait::failed : Wait::ready;
        if (n == 0) return Wait::timeout;
        if (errno != EINTR) return Wait::failed;
    }
}

struct Connection {
    int in = 0, out = 1;
    bool in_is_socket = false, out_is_socket = false;
};

bool is_socket(int fd) {
    struct stat st{};
    return fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode);
}

// Write everything or fail, never blocking past the deadline.  On a socket
// send() with MSG_DONTWAIT|MSG_NOSIGNAL cannot block and raises no SIGPIPE;
// on a pipe a write of at most PIPE_BUF after POLLOUT cannot block, and
// SIGPIPE is ignored (EPIPE is returned instead).
EndReason write_all(const Connection& c, std::string_view data, Millis deadline) {
    while (!data.empty()) {
        Wait w = wait_for(c.out, POLLOUT, deadline);
        if (w == Wait::timeout) return EndReason::timeout;
        if (w == Wait::failed) return EndReason::write_error;
        std::size_t chunk = data.size() < PIPE_BUF ? data.size() : PIPE_BUF;
        ssize_t n = c.out_is_socket ? send(c.out, data.data(), chunk, MSG_DONTWAIT | MSG_NOSIGNAL)
                                    : write(c.out, data.data(), chunk);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
            return EndReason::write_error;
        }
        data.remove_prefix(static_cast<std::size_t>(n));
    }
    return EndReason::none;
}

// R17: closing a socket with unread input makes the kernel send a reset,
// which can destroy the last reply in flight.  Shut down our side, read and
// discard what the client still sends for a short, bounded while, then
// close.
constexpr Millis drain_ms = 500;
constexpr std::size_t drain_bytes = 256 * 1024;

void close_gracefully(const Connection& c) {
    if (!c.out_is_socket) return;
    if (shutdown(c.out, SHUT_WR) != 0 || !c.in_is_socket) return;
    const Millis until = now_ms() + drain_ms;
    char sink[4096];
    std::size_t drained = 0;
    while (drained < drain_bytes && wait_for(c.in, POLLIN, until) == Wait::ready) {
        ssize_t n = recv(c.in, sink, sizeof sink, MSG_DONTWAIT);
        if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
        if (n <= 0) return;  // EOF or error: the client is gone
        drained += static_cast<std::size_t>(n);
    }
}

// Run one session on the connection; returns how it ended.
EndReason run(Session& session, const Connection& c, Millis deadline) {
    Output out;
    session.greet(out);
    EndReason io = write_all(c, out.view(), deadline);
    out.clear();
    char input[4096];
    while (io == EndReason::none && !session.ended()) {
        Wait w = wait_for(c.in, POLLIN, deadline);
        if (w == Wait::timeout) {
            io = EndReason::timeout;
            break;
        }
        ssize_t n = w == Wait::failed ? -1 : read(c.in, input, sizeof input);
        if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
        if (n < 0) {
            io = EndReason::read_error;
            break;
        }
        if (n == 0) session.input_closed(out);
        // R16: every reply of one read goes out in one write, unless it
        // overflows the buffer.
        std::string_view rest(input, static_cast<std::size_t>(n));
        do {
            rest.remove_prefix(session.feed(rest, out));
            if (out.length > 0) io = write_all(c, out.view(), deadline);
            out.clear();
        } while (io == EndReason::none && !session.ended() && !rest.empty());
    }
    // Not after a timeout or a failed write: there is no reply to protect.
    if (io == EndReason::none || io == EndReason::read_error) close_gracefully(c);
    // An I/O failure is what the log should say, even after QUIT.
    return io != EndReason::none ? io : session.end_reason();
}

// ---------------------------------------------------------------- logging

// Client text goes into the log escaped: printable ASCII but for '\\' as
// is, everything else (space, controls, CR, LF, 8-bit) as \xHH, so one
// session is always one line of space-separated key=value fields and a
// client cannot forge a line or a field.
struct LogLine {
    char bytes[2048];
    std::size_t length = 0;

    void add(std::string_view s) {
        std::size_t n = s.size() < sizeof bytes - length ? s.size() : sizeof bytes - length;
        std::memcpy(bytes + length, s.data(), n);
        length += n;
    }
    void add_number(long long v) {
        char digits[24];
        int n = std::snprintf(digits, sizeof digits, "%lld", v);
        add({digits, static_cast<std::size_t>(n)});
    }
    void add_escaped(std::string_view s) {
        static constexpr char hex[] = "0123456789abcdef";
        for (unsigned char c : s) {
            if (c > 0x20 && c < 0x7f && c != '\\') {
                char ch = static_cast<char>(c);
                add({&ch, 1});
            } else {
                char esc[4] = {'\\', 'x', hex[c >> 4], hex[c & 15]};
                add({esc, 4});
            }
        }
    }
    void add_argument(const Argument& a) {
        if (a.empty()) return add("-");
        add_escaped(a.view());
        if (a.truncated) add("...");
    }
    std::string_view view() const { return {bytes, length}; }
};

// The peer, as "address:port" (IPv6 in brackets): getpeername() on fd 0;
// else the super-server's environment (systemd, then tcpserver); else
// "local" (a pipe or a file).  Read before the greeting: once the client
// has reset or the connection is closed, getpeername() fails (ENOTCONN),
// and a client that resets at once is one an administrator wants named.
void add_peer(LogLine& log, int fd) {
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    char address_buffer[INET6_ADDRSTRLEN] = {};
    char port_buffer[8] = {};
    std::string_view address, port;
    if (getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0) {
        const void* raw = nullptr;
        int family = ss.ss_family;
        unsigned number = 0;
        if (family == AF_INET) {
            auto* sin = reinterpret_cast<sockaddr_in*>(&ss);
            raw = &sin->sin_addr;
            number = ntohs(sin->sin_port);
        } else if (family == AF_INET6) {
            auto* sin6 = reinterpret_cast<sockaddr_in6*>(&ss);
            // A dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d.
            bool mapped = IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr);
            raw = mapped ? static_cast<const void*>(&sin6->sin6_addr.s6_addr[12]) : &sin6->sin6_addr;
            family = mapped ? AF_INET : AF_INET6;
            number = ntohs(sin6->sin6_port);
        }
        if (raw != nullptr && inet_ntop(family, raw, address_buffer, sizeof address_buffer) != nullptr) {
            address = address_buffer;
            port = {port_buffer, static_cast<std::size_t>(std::snprintf(port_buffer, sizeof port_buffer, "%u", number))};
        }
    }
    const char* env_pairs[][2] = {{"REMOTE_ADDR", "REMOTE_PORT"}, {"TCPREMOTEIP", "TCPREMOTEPORT"}};
    for (auto& pair : env_pairs) {
        if (!address.empty()) break;
        const char* a = std::getenv(pair[0]);
        if (a == nullptr || *a == '\0') continue;
        address = head(a, 64);
        const char* p = std::getenv(pair[1]);
        port = head(p != nullptr ? p : "", 8);
    }
    if (address.empty()) return log.add("local");
    // The environment is not to be trusted: escaped like client text.
    const bool v6 = address.find(':') != std::string_view::npos;
    log.add(v6 ? "[" : "");
    log.add_escaped(address);
    log.add(v6 ? "]" : "");
    if (!port.empty()) {
        log.add(":");
        log.add_escaped(port);
    }
}

// peer= end= commands= duration= helo= mail= rcpt= rcpts=
void format_log(LogLine& log, const Session& s, EndReason end, Millis elapsed, std::string_view peer) {
    log.add("peer=");
    log.add(peer);
    log.add(" end=");
    log.add(end_reason_name(end));
    log.add(" commands=");
    log.add_number(s.commands());
    char duration[32];
    int n = std::snprintf(duration, sizeof duration, " duration=%lld.%03lld", elapsed / 1000, elapsed % 1000);
    log.add({duration, static_cast<std::size_t>(n)});
    log.add(" helo=");
    log.add_argument(s.helo());
    log.add(" mail=");
    log.add_argument(s.mail());
    log.add(" rcpt=");
    int shown = s.rcpt_count() < static_cast<int>(logged_rcpts) ? s.rcpt_count() : static_cast<int>(logged_rcpts);
    if (shown == 0) log.add("-");
    for (int i = 0; i < shown; ++i) {
        if (i > 0) log.add(",");
        log.add_argument(s.rcpt(static_cast<std::size_t>(i)));
    }
    log.add(" rcpts=");
    log.add_number(s.rcpt_count());
}

// Under inetd fds 0, 1 and 2 are all the connection; under systemd too,
// unless the unit says StandardError=.  Whatever goes to stderr then goes to
// the client, so it must not be written there.
bool stderr_is_connection() {
    struct stat err{}, in{}, out{};
    if (fstat(2, &err) != 0) return true;  // closed: nowhere to write
    if (!S_ISSOCK(err.st_mode)) return false;
    auto same = [&](const struct stat& other) { return err.st_dev == other.st_dev && err.st_ino == other.st_ino; };
    return (fstat(0, &in) == 0 && same(in)) || (fstat(1, &out) == 0 && same(out));
}

void write_stderr(std::string_view line) {
    while (!line.empty()) {
        ssize_t n = write(2, line.data(), line.size());
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return;
        line.remove_prefix(static_cast<std::size_t>(n));
    }
}

void open_syslog() { openlog("smtp521", LOG_PID, LOG_MAIL); }

void emit_log(LogTarget target, int priority, std::string_view line) {
    if (target == LogTarget::none) return;
    if (target == LogTarget::stderr_ && !stderr_is_connection()) {
        char with_newline[sizeof LogLine::bytes + 1];
        std::memcpy(with_newline, line.data(), line.size());
        with_newline[line.size()] = '\n';
        write_stderr({with_newline, line.size() + 1});
        return;
    }
    open_syslog();
    syslog(priority, "%.*s", static_cast<int>(line.size()), line.data());
}

// ---------------------------------------------------------------- main

// A usage error: one line, to syslog, and to stderr when that is not the
// connection; never to the client.
[[gnu::format(printf, 1, 2)]] int usage_error(const char* format, ...) {
    char message[600];
    std::va_list args;
    va_start(args, format);
    int n = std::vsnprintf(message, sizeof message, format, args);
    va_end(args);
    if (n < 0) n = 0;
    std::size_t length = static_cast<std::size_t>(n) < sizeof message ? static_cast<std::size_t>(n) : sizeof message - 1;
    open_syslog();
    syslog(LOG_ERR, "%.*s", static_cast<int>(length), message);
    if (!stderr_is_connection()) {
        LogLine line;
        line.add("smtp521: ");
        line.add({message, length});
        line.add(" (see smtp521 --help)\n");
        write_stderr(line.view());
    }
    return exit_usage;
}

bool parse_number(const char* text, int low, int high, int& value) {
    if (*text < '0' || *text > '9') return false;  // no sign, no space
    errno = 0;
    char* end = nullptr;
    long v = std::strtol(text, &end, 10);
    if (errno != 0 || *end != '\0' || v < low || v > high) return false;
    value = static_cast<int>(v);
    return true;
}

// R2: a name is one word of printable ASCII: a domain or an address literal.
bool valid_hostname(std::string_view name) {
    if (name.empty() || name.size() > 255) return false;
    for (unsigned char c : name)
        if (c <= 0x20 || c >= 0x7f) return false;
    return true;
}

// RFC 5321 4.2: reply text is printable US-ASCII; no CR or LF, no controls.
bool valid_message(std::string_view text) {
    if (text.empty()) return false;
    for (unsigned char c : text)
        if (c < 0x20 || c >= 0x7f) return false;
    return true;
}

enum class Parse { run, done, error };

Parse parse_options(int argc, char** argv, Options& options, char* hostname_buffer, std::size_t buffer_size,
                    int& status) {
    static const option long_options[] = {
        {"refuse-at", required_argument, nullptr, 'r'}, {"close", no_argument, nullptr, 'c'},
        {"hostname", required_argument, nullptr, 'H'},  {"message", required_argument, nullptr, 'm'},
        {"timeout", required_argument, nullptr, 't'},   {"max-commands", required_argument, nullptr, 'n'},
        {"log", required_argument, nullptr, 'l'},       {"version", no_argument, nullptr, 'V'},
        {"help", no_argument, nullptr, 'h'},            {nullptr, 0, nullptr, 0},
    };
    bool refuse_at_rcpt_given = false, close_given = false;
    opterr = 0;  // our own one-line messages, never getopt's
    int opt;
    while ((opt = getopt_long(argc, argv, ":r:cH:m:t:n:l:Vh", long_options, nullptr)) != -1) {
        std::string_view arg = optarg != nullptr ? optarg : "";
        switch (opt) {
        case 'r':
            if (arg == "rcpt") {
                refuse_at_rcpt_given = true;
                options.mode = Mode::rcpt;
            } else if (arg == "greeting") {
                if (options.mode != Mode::close) options.mode = Mode::greeting;
            } else {
                status = usage_error("invalid --refuse-at '%.64s': expected rcpt or greeting", optarg);
                return Parse::error;
            }
            break;
        case 'c':
            close_given = true;
            options.mode = Mode::close;
            break;
        case 'H':
            if (!valid_hostname(arg)) {
                status = usage_error("invalid --hostname '%.64s': expected one word of printable ASCII, "
                                     "at most 255 characters", optarg);
                return Parse::error;
            }
            options.hostname = arg;
            break;
        case 'm':
            if (!valid_message(arg)) {
                status = usage_error("invalid --message: expected printable ASCII text, no control characters "
                                     "(no CR or LF)");
                return Parse::error;
            }
            options.message = arg;
            break;
        case 't':
            if (!parse_number(optarg, min_timeout, max_timeout, options.timeout_seconds)) {
                status = usage_error("invalid --timeout '%.64s': expected whole seconds from %d to %d", optarg,
                                     min_timeout, max_timeout);
                return Parse::error;
            }
            break;
        case 'n':
            if (!parse_number(optarg, min_commands, max_commands_limit, options.max_commands)) {
                status = usage_error("invalid --max-commands '%.64s': expected a whole number from %d to %d",
                                     optarg, min_commands, max_commands_limit);
                return Parse::error;
            }
            break;
        case 'l':
            if (arg == "syslog") options.log = LogTarget::syslog;
            else if (arg == "stderr") options.log = LogTarget::stderr_;
            else if (arg == "none") options.log = LogTarget::none;
            else {
                status = usage_error("invalid --log '%.64s': expected syslog, stderr or none", optarg);
                return Parse::error;
            }
            break;
        case 'V': {
            char text[64];
            int n = std::snprintf(text, sizeof text, "smtp521 %.*s\n", static_cast<int>(version.size()),
                                  version.data());
            (void)!write(1, text, static_cast<std::size_t>(n));
            status = exit_ok;
            return Parse::done;
        }
        case 'h':
            (void)!write(1, usage_text.data(), usage_text.size());
            status = exit_ok;
            return Parse::done;
        case ':':
            status = usage_error("option '%.64s' needs a value", argv[optind - 1]);
            return Parse::error;
        default:
            if (optopt != 0) status = usage_error("unknown option '-%c'", optopt);
            else status = usage_error("unknown option '%.64s'", argv[optind - 1]);
            return Parse::error;
        }
    }
    if (optind < argc) {
        status = usage_error("unexpected argument '%.64s'", argv[optind]);
        return Parse::error;
    }
    if (close_given && refuse_at_rcpt_given) {
        status = usage_error("--close closes after a 521 greeting: it cannot go with --refuse-at rcpt");
        return Parse::error;
    }
    if (options.hostname.empty()) {
        // No DNS (SPEC: a sandboxed unit may have no network): the kernel's name.
        if (gethostname(hostname_buffer, buffer_size) != 0) hostname_buffer[0] = '\0';
        hostname_buffer[buffer_size - 1] = '\0';
        options.hostname = hostname_buffer;
        if (!valid_hostname(options.hostname)) options.hostname = "localhost";
    }
    return Parse::run;
}

int main(int argc, char** argv) {
    const Millis start = now_ms();
    Options options;
    char hostname_buffer[256];
    int status = exit_ok;
    if (parse_options(argc, argv, options, hostname_buffer, sizeof hostname_buffer, status) != Parse::run)
        return status;
    Replies replies;
    if (!build_replies(options, replies))
        return usage_error("--hostname and --message make a reply longer than %zu octets (RFC 5321 4.5.3.1.5)",
                           max_reply);

    // A vanished peer must give EPIPE, not death by SIGPIPE.
    struct sigaction ignore{};
    ignore.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &ignore, nullptr);
    // Last resort should anything block past the deadline (a stuck syslog
    // socket): the kernel ends the process two seconds after it.
    alarm(static_cast<unsigned>(options.timeout_seconds) + 2);

    Connection connection;
    connection.in_is_socket = is_socket(connection.in);
    connection.out_is_socket = is_socket(connection.out);
    const Millis deadline = start + static_cast<Millis>(options.timeout_seconds) * 1000;

    LogLine peer;
    if (options.log != LogTarget::none) add_peer(peer, connection.in);

    Session session(replies, options.mode, options.max_commands);
    EndReason end = run(session, connection, deadline);

    LogLine log;
    format_log(log, session, end, now_ms() - start, peer.view());
    emit_log(options.log, LOG_INFO, log.view());
    return exit_ok;
}

}  // namespace smtp521

#ifndef SMTP521_NO_MAIN
int main(int argc, char** argv) { return smtp521::main(argc, argv); }
#endif
