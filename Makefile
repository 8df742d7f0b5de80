# smtp521 -- see README.md.  Honours CXX, CXXFLAGS, CPPFLAGS, LDFLAGS,
# PREFIX and DESTDIR.

CXX      ?= g++
CXXFLAGS ?= -O2 -g
PREFIX   ?= /usr/local
SBINDIR  ?= $(PREFIX)/sbin
MANDIR   ?= $(PREFIX)/share/man
DOCDIR   ?= $(PREFIX)/share/doc/smtp521
UNITDIR  ?= $(PREFIX)/lib/systemd/system
# Debian's interpreter, which has python3-pytest (a python3 earlier on PATH,
# e.g. pyenv's, may lack it).
PYTHON   ?= /usr/bin/python3

# Always on, whatever CXXFLAGS says: the language level, warnings, and the
# hardening Debian applies to network daemons.
WARN     = -std=c++17 -Wall -Wextra -Wpedantic -Wshadow -Wconversion
HARDEN   = -D_FORTIFY_SOURCE=2 -fstack-protector-strong -fstack-clash-protection -fPIE
LDHARDEN = -Wl,-z,relro -Wl,-z,now -Wl,-z,noexecstack
# Static PIE by default: a process per connection spends most of its life
# starting, and dynamic loading of libstdc++ doubles that (make bench);
# PIE keeps the binary's address randomized.  LINKMODE=-pie links
# dynamically.
LINKMODE ?= -static-pie
SANITIZE = -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all

all: smtp521

smtp521: smtp521.cpp
	$(CXX) $(WARN) $(HARDEN) $(CPPFLAGS) $(CXXFLAGS) $(LINKMODE) $(LDHARDEN) $(LDFLAGS) -o $@ smtp521.cpp

# The same, linked dynamically: the benchmark's comparison.
smtp521-dynamic: smtp521.cpp
	$(CXX) $(WARN) $(HARDEN) $(CPPFLAGS) $(CXXFLAGS) -pie $(LDHARDEN) $(LDFLAGS) -o $@ smtp521.cpp

# The same program under AddressSanitizer and UndefinedBehaviorSanitizer.
smtp521-asan: smtp521.cpp
	$(CXX) $(WARN) -O1 -g $(SANITIZE) $(CPPFLAGS) -o $@ smtp521.cpp

test/catch_main.o: test/catch_main.cpp
	$(CXX) -std=c++17 -O1 $(CPPFLAGS) -c -o $@ test/catch_main.cpp

test/catch_main-asan.o: test/catch_main.cpp
	$(CXX) -std=c++17 -O1 $(SANITIZE) $(CPPFLAGS) -c -o $@ test/catch_main.cpp

test/unit: test/unit.cpp smtp521.cpp test/catch_main.o
	$(CXX) $(WARN) -O1 -g $(CPPFLAGS) -o $@ test/unit.cpp test/catch_main.o

test/unit-asan: test/unit.cpp smtp521.cpp test/catch_main-asan.o
	$(CXX) $(WARN) -O1 -g $(SANITIZE) $(CPPFLAGS) -o $@ test/unit.cpp test/catch_main-asan.o

# libFuzzer target of the session core (clang, libclang-rt-14-dev).
FUZZ_CXX     ?= clang++
FUZZ_SECONDS ?= 300
test/fuzz: test/fuzz.cpp smtp521.cpp
	$(FUZZ_CXX) -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined $(CPPFLAGS) -o $@ test/fuzz.cpp

# Fuzz for FUZZ_SECONDS; new inputs go to a temporary directory, never into
# the committed corpus.
fuzz: test/fuzz
	work=$$(mktemp -d) && ./test/fuzz -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
		-artifact_prefix=$$work/ $$work test/fuzz-corpus; status=$$?; \
		echo "new inputs and any crash kept in $$work"; exit $$status

# Every suite in one pytest run (see README.md, Tests); its closing line
# `N passed, M failed, K skipped` is the last line.
check: smtp521 smtp521-asan test/unit test/unit-asan test/fuzz
	$(PYTHON) -m pytest test

# The quick loop: unit, session and black-box tests of the plain build; no
# clang, no root.
test: smtp521 test/unit
	$(PYTHON) -m pytest --build plain test/test_unit.py test/test_sessions.py test/test_blackbox.py

# Real senders (Postfix, Exim, OpenSMTPD, swaks, msmtp, smtplib, curl)
# against every mode.  It installs and replaces MTAs: run it on a test
# machine.  It writes test/interop-table.md; `make readme` puts that table
# into README.md.
interop: smtp521
	cd test && $(PYTHON) interop.py

# Per-session time and memory as ratios to a static C floor measured in
# the same run, and to rblsmtpd.  A report, not a test.
bench:
	$(PYTHON) test/bench/bench.py

readme: test/interop-table.md
	$(PYTHON) test/splice-readme README.md test/interop-table.md

# Install into $(DESTDIR)$(PREFIX); the service unit's ExecStart follows
# SBINDIR.
install: smtp521
	install -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(UNITDIR) $(DESTDIR)$(DOCDIR)
	install -m 755 smtp521 $(DESTDIR)$(SBINDIR)/smtp521
	install -m 644 man/smtp521.8 $(DESTDIR)$(MANDIR)/man8/smtp521.8
	install -m 644 smtp521.socket $(DESTDIR)$(UNITDIR)/smtp521.socket
	sed 's|^ExecStart=/usr/local/sbin/smtp521|ExecStart=$(SBINDIR)/smtp521|' smtp521@.service \
		> $(DESTDIR)$(UNITDIR)/smtp521@.service
	chmod 644 $(DESTDIR)$(UNITDIR)/smtp521@.service
	sed 's|/usr/local/sbin/smtp521|$(SBINDIR)/smtp521|' inetd.conf.example \
		> $(DESTDIR)$(DOCDIR)/inetd.conf.example
	chmod 644 $(DESTDIR)$(DOCDIR)/inetd.conf.example
	install -m 644 README.md $(DESTDIR)$(DOCDIR)/README.md

uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/smtp521 $(DESTDIR)$(MANDIR)/man8/smtp521.8 \
		$(DESTDIR)$(UNITDIR)/smtp521.socket $(DESTDIR)$(UNITDIR)/smtp521@.service \
		$(DESTDIR)$(DOCDIR)/inetd.conf.example $(DESTDIR)$(DOCDIR)/README.md
	-rmdir $(DESTDIR)$(DOCDIR)

clean:
	rm -f smtp521 smtp521-asan smtp521-dynamic test/unit test/unit-asan test/fuzz test/*.o
	rm -rf test/bench/out

.PHONY: all check test clean install uninstall interop readme bench fuzz
