# Touches 4 GiB, 256 MiB at a time, saying how far it got.
import sys

chunks = []
for i in range(1, 17):
    chunks.append(b"x" * (256 << 20))
    print(f"holding {i * 256} MiB", flush=True)
print("allocated 4 GiB: the memory limit did NOT stop me", flush=True)
sys.exit(0)
