"""Measure the host: CPUs, memory and the disk that holds instances."""

import os

GiB = 1 << 30


def disk_gb(path):
    """Return (total_gb, used_gb) of the file system holding ``path``."""
    st = os.statvfs(path)
    total = st.f_frsize * st.f_blocks
    free = st.f_frsize * st.f_bavail
    return total // GiB, (total - free) // GiB


def linux_memory_mb():
    """Return (total_mb, used_mb) from /proc/meminfo."""
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0])  # kB
    total = fields["MemTotal"] // 1024
    available = fields.get("MemAvailable", fields["MemFree"]) // 1024
    return total, total - available


def linux_cpu_model():
    """Return the CPU model name from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown"


def linux_cpu_vendor():
    """Return the CPU vendor string (e.g. GenuineIntel), or empty."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""
