// Unit tests of the pure session core: bytes in, replies and an end reason
// out, no I/O.  Each case is one row of a table.
#define SMTP521_NO_MAIN
#include "../smtp521.cpp"

#include <catch2/catch.hpp>

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
    Session s(replies, options.mode, options.max_commands);
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

struct Case {
    const char* name;
    Mode mode;
    std::string input;
    std::string expected;
    EndReason end;
};

const std::vector<Case> cases = {
    // Default mode: 220, then the refusal from RCPT on (issue 4).
    {"rcpt: a whole transaction", Mode::rcpt,
     "EHLO a\r\nMAIL FROM:<x@y>\r\nRCPT TO:<u@v>\r\nDATA\r\nQUIT\r\n",
     greet_rcpt + "250 mx.test\r\n250 2.1.0 Ok\r\n" + refusal + refusal + bye, EndReason::quit},
    {"rcpt: HELO, RSET, NOOP are fine", Mode::rcpt, "HELO a\r\nRSET\r\nNOOP\r\nQUIT\r\n",
     greet_rcpt + "250 mx.test\r\n250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n" + bye, EndReason::quit},
    {"rcpt: VRFY, EXPN, HELP, STARTTLS, AUTH, unknown are refused", Mode::rcpt,
     "VRFY u\r\nEXPN l\r\nHELP\r\nSTARTTLS\r\nAUTH PLAIN\r\nXYZZY\r\n",
     greet_rcpt + refusal + refusal + refusal + refusal + refusal + refusal, EndReason::eof},
    {"rcpt: every RCPT is refused", Mode::rcpt, "MAIL FROM:<>\r\nRCPT TO:<a@b>\r\nRCPT TO:<c@d>\r\n",
     greet_rcpt + "250 2.1.0 Ok\r\n" + refusal + refusal, EndReason::eof},
    // RFC 1846 4.2 (b) / RFC 7504 3: the standard's dialog.
    {"greeting: 521 to everything but QUIT", Mode::greeting,
     "EHLO a\r\nHELO a\r\nMAIL FROM:<x@y>\r\nRCPT TO:<u@v>\r\nDATA\r\nRSET\r\nNOOP\r\nVRFY x\r\nHELP\r\n\r\nQUIT\r\n",
     greet_521 + greet_521 + greet_521 + refusal + refusal + refusal + refusal + refusal + refusal + refusal +
         refusal + bye,
     EndReason::quit},
    {"close: greeting, then the end", Mode::close, "EHLO a\r\n", greet_521, EndReason::close},
    // R4: QUIT in any case; only the whole word.
    {"quit lower case", Mode::greeting, "quit\r\n", greet_521 + bye, EndReason::quit},
    {"quit mixed case", Mode::greeting, "QuIt\r\n", greet_521 + bye, EndReason::quit},
    {"QUIT with trailing text", Mode::greeting, "QUIT now\r\n", greet_521 + bye, EndReason::quit},
    {"QUITX is not QUIT", Mode::greeting, "QUITX\r\n", greet_521 + refusal, EndReason::eof},
    {"ehlo lower case is EHLO", Mode::rcpt, "ehlo a\r\n", greet_rcpt + "250 mx.test\r\n", EndReason::eof},
    // Nothing is answered after QUIT (pipelined data is discarded).
    {"nothing after QUIT", Mode::greeting, "QUIT\r\nNOOP\r\nNOOP\r\n", greet_521 + bye, EndReason::quit},
    // R7: bare LF accepted.
    {"bare LF", Mode::greeting, "NOOP\nQUIT\n", greet_521 + refusal + bye, EndReason::quit},
    {"empty line is a command", Mode::greeting, "\r\n\n", greet_521 + refusal + refusal, EndReason::eof},
    // An unterminated last line still counts when the client closes.
    {"unterminated QUIT at EOF", Mode::greeting, "QUIT", greet_521 + bye, EndReason::quit},
    {"silent client", Mode::greeting, "", greet_521, EndReason::eof},
    // R18: not SMTP.
    {"HTTP GET", Mode::rcpt, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", greet_rcpt, EndReason::http},
    {"HTTP CONNECT", Mode::greeting, "CONNECT a:25 HTTP/1.1\r\n", greet_521, EndReason::http},
    {"HTTP POST", Mode::greeting, "POST /x HTTP/1.0\r\n", greet_521, EndReason::http},
    {"HTTP only on the first line", Mode::greeting, "NOOP\r\nGET / HTTP/1.1\r\n", greet_521 + refusal + refusal,
     EndReason::eof},
    {"lower-case get is not HTTP", Mode::greeting, "get / x\r\n", greet_521 + refusal, EndReason::eof},
    {"TLS ClientHello", Mode::rcpt, std::string("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 11), greet_rcpt,
     EndReason::tls},
    {"0x16 0x03 later is data", Mode::greeting, std::string("NOOP\r\n\x16\x03\r\n", 10), greet_521 + refusal + refusal,
     EndReason::eof},
    // NUL and 8-bit bytes are just bytes.
    {"NUL and 8-bit", Mode::greeting, std::string("HE\0LO \xff\xfe\r\nQUIT\r\n", 15), greet_521 + refusal + bye,
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

TEST_CASE("R16: a pipelined batch of 20 commands is answered in order") {
    std::string input;
    for (int i = 0; i < 19; ++i) input += "NOOP\r\n";
    input += "QUIT\r\n";
    Result r = drive(make_options(Mode::rcpt), input);
    std::string expected = greet_rcpt;
    for (int i = 0; i < 19; ++i) expected += "250 2.0.0 Ok\r\n";
    expected += bye;
    CHECK(r.output == expected);
    CHECK(r.commands == 20);
}

TEST_CASE("R8: a line of 510 octets plus CRLF is a command; 511 is too long") {
    std::string fits = "RSET " + std::string(505, 'x');  // 510
    Result r = drive(make_options(Mode::rcpt), fits + "\r\n");
    CHECK(r.output == greet_rcpt + "250 2.0.0 Ok\r\n");
    Result r2 = drive(make_options(Mode::rcpt), fits + "y\r\n");
    CHECK(r2.output == greet_rcpt + refusal);
}

TEST_CASE("R8: a 1 MiB line gets one reply, then the session goes on") {
    std::string input = "MAIL FROM:<" + std::string(1 << 20, 'a') + ">\r\nQUIT\r\n";
    for (std::size_t chunk : {std::size_t(0), std::size_t(4096), std::size_t(7)}) {
        Result r = drive(make_options(Mode::rcpt), input, chunk);
        CHECK(r.output == greet_rcpt + refusal + bye);
        CHECK(r.commands == 2);
    }
}

TEST_CASE("R9: no reply in any mode starts with 4") {
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
            CHECK(line[3] == ' ');
            CHECK(line.size() + 2 <= max_reply);
            pos = eol + 2;
            ++lines;
        }
        CHECK(lines == (mode == Mode::close ? 1 : 17));
    }
}

TEST_CASE("R10: no enhanced code in the greeting nor in the HELO/EHLO reply") {
    for (Mode mode : {Mode::rcpt, Mode::greeting}) {
        Result r = drive(make_options(mode), "EHLO a\r\nHELO b\r\n");
        CHECK(r.output.find("5.3.2") == std::string::npos);
        CHECK(r.output.find("2.0.0") == std::string::npos);
    }
}

TEST_CASE("R2: the name is the first word after the code") {
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
    CHECK(r.output == greet_521 + refusal + refusal + refusal);
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
    Session s(replies, o.mode, o.max_commands);
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
    CHECK(total == greet_521.size() + 4000 * refusal.size());
    CHECK(s.commands() == 4000);
}

TEST_CASE("what the log records of the client") {
    Options o = make_options(Mode::rcpt);
    Replies replies;
    REQUIRE(build_replies(o, replies));
    Session s(replies, o.mode, o.max_commands);
    Output out;
    std::string input = "EHLO client.example\r\nMAIL FROM:<a@b> SIZE=10\r\nRCPT TO:<r1@x>\r\nrcpt to: <r2@x>\r\n"
                        "RCPT TO:<r3@x>\r\nRCPT TO:<r4@x>\r\n";
    s.feed(input, out);
    CHECK(s.helo().view() == "client.example");
    CHECK(s.mail().view() == "<a@b>");
    CHECK(s.rcpt(0).view() == "<r1@x>");
    CHECK(s.rcpt(1).view() == "<r2@x>");
    CHECK(s.rcpt(2).view() == "<r3@x>");
    CHECK(s.rcpt_count() == 4);

    LogLine log;
    format_log(log, s, EndReason::eof, 1234, "local", true);
    CHECK(log.view() ==
          "peer=local end=eof commands=6 duration=1.234 helo=client.example mail=<a@b> rcpt=<r1@x>,<r2@x>,<r3@x> rcpts=4 sandbox=on");
}

TEST_CASE("client text in the log is escaped and bounded") {
    Options o = make_options(Mode::rcpt);
    Replies replies;
    REQUIRE(build_replies(o, replies));
    Session s(replies, o.mode, o.max_commands);
    Output out;
    std::string input = std::string("HELO evil\rend=quit\x01\xff\\x\r\nMAIL FROM:<") + std::string(300, 'z') + ">\r\n";
    s.feed(input, out);
    LogLine log;
    format_log(log, s, EndReason::eof, 0, "local", false);
    std::string line(log.view());
    CHECK(line.find("helo=evil\\x0dend=quit\\x01\\xff\\x5cx ") != std::string::npos);
    CHECK(line.find(" mail=<" + std::string(99, 'z') + "... ") != std::string::npos);
    for (char c : line) CHECK((c >= 0x20 && c < 0x7f));
    CHECK(line.find(" end=eof ") != std::string::npos);
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
    int v = 0;
    CHECK(parse_number("300", 1, 86400, v));
    CHECK(v == 300);
    CHECK_FALSE(parse_number("0", 1, 86400, v));
    CHECK_FALSE(parse_number("-5", 1, 86400, v));
    CHECK_FALSE(parse_number("10s", 1, 86400, v));
    CHECK_FALSE(parse_number("99999999999999999999", 1, 86400, v));
    CHECK_FALSE(parse_number("", 1, 86400, v));
    CHECK_FALSE(parse_number(" 5", 1, 86400, v));
}

TEST_CASE("a reply longer than 512 octets is refused at start") {
    Options o = make_options(Mode::greeting);
    std::string name(255, 'n');
    std::string text(240, 't');
    o.hostname = name;
    o.message = text;
    Replies replies;
    CHECK(build_replies(o, replies));  // 10 + 255 + 1 + 240 + 2 = 508
    std::string longer(250, 't');
    o.message = longer;
    CHECK_FALSE(build_replies(o, replies));
}
