"""A stand-in GPU-check part that never finishes: the driver must kill it at its box."""

import time

if __name__ == "__main__":
    time.sleep(600)
