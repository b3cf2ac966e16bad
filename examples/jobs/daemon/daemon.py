# Double-forks a daemon that outlives make. It keeps the job's stdout open
# (so a driver that waits for EOF would hang) and leaves a file in /tmp.
import os
import time

if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open("/tmp/tango-daemon-was-here", "w") as marker:
            marker.write(str(os.getpid()))
        while True:
            time.sleep(1)
    os._exit(0)
os.wait()
print(f"daemon started by pid {os.getpid()}", flush=True)
