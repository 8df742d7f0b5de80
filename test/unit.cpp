// Unit tests of the pure session core: bytes in, replies and an end reason
// out, no I/O.  Each case is one row of a table.
#define SMTP521_NO_MAIN
#include "../smtp521.cpp"

#include "catch.hpp"

#include <sys/wait.h>

#include <string>
#include <vector>

using namespace smtp521;

namespace {

struct Result {
    std::string output;
    EndReason end;
    int commands;
};

Options make_options(Mode mode) {
    Options o;
    o.mode = mode;
    o.hostname = "mx.test";
    return o;
}

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
const std::string refusal = "521 5.3.2 mx.test does not accept mail\r\n";
const std::string bye = "221 mx.test closing connection\r\n";
const std::string bye_rcpt = "221 2.0.0 mx.test closing connection\r\n";
const std::string ehlo_rcpt = "250-mx.test\r\n250 ENHANCEDSTATUSCODES\r\n";

struct Case {
    const char* name;
    Mode mode;
    std::string input;
    std::string expected;
    EndReason end;
};

const std::vector<Case> cases = {
    // Default mode: 220, then the refusal from RCPT on.
    {"rcpt: a whole transaction", Mode::rcpt,
     "EHLO a\r\nMAIL FROM:<x@y>\r\nRCPT TO:<u@v>\r\nDATA\r\nQUIT\r\n",
     greet_rcpt + ehlo_rcpt + "250 2.1.0 Ok\r\n" + refusal + refusal + bye_rcpt, EndReason::quit},
    {"rcpt: HELO, RSET, NOOP are fine", Mode::rcpt, "HELO a\r\nRSET\r\nNOOP\r\nQUIT\r\n",
     greet_rcpt + "250 mx.test\r\n250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n" + bye_rcpt, EndReason::quit},
    {"rcpt: VRFY, EXPN, HELP, STARTTLS, AUTH, unknown are refused", Mode::rcpt,
     "VRFY u\r\nEXPN l\r\nHELP\r\nSTARTTLS\r\nAUTH PLAIN\r\nXYZZY\r\n",
     greet_rcpt + refusal + refusal + refusal + refusal + refusal + refusal, EndReason::eof},
    {"rcpt: every RCPT is refused", Mode::rcpt, "MAIL FROM:<>\r\nRCPT TO:<a@b>\r\nRCPT TO:<c@d>\r\n",
     greet_rcpt + "250 2.1.0 Ok\r\n" + refusal + refusal, EndReason::eof},
    // RFC 1846 4.2 (b) / RFC 7504 3: the standard's dialog.  No extension
    // is offered, so no enhanced status code either (RFC 2034 4).
    {"greeting: 521 to everything but QUIT", Mode::greeting,
     "EHLO a\r\nHELO a\r\nMAIL FROM:<x@y>\r\nRCPT TO:<u@v>\r\nDATA\r\nRSET\r\nNOOP\r\nVRFY x\r\nHELP\r\n\r\nQUIT\r\n",
     greet_521 + greet_521 + greet_521 + greet_521 + greet_521 + greet_521 + greet_521 + greet_521 + greet_521 +
         greet_521 + greet_521 + bye,
     EndReason::quit},
    {"close: greeting, then the end", Mode::close, "EHLO a\r\n", greet_521, EndReason::close},
    // RFC 5321 2.4 and 4.1.1.10: QUIT in any case; only the whole word.
    {"quit lower case", Mode::greeting, "quit\r\n", greet_521 + bye, EndReason::quit},
    {"quit mixed case", Mode::greeting, "QuIt\r\n", greet_521 + bye, EndReason::quit},
    {"QUIT with trailing text", Mode::greeting, "QUIT now\r\n", greet_521 + bye, EndReason::quit},
    {"QUITX is not QUIT", Mode::greeting, "QUITX\r\n", greet_521 + greet_521, EndReason::eof},
    {"ehlo lower case is EHLO", Mode::rcpt, "ehlo a\r\n", greet_rcpt + ehlo_rcpt, EndReason::eof},
    // Blanks after the verb are the separator, whatever they are.
    {"QUIT and a tab", Mode::greeting, "QUIT\t\r\nNOOP\r\n", greet_521 + bye, EndReason::quit},
    {"QUIT and trailing blanks", Mode::rcpt, "QUIT \t \r\nNOOP\r\n", greet_rcpt + bye_rcpt, EndReason::quit},
    {"NOOP and a tab", Mode::rcpt, "NOOP\tx\r\nMAIL\tFROM:\t<a@b>\r\n", greet_rcpt + "250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n",
     EndReason::eof},
    // Nothing is answered after QUIT (pipelined data is discarded).
    {"nothing after QUIT", Mode::greeting, "QUIT\r\nNOOP\r\nNOOP\r\n", greet_521 + bye, EndReason::quit},
    // RFC 5321 2.3.8: CRLF, and a bare LF accepted too.
    {"bare LF", Mode::greeting, "NOOP\nQUIT\n", greet_521 + greet_521 + bye, EndReason::quit},
    {"empty line is a command", Mode::greeting, "\r\n\n", greet_521 + greet_521 + greet_521, EndReason::eof},
    // An unterminated last line still counts when the client closes.
    {"unterminated QUIT at EOF", Mode::greeting, "QUIT", greet_521 + bye, EndReason::quit},
    {"silent client", Mode::greeting, "", greet_521, EndReason::eof},
    // Not SMTP: HTTP and TLS.
    {"HTTP GET", Mode::rcpt, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", greet_rcpt, EndReason::http},
    {"HTTP CONNECT", Mode::greeting, "CONNECT a:25 HTTP/1.1\r\n", greet_521, EndReason::http},
    {"HTTP POST", Mode::greeting, "POST /x HTTP/1.0\r\n", greet_521, EndReason::http},
    {"HTTP only on the first line", Mode::greeting, "NOOP\r\nGET / HTTP/1.1\r\n", greet_521 + greet_521 + greet_521,
     EndReason::eof},
    {"lower-case get is not HTTP", Mode::greeting, "get / x\r\n", greet_521 + greet_521, EndReason::eof},
    {"TLS ClientHello", Mode::rcpt, std::string("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 11), greet_rcpt,
     EndReason::tls},
    {"0x16 0x03 later is data", Mode::rcpt, std::string("NOOP\r\n\x16\x03\r\n", 10),
     greet_rcpt + "250 2.0.0 Ok\r\n" + refusal, EndReason::eof},
    // NUL and 8-bit bytes are just bytes.
    {"NUL and 8-bit", Mode::rcpt, std::string("HE\0LO \xff\xfe\r\nQUIT\r\n", 15), greet_rcpt + refusal + bye_rcpt,
     EndReason::quit},
};

}  // namespace

TEST_CASE("scripted sessions through the core") {
    for (const Case& c : cases) {
        for (std::size_t chunk : {std::size_t(0), std::size_t(1), std::size_t(3)}) {
            INFO(c.name << " (chunk " << chunk << ")");
            Result r = drive(make_options(c.mode), c.input, chunk);
            CHECK(r.output == c.expected);
            CHECK(end_reason_name(r.end) == end_reason_name(c.end));
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
    for (Mode mode : {Mode::rcpt, Mode::greeting, Mode::close}) {
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
    for (Mode mode : {Mode::greeting, Mode::close}) {
        Replies r;
        REQUIRE(build_replies(make_options(mode), r));
        CHECK(r.greeting.view() == greet_521);
        CHECK(r.close_after_greeting == (mode == Mode::close));
        for (const Reply& reply : r.to) {
            INFO(reply.view());
            CHECK(!has_enhanced_code(reply.view()));
            CHECK(reply.view().find("ENHANCEDSTATUSCODES") == std::string_view::npos);
        }
        CHECK(r[Verb::quit].view() == bye);
        CHECK(r[Verb::ehlo].view() == greet_521);
    }
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
    o.max_commands = 100000;
    Replies replies;
    REQUIRE(build_replies(o, replies));
    Session s(replies, o.max_commands);
    Output out;
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
    Replies replies;
    REQUIRE(build_replies(o, replies));
    Session s(replies, o.max_commands);
    Output out;
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
          "peer=local end=eof commands=6 duration=1.234 helo=client.example mail=<a@b> rcpt=<r1@x>,<r2@x>,<r3@x> rcpts=4 sandbox=on");
}

TEST_CASE("client text in the log is escaped and bounded") {
    Options o = make_options(Mode::rcpt);
    Replies replies;
    REQUIRE(build_replies(o, replies));
    Session s(replies, o.max_commands);
    Output out;
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

// The worst case of every field at once: five 510-octet arguments of octets
// that each escape to four, a fourth RCPT, a peer from a hostile
// environment, the longest end reason and the longest duration.
TEST_CASE("the log line is bounded by construction: the worst case keeps every field") {
    Options o = make_options(Mode::rcpt);
    o.max_commands = max_commands_limit;
    Replies replies;
    REQUIRE(build_replies(o, replies));
    Session s(replies, o.max_commands);
    Output out;
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
    // Every field is there, in order, and the line ends with the last one.
    std::size_t at = 0;
    for (const char* key : {"peer=", " end=write-error", " commands=6", " duration=", " helo=", " mail=", " rcpt=",
                            " rcpts=4", " sandbox=off"}) {
        std::size_t found = line.find(key, at);
        CHECK(found != std::string::npos);
        at = found;
    }
    CHECK(line.size() >= 20);
    CHECK(line.substr(line.size() - 20) == " rcpts=4 sandbox=off");
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
    add_escaped(log, "ab", 100, true);  // cut before it reached the log
    CHECK(log.view() == "ab...");
}

TEST_CASE("the alarm's line is the session's, with end=alarm") {
    Options o = make_options(Mode::rcpt);
    Replies replies;
    REQUIRE(build_replies(o, replies));
    Session s(replies, o.max_commands);
    Output out;
    s.feed("HELO a\r\n", out);
    backstop.target = LogTarget::stderr_;
    prepare_backstop(s, 302000, make_peer("local"));
    REQUIRE(backstop.ready >= 0);
    CHECK(backstop.message[backstop.ready].view() ==
          "peer=local end=alarm commands=1 duration=302.000 helo=a mail=- rcpt=- rcpts=0 sandbox=off\n");
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

TEST_CASE("option values are checked") {
    CHECK(valid_hostname("mx.example.org"));
    CHECK(valid_hostname("[192.0.2.1]"));
    CHECK_FALSE(valid_hostname(""));
    CHECK_FALSE(valid_hostname("two words"));
    CHECK_FALSE(valid_hostname("tab\there"));
    CHECK_FALSE(valid_hostname(std::string(256, 'a')));
    CHECK(valid_message("does not accept mail"));
    CHECK_FALSE(valid_message("line\r\nbreak"));
    CHECK_FALSE(valid_message(""));
    CHECK_FALSE(valid_message("caf\xc3\xa9"));
    CHECK(parse_number("300", 1, 86400) == 300);
    CHECK(parse_number("0", 0, max_stress_at) == 0);  // --stress-at 0: never
    CHECK(parse_number("86400", 1, 86400) == 86400);
    for (const char* bad : {"0", "-5", "10s", "99999999999999999999", "", " 5", "86401", "+5"}) {
        INFO(bad);
        CHECK(parse_number(bad, 1, 86400) == -1);
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
    std::string longer(245, 't');
    o.message = longer;
    CHECK_FALSE(build_replies(o, replies));  // 513
    o.mode = Mode::greeting;
    CHECK(build_replies(o, replies));  // the greeting, 4 + 255 + 1 + 245 + 2 = 507
    std::string longest(251, 't');
    o.message = longest;
    CHECK_FALSE(build_replies(o, replies));  // 513
}

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

TEST_CASE("a later option overrides an earlier one; -r and -c set the same mode") {
    CHECK(parse({}).mode == Mode::rcpt);
    CHECK(parse({"-r", "rcpt", "-r", "greeting", "-c"}).mode == Mode::close);
    CHECK(parse({"-c", "-r", "rcpt"}).mode == Mode::rcpt);
    CHECK(parse({"-c", "-r", "greeting"}).mode == Mode::greeting);
    CHECK(parse({"--close", "--refuse-at=greeting", "-c"}).mode == Mode::close);
    Options o = parse({"-t", "5", "-t", "7", "-n", "3", "-n", "4", "-H", "a", "-H", "b", "-l", "none", "-l", "stderr"});
    CHECK(o.timeout_seconds == 7);
    CHECK(o.max_commands == 4);
    CHECK(o.hostname == "b");
    CHECK(o.log == LogTarget::stderr_);
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
        CHECK(got == (k.mode == Mode::rcpt ? greeting + k.tail : k.tail));
    }
}
