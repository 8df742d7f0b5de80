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

# The version's one home is the first line of debian/changelog,
# "smtp521 (1.0.0) unstable; ...": sed, not dpkg-parsechangelog, so that a
# bare g++ and make build it.
VERSION  := $(shell sed -n '1s/^[^(]*(\([^)]*\)).*/\1/p' debian/changelog)
VERSIONDEF = -DSMTP521_VERSION='"$(VERSION)"'

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

smtp521: smtp521.cpp debian/changelog
	$(CXX) $(WARN) $(HARDEN) $(VERSIONDEF) $(CPPFLAGS) $(CXXFLAGS) $(LINKMODE) $(LDHARDEN) $(LDFLAGS) -o $@ smtp521.cpp

# The same, linked dynamically: the benchmark's comparison.
smtp521-dynamic: smtp521.cpp debian/changelog
	$(CXX) $(WARN) $(HARDEN) $(VERSIONDEF) $(CPPFLAGS) $(CXXFLAGS) -pie $(LDHARDEN) $(LDFLAGS) -o $@ smtp521.cpp

# The same for i386, where glibc sends socket calls through socketcall(2):
# the filter's rules for it are tested there.  It needs g++-multilib, so
# `make i386` builds it and test/sandbox-i386 where the compiler can, and
# their tests skip (fail under CI=true) where it cannot.
i386:
	@$(MAKE) -s smtp521-i386 test/sandbox-i386 2>/dev/null \
		|| echo "make: no i386 build (needs g++-multilib); its tests will skip"

smtp521-i386: smtp521.cpp debian/changelog
	$(CXX) -m32 $(WARN) $(HARDEN) $(VERSIONDEF) $(CPPFLAGS) $(CXXFLAGS) $(LINKMODE) $(LDHARDEN) $(LDFLAGS) -o $@ smtp521.cpp

# The same program under AddressSanitizer and UndefinedBehaviorSanitizer.
smtp521-asan: smtp521.cpp debian/changelog
	$(CXX) $(WARN) -O1 -g $(SANITIZE) $(VERSIONDEF) $(CPPFLAGS) -o $@ smtp521.cpp

test/catch_main.o: test/catch_main.cpp
	$(CXX) -std=c++17 -O1 $(CPPFLAGS) -c -o $@ test/catch_main.cpp

test/catch_main-asan.o: test/catch_main.cpp
	$(CXX) -std=c++17 -O1 $(SANITIZE) $(CPPFLAGS) -c -o $@ test/catch_main.cpp

test/unit: test/unit.cpp smtp521.cpp debian/changelog test/catch_main.o
	$(CXX) $(WARN) -O1 -g $(VERSIONDEF) $(CPPFLAGS) -o $@ test/unit.cpp test/catch_main.o

test/unit-asan: test/unit.cpp smtp521.cpp debian/changelog test/catch_main-asan.o
	$(CXX) $(WARN) -O1 -g $(SANITIZE) $(VERSIONDEF) $(CPPFLAGS) -o $@ test/unit.cpp test/catch_main-asan.o

# The confinement's own tests (test/sandbox.cpp): each case forks a child
# that installs the seccomp filter.
test/sandbox: test/sandbox.cpp smtp521.cpp test/catch_main.o
	$(CXX) $(WARN) -O1 -g $(VERSIONDEF) $(CPPFLAGS) -o $@ test/sandbox.cpp test/catch_main.o

# On i386 (g++-multilib).
test/catch_main-i386.o: test/catch_main.cpp
	$(CXX) -m32 -std=c++17 -O1 $(CPPFLAGS) -c -o $@ test/catch_main.cpp

test/sandbox-i386: test/sandbox.cpp smtp521.cpp test/catch_main-i386.o
	$(CXX) -m32 $(WARN) -O1 -g $(VERSIONDEF) $(CPPFLAGS) -o $@ test/sandbox.cpp test/catch_main-i386.o

test/sandbox-asan: test/sandbox.cpp smtp521.cpp test/catch_main-asan.o
	$(CXX) $(WARN) -O1 -g $(SANITIZE) $(VERSIONDEF) $(CPPFLAGS) -o $@ test/sandbox.cpp test/catch_main-asan.o

# libFuzzer target of the session core (clang, libclang-rt-14-dev).
FUZZ_CXX     ?= clang++
FUZZ_SECONDS ?= 300
test/fuzz: test/fuzz.cpp smtp521.cpp debian/changelog
	$(FUZZ_CXX) -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined $(VERSIONDEF) $(CPPFLAGS) -o $@ test/fuzz.cpp

# Fuzz for FUZZ_SECONDS; new inputs go to a temporary directory, never into
# the committed corpus.
fuzz: test/fuzz
	work=$$(mktemp -d) && ./test/fuzz -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
		-artifact_prefix=$$work/ $$work test/fuzz-corpus; status=$$?; \
		echo "new inputs and any crash kept in $$work"; exit $$status

# Every suite in one pytest run (see README.md, Tests); its closing line
# `N passed, M failed, K skipped` is the last line.
check: smtp521 smtp521-asan test/unit test/unit-asan test/sandbox test/sandbox-asan test/fuzz i386
	$(PYTHON) -m pytest test

# The quick loop: unit, session and black-box tests of the plain build; no
# clang, no root.
test: smtp521 test/unit test/sandbox i386
	$(PYTHON) -m pytest --build plain test/test_unit.py test/test_sessions.py test/test_blackbox.py

# Real senders (Postfix, Exim, OpenSMTPD, swaks, msmtp, smtplib, curl)
# against every mode.  It installs and replaces MTAs: run it on a test
# machine.  It writes test/interop-table.md; `make readme` puts that table
# into README.md.
interop: smtp521
	cd test && $(PYTHON) interop.py

# Per-session time and memory as ratios to a static C floor measured in
# the same run, and to rblsmtpd (BENCH=programs); CPU per connection of
# each sandbox option of smtp521@.service under a private systemd, as
# ratios to the unit without a sandbox (BENCH=units, root); slot
# exhaustion of the shipped units and the stress mode, with one held
# session's memory (BENCH=stress, root).  Reports, not tests.
BENCH ?= programs units stress
bench:
	@for b in $(BENCH); do case $$b in \
		programs) $(PYTHON) test/bench/bench.py || exit 1;; \
		units) $(PYTHON) test/bench/units.py || exit 1;; \
		stress) $(PYTHON) test/bench/stress.py || exit 1;; \
		*) echo "BENCH: unknown $$b (programs, units, stress)"; exit 64;; \
	esac; done

readme: test/interop-table.md
	$(PYTHON) test/splice-readme README.md test/interop-table.md

# The tree's files name the default paths; the installed man page names
# the ones this install used (a drop-in copied from it must run a program
# that exists), and so do the service unit and the inetd lines.
INSTALLED_PATHS = -e 's|/usr/local/sbin/smtp521|$(SBINDIR)/smtp521|g' \
	-e 's|/usr/local/lib/systemd/system/|$(UNITDIR)/|g' \
	-e 's|/usr/local/share/doc/smtp521/|$(DOCDIR)/|g'

# Install into $(DESTDIR)$(PREFIX); the service unit's ExecStart follows
# SBINDIR, and the man page's footer gets the version.
install: smtp521
	install -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(UNITDIR) $(DESTDIR)$(DOCDIR)
	install -m 755 smtp521 $(DESTDIR)$(SBINDIR)/smtp521
	sed -e 's/^\.Os$$/.Os smtp521 $(VERSION)/' $(INSTALLED_PATHS) man/smtp521.8 > $(DESTDIR)$(MANDIR)/man8/smtp521.8
	chmod 644 $(DESTDIR)$(MANDIR)/man8/smtp521.8
	install -m 644 smtp521.socket smtp521.slice $(DESTDIR)$(UNITDIR)/
	sed $(INSTALLED_PATHS) smtp521@.service \
		> $(DESTDIR)$(UNITDIR)/smtp521@.service
	chmod 644 $(DESTDIR)$(UNITDIR)/smtp521@.service
	sed $(INSTALLED_PATHS) inetd.conf.example \
		> $(DESTDIR)$(DOCDIR)/inetd.conf.example
	chmod 644 $(DESTDIR)$(DOCDIR)/inetd.conf.example
	install -m 644 README.md $(DESTDIR)$(DOCDIR)/README.md

uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/smtp521 $(DESTDIR)$(MANDIR)/man8/smtp521.8 \
		$(DESTDIR)$(UNITDIR)/smtp521.socket $(DESTDIR)$(UNITDIR)/smtp521@.service \
		$(DESTDIR)$(UNITDIR)/smtp521.slice \
		$(DESTDIR)$(DOCDIR)/inetd.conf.example $(DESTDIR)$(DOCDIR)/README.md
	-rmdir $(DESTDIR)$(DOCDIR)

# The Debian package (debian/), built from a copy, in a temporary
# directory, of the files git tracks or would track (not the ignored build
# products), since dpkg-buildpackage writes into the parent directory.
# The .deb, .changes, .dsc ... land in DEBOUT.  The build's own make
# runs without this one's flags (-s would hide the compile line from blhc).  Needs debhelper, dpkg-dev
# and fakeroot (test/packages).
DEBOUT ?= .
deb:
	set -e; work=$$(mktemp -d); trap 'rm -rf "$$work"' EXIT; \
	src="$$work/smtp521-$(VERSION)"; mkdir "$$src"; \
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
		git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$$src"; \
	else \
		tar --exclude-vcs --exclude='./smtp521_*' -cf - . | tar -xf - -C "$$src"; \
	fi; \
	(cd "$$src" && env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL dpkg-buildpackage -us -uc $(DEBBUILDFLAGS)); \
	cp "$$work"/smtp521_$(VERSION)* "$$work"/smtp521-dbgsym_$(VERSION)_* $(DEBOUT)/

# lintian on the package, then piuparts in a bookworm chroot: install,
# upgrade from the previous build, remove, purge (test/deb-check).
deb-check:
	test/deb-check

clean:
	rm -f smtp521 smtp521-asan smtp521-dynamic smtp521-i386 test/unit test/unit-asan test/sandbox test/sandbox-asan test/sandbox-i386 test/fuzz test/*.o
	rm -rf test/bench/out

.PHONY: all check test i386 clean install uninstall interop readme bench fuzz deb deb-check
