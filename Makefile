# smtp521 -- see README.md.  Honours CXX, CXXFLAGS, CPPFLAGS, LDFLAGS,
# PREFIX and DESTDIR.

CXX      ?= g++
CXXFLAGS ?= -O2 -g
PREFIX   ?= /usr/local
SBINDIR  ?= $(PREFIX)/sbin
MANDIR   ?= $(PREFIX)/share/man
DOCDIR   ?= $(PREFIX)/share/doc/smtp521
UNITDIR  ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
# Debian's interpreter, which has python3-pytest (a python3 earlier on PATH,
# e.g. pyenv's, may lack it).
PYTHON   ?= /usr/bin/python3

# The version's one home is VERSION, "1.0.0 2026-12-02": the upstream
# version and its release date (dist's SOURCE_DATE_EPOCH, below).  Debian's
# packaging, debian/, is not part of upstream: the release tarball has
# none, and its debian/changelog names VERSION's version plus a Debian
# revision (make deb refuses a changelog that disagrees; test_docs.py checks it).
RELEASE  := $(shell cat VERSION)
VERSION  := $(word 1,$(RELEASE))
RELEASE_DATE := $(word 2,$(RELEASE))
# The package's version (deb's file names): debian/changelog's, where it is.
DEBVERSION = $(shell sed -n '1s/^[^(]*(\([^)]*\)).*/\1/p' debian/changelog)
VERSIONDEF = -DSMTP521_VERSION='"$(VERSION)"'

# Always on, whatever CXXFLAGS says: the language level, warnings, and the
# hardening Debian applies to network daemons.
WARN     = -std=c++17 -Wall -Wextra -Wpedantic -Wshadow -Wconversion
# _FORTIFY_SOURCE is the distribution's where it chooses a level: in its
# CPPFLAGS (dpkg-buildflags) or CXXFLAGS (Arch's makepkg, -Wp,-D...), or
# predefined by its compiler (Ubuntu's since 24.04: 3 at -O1 and above).
# Defining it again would warn ("_FORTIFY_SOURCE" redefined) or downgrade
# it; only where none says a level, level 2 here (a bare make).
FORTIFY := $(if $(findstring _FORTIFY_SOURCE,$(CPPFLAGS) $(CXXFLAGS) $(shell $(CXX) -O2 -dM -E -x c++ /dev/null 2>/dev/null)),,-D_FORTIFY_SOURCE=2)
HARDEN   = $(FORTIFY) -fstack-protector-strong -fstack-clash-protection -fPIE
LDHARDEN = -Wl,-z,relro -Wl,-z,now -Wl,-z,noexecstack
# libgcc's helpers linked in, not libgcc_s.so.1 loaded: g++ asks for the
# shared one, and 32-bit ARM (unwind personality routines, 64-bit division)
# and i386 (64-bit division) would then load it for a few small routines.
LDLIBGCC = -static-libgcc
# Every build is position independent (-fPIE above, a PIE link below): the
# kernel places each connection's process at an address of its own.  By
# default linked dynamically against glibc, which is all it needs: the
# program throws nothing and allocates nothing, so the linker drops
# libstdc++ (readelf -d: NEEDED libc.so.6 alone, and, on arm64, armel,
# armhf, loong64 and riscv64, the loader, which holds the stack
# protector's guard there), and a glibc security update reaches it without a rebuild (Debian
# Policy 10.1: no static glibc).  A static PIE starts about 0.1 ms sooner
# (make bench, test/bench/RESULTS.md, "The link"), under 2% of what a
# session costs under the shipped unit: not worth a binary that keeps a
# glibc bug until it is rebuilt.  LINKMODE=-static-pie links one all the same
# where glibc has its start file, rcrt1.o (Debian 12: amd64, arm64, i386).
# Never plain -static: that is not PIE.
LINKMODE ?= -pie
static_pie = $(if $(filter /%,$(shell $(1) -print-file-name=rcrt1.o)),-static-pie,-pie)
SANITIZE = -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all

all: smtp521

smtp521: smtp521.cpp VERSION
	$(CXX) $(WARN) $(HARDEN) $(VERSIONDEF) $(CPPFLAGS) $(CXXFLAGS) $(LINKMODE) $(LDHARDEN) $(LDLIBGCC) $(LDFLAGS) -o $@ smtp521.cpp

# The same, each way it can be linked: the benchmark's comparison
# (a static PIE where rcrt1.o is, else dynamic).
smtp521-dynamic: smtp521.cpp VERSION
	$(CXX) $(WARN) $(HARDEN) $(VERSIONDEF) $(CPPFLAGS) $(CXXFLAGS) -pie $(LDHARDEN) $(LDLIBGCC) $(LDFLAGS) -o $@ smtp521.cpp

smtp521-static-pie: smtp521.cpp VERSION
	$(CXX) $(WARN) $(HARDEN) $(VERSIONDEF) $(CPPFLAGS) $(CXXFLAGS) $(call static_pie,$(CXX)) $(LDHARDEN) $(LDLIBGCC) $(LDFLAGS) -o $@ smtp521.cpp

# Every Debian release architecture, and Debian's cross compiler for it
# (test/packages).  `make cross` builds smtp521-ARCH for all of them;
# `make qemu-check ARCH=...` boots ARCH's own Debian kernel in qemu and
# proves the build and its filter there (test/arch/run).  i386 is tested
# this way too: a host kernel may refuse i386 binaries.
ARCHS = amd64 arm64 armel armhf i386 loong64 ppc64el riscv64 s390x
TRIPLET_amd64   = x86_64-linux-gnu
TRIPLET_arm64   = aarch64-linux-gnu
TRIPLET_armel   = arm-linux-gnueabi
TRIPLET_armhf   = arm-linux-gnueabihf
TRIPLET_i386    = i686-linux-gnu
TRIPLET_loong64 = loongarch64-linux-gnu
TRIPLET_ppc64el = powerpc64le-linux-gnu
TRIPLET_riscv64 = riscv64-linux-gnu
TRIPLET_s390x   = s390x-linux-gnu
cross_cxx = $(TRIPLET_$(1))-g++

# A cross build runs where ARCH's libc may be missing (the host's i386
# tests, the qemu guests): static PIE where the cross toolchain has rcrt1.o
# (amd64, arm64, i386, and Debian 14's loong64), else a dynamic PIE, whose
# loader and libc test/arch/run puts into the guest.  The Debian package is dynamic on
# every architecture (make deb-cross).
cross: $(ARCHS:%=smtp521-%)

$(ARCHS:%=smtp521-%): smtp521-%: smtp521.cpp VERSION
	$(call cross_cxx,$*) $(WARN) $(HARDEN) $(VERSIONDEF) $(CPPFLAGS) $(CXXFLAGS) $(call static_pie,$(call cross_cxx,$*)) $(LDHARDEN) $(LDLIBGCC) $(LDFLAGS) -o $@ smtp521.cpp

# What the guest runs besides smtp521-ARCH: the confinement's own tests
# and the init that drives the sessions (static, as the guest has no libc).
# No Catch2 library of a foreign architecture exists to link (Debian 13's
# v3 has one, of the host's), so the guest's test/unit/seccomp.cpp is built on
# test/unit/catch.hpp's small stand-in (SMTP521_MINI_CATCH): exit status 0 if
# every case passed.
$(ARCHS:%=test/unit/seccomp-%): test/unit/seccomp-%: test/unit/seccomp.cpp smtp521.cpp test/unit/catch.hpp test/unit/catch_main.cpp
	$(call cross_cxx,$*) $(WARN) -Wno-psabi -O1 -g -DSMTP521_MINI_CATCH $(VERSIONDEF) $(CPPFLAGS) -static -o $@ test/unit/seccomp.cpp test/unit/catch_main.cpp

$(ARCHS:%=test/arch/init-%): test/arch/init-%: test/arch/init.cpp
	$(call cross_cxx,$*) $(WARN) -O1 $(CPPFLAGS) -static -o $@ test/arch/init.cpp

# make check: the guests' files of every architecture whose cross compiler
# is installed (test_arch.py skips the others, and says why).
CROSS_HERE = $(foreach a,$(ARCHS),$(if $(shell command -v $(call cross_cxx,$(a))),$(a)))
qemu: $(foreach a,$(CROSS_HERE),smtp521-$(a) test/unit/seccomp-$(a) test/arch/init-$(a))

ARCH ?= $(shell dpkg --print-architecture)
qemu-check: smtp521-$(ARCH) test/unit/seccomp-$(ARCH) test/arch/init-$(ARCH)
	$(PYTHON) test/arch/run $(ARCH)

# The i386 build on the host: test_seccomp.py traces it where the kernel
# runs i386 binaries, and skips as a limit of the host where it does not.
i386:
	@if command -v $(call cross_cxx,i386) >/dev/null; then $(MAKE) -s smtp521-i386; \
	else echo "make: no $(call cross_cxx,i386) (g++-i686-linux-gnu), no i386 build: its tests will skip"; fi

# The same program under AddressSanitizer and UndefinedBehaviorSanitizer.
smtp521-asan: smtp521.cpp VERSION
	$(CXX) $(WARN) -O1 -g $(SANITIZE) $(VERSIONDEF) $(CPPFLAGS) -o $@ smtp521.cpp

# Catch2: v2 (Debian 12) is a header, v3 (Debian 13) also a library;
# test/unit/catch.hpp is the tests' one point of contact with either.
CATCH2_LIBS = $(if $(wildcard /usr/include/catch2/catch_session.hpp),-lCatch2)

test/unit/catch_main.o: test/unit/catch_main.cpp
	$(CXX) -std=c++17 -O1 $(CPPFLAGS) -c -o $@ test/unit/catch_main.cpp

test/unit/catch_main-asan.o: test/unit/catch_main.cpp
	$(CXX) -std=c++17 -O1 $(SANITIZE) $(CPPFLAGS) -c -o $@ test/unit/catch_main.cpp

test/unit/unit: test/unit/unit.cpp smtp521.cpp VERSION test/unit/catch_main.o test/unit/catch.hpp
	$(CXX) $(WARN) -O1 -g $(VERSIONDEF) $(CPPFLAGS) -o $@ test/unit/unit.cpp test/unit/catch_main.o $(CATCH2_LIBS)

test/unit/unit-asan: test/unit/unit.cpp smtp521.cpp VERSION test/unit/catch_main-asan.o test/unit/catch.hpp
	$(CXX) $(WARN) -O1 -g $(SANITIZE) $(VERSIONDEF) $(CPPFLAGS) -o $@ test/unit/unit.cpp test/unit/catch_main-asan.o $(CATCH2_LIBS)

# The confinement's own tests (test/unit/seccomp.cpp): each case forks a child
# that installs the seccomp filter.
test/unit/seccomp: test/unit/seccomp.cpp smtp521.cpp test/unit/catch_main.o test/unit/catch.hpp
	$(CXX) $(WARN) -O1 -g $(VERSIONDEF) $(CPPFLAGS) -o $@ test/unit/seccomp.cpp test/unit/catch_main.o $(CATCH2_LIBS)

test/unit/seccomp-asan: test/unit/seccomp.cpp smtp521.cpp test/unit/catch_main-asan.o test/unit/catch.hpp
	$(CXX) $(WARN) -O1 -g $(SANITIZE) $(VERSIONDEF) $(CPPFLAGS) -o $@ test/unit/seccomp.cpp test/unit/catch_main-asan.o $(CATCH2_LIBS)

# libFuzzer target of the session core (clang, libclang-rt-dev).
FUZZ_CXX     ?= clang++
FUZZ_SECONDS ?= 300
test/unit/fuzz: test/unit/fuzz.cpp smtp521.cpp VERSION
	$(FUZZ_CXX) -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined $(VERSIONDEF) $(CPPFLAGS) -o $@ test/unit/fuzz.cpp

# test/unit/fuzz where clang is; where it is not, the fuzz tests skip (and
# fail under CI=true, which installs clang).
fuzz-if-clang:
	@if command -v $(FUZZ_CXX) >/dev/null; then $(MAKE) -s test/unit/fuzz; \
	else echo "make: no $(FUZZ_CXX), no test/unit/fuzz: its tests will skip"; fi

# Fuzz for FUZZ_SECONDS; new inputs go to a temporary directory, never into
# the committed corpus.
fuzz: test/unit/fuzz
	work=$$(mktemp -d) && ./test/unit/fuzz -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
		-artifact_prefix=$$work/ $$work test/unit/fuzz-corpus; status=$$?; \
		echo "new inputs and any crash kept in $$work"; exit $$status

# Line and branch coverage of smtp521.cpp (gcov, which comes with g++):
# the unit tests, the fuzz corpus (test/unit/fuzz.cpp's inputs replayed
# without libFuzzer), the scripted sessions and test_process.py run
# through builds instrumented with --coverage, whose .gcda files a seccomp
# filter would keep them from writing: they install none
# (SMTP521_TEST_NO_FILTER; test/unit/seccomp proves the filter).
# test/scripts/coverage prints the figures and every line never run, by
# function.
COVDIR   = coverage
COVFLAGS = -O0 -g --coverage -DSMTP521_TEST_NO_FILTER
$(COVDIR)/smtp521: smtp521.cpp VERSION
	@mkdir -p $(COVDIR)
	$(CXX) $(WARN) $(COVFLAGS) $(VERSIONDEF) $(CPPFLAGS) -o $@ smtp521.cpp

$(COVDIR)/unit: test/unit/unit.cpp smtp521.cpp VERSION test/unit/catch_main.o test/unit/catch.hpp
	@mkdir -p $(COVDIR)
	$(CXX) $(WARN) $(COVFLAGS) $(VERSIONDEF) $(CPPFLAGS) -o $@ test/unit/unit.cpp test/unit/catch_main.o $(CATCH2_LIBS)

$(COVDIR)/fuzz-replay: test/unit/fuzz.cpp smtp521.cpp VERSION
	@mkdir -p $(COVDIR)
	$(CXX) $(WARN) $(COVFLAGS) -DSMTP521_FUZZ_REPLAY $(VERSIONDEF) $(CPPFLAGS) -o $@ test/unit/fuzz.cpp

coverage: $(COVDIR)/smtp521 $(COVDIR)/unit $(COVDIR)/fuzz-replay
	$(PYTHON) test/scripts/coverage $(COVDIR)

# A seeded sample of mutants of smtp521.cpp, each built and run against the
# quick loop's suites (test/scripts/mutation; about a minute a mutant):
# killed, survived, equivalent, and the seed.  Not part of make check.
MUTATION_SEED  ?= 521
MUTATION_COUNT ?= 40
mutation:
	$(PYTHON) test/scripts/mutation --seed $(MUTATION_SEED) --count $(MUTATION_COUNT)

# Every suite in one pytest run (see README.md, Tests); its closing line
# `N passed, M failed, K skipped` is the last line.
check: smtp521 smtp521-asan test/unit/unit test/unit/unit-asan test/unit/seccomp test/unit/seccomp-asan fuzz-if-clang i386 qemu
	$(PYTHON) -m pytest test

# The quick loop: unit, session and process tests of the plain build; no
# clang, no root.
test: smtp521 test/unit/unit test/unit/seccomp i386
	$(PYTHON) -m pytest --build plain test/unit/test_unit.py test/binary/test_sessions.py test/binary/test_process.py

# Real senders (Postfix, Exim, OpenSMTPD, sendmail, nullmailer, swaks,
# msmtp, curl, smtplib), as they come and set to require TLS, against every mode.  It
# installs and replaces MTAs: run it on a test machine.  It writes
# test/interop/interop-table.md from this and other releases' results;
# `make readme` puts that table into README.md.
interop: smtp521
	$(PYTHON) test/interop/interop.py

# The same on another release's senders, in a chroot of it; its results
# join this release's in the table (test/scripts/interop-in-chroot).
interop-in:
	test/scripts/interop-in-chroot $(SUITE)

# Per-session time and memory as ratios to a static C floor measured in
# the same run, and to rblsmtpd, and what the link costs: each smtp521
# build against a dynamic C floor under the same filter (BENCH=programs,
# about 45 s); CPU per connection of
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

readme: test/interop/interop-table.md
	$(PYTHON) test/scripts/splice-readme README.md test/interop/interop-table.md

# The tree's files name the default paths; the installed man page names
# the ones this install used (a drop-in copied from it must run a program
# that exists), and so do the service unit and the inetd lines.
INSTALLED_PATHS = -e 's|/usr/local/sbin/smtp521|$(SBINDIR)/smtp521|g' \
	-e 's|/usr/local/lib/systemd/system/|$(UNITDIR)/|g' \
	-e 's|/usr/local/share/doc/smtp521/|$(DOCDIR)/|g'

# Install into $(DESTDIR)$(PREFIX); the units' ExecStart= and
# ExecStartPre= follow SBINDIR, and the man page's footer gets the version.
# The unit's user (smtp521.sysusers, upstream's: a packager's sysusers.d
# gets it from here, the Debian package by this install) is made at once
# when installing into this
# system; uninstall keeps it, as Debian does at purge.
install: smtp521
	install -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(UNITDIR) $(DESTDIR)$(DOCDIR)
	install -m 755 smtp521 $(DESTDIR)$(SBINDIR)/smtp521
	sed -e 's/^\.Os$$/.Os smtp521 $(VERSION)/' $(INSTALLED_PATHS) man/smtp521.8 > $(DESTDIR)$(MANDIR)/man8/smtp521.8
	chmod 644 $(DESTDIR)$(MANDIR)/man8/smtp521.8
	install -m 644 smtp521.slice $(DESTDIR)$(UNITDIR)/
	for u in smtp521.socket smtp521@.service; do \
		sed $(INSTALLED_PATHS) $$u > $(DESTDIR)$(UNITDIR)/$$u && chmod 644 $(DESTDIR)$(UNITDIR)/$$u || exit; done
	sed $(INSTALLED_PATHS) inetd.conf.example \
		> $(DESTDIR)$(DOCDIR)/inetd.conf.example
	chmod 644 $(DESTDIR)$(DOCDIR)/inetd.conf.example
	install -m 644 README.md $(DESTDIR)$(DOCDIR)/README.md
	install -d $(DESTDIR)$(SYSUSERSDIR)
	install -m 644 smtp521.sysusers $(DESTDIR)$(SYSUSERSDIR)/smtp521.conf
	@# The unit's user, now, where systemd-sysusers makes it at every boot
	@# from then on: not into a DESTDIR, nor a PREFIX whose sysusers.d it
	@# does not read (a test's temporary tree must not add a user here).
	case "$(DESTDIR)$(SYSUSERSDIR)" in /etc/sysusers.d|/run/sysusers.d|/usr/local/lib/sysusers.d|/usr/lib/sysusers.d) \
		if command -v systemd-sysusers >/dev/null; then systemd-sysusers $(SYSUSERSDIR)/smtp521.conf; fi;; esac

uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/smtp521 $(DESTDIR)$(MANDIR)/man8/smtp521.8 \
		$(DESTDIR)$(UNITDIR)/smtp521.socket $(DESTDIR)$(UNITDIR)/smtp521@.service \
		$(DESTDIR)$(UNITDIR)/smtp521.slice \
		$(DESTDIR)$(DOCDIR)/inetd.conf.example $(DESTDIR)$(DOCDIR)/README.md \
		$(DESTDIR)$(SYSUSERSDIR)/smtp521.conf
	-rmdir $(DESTDIR)$(DOCDIR)

# The release tarball, smtp521-VERSION.tar.gz: the files git tracks but
# debian/ (in an unpacked tarball, which has no git: the files its MANIFEST
# names, written here), under smtp521-VERSION/, with owners, modes, order
# and times that do not depend on the checkout (the times: VERSION's
# release date, midnight UTC), so that the same tree gives the same bytes.
# Upstream without Debian's packaging: any distribution builds, installs
# and tests it as it is (test_deploy.py unpacks it and does).
SOURCE_DATE_EPOCH ?= $(shell date -u -d '$(RELEASE_DATE)' +%s)
DIST = smtp521-$(VERSION).tar.gz
# Two at once (CI's package checks beside make check's) each write their
# own temporary files and rename them into place: same tree, same bytes.
dist:
	set -e; if [ -e .git ]; then git ls-files | grep -vx -e MANIFEST -e 'debian/.*' > MANIFEST.$$$$.tmp; \
	echo MANIFEST >> MANIFEST.$$$$.tmp; LC_ALL=C sort -o MANIFEST.$$$$.tmp MANIFEST.$$$$.tmp; mv MANIFEST.$$$$.tmp MANIFEST; fi; \
	tar --sort=name --format=gnu --mtime=@$(SOURCE_DATE_EPOCH) --owner=0 --group=0 --numeric-owner \
		--mode=u+rw,go=rX --transform='s,^,smtp521-$(VERSION)/,' -T MANIFEST -cf - | gzip -n9 > $(DIST).$$$$.tmp; \
	mv $(DIST).$$$$.tmp $(DIST)

# The Debian package, source format 3.0 (quilt): the release tarball as its
# .orig.tar.gz, and this tree's debian/ (the files git tracks there; every
# file there without git) as its .debian.tar.xz, built in a temporary
# directory where the tarball is unpacked and debian/ laid over it, since
# dpkg-buildpackage writes into the parent directory.  The .deb, .changes,
# .dsc, .orig.tar.gz ... land in DEBOUT.  The build's own make runs without
# this one's flags (-s would hide the compile line from blhc).  Needs
# debhelper, dpkg-dev and fakeroot (test/packages).  The tree is unpacked
# under umask 022: the tarball has no directories of its own, and
# dpkg-source records theirs.  DEBBUILDFLAGS:
# dpkg-buildpackage's options (deb-cross: -a ARCH -Pcross,nocheck -B).
DEBOUT ?= .
deb: dist
	@test -f debian/changelog || { echo "make deb: no debian/ here (the release tarball is upstream's alone)"; exit 1; }
	@case '$(DEBVERSION)' in $(VERSION)-*|*:$(VERSION)-*) ;; \
	*) echo "make deb: debian/changelog is at $(DEBVERSION), VERSION at $(VERSION)"; exit 1;; esac
	set -e; work=$$(mktemp -d); trap 'rm -rf "$$work"' EXIT; \
	cp $(DIST) "$$work/smtp521_$(VERSION).orig.tar.gz"; \
	(umask 022 && tar -xzf $(DIST) -C "$$work" && \
	{ if [ -e .git ]; then git ls-files debian; else find debian -type f; fi; } \
		| tar --mode=u+rw,go=rX -T - -cf - | tar -xf - -C "$$work/smtp521-$(VERSION)"); \
	(cd "$$work/smtp521-$(VERSION)" && env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL dpkg-buildpackage -us -uc $(DEBBUILDFLAGS)); \
	cp "$$work"/smtp521_$(VERSION)* "$$work"/smtp521-dbgsym_$(DEBVERSION)_* $(DEBOUT)/

# The package cross-built for ARCH (a dpkg architecture), as Debian's
# cross-build QA does it, and its binary checked: ARCH's machine, PIE,
# NEEDED libc.so.6 alone (test/scripts/deb-cross).  Its Build-Depends for ARCH
# must be installed: `dpkg --add-architecture ARCH`, `apt-get update`,
# `apt-get build-dep -a ARCH ./`.
deb-cross:
	test/scripts/deb-cross $(ARCH)

# Two builds of the package compared (build path, TZ, umask, locale
# varied), arm64 and armhf cross-built, lintian on the package, then
# piuparts in a chroot of the release this machine runs: install, upgrade
# from the previous build, remove, purge (test/scripts/deb-check).
deb-check:
	test/scripts/deb-check

# The README's test command and deb-check in a fresh Debian SUITE (a
# debootstrap chroot), e.g. SUITE=trixie on a Debian 12 machine: CI runs
# the release it is not on this way (test/scripts/check-in-chroot).  Needs root.
SUITE ?= trixie
# CHECK=package: the package-level checks alone (deb-check after the
# test dependencies install), as CI runs the releases besides its own.
check-in:
	test/scripts/check-in-chroot $(SUITE) $(CHECK)

# ARCH's cross build, qemu-check and deb-cross in a fresh Debian chroot
# of the release its kernel comes from, or of SUITE if given, for an
# architecture this machine's release cannot build or boot (loong64
# before Debian 14): make cross-in ARCH=loong64
# (test/scripts/cross-in-chroot).  Needs root.
cross-in:
	test/scripts/cross-in-chroot $(ARCH) $(if $(filter file,$(origin SUITE)),,$(SUITE))

# The package's DEP-8 tests (debian/tests/) under autopkgtest, in podman
# containers of a Debian release: this machine's release, or SUITE's if
# given (make autopkgtest SUITE=trixie); in each of TESTBEDS (default both:
# systemd as PID 1, where every test must pass, and sysvinit as PID 1,
# where the socket test must skip with its reason).  Prints autopkgtest's
# summaries (test/scripts/autopkgtest).  Needs root.
autopkgtest:
	test/scripts/autopkgtest "$(if $(filter file,$(origin SUITE)),,$(SUITE))" $(if $(TESTBEDS),"$(TESTBEDS)")

clean:
	rm -f smtp521 smtp521-asan smtp521-dynamic smtp521-static-pie $(ARCHS:%=smtp521-%) test/unit/unit test/unit/unit-asan test/unit/seccomp test/unit/seccomp-asan $(ARCHS:%=test/unit/seccomp-%) $(ARCHS:%=test/arch/init-%) test/unit/fuzz test/unit/*.o
	rm -rf test/bench/out $(COVDIR)
	rm -f smtp521-*.tar.gz smtp521-*.tar.gz.*tmp MANIFEST.*.tmp

.PHONY: all autopkgtest check check-in cross-in coverage mutation test i386 cross qemu qemu-check fuzz-if-clang clean install uninstall interop interop-in readme bench fuzz dist deb deb-check deb-cross
