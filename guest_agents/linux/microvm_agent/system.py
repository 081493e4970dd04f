"""What the agent does as the guest's PID 1: mounts, hostname, entropy, power-off."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import time

from microvm_agent import netlink

_libc = ctypes.CDLL(None, use_errno=True)
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
LINUX_REBOOT_CMD_RESTART = 0x01234567
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8


def mount(source: str, target: str, fstype: str, flags: int = 0, options: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    if os.path.ismount(target):
        return
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, options.encode() or None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {fstype} on {target}: {os.strerror(errno)}")


def setup_filesystems() -> None:
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755")
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666")
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV)
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    for link, target in (
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
        ("/dev/ptmx", "/dev/pts/ptmx"),
    ):
        if not os.path.lexists(link):
            os.symlink(target, link)


def kernel_args() -> dict[str, str]:
    try:
        words = open("/proc/cmdline").read().split()
    except OSError:
        return {}
    return dict(word.partition("=")[::2] for word in words)


def set_hostname(name: str) -> None:
    socket.sethostname(name)
    try:
        with open("/etc/hostname", "w") as f:
            f.write(name + "\n")
        with open("/etc/hosts", "w") as f:
            f.write(f"127.0.0.1 localhost\n127.0.1.1 {name}\n")
    except OSError:
        pass


def bring_up_loopback() -> None:
    # SIOCSIFFLAGS on "lo" with IFF_UP|IFF_RUNNING, without depending on iproute2 being installed.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14s", b"lo", 0x1 | 0x40, b"")
        try:
            fcntl.ioctl(s, 0x8914, request)
        except OSError:
            pass


# Where an image keeps the C library its programs load (glibc's multiarch and lib64 layouts; musl's is its loader).
LIBC_PATHS = ("/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib64/libc.so.6",
              "/usr/lib64/libc.so.6", "/lib/libc.so.6", "/usr/lib/libc.so.6")  # fmt: skip
PT_INTERP = 3


def elf_interpreter(path: str) -> str | None:
    """The program interpreter (PT_INTERP) a 64-bit ELF executable names, None for a static one or a script."""
    try:
        with open(path, "rb") as f:
            header = f.read(64)
            if header[:5] != b"\x7fELF\x02":
                return None
            (phoff,) = struct.unpack_from("<Q", header, 32)
            phentsize, phnum = struct.unpack_from("<HH", header, 54)
            for index in range(min(phnum, 64)):
                f.seek(phoff + index * phentsize)
                p_type, _, offset, _, _, size = struct.unpack("<IIQQQQ", f.read(40))
                if p_type == PT_INTERP:
                    f.seek(offset)
                    return f.read(min(size, 4096)).rstrip(b"\0").decode()
    except (OSError, struct.error, UnicodeDecodeError):
        return None
    return None


def prefetch_image_libc() -> None:
    """Starts reading the image's own ELF loader and C library into the page cache. The agent runs on its own
    runtime (images/runtime.py), so they are not cached until the first program of the image runs, which would
    pay for reading them (~25 ms under TCG); readahead fills the cache in the background instead."""
    for path in (elf_interpreter("/bin/sh"), *LIBC_PATHS):
        if not path:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def add_entropy(data: bytes) -> None:
    """Mixes `data` into the kernel RNG and credits it, so clones stop sharing a random state."""
    request = struct.pack("ii", len(data) * 8, len(data)) + data
    with open("/dev/urandom", "wb") as random_device:
        fcntl.ioctl(random_device, RNDADDENTROPY, request)
        # Mixing alone leaves the already-keyed CRNG (and so /dev/urandom) as it was until its next
        # scheduled reseed: clones would keep producing the same bytes. Reseed it now.
        fcntl.ioctl(random_device, RNDRESEEDCRNG)


def power_off() -> None:
    os.sync()
    try:
        os.kill(-1, 15)
        time.sleep(0.2)
        os.kill(-1, 9)
    except OSError:
        pass
    os.sync()
    _libc.reboot(LINUX_REBOOT_CMD_POWER_OFF)


def uptime_seconds() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def meminfo_kib() -> tuple[int, int]:
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0])
    return values.get("MemTotal", 0), values.get("MemAvailable", 0)


def network_interface() -> str | None:
    """The guest's (only) Ethernet interface, e.g. eth0; None when the VM has no NIC."""
    try:
        names = sorted(os.listdir("/sys/class/net"))
    except OSError:
        return None
    for name in names:
        if name != "lo" and os.path.exists(f"/sys/class/net/{name}/device"):
            return name
    return None


async def configure_network(mac_address: str, address_cidr: str, gateway: str, dns_servers: list[str]) -> str:
    """Gives the NIC its MAC, address and default route (replacing whatever a snapshot carried), over rtnetlink
    (netlink.py: no `ip` to start), and writes /etc/resolv.conf. Raises OSError with the kernel's errno when a step
    fails."""
    interface = network_interface()
    if interface is None:
        raise OSError(errno.ENODEV, "the VM has no network interface")
    try:  # guests are IPv4-only; no link-local chatter on the bridge
        with open(f"/proc/sys/net/ipv6/conf/{interface}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass
    try:
        netlink.configure(interface, mac_address, address_cidr, gateway)
    except ValueError as exc:  # a malformed address or MAC from the host
        raise OSError(errno.EINVAL, f"network configuration: {exc}") from None
    resolv = "".join(f"nameserver {server}\n" for server in dns_servers)
    temporary = "/etc/.resolv.conf.microvm"
    with open(temporary, "w") as f:
        f.write(resolv)
    try:
        os.unlink("/etc/resolv.conf")  # may be a symlink into a resolver's runtime directory
    except FileNotFoundError:
        pass
    os.rename(temporary, "/etc/resolv.conf")
    return interface
