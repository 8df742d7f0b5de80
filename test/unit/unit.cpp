// Unit tests of the pure session core: bytes in, replies and an end reason
// out, no I/O.  The dialogs are test/sessions', replayed here.
#define SMTP521_NO_MAIN
#include "../../smtp521.cpp"

#include "catch.hpp"

#include <dirent.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>

#include <string>
#include <vector>

using namespace smtp521;

namespace {

struct Result {
    std::string output;
    EndReason end;
    int commands;
};

// Every mode, from the program's own table: a mode added there is tested
// here.
const std::vector<Mode> all_modes = [] {
    std::vector<Mode> all;
    for (const ModeName& m : mode_names) all.push_back(m.mode);
    return all;
}();

Options make_options(Mode mode) {
    Options o;
    o.mode = mode;
    o.hostname = "mx.test";
    return o;
}

// A session of `options` that the test feeds itself, with its replies.
struct Core {
    Replies replies;
    Session s;
    Output out;
    explicit Core(const Options& options) : replies(built(options)), s(replies, options.max_commands) {}
    Core(const Core&) = delete;

    static Replies built(const Options& options) {
        Replies r;
        REQUIRE(build_replies(options, r));
        return r;
    }
};

// Feed `input` in pieces of `chunk` bytes (0: all at once), then EOF.
Result drive(const Options& options, const std::string& input, std::size_t chunk = 0) {
    static Replies replies;
    REQUIRE(build_replies(options, replies));
    Session s(replies, options.max_commands);
    Output out;
    std::string all;
    s.greet(out);
    all.append(out.view());
    out.clear();
    std::string_view rest(input);
    while (!rest.empty() && !s.ended()) {
        std::string_view piece = chunk == 0 ? rest : rest.substr(0, chunk);
        while (!piece.empty() && !s.ended()) {
            std::size_t used = s.feed(piece, out);
            piece.remove_prefix(used);
            rest.remove_prefix(used);
            all.append(out.view());
            out.clear();
        }
    }
    s.input_closed(out);
    all.append(out.view());
    return {all, s.end_reason(), s.commands()};
}

const std::string greet_rcpt = "220 mx.test ESMTP does not accept mail\r\n";
const std::string greet_521 = "521 mx.test does not accept mail\r\n";
const std::string greet_helo = "220 mx.test does not accept mail\r\n";
const std::string refusal = "521 5.3.2 mx.test does not accept mail\r\n";
const std::string bye = "221 mx.test closing connection\r\n";
const std::string bye_rcpt = "221 2.0.0 mx.test closing connection\r\n";
const std::string ehlo_rcpt = "250-mx.test\r\n250 ENHANCEDSTATUSCODES\r\n";

// ------------------------------------------------ the scripted sessions
//
// test/sessions/*.session (test_sessions.py describes the format) are the
// dialogs' one home: the real binary runs them there, and the core here,
// whole and in pieces of 1 and 3 bytes.  SMTP521_SESSIONS names the
// directory (test_unit.py sets it); else test/sessions under the current one.

struct Script {
    std::string name;
    std::vector<std::string> args{"-H", "mx.test"};
    std::string input, output;
    std::vector<std::pair<std::string, std::string>> log;
    int exit = 0;
};

// \xHH is a byte, \\ a backslash.
std::string unescape(std::string_view text) {
    std::string out;
    for (std::size_t i = 0; i < text.size(); ++i) {
        if (text[i] == '\\' && i + 1 < text.size() && text[i + 1] == '\\') {
            out += '\\';
            ++i;
        } else if (text[i] == '\\' && i + 3 < text.size() && text[i + 1] == 'x') {
            out += static_cast<char>(std::stoi(std::string(text.substr(i + 2, 2)), nullptr, 16));
            i += 3;
        } else {
            out += text[i];
        }
    }
    return out;
}

// A command line as sh splits it: blanks separate, quotes group.
std::vector<std::string> split_args(std::string_view text) {
    std::vector<std::string> args;
    std::string word;
    bool in_word = false;
    char quote = 0;
    for (char c : text) {
        if (quote != 0 && c == quote) {
            quote = 0;
        } else if (quote == 0 && (c == '"' || c == '\'')) {
            quote = c;
            in_word = true;
        } else if (quote == 0 && (c == ' ' || c == '\t')) {
            if (in_word) args.push_back(word);
            word.clear();
            in_word = false;
        } else {
            word += c;
            in_word = true;
        }
    }
    if (in_word) args.push_back(word);
    return args;
}

Script read_script(const std::string& path) {
    Script script;
    script.name = path.substr(path.rfind('/') + 1);
    std::FILE* f = std::fopen(path.c_str(), "rb");
    REQUIRE(f != nullptr);
    std::string text;
    char buffer[4096];
    for (std::size_t n; (n = std::fread(buffer, 1, sizeof buffer, f)) > 0;) text.append(buffer, n);
    std::fclose(f);
    std::string_view rest(text);
    while (!rest.empty()) {
        std::string_view line = rest.substr(0, rest.find('\n'));
        rest.remove_prefix(std::min(rest.size(), line.size() + 1));
        if (line.empty() || line.front() == '#') continue;
        const std::size_t colon = line.find(": ");
        const std::string_view key = line.substr(0, colon);
        const std::string_view value = colon == std::string_view::npos ? "" : line.substr(colon + 2);
        if (key == "args") script.args = split_args(value);
        else if (key == "C") script.input += unescape(value) + "\r\n";
        else if (key == "L") script.input += unescape(value) + "\n";
        else if (key == "P") script.input += unescape(value);
        else if (key == "S") script.output += unescape(value) + "\r\n";
        else if (key == "exit") script.exit = std::stoi(std::string(value));
        else if (key == "log") {
            for (const std::string& field : split_args(value)) {
                const std::size_t eq = field.find('=');
                script.log.emplace_back(field.substr(0, eq), field.substr(eq + 1));
            }
        } else FAIL(script.name << ": unknown directive " << std::string(line));
    }
    return script;
}

std::vector<Script> scripts() {
    const char* dir = std::getenv("SMTP521_SESSIONS");
    const std::string path = dir != nullptr ? dir : "test/sessions";
    std::vector<std::string> names;
    if (DIR* d = opendir(path.c_str())) {
        while (const dirent* e = readdir(d)) {
            const std::string name = e->d_name;
            if (name.size() > 8 && name.substr(name.size() - 8) == ".session") names.push_back(path + "/" + name);
        }
        closedir(d);
    }
    std::sort(names.begin(), names.end());
    std::vector<Script> all;
    for (const std::string& name : names) all.push_back(read_script(name));
    return all;
}

}  // namespace

// getopt_long over a command line; optind = 0 starts it afresh.
Options parse(std::vector<std::string> args) {
    std::vector<char*> argv;
    static std::vector<std::string> keep;
    keep = std::move(args);
    keep.insert(keep.begin(), "smtp521");
    for (std::string& a : keep) argv.push_back(a.data());
    argv.push_back(nullptr);
    optind = 0;
    return parse_options(static_cast<int>(keep.size()), argv.data());
}

TEST_CASE("the scripted sessions through the core, whole and in pieces") {
    const std::vector<Script> all = scripts();
    REQUIRE(!all.empty());  // SMTP521_SESSIONS names no directory of sessions
    for (const Script& script : all) {
        if (script.exit != 0) continue;  // a usage error: the binary's, not the core's
        Options options = parse(script.args);
        Text<256> hostname_buffer;
        if (options.hostname.empty()) options.hostname = default_hostname(hostname_buffer, mailname_path);
        for (std::size_t chunk : {std::size_t(0), std::size_t(1), std::size_t(3)}) {
            INFO(script.name << " (chunk " << chunk << ")");
            Result r = drive(options, script.input, chunk);
            CHECK(r.output == script.output);
            for (const auto& [key, value] : script.log) {
                if (key == "end") CHECK(std::string(end_reason_name(r.end)) == value);
                if (key == "commands") CHECK(std::to_string(r.commands) == value);
            }
        }
    }
}

TEST_CASE("a pipelined batch of 20 commands is answered in order") {
    std::string input;
    for (int i = 0; i < 19; ++i) input += "NOOP\r\n";
    input += "QUIT\r\n";
    Result r = drive(make_options(Mode::rcpt), input);
    std::string expected = greet_rcpt;
    for (int i = 0; i < 19; ++i) expected += "250 2.0.0 Ok\r\n";
    expected += bye_rcpt;
    CHECK(r.output == expected);
    CHECK(r.commands == 20);
}

TEST_CASE("RFC 5321 4.5.3.1.4: a line of 510 octets plus CRLF is a command; 511 is too long") {
    std::string fits = "RSET " + std::string(505, 'x');  // 510
    Result r = drive(make_options(Mode::rcpt), fits + "\r\n");
    CHECK(r.output == greet_rcpt + "250 2.0.0 Ok\r\n");
    Result r2 = drive(make_options(Mode::rcpt), fits + "y\r\n");
    CHECK(r2.output == greet_rcpt + refusal);
}

TEST_CASE("a 1 MiB line gets one reply, then the session goes on") {
    std::string input = "MAIL FROM:<" + std::string(1 << 20, 'a') + ">\r\nQUIT\r\n";
    for (std::size_t chunk : {std::size_t(0), std::size_t(4096), std::size_t(7)}) {
        Result r = drive(make_options(Mode::rcpt), input, chunk);
        CHECK(r.output == greet_rcpt + refusal + bye_rcpt);
        CHECK(r.commands == 2);
    }
}

TEST_CASE("RFC 5321 4.2: no reply in any mode starts with 4") {
    std::string input;
    for (const char* verb : {"HELO a", "EHLO a", "MAIL FROM:<a@b>", "RCPT TO:<a@b>", "DATA", "BDAT 10", "RSET",
                             "NOOP", "VRFY a", "EXPN a", "HELP", "STARTTLS", "AUTH LOGIN", "TURN", "ETRN x", ""})
        input += std::string(verb) + "\r\n";
    for (Mode mode : all_modes) {
        Result r = drive(make_options(mode), input);
        std::size_t pos = 0;
        int lines = 0;
        while (pos < r.output.size()) {
            std::size_t eol = r.output.find("\r\n", pos);
            REQUIRE(eol != std::string::npos);
            std::string line = r.output.substr(pos, eol - pos);
            CHECK((line[0] == '2' || line[0] == '5'));
            CHECK((line[3] == ' ' || line[3] == '-'));
            CHECK(line.size() + 2 <= max_reply);
            pos = eol + 2;
            ++lines;
        }
        INFO(mode_name(mode));
        // The greeting and 16 replies; EHLO's is two lines in the rcpt mode.
        CHECK(lines == (mode == Mode::close ? 1 : mode == Mode::rcpt ? 18 : 17));
    }
}

// Is `line` "code SP x.y.z SP ...", with x the code's class?
bool has_enhanced_code(std::string_view line) {
    return line.size() > 10 && line[3] == ' ' && line[4] == line[0] && line[5] == '.' && line.find(' ', 4) > 6;
}

TEST_CASE("RFC 2034 3 (4): in the rcpt mode every reply but the greeting and HELO/EHLO's has an enhanced code") {
    Options o = make_options(Mode::rcpt);
    Replies r;
    REQUIRE(build_replies(o, r));
    CHECK(r.greeting.view() == greet_rcpt);
    CHECK(r[Verb::helo].view() == "250 mx.test\r\n");
    CHECK(r[Verb::ehlo].view() == ehlo_rcpt);
    for (Verb v : {Verb::other, Verb::mail, Verb::rcpt, Verb::rset, Verb::noop, Verb::quit}) {
        INFO(r[v].view());
        CHECK(has_enhanced_code(r[v].view()));
    }
    CHECK(r[Verb::quit].view() == bye_rcpt);
    CHECK(r[Verb::rcpt].view() == refusal);
    // RFC 2034 4: whether or not the client used EHLO.
    Result helo = drive(o, "HELO a\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nQUIT\r\n");
    CHECK(helo.output == greet_rcpt + "250 mx.test\r\n250 2.1.0 Ok\r\n" + refusal + bye_rcpt);
}

TEST_CASE("the 521 modes offer no extension and send no enhanced code") {
    for (Mode mode : {Mode::helo, Mode::greeting, Mode::close}) {
        INFO(mode_name(mode));
        Replies r;
        REQUIRE(build_replies(make_options(mode), r));
        // -r helo greets with 220 (without "ESMTP": it refuses EHLO).
        CHECK(r.greeting.view() == (mode == Mode::helo ? greet_helo : greet_521));
        CHECK(r.close_after_greeting == (mode == Mode::close));
        for (const Reply& reply : r.to) {
            INFO(reply.view());
            CHECK(!has_enhanced_code(reply.view()));
            CHECK(reply.view().find("ENHANCEDSTATUSCODES") == std::string_view::npos);
        }
        CHECK(r[Verb::quit].view() == bye);
        // RFC 1846 4.2 (b), RFC 7504 3: 521 to every command but QUIT,
        // EHLO and HELO first of all.
        for (Verb v : {Verb::other, Verb::helo, Verb::ehlo, Verb::mail, Verb::rcpt, Verb::rset, Verb::noop})
            CHECK(r[v].view() == greet_521);
    }
}

TEST_CASE("every mode has a name, and -r takes each but close's (-c)") {
    for (Mode mode : all_modes) {
        const std::string name(mode_name(mode));
        INFO(name);
        CHECK(!name.empty());
        if (mode == Mode::close) continue;
        CHECK(parse({"-r", name}).mode == mode);
        CHECK(parse({"-c", "--refuse-at=" + name}).mode == mode);
    }
    CHECK(parse({"-r", "helo"}).mode == Mode::helo);
    CHECK(parse({"-r", "helo", "-c"}).mode == Mode::close);
    CHECK(parse({}).mode == Mode::rcpt);  // the default
}

TEST_CASE("RFC 1846 4.1: the name is the first word after the code") {
    Options o = make_options(Mode::greeting);
    o.hostname = "[192.0.2.1]";
    o.message = "Host does not accept mail";
    Result r = drive(o, "QUIT\r\n");
    CHECK(r.output == "521 [192.0.2.1] Host does not accept mail\r\n221 [192.0.2.1] closing connection\r\n");
}

TEST_CASE("the command limit ends the session after the Nth reply") {
    Options o = make_options(Mode::greeting);
    o.max_commands = 3;
    Result r = drive(o, "NOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\n");
    CHECK(r.output == greet_521 + greet_521 + greet_521 + greet_521);
    CHECK(r.end == EndReason::limit);
    CHECK(r.commands == 3);
    o.max_commands = 1;
    Result q = drive(o, "QUIT\r\n");
    CHECK(q.end == EndReason::quit);
}

TEST_CASE("replies never overflow the output buffer, whatever the input") {
    // 4000 one-byte commands: feed must stop for the caller to write.
    Options o = make_options(Mode::greeting);
    o.max_commands = max_commands_limit;
    Core core(o);
    Session& s = core.s;
    Output& out = core.out;
    s.greet(out);
    std::string input(4000, '\n');
    std::string_view rest(input);
    std::size_t total = out.length;
    int rounds = 0;
    out.clear();
    while (!rest.empty()) {
        std::size_t used = s.feed(rest, out);
        REQUIRE(used > 0);
        REQUIRE(out.length <= Output::capacity);
        total += out.length;
        out.clear();
        rest.remove_prefix(used);
        ++rounds;
    }
    CHECK(rounds > 1);
    CHECK(total == 4001 * greet_521.size());
    CHECK(s.commands() == 4000);
}

Peer make_peer(std::string_view text) {
    Peer p;
    p.append(text);
    return p;
}

TEST_CASE("what the log records of the client") {
    Options o = make_options(Mode::rcpt);
    Core core(o);
    Session& s = core.s;
    Output& out = core.out;
    std::string input = "EHLO client.example\r\nMAIL FROM:<a@b> SIZE=10\r\nRCPT TO:<r1@x>\r\nrcpt to: <r2@x>\r\n"
                        "RCPT TO:<r3@x>\r\nRCPT\tTO:\t<r4@x>\r\n";
    s.feed(input, out);
    CHECK(s.helo().view() == "client.example");
    CHECK(s.mail().view() == "<a@b>");
    CHECK(s.rcpt(0).view() == "<r1@x>");
    CHECK(s.rcpt(1).view() == "<r2@x>");
    CHECK(s.rcpt(2).view() == "<r3@x>");
    CHECK(s.rcpt_count() == 4);

    LogLine log;
    format_log(log, s, EndReason::eof, 1234, make_peer("local"), true);
    CHECK(log.view() ==
          "peer=local end=eof commands=6 duration=1.234 helo=client.example mail=<a@b> rcpt=<r1@x>,<r2@x>,<r3@x> rcpts=4 sandbox=on"
          " mode=rcpt");
}

TEST_CASE("client text in the log is escaped and bounded") {
    Options o = make_options(Mode::rcpt);
    Core core(o);
    Session& s = core.s;
    Output& out = core.out;
    std::string input = std::string("HELO evil\rend=quit\x01\xff\\x\r\nMAIL FROM:<") + std::string(300, 'z') + ">\r\n";
    s.feed(input, out);
    LogLine log;
    format_log(log, s, EndReason::eof, 0, make_peer("local"), false);
    std::string line(log.view());
    CHECK(line.find("helo=evil\\x0dend=quit\\x01\\xff\\x5cx ") != std::string::npos);
    CHECK(line.find(" mail=<" + std::string(99, 'z') + "... ") != std::string::npos);
    for (char c : line) CHECK((c >= 0x20 && c < 0x7f));
    CHECK(line.find(" end=eof ") != std::string::npos);
}

TEST_CASE("a value that is just '-' is escaped: '-' means absent, and nothing else") {
    Options o = make_options(Mode::rcpt);
    Core a(o), b(o);
    a.s.feed("HELO -\r\nMAIL FROM:-\r\nRCPT TO:-\r\nRCPT TO:--\r\n", a.out);
    b.s.feed("NOOP\r\nNOOP\r\nRCPT TO:\r\nRCPT TO:x-\r\n", b.out);
    LogLine la, lb;
    format_log(la, a.s, EndReason::eof, 0, make_peer("local"), true);
    format_log(lb, b.s, EndReason::eof, 0, make_peer("local"), true);
    CHECK(la.view() ==
          "peer=local end=eof commands=4 duration=0.000 helo=\\x2d mail=\\x2d rcpt=\\x2d,-- rcpts=2 sandbox=on mode=rcpt");
    CHECK(lb.view() == "peer=local end=eof commands=4 duration=0.000 helo=- mail=- rcpt=-,x- rcpts=2 sandbox=on mode=rcpt");
}

// The worst case of every field at once: five 510-octet arguments of octets
// that each escape to four, a fourth RCPT, a peer from a hostile
// environment, the longest end reason and the longest duration.
TEST_CASE("the log line is bounded by construction: the worst case keeps every field") {
    Options o = make_options(Mode::greeting);  // the longest name
    o.max_commands = max_commands_limit;
    Core core(o);
    Session& s = core.s;
    Output& out = core.out;
    const std::string junk(505, '\x01');  // "HELO " + 505 = 510, the longest line
    std::string input = "HELO " + junk + "\r\nMAIL " + junk + "\r\n";
    for (int i = 0; i < 4; ++i) input += "RCPT " + junk + "\r\n";
    CHECK(s.feed(input, out) == input.size());
    REQUIRE(s.rcpt_count() == 4);

    setenv("REMOTE_ADDR", std::string(300, ':').c_str(), 1);  // ':' makes it "IPv6": brackets too
    setenv("REMOTE_PORT", std::string(300, ' ').c_str(), 1);
    Peer peer;
    add_peer(peer, -1);  // getpeername fails: the environment is used
    unsetenv("REMOTE_ADDR");
    unsetenv("REMOTE_PORT");
    CHECK_FALSE(peer.cut);
    CHECK(peer.view() == "[" + std::string(64, ':') + "...]:" + std::string("\\x20\\x20...", 11));

    LogLine log;
    format_log(log, s, EndReason::write_error, LLONG_MAX, peer, false);
    std::string line(log.view());
    INFO(line);
    CHECK_FALSE(log.cut);
    // Every field is there (their order: test_docs), and the line ends
    // with the last one.
    for (const char* key : {"peer=", " end=write-error", " commands=6", " duration=", " helo=", " mail=", " rcpt=",
                            " rcpts=4", " sandbox=off", " mode=greeting"})
        CHECK(line.find(key) != std::string::npos);
    CHECK(line.size() >= 34);
    CHECK(line.substr(line.size() - 34) == " rcpts=4 sandbox=off mode=greeting");
    // Each client value is cut on an escape's boundary and marked.
    const std::string value = [] {
        std::string v;
        for (int i = 0; i < 25; ++i) v += "\\x01";
        return v + "...";
    }();
    CHECK(line.find(" helo=" + value + " mail=" + value + " rcpt=" + value + "," + value + "," + value +
                    " rcpts=4 sandbox=off") != std::string::npos);
    CHECK(line.find(" duration=9223372036854775.807 ") != std::string::npos);
    // The worst case fits the buffer, and the line one syslog packet.
    CHECK(log.length <= log_line_max);
    CHECK(syslog_header_max + log_line_max <= 1024);
}

TEST_CASE("a value is cut on an escape's boundary, and only when it must be") {
    LogLine log;
    add_escaped(log, std::string(100, 'a'), 100);
    CHECK(log.view() == std::string(100, 'a'));
    log.clear();
    add_escaped(log, std::string(99, 'a') + " ", 100);  // the escape would pass 100
    CHECK(log.view() == std::string(99, 'a') + "...");
    log.clear();
    add_escaped(log, std::string(97, 'a') + " ", 100);  // by one octet: \x20 takes four
    CHECK(log.view() == std::string(97, 'a') + "...");
    log.clear();
    add_escaped(log, std::string(96, 'a') + " ", 100);  // exactly 100
    CHECK(log.view() == std::string(96, 'a') + "\\x20");
    log.clear();
    add_escaped(log, "ab", 100, true);  // cut before it reached the log
    CHECK(log.view() == "ab...");
}

TEST_CASE("the alarm's line is the session's, with end=alarm") {
    Options o = make_options(Mode::rcpt);
    Core core(o);
    Session& s = core.s;
    Output& out = core.out;
    s.feed("HELO a\r\n", out);
    backstop.target = LogTarget::stderr_;
    prepare_backstop(s, 302000, make_peer("local"));
    REQUIRE(backstop.ready >= 0);
    CHECK(backstop.message[backstop.ready].view() ==
          "peer=local end=alarm commands=1 duration=302.000 helo=a mail=- rcpt=- rcpts=0 sandbox=off mode=rcpt\n");
    const int first = backstop.ready;
    backstop.target = LogTarget::syslog;
    prepare_backstop(s, 1, make_peer("local"));
    CHECK(backstop.ready != first);  // the other buffer: the handler never reads a half-written one
    std::string_view m = backstop.message[backstop.ready].view();
    CHECK(m.substr(0, 12) == "<22>smtp521[");
    CHECK(m.find("]: peer=local end=alarm commands=1 duration=0.001 ") != std::string_view::npos);
    backstop.target = LogTarget::none;
    backstop.ready = -1;
}

TEST_CASE("argument_of takes the path or the first word") {
    struct Row {
        std::string_view line, argument;
    };
    const Row rows[] = {
        {"HELO host", "host"},         {"EHLO  host extra", "host"},  {"MAIL FROM:<a@b> BODY=8BITMIME", "<a@b>"},
        {"MAIL FROM: <a@b>", "<a@b>"}, {"mail from:<>", "<>"},         {"RCPT TO:<u@v>", "<u@v>"},
        {"RCPT TO:<unclosed", "<unclosed"}, {"MAIL", ""},             {"RCPT x@y", "x@y"},
    };
    for (const Row& row : rows) {
        INFO(row.line);
        CHECK(argument_of(row.line) == row.argument);
    }
}

// in_enum_order, which the tables' static_asserts rely on, tells a table out
// of order or short of the enum.
constexpr Command swapped[] = {
    {"EHLO", Verb::ehlo}, {"HELO", Verb::helo}, {"MAIL", Verb::mail}, {"RCPT", Verb::rcpt},
    {"RSET", Verb::rset}, {"NOOP", Verb::noop}, {"QUIT", Verb::quit},
};
constexpr Command short_of_quit[] = {
    {"HELO", Verb::helo}, {"EHLO", Verb::ehlo}, {"MAIL", Verb::mail}, {"RCPT", Verb::rcpt},
    {"RSET", Verb::rset}, {"NOOP", Verb::noop},
};
static_assert(!in_enum_order(swapped, &Command::verb, 1), "a table out of order is told");
static_assert(!in_enum_order(short_of_quit, &Command::verb, 1), "a short table is told");
static_assert(in_enum_order(commands, &Command::verb, 1), "the real table passes");

TEST_CASE("option values are checked") {
    CHECK(valid_hostname("mx.example.org"));
    CHECK(valid_hostname("[192.0.2.1]"));
    CHECK_FALSE(valid_hostname(""));
    CHECK_FALSE(valid_hostname("two words"));
    CHECK_FALSE(valid_hostname("tab\there"));
    CHECK_FALSE(valid_hostname(std::string(256, 'a')));
    CHECK(valid_hostname(std::string(255, 'a')));
    CHECK(valid_hostname("!~"));                  // 0x21 and 0x7e: printable
    CHECK_FALSE(valid_hostname("del\x7fname"));   // DEL is a control
    CHECK_FALSE(valid_hostname("caf\xc3\xa9"));
    CHECK(valid_message("does not accept mail"));
    CHECK_FALSE(valid_message("line\r\nbreak"));
    CHECK_FALSE(valid_message(""));
    CHECK_FALSE(valid_message("caf\xc3\xa9"));
    CHECK(parse_number("300", min_timeout, max_timeout) == 300);
    CHECK(parse_number("0", 0, max_stress_at) == 0);  // --stress-at 0: never
    CHECK(parse_number(std::to_string(max_timeout).c_str(), min_timeout, max_timeout) == max_timeout);
    const std::string past = std::to_string(max_timeout + 1), before = std::to_string(min_timeout - 1);
    for (const char* bad : {before.c_str(), "-5", "10s", "99999999999999999999", "", " 5", past.c_str(), "+5"}) {
        INFO(bad);
        CHECK(parse_number(bad, min_timeout, max_timeout) == -1);
    }
}

TEST_CASE("a reply longer than 512 octets is refused at start") {
    const std::string name(255, 'n');
    Options o = make_options(Mode::rcpt);
    o.hostname = name;
    std::string text(240, 't');
    o.message = text;
    Replies replies;
    CHECK(build_replies(o, replies));  // the refusal: 10 + 255 + 1 + 240 + 2 = 508
    std::string exact(244, 't');
    o.message = exact;
    CHECK(build_replies(o, replies));  // 512, RFC 5321 4.5.3.1.5's own limit
    CHECK(replies[Verb::rcpt].length == max_reply);
    std::string longer(245, 't');
    o.message = longer;
    CHECK_FALSE(build_replies(o, replies));  // 513
    o.mode = Mode::greeting;
    CHECK(build_replies(o, replies));  // the greeting, 4 + 255 + 1 + 245 + 2 = 507
    std::string longest(251, 't');
    o.message = longest;
    CHECK_FALSE(build_replies(o, replies));  // 513
}

// RFC 5321 2.3.5, 4.1.3: the default name, without DNS.
TEST_CASE("the default host name: /etc/mailname's first line, else the kernel's") {
    char dir[] = "/tmp/smtp521-unit-XXXXXX";
    REQUIRE(mkdtemp(dir) != nullptr);
    const std::string path = std::string(dir) + "/mailname";
    auto write_file = [&](const std::string& text) {
        FILE* f = std::fopen(path.c_str(), "w");
        REQUIRE(f != nullptr);
        std::fputs(text.c_str(), f);
        std::fclose(f);
    };
    char kernel_name[256] = {};
    REQUIRE(gethostname(kernel_name, sizeof kernel_name - 1) == 0);
    Text<256> buffer;
    CHECK(default_hostname(buffer, path.c_str()) == std::string_view(kernel_name));  // no such file
    write_file("mail.example.org\n");
    CHECK(default_hostname(buffer, path.c_str()) == "mail.example.org");
    write_file("  mx.example.net \r\nsecond.line\n");
    CHECK(default_hostname(buffer, path.c_str()) == "mx.example.net");
    for (const std::string& bad : {std::string("two words\n"), std::string("\n"), std::string(""),
                                   std::string(300, 'a')}) {
        write_file(bad);
        CHECK(default_hostname(buffer, path.c_str()) == std::string_view(kernel_name));
    }
    std::remove(path.c_str());
    rmdir(dir);
}

TEST_CASE("for_each_line gives every line of a file, whatever its length, and skips one past the buffer") {
    char dir[] = "/tmp/smtp521-unit-XXXXXX";
    REQUIRE(mkdtemp(dir) != nullptr);
    const std::string path = std::string(dir) + "/cgroup";
    // Lines across read()'s chunks, one longer than any cgroup path, and a
    // last line without LF.
    const std::string long_line(CgroupLine::capacity + 1, 'x'), wide(1000, 'w');
    std::string text = "0::/\n" + wide + "\n" + long_line + "\n" + wide + "2\n1:pids:/last";
    // A first line that leaves one octet for the last read() (512 at a time).
    const std::string pad(512 - (text.size() + 1 - 1) % 512, 'p');
    text = pad + "\n" + text;
    REQUIRE(text.size() % 512 == 1);
    FILE* f = std::fopen(path.c_str(), "w");
    REQUIRE(f != nullptr);
    std::fputs(text.c_str(), f);
    std::fclose(f);
    std::vector<std::string> lines;
    CgroupLine line;
    for_each_line(path.c_str(), line, [&](std::string_view l) { lines.emplace_back(l); });
    CHECK(lines == std::vector<std::string>{pad, "0::/", wide, wide + "2", "1:pids:/last"});
    std::remove(path.c_str());
    rmdir(dir);
}

// A closed stdin is POLLNVAL: the session ends at once with read-error,
// whatever errno a former call left.  Run in a child, so that a session
// that spins instead is killed, and counted as a failure.
TEST_CASE("a closed input ends the session at once, whatever errno says") {
    for (int stale : {EINTR, EAGAIN}) {
        int out[2];
        REQUIRE(pipe(out) == 0);
        pid_t child = fork();
        REQUIRE(child >= 0);
        if (child == 0) {
            alarm(5);
            close(out[0]);
            Options o = make_options(Mode::rcpt);
            Replies replies;
            if (!build_replies(o, replies)) _exit(2);
            Session s(replies, o.max_commands);
            Connection c;
            c.in = 1000;  // not open
            c.out = out[1];
            errno = stale;
            EndReason end = run(s, c, now_ms() + 60000);
            _exit(end == EndReason::read_error ? 0 : 1);
        }
        close(out[1]);
        int status = 0;
        REQUIRE(waitpid(child, &status, 0) == child);
        close(out[0]);
        INFO("errno " << stale << ", status " << status);
        CHECK(WIFEXITED(status));
        CHECK(WEXITSTATUS(status) == 0);
    }
}

// The stress deadline ends a silent session with the mode's refusal and
// end=stress; the ordinary deadline closes without a word, as before.
TEST_CASE("a stress cut sends the 521 that answers any command; a timeout sends nothing") {
    struct Case {
        Mode mode;
        bool stressed;
        std::string tail;
        EndReason end;
    };
    for (const Case& k : {Case{Mode::rcpt, true, "521 5.3.2 mx.test does not accept mail\r\n", EndReason::stress},
                          Case{Mode::greeting, true, "521 mx.test does not accept mail\r\n521 mx.test does not accept mail\r\n",
                               EndReason::stress},
                          Case{Mode::helo, true, "521 mx.test does not accept mail\r\n", EndReason::stress},
                          Case{Mode::helo, false, "", EndReason::timeout},
                          Case{Mode::rcpt, false, "", EndReason::timeout}}) {
        int sv[2];
        REQUIRE(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
        Options o = make_options(k.mode);
        Replies replies;
        REQUIRE(build_replies(o, replies));
        Session s(replies, o.max_commands);
        Connection c{sv[0], sv[0], true, true};
        const Millis began = now_ms();
        EndReason end = run(s, c, began + 200, k.stressed);
        CHECK(now_ms() - began < 200 + drain_ms + 1000);
        close(sv[0]);
        std::string got;
        char buf[1024];
        ssize_t n;
        while ((n = read(sv[1], buf, sizeof buf)) > 0) got.append(buf, static_cast<std::size_t>(n));
        close(sv[1]);
        std::string greeting(replies.greeting.view());
        INFO(got);
        CHECK(end == k.end);
        CHECK(got == (k.mode != Mode::greeting ? greeting + k.tail : k.tail));
    }
}
