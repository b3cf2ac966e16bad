# Checks what network the job has, touching nothing beyond loopback:
# - the interfaces and the default route it can see (read from /proc, no
#   packet sent anywhere);
# - a TCP connection to 127.0.0.1 on the port in port.txt (default 3000):
#   the host's loopback if the job shares the host's network, its own
#   otherwise. Tests open a listener on the host there.
# It never sends traffic to any address outside 127.0.0.0/8.
import os
import socket

interfaces = []
try:
    with open("/proc/net/dev") as dev:
        interfaces = sorted(line.split(":")[0].strip() for line in dev.readlines()[2:])
except OSError:
    pass
print(f"interfaces: {' '.join(interfaces) or '(none)'}", flush=True)
default_route = False
try:
    with open("/proc/net/route") as routes:
        default_route = any(line.split()[1] == "00000000" for line in routes.readlines()[1:])
except OSError:
    pass
print(f"default route: {'YES' if default_route else 'no'}", flush=True)

try:
    with open("port.txt") as f:
        port = int(f.read().strip())
except (OSError, ValueError):
    port = 3000
try:
    with socket.create_connection(("127.0.0.1", port), timeout=3):
        result = "CONNECTED"
except OSError as e:
    result = f"no ({e.strerror or e})"
print(f"tcp 127.0.0.1:{port}: {result}", flush=True)
