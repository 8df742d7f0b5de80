/* The benchmark's floor: the cheapest honest program that holds the same
 * conversation as smtp521's default mode (220; 250 to EHLO/HELO/MAIL; 521
 * to RCPT and the rest; 221 to QUIT), with fixed strings, read(2) and
 * write(2).  Built static.  Not a product: no deadline, no limits, no log. */
#include <string.h>
#include <strings.h>
#include <unistd.h>

static void say(const char *s) { (void)!write(1, s, strlen(s)); }

int main(void) {
    char in[4096], line[512];
    size_t len = 0;
    ssize_t n;
    say("220 mx.test ESMTP does not accept mail\r\n");
    while ((n = read(0, in, sizeof in)) > 0) {
        char out[4096];
        size_t olen = 0;
        for (ssize_t i = 0; i < n; i++) {
            if (in[i] != '\n') {
                if (len < sizeof line) line[len++] = in[i];
                continue;
            }
            const char *r = "521 5.3.2 mx.test does not accept mail\r\n";
            int quit = 0;
            if (len >= 4 && (!strncasecmp(line, "EHLO", 4) || !strncasecmp(line, "HELO", 4))) r = "250 mx.test\r\n";
            else if (len >= 4 && !strncasecmp(line, "MAIL", 4)) r = "250 2.1.0 Ok\r\n";
            else if (len >= 4 && !strncasecmp(line, "QUIT", 4)) { r = "221 mx.test closing connection\r\n"; quit = 1; }
            size_t rl = strlen(r);
            if (olen + rl <= sizeof out) { memcpy(out + olen, r, rl); olen += rl; }
            len = 0;
            if (quit) { (void)!write(1, out, olen); return 0; }
        }
        (void)!write(1, out, olen);
    }
    return 0;
}
