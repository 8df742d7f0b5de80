"""Every Debian release architecture: smtp521 cross-builds for each (make
cross: a PIE of that machine, static where the toolchain can, else linked
dynamically against glibc; the Debian package's cross build, dynamic
everywhere, is test/scripts/deb-cross, make deb-cross), and under
ARCH's own Debian kernel in qemu-system (test/arch/run) every scripted
session gives the same bytes on a pipe and on TCP, the filter is on
(Seccomp: 2, sandbox=on), no call of a session is refused, and
test/unit/seccomp.cpp passes.  This is also what proves i386 on a host whose
kernel refuses i386 binaries."""
import glob
import os
import re
import shutil
import struct
import subprocess

import pytest

from harness import HOST_LIMIT, ROOT, TEST

RUN = os.path.join(TEST, "arch", "run")


def makefile_archs():
    with open(os.path.join(ROOT, "Makefile")) as f:
        text = f.read()
    archs = re.search(r"^ARCHS = (.*)$", text, re.M)[1].split()
    triplets = dict(re.findall(r"^TRIPLET_(\S+)\s*= (\S+)$", text, re.M))
    return archs, triplets


ARCHS, TRIPLETS = makefile_archs()
# ARCH -> the qemu-system program test/arch/run boots it with, and the
# firmware files it needs, with their Debian packages.
QEMU, FIRMWARE = {}, {}
for line in subprocess.run([RUN, "--list"], capture_output=True, text=True, check=True).stdout.splitlines():
    arch, program, *files = line.split()
    QEMU[arch], FIRMWARE[arch] = program, [f.split("=", 1) for f in files]
# ELF e_machine, class (1: 32-bit, 2: 64-bit), data (1: little, 2: big
# endian), and for ARM the float ABI in e_flags.
ELF = {"amd64": (62, 2, 1), "i386": (3, 1, 1), "arm64": (183, 2, 1), "armel": (40, 1, 1), "armhf": (40, 1, 1),
       "loong64": (258, 2, 1), "ppc64el": (21, 2, 1), "riscv64": (243, 2, 1), "s390x": (22, 2, 2)}
EF_ARM_ABI_FLOAT_SOFT, EF_ARM_ABI_FLOAT_HARD = 0x200, 0x400


def compiler(arch):
    return f"{TRIPLETS[arch]}-g++"


def release_architectures():
    """The architectures of this machine's Debian release, from its
    archive's Release file in apt's lists; None where apt has none."""
    with open("/etc/os-release") as f:
        codename = re.search(r"^VERSION_CODENAME=(\S+)$", f.read(), re.M)
    for path in glob.glob("/var/lib/apt/lists/*InRelease") + glob.glob("/var/lib/apt/lists/*_Release"):
        with open(path, errors="replace") as f:
            text = f.read()
        archs = re.search(r"^Architectures: (.*)$", text, re.M)
        if codename and archs and re.search(rf"^Codename: {codename[1]}$", text, re.M):
            return set(archs[1].split())
    return None


def params(need_qemu=False):
    out = []
    release = release_architectures()
    for arch in ARCHS:
        reason = None
        if not shutil.which(compiler(arch)) and release is not None and arch not in release:
            # loong64 before Debian 14: Debian 12 has no cross compiler for
            # it, and neither has a kernel, so test/packages (one list for
            # every release) names none; a chroot of a release that has
            # them proves it (test/scripts/cross-in-chroot).
            reason = (HOST_LIMIT + f"{arch} is not an architecture of this Debian release, and {compiler(arch)} "
                      f"is not installed (make cross-in ARCH={arch})")
        elif not shutil.which(compiler(arch)):
            reason = f"needs {compiler(arch)} (test/packages)"
        elif need_qemu and not shutil.which(QEMU[arch]):
            reason = f"needs {QEMU[arch]} (test/packages)"
        elif need_qemu and any(not os.path.exists(path) for path, _ in FIRMWARE[arch]):
            reason = "needs " + ", ".join(f"{path} ({package})" for path, package in FIRMWARE[arch])
        out.append(pytest.param(arch, id=arch, marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return out


def elf(path):
    """(machine, class, data, flags, static, pie) of an ELF file."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF", path
    cls, order = data[4], data[5]
    e = "<" if order == 1 else ">"
    e_type, machine = struct.unpack_from(e + "HH", data, 16)
    if cls == 2:
        phoff, = struct.unpack_from(e + "Q", data, 32)
        flags, = struct.unpack_from(e + "I", data, 48)
        phentsize, phnum = struct.unpack_from(e + "HH", data, 54)
    else:
        phoff, = struct.unpack_from(e + "I", data, 28)
        flags, = struct.unpack_from(e + "I", data, 36)
        phentsize, phnum = struct.unpack_from(e + "HH", data, 42)
    types = [struct.unpack_from(e + "I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    PT_INTERP = 3
    return machine, cls, order, flags, PT_INTERP not in types, e_type == 3  # ET_DYN: PIE


def linked_libraries(path):
    """(interpreter, NEEDED entries) of an ELF file, by readelf (binutils
    reads every architecture's)."""
    out = subprocess.run(["readelf", "-ldW", path], capture_output=True, text=True, check=True).stdout
    interp = re.search(r"\[Requesting program interpreter: (\S+)\]", out)
    return interp and interp[1], re.findall(r"\(NEEDED\)\s+Shared library: \[(.*)\]", out)


def rcrt1(arch):
    p = subprocess.run([compiler(arch), "-print-file-name=rcrt1.o"], capture_output=True, text=True)
    return p.stdout.strip().startswith("/")


def check_linked(arch, path, dynamic=True):
    """ARCH's machine and PIE; if dynamic, linked against glibc alone:
    NEEDED libc.so.6 and at most the loader it names (where glibc keeps the
    stack protector's guard there: arm64, armel, armhf, loong64, riscv64), no
    libstdc++, no libgcc_s."""
    machine, cls, order, flags, static, pie = elf(path)
    assert (machine, cls, order) == ELF[arch], (path, machine, cls, order)
    if arch in ("armel", "armhf"):
        assert flags & (EF_ARM_ABI_FLOAT_HARD if arch == "armhf" else EF_ARM_ABI_FLOAT_SOFT), hex(flags)
    assert pie, f"{path}: not position independent (ET_EXEC)"
    assert static != dynamic, f"{path}: {'static' if static else 'dynamic'}, want {'dynamic' if dynamic else 'static'}"
    if dynamic:
        interp, needed = linked_libraries(path)
        assert "libc.so.6" in needed and set(needed) <= {"libc.so.6", os.path.basename(interp)}, (interp, needed)


def test_every_architecture_boots_here():
    # The Makefile's list and test/arch/run's kernels are the same.
    assert sorted(ARCHS) == sorted(QEMU)


@pytest.mark.parametrize("arch", params())
def test_cross_build_is_a_pie_of_the_architecture(arch):
    # Static PIE exactly where the toolchain can (the Makefile says why),
    # else dynamic: never a non-PIE static binary.
    path = os.path.join(ROOT, f"smtp521-{arch}")
    assert os.path.exists(path), f"smtp521-{arch} is not built (make cross)"
    check_linked(arch, path, dynamic=not rcrt1(arch))


@pytest.mark.parametrize("arch", params(need_qemu=True))
def test_under_its_own_kernel(arch):
    for path in (f"smtp521-{arch}", f"test/unit/seccomp-{arch}", f"test/arch/init-{arch}"):
        assert os.path.exists(os.path.join(ROOT, path)), f"{path} is not built (make qemu)"
    p = subprocess.run([RUN, arch], capture_output=True, text=True, timeout=1800)
    summary = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr
    assert p.returncode == 0, p.stdout[-20000:] + p.stderr
    assert summary.endswith("; ok"), summary
    assert "Seccomp: 2;" in summary and "refused session calls 0;" in summary, summary
    print(summary)


@pytest.mark.parametrize("arch", params())
def test_the_sanitizer_build_compiles_for_the_architecture(arch):
    # The filter's sanitizer-only part is compiled on every architecture
    # (readlink and mmap are not calls everywhere).
    p = subprocess.run([compiler(arch), "-std=c++17", "-Wall", "-Wextra", "-Wconversion", "-Werror",
                        "-DSMTP521_VERSION=\"0\"", "-fsanitize=address", "-fsyntax-only", "smtp521.cpp"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("off_by", ["+ 1", "- 1"])
def test_a_filter_length_off_by_one_fails_the_build(off_by, tmp_path):
    # The program's length and jumps are computed in a constant expression;
    # an array one too long or too short for it stops the compiler.
    with open(os.path.join(ROOT, "smtp521.cpp")) as f:
        source = f.read()
    line = "constexpr std::size_t filter_length = seccomp_program<0>().size;"
    assert line in source
    broken = tmp_path / "smtp521.cpp"
    broken.write_text(source.replace(line, line[:-1] + f" {off_by};"))
    p = subprocess.run(["g++", "-std=c++17", "-DSMTP521_VERSION=\"0\"", "-fsyntax-only", str(broken)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "static assertion failed" in p.stderr or "__throw_out_of_range" in p.stderr, p.stderr
