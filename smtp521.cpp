// smtp521 -- refuse all mail, at once and for good.
//
// A super-server (inetd, systemd socket activation, tcpserver) starts one
// smtp521 per TCP connection, with the connection on fds 0 and 1.  It speaks
// just enough SMTP to make the sending MTA return the message to its author
// now (a permanent 5yz reply) instead of queueing it for days, logs one line,
// and exits.  Standards: RFC 1846, RFC 7504, RFC 5321, RFC 2034.
//
// Read top to bottom: options, fixed buffers, the reply table of each mode,
// the session (pure, no I/O: bytes in, replies and an end reason out), the
// I/O loop, logging, the alarm backstop, the confinement (a seccomp filter
// installed before the first byte from the client), option parsing and main.

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/net.h>
#include <linux/seccomp.h>
#include <getopt.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <climits>
#include <csignal>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string_view>
#include <utility>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/lsan_interface.h>
#endif

namespace smtp521 {

constexpr std::string_view version = SMTP521_VERSION;  // make: from VERSION

// ---------------------------------------------------------------- options

// When the refusal comes, latest first.  The default is `rcpt`; which to
// choose, and why, is the man page's "Choosing the mode".  `count` is no
// mode: it counts them, and stays last.
enum class Mode {
    rcpt,      // 220 greeting, 250 to HELO/EHLO/MAIL, 521 5.3.2 from RCPT on
    helo,      // 220 greeting, 521 to all but QUIT: EHLO, so STARTTLS, is refused
    greeting,  // RFC 1846 4.2 (b), RFC 7504 3: 521 greeting, 521 to all but QUIT
    close,     // RFC 1846 4.2 (a): 521 greeting, then close
    count
};

enum class LogTarget { syslog, stderr_, none };
constexpr std::string_view log_target_names[] = {"syslog", "stderr", "none"};  // -l's values, in the enum's order

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
    bool check = false;  // --check: check the options, print them and the greeting, exit
    // Stress (see stress_sessions() and the man page's "Under stress"): a
    // session that starts when its slice already runs this many sessions,
    // itself included, ends stress_timeout seconds after it began, with a
    // 521.  A mailless host is sent a few sessions an hour; this many at
    // once is a slot-exhaustion attack, which a deadline of 5 minutes
    // would let take every slot for under 2 connections a second.  0: never.
    int stress_at = 32;
    // Postfix's smtpd_timeout under stress.  A real sender sends its next
    // command within one round trip: greeting, EHLO, MAIL, RCPT and QUIT
    // take a few seconds even on a 1 s path.
    int stress_timeout = 10;
};

constexpr int min_timeout = 1, max_timeout = 86400;
constexpr int min_commands = 1, max_commands_limit = 100000;
constexpr int max_stress_at = 1000000;

// RFC 5321 4.5.3.1.4 and 4.5.3.1.5: 512 octets for a command line and for
// a reply line, CRLF included.
constexpr std::size_t max_line = 512;
constexpr std::size_t max_reply = 512;

// sysexits(3): EX_USAGE for bad options.  A session ends with 0 however the
// client behaved, and however it ended (the alarm backstop included): under
// systemd a non-zero status would leave a failed unit behind for every rude
// client.
constexpr int exit_ok = 0, exit_usage = 64;

// Debian's convention for the host's mail name (mailname(5)).
constexpr const char* mailname_path = "/etc/mailname";

constexpr std::string_view usage_text =
    "usage: smtp521 [-cC] [-r rcpt|helo|greeting] [-H name] [-m text]\n"
    "               [-t seconds] [-n count] [-s sessions] [-T seconds]\n"
    "               [-l syslog|stderr|none] [-V] [-h]\n"
    "Answer one SMTP connection on stdin/stdout so that the sender returns\n"
    "the mail at once: this host does not accept mail (RFC 1846, RFC 7504).\n"
    "\n"
    "  -r, --refuse-at WHEN     rcpt (default): greet 220, accept HELO, EHLO,\n"
    "                           MAIL, RSET and NOOP, refuse all else (RCPT\n"
    "                           first) with 521 5.3.2; helo: greet 220, answer\n"
    "                           521 to all but QUIT (EHLO first: for senders\n"
    "                           that require TLS); greeting: greet 521 and\n"
    "                           answer 521 to all but QUIT (RFC 7504)\n"
    "  -c, --close              greet 521 and close at once (RFC 1846 4.2 a)\n"
    "  -H, --hostname NAME      first word of every reply (default: the first\n"
    "                           line of /etc/mailname, else gethostname)\n"
    "  -m, --message TEXT       reply text after the name\n"
    "                           (default: \"does not accept mail\")\n"
    "  -t, --timeout SECONDS    end the session after SECONDS, 1-86400 (default 300)\n"
    "  -n, --max-commands N     end the session after N commands, 1-100000\n"
    "                           (default 200)\n"
    "  -s, --stress-at N        under systemd, a session that starts when its\n"
    "                           slice holds N sessions or more (itself included)\n"
    "                           is under stress; 0 never, at most 1000000\n"
    "                           (default 32)\n"
    "  -T, --stress-timeout SECONDS\n"
    "                           under stress, end the session after SECONDS\n"
    "                           with a 521 (log: end=stress), 1-86400 (default 10)\n"
    "  -l, --log TARGET         session log line to syslog (default), stderr\n"
    "                           or none\n"
    "  -C, --check              check the options (and that syslog takes\n"
    "                           lines), print the settings and the greeting,\n"
    "                           and exit: 0, or 64 and why\n"
    "  -V, --version            print the version and exit\n"
    "  -h, --help               print this help and exit\n"
    "An option given again overrides the earlier one; -r and -c set the same\n"
    "thing, so the last of them wins.\n";

// --help is a literal, and states the defaults and ranges above a second
// time: checked against them here, so that neither changes alone.
constexpr std::string_view help_entry(std::string_view option) {
    const std::size_t at = usage_text.find(option);
    const std::size_t end = usage_text.find("\n  -", at);
    return at == std::string_view::npos ? std::string_view() : usage_text.substr(at, end - at);
}
// The number right after `prefix` in the entry (skip: that many numbers
// and a '-' after it first, for "LOW-HIGH"), or -1.
constexpr long help_number(std::string_view option, std::string_view prefix, int skip = 0) {
    const std::string_view entry = help_entry(option);
    std::size_t i = entry.find(prefix);
    if (i == std::string_view::npos) return -1;
    i += prefix.size();
    long n = -1;
    for (int k = 0; k <= skip; ++k) {
        if (k > 0 && (i >= entry.size() || entry[i++] != '-')) return -1;
        for (n = 0; i < entry.size() && entry[i] >= '0' && entry[i] <= '9'; ++i)
            n = n * 10 + (entry[i] - '0');
    }
    return n;
}
static_assert(help_number("--timeout", "(default ") == Options{}.timeout_seconds &&
                  help_number("--max-commands", "(default ") == Options{}.max_commands &&
                  help_number("--stress-at", "(default ") == Options{}.stress_at &&
                  help_number("--stress-timeout", "(default ") == Options{}.stress_timeout,
              "--help gives the options' defaults");
static_assert(help_number("--timeout", "SECONDS, ") == min_timeout &&
                  help_number("--timeout", "SECONDS, ", 1) == max_timeout &&
                  help_number("--max-commands", "commands, ") == min_commands &&
                  help_number("--max-commands", "commands, ", 1) == max_commands_limit &&
                  help_number("--stress-at", "at most ") == max_stress_at &&
                  help_number("--stress-timeout", "end=stress), ") == min_timeout &&
                  help_number("--stress-timeout", "end=stress), ", 1) == max_timeout,
              "--help gives the options' ranges");

// ---------------------------------------------------------------- fixed buffers

// Every buffer is one of these: a reply, the output, a client's word, the
// log line.  An append past the capacity is cut, never overflows, and `cut`
// records it.
template <std::size_t N>
struct Text {
    static constexpr std::size_t capacity = N;
    char bytes[N];
    std::size_t length = 0;
    bool cut = false;

    std::size_t room() const { return N - length; }
    void append(std::string_view s) {
        const std::size_t n = std::min(s.size(), room());
        if (n > 0) std::memcpy(bytes + length, s.data(), n);  // memcpy(_, nullptr, 0) is undefined
        length += n;
        cut = cut || n < s.size();
    }
    void clear() {
        length = 0;
        cut = false;
    }
    std::string_view view() const { return {bytes, length}; }
};

// string_view::substr throws std::out_of_range; these clamp instead, so
// nothing here can throw, and a static build links no exception machinery
// (libstdc++'s emergency pool alone is a 70 KiB allocation at start).
constexpr std::string_view head(std::string_view s, std::size_t n) { return {s.data(), std::min(n, s.size())}; }
constexpr std::string_view tail(std::string_view s, std::size_t from) {
    return from < s.size() ? std::string_view(s.data() + from, s.size() - from) : std::string_view(s.data() + s.size(), 0);
}

// ---------------------------------------------------------------- reply table

// A reply is built once, at start, from the options, and then only copied:
// the session emits fixed strings (RFC 1846 6).  One reply may be more than
// one line (EHLO's), but all of it fits in max_reply.
using Reply = Text<max_reply>;

// The verbs the table tells apart (RFC 5321 4.1.1); every other line is
// `other`.  `count` is no verb: it counts them, and stays last.
enum class Verb { other, helo, ehlo, mail, rcpt, rset, noop, quit, count };
constexpr std::size_t verb_count = static_cast<std::size_t>(Verb::count);

// True if entry i of `table` holds the enumerator of value first + i, and
// the table runs up to the enum's `count`.
template <class Entry, std::size_t N, class Enum>
constexpr bool in_enum_order(const Entry (&table)[N], Enum Entry::*member, std::size_t first) {
    for (std::size_t i = 0; i < N; ++i)
        if (static_cast<std::size_t>(table[i].*member) != first + i) return false;
    return first + N == static_cast<std::size_t>(Enum::count);
}

struct Command {
    std::string_view name;  // upper case; RFC 5321 2.4: matched case-insensitively
    Verb verb;
};
// Every verb but `other`, in the enum's order.
constexpr Command commands[] = {
    {"HELO", Verb::helo}, {"EHLO", Verb::ehlo}, {"MAIL", Verb::mail}, {"RCPT", Verb::rcpt},
    {"RSET", Verb::rset}, {"NOOP", Verb::noop}, {"QUIT", Verb::quit},
};
static_assert(in_enum_order(commands, &Command::verb, 1), "one command per Verb but other, in the enum's order");

// Each mode's name: -r's value (all but close's, which is -c).
struct ModeName {
    Mode mode;
    std::string_view name;
};
constexpr ModeName mode_names[] = {
    {Mode::rcpt, "rcpt"}, {Mode::helo, "helo"}, {Mode::greeting, "greeting"}, {Mode::close, "close"}};
static_assert(in_enum_order(mode_names, &ModeName::mode, 0), "one name per Mode, in the enum's order");

constexpr std::string_view mode_name(Mode mode) { return mode_names[static_cast<std::size_t>(mode)].name; }

constexpr std::size_t mode_name_max() {
    std::size_t n = 0;
    for (const ModeName& m : mode_names) n = std::max(n, m.name.size());
    return n;
}

// The whole protocol of one mode, after rblsmtpd's smtpcommands[]: the
// greeting, whether the session ends with it, and the reply to each verb.
// `other` answers any other line, and an overlong one.  QUIT ends the
// session after its reply (RFC 5321 4.1.1.10).
struct Replies {
    Mode mode = Mode::rcpt;  // for the log line
    Reply greeting;
    bool close_after_greeting = false;  // build_replies() sets it, whatever this says
    Reply to[verb_count];
    const Reply& operator[](Verb v) const { return to[static_cast<std::size_t>(v)]; }
    Reply& operator[](Verb v) { return to[static_cast<std::size_t>(v)]; }
};

// printf into a reply and add CRLF; false if it would pass max_reply.
[[gnu::format(printf, 2, 3)]] bool format_reply(Reply& reply, const char* format, ...) {
    std::va_list args;
    va_start(args, format);
    int n = std::vsnprintf(reply.bytes, Reply::capacity, format, args);
    va_end(args);
    if (n < 0 || static_cast<std::size_t>(n) + 2 > max_reply) return false;
    reply.bytes[n] = '\r';
    reply.bytes[n + 1] = '\n';
    reply.length = static_cast<std::size_t>(n) + 2;
    return true;
}

// The mode is decided here, and only here.  Every reply begins with its
// code and then, RFC 1846 4.1 and RFC 5321 4.2, the host's name, except
// where an enhanced status code comes first.
//
// Enhanced status codes (RFC 2034) belong to the ENHANCEDSTATUSCODES
// extension, so they are sent where it is offered: in the rcpt mode, which
// advertises it in its EHLO reply.  There, by RFC 2034 section 3 (4) and
// section 4, every reply carries one but the greeting and the replies to
// HELO and EHLO, whether or not the client used EHLO (section 4: "regardless
// of whether or not EHLO is employed"; section 5: there is no negotiation).
// X.3.2 is the code RFC 7504 pairs with 521.  The other modes refuse EHLO
// itself, so they offer no extension, and none of their replies carries one.
bool build_replies(const Options& options, Replies& r) {
    const int nl = static_cast<int>(options.hostname.size());
    const int ml = static_cast<int>(options.message.size());
    const char* name = options.hostname.data();
    const char* text = options.message.data();
    bool fits = true;
    r.mode = options.mode;
    r.close_after_greeting = options.mode == Mode::close;
    if (options.mode == Mode::rcpt) {
        fits &= format_reply(r.greeting, "220 %.*s ESMTP %.*s", nl, name, ml, text);
        fits &= format_reply(r[Verb::other], "521 5.3.2 %.*s %.*s", nl, name, ml, text);
        for (Reply& reply : r.to) reply = r[Verb::other];  // RCPT first of all
        fits &= format_reply(r[Verb::helo], "250 %.*s", nl, name);
        fits &= format_reply(r[Verb::ehlo], "250-%.*s\r\n250 ENHANCEDSTATUSCODES", nl, name);
        fits &= format_reply(r[Verb::mail], "250 2.1.0 Ok");
        fits &= format_reply(r[Verb::rset], "250 2.0.0 Ok");
        r[Verb::noop] = r[Verb::rset];
        fits &= format_reply(r[Verb::quit], "221 2.0.0 %.*s closing connection", nl, name);
    } else {
        // RFC 1846 4.2 (b), RFC 7504 3: 521 to every command but QUIT.
        fits &= format_reply(r[Verb::other], "521 %.*s %.*s", nl, name, ml, text);
        for (Reply& reply : r.to) reply = r[Verb::other];
        fits &= format_reply(r[Verb::quit], "221 %.*s closing connection", nl, name);
        // The helo mode greets with 220, so that a sender reads the 521 in
        // reply to EHLO, where one that requires TLS looks for STARTTLS
        // (RFC 3207 4), and one that a 521 greeting would make defer or
        // try the next MX does not; the greeting does not say "ESMTP", as
        // EHLO is refused.  The others greet with the 521.
        if (options.mode == Mode::helo)
            fits &= format_reply(r.greeting, "220 %.*s %.*s", nl, name, ml, text);
        else
            r.greeting = r[Verb::other];
    }
    return fits;
}

// ---------------------------------------------------------------- session

// `count` is no reason: it counts them, and stays last.
enum class EndReason { none, quit, eof, timeout, stress, limit, http, tls, close, read_error, write_error, alarm, count };

// The log line's end= value of each reason, in the enum's order; the
// static_assert keeps table and enum equal.
struct EndReasonName {
    EndReason reason;
    std::string_view name;
};
constexpr EndReasonName end_reasons[] = {
    {EndReason::none, "none"},   {EndReason::quit, "quit"},         {EndReason::eof, "eof"},
    {EndReason::timeout, "timeout"}, {EndReason::stress, "stress"}, {EndReason::limit, "limit"},
    {EndReason::http, "http"},
    {EndReason::tls, "tls"},     {EndReason::close, "close"},       {EndReason::read_error, "read-error"},
    {EndReason::write_error, "write-error"}, {EndReason::alarm, "alarm"},
};
static_assert(in_enum_order(end_reasons, &EndReasonName::reason, 0), "one name per EndReason, in the enum's order");

constexpr std::string_view end_reason_name(EndReason reason) {
    return end_reasons[static_cast<std::size_t>(reason)].name;
}

// Replies waiting to be written: one pipe buffer (PIPE_BUF), since
// write_all() writes at most that much at once, which a pipe that poll()
// called writable takes without blocking.
using Output = Text<PIPE_BUF>;
static_assert(Output::capacity >= 2 * max_reply, "room for the greeting and a reply");

// What the client tried, for the log line: bounded copies of its words.
using Argument = Text<100>;
constexpr std::size_t logged_rcpts = 3;

constexpr char to_upper(char c) { return c >= 'a' && c <= 'z' ? static_cast<char>(c - 'a' + 'A') : c; }

// RFC 5321 2.4: commands are case-insensitive.  `prefix` is upper case.
constexpr bool starts_with_nocase(std::string_view s, std::string_view prefix) {
    if (s.size() < prefix.size()) return false;
    for (std::size_t i = 0; i < prefix.size(); ++i)
        if (to_upper(s[i]) != prefix[i]) return false;
    return true;
}

// RFC 5321 4.1.1 puts one SP after the verb; be liberal (RFC 5321 4.5.1's
// robustness) and take any run of blanks, SP or HTAB, as the separator.
constexpr bool is_blank(char c) { return c == ' ' || c == '\t'; }

constexpr std::string_view skip_blanks(std::string_view s) {
    std::size_t i = 0;
    while (i < s.size() && is_blank(s[i])) ++i;
    return tail(s, i);
}

// A verb is the whole first word: "QUIT", "QUIT\t" and "QUIT now" are QUIT,
// "QUITX" is not.
constexpr Verb verb_of(std::string_view line) {
    for (const Command& c : commands)
        if (starts_with_nocase(line, c.name) && (line.size() == c.name.size() || is_blank(line[c.name.size()])))
            return c.verb;
    return Verb::other;
}

// An HTTP request line is not SMTP (cf. Postfix's smtpd_forbidden_commands).
// Methods are case-sensitive (RFC 9110 9.1).
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
    std::string_view rest = skip_blanks(tail(line, 4));
    for (std::string_view prefix : {std::string_view("FROM:"), std::string_view("TO:")}) {
        if (starts_with_nocase(rest, prefix)) {
            rest = skip_blanks(tail(rest, prefix.size()));
            break;
        }
    }
    if (rest.empty()) return rest;
    if (rest.front() == '<') {
        std::size_t end = rest.find('>');
        return end == std::string_view::npos ? rest : head(rest, end + 1);
    }
    std::size_t end = 0;
    while (end < rest.size() && !is_blank(rest[end])) ++end;
    return head(rest, end);
}

// The protocol, with no I/O: bytes in, reply bytes out, an end reason.
class Session {
public:
    Session(const Replies& replies, int max_commands) : replies_(replies), max_commands_(max_commands) {}

    // The greeting goes out first, whatever an early talker has sent.
    void greet(Output& out) {
        out.append(replies_.greeting.view());
        if (replies_.close_after_greeting) end_ = EndReason::close;
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
            // RFC 5321 4.5.3.1.4: keep at most one line's worth; the rest
            // of a long line is counted, not stored.
            line_.append(chunk);
            used += chunk.size();
            // A TLS handshake record begins 0x16 0x03 (RFC 8446 5.1).
            if (commands_ == 0 && line_.length >= 2 && line_.bytes[0] == '\x16' && line_.bytes[1] == '\x03') {
                end_ = EndReason::tls;
                break;
            }
            if (newline == std::string_view::npos) break;
            ++used;  // the LF
            command(out);
        }
        return used;
    }

    // The stress deadline passed (see stress_sessions()): the refusal that
    // answers any command, so that a sender whose next command crosses it
    // reads a permanent reply, never a 4yz that would queue the mail (RFC
    // 5321 4.2.1; Postfix sends 421 here).  RFC 5321 3.8 lets the server
    // close after a timeout.
    void cut(Output& out) {
        if (end_ != EndReason::none) return;
        out.append(replies_[Verb::other].view());
        end_ = EndReason::stress;
    }

    // The client closed its side: a last unterminated line still counts.
    void input_closed(Output& out) {
        if (end_ != EndReason::none) return;
        if (line_.length > 0 || line_.cut) command(out);
        if (end_ == EndReason::none) end_ = EndReason::eof;
    }

    bool ended() const { return end_ != EndReason::none; }
    Mode mode() const { return replies_.mode; }
    EndReason end_reason() const { return end_; }
    int commands() const { return commands_; }
    const Argument& helo() const { return helo_; }
    const Argument& mail() const { return mail_; }
    const Argument& rcpt(std::size_t i) const { return rcpt_[i]; }
    int rcpt_count() const { return rcpt_count_; }

private:
    void command(Output& out) {
        std::string_view line = line_.view();
        // RFC 5321 2.3.8: CRLF ends a line; a bare LF is accepted too.
        if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
        const bool overlong = line_.cut;
        line_.clear();  // `line` stays valid: nothing is appended before the next call

        if (commands_ == 0 && is_http_request(line)) {
            end_ = EndReason::http;
            return;
        }
        ++commands_;
        const Verb verb = verb_of(line);
        record(verb, line);
        // An overlong line is refused whatever its verb.
        const Verb answered = overlong ? Verb::other : verb;
        out.append(replies_[answered].view());
        if (answered == Verb::quit)
            end_ = EndReason::quit;
        else if (commands_ >= max_commands_)
            end_ = EndReason::limit;
    }

    void record(Verb verb, std::string_view line) {
        switch (verb) {
        case Verb::helo:
        case Verb::ehlo: set(helo_, argument_of(line)); break;
        case Verb::mail: set(mail_, argument_of(line)); break;
        case Verb::rcpt:
            if (static_cast<std::size_t>(rcpt_count_) < logged_rcpts) set(rcpt_[rcpt_count_], argument_of(line));
            ++rcpt_count_;
            break;
        default: break;
        }
    }

    static void set(Argument& a, std::string_view s) {
        a.clear();
        a.append(s);
    }

    const Replies& replies_;
    const int max_commands_;
    EndReason end_ = EndReason::none;
    int commands_ = 0;
    // RFC 5321 4.5.3.1.4: 512 octets with the line end: 510 of text and
    // CRLF, or 511 and a bare LF.  The CR is kept with the text and
    // stripped later; a longer line is `cut`.
    Text<max_line - 1> line_;
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
// POLLNVAL (fd not open) is `failed`, and there is no errno to look at.
// Past the deadline poll() still says ready when the fd is: a last reply
// goes out if it can.  Input is another matter (wait_for_input).
Wait wait_for(int fd, short events, Millis deadline) {
    for (;;) {
        pollfd p{fd, events, 0};
        int n = poll(&p, 1, poll_timeout(deadline));
        if (n > 0) return (p.revents & POLLNVAL) ? Wait::failed : Wait::ready;
        if (n == 0) return Wait::timeout;
        if (errno != EINTR) return Wait::failed;
    }
}

// The deadline is checked before every wait for input, not left to
// poll(), which past it still says ready when input is waiting: a client
// that never lets the socket empty (one endless line, to a session that the
// CPU quota starves) would never be cut.  Output needs no such check: it
// only answers input.
Wait wait_for_input(int fd, Millis deadline) {
    return now_ms() < deadline ? wait_for(fd, POLLIN, deadline) : Wait::timeout;
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
        std::size_t chunk = std::min<std::size_t>(data.size(), PIPE_BUF);
        ssize_t n = c.out_is_socket ? send(c.out, data.data(), chunk, MSG_DONTWAIT | MSG_NOSIGNAL)
                                    : write(c.out, data.data(), chunk);
        if (n < 0) {  // never 0: a write of at least one octet to a pipe or socket
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
            return EndReason::write_error;
        }
        data.remove_prefix(static_cast<std::size_t>(n));
    }
    return EndReason::none;
}

// Closing a socket with unread input makes the kernel send a reset (RFC 1122
// 4.2.2.13), which can destroy the last reply in flight.  Shut down our
// side, read and discard what the client still sends for a short, bounded
// while, then close.
constexpr Millis drain_ms = 500;
constexpr std::size_t drain_bytes = 256 * 1024;

void close_gracefully(const Connection& c) {
    if (!c.out_is_socket) return;
    if (shutdown(c.out, SHUT_WR) != 0 || !c.in_is_socket) return;
    const Millis until = now_ms() + drain_ms;
    char sink[4096];
    std::size_t drained = 0;
    while (drained < drain_bytes && wait_for_input(c.in, until) == Wait::ready) {
        ssize_t n = recv(c.in, sink, sizeof sink, MSG_DONTWAIT);
        if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
        if (n <= 0) return;  // EOF or error: the client is gone
        drained += static_cast<std::size_t>(n);
    }
}

// Run one session on the connection; returns how it ended.  `stressed`:
// the deadline is the stress deadline, and reaching it is a cut.
EndReason run(Session& session, const Connection& c, Millis deadline, bool stressed = false) {
    Output out;
    session.greet(out);
    EndReason io = write_all(c, out.view(), deadline);
    out.clear();
    // Any size gives the same replies (the core takes input in any pieces:
    // unit.cpp replays every session in 1- and 3-octet ones); a page only
    // sets how many replies go out in one write (RFC 2920 leaves it free).
    char input[4096];
    while (io == EndReason::none && !session.ended()) {
        Wait w = wait_for_input(c.in, deadline);
        if (w == Wait::timeout) {
            io = EndReason::timeout;
            break;
        }
        if (w == Wait::failed) {  // errno is stale after POLLNVAL: no retry
            io = EndReason::read_error;
            break;
        }
        ssize_t n = read(c.in, input, sizeof input);
        if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
        if (n < 0) {
            io = EndReason::read_error;
            break;
        }
        // Checked after each read too: what a starved session reads past
        // its deadline is not answered, and the next wait ends it.
        if (now_ms() >= deadline) continue;
        if (n == 0) session.input_closed(out);
        // Clients pipeline (RFC 2920), advertised or not: every reply of one
        // read goes out in one write, unless it overflows the buffer.
        std::string_view rest(input, static_cast<std::size_t>(n));
        do {
            rest.remove_prefix(session.feed(rest, out));
            if (out.length > 0) io = write_all(c, out.view(), deadline);
            out.clear();
        } while (io == EndReason::none && !session.ended() && !rest.empty());
    }
    if (io == EndReason::timeout && stressed) {
        // The stress deadline passed, in a wait for a command, for a reply
        // to go out, or while input kept coming: the 521, within drain_ms.
        // A client that waits for the next reply has read every one before,
        // so the 521 is not stuck behind unread output.
        session.cut(out);
        io = write_all(c, out.view(), now_ms() + drain_ms);
        if (io == EndReason::none) close_gracefully(c);
        return EndReason::stress;
    }
    // Not after a timeout or a failed write: there is no reply to protect.
    if (io == EndReason::none || io == EndReason::read_error) close_gracefully(c);
    // An I/O failure is what the log should say, even after QUIT.
    return io != EndReason::none ? io : session.end_reason();
}

// ---------------------------------------------------------------- logging

// One line per session, of space-separated key=value fields, bounded by
// construction: each value has a worst case, and the buffer is their sum.
//
// Client text (and the environment's) goes in escaped, so that a line
// splits back into exactly the values sent, and a client can forge neither
// a line nor a field nor a cut: printable ASCII as is, but as \xHH a
// backslash, a comma (it separates the rcpt= paths), a '.' right after a
// '.' (no value holds "..." but the cut mark), a value that is just '-'
// (which means absent, and nothing else), and everything else (space,
// controls, CR, LF, 8-bit).  A value is cut at its maximum of log text, on
// an escape's boundary, and the cut is marked "..." at its end.
constexpr std::string_view cut_mark = "...";
constexpr std::size_t value_max = Argument::capacity;  // octets of log text
constexpr std::size_t cut_value_max(std::size_t max) { return max + cut_mark.size(); }

template <std::size_t N>
void add_escaped(Text<N>& log, std::string_view s, std::size_t max, bool already_cut = false) {
    static constexpr char hex[] = "0123456789abcdef";
    std::size_t written = 0;
    bool cut = already_cut;
    unsigned char previous = 0;
    for (unsigned char c : s) {
        const bool plain = c > 0x20 && c < 0x7f && c != '\\' && c != ',' && !(c == '.' && previous == '.') &&
                           !(c == '-' && s.size() == 1);
        previous = c;
        if (written + (plain ? 1 : 4) > max) {
            cut = true;
            break;
        }
        // The longest form, \xHH: a larger array would never be read past it.
        const char escaped[4] = {plain ? static_cast<char>(c) : '\\', 'x', hex[c >> 4], hex[c & 15]};
        log.append({escaped, plain ? 1u : 4u});
        written += plain ? 1 : 4;
    }
    if (cut) log.append(cut_mark);
}

constexpr std::size_t digits(unsigned long long v) { return v < 10 ? 1 : 1 + digits(v / 10); }
static_assert(digits(9) == 1 && digits(10) == 2 && digits(INT_MAX) == 10, "decimal digits");
constexpr std::size_t int_width = 1 + digits(INT_MAX);  // with a sign

constexpr std::size_t end_name_max() {
    std::size_t n = 0;
    for (const EndReasonName& r : end_reasons) n = std::max(n, r.name.size());
    return n;
}

// "address:port", an IPv6 address in brackets; or "local".
constexpr std::size_t peer_address_max = 64, peer_port_max = 8;
using Peer = Text<1 + cut_value_max(peer_address_max) + 1 + 1 + cut_value_max(peer_port_max)>;

constexpr std::size_t duration_width = digits(LLONG_MAX / 1000) + std::string_view(".mmm").size();
constexpr std::size_t argument_field_max = cut_value_max(value_max);  // "-" when empty
constexpr std::size_t rcpt_list_max = logged_rcpts * argument_field_max + (logged_rcpts - 1);  // commas
constexpr std::size_t sandbox_field_max = std::string_view(" sandbox=off").size();
constexpr std::size_t mode_field_max = std::string_view(" mode=").size() + mode_name_max();

constexpr std::size_t log_line_max =
    std::string_view("peer=").size() + Peer::capacity + std::string_view(" end=").size() + end_name_max() +
    std::string_view(" commands=").size() + int_width + std::string_view(" duration=").size() + duration_width +
    std::string_view(" helo=").size() + argument_field_max + std::string_view(" mail=").size() +
    argument_field_max + std::string_view(" rcpt=").size() + rcpt_list_max + std::string_view(" rcpts=").size() +
    int_width + sandbox_field_max + mode_field_max;
using LogLine = Text<log_line_max>;

// What glibc's syslog(3) puts before the line: "<PRI>Mmm dd hh:mm:ss ",
// the ident, "[pid]: ".  RFC 3164 4.1: a syslog packet is at most 1024
// octets, so every session line arrives whole.
constexpr std::size_t syslog_header_max =
    std::string_view("<191>Mmm dd hh:mm:ss smtp521[]: ").size() + digits(INT_MAX);
static_assert(syslog_header_max + log_line_max <= 1024, "a log line fits in one RFC 3164 packet");

template <std::size_t N>
void add_number(Text<N>& log, long long v) {
    char number[24];
    int n = std::snprintf(number, sizeof number, "%lld", v);
    log.append({number, n > 0 ? static_cast<std::size_t>(n) : 0});
}

// The peer: getpeername() on fd 0; else the super-server's environment
// (systemd, then tcpserver); else "local" (a pipe or a file).  Read before
// the greeting: once the client has reset or the connection is closed,
// getpeername() fails (ENOTCONN), and a client that resets at once is one an
// administrator wants named.
void add_peer(Peer& peer, int fd) {
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    char address_buffer[INET6_ADDRSTRLEN] = {};
    char port_buffer[8] = {};  // "65535": any size from 6 up writes the same
    static_assert(sizeof port_buffer >= sizeof "65535", "every port fits");
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
        address = a;
        const char* p = std::getenv(pair[1]);
        port = p != nullptr ? p : "";
    }
    if (address.empty()) return peer.append("local");
    // The environment is not to be trusted: escaped and cut like client text.
    const bool v6 = address.find(':') != std::string_view::npos;
    peer.append(v6 ? "[" : "");
    add_escaped(peer, address, peer_address_max);
    peer.append(v6 ? "]" : "");
    if (!port.empty()) {
        peer.append(":");
        add_escaped(peer, port, peer_port_max);
    }
}

void add_argument(LogLine& log, const Argument& a) {
    if (a.length == 0 && !a.cut) return log.append("-");
    add_escaped(log, a.view(), value_max, a.cut);
}

// peer= end= commands= duration= helo= mail= rcpt= rcpts= sandbox= mode=
//
// mode= comes last, so that the fields before it keep their places.  With
// commands= it says what the client was told (a 521 greeting, a 521 to
// EHLO, or 250s up to the 521 to RCPT), whatever the options were that day:
// a site changes its mode (smtp521(8), "Choosing the mode").
void format_log(LogLine& log, const Session& s, EndReason end, Millis elapsed, const Peer& peer, bool sandbox) {
    log.append("peer=");
    log.append(peer.view());
    log.append(" end=");
    log.append(end_reason_name(end));
    log.append(" commands=");
    add_number(log, s.commands());
    elapsed = std::max<Millis>(elapsed, 0);
    char duration[32];
    int n = std::snprintf(duration, sizeof duration, " duration=%lld.%03lld", elapsed / 1000, elapsed % 1000);
    log.append({duration, n > 0 ? static_cast<std::size_t>(n) : 0});
    log.append(" helo=");
    add_argument(log, s.helo());
    log.append(" mail=");
    add_argument(log, s.mail());
    log.append(" rcpt=");
    const std::size_t shown = std::min(static_cast<std::size_t>(s.rcpt_count()), logged_rcpts);
    if (shown == 0) log.append("-");
    for (std::size_t i = 0; i < shown; ++i) {
        if (i > 0) log.append(",");
        add_argument(log, s.rcpt(i));
    }
    log.append(" rcpts=");
    add_number(log, s.rcpt_count());
    log.append(sandbox ? " sandbox=on" : " sandbox=off");
    log.append(" mode=");
    log.append(mode_name(s.mode()));
}

// Under inetd fds 0, 1 and 2 are all the connection; under systemd too,
// unless the unit says StandardError=.  Whatever goes to stderr then goes to
// the client, so it must not be written there.  The connection is what
// smtp521 reads, fd 0: a socket that stdout and stderr share but stdin
// is not (a unit's ExecStartPre=, with both to the journal: the socket's
// --check) is the journal, where a usage error must go, and not only by
// syslog, whose message the journal ties to no unit once the process
// has gone.
bool stderr_is_connection() {
    struct stat err{}, in{};
    if (fstat(2, &err) != 0) return true;  // closed: nowhere to write
    if (!S_ISSOCK(err.st_mode)) return false;
    return fstat(0, &in) == 0 && err.st_dev == in.st_dev && err.st_ino == in.st_ino;
}

// Where the log line really goes: stderr only if it is not the connection.
// Decided once, before the sandbox (fstat).
LogTarget effective_target(LogTarget wanted) {
    return wanted == LogTarget::stderr_ && stderr_is_connection() ? LogTarget::syslog : wanted;
}

void write_stderr(std::string_view line) {
    while (!line.empty()) {
        ssize_t n = write(2, line.data(), line.size());
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return;
        line.remove_prefix(static_cast<std::size_t>(n));
    }
}

// LOG_NDELAY: connect to /dev/log now.  main() calls this before the
// sandbox, which refuses socket() and connect(): the confined process only
// sends on the socket made here, and if that send fails (the syslog daemon
// restarted), syslog(3)'s reconnection is refused and the line is lost.
void open_syslog() { openlog("smtp521", LOG_PID | LOG_NDELAY, LOG_MAIL); }

// For LogTarget::syslog, main() has called open_syslog() already.
void emit_log(LogTarget target, int priority, std::string_view line) {
    if (target == LogTarget::none) return;
    if (target == LogTarget::stderr_) {
        Text<LogLine::capacity + 1> with_newline;
        with_newline.append(line);
        with_newline.append("\n");
        return write_stderr(with_newline.view());
    }
    syslog(priority, "%.*s", static_cast<int>(line.size()), line.data());
}

// ---------------------------------------------------------------- the alarm backstop

// Every wait of a session ends at the deadline (wait_for, wait_for_input),
// so only logging can block past it: a syslog daemon or a journal that
// stopped reading.
// alarm() ends the process backstop_seconds after the deadline all the
// same.  Its handler writes a line prepared in advance, the session's with
// end=alarm, to the log target, waits for that target at most
// backstop_wait_seconds, and exits 0 like any session: a process ends at
// most 3 s after its deadline (smtp521@.service's RuntimeMaxSec= allows for
// it).  A target still stuck then loses the line: nothing else could
// take it.  The handler does only async-signal-safe calls (POSIX 2.4.3).
constexpr int backstop_seconds = 2, backstop_wait_seconds = 1;

struct Backstop {
    static constexpr std::size_t message_max = syslog_header_max + LogLine::capacity + 1;  // and a LF or NUL
    Text<message_max> message[2];  // one is prepared while the handler may read the other
    volatile std::sig_atomic_t ready = -1;  // the one the handler writes; -1: none
    LogTarget target = LogTarget::none;
    bool sandbox = false;  // for the log line: confine() succeeded
    int socket = -1;       // made before the sandbox, which refuses socket()
    bool stream = false;   // /dev/log is a stream socket: each message ends in a NUL
};
Backstop backstop;

// A socket for the handler, connected to /dev/log (glibc's _PATH_LOG) with
// a send timeout of backstop_wait_seconds: the handler only sends on it, and
// the filter allows no send to an address.  A datagram socket, or where
// /dev/log is a stream socket (connect() fails with EPROTOTYPE), a stream
// one, as glibc's syslog(3) falls back to, with its framing: each message
// followed by a NUL (an rsyslog or syslog-ng set up so can block the
// session's own line, and the backstop is what then reaches it).
void open_backstop_socket() {
    const sockaddr_un devlog{AF_UNIX, "/dev/log"};
    const timeval wait{backstop_wait_seconds, 0};
    for (const int type : {SOCK_DGRAM, SOCK_STREAM}) {
        backstop.socket = socket(AF_UNIX, type | SOCK_CLOEXEC, 0);
        if (backstop.socket < 0) return;
        if (setsockopt(backstop.socket, SOL_SOCKET, SO_SNDTIMEO, &wait, sizeof wait) == 0 &&
            connect(backstop.socket, reinterpret_cast<const sockaddr*>(&devlog), sizeof devlog) == 0) {
            backstop.stream = type == SOCK_STREAM;
            return;
        }
        const bool other_type = errno == EPROTOTYPE;
        close(backstop.socket);
        backstop.socket = -1;
        if (!other_type) return;
    }
}

extern "C" void on_alarm(int) {
    const std::sig_atomic_t i = backstop.ready;
    if (i >= 0) {
        const auto& m = backstop.message[i];
        if (backstop.target == LogTarget::syslog) {
            // fd 0 is the connection: the socket is 0 only where a super-server
            // left fd 0 closed, and that session ends at once (POLLNVAL).
            if (backstop.socket >= 0) (void)!send(backstop.socket, m.bytes, m.length, MSG_NOSIGNAL);
        } else if (backstop.target == LogTarget::stderr_) {
            // Never blocks: a socket is sent to with MSG_DONTWAIT, and a
            // pipe that polls writable takes a write of up to PIPE_BUF.
            pollfd p{2, POLLOUT, 0};
            if (poll(&p, 1, backstop_wait_seconds * 1000) == 1 && (p.revents & POLLOUT) != 0 &&
                send(2, m.bytes, m.length, MSG_DONTWAIT | MSG_NOSIGNAL) < 0 && errno == ENOTSOCK)
                (void)!write(2, m.bytes, m.length);
        }
    }
    _exit(exit_ok);
}
static_assert(Backstop::message_max <= PIPE_BUF, "one write to a pipe, all or nothing");

// Prepare the line the handler writes.  The syslog packet has no timestamp:
// the receiver adds its own (RFC 3164 4.3.2).
void prepare_backstop(const Session& s, Millis elapsed, const Peer& peer) {
    if (backstop.target == LogTarget::none) return;
    const std::sig_atomic_t next = backstop.ready == 0 ? 1 : 0;
    auto& m = backstop.message[next];
    m.clear();
    if (backstop.target == LogTarget::syslog) {
        char header[48];
        int n = std::snprintf(header, sizeof header, "<%d>smtp521[%d]: ", LOG_MAIL | LOG_INFO, static_cast<int>(getpid()));
        m.append({header, n > 0 ? static_cast<std::size_t>(n) : 0});
    }
    LogLine line;
    format_log(line, s, EndReason::alarm, elapsed, peer, backstop.sandbox);
    m.append(line.view());
    if (backstop.target == LogTarget::stderr_) m.append("\n");
    if (backstop.target == LogTarget::syslog && backstop.stream) m.append({"", 1});  // the NUL
    std::atomic_signal_fence(std::memory_order_seq_cst);  // the message before the index
    backstop.ready = next;
}

// ---------------------------------------------------------------- confinement

// What OpenBSD's fingerd and spamd get from pledge("stdio"): once the
// process holds everything it needs (its options, its replies, the peer's
// address, the syslog socket and the time zone), it gives up the rest of the
// system before the greeting, so that nothing a client sends can make it
// open a file, create or connect a socket, or run a program (RFC 1846 6).
// A seccomp-BPF allowlist of the system calls that the session and the log
// line make, found with strace(1) in every mode and on pipes, sockets,
// stderr and syslog (test/binary/test_seccomp.py keeps it so):
constexpr int allowed_syscalls[] = {
    SYS_read, SYS_recvfrom,             // client input; the drain before close
    SYS_write,                          // replies on a pipe; the log line to stderr
#ifdef SYS_poll
    SYS_poll,                           // waiting against the deadline
#endif
    SYS_ppoll,                          // the same, where libc has no poll()
    SYS_shutdown,                       // half-close before the drain
    SYS_close,                          // syslog(3) drops a dead /dev/log socket
    SYS_clock_gettime,                  // the deadline, where the vDSO cannot
    SYS_getpid,                         // syslog(3)'s LOG_PID
    SYS_exit_group,                     // _exit(2); glibc's fallback to exit never runs
    // The call the kernel makes a live process issue, whatever the program
    // does: a poll() with a timeout that a stop interrupted (SIGSTOP and
    // SIGCONT, a tracer attaching, the cgroup freezer) is resumed through
    // it, with the time left (signal(7), "Interruption of system calls");
    // refused, the session would end there without its reply.
    SYS_restart_syscall,
};

// The return from a signal handler, which no handler here makes: SIGPIPE
// is ignored and on_alarm() ends in _exit().  Called all the same, it can
// only be injected code forging a signal frame (sigreturn-oriented
// programming: every register, the stack and the signal mask, SIGALRM
// blocked, of its choosing): it kills.  The sanitizer's handlers may
// return (sanitizer_syscalls, below).
constexpr int sigreturn_syscalls[] = {
    SYS_rt_sigreturn,
#ifdef SYS_sigreturn
    SYS_sigreturn,  // the older one, of the 32-bit ABIs, ppc64el and s390x
#endif
};

// sendto is allowed only without a destination (its 5th and 6th arguments
// zero), as send() and syslog(3) call it: a confined process writes only to
// the client and to the sockets it connected before the greeting (/dev/log),
// never to an address of its choosing.
constexpr int sendto_unaddressed = SYS_sendto;

// What each architecture adds: its audit number (a call made under any
// other kills, see below), and the calls its glibc makes beyond the list
// above, found under its own Debian kernel in qemu (test/arch/run, which
// also proves the filter there; README.md, Architectures).
#if defined(__x86_64__)
constexpr std::uint32_t audit_arch = AUDIT_ARCH_X86_64;
constexpr std::array<int, 0> arch_syscalls{};
#elif defined(__i386__)
constexpr std::uint32_t audit_arch = AUDIT_ARCH_I386;
// Without the vDSO, glibc's clock is the 64-bit-time call; its socket
// calls go through socketcall(2) (below).
constexpr std::array arch_syscalls{SYS_clock_gettime64};
#define SMTP521_SOCKETCALL 1
#elif defined(__aarch64__)
constexpr std::uint32_t audit_arch = AUDIT_ARCH_AARCH64;
constexpr std::array<int, 0> arch_syscalls{};
#elif defined(__arm__)
constexpr std::uint32_t audit_arch = AUDIT_ARCH_ARM;
// glibc's send() and recv() are calls of their own here; without the
// vDSO (a timer it cannot read), its clock is the 64-bit-time call.
constexpr std::array arch_syscalls{SYS_send, SYS_recv, SYS_clock_gettime64};
#elif defined(__powerpc64__) && defined(__LITTLE_ENDIAN__)
constexpr std::uint32_t audit_arch = AUDIT_ARCH_PPC64LE;
constexpr std::array arch_syscalls{SYS_send, SYS_recv};  // as on ARM
#elif defined(__s390x__)
constexpr std::uint32_t audit_arch = AUDIT_ARCH_S390X;
constexpr std::array<int, 0> arch_syscalls{};
#define SMTP521_SOCKETCALL 1  // as on i386
#elif defined(__riscv) && __riscv_xlen == 64
constexpr std::uint32_t audit_arch = AUDIT_ARCH_RISCV64;
constexpr std::array<int, 0> arch_syscalls{};
#elif defined(__loongarch64) && defined(__loongarch_lp64)
// LoongArch's audit number, where linux/audit.h predates it (Linux 5.19):
// its ELF machine (EM_LOONGARCH, 258), 64-bit, little endian.
#ifndef AUDIT_ARCH_LOONGARCH64
#define AUDIT_ARCH_LOONGARCH64 (258u | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE)
#endif
static_assert(AUDIT_ARCH_LOONGARCH64 == (258u | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE), "EM_LOONGARCH is 258");
constexpr std::uint32_t audit_arch = AUDIT_ARCH_LOONGARCH64;
// The generic call table (asm-generic/unistd.h), as on arm64 and riscv64:
// no poll (glibc's is ppoll), nothing beyond the list above.
constexpr std::array<int, 0> arch_syscalls{};
#else
constexpr std::uint32_t audit_arch = 0;  // unknown: no sandbox (sandbox=off)
constexpr std::array<int, 0> arch_syscalls{};
#endif

// Where glibc, built for kernels older than 4.3, sends the socket calls
// above through socketcall(2), whose first argument names the call: the
// filter allows socketcall for these calls only.  Its other arguments are
// in memory, which a filter cannot read: so SYS_SEND, which has no
// address (glibc's send() and syslog(3) use it), and not SYS_SENDTO.
#if defined(SMTP521_SOCKETCALL)
constexpr std::uint32_t allowed_socketcalls[] = {SYS_SEND, SYS_RECV, SYS_RECVFROM, SYS_SHUTDOWN};
#endif

// The AddressSanitizer build of make check also needs these to report an
// error from inside the sandbox: its report buffers (mmap, never
// executable), its signal stack, its thread id, the binary's name for the
// stack trace, and the return from its signal handlers (sigreturn_syscalls,
// above).  The shipped build allows none of them.
constexpr bool sanitized =
#if defined(__SANITIZE_ADDRESS__)
    true;
#else
    false;
#endif
#if defined(SYS_readlink)
constexpr int sanitizer_readlink = SYS_readlink;
#else
constexpr int sanitizer_readlink = SYS_readlinkat;  // arm64, riscv64, loong64 have no readlink
#endif
#if defined(__LP64__)
constexpr int sanitizer_mmap = SYS_mmap;
#else
constexpr int sanitizer_mmap = SYS_mmap2;  // 32-bit: the sanitizer maps with mmap2
#endif
constexpr int sanitizer_syscalls[] = {SYS_munmap, SYS_madvise, SYS_sigaltstack, SYS_gettid, sanitizer_readlink};

// A system call's argument is 64 bits wide in seccomp_data; the filter
// loads one 32-bit word at a time: the one that holds small values, or the
// other half of a pointer.
constexpr std::uint32_t low_word(std::size_t offset) {
    return static_cast<std::uint32_t>(offset + (__BYTE_ORDER__ == __ORDER_BIG_ENDIAN__ ? 4 : 0));
}
constexpr std::uint32_t high_word(std::size_t offset) {
    return static_cast<std::uint32_t>(offset + (__BYTE_ORDER__ == __ORDER_BIG_ENDIAN__ ? 0 : 4));
}

// A classic BPF program built in a constant expression, so that its length
// and every jump offset are computed, never counted by hand: a write past
// its array (at() throws), a jump beyond BPF's 8 bits, or an array longer
// than the program (the static_assert below) stops the build.  Bpf<0> only
// counts.
template <std::size_t N>
struct Bpf {
    std::array<sock_filter, N> code{};
    std::size_t size = 0;

    constexpr void emit(int op, std::uint32_t k) {
        if constexpr (N != 0) code.at(size) = sock_filter{static_cast<std::uint16_t>(op), 0, 0, k};
        ++size;
    }
    constexpr void load(std::uint32_t offset) { emit(BPF_LD | BPF_W | BPF_ABS, offset); }
    constexpr void ret(std::uint32_t action) { emit(BPF_RET | BPF_K, action); }
    // if (A op k) then(); -- `then` must return (end in ret()).
    template <class Then>
    constexpr void when(int op, std::uint32_t k, Then then) {
        std::size_t jump = size;
        emit(BPF_JMP | op | BPF_K, k);
        then();
        if constexpr (N != 0) code.at(jump).jf = distance(jump);
    }
    // if (!(A op k)) then();
    template <class Then>
    constexpr void unless(int op, std::uint32_t k, Then then) {
        std::size_t jump = size;
        emit(BPF_JMP | op | BPF_K, k);
        then();
        if constexpr (N != 0) code.at(jump).jt = distance(jump);
    }
    // The jump at `from` skips to the next instruction to be emitted.
    constexpr std::uint8_t distance(std::size_t from) const {
        if (size - from - 1 > UINT8_MAX) throw "a BPF jump skips 255 instructions at most";
        return static_cast<std::uint8_t>(size - from - 1);
    }
};

// Any other call fails with EPERM rather than killing the process: a libc
// that reaches for a call this list lacks (another kernel, another glibc)
// then costs that one call, not the session; a killed session would lose
// its reply, and the sender would queue the mail for days, the very failure
// smtp521 exists to end.  A call of another architecture or of the x32 ABI,
// or a sigreturn, cannot come from this program at all, only from injected
// code: it kills.
template <std::size_t N>
constexpr Bpf<N> seccomp_program() {
    constexpr std::uint32_t allow = SECCOMP_RET_ALLOW, kill = SECCOMP_RET_KILL_PROCESS,
                            refuse = SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA);
    Bpf<N> f;
    f.load(offsetof(seccomp_data, arch));
    f.unless(BPF_JEQ, audit_arch, [&] { f.ret(kill); });
    f.load(offsetof(seccomp_data, nr));
#if defined(__x86_64__)
    // x32 calls are x86-64 calls with bit 30 set (__X32_SYSCALL_BIT).
    f.when(BPF_JGE, 0x40000000u, [&] { f.ret(kill); });
#endif
    auto allow_call = [&](int nr) { f.when(BPF_JEQ, static_cast<std::uint32_t>(nr), [&] { f.ret(allow); }); };
    for (int nr : sigreturn_syscalls)
        f.when(BPF_JEQ, static_cast<std::uint32_t>(nr), [&] { f.ret(sanitized ? allow : kill); });
    for (int nr : allowed_syscalls) allow_call(nr);
    for (int nr : arch_syscalls) allow_call(nr);
    // sendto(fd, buf, len, flags, NULL, 0) only.
    f.when(BPF_JEQ, static_cast<std::uint32_t>(sendto_unaddressed), [&] {
        for (std::uint32_t word : {low_word(offsetof(seccomp_data, args[4])), high_word(offsetof(seccomp_data, args[4])),
                                   low_word(offsetof(seccomp_data, args[5]))}) {
            f.load(word);
            f.unless(BPF_JEQ, 0, [&] { f.ret(refuse); });
        }
        f.ret(allow);
    });
#if defined(SMTP521_SOCKETCALL)
    // socketcall: the call's number is its first argument.
    f.when(BPF_JEQ, SYS_socketcall, [&] {
        f.load(low_word(offsetof(seccomp_data, args[0])));
        for (std::uint32_t call : allowed_socketcalls) f.when(BPF_JEQ, call, [&] { f.ret(allow); });
        f.ret(refuse);
    });
#endif
    if constexpr (sanitized) {
        for (int nr : sanitizer_syscalls) allow_call(nr);
        // mmap without PROT_EXEC (its third argument).
        f.when(BPF_JEQ, sanitizer_mmap, [&] {
            f.load(low_word(offsetof(seccomp_data, args[2])));
            f.when(BPF_JSET, PROT_EXEC, [&] { f.ret(refuse); });
            f.ret(allow);
        });
    }
    f.ret(refuse);
    return f;
}
constexpr std::size_t filter_length = seccomp_program<0>().size;
constexpr Bpf<filter_length> filter = seccomp_program<filter_length>();
static_assert(filter.size == filter_length, "the filter's length is not its program's");

bool confine() {
    if (audit_arch == 0) return false;
#if defined(SMTP521_TEST_NO_FILTER)  // the tests' mutant (test/binary/test_mutation.py): claims a filter, installs none
    return true;
#endif
#if defined(__SANITIZE_ADDRESS__)
    // The AddressSanitizer build (make check): LeakSanitizer's check at exit
    // needs threads, ptrace and /proc, which the filter refuses, so it runs
    // now.  Memory errors and undefined behaviour are still reported under
    // the filter (a report needs only write and exit_group), and an
    // allocation after this point would fail loudly: the sanitizer's
    // allocator gets no mmap.
    __lsan_do_leak_check();
#endif
    std::array<sock_filter, filter_length> program = filter.code;  // the kernel's pointer is not const
    sock_fprog fprog{static_cast<unsigned short>(program.size()), program.data()};
    // PR_SET_NO_NEW_PRIVS lets an unprivileged process install a filter,
    // and no later execve() could gain privileges anyway.
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return false;
    // The kernel's audit log records each refused call (Linux 4.14's
    // SECCOMP_FILTER_FLAG_LOG): a session makes none, so one there is an
    // attack or a call the list lacks (test/arch/run looks).  An older
    // kernel refuses the flag: the filter goes on without it.
    return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_LOG, &fprog) == 0 ||
           syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &fprog) == 0;
}

// ---------------------------------------------------------------- options, main

// A usage error: one line, to syslog, and to stderr when that is not the
// connection; never to the client.  Then exit, as errx(3) does.
[[noreturn, gnu::format(printf, 1, 2)]] void usage_error(const char* format, ...) {
    char message[600];
    std::va_list args;
    va_start(args, format);
    int n = std::vsnprintf(message, sizeof message, format, args);
    va_end(args);
    const std::size_t length = std::min(n > 0 ? static_cast<std::size_t>(n) : 0, sizeof message - 1);
    // What was typed is escaped as the log escapes client text, control
    // characters, backslash and 8-bit octets as \xHH: one line, whatever
    // the argument holds (a "\n<0>" would start a journal record of its own).
    constexpr std::string_view prefix = "smtp521: ", suffix = " (see smtp521 --help)\n";
    Text<prefix.size() + 4 * sizeof message + suffix.size()> line;  // every octet escaped
    line.append(prefix);
    for (const char c : std::string_view(message, length)) {
        const auto u = static_cast<unsigned char>(c);
        const char escaped[4] = {'\\', 'x', "0123456789abcdef"[u >> 4], "0123456789abcdef"[u & 15]};
        line.append(u >= 0x20 && u < 0x7f && c != '\\' ? std::string_view(&c, 1) : std::string_view(escaped, 4));
    }
    const std::string_view text = tail(line.view(), prefix.size());
    open_syslog();
    syslog(LOG_ERR, "%.*s", static_cast<int>(text.size()), text.data());
    if (!stderr_is_connection()) {
        line.append(suffix);
        write_stderr(line.view());
    }
    std::exit(exit_usage);
}

// A whole number from low to high (low >= 0), as strtonum(3): the value, or
// -1 if the text is anything else.
int parse_number(const char* text, int low, int high) {
    if (*text < '0' || *text > '9') return -1;  // no sign, no space
    errno = 0;
    char* end = nullptr;
    long v = std::strtol(text, &end, 10);
    if (errno != 0 || *end != '\0' || v < low || v > high) return -1;
    return static_cast<int>(v);
}

// RFC 5321 4.1.3, 2.3.5: a name is one word of printable ASCII: a domain or
// an address literal.
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

// A mode by its name; false if none has it.
bool parse_mode(std::string_view name, Mode& mode) {
    for (const ModeName& m : mode_names)
        if (m.name == name) {
            mode = m.mode;
            return true;
        }
    return false;
}

// Every option sets one field, and a later one overrides an earlier one:
// -r and -c both set the mode.  -V and -h print and exit.
Options parse_options(int argc, char** argv) {
    static const option long_options[] = {
        {"refuse-at", required_argument, nullptr, 'r'}, {"close", no_argument, nullptr, 'c'},
        {"hostname", required_argument, nullptr, 'H'},  {"message", required_argument, nullptr, 'm'},
        {"timeout", required_argument, nullptr, 't'},   {"max-commands", required_argument, nullptr, 'n'},
        {"stress-at", required_argument, nullptr, 's'}, {"stress-timeout", required_argument, nullptr, 'T'},
        {"log", required_argument, nullptr, 'l'},       {"version", no_argument, nullptr, 'V'},
        {"help", no_argument, nullptr, 'h'},            {"check", no_argument, nullptr, 'C'},
        {nullptr, 0, nullptr, 0},
    };
    Options options;
    opterr = 0;  // our own one-line messages, never getopt's
    // parse_number() gives -1 or a value in range: `< 0` below is `< low`.
    int opt;
    static const char short_options[] = ":r:cCH:m:t:n:s:T:l:Vh";
    while ((opt = getopt_long(argc, argv, short_options, long_options, nullptr)) != -1) {
        const std::string_view arg = optarg != nullptr ? optarg : "";
        switch (opt) {
        case 'r':
            if (arg == mode_name(Mode::close) || !parse_mode(arg, options.mode))
                usage_error("invalid --refuse-at '%.64s': expected rcpt, helo or greeting", optarg);
            break;
        case 'c': options.mode = Mode::close; break;
        case 'H':
            if (!valid_hostname(arg))
                usage_error("invalid --hostname '%.64s': expected one word of printable ASCII, at most 255 characters",
                            optarg);
            options.hostname = arg;
            break;
        case 'm':
            if (arg.empty()) usage_error("invalid --message '': expected text, printable ASCII, after the name");
            if (!valid_message(arg))
                usage_error("invalid --message: expected printable ASCII text, no control characters (no CR or LF)");
            options.message = arg;
            break;
        case 't':
            options.timeout_seconds = parse_number(optarg, min_timeout, max_timeout);
            if (options.timeout_seconds < 0)
                usage_error("invalid --timeout '%.64s': expected whole seconds from %d to %d", optarg, min_timeout,
                            max_timeout);
            break;
        case 'n':
            options.max_commands = parse_number(optarg, min_commands, max_commands_limit);
            if (options.max_commands < 0)
                usage_error("invalid --max-commands '%.64s': expected a whole number from %d to %d", optarg,
                            min_commands, max_commands_limit);
            break;
        case 's':
            options.stress_at = parse_number(optarg, 0, max_stress_at);
            if (options.stress_at < 0)
                usage_error("invalid --stress-at '%.64s': expected a whole number from 0 to %d", optarg,
                            max_stress_at);
            break;
        case 'T':
            options.stress_timeout = parse_number(optarg, min_timeout, max_timeout);
            if (options.stress_timeout < 0)
                usage_error("invalid --stress-timeout '%.64s': expected whole seconds from %d to %d", optarg,
                            min_timeout, max_timeout);
            break;
        case 'l': {
            bool known = false;
            for (std::size_t i = 0; i < std::size(log_target_names); ++i)
                if (arg == log_target_names[i]) options.log = static_cast<LogTarget>(i), known = true;
            if (!known) usage_error("invalid --log '%.64s': expected syslog, stderr or none", optarg);
            break;
        }
        case 'C': options.check = true; break;
        case 'V': {
            char text[64];
            int n = std::snprintf(text, sizeof text, "smtp521 %.*s\n", static_cast<int>(version.size()),
                                  version.data());
            // What was formatted, never past it: a longer version is cut.
            (void)!write(1, text, std::min(n > 0 ? static_cast<std::size_t>(n) : 0, sizeof text - 1));
            std::exit(exit_ok);
        }
        case 'h':
            (void)!write(1, usage_text.data(), usage_text.size());
            std::exit(exit_ok);
        case ':': usage_error("option '%.64s' needs a value", argv[optind - 1]);
        default: {
            // Name what was typed.  getopt_long() sets optopt to 0 for a
            // long option it does not know (or that abbreviates two), and
            // to the option's own letter for a long option given a value it
            // does not take (--close=yes): either way the word typed is
            // argv[optind - 1].  Any other letter is an unknown short
            // option, perhaps inside a group (-cx): only optopt names it.
            const bool known_letter = optopt != 0 && optopt != ':' && std::strchr(short_options, optopt) != nullptr;
            if (optopt == 0) usage_error("unknown or ambiguous option '%.64s'", argv[optind - 1]);
            if (known_letter) usage_error("option '%.64s' takes no value", argv[optind - 1]);
            usage_error("unknown option '-%c'", optopt);
        }
        }
    }
    if (optind < argc) usage_error("unexpected argument '%.64s'", argv[optind]);
    return options;
}

// RFC 5321 2.3.5 and 4.1.3 want the host's fully qualified name (or an
// address literal) in the greeting.  Without DNS (a sandboxed unit may have
// no network): the first line of Debian's /etc/mailname, the name this host
// gives its mail; else the kernel's name, which is often not qualified
// (hence -H); else "localhost".  `buffer` holds the name.
std::string_view default_hostname(Text<256>& buffer, const char* mailname) {
    buffer.clear();
    const int fd = open(mailname, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd >= 0) {
        ssize_t n;
        do n = read(fd, buffer.bytes, Text<256>::capacity);
        while (n < 0 && errno == EINTR);
        close(fd);
        std::string_view text(buffer.bytes, n > 0 ? static_cast<std::size_t>(n) : 0);
        std::string_view line = skip_blanks(head(text, text.find('\n')));
        while (!line.empty() && (is_blank(line.back()) || line.back() == '\r')) line.remove_suffix(1);
        if (valid_hostname(line)) return line;
    }
    if (gethostname(buffer.bytes, Text<256>::capacity) == 0) {
        buffer.bytes[Text<256>::capacity - 1] = '\0';
        std::string_view kernel(buffer.bytes);
        if (valid_hostname(kernel)) return kernel;
    }
    return "localhost";
}

// --check: the options parsed and the replies built, as for a session (a
// bad one has exited 64 by now).  Print the settings, then the greeting as
// a sender reads it, and exit 0: for a sysadmin, and for smtp521.socket's
// ExecStartPre=, so that a bad /etc/default/smtp521 fails the socket where
// it shows rather than every session.  Unlike a session, it also fails if
// the line would go to syslog but /dev/log takes nothing (no syslog daemon,
// as in a container): a session would then write it to stderr, or, where
// stderr is the connection (inetd), lose it unseen.
int check(const Options& o, const Replies& replies) {
    if (effective_target(o.log) == LogTarget::syslog) {
        const sockaddr_un devlog{AF_UNIX, _PATH_LOG};
        const int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        const int error = fd < 0 ? errno
                          : connect(fd, reinterpret_cast<const sockaddr*>(&devlog), sizeof devlog) == 0 ? 0
                                                                                                          : errno;
        if (fd >= 0) close(fd);
        if (error != 0)
            usage_error("--log syslog: %s: %s: a session logs to stderr instead, or, where that is the connection "
                        "(inetd), nowhere",
                        _PATH_LOG, std::strerror(error));
    }
    Text<1024> out;
    out.append("mode=");
    out.append(mode_name(o.mode));
    out.append(" hostname=");
    out.append(o.hostname);
    const std::pair<std::string_view, int> numbers[] = {{" timeout=", o.timeout_seconds},
                                                        {" max-commands=", o.max_commands},
                                                        {" stress-at=", o.stress_at},
                                                        {" stress-timeout=", o.stress_timeout}};
    for (const auto& [key, value] : numbers) {
        out.append(key);
        add_number(out, value);
    }
    out.append(" log=");
    out.append(log_target_names[static_cast<std::size_t>(o.log)]);
    out.append("\n");
    std::string_view greeting = replies.greeting.view();
    greeting.remove_suffix(2);  // CRLF
    out.append(greeting);
    out.append("\n");
    for (std::string_view rest = out.view(); !rest.empty();) {  // the check passed, printed or not
        const ssize_t n = write(1, rest.data(), rest.size());
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        rest.remove_prefix(static_cast<std::size_t>(n));
    }
    return exit_ok;
}

// ---------------------------------------------------------------- the stress signal

// A process per connection shares nothing with the other sessions, but
// under systemd (smtp521.socket, Accept=yes) each session is an instance,
// smtp521@N-LOCAL-REMOTE.service, whose cgroup sits in smtp521.slice: the
// slice's pids.current is how many sessions run now, one task each
// (TasksMax=1), itself included.  Read once, at start, before the filter:
// a session that starts under stress gets the short deadline, and since a
// session that starts without it found fewer than --stress-at sessions,
// no more than that many long sessions can ever be running.
//
// Only smtp521's own slice counts: smtp521.slice, or a slice below it
// (smtp521-NAME.slice, whose cgroup systemd puts inside smtp521.slice's),
// which a site names with the unit's Slice= to set limits of its own.
// Any other slice holds other services' tasks, which are not sessions (a
// site's own template unit in system.slice, say).  Anything unexpected
// (another slice, not an instance of a template, no pids controller, a
// file that does not parse) gives -1: no signal, no stress, the session as
// without it.  Under inetd and tcpserver every session shares the
// super-server's cgroup, which is no such slice: no signal there.  The pids controller is in the unified hierarchy
// (/sys/fs/cgroup, line "0::") or, on a hybrid host, a v1 one of its own
// (/sys/fs/cgroup/pids, a line "N:pids:").
constexpr std::string_view cgroup_roots[][2] = {{"0::", "/sys/fs/cgroup"}, {":pids:", "/sys/fs/cgroup/pids"}};
constexpr std::string_view own_slice = "smtp521.slice", own_subslice_prefix = "smtp521-";

constexpr bool ends_with(std::string_view s, std::string_view suffix) {
    return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// PATH is PARENT/SLICE/NAME@INSTANCE.service, with SLICE smtp521's own.
constexpr bool is_own_session(std::string_view path) {
    const std::size_t slash = path.rfind('/');
    if (path.empty() || path.front() != '/' || slash == std::string_view::npos || slash == 0) return false;
    // `unit` is looked at for its end and an '@' only: with its '/' or not.
    const std::string_view parent = head(path, slash), unit = tail(path, slash + 1);
    const std::string_view slice = tail(parent, parent.rfind('/') + 1);
    const bool own = slice == own_slice || (head(slice, own_subslice_prefix.size()) == own_subslice_prefix &&
                                             ends_with(slice, ".slice"));
    return own && ends_with(unit, ".service") && unit.find('@') != std::string_view::npos;
}

// The whole of a small file, or an empty view.
std::string_view read_small_file(const char* path, Text<64>& buffer) {
    buffer.clear();
    const int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) return {};
    while (buffer.room() > 0) {
        ssize_t n = read(fd, buffer.bytes + buffer.length, buffer.room());
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        buffer.length += static_cast<std::size_t>(n);
    }
    close(fd);
    return buffer.view();
}

// A cgroup's path (the kernel's limit on a path) with its "ID:CONTROLLERS:".
using CgroupLine = Text<PATH_MAX + 64>;

// Every line of a file, whatever its length, one at a time: /proc/self/cgroup
// has a line per hierarchy, 13 on a hybrid host, and with an IPv6 peer in the
// instance's name it passes 1,800 octets.  A line longer than `line` is skipped.
template <class Each>
void for_each_line(const char* path, CgroupLine& line, Each each) {
    const int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) return;
    line.clear();
    char chunk[512];
    for (;;) {
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        std::string_view rest(chunk, static_cast<std::size_t>(n));
        for (std::size_t lf; (lf = rest.find('\n')) != std::string_view::npos; rest = tail(rest, lf + 1)) {
            line.append(head(rest, lf));
            if (!line.cut) each(line.view());
            line.clear();
        }
        line.append(rest);
    }
    close(fd);
    if (line.length > 0 && !line.cut) each(line.view());
}

int stress_sessions() {
    // The line "ID:CONTROLLERS:PATH" whose middle names each hierarchy: its PATH.
    CgroupLine line, paths[std::size(cgroup_roots)];
    for_each_line("/proc/self/cgroup", line, [&](std::string_view l) {
        for (std::size_t i = 0; i < std::size(cgroup_roots); ++i) {
            const std::string_view id = cgroup_roots[i][0];
            const std::size_t at = id == "0::" ? (head(l, 3) == "0::" ? 0 : std::string_view::npos) : l.find(id);
            if (at != std::string_view::npos && paths[i].length == 0) paths[i].append(tail(l, at + id.size()));
        }
    });
    Text<64> number;
    for (std::size_t i = 0; i < std::size(cgroup_roots); ++i) {
        const std::string_view root = cgroup_roots[i][1], path = paths[i].view();
        if (!is_own_session(path)) continue;
        const std::string_view parent = head(path, path.rfind('/'));
        char file[sizeof(CgroupLine::bytes) + 64];
        const int n = std::snprintf(file, sizeof file, "%.*s%.*s/pids.current", static_cast<int>(root.size()),
                                    root.data(), static_cast<int>(parent.size()), parent.data());
        if (n < 0 || static_cast<std::size_t>(n) >= sizeof file) continue;
        std::string_view value = read_small_file(file, number);
        while (!value.empty() && value.back() == '\n') value.remove_suffix(1);
        char digits_only[16] = {};
        if (value.empty() || value.size() >= sizeof digits_only) continue;
        std::memcpy(digits_only, value.data(), value.size());
        const int sessions = parse_number(digits_only, 0, INT_MAX);
        if (sessions >= 0) return sessions;
    }
    return -1;
}

int main(int argc, char** argv) {
    const Millis start = now_ms();
    Options options = parse_options(argc, argv);
    Text<256> hostname_buffer;
    if (options.hostname.empty()) options.hostname = default_hostname(hostname_buffer, mailname_path);
    Replies replies;
    if (!build_replies(options, replies))
        usage_error("--hostname and --message make a reply longer than %zu octets (RFC 5321 4.5.3.1.5)", max_reply);
    if (options.check) return check(options, replies);

    // A vanished peer must give EPIPE, not death by SIGPIPE.
    struct sigaction ignore{};
    ignore.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &ignore, nullptr);

    Connection connection;
    connection.in_is_socket = is_socket(connection.in);
    connection.out_is_socket = is_socket(connection.out);
    // Under stress the earlier of the two deadlines; a cut only if it is
    // the stress one.
    const int sessions = options.stress_at > 0 ? stress_sessions() : -1;  // any negative: no signal
    const bool stressed = sessions >= options.stress_at && options.stress_timeout < options.timeout_seconds;
    const int seconds = stressed ? options.stress_timeout : options.timeout_seconds;
    const Millis deadline = start + static_cast<Millis>(seconds) * 1000;

    Peer peer;
    if (options.log != LogTarget::none) add_peer(peer, connection.in);
    Session session(replies, options.max_commands);

    // The backstop, armed before anything can block: syslog(3)'s connect
    // below waits on a stream /dev/log whose daemon accepts no one, and
    // then the alarm ends the process, silently, as no line is ready yet.
    // The session's line is ready long before the alarm can ring.
    struct sigaction on_alarm_action{};
    on_alarm_action.sa_handler = on_alarm;
    sigaction(SIGALRM, &on_alarm_action, nullptr);
    // The signal mask survives exec: a super-server or wrapper that runs
    // smtp521 with SIGALRM blocked would switch the backstop off.
    sigset_t alarm_only;
    sigemptyset(&alarm_only);
    sigaddset(&alarm_only, SIGALRM);
    sigprocmask(SIG_UNBLOCK, &alarm_only, nullptr);
    // From -t's deadline even under stress: the slice's CPU quota can hold
    // back a session that hundreds of others woke with for more than two
    // seconds (measured: a third of the cut sessions), and the alarm would
    // end it without its 521.  It guards against a blocked log, as before.
    alarm(static_cast<unsigned>(options.timeout_seconds + backstop_seconds));

    // Everything that needs the system, before the sandbox: where the log
    // goes (fstat), the syslog socket and the time zone it stamps, and the
    // backstop's own socket.
    backstop.target = effective_target(options.log);
    if (backstop.target == LogTarget::syslog) {
        open_syslog();
        tzset();
        open_backstop_socket();
        // /dev/log takes nothing (no syslog daemon, as in a container; the
        // unit's RestrictAddressFamilies=none refuses the socket):
        // syslog(3) would drop the line unseen.  Standard error takes it,
        // unless it is the connection.
        if (backstop.socket < 0 && !stderr_is_connection()) backstop.target = LogTarget::stderr_;
    }
    // Nothing from the client has been read yet.
    backstop.sandbox = confine();
    prepare_backstop(session, (static_cast<Millis>(options.timeout_seconds) + backstop_seconds) * 1000, peer);

    const EndReason end = run(session, connection, deadline, stressed);

    const Millis elapsed = now_ms() - start;
    prepare_backstop(session, elapsed, peer);
    LogLine log;
    format_log(log, session, end, elapsed, peer, backstop.sandbox);
    emit_log(backstop.target, LOG_INFO, log.view());
    return exit_ok;
}

}  // namespace smtp521

#ifndef SMTP521_NO_MAIN
int main(int argc, char** argv) { return smtp521::main(argc, argv); }
#endif
