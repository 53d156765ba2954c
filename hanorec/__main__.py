import os
import sys

from hanorec.cli import main

try:
    code = main()
    sys.stdout.flush()
except BrokenPipeError:  # `... | head` closed the pipe: not an error of ours, and no traceback
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    code = 0
sys.exit(code)
