# Writes one file until the file size limit stops it, then more files until
# the disk (or quota) does; gives up, reporting it, after 2 GiB in total.
import signal

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of dying
block = b"\0" * (1 << 20)
limit = 2 << 30
total = 0


def fill(name, most):
    global total
    written = 0
    try:
        with open(name, "wb", buffering=0) as f:
            while written < most and total < limit:
                f.write(block)
                written += len(block)
                total += len(block)
    except OSError as e:
        return written, e.strerror
    return written, None


size, err = fill("big.0", limit)
print(f"one file: stopped at {size >> 20} MiB: {err or 'not stopped'}", flush=True)
n = 1
while total < limit:
    size, err = fill(f"big.{n}", 64 << 20)
    n += 1
    if err:
        print(f"many files: stopped at {total >> 20} MiB in {n} files: {err}", flush=True)
        break
else:
    print(f"wrote {total >> 20} MiB without being stopped", flush=True)
