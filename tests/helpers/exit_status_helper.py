"""Test helper, run by torchrun in place of a rank: ``exit_status_helper.py ARGS`` runs ``python ARGS``
(``-m slimpajama_train.train ...``, or a helper script) as its child, waits for it, writes its exit
status to ``$EXIT_STATUS_DIR/rank<RANK>`` and ends the same way (that code, or that signal).

Why: torchrun reaps its ranks and reports an exit status only for the failure it detects itself
(``exitcode  : N``, the first rank to fail); a torchrun that is signalled itself reports none. With
this helper, a test sees every rank's own exit status.

The signals torchrun passes on to its ranks (SIGTERM, SIGINT, SIGHUP, SIGQUIT) are forwarded to the
child, unless this process inherited them ignored (a torchrun that ignores SIGTERM, as under SLURM):
then the child inherits them ignored too, as a rank of that torchrun would.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
child: subprocess.Popen | None = None


def _forward(sig: int, _frame) -> None:
    if child is not None:
        child.send_signal(sig)


for sig in FORWARDED:
    if signal.getsignal(sig) is not signal.SIG_IGN:
        signal.signal(sig, _forward)
child = subprocess.Popen([sys.executable, *sys.argv[1:]])
status = child.wait()
out = Path(os.environ["EXIT_STATUS_DIR"])
out.mkdir(parents=True, exist_ok=True)
(out / f"rank{os.environ.get('RANK', '0')}").write_text(f"{status}\n")
if status < 0:  # killed by a signal: end by the same one, so that torchrun reports it as before
    if -status != signal.SIGKILL:
        signal.signal(-status, signal.SIG_DFL)
    os.kill(os.getpid(), -status)
sys.exit(status)
