// libFuzzer target: arbitrary bytes, split at arbitrary points, through the
// session core in every mode.  Input layout: byte 0 picks the mode (its
// remainder by the number of modes, in mode_names' order) and the command
// limit (the quotient; 0: no limit but the largest), byte 1 seeds the split
// points, the rest is what the client sends.  Any broken invariant aborts.
#define SMTP521_NO_MAIN
#include "../../smtp521.cpp"

#include <cstdint>

using namespace smtp521;

namespace {

[[noreturn]] void fail(const char* what) {
    std::fprintf(stderr, "invariant broken: %s\n", what);
    std::abort();
}

void require(bool ok, const char* what) {
    if (!ok) fail(what);
}

// Every reply: lines of three digits, a space or (all but the last) a
// hyphen, printable text, CRLF, each at most 512 octets (RFC 5321 4.2,
// 4.5.3.1.5); never a 4yz (RFC 5321 4.2.1: it would ask for a retry).
// Enhanced status codes (RFC 2034 3 (4)) in the rcpt mode on every reply but
// the greeting and HELO/EHLO's, whose class is the reply's; in the other
// modes on none, and after the greeting every reply but QUIT's 221 is a
// 521 (RFC 1846 4.2 (b), RFC 7504 3).
void check_replies(std::string_view out, std::string_view& last_line, bool enhanced, bool& greeted) {
    while (!out.empty()) {
        std::size_t eol = out.find("\r\n");
        require(eol != std::string_view::npos, "reply ends in CRLF");
        std::string_view line = head(out, eol);
        require(line.size() + 2 <= max_reply, "reply within 512 octets");
        require(line.size() >= 4, "reply has a code and a separator");
        for (int i = 0; i < 3; ++i) require(line[i] >= '0' && line[i] <= '9', "three digits");
        require(line[0] == '2' || line[0] == '5', "2yz or 5yz, never 4yz");
        require(line[3] == ' ' || line[3] == '-', "code SP text, or code - text");
        for (char c : tail(line, 4)) require(c >= 0x20 && c < 0x7f, "printable text");
        const bool exempt = !greeted || line == "250 mx.test" || line == "250-mx.test" ||
                            line == "250 ENHANCEDSTATUSCODES";
        const bool coded = line.size() > 10 && line[4] == line[0] && line[5] == '.' && line[3] == ' ';
        if (enhanced && !exempt) require(coded, "an enhanced code, of the reply's class");
        if (!enhanced) require(!coded && line.find("ENHANCEDSTATUSCODES") == std::string_view::npos,
                               "no extension, no enhanced code");
        if (!enhanced && greeted) require(head(line, 4) == "521 " || head(line, 4) == "221 ", "521 to all but QUIT");
        greeted = true;
        last_line = line;
        out = tail(out, eol + 2);
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size < 2) return 0;
    Options options;
    constexpr std::size_t modes = std::size(mode_names);  // every mode, -r helo's included
    options.mode = mode_names[data[0] % modes].mode;
    options.max_commands = data[0] / modes == 0 ? max_commands_limit : static_cast<int>(data[0] / modes);
    options.hostname = "mx.test";
    std::uint32_t seed = data[1] * 2654435761u + 1;
    std::string_view input(reinterpret_cast<const char*>(data + 2), size - 2);

    Replies replies;
    require(build_replies(options, replies), "default replies fit");
    Session session(replies, options.max_commands);
    Output out;
    session.greet(out);
    std::size_t total_out = out.length;
    std::string_view last_line;
    const bool enhanced = options.mode == Mode::rcpt;
    bool greeted = false;
    check_replies(out.view(), last_line, enhanced, greeted);
    out.clear();

    std::size_t lines = 1;
    for (char c : input) lines += c == '\n';

    std::string_view rest = input;
    while (!rest.empty()) {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        std::string_view piece = head(rest, 1 + seed % 700);
        rest = tail(rest, piece.size());
        while (!piece.empty()) {
            bool was_ended = session.ended();
            std::size_t used = session.feed(piece, out);
            require(used <= piece.size(), "feed consumes at most what it is given");
            require(out.length <= Output::capacity, "output buffer bounded");
            if (was_ended) require(used == 0 && out.length == 0, "nothing answered after the end");
            if (!was_ended && !session.ended()) require(used > 0, "feed makes progress");
            check_replies(out.view(), last_line, enhanced, greeted);
            total_out += out.length;
            out.clear();
            if (session.ended()) break;
            piece = tail(piece, used);
        }
        if (session.ended()) break;
    }
    bool was_ended = session.ended();
    session.input_closed(out);
    if (was_ended) require(out.length == 0, "nothing answered after the end");
    check_replies(out.view(), last_line, enhanced, greeted);
    total_out += out.length;

    require(session.ended(), "input end ends the session");
    require(static_cast<std::size_t>(session.commands()) <= lines, "at most one command a line");
    require(total_out <= replies.greeting.length + static_cast<std::size_t>(session.commands()) * max_reply,
            "output bounded by input");
    require(session.commands() <= options.max_commands, "command limit holds");
    if (session.end_reason() == EndReason::quit)
        require(last_line.substr(0, 4) == "221 ", "QUIT is answered with 221, and nothing after");
    return 0;
}

#if defined(SMTP521_FUZZ_REPLAY)
// Without libFuzzer (make coverage, with g++): each file named is one input.
#include <fstream>
#include <iterator>

int main(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
        std::ifstream in(argv[i], std::ios::binary);
        if (!in) {
            std::fprintf(stderr, "%s: cannot read\n", argv[i]);
            return 1;
        }
        std::string bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
        LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
    }
    return 0;
}
#endif
