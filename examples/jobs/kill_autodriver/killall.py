# Sends SIGKILL to every process it can see, its ancestors (make and the
# autodriver, or pid 1 in a namespace) last, and prints what it managed to kill before each step.
import os
import signal

me = os.getpid()
ancestors, chain = [], []
pid = os.getppid()
while pid > 1:
    try:
        with open(f"/proc/{pid}/stat") as f:
            parent = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{pid}/comm") as f:
            name = f.read().strip()
    except OSError:
        break
    ancestors.append(pid)
    chain.append(f"{pid}:{name}")
    pid = parent
print("ancestors: " + " <- ".join(chain), flush=True)


def kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except OSError:
        return False


others = [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != me]
others = [p for p in others if p not in ancestors]
killed = [p for p in others if kill(p)]
print(f"others: killed {len(killed)} {killed[:20]}, refused {len(others) - len(killed)}", flush=True)
# Ancestors last, the nearest (make) at the very end: killing make ends the
# job before anything else prints.
print("now killing pid 1 and the ancestors, farthest first", flush=True)
for pid in [1] + [p for p in reversed(ancestors) if p != 1]:
    print(f"kill {pid}: {'yes' if kill(pid) else 'refused'}", flush=True)
