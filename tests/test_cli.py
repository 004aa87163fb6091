import subprocess
import sys

import zoobj


def test_console_entry_prints_version():
    out = subprocess.run([sys.executable, "-m", "zoobj", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"zoobj {zoobj.__version__}"
