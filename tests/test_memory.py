"""fastser.memory: the training command keeps freed memory for reuse, so a step's activations do
not fault their pages in again every step (glibc gives blocks above its mmap threshold back to
the kernel on free)."""

import platform
import subprocess
import sys

import pytest

STEPS = """
import resource, sys, torch
if sys.argv[1] == "kept":
    from fastser.memory import retain_freed_memory
    assert retain_freed_memory()
def step():  # a CPU training step's activations: several blocks of MBs, all freed at its end
    live = [torch.empty(m * 1024 * 1024).fill_(1.0) for m in (6, 10, 2, 8)]
    del live
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, 10 * 26 * 2**22 // resource.getpagesize())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_blocks_are_reused_without_faulting_their_pages_in_again():
    def faults(mode):  # a fresh process each: the setting is process-wide
        out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
        return tuple(map(int, out.stdout.split()))

    (plain, pages), (kept, _) = faults("plain"), faults("kept")
    # without it most pages fault in again (about 75% on the 2-core CI machine); with it, few
    assert kept < pages // 4, f"{kept} page faults for {pages} pages written ({plain} without the setting)"


def test_the_training_command_sets_it(monkeypatch):
    from fastser import train

    called = []
    monkeypatch.setattr(train, "retain_freed_memory", lambda: called.append(True))
    with pytest.raises(SystemExit):
        train.cli(["--help"])
    assert called
